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
import warnings
import weakref
from collections.abc import Iterable, Sequence

import keras
import numpy as np

from keras_mat._keras_private import BaseConv, BaseConvTranspose, BaseDepthwiseConv, BaseSeparableConv

KINDS = ("head", "filter", "expert", "layer", "custom")

_GROUP_ATTR = "_keras_mat_group"
_AXIS_ATTR = "_keras_mat_axis"
_MODEL_ATTR = "_keras_mat_groups"


def _as_int(x):
    """`x` as a Python int when it is an integer (Python or numpy, not bool), else None."""
    if isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)):
        return int(x)
    return None


def _check_flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False. Received: {name}={value!r}")
    return bool(value)


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
            every variable. Numpy integers count as ints.
        num_modules: Positive int: number of modules in the family. Must
            divide the size of every variable's module axis. `axis=None`
            requires `num_modules=1`.
        kind: One of `"head"`, `"filter"`, `"expert"`, `"layer"`, `"custom"`.
            Used to choose the threshold scope (global for heads and experts,
            per family for filters).

    Raises:
        TypeError: if `variables` is not a variable or a list of variables,
            or `axes` is neither an int, None nor a list.
        ValueError: on an empty `name` or `variables`, an axis out of range,
            a `num_modules` that is not a positive int or does not divide an
            axis, a non-trainable variable, an unknown `kind`, or a variable
            listed twice.

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
        if isinstance(variables, (str, bytes)) or not isinstance(variables, Iterable):
            raise TypeError(
                f"ModuleGroup {name!r}: `variables` must be a keras.Variable or a list of them. "
                f"Received: variables={variables!r}"
            )
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
        if axes is None or _as_int(axes) is not None:
            axes = [axes] * len(variables)
        elif isinstance(axes, (str, bytes)) or not isinstance(axes, Iterable):
            raise TypeError(
                f"ModuleGroup {name!r}: `axes` must be an int, None, or a list with one int or "
                f"None per variable. Received: axes={axes!r}"
            )
        axes = list(axes)
        if len(axes) != len(variables):
            raise ValueError(
                f"ModuleGroup {name!r}: `axes` must have one entry per variable "
                f"({len(variables)}). Received: axes={axes!r}"
            )
        count = _as_int(num_modules)
        if count is None or count < 1:
            raise ValueError(
                f"ModuleGroup {name!r}: `num_modules` must be a positive int. "
                f"Received: num_modules={num_modules!r}"
            )
        num_modules = count
        if not isinstance(kind, str) or kind not in KINDS:
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
            index = _as_int(axis)
            if index is None or not -rank <= index < rank:
                raise ValueError(
                    f"ModuleGroup {name!r}: axis out of range for variable {v.path!r} "
                    f"of shape {tuple(v.shape)} (rank {rank}). Received: axis={axis!r}"
                )
            axis = index % rank
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
        # Weak references to the optimizers built with this family (`mark_in_use`).
        self._users = []

    def _signature(self):
        # Two families are the same when they slice the same variables the same way.
        return (
            self.name,
            self.kind,
            self.num_modules,
            tuple((_var_key(v), a) for v, a in zip(self.variables, self.axes)),
        )

    def _live_users(self):
        live = [ref() for ref in self._users]
        return [u for u in live if u is not None]

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


_QUERY_HEAD_ATTRS = ("_num_heads", "num_heads", "num_query_heads", "_num_query_heads")
_KV_HEAD_ATTRS = ("num_key_value_heads", "_num_key_value_heads")
_PROJECTIONS = ("_query_dense", "_key_dense", "_value_dense", "_output_dense")


def _first_int(layer, names):
    for name in names:
        value = _as_int(getattr(layer, name, None))
        if value is not None and value >= 1:
            return value
    return None


def _is_attention(layer):
    # Keras MultiHeadAttention (and keras-hub's subclasses), and any layer laid
    # out like it: query/key/value/output projection sub-layers and a head
    # count (Keras GroupQueryAttention, keras-hub Llama/Mistral/Bloom...).
    if isinstance(layer, keras.layers.MultiHeadAttention):
        return True
    return _first_int(layer, _QUERY_HEAD_ATTRS) is not None and all(
        isinstance(getattr(layer, a, None), keras.layers.Layer) for a in _PROJECTIONS
    )


