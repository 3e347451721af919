"""Module families (`ModuleGroup`), automatic discovery and `annotate()`.

A *module family* is a set of variables that are sliced the same way into
`num_modules` modules: module `i` owns, in every variable of the family, the
contiguous block `[i * S / G, (i + 1) * S / G)` of that variable's module axis
(size `S`, `G = num_modules`). A variable whose axis is `None` belongs whole
to every module of its family, which is only allowed when `num_modules == 1`.

Annotations are stored twice on purpose: on the model (the ordered list of
families, used by `module_lambda_max` and the training step) and on each
variable (`variable._keras_mat_group` / `variable._keras_mat_axis`), so that the
optimizer wrapper finds them from its `var_list` alone, e.g. in a custom
training loop that never hands it the model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import keras

KINDS = ("head", "filter", "expert", "layer", "custom")

_GROUP_ATTR = "_keras_mat_group"
_AXIS_ATTR = "_keras_mat_axis"
_MODEL_ATTR = "_keras_mat_groups"


def _var_key(variable):
    # Keras variables hash by identity on every backend; `path` can collide
    # between two models built in the same process, identity cannot.
    return id(variable)


class ModuleGroup:
    """A family of modules: variable slices that form one module each.

    Module `i` of the family owns, in every listed variable, the `i`-th of
    `num_modules` equal contiguous blocks along that variable's axis.

    Args:
        name: Unique name of the family, e.g. `"encoder_0/attention/heads"`.
        variables: A `keras.Variable` or a list of them.
        axes: The module axis of each variable (an int, negative allowed, or
            `None` for "the whole variable"). A single int/None applies to
            every variable.
        num_modules: Number of modules in the family. Must divide the size of
            every variable's module axis. `axis=None` requires `num_modules=1`.
        kind: One of `"head"`, `"filter"`, `"expert"`, `"layer"`, `"custom"`.
            Used to choose the threshold scope (global for heads and experts,
            per family for filters).

    Raises:
        ValueError: on an axis out of range, a `num_modules` that does not
            divide an axis, a non-trainable variable, an unknown `kind`, or a
            variable listed twice.

    Example:

    >>> layer = keras.layers.Dense(4)
    >>> layer.build((None, 3))
    >>> g = ModuleGroup("units", [layer.kernel, layer.bias], axes=[1, 0],
    ...                 num_modules=4, kind="custom")
    >>> g.num_modules
    4
    """

    def __init__(self, name, variables, axes=None, num_modules=1, kind="custom"):
        if not isinstance(name, str) or not name:
            raise ValueError(f"`name` must be a non-empty string. Received: name={name!r}")
        if isinstance(variables, keras.Variable):
            variables = [variables]
        variables = list(variables)
        if not variables:
            raise ValueError(
                f"ModuleGroup {name!r} needs at least one variable. Received: variables={variables!r}"
            )
        for v in variables:
            if not isinstance(v, keras.Variable):
                raise TypeError(
                    f"ModuleGroup {name!r}: every entry of `variables` must be a "
                    f"keras.Variable. Received: variables entry={v!r} of type {type(v).__name__}"
                )
            if not v.trainable:
                raise ValueError(
                    f"ModuleGroup {name!r}: variable {v.path!r} is not trainable; only "
                    f"trainable variables can form modules. Received: variable={v.path!r}"
                )
        if axes is None or isinstance(axes, int):
            axes = [axes] * len(variables)
        axes = list(axes)
        if len(axes) != len(variables):
            raise ValueError(
                f"ModuleGroup {name!r}: `axes` must have one entry per variable "
                f"({len(variables)}). Received: axes={axes!r}"
            )
        if not isinstance(num_modules, int) or isinstance(num_modules, bool) or num_modules < 1:
            raise ValueError(
                f"ModuleGroup {name!r}: `num_modules` must be a positive int. "
                f"Received: num_modules={num_modules!r}"
            )
        if kind not in KINDS:
            raise ValueError(f"ModuleGroup {name!r}: `kind` must be one of {KINDS}. Received: kind={kind!r}")
        seen = set()
        norm_axes = []
        for v, axis in zip(variables, axes):
            if _var_key(v) in seen:
                raise ValueError(
                    f"ModuleGroup {name!r} lists variable {v.path!r} twice. "
                    f"Received: variables={[x.path for x in variables]}"
                )
            seen.add(_var_key(v))
            rank = len(v.shape)
            if axis is None:
                if num_modules != 1:
                    raise ValueError(
                        f"ModuleGroup {name!r}: variable {v.path!r} has axis=None (whole "
                        f"variable) which needs num_modules=1. Received: num_modules={num_modules}"
                    )
                norm_axes.append(None)
                continue
            if not isinstance(axis, int) or isinstance(axis, bool) or not -rank <= axis < rank:
                raise ValueError(
                    f"ModuleGroup {name!r}: axis out of range for variable {v.path!r} "
                    f"of shape {tuple(v.shape)} (rank {rank}). Received: axis={axis!r}"
                )
            axis = axis % rank
            size = v.shape[axis]
            if size % num_modules:
                raise ValueError(
                    f"ModuleGroup {name!r}: num_modules={num_modules} does not divide axis "
                    f"{axis} of variable {v.path!r} (size {size}). Received: num_modules={num_modules}"
                )
            norm_axes.append(axis)
        self.name = name
        self.variables = variables
        self.axes = norm_axes
        self.num_modules = num_modules
        self.kind = kind

    @property
    def num_parameters(self):
        """Number of scalar parameters in one module of this family."""
        total = 0
        for v in self.variables:
            size = 1
            for d in v.shape:
                size *= d
            total += size // self.num_modules
        return total

    def __repr__(self):
        entries = ", ".join(f"{v.path}@{a}" for v, a in zip(self.variables, self.axes))
        return (
            f"ModuleGroup(name={self.name!r}, kind={self.kind!r}, "
            f"num_modules={self.num_modules}, variables=[{entries}])"
        )


# --------------------------------------------------------------------------------------
# Automatic discovery
# --------------------------------------------------------------------------------------


def _own_trainable(layer):
    # Variables created by this layer itself, not by its sub-layers.
    own = getattr(layer, "_trainable_variables", None)
    if own is None:
        return []
    return [v for v in own if v.trainable]


def _all_layers(model):
    # Depth-first, deduplicated, in creation order; `_flatten_layers` is how
    # Keras itself enumerates nested layers (models, keras-hub tasks, subclassed).
    out, seen = [], set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        out.append(layer)
    return out


def _layer_name(layer):
    return getattr(layer, "path", None) or layer.name


def _attention_group(layer):
    heads = getattr(layer, "_num_heads", None)
    parts = [
        ("_query_dense", 1, 0),
        ("_key_dense", 1, 0),
        ("_value_dense", 1, 0),
        ("_output_dense", 0, None),
    ]
    variables, axes = [], []
    for attr, kernel_axis, bias_axis in parts:
        sub = getattr(layer, attr, None)
        if sub is None:
            return None
        kernel = getattr(sub, "kernel", None)
        if kernel is None or not kernel.trainable:
            continue
        if kernel.shape[kernel_axis] != heads:
            # Not the standard (d, H, d_head) / (H, d_head, d) layout: let the
            # sub-layers fall back to whole-layer modules instead of guessing.
            return None
        variables.append(kernel)
        axes.append(kernel_axis)
        bias = getattr(sub, "bias", None)
        if bias_axis is not None and bias is not None and bias.trainable:
            if bias.shape[bias_axis] != heads:
                return None
            variables.append(bias)
            axes.append(bias_axis)
    if not variables:
        return None
    return ModuleGroup(f"{_layer_name(layer)}/heads", variables, axes, heads, kind="head")


def _conv_group(layer, conv_modules):
    from keras.src.layers.convolutional.base_conv import BaseConv
    from keras.src.layers.convolutional.base_conv_transpose import BaseConvTranspose
    from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv
    from keras.src.layers.convolutional.base_separable_conv import BaseSeparableConv

    name = _layer_name(layer)
    groups = []

    def count(size):
        if conv_modules is None:
            return size
        if size % conv_modules:
            raise ValueError(
                f"annotate: conv_modules={conv_modules} does not divide the {size} filters "
                f"of layer {name!r}. Received: conv_modules={conv_modules}"
            )
        return conv_modules

    bias = getattr(layer, "bias", None)
    if isinstance(layer, BaseSeparableConv):
        # Output filter f = pointwise kernel slice f + bias f; the depthwise
        # kernel is shared by every filter, so it is a whole-layer module.
        pw = layer.pointwise_kernel
        variables, axes = ([pw], [-1]) if pw.trainable else ([], [])
        if bias is not None and bias.trainable:
            variables.append(bias)
            axes.append(0)
        if variables:
            groups.append(ModuleGroup(f"{name}/filters", variables, axes, count(pw.shape[-1]), "filter"))
        if layer.depthwise_kernel.trainable:
            groups.append(ModuleGroup(f"{name}/depthwise", [layer.depthwise_kernel], None, 1, "layer"))
        return groups
    if isinstance(layer, BaseDepthwiseConv):
        # kernel (..., in, multiplier), bias (in * multiplier,): output channel
        # c = i * multiplier + m, so "input channel i" is a contiguous block of
        # the bias and one index of the kernel's in axis.
        k = layer.kernel
        variables, axes = ([k], [-2]) if k.trainable else ([], [])
        if bias is not None and bias.trainable:
            variables.append(bias)
            axes.append(0)
        if variables:
            groups.append(ModuleGroup(f"{name}/filters", variables, axes, count(k.shape[-2]), "filter"))
        return groups
    if isinstance(layer, (BaseConv, BaseConvTranspose)):
        k = layer.kernel
        kaxis = -2 if isinstance(layer, BaseConvTranspose) else -1
        variables, axes = ([k], [kaxis]) if k.trainable else ([], [])
        if bias is not None and bias.trainable:
            variables.append(bias)
            axes.append(0)
        if variables:
            groups.append(ModuleGroup(f"{name}/filters", variables, axes, count(k.shape[kaxis]), "filter"))
        return groups
    return None


def _expert_group(layer):
    experts = getattr(layer, "num_experts", None)
    if not isinstance(experts, int) or experts < 2:
        return None
    variables = [
        v
        for v in _own_trainable(layer)
        if len(v.shape) >= 1 and v.shape[0] == experts and not re.search(r"router|gating", v.path)
    ]
    if not variables:
        return None
    return ModuleGroup(f"{_layer_name(layer)}/experts", variables, 0, experts, kind="expert")


def _dense_group(layer):
    variables = [v for v in (getattr(layer, "kernel", None), getattr(layer, "bias", None)) if v is not None]
    variables = [v for v in variables if v.trainable]
    if not variables:
        return None
    return ModuleGroup(_layer_name(layer), variables, None, 1, kind="layer")


def _is_embedding(layer):
    # keras.layers.Embedding and keras-hub's ReversibleEmbedding,
    # PositionEmbedding, TokenAndPositionEmbedding (by name: keras-hub is optional).
    return isinstance(layer, keras.layers.Embedding) or "Embedding" in type(layer).__name__


def _embedding_group(layer):
    variables = _own_trainable(layer)
    if not variables:
        return None
    return ModuleGroup(f"{_layer_name(layer)}/embedding", variables, None, 1, kind="layer")


def _is_norm(layer):
    # LayerNormalization, BatchNormalization, GroupNormalization, RMSNormalization...
    return type(layer).__name__.endswith("Normalization")


def discover_groups(
    model,
    conv_modules=None,
    include=("head", "filter", "expert", "layer"),
    exclude=(),
    embeddings=False,
    norms=False,
):
    """Finds the module families of `model` automatically.

    Args:
        model: A built Keras model (Functional, Sequential, subclassed or a
            keras-hub task).
        conv_modules: `None` for one module per conv filter, or an int `G`
            to split every conv layer's filters into `G` equal modules.
        include: Which kinds to discover, subset of
            `("head", "filter", "expert", "layer")`.
        exclude: Layers (objects) or regular expressions matched against the
            layer path whose parameters are left out of every family.
        embeddings: Also make each embedding layer (Keras `Embedding`,
            keras-hub token/position/segment embeddings) one whole-layer
            module, so that MAT may stop it; when it and every layer below
            a point are stopped, back-propagation ends there. Off by default
            (the spec trains embeddings always). keras-hub ties the token
            embedding to the masked-LM output projection: stopping it stops
            both.
        norms: Also make each normalization layer (its scale and offset) one
            whole-layer module. Off by default (the spec trains norms always),
            but while a block's norms train, back-propagation must reach them,
            so a frozen transformer bottom saves only weight gradients. For
            the same reason it also makes each attention layer's output bias
            (shared by all heads) a whole-layer module.

    Returns:
        A list of `ModuleGroup`, one per attention layer (heads), conv layer
        (filters), stacked-expert layer (experts) and remaining
        `Dense`/`EinsumDense` (one module per layer).
    """
    from keras.src.layers.convolutional.base_conv import BaseConv
    from keras.src.layers.convolutional.base_conv_transpose import BaseConvTranspose
    from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv
    from keras.src.layers.convolutional.base_separable_conv import BaseSeparableConv

    unknown = set(include) - {"head", "filter", "expert", "layer"}
    if unknown:
        raise ValueError(
            "`include` may only name 'head', 'filter', 'expert' and 'layer'. "
            f"Received: include={tuple(include)!r}"
        )
    if conv_modules is not None and (not isinstance(conv_modules, int) or conv_modules < 1):
        raise ValueError(
            f"`conv_modules` must be None or a positive int. Received: conv_modules={conv_modules!r}"
        )
    excluded_layers = {id(x) for x in exclude if isinstance(x, keras.layers.Layer)}
    patterns = [re.compile(x) for x in exclude if isinstance(x, str)]

    def skipped(layer):
        return id(layer) in excluded_layers or any(p.search(_layer_name(layer)) for p in patterns)

    groups, claimed = [], set()

    def claim(group):
        keys = {_var_key(v) for v in group.variables}
        if keys & claimed:
            return
        claimed.update(keys)
        groups.append(group)

    layers = _all_layers(model)
    conv_types = (BaseConv, BaseConvTranspose, BaseDepthwiseConv, BaseSeparableConv)
    # Composite layers first (attention, experts) so that their sub-layers are
    # not also taken as whole-layer Dense modules.
    for layer in layers:
        if skipped(layer):
            claimed.update(_var_key(v) for v in layer.trainable_variables)
            continue
        if "head" in include and isinstance(layer, keras.layers.MultiHeadAttention):
            g = _attention_group(layer)
            if g is not None:
                claim(g)
                bias = getattr(getattr(layer, "_output_dense", None), "bias", None)
                if norms and bias is not None and bias.trainable:
                    # Shared by all heads, so not in the head family; with
                    # norms=True every parameter of a block is under MAT.
                    claim(ModuleGroup(f"{_layer_name(layer)}/output_bias", [bias], None, 1, kind="layer"))
        elif "expert" in include:
            g = _expert_group(layer)
            if g is not None:
                claim(g)
    for layer in layers:
        if skipped(layer):
            continue
        if embeddings and _is_embedding(layer):
            g = _embedding_group(layer)
            if g is not None:
                claim(g)
        elif norms and _is_norm(layer):
            variables = _own_trainable(layer)
            if variables:
                claim(ModuleGroup(f"{_layer_name(layer)}/norm", variables, None, 1, kind="layer"))
        elif isinstance(layer, conv_types):
            if "filter" in include:
                for g in _conv_group(layer, conv_modules) or []:
                    claim(g)
        elif "layer" in include and isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
            g = _dense_group(layer)
            if g is not None:
                claim(g)
    return groups


def _check_no_overlap(groups):
    owner = {}
    for g in groups:
        for v in g.variables:
            other = owner.get(_var_key(v))
            if other is not None and other is not g:
                raise ValueError(
                    f"Module families overlap: variable {v.path!r} is in both {other.name!r} "
                    f"and {g.name!r}. Received: groups=[{other.name!r}, {g.name!r}]"
                )
            owner[_var_key(v)] = g
    names = [g.name for g in groups]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"Module family names must be unique. Received: duplicate names={dupes}")


def annotate(model, groups="auto", conv_modules=None, exclude=(), embeddings=False, norms=False):
    """Declares the modules of `model` and enables MAT on it.

    Records the module families on the model and on each of their variables,
    so that `keras_mat.module_lambda_max`, `keras_mat.wrap(...)` and the MAT
    training step find them.

    Args:
        model: A Keras model. It is built first if it is not (it must then
            have known input shapes).
        groups: `"auto"` (discover heads, filters, experts and Dense layers),
            a list of `ModuleGroup` (only those), or a list that contains
            `"auto"` and `ModuleGroup`s (explicit families win over automatic
            ones that share a variable with them).
        conv_modules: For automatic conv families: `None` for one module per
            filter, or `G` to split each conv layer's filters into `G` modules.
        exclude: Layers, or regular expressions matched against layer paths,
            that automatic discovery must leave out (they stay always trained).
        embeddings: Put embedding layers under MAT's control (one whole-layer
            module each; see `discover_groups`).
        norms: Put normalization layers under MAT's control (one whole-layer
            module each; see `discover_groups`).

    Returns:
        The same `model`, annotated.

    Raises:
        ValueError: if a family's variable is not a trainable variable of
            `model`, if families overlap, or if `groups` is malformed.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4),
    ...                           keras.layers.Dense(2)])
    >>> _ = annotate(model)
    >>> [(g.kind, g.num_modules) for g in get_groups(model)]
    [('layer', 1), ('layer', 1)]
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"`model` must be a Keras model or layer. Received: model={model!r}")
    if not model.built:
        raise ValueError(
            "annotate() needs a built model: call it on data or build it first. "
            f"Received: model={model.name!r} (not built)"
        )
    if isinstance(groups, str):
        if groups != "auto":
            raise ValueError(f"`groups` must be 'auto' or a list of ModuleGroup. Received: groups={groups!r}")
        groups = ["auto"]
    if isinstance(groups, ModuleGroup):
        groups = [groups]
    groups = list(groups)
    explicit = []
    want_auto = False
    for g in groups:
        if isinstance(g, str) and g == "auto":
            want_auto = True
        elif isinstance(g, ModuleGroup):
            explicit.append(g)
        else:
            raise ValueError(f"`groups` entries must be ModuleGroup or 'auto'. Received: groups entry={g!r}")
    _check_no_overlap(explicit)
    trainable = {_var_key(v): v for v in model.trainable_variables}
    all_vars = {_var_key(v) for v in model.variables}
    for g in explicit:
        for v in g.variables:
            if _var_key(v) not in trainable:
                where = "is not trainable in" if _var_key(v) in all_vars else "is not a variable of"
                raise ValueError(
                    f"ModuleGroup {g.name!r}: variable {v.path!r} {where} model "
                    f"{model.name!r}. Received: variable={v.path!r}"
                )
    final = list(explicit)
    if want_auto:
        taken = {_var_key(v) for g in explicit for v in g.variables}
        for g in discover_groups(
            model, conv_modules=conv_modules, exclude=exclude, embeddings=embeddings, norms=norms
        ):
            if not any(_var_key(v) in taken for v in g.variables):
                final.append(g)
    _check_no_overlap(final)
    # Clear old annotations so re-annotating a model is idempotent.
    for v in model.variables:
        for attr in (_GROUP_ATTR, _AXIS_ATTR):
            if hasattr(v, attr):
                delattr(v, attr)
    for g in final:
        for v, axis in zip(g.variables, g.axes):
            setattr(v, _GROUP_ATTR, g)
            setattr(v, _AXIS_ATTR, axis)
    object.__setattr__(model, _MODEL_ATTR, tuple(final))
    from keras_mat import training  # local: training imports groups

    training.install(model)
    return model


def get_groups(model):
    """The module families recorded by `annotate(model)`, or `None`."""
    return getattr(model, _MODEL_ATTR, None)


def group_of(variable):
    """`(ModuleGroup, axis)` of an annotated variable, or `(None, None)`."""
    return getattr(variable, _GROUP_ATTR, None), getattr(variable, _AXIS_ATTR, None)


def groups_from_variables(variables: Sequence):
    """The distinct families that own any of `variables`, in first-seen order."""
    out, seen = [], set()
    for v in variables:
        g, _ = group_of(v)
        if g is not None and id(g) not in seen:
            seen.add(id(g))
            out.append(g)
    return out
