"""Layer-factored per-sample gradients for the lambda_max probe.

The per-sample gradient of a linear or convolutional layer's weights is a
product of two things the batched forward and backward passes already hold:
the layer's input (its patches, for a convolution) and the gradient at the
layer's pre-activation output. For a probe, this file:

- runs a Functional model's own graph (`Functional._run_through_graph`, the
  interpreter Keras's `Functional.call` uses) with one difference: each
  grouped Dense / EinsumDense / convolution node is evaluated here, from the
  same Keras ops as the layer's `call`, so that its input is recorded and a
  zero "perturbation" is added to its pre-activation output. Nothing of the
  model or of Keras's classes is modified; every other node is called as
  Keras calls it. Nested Functional and Sequential models are entered the
  same way; any other layer is called whole (its grouped variables then take
  the generic per-sample-Jacobian route of `ntk.py`).
- takes, with one batched backward pass per output row (the backend's
  `output_gradients`), the gradient with respect to every perturbation: the
  gradient at every captured layer output for every sample and row at once
  (samples do not interact under `training=False`).
- forms each probed variable's per-sample gradients (an einsum of input and
  output gradient, over positions or patches), or, where it is cheaper, the
  modules' Gram blocks directly from the identity
  G_rq = sum_{s,t} (a_rs . a_qt)(d_rs . d_qt): for a whole-layer module, and
  for one module per output channel (a conv filter), with the output
  gradients restricted to that channel and the input Gram shared by all.
"""

from __future__ import annotations

import itertools
import math
import string

import keras
from keras import ops

from keras_mat import _keras_private as kp
from keras_mat import backends

# --------------------------------------------------------------------------------------
# Which layers are evaluated here
# --------------------------------------------------------------------------------------


def _graph_internals():
    # The Functional graph interpreter and what Keras's own `Functional.call`
    # hands it (no public equivalent in Keras 3): the Functional and
    # Sequential classes (whose `call` must be Keras's own for the graph to be
    # the computation), the per-operation call wrapper that passes
    # `training`, and the mask propagation a Layer.__call__ would do.
    from keras_mat._keras_private import Functional, get_keras_mask, operation_fn, set_keras_mask

    return Functional, keras.Sequential, operation_fn, get_keras_mask, set_keras_mask


def layer_kind(layer):
    """`"dense"`, `"einsum"`, `"conv"`, `"depthwise"`, `"separable"` or `None`.

    Only layers whose `call` is the Keras class's own (a subclass that
    overrides `call` may compute anything), in plain float precision (the
    same compute and variable dtype: no autocast), without LoRA or
    quantization.
    """
    BaseConv, BaseDepthwiseConv, BaseSeparableConv = kp.BaseConv, kp.BaseDepthwiseConv, kp.BaseSeparableConv
    if not isinstance(layer, keras.layers.Layer):
        return None
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None) is not None:
        return None
    if getattr(layer, "compute_dtype", None) != getattr(layer, "variable_dtype", None):
        return None
    if str(layer.compute_dtype) not in ("float32", "float64"):
        return None
    call = type(layer).call
    if isinstance(layer, keras.layers.Dense) and call is keras.layers.Dense.call:
        return "dense"
    if isinstance(layer, keras.layers.EinsumDense) and call is keras.layers.EinsumDense.call:
        return "einsum" if _einsum_grad_equation(layer) is not None else None
    if isinstance(layer, BaseSeparableConv) and call is BaseSeparableConv.call:
        return "separable"
    if isinstance(layer, BaseDepthwiseConv) and call is BaseDepthwiseConv.call:
        return "depthwise"
    if isinstance(layer, BaseConv) and not isinstance(layer, (BaseDepthwiseConv, BaseSeparableConv)):
        if call is BaseConv.call or (
            isinstance(layer, keras.layers.Conv1D) and call is keras.layers.Conv1D.call
        ):
            return "conv"
    return None