def _head_axis(shape, heads, head_dim, role):
    # The head axis of one projection variable in the standard layouts, or None
    # (nothing is guessed at): input kernels (d, H, d_head) or (d, H * d_head),
    # their biases (H, d_head) or (H * d_head,), output kernels (H, d_head, d)
    # or (H * d_head, d).
    axis = {"kernel": 1, "bias": 0, "output": 0}[role]
    if len(shape) == (2 if role == "bias" else 3):
        return axis if shape[axis] == heads else None
    if len(shape) == (1 if role == "bias" else 2):
        return axis if shape[axis] == heads * head_dim else None
    return None


def _attention_group(layer):
    """The head family of an attention layer, or None if its layout is not the standard one.

    With grouped-query attention (H query heads sharing K key/value heads,
    query head h reading key/value head h // (H / K)) a module is one
    key/value head with its H / K query heads: the only split in which every
    parameter of a head belongs to one module.
    """
    heads = _first_int(layer, _QUERY_HEAD_ATTRS)
    kv_heads = _first_int(layer, _KV_HEAD_ATTRS) or heads
    if heads is None or heads % kv_heads:
        return None
    query = getattr(getattr(layer, "_query_dense", None), "kernel", None)
    if query is None:
        return None
    shape = tuple(query.shape)
    head_dim = shape[2] if len(shape) == 3 else (shape[-1] // heads if shape[-1] % heads == 0 else 0)
    parts = [
        ("_query_dense", heads, False),
        ("_gate_dense", heads, False),
        ("_key_dense", kv_heads, False),
        ("_value_dense", kv_heads, False),
        ("_output_dense", heads, True),
    ]
    variables, axes = [], []
    for attr, count, output in parts:
        sub = getattr(layer, attr, None)
        if sub is None:
            if attr == "_gate_dense":
                continue
            return None
        kernel = getattr(sub, "kernel", None)
        if kernel is None:
            return None
        candidates = [(kernel, "output" if output else "kernel")]
        bias = getattr(sub, "bias", None)
        if not output and bias is not None:
            # (The output bias is shared by all heads: it is in no module.)
            candidates.append((bias, "bias"))
        for v, role in candidates:
            axis = _head_axis(tuple(v.shape), count, head_dim, role)
            if axis is None:
                # Not a standard layout: leave the projections to `dense=True`.
                return None
            if v.trainable:
                variables.append(v)
                axes.append(axis)
    if not variables:
        return None
    return ModuleGroup(f"{_layer_name(layer)}/heads", variables, axes, kv_heads, kind="head")


def _conv_group(layer, conv_modules):
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
        # Output filter f = pointwise kernel slice f + bias f. The depthwise
        # kernel (..., in, multiplier) is shared by every output filter; its
        # own filters are its input channels, as for DepthwiseConv.
        pw = layer.pointwise_kernel
        variables, axes = ([pw], [-1]) if pw.trainable else ([], [])
        if bias is not None and bias.trainable:
            variables.append(bias)
            axes.append(0)
        if variables:
            groups.append(ModuleGroup(f"{name}/filters", variables, axes, count(pw.shape[-1]), "filter"))
        dw = layer.depthwise_kernel
        if dw.trainable:
            groups.append(ModuleGroup(f"{name}/depthwise", [dw], -2, count(dw.shape[-2]), "filter"))
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


def _check_exclude(exclude):
    """`exclude` as (ids of excluded layers, compiled patterns); one str or layer is one entry."""
    entries = [exclude] if isinstance(exclude, (str, keras.layers.Layer)) else exclude
    if entries is None or not isinstance(entries, Iterable):
        raise TypeError(
            "`exclude` must be a layer, a regular expression (str), or a list of them. "
            f"Received: exclude={exclude!r}"
        )
    entries = list(entries)
    layers, patterns = set(), []
    for entry in entries:
        if isinstance(entry, keras.layers.Layer):
            layers.add(id(entry))
        elif isinstance(entry, str):
            try:
                patterns.append(re.compile(entry))
            except re.error as e:
                raise ValueError(
                    f"`exclude` holds an invalid regular expression {entry!r} ({e}). Received: exclude={exclude!r}"
                ) from None
        else:
            raise TypeError(
                "Every entry of `exclude` must be a layer or a regular expression (str). "
                f"Received: exclude entry={entry!r} of type {type(entry).__name__} in exclude={exclude!r}"
            )
    return layers, patterns


def _check_model(model, where):
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"{where}: `model` must be a Keras model or layer. Received: model={model!r}")
    if not model.built:
        raise ValueError(
            f"{where} needs a built model: call it on a batch of data or `model.build(input_shape)` "
            "first (Functional models, and Sequential models that start with `keras.Input`, are "
            f"built when created). Received: model={model.name!r} (not built)"
        )


def _check_discovery_options(include, conv_modules, exclude, embeddings, norms, dense):
    kinds = ("head", "filter", "expert", "layer")
    entries = [include] if isinstance(include, str) else include
    entries = list(entries) if isinstance(entries, Iterable) else None
    if entries is None or not all(isinstance(k, str) and k in kinds for k in entries):
        raise ValueError(
            f"`include` may only name 'head', 'filter', 'expert' and 'layer'. Received: include={include!r}"
        )
    if conv_modules is not None:
        count = _as_int(conv_modules)
        if count is None or count < 1:
            raise ValueError(
                f"`conv_modules` must be None or a positive int. Received: conv_modules={conv_modules!r}"
            )
        conv_modules = count
    _check_flag(embeddings, "embeddings")
    _check_flag(norms, "norms")
    _check_flag(dense, "dense")
    excluded_layers, patterns = _check_exclude(exclude)
    return set(entries), conv_modules, excluded_layers, patterns


def discover_groups(
    model,
    conv_modules=None,
    include=("head", "filter", "expert", "layer"),
    exclude=(),
    embeddings=False,
    norms=False,
    dense=False,
):
    """Finds the module families of `model` automatically.

    By default these are the modules of the MAT paper: the heads of every
    attention layer (Keras `MultiHeadAttention` and its keras-hub
    subclasses), the filters of every conv layer (`Conv1D/2D/3D`,
    transposed, depthwise and separable), and the experts of every
    stacked-expert layer. Everything else (Dense layers, embeddings, norms,
    the attention output bias shared by all heads) is in no module and is
    always trained, unless one of the options below puts it under MAT.

    Args:
        model: A built Keras model (Functional, Sequential, subclassed or a
            keras-hub task).
        conv_modules: `None` for one module per conv filter, or an int `G`
            to split every conv layer's filters into `G` equal modules.
        include: Which kinds to discover, subset of
            `("head", "filter", "expert", "layer")`. `"layer"` covers the
            whole-layer modules that `dense`, `embeddings` and `norms` ask
            for.
        exclude: A layer, a regular expression matched (`re.search`)
            against layer paths, or a list of them: these layers' parameters
            are left out of every family.
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
        dense: Also make each `Dense`/`EinsumDense` layer that is not part of
            an attention layer or a stacked-expert layer (feed-forward blocks,
            classifiers) one whole-layer module (kind `"layer"`). Off by
            default: the paper's modules are heads, filters and experts.

    Returns:
        A list of `ModuleGroup`: one per attention layer (heads), one or two
        per conv layer (filters; a separable conv's depthwise kernel is a
        second filter family, one module per input channel), one per
        stacked-expert layer (experts), and the whole-layer modules the
        options ask for.

    Raises:
        TypeError: if `model` is not a Keras layer, or `exclude` or a flag
            has the wrong type.
        ValueError: if `model` is not built, `include` names an unknown
            kind, `conv_modules` is not a positive int or does not divide a
            conv layer's filters, or `exclude` holds an invalid regular
            expression.

    Example:

    >>> model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3),
    ...                           keras.layers.Flatten(), keras.layers.Dense(2)])
    >>> [(g.kind, g.num_modules) for g in discover_groups(model)]
    [('filter', 4)]
    """
    _check_model(model, "discover_groups()")
    include, conv_modules, excluded_layers, patterns = _check_discovery_options(
        include, conv_modules, exclude, embeddings, norms, dense
    )
    embeddings, norms, dense = bool(embeddings), bool(norms), bool(dense)
    whole_layers = "layer" in include

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
    # never taken as whole-layer Dense modules, whatever the options.
    for layer in layers:
        if skipped(layer):
            claimed.update(_var_key(v) for v in layer.trainable_variables)
            continue
        if _is_attention(layer):
            g = _attention_group(layer) if "head" in include else None
            if g is not None:
                claim(g)
                bias = getattr(getattr(layer, "_output_dense", None), "bias", None)
                if norms and whole_layers and bias is not None and bias.trainable:
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
        if _is_embedding(layer):
            g = _embedding_group(layer) if embeddings and whole_layers else None
            if g is not None:
                claim(g)
        elif _is_norm(layer):
            variables = _own_trainable(layer) if norms and whole_layers else []
            if variables:
                claim(ModuleGroup(f"{_layer_name(layer)}/norm", variables, None, 1, kind="layer"))
        elif isinstance(layer, conv_types):
            if "filter" in include:
                for g in _conv_group(layer, conv_modules) or []:
                    claim(g)
        elif dense and whole_layers and isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
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