def _layer_variables(layer, kind):
    """`{role: variable}` of the weights this file differentiates."""
    if kind == "separable":
        out = {"depthwise": layer.depthwise_kernel, "pointwise": layer.pointwise_kernel}
    elif kind in ("dense", "einsum"):
        out = {"kernel": layer._kernel if hasattr(layer, "_kernel") else layer.kernel}
    else:
        out = {"kernel": layer.kernel}
    bias = getattr(layer, "bias", None)
    if bias is not None:
        out["bias"] = bias
    return out


def _letters(exclude):
    return [c for c in string.ascii_letters if c not in exclude]


def _einsum_specs(layer):
    # EinsumDense's equation with any "..." written out, for this input rank.
    eq = layer.equation.replace(" ", "")
    lhs, out = eq.split("->")
    a_spec, k_spec = lhs.split(",")
    if "..." in k_spec:
        return None
    rank_in = len(layer.input.shape) if hasattr(layer, "input") else None
    if "..." in a_spec:
        if rank_in is None:
            return None
        free = _letters(set(eq))
        fill = "".join(free[: rank_in - (len(a_spec) - 3)])
        a_spec = a_spec.replace("...", fill)
        out = out.replace("...", fill)
    return a_spec, k_spec, out


def _einsum_grad_equation(layer):
    try:
        specs = _einsum_specs(layer)
    except Exception:  # no recorded input (not called symbolically): generic route
        return None
    if specs is None:
        return None
    a_spec, k_spec, out = specs
    batch = a_spec[0]
    if batch not in out or batch in k_spec or len(set(a_spec)) != len(a_spec):
        return None
    row = _letters(set(a_spec + k_spec + out))[0]
    return f"{a_spec},{row}{out}->{batch}{row}{k_spec}"


# --------------------------------------------------------------------------------------
# The graph plan
# --------------------------------------------------------------------------------------


def _functional_of(layer):
    """The Functional graph to enter for `layer`, or None (called whole)."""
    Functional, Sequential = _graph_internals()[:2]
    if isinstance(layer, Sequential):
        if type(layer).call is Sequential.call and getattr(layer, "_functional", None) is not None:
            return layer._functional
        return None
    if isinstance(layer, Functional) and type(layer).call is Functional.call:
        return layer
    return None


_ATTENTION_PARTS = {
    "query": "_query_dense",
    "key": "_key_dense",
    "value": "_value_dense",
    "output": "_output_dense",
}


def _attention_roles(layer):
    """`{role: EinsumDense}` of a Keras MultiHeadAttention whose computation
    is the class's own (no overridden `call` or `_compute_attention`, no
    output gate), with every projection an EinsumDense of the factored
    route; else None."""
    mha = keras.layers.MultiHeadAttention
    if not isinstance(layer, mha) or type(layer).call is not mha.call:
        return None
    if type(layer)._compute_attention is not mha._compute_attention or getattr(layer, "_use_gate", False):
        return None
    parts = {role: getattr(layer, attr, None) for role, attr in _ATTENTION_PARTS.items()}
    if any(p is None or layer_kind(p) != "einsum" for p in parts.values()):
        return None
    return parts


#: Arguments of MultiHeadAttention.call the factored route evaluates itself.
_ATTENTION_KWARGS = ("value", "key", "use_causal_mask", "training")


def _attention_call_supported(layer, node):
    """Whether this call of `layer` is one `GraphPlan._attend` computes as
    Keras would: query, value and optional key, optionally a causal mask; no
    explicit or implicit (Keras) masks, no attention scores returned."""
    if node is None or _attention_roles(layer) is None:
        return False
    get_keras_mask = _graph_internals()[3]
    args, kwargs = node.arguments.args, node.arguments.kwargs
    if len(args) > 3 or any(k not in _ATTENTION_KWARGS and v is not None for k, v in kwargs.items()):
        return False
    if not isinstance(kwargs.get("use_causal_mask", False), bool):
        return False
    tensors = list(args) + [kwargs.get("value"), kwargs.get("key")]
    return not any(get_keras_mask(t) is not None for t in tensors if t is not None and hasattr(t, "shape"))


#: Layer kinds the factored route knows ("attention": the query, key, value
#: and output projections of a Keras MultiHeadAttention, see `_attention_roles`).
ALL_KINDS = ("dense", "einsum", "conv", "depthwise", "separable", "attention")
#: The convolution kinds (whose generic per-sample gradients are the costly ones).
CONV_KINDS = ("conv", "depthwise", "separable")


class GraphPlan:
    """Which nodes of a Functional model are evaluated by this file.

    Args:
        model: The model.
        wanted: ids of the variables that should take the factored route.
        kinds: Layer kinds to evaluate here (see `layer_kind`).

    `self.layers` maps a key to `(layer, kind, {role: variable})` for every
    layer evaluated here; `self.variables` is the set of variable ids it
    covers. Empty when the model is not a Functional graph.
    """

    def __init__(self, model, wanted, kinds=ALL_KINDS, patches=False):
        # `patches`: evaluate convolutions as patches times kernel (plain
        # slicing and matmuls, which every vmap implementation batches).
        self.patches = patches
        self.root = _functional_of(model)
        self.layers = {}
        self._by_layer = {}
        self.variables = set()
        # {id(attention layer): {projection role: key, or None (not probed)}}
        self._attention = {}
        if self.root is None:
            return
        calls = []
        self._walk(self.root, calls, ())
        count = {}
        for layer, _ in calls:
            count[id(layer)] = count.get(id(layer), 0) + 1
        for layer, node in calls:
            if count[id(layer)] != 1:
                continue  # shared layer (called at several nodes): generic route
            if "attention" in kinds and _attention_call_supported(layer, node):
                keys = {}
                for role, sub in _attention_roles(layer).items():
                    roles = {r: v for r, v in _layer_variables(sub, "einsum").items() if id(v) in wanted}
                    keys[role] = self._register(sub, "einsum", roles) if roles else None
                if any(keys.values()):
                    self._attention[id(layer)] = keys
                continue
            kind = layer_kind(layer)
            if kind not in kinds:
                continue
            roles = {r: v for r, v in _layer_variables(layer, kind).items() if id(v) in wanted}
            if roles:
                self._register(layer, kind, roles)

    def _register(self, layer, kind, roles):
        key = f"l{len(self.layers)}"
        self.layers[key] = (layer, kind, roles)
        self._by_layer[id(layer)] = key
        self.variables.update(id(v) for v in roles.values())
        return key

    def _walk(self, functional, calls, stack):
        # Every layer call of the graph, nested Functional graphs entered.
        if id(functional) in stack:
            return
        stack = stack + (id(functional),)
        for depth in functional._nodes_by_depth.values():
            for node in depth:
                op = node.operation
                if op is None or node.is_input:
                    continue
                sub = _functional_of(op) if isinstance(op, keras.layers.Layer) else None
                if sub is not None and sub is not functional:
                    self._walk(sub, calls, stack)
                else:
                    calls.append((op, node))

    def __bool__(self):
        return bool(self.layers)

    # ---------------------------------------------------------------------------- run

    def run(self, x, hook, captures):
        """Runs the graph (inside the caller's StatelessScope, inference mode).

        `hook(key, z) -> z'` is applied at every evaluated layer's
        pre-activation output(s); `captures[key]` receives the layer's input(s),
        gradient-stopped.
        """
        return self._run(self.root, x, hook, captures)

    def _run(self, functional, x, hook, captures):
        operation_fn = _graph_internals()[2]
        inputs = functional._standardize_inputs(x)

        def op_fn(op):
            if id(op) in self._attention:
                return lambda *args, **kwargs: self._attend(op, args, kwargs, hook, captures)
            key = self._by_layer.get(id(op))
            if key is not None:
                return lambda *args, **kwargs: self._apply(key, args[0], hook, captures)
            sub = _functional_of(op) if isinstance(op, keras.layers.Layer) else None
            if sub is not None and sub is not functional:
                return lambda *args, **kwargs: self._run(sub, args[0], hook, captures)
            return operation_fn(op, training=False)

        outputs = functional._run_through_graph(inputs, operation_fn=op_fn)
        return outputs[0] if isinstance(outputs, (list, tuple)) and len(outputs) == 1 else outputs

    def _attend(self, layer, args, kwargs, hook, captures):
        # MultiHeadAttention.call for the calls `_attention_call_supported`
        # admits, with its projections evaluated here: the same sub-layers,
        # the layer's own attention mask and attention computation.
        get_keras_mask = _graph_internals()[3]
        query = args[0]
        value = args[1] if len(args) > 1 else kwargs["value"]
        key = args[2] if len(args) > 2 else kwargs.get("key")
        key = value if key is None else key
        if any(get_keras_mask(t) is not None for t in (query, value, key) if hasattr(t, "shape")):
            raise ValueError(
                f"keras_mat: attention layer {layer.name!r} received a Keras mask at probe time that "
                "its graph did not show; probe it with route='generic'."
            )
        keys, parts = self._attention[id(layer)], _attention_roles(layer)

        def project(role, x):
            return parts[role](x) if keys[role] is None else self._apply(keys[role], x, hook, captures)

        mask = None
        if kwargs.get("use_causal_mask", False):
            mask = kp.attention_causal_mask(layer, query, value)
        q, k, v = project("query", query), project("key", key), project("value", value)
        out = kp.attention_output(layer, q, k, v, mask)
        return project("output", out)

    def _apply(self, key, a, hook, captures):
        get_keras_mask, set_keras_mask = _graph_internals()[3:]
        layer, kind, roles = self.layers[key]
        mask = get_keras_mask(a) if hasattr(a, "shape") else None
        a = ops.convert_to_tensor(a)
        if a.dtype != layer.compute_dtype:
            a = ops.cast(a, layer.compute_dtype)
        bias = getattr(layer, "bias", None)
        if kind == "dense":
            z = ops.matmul(a, layer.kernel)
        elif kind == "einsum":
            z = ops.einsum(layer.equation, a, layer.kernel)
        elif self.patches:
            if kind == "conv" and layer.padding == "causal":
                a = ops.pad(a, layer._compute_causal_padding())
            z = _conv_by_patches(layer, kind, a)
        elif kind == "conv":
            padding = layer.padding
            if padding == "causal":
                a = ops.pad(a, layer._compute_causal_padding())
                padding = "valid"
            z = ops.conv(
                a,
                layer.kernel,
                strides=list(layer.strides),
                padding=padding,
                dilation_rate=layer.dilation_rate,
                data_format=layer.data_format,
            )
        else:
            kernel = layer.kernel if kind == "depthwise" else layer.depthwise_kernel
            z = ops.depthwise_conv(
                a,
                kernel,
                strides=layer.strides,
                padding=layer.padding,
                dilation_rate=layer.dilation_rate,
                data_format=layer.data_format,
            )
        if kind == "separable":  # the depthwise part, then a 1x1 pointwise convolution
            t = z
            if "depthwise" in roles:
                t = hook(key + "/dw", t)
            captures[key + "/pw"] = ops.stop_gradient(t)
            if self.patches:
                z = ops.einsum("...c,co->...o", t, ops.reshape(layer.pointwise_kernel, (t.shape[-1], -1)))
            else:
                z = ops.conv(
                    t, layer.pointwise_kernel, strides=1, padding="valid", data_format=layer.data_format
                )
        captures[key] = ops.stop_gradient(a)
        if bias is not None:
            if kind in ("dense", "einsum") or layer.data_format == "channels_last":
                z = ops.add(z, bias)
            else:
                z = ops.add(z, ops.reshape(bias, (1, -1) + (1,) * (len(z.shape) - 2)))
        if kind != "separable" or {"pointwise", "bias"} & set(roles):
            z = hook(key, z)
        y = layer.activation(z) if layer.activation is not None else z
        if mask is not None:
            set_keras_mask(y, mask)
        return y

    # ---------------------------------------------------------------------- gradients

    def variable_grams(self, captures, grads, rows_per_sample, entries, module_gram, max_bytes, fast=False):
        """Gram contributions `{variable id: (G, n*R, n*R)}` of the factored
        variables.

        Args:
            captures: `{key: layer input}` from `run`.
            grads: `{key: (R, n, *output shape)}` gradients at the perturbations.
            rows_per_sample: R.
            entries: `{variable id: (axis, num_modules)}`.
            module_gram: `ntk.module_gram`.
            max_bytes: Bound on one materialized per-sample gradient; above
                it a whole-layer module uses the Gram identity.
            fast: The probe is compiled for a short fit: prefer what compiles
                faster.
        """
        out = {}
        for key, (layer, kind, roles) in self.layers.items():
            for role, var in roles.items():
                axis, num = entries[id(var)]
                d = grads[key + "/dw"] if (kind == "separable" and role == "depthwise") else grads[key]
                a = captures[key + "/pw"] if (kind == "separable" and role == "pointwise") else captures[key]
                if kind not in ("dense", "einsum") and layer.data_format == "channels_first":
                    a = ops.moveaxis(a, 1, -1)
                    d = ops.moveaxis(d, 2, -1)
                if role == "bias":
                    jac = _bias_grad(d, tuple(var.shape))
                    out[id(var)] = module_gram(jac, axis, num)
                    continue
                gram = None
                per_output = axis == len(var.shape) - 1 and num == var.shape[-1]
                if kind == "conv" and layer.groups == 1 and per_output:
                    # One module per filter: from per-sample gradient
                    # convolutions where the backend runs those faster, else
                    # from the identity where positions are few, else from
                    # per-sample gradients formed from the stacked patches or
                    # tap by tap, or as a sum of per-tap Grams (whichever the
                    # backend runs faster: `conv_gram_route`).
                    gram = _sample_conv_gram(layer, var, a, d, fast)
                    if gram is None:
                        taps = _conv_taps(layer, a)
                        d2 = ops.reshape(d, (d.shape[0], d.shape[1], -1, d.shape[-1]))
                        values = d2.shape[0] * d2.shape[1] * d2.shape[3] * len(taps) * taps[0].shape[-1]
                        route = backends.get().conv_gram_route(d2.shape[2], d2.shape[0], values)
                        if _per_output_identity_pays(taps, d2, max_bytes):
                            gram = _per_output_identity_gram(taps, d2)
                        elif route == "patches":
                            patches = ops.stack(taps, axis=-2)
                            gram = _per_output_gram(
                                ops.reshape(patches, tuple(patches.shape[:2]) + (-1,)), d2
                            )
                        elif route == "tap_grams":
                            gram = _per_tap_gram(taps, d)
                        else:
                            gram = _per_filter_gram(taps, d)
                elif kind == "dense" or (kind == "conv" and layer.groups == 1) or role == "pointwise":
                    a2, d2, kshape = _matmul_form(layer, kind, role, a, d)
                    gram = _identity_gram(a2, d2, rows_per_sample, axis, num, kshape, max_bytes)
                    if gram is None and per_output:
                        if _per_output_identity_pays([a2], d2, max_bytes):
                            gram = _per_output_identity_gram([a2], d2)
                        else:
                            gram = _per_output_gram(a2, d2)
                    if gram is None:
                        jac = ops.reshape(_matmul_grad(a2, d2), (-1,) + tuple(var.shape))
                        gram = module_gram(jac, axis, num)
                else:
                    jac = _other_grad(layer, kind, role, a, d)
                    gram = module_gram(ops.reshape(jac, (-1,) + tuple(var.shape)), axis, num)
                out[id(var)] = gram
        return out