def _group_list(groups):
    """`groups` (one ModuleGroup or an iterable of them) as a list, or a TypeError naming it."""
    if isinstance(groups, ModuleGroup):
        groups = [groups]
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Iterable):
        raise TypeError(f"`groups` must be a ModuleGroup or a list of them. Received: groups={groups!r}")
    groups = list(groups)
    for g in groups:
        if not isinstance(g, ModuleGroup):
            raise TypeError(f"Every entry of `groups` must be a ModuleGroup. Received: groups entry={g!r}")
    return groups


def mark_in_use(groups, owner):
    """Records that `owner` was built with the module families `groups`.

    A `ModularAdaptiveOptimizer` calls this when it is built: from then on it
    masks exactly these families, whatever later annotations say. `annotate`
    reads the record to warn when re-annotating a model would change the
    families such an owner is still using. The record holds a weak reference,
    so an owner that is garbage-collected no longer counts.

    Args:
        groups: A `ModuleGroup` or a list of them.
        owner: The object that uses them (e.g. the optimizer).

    Raises:
        TypeError: if an entry of `groups` is not a `ModuleGroup`.
    """
    groups = _group_list(groups)
    try:
        ref = weakref.ref(owner)
    except TypeError:
        ref = lambda: owner  # noqa: E731  (an owner without weak references stays in use)
    for g in groups:
        if all(r() is not owner for r in g._users):
            g._users.append(ref)


def in_use(group):
    """The live owners recorded by `mark_in_use` for `group` (a list, empty if none)."""
    if not isinstance(group, ModuleGroup):
        raise TypeError(f"`group` must be a ModuleGroup. Received: group={group!r}")
    return group._live_users()