# --------------------------------------------------------------------------------------
# Per-sample gradient math (keras.ops only)
# --------------------------------------------------------------------------------------


def _rows_first(t):
    # (R, n, ...) -> (n * R, ...), rows sample-major.
    t = ops.moveaxis(t, 0, 1)
    return ops.reshape(t, (-1,) + tuple(t.shape[2:]))


def _bias_grad(d, bshape):
    """Per-sample bias gradient `(n*R, *bshape)` from `d (R, n, *out)`: the
    sum over every axis the bias is broadcast along."""
    out_dims = tuple(d.shape[2:])
    lead = len(out_dims) - len(bshape)
    if lead > 0:
        d = ops.sum(d, axis=tuple(range(2, 2 + lead)))
    for i, size in enumerate(bshape):
        if size == 1 and d.shape[2 + i] != 1:
            d = ops.sum(d, axis=2 + i, keepdims=True)
    return _rows_first(d)


def _taps(a, kernel_size, strides, padding, dilation):
    """The kernel taps of channels-last `a`: a list of `(n, positions,
    channels)` shifted slices, in the order of the kernel's spatial axes
    (row-major), and the output spatial shape."""
    rank = len(kernel_size)
    spatial = tuple(a.shape[1 : 1 + rank])
    pads, outs = [(0, 0)], []
    for length, k, s, dl in zip(spatial, kernel_size, strides, dilation):
        span = (k - 1) * dl + 1
        if padding == "same":
            size = -(-length // s)
            total = max((size - 1) * s + span - length, 0)
            pads.append((total // 2, total - total // 2))
        else:
            size = (length - span) // s + 1
            pads.append((0, 0))
        outs.append(size)
    pads.append((0, 0))
    if any(p != (0, 0) for p in pads):
        a = ops.pad(a, pads)
    taps = []
    for tap in itertools.product(*[range(k) for k in kernel_size]):
        index = [slice(None)]
        for t, size, s, dl in zip(tap, outs, strides, dilation):
            index.append(slice(t * dl, t * dl + (size - 1) * s + 1, s))
        index.append(slice(None))
        taps.append(ops.reshape(a[tuple(index)], (a.shape[0], math.prod(outs), a.shape[-1])))
    return taps, tuple(outs)


def _patches(a, kernel_size, strides, padding, dilation):
    """`(n, positions, taps, channels)` patches of channels-last `a`, tap
    order that of the kernel's spatial axes (row-major)."""
    taps, _ = _taps(a, kernel_size, strides, padding, dilation)
    return ops.stack(taps, axis=-2)


def _conv_patches(layer, a):
    padding = "valid" if layer.padding == "causal" else layer.padding  # (a is already padded)
    return _patches(a, layer.kernel_size, layer.strides, padding, layer.dilation_rate)


def _conv_taps(layer, a):
    padding = "valid" if layer.padding == "causal" else layer.padding  # (a is already padded)
    return _taps(a, layer.kernel_size, layer.strides, padding, layer.dilation_rate)[0]


def _conv_by_patches(layer, kind, a):
    """The convolution (depthwise part only, for a separable one) of `a` as
    patches times kernel; channels-last in and out when the layer is, else
    channels-first."""
    first = layer.data_format == "channels_first"
    if first:
        a = ops.moveaxis(a, 1, -1)
    rank = len(layer.kernel_size)
    spatial = tuple(a.shape[1 : 1 + rank])
    p = _conv_patches(layer, a)  # (n, S, T, Cin)
    n, s, t, cin = p.shape
    if kind == "conv":
        groups = layer.groups
        kernel = ops.reshape(layer.kernel, (t, cin // groups, groups, -1))
        p = ops.reshape(p, (n, s, t, groups, cin // groups))
        z = ops.reshape(ops.einsum("nstgc,tcgo->nsgo", p, kernel), (n, s, -1))
    else:
        kernel = layer.kernel if kind == "depthwise" else layer.depthwise_kernel
        kernel = ops.reshape(kernel, (t, cin, -1))
        z = ops.reshape(ops.einsum("nstc,tcm->nscm", p, kernel), (n, s, -1))
    out = _output_spatial(spatial, layer)
    z = ops.reshape(z, (n,) + out + (z.shape[-1],))
    return ops.moveaxis(z, -1, 1) if first else z


def _output_spatial(spatial, layer):
    out = []
    padding = "valid" if layer.padding == "causal" else layer.padding
    for length, k, s, dl in zip(spatial, layer.kernel_size, layer.strides, layer.dilation_rate):
        span = (k - 1) * dl + 1
        out.append(-(-length // s) if padding == "same" else (length - span) // s + 1)
    return tuple(out)


def _matmul_form(layer, kind, role, a, d):
    """Input `(n, S, K)`, output gradient `(R, n, S, C)` and the kernel's
    `(K, C)` shape, for layers whose weight gradient is a^T d."""
    if kind == "dense" or role == "pointwise":
        k_in = a.shape[-1]
        a2 = ops.reshape(a, (a.shape[0], -1, k_in))
    else:
        p = _conv_patches(layer, a)
        a2 = ops.reshape(p, (p.shape[0], p.shape[1], -1))
    c = d.shape[-1]
    d2 = ops.reshape(d, (d.shape[0], d.shape[1], -1, c))
    return a2, d2, (a2.shape[-1], c)


def _matmul_grad(a2, d2):
    # (n, S, K), (R, n, S, C) -> (n*R, K, C); one batched matmul per sample.
    r, n, s, c = d2.shape
    dd = ops.reshape(ops.transpose(d2, (1, 2, 0, 3)), (n, s, r * c))
    g = ops.matmul(ops.transpose(a2, (0, 2, 1)), dd)  # (n, K, R*C)
    g = ops.reshape(g, (n, -1, r, c))
    return ops.reshape(ops.transpose(g, (0, 2, 1, 3)), (n * r, -1, c))


def _by_filter_chunks(fn, d, k):
    """`fn(d_chunk)` over chunks of the output channels (last axis of `d`)
    whose per-sample gradients, `n*R*k` values per channel, fit in the
    backend's `GRAM_CHUNK_BYTES` (None: all at once); the Grams concatenated
    along the channel axis. Every filter's Gram is the same either way."""
    c = d.shape[-1]
    limit = backends.get().GRAM_CHUNK_BYTES
    per = c if limit is None else max(1, limit // (d.shape[0] * d.shape[1] * k * 4))
    if per >= c:
        return fn(d)
    return ops.concatenate([fn(d[..., i : i + per]) for i in range(0, c, per)], axis=0)


def _per_output_gram(a2, d2):
    """One module per output channel (a conv filter): the per-sample
    gradients laid out `(C, n*R, K)`, then one batched matmul."""

    def gram(d2):
        r, n, s, c = d2.shape
        g = ops.einsum("nsk,rnsc->cnrk", a2, d2)
        g = ops.reshape(g, (c, n * r, -1))
        return ops.matmul(g, ops.transpose(g, (0, 2, 1)))

    return _by_filter_chunks(gram, d2, a2.shape[-1])


def _sample_conv_gram(layer, var, a, d, fast):
    """Per-filter Grams from per-sample gradient convolutions, where the
    backend runs them faster than the taps (`None` elsewhere)."""
    padding = "valid" if layer.padding == "causal" else layer.padding  # (a is already padded)
    g = backends.get().conv_sample_grads(
        a, d, tuple(var.shape), layer.strides, padding, layer.dilation_rate, fast
    )
    if g is None:
        return None
    g = ops.transpose(ops.reshape(g, (g.shape[0], -1, g.shape[-1])), (2, 0, 1))  # (C, n, K)
    return ops.matmul(g, ops.transpose(g, (0, 2, 1)))


def _per_filter_gram(taps, d):
    """`_per_output_gram` of a convolution from its taps `[(n, S, Cin)]` and
    the output gradient `d (R, n, *spatial, C)`: one product per tap."""
    r, n = d.shape[0], d.shape[1]

    def gram(d):
        c = d.shape[-1]
        d2 = ops.reshape(d, (r, n, -1, c))
        g = ops.stack([ops.einsum("nsk,rnsc->cnrk", t, d2) for t in taps], axis=3)  # (C, n, R, T, Cin)
        g = ops.reshape(g, (c, n * r, -1))
        return ops.matmul(g, ops.transpose(g, (0, 2, 1)))

    return _by_filter_chunks(gram, d, len(taps) * taps[0].shape[-1])


def _per_tap_gram(taps, d):
    """`_per_output_gram` of a convolution as the sum over its kernel taps of
    each tap's per-filter Gram: a filter's per-sample gradient is its taps'
    parts side by side, so its Gram is the sum of theirs. No stacked patches
    and no whole per-sample gradient are formed."""
    r, n = d.shape[0], d.shape[1]

    def gram(d):
        c = d.shape[-1]
        d2 = ops.reshape(d, (r, n, -1, c))
        total = None
        for t in taps:
            g = ops.reshape(ops.einsum("rnsc,nsk->cnrk", d2, t), (c, n * r, -1))
            part = ops.matmul(g, ops.transpose(g, (0, 2, 1)))
            total = part if total is None else total + part
        return total

    return _by_filter_chunks(gram, d, taps[0].shape[-1])


def _per_output_identity_pays(parts, d2, max_bytes):
    """Whether `_per_output_identity_gram` costs fewer multiply-adds than
    `_per_output_gram` and its intermediates fit in `max_bytes`."""
    r, n, s, c = d2.shape
    k = sum(p.shape[-1] for p in parts)
    cost_identity = (n * s) ** 2 * k + n * n * r * s * c * (s + r)
    cost_materialize = n * r * s * k * c + (n * r) ** 2 * k * c
    itemsize = 8 if keras.backend.standardize_dtype(d2.dtype) == "float64" else 4
    biggest = max((n * s) ** 2, n * n * r * s * c) * itemsize
    # (The identity's contractions run slower than the batched Gram products,
    # by the backend's `IDENTITY_COST_FACTOR`: about half the rate on CPU.)
    factor = backends.get().IDENTITY_COST_FACTOR
    return factor * cost_identity < cost_materialize and biggest <= max_bytes


def _per_output_identity_gram(parts, d2):
    """`_per_output_gram` from the identity.

    For output channel c, `G_c[(i,r), (j,q)] = sum_{s,t} A[i,s,j,t]
    d[r,i,s,c] d[q,j,t,c]`, where `A[i,s,j,t] = a_is . a_jt` is shared by
    every channel. `parts`: the input as `[(n, S, K_k)]` whose concatenation
    along the last axis is the layer's input row (one part per convolution
    tap, or the whole input); `d2`: `(R, n, S, C)`.
    """
    r, n, s, c = d2.shape
    flat = [ops.reshape(p, (n * s, p.shape[-1])) for p in parts]
    aa = ops.matmul(flat[0], ops.transpose(flat[0]))
    for f in flat[1:]:
        aa = aa + ops.matmul(f, ops.transpose(f))
    aa = ops.reshape(aa, (n, s, n, s))
    b = ops.einsum("isjt,qjtc->isjcq", aa, d2)  # contracts t, batched over j
    g = ops.einsum("risc,isjcq->cirjq", d2, b)  # contracts s, batched over (i, c)
    return ops.reshape(g, (c, n * r, n * r))


def _identity_gram(a2, d2, rows, axis, num, kshape, max_bytes):
    """Whole-kernel (one module) Gram from the identity when that is cheaper
    than materializing the per-sample gradients; else None."""
    if axis is not None or num != 1:
        return None
    n, s, k = a2.shape
    c = d2.shape[-1]
    m = n * rows
    cost_identity = (n * s) ** 2 * k + (m * s) ** 2 * c + m * m * s * s
    cost_materialize = m * s * k * c + m * m * k * c
    if cost_identity >= cost_materialize or (m * s) ** 2 * 4 > max_bytes:
        return None
    aa = ops.einsum("nsk,mtk->nsmt", a2, a2)  # (n, S, n, S)
    dd = ops.einsum("rnsc,qmtc->nrsmqt", d2, d2)  # (n, R, S, n, R, S)
    g = ops.einsum("nsmt,nrsmqt->nrmq", aa, dd)
    return ops.reshape(g, (1, m, m))


def _other_grad(layer, kind, role, a, d):
    """Materialized per-sample kernel gradient, `(n, R, ...)` for grouped
    convolutions, depthwise kernels and EinsumDense."""
    if kind == "einsum":
        return ops.einsum(_einsum_grad_equation(layer), a, d)
    p = _conv_patches(layer, a)  # (n, S, T, Cin)
    r, n = d.shape[0], d.shape[1]
    if kind == "conv":  # grouped
        g = layer.groups
        p = ops.reshape(p, (n, p.shape[1], p.shape[2], g, -1))
        dd = ops.reshape(d, (r, n, p.shape[1], g, -1))
        return ops.einsum("nstgc,rnsgo->nrtcgo", p, dd)
    # depthwise (also the depthwise half of a separable convolution)
    mult = layer.depth_multiplier
    dd = ops.reshape(d, (r, n, p.shape[1], p.shape[-1], mult))
    return ops.einsum("nstc,rnscm->nrtcm", p, dd)