def annotate(model, groups="auto", conv_modules=None, exclude=(), embeddings=False, norms=False, dense=False):
    """Declares the modules of `model` for MAT.

    Records the module families on the model and on each of their variables,
    so that `keras_mat.module_lambda_max`, `keras_mat.wrap(...)` and the MAT
    training step find them. By default the families are the MAT paper's
    modules: attention heads, conv filters and stacked experts (see
    `discover_groups`); Dense layers, embeddings and norms are always
    trained unless `dense`, `embeddings` or `norms` put them under MAT.

    Re-annotating is allowed and replaces the previous families. Families
    that come out the same (same name, variables, axes and module count) are
    kept as the same objects. If the families change while an optimizer
    built with the old ones is still alive, a `UserWarning` says so: a built
    `ModularAdaptiveOptimizer` keeps masking the families it was built with,
    so compile the model again with a new optimizer to use the new ones.

    Args:
        model: A built Keras model (Functional, Sequential, subclassed or a
            keras-hub task). Functional models, and Sequential models that
            start with `keras.Input`, are built when created; build any other
            model first by calling it on a batch of data or with
            `model.build(input_shape)`.
        groups: `"auto"` (discover the families, see `discover_groups`), a
            `ModuleGroup` or a list of them (only those), or a list that
            contains `"auto"` and `ModuleGroup`s (explicit families win over
            automatic ones that share a variable with them).
        conv_modules: For automatic conv families: `None` for one module per
            filter, or `G` to split each conv layer's filters into `G` modules.
        exclude: A layer, a regular expression matched against layer paths
            (one string is one expression), or a list of them, that
            automatic discovery must leave out (they stay always trained).
        embeddings: Put embedding layers under MAT's control (one whole-layer
            module each; see `discover_groups`).
        norms: Put normalization layers under MAT's control (one whole-layer
            module each; see `discover_groups`).
        dense: Put `Dense`/`EinsumDense` layers outside attention and expert
            layers (feed-forward blocks, classifiers) under MAT's control, one
            whole-layer module each. Off by default.

    Returns:
        The same `model`, annotated.

    Raises:
        TypeError: if `model` is not a Keras model or layer, or `exclude`
            or a flag has the wrong type.
        ValueError: if `model` is not built, if a family's variable is not a
            trainable variable of `model`, if families overlap, if `groups`
            is malformed, or on an invalid `exclude` regular expression.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4),
    ...                           keras.layers.Dense(2)])
    >>> [g.kind for g in get_groups(annotate(model))]  # no heads, filters or experts
    []
    >>> [(g.kind, g.num_modules) for g in get_groups(annotate(model, dense=True))]
    [('layer', 1), ('layer', 1)]
    """
    _check_model(model, "annotate()")
    if isinstance(groups, str):
        if groups != "auto":
            raise ValueError(f"`groups` must be 'auto' or a list of ModuleGroup. Received: groups={groups!r}")
        groups = ["auto"]
    if isinstance(groups, ModuleGroup):
        groups = [groups]
    if not isinstance(groups, Iterable):
        raise ValueError(f"`groups` must be 'auto' or a list of ModuleGroup. Received: groups={groups!r}")
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
    # Options are checked even when discovery does not run.
    _check_discovery_options(("head",), conv_modules, exclude, embeddings, norms, dense)
    final = list(explicit)
    if want_auto:
        taken = {_var_key(v) for g in explicit for v in g.variables}
        discovered = discover_groups(
            model, conv_modules=conv_modules, exclude=exclude, embeddings=embeddings, norms=norms, dense=dense
        )
        final += [g for g in discovered if not any(_var_key(v) in taken for v in g.variables)]
    _check_no_overlap(final)
    previous = groups_from_variables(model.variables)
    same = {g._signature(): g for g in previous}
    final = [same.get(g._signature(), g) for g in final]
    changed = {id(g) for g in previous} != {id(g) for g in final}
    users = [u for g in previous for u in g._live_users()]
    if changed and users:
        warnings.warn(
            f"annotate() changes the module families of model {model.name!r} while "
            f"{len({id(u) for u in users})} optimizer(s) built with its previous families are alive "
            f"(e.g. {type(users[0]).__name__}): a built optimizer keeps masking the families it "
            "was built with and ignores the new ones. Compile the model again with a new "
            "optimizer (keras_mat.wrap(...)) to train with the new families. "
            f"Received: previous families={[g.name for g in previous]}, "
            f"new families={[g.name for g in final]}",
            UserWarning,
            stacklevel=2,
        )
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
    return model


def get_groups(model):
    """The module families recorded by `annotate(model)`.

    Args:
        model: A Keras model or layer.

    Returns:
        A tuple of `ModuleGroup` (empty when `annotate` found none), or
        `None` if `model` was never annotated.

    Raises:
        TypeError: if `model` is not a Keras model or layer.
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"`model` must be a Keras model or layer. Received: model={model!r}")
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


def annotate_variables(groups):
    """Declares module families on bare variables, for training without a model.

    A custom training loop over `keras.Variable`s (no `keras.Model`) declares
    its families here; `keras_mat.wrap(...)` then finds them from the
    variables it is built with, exactly as after `annotate(model)`.

    Args:
        groups: A `ModuleGroup` or a list of them (non-overlapping, unique
            names).

    Returns:
        The list of groups.

    Raises:
        TypeError: if an entry is not a `ModuleGroup`.
        ValueError: if two groups share a variable or a name.

    Example:

    >>> w = keras.Variable(np.zeros((4, 6), "float32"), name="w")
    >>> _ = annotate_variables([ModuleGroup("w/heads", [w], axes=1, num_modules=3, kind="head")])
    >>> group_of(w)[0].name
    'w/heads'
    """
    groups = _group_list(groups)
    _check_no_overlap(groups)
    for g in groups:
        for v, axis in zip(g.variables, g.axes):
            setattr(v, _GROUP_ATTR, g)
            setattr(v, _AXIS_ATTR, axis)
    return groups
