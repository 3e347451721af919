"""Analytic FLOPs of a training step, per op and per module.

A multiply-add counts as 2 FLOPs. Every counted op gets three numbers for one
training step on a batch of `batch_size` samples:

- `forward`: the forward pass;
- `grad_input` (dX): the activation gradient, i.e. back-propagating the
  output gradient to the op's inputs;
- `grad_weight` (dW): the gradient of the op's own weights, recorded per
  variable so that it can be split over the modules of a `ModuleGroup`.

What is counted (everything else, e.g. activations, softmax, normalization,
bias additions, residual additions, dropout, pooling and the loss, counts as
0 FLOPs; these are element-wise and small next to the contractions):

- `Dense`: `2 * rows * d_in * d_out` for forward, dX and dW each, where
  `rows` is the number of input vectors (batch times any sequence axes).
- `EinsumDense`: `2 * prod(size of every index of the equation)` for each
  of forward, dX and dW.
- Convolutions (`Conv1D/2D/3D` with any strides, padding, dilation and
  groups): `2 * output_elements * prod(kernel_size) * c_in / groups` for
  each of forward, dX and dW. Transposed convolutions:
  `2 * input_elements * prod(kernel_size) * c_out`. Depthwise:
  `2 * output_elements * prod(kernel_size)`. Separable: the depthwise and
  the pointwise parts, each with its own weight gradient. Taps that fall on
  "same" padding and the zeros that strides insert in dX are counted as dense
  work (no sparsity savings assumed).
- `MultiHeadAttention` (and subclasses, e.g. keras-hub's): the four
  projections are `EinsumDense` sub-layers and count as such; the two
  attention matmuls `Q K^T` and `A V` cost `2 * rows_q * H * S * d_key` and
  `2 * rows_q * H * S * d_value` forward (`rows_q`: query vectors, `S`:
  key/value positions along the attention axes). Their backward pass costs
  twice their forward and is pure activation-gradient work: it is booked as
  `grad_input` of the attention layer, in the shared (not per-module) bucket,
  because it must run whenever any layer below the attention is trained.
- `Embedding` lookup (and keras-hub `PositionEmbedding`-like layers): 0
  FLOPs forward and dX; its weight gradient is a scatter-add of the output
  gradient into the table, counted as `output_elements` FLOPs.
  `ReversibleEmbedding(..., reverse=True)` is a matmul with the (tied or
  separate) table: `2 * rows * dim * vocab` each for forward, dX and dW.
- Stacked-expert MoE layers (a layer with an int `num_experts >= 2` whose
  expert weights have a leading `num_experts` axis, see
  `keras_mat.groups`): *approximation*. Each expert weight of rank >= 3
  `(E, a, b, ...)` is treated as a per-token matmul of size `a * b * ...`
  applied to `tokens * k` token-expert pairs, where `tokens` is the number of
  input vectors and `k` is the layer's `top_k` / `num_experts_per_tok` /
  `experts_per_token` / `num_selected_experts` attribute if it has one
  (sparse dispatch), else `E` (dense dispatch: every expert processes every
  token, as in an `einsum("...d,edh->...eh")` implementation). Per-expert
  weight gradients are split evenly over the experts (balanced routing);
  the true per-step load is data dependent. Rank-2 expert weights `(E, h)`
  are biases (0 FLOPs); the router counts as a per-token matmul.
- Any other layer with own trainable weights of rank >= 2: *approximation*,
  each such weight is treated as a per-token matmul,
  `2 * tokens * weight.size` for each of forward, dX and dW.

Per module: every variable's dW FLOPs (summed over all calls of its layer)
are split evenly over the modules of its family, e.g. one attention head's
share of the q/k/v/o projections is `1/H` of their dW FLOPs; for convolution
filters and heads this split is exact.

Not covered: recurrent layers (their cell is traced once, not once per
time step, so they are under-counted), and attention layers that are not
`MultiHeadAttention` subclasses (only their projection sub-layers count).
Every layer call in the traced graph counts, including outputs the loss may
not use (e.g. a backbone's pooled output under a masked-LM head).

Shapes are found by tracing one call of the model on abstract inputs of
batch size `batch_size` (no real computation on JAX and TensorFlow, meta
tensors on PyTorch) while a profile hook of the tracing thread records the
input and output shapes of every layer call; nothing in Keras is replaced.
Layers called several times (shared layers) are counted once per call.

Cumulative FLOPs in a training loop (count once, then accumulate):

```python
report = keras_mat.flops.count_flops(model, batch_size)
probe = keras_mat.flops.probe_flops(report, probe_samples, rows_per_sample)
# every step, with the masks the step trained with (mask * (1 - frozen)):
train_flops += keras_mat.flops.step_flops(report, masks)
# every measurement step, in addition:
probe_total += probe
```

A last, smaller batch costs `step_flops(...) * n / batch_size` (every count
is linear in the batch size).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys

import keras
import numpy as np

from keras_mat._keras_private import (
    BaseConv,
    BaseConvTranspose,
    BaseDepthwiseConv,
    BaseSeparableConv,
    compute_output_spec,
)
from keras_mat.groups import discover_groups, get_groups

_TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "experts_per_token", "num_selected_experts")


@dataclasses.dataclass
class OpFlops:
    """FLOPs of one layer call in one training step.

    Attributes:
        layer: Path (or name) of the layer.
        class_name: Class name of the layer.
        forward: Forward FLOPs.
        grad_input: Activation-gradient (dX) FLOPs.
        grad_weight: Weight-gradient (dW) FLOPs, summed over `weights`.
        weights: Dict variable path -> dW FLOPs of that variable in this call.
        trainable: Paths of the layer's own trainable variables (also those
            with 0 counted FLOPs, e.g. normalization scales).
        input_shape: Shape of the first input (batch included).
        output_shape: Shape of the first output (batch included).
    """

    layer: str
    class_name: str
    forward: float = 0.0
    grad_input: float = 0.0
    grad_weight: float = 0.0
    weights: dict = dataclasses.field(default_factory=dict)
    trainable: tuple = ()
    input_shape: tuple | None = None
    output_shape: tuple | None = None
    # id(variable) -> dW FLOPs; ids of own trainable variables (internal).
    _weight_ids: dict = dataclasses.field(default_factory=dict, repr=False)
    _trainable_ids: tuple = dataclasses.field(default=(), repr=False)
    _source: int | None = dataclasses.field(default=None, repr=False)  # which tensor it reads first


@dataclasses.dataclass
class FlopsReport:
    """Analytic FLOPs of one training step of a model.

    Attributes:
        batch_size: Batch size the counts are for (every count is linear in
            it).
        ops: `OpFlops` of every counted layer call, in execution order (a layer that calls sub-layers after them).
        layers: Dict layer path -> `{"forward", "grad_input", "grad_weight"}`
            summed over the layer's calls, in first-call order.
        families: Dict family name -> `(num_modules,)` float64 array of the
            weight-gradient FLOPs of each module (all module families of the
            model, in `get_groups` order).
        family_parameters: Dict family name -> parameters per module.
        forward: Total forward FLOPs.
        grad_input: Total activation-gradient FLOPs.
        grad_weight: Total weight-gradient FLOPs.
        grad_weight_always: Weight-gradient FLOPs of trainable variables that
            belong to no family (always trained).
    """

    batch_size: int
    ops: list
    layers: dict
    families: dict
    family_parameters: dict
    forward: float
    grad_input: float
    grad_weight: float
    grad_weight_always: float
    # id(variable) -> family name (internal).
    _owners: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def grad_weight_modules(self):
        """Weight-gradient FLOPs of all modules (every family, every module)."""
        return float(sum(float(np.sum(a)) for a in self.families.values()))

    @property
    def shared(self):
        """FLOPs not attributable to modules: forward + all activation
        gradients + weight gradients of always-trained variables."""
        return self.forward + self.grad_input + self.grad_weight_always

    @property
    def total(self):
        """Training FLOPs of one step with every module trained."""
        return self.forward + self.grad_input + self.grad_weight

    def summary(self):
        """A plain-text table of the per-layer counts and the totals."""
        width = max([len(name) for name in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'forward':>12}  {'grad_input':>12}  {'grad_weight':>12}"]
        for name, c in self.layers.items():
            lines.append(
                f"{name:<{width}}  {c['forward']:>12.4g}  {c['grad_input']:>12.4g}  {c['grad_weight']:>12.4g}"
            )
        lines.append(
            f"{'total':<{width}}  {self.forward:>12.4g}  {self.grad_input:>12.4g}  {self.grad_weight:>12.4g}"
        )
        lines.append(
            f"batch_size={self.batch_size}  step={self.total:.4g}  shared={self.shared:.4g}  "
            f"modules={self.grad_weight_modules:.4g}"
        )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Tracing: one abstract call of the model with a hook on every layer call
# --------------------------------------------------------------------------------------


class _Call:
    __slots__ = ("layer", "arguments", "outputs", "source")

    def __init__(self, layer, arguments):
        self.layer = layer
        self.arguments = arguments
        self.outputs = None
        self.source = None  # index of the tensor the call reads first (same index: same tensor)


def _is_tensor_like(x):
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, keras.Variable)


def _shape_of(x):
    if not _is_tensor_like(x):
        return x
    try:
        return tuple(None if d is None else int(d) for d in x.shape)
    except TypeError:  # unknown rank
        return None


def _to_shapes(structure):
    try:
        return keras.tree.map_structure(_shape_of, structure)
    except Exception:  # exotic non-tree arguments: keep only plain tensors
        return _shape_of(structure)


def _bind(layer, args, kwargs):
    args = tuple(_to_shapes(a) for a in args)
    kwargs = {k: _to_shapes(v) for k, v in kwargs.items()}
    try:
        bound = inspect.signature(layer.call).bind_partial(*args, **kwargs)
        return dict(bound.arguments)
    except (TypeError, ValueError):
        out = {f"arg{i}": a for i, a in enumerate(args)}
        out.update(kwargs)
        return out


def _input_specs(model, batch_size, input_shapes):
    struct = None
    inputs = None
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if inputs:
        struct = getattr(model, "_inputs_struct", None)
        if struct is None:
            struct = inputs if len(inputs) > 1 else inputs[0]

    def is_shape(s):
        return isinstance(s, (tuple, list)) and all(d is None or isinstance(d, int) for d in s)

    if input_shapes is not None:
        if is_shape(input_shapes):
            shapes = tuple(input_shapes)
        elif isinstance(input_shapes, dict):
            shapes = {k: tuple(v) for k, v in input_shapes.items()}
        else:
            shapes = [tuple(s) for s in input_shapes]
    elif struct is not None:
        shapes = keras.tree.map_structure(lambda t: tuple(t.shape[1:]), struct)
    else:
        raise ValueError(
            "count_flops needs `input_shapes` for a model without symbolic inputs (not Functional). "
            f"Received: model={model.name!r}, input_shapes=None"
        )

    def dtype_of(key_or_pos):
        if struct is None:
            return "float32"
        try:
            if isinstance(struct, dict):
                return struct[key_or_pos].dtype
            if isinstance(struct, (list, tuple)):
                return struct[key_or_pos].dtype
            return struct.dtype
        except (KeyError, IndexError, TypeError):
            return "float32"

    def spec(shape, key):
        shape = tuple(shape)
        if None in shape:
            raise ValueError(
                "count_flops needs every non-batch input dimension; pass `input_shapes` "
                f"(per-sample shapes, batch axis excluded). Received: input shape {shape}"
            )
        return keras.KerasTensor((batch_size,) + shape, dtype=dtype_of(key))

    if isinstance(shapes, dict):
        return {k: spec(v, k) for k, v in shapes.items()}
    if isinstance(shapes, list):
        return [spec(s, i) for i, s in enumerate(shapes)]
    return spec(shapes, None)


def _trace(model, specs):
    # Layer calls are observed, not intercepted: a profile function (the
    # interpreter's own tracing hook, for this thread only) sees every entry
    # into and return from `Layer.__call__` while the model runs on abstract
    # inputs. Nothing in Keras is replaced.
    calls = []
    sources = {}  # id(tensor) -> (index, tensor): the tensor kept alive so that ids stay unique
    open_calls = {}  # id(frame) -> (record, number of calls recorded before it)
    target = inspect.unwrap(keras.layers.Layer.__call__).__code__

    def observe(frame, event, arg):
        if event == "call" and frame.f_code is target:
            local = frame.f_locals
            layer, args, kwargs = local.get("self"), local.get("args", ()), local.get("kwargs", {})
            record = _Call(layer, _bind(layer, args, kwargs))
            first = next((t for t in keras.tree.flatten((args, kwargs)) if _is_tensor_like(t)), None)
            if first is not None:
                record.source = sources.setdefault(id(first), (len(sources), first))[0]
            calls.append(record)
            open_calls[id(frame)] = (record, len(calls))
        elif event == "return" and frame.f_code is target and id(frame) in open_calls:
            record, start = open_calls.pop(id(frame))
            if len(calls) > start:
                # A layer that calls sub-layers (attention: its query/key/value
                # projections) is taken to do its own work after them, on their
                # outputs: it is ordered after them and reads none of its inputs.
                calls.remove(record)
                calls.append(record)
                record.source = None
            record.outputs = [_shape_of(t) for t in keras.tree.flatten(arg) if _is_tensor_like(t)]

    def fn(inputs):
        calls.clear()  # a backend may trace more than once (torch: meta, then eager)
        sources.clear()
        open_calls.clear()
        previous = sys.getprofile()
        sys.setprofile(observe)
        try:
            return model(inputs, training=False)
        finally:
            sys.setprofile(previous)

    compute_output_spec(fn, specs)
    return [c for c in calls if c.layer is not model and c.outputs is not None]


# --------------------------------------------------------------------------------------
# Per-layer formulas
# --------------------------------------------------------------------------------------


def _prod(shape):
    return float(math.prod(int(d) for d in shape))


def _is_shape(value):
    return isinstance(value, tuple) and all(isinstance(d, int) for d in value)


def _first_shape(value):
    # Depth-first: the first recorded tensor shape inside `value` (recorded
    # shapes are tuples of ints, so keras.tree cannot be used to walk them).
    if _is_shape(value):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_shape(item)
            if found is not None:
                return found
    return None


def _first_input(call):
    for value in call.arguments.values():
        found = _first_shape(value)
        if found is not None:
            return found
    return None


def _arg(call, name, position):
    # Arguments are bound to the signature's names (`_bind`); positions only
    # count when binding failed. (Never the n-th value given: a keyword call
    # `mha(query=x, value=x, attention_mask=m)` must not take the mask for
    # the key.)
    if name in call.arguments:
        return call.arguments[name]
    return call.arguments.get(f"arg{position}")


def _rows(shape):
    return _prod(shape[:-1])


def _matmul(op, variable, flops, grad_input=True):
    op.forward += flops
    if grad_input:
        op.grad_input += flops
    if variable is not None and variable.trainable:
        op._weight_ids[id(variable)] = op._weight_ids.get(id(variable), 0.0) + flops


def _einsum_flops(equation, input_shape, kernel_shape):
    lhs, _ = equation.split("->")
    a, b = lhs.split(",")
    sizes = {}
    ellipsis = 1.0
    for labels, shape in ((a, input_shape), (b, kernel_shape)):
        if "..." in labels:
            pre, post = labels.split("...")
            n_ell = len(shape) - len(pre) - len(post)
            if labels is a:
                ellipsis = _prod(shape[len(pre) : len(pre) + n_ell])
            dims = list(shape[: len(pre)]) + list(shape[len(shape) - len(post) :])
            labels = pre + post
        else:
            dims = list(shape)
        for label, dim in zip(labels, dims):
            sizes[label] = int(dim)
    return 2.0 * ellipsis * _prod(sizes.values())


def _count_call(call, op):
    """Fills `op` for one layer call; returns False when it counts nothing."""
    layer = call.layer
    x = _first_input(call)
    y = call.outputs[0] if call.outputs else None
    op.input_shape, op.output_shape = x, y

    if isinstance(layer, keras.layers.MultiHeadAttention):
        query = _arg(call, "query", 0)
        value = _arg(call, "value", 1)
        key = _arg(call, "key", 2)
        key = key if _is_shape(key) else value
        if not _is_shape(query) or not _is_shape(key):
            return
        axes = layer._attention_axes
        if axes is None:
            axes = tuple(range(1, len(key) - 1))
        positions = _prod(key[a] for a in axes)
        heads = layer._num_heads
        scores = 2.0 * _rows(query) * heads * positions * layer._key_dim
        mix = 2.0 * _rows(query) * heads * positions * layer._value_dim
        op.forward += scores + mix
        op.grad_input += 2.0 * (scores + mix)
        return
    if isinstance(layer, keras.layers.Embedding):
        table = layer.embeddings
        if call.arguments.get("reverse", False):
            if x is None:
                return
            kernel = table if getattr(layer, "tie_weights", True) else layer.reverse_embeddings
            _matmul(op, kernel, 2.0 * _rows(x) * x[-1] * table.shape[0])
        elif y is not None and table.trainable:
            op._weight_ids[id(table)] = op._weight_ids.get(id(table), 0.0) + _prod(y)
        return
    if isinstance(layer, keras.layers.EinsumDense):
        if x is not None:
            _matmul(op, layer.kernel, _einsum_flops(layer.equation, x, layer.kernel.shape))
        return
    if isinstance(layer, keras.layers.Dense):
        if x is not None:
            k = layer.kernel
            _matmul(op, k, 2.0 * _rows(x) * k.shape[0] * k.shape[1])
        return
    if isinstance(layer, BaseSeparableConv):
        if y is not None:
            dw, pw = layer.depthwise_kernel, layer.pointwise_kernel
            mid = _prod(y) / pw.shape[-1] * pw.shape[-2]  # depthwise output elements
            _matmul(op, dw, 2.0 * mid * _prod(dw.shape[:-2]))
            _matmul(op, pw, 2.0 * _prod(y) * pw.shape[-2])
        return
    if isinstance(layer, BaseDepthwiseConv):
        if y is not None:
            _matmul(op, layer.kernel, 2.0 * _prod(y) * _prod(layer.kernel.shape[:-2]))
        return
    if isinstance(layer, BaseConvTranspose):
        if x is not None:
            _matmul(op, layer.kernel, 2.0 * _prod(x) * _prod(layer.kernel.shape[:-1]))
        return
    if isinstance(layer, BaseConv):
        if y is not None:
            _matmul(op, layer.kernel, 2.0 * _prod(y) * _prod(layer.kernel.shape[:-1]))
        return
    own = [v for v in getattr(layer, "_trainable_variables", None) or [] if v.trainable]
    if not own:
        return
    if "Embedding" in type(layer).__name__:
        # keras-hub PositionEmbedding & co.: a slice/lookup broadcast to the
        # output; the weight gradient sums the output gradient into the table.
        if y is not None:
            for v in own:
                op._weight_ids[id(v)] = op._weight_ids.get(id(v), 0.0) + _prod(y)
        return
    if x is None:
        return
    tokens = _rows(x)
    experts = getattr(layer, "num_experts", None)
    is_moe = isinstance(experts, int) and not isinstance(experts, bool) and experts >= 2
    top_k = experts
    if is_moe:
        for attr in _TOP_K_ATTRS:
            k = getattr(layer, attr, None)
            if isinstance(k, int) and not isinstance(k, bool) and k >= 1:
                top_k = k
                break
    for v in own:
        if len(v.shape) < 2:
            continue  # biases, scales: element-wise
        if is_moe and v.shape[0] == experts:
            if len(v.shape) < 3:
                continue  # stacked expert biases
            _matmul(op, v, 2.0 * tokens * top_k * _prod(v.shape[1:]))
        else:
            _matmul(op, v, 2.0 * tokens * _prod(v.shape))


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def _layer_path(layer):
    return getattr(layer, "path", None) or layer.name


def count_flops(model, batch_size, input_shapes=None, groups=None):
    """Counts the analytic FLOPs of one training step of `model`.

    See the module docstring for the formulas and what is approximated.

    Args:
        model: A built Keras model (Functional, Sequential, keras-hub task or
            backbone; a subclassed model needs `input_shapes`).
        batch_size: Training batch size (int >= 1).
        input_shapes: Per-sample input shapes (batch axis excluded), in the
            structure of the model's inputs (a tuple, a list of tuples or a
            dict name -> tuple). Required when the model's inputs have
            unknown non-batch dimensions, e.g. a keras-hub backbone built
            with `sequence_length=None`. Defaults to the model's input
            shapes.
        groups: The module families to attribute weight gradients to.
            Defaults to `keras_mat.get_groups(model)` if the model is
            annotated, else to `keras_mat.discover_groups(model)`.

    Returns:
        A `FlopsReport`.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> report = count_flops(model, batch_size=2)
    >>> report.forward, report.grad_input, report.grad_weight
    (128.0, 128.0, 128.0)
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int. Received: batch_size={batch_size!r}")
    if not model.built:
        raise ValueError(f"count_flops needs a built model. Received: model={model.name!r} (not built)")
    if groups is None:
        groups = get_groups(model)
        if groups is None:
            groups = discover_groups(model)
    groups = list(groups)

    specs = _input_specs(model, batch_size, input_shapes)
    calls = _trace(model, specs)

    paths = {id(v): v.path for v in model.variables}
    ops = []
    for call in calls:
        layer = call.layer
        own = [v for v in getattr(layer, "_trainable_variables", None) or [] if v.trainable]
        op = OpFlops(layer=_layer_path(layer), class_name=type(layer).__name__)
        _count_call(call, op)
        op.grad_weight = float(sum(op._weight_ids.values()))
        op.weights = {paths.get(k, str(k)): float(f) for k, f in op._weight_ids.items()}
        op._trainable_ids = tuple(id(v) for v in own)
        op._source = call.source
        op.trainable = tuple(v.path for v in own)
        if op.forward or op.grad_input or op.grad_weight or own:
            ops.append(op)

    layers = {}
    per_var = {}
    for op in ops:
        entry = layers.setdefault(op.layer, {"forward": 0.0, "grad_input": 0.0, "grad_weight": 0.0})
        entry["forward"] += op.forward
        entry["grad_input"] += op.grad_input
        entry["grad_weight"] += op.grad_weight
        for k, f in op._weight_ids.items():
            per_var[k] = per_var.get(k, 0.0) + f

    families, params = {}, {}
    owners = {}
    for g in groups:
        total = 0.0
        for v in g.variables:
            owners[id(v)] = g.name
            total += per_var.get(id(v), 0.0)
        families[g.name] = np.full((g.num_modules,), total / g.num_modules, dtype="float64")
        params[g.name] = g.num_parameters
    always = float(sum(f for k, f in per_var.items() if k not in owners))
    return FlopsReport(
        batch_size=batch_size,
        ops=ops,
        layers=layers,
        families=families,
        family_parameters=params,
        forward=float(sum(op.forward for op in ops)),
        grad_input=float(sum(op.grad_input for op in ops)),
        grad_weight=float(sum(op.grad_weight for op in ops)),
        grad_weight_always=always,
        _owners=owners,
    )


def _active_masks(report, masks):
    names = list(report.families)
    if masks is None:
        masks = {}
    elif not isinstance(masks, dict):
        masks = list(masks)
        if len(masks) != len(names):
            raise ValueError(
                f"`masks` as a sequence needs one entry per family ({len(names)}, in report order). "
                f"Received: {len(masks)} entries"
            )
        masks = dict(zip(names, masks))
    unknown = sorted(set(masks) - set(names))
    if unknown:
        raise ValueError(f"`masks` names unknown families. Received: unknown names={unknown}")
    out = {}
    for name in names:
        n = report.families[name].shape[0]
        if name not in masks or masks[name] is None:
            out[name] = np.ones((n,), dtype=bool)
            continue
        m = masks[name]
        if not isinstance(m, (np.ndarray, list, tuple, bool, int, float)):
            m = keras.ops.convert_to_numpy(m)
        m = np.asarray(m, dtype="float64").reshape(-1)
        if m.shape[0] == 1 and n != 1:
            m = np.repeat(m, n)
        if m.shape[0] != n:
            raise ValueError(
                f"Mask of family {name!r} must have {n} entries. Received: shape {tuple(m.shape)}"
            )
        out[name] = m > 0.5
    return out


def step_flops(report, masks=None, frozen_prefix=None, granularity="module"):
    """Training FLOPs of one step given the module masks.

    Counts the forward pass, the activation gradients, the weight gradients
    of always-trained variables and the weight gradients of the active
    modules only.

    Args:
        report: A `FlopsReport` from `count_flops`.
        masks: Dict family name -> `(num_modules,)` bool/0-1 array (`True`:
            the module is trained this step), or a sequence in the report's
            family order, or `None` (every module active). Families missing
            from the dict count as fully active. With the MAT state, pass
            `mask * (1 - frozen)`.
        frozen_prefix: Where back-propagation stops. `None` (default): every
            activation gradient is counted (an upper bound: autodiff also
            skips the input gradient of the first layer). An int `k` or a
            layer path/name (its first call): back-propagation stops at
            `report.ops[k]`: that op's weight gradient is still counted, but
            not its input gradient, and neither gradient of any op executed
            before it. `"auto"`: stop at the first op (in execution order)
            that owns a trained variable (an always-trained variable or one
            with an active module), i.e. skip all back-propagation below the
            lowest trained parameter, as JAX's autodiff does when the
            untrained variables are left out of differentiation. Ops are
            taken in execution order (a layer that calls sub-layers, e.g. a
            `MultiHeadAttention`, after them), and a later op that reads the same
            tensor as the stop op (the key and value projections beside the
            query projection) gets no input gradient either. Other branches
            off the frozen part are counted as back-propagated, which can
            only over-count.
        granularity: `"module"` (default): a family's dW counts only for its
            active modules (the analytic MAT cost). `"family"`: a family's
            whole dW counts if any of its modules is active (what an
            implementation that masks the update but computes whole-variable
            gradients spends).

    Returns:
        A float: training FLOPs of the step.
    """
    if granularity not in ("module", "family"):
        raise ValueError(f"`granularity` must be 'module' or 'family'. Received: granularity={granularity!r}")
    active = _active_masks(report, masks)
    dw = report.grad_weight_always
    for name, per_module in report.families.items():
        m = active[name]
        if granularity == "module":
            dw += float(np.sum(per_module[m]))
        elif np.any(m):
            dw += float(np.sum(per_module))
    total = report.forward + report.grad_input + dw
    if frozen_prefix is None:
        return total
    k = _stop_index(report, active, frozen_prefix)
    if k is None:
        return report.forward
    # Ops below the stop point: no dX, no dW. The stop op itself: no dX, nor
    # any later op that reads the same tensor (the key and value projections
    # beside a query projection): its gradient would only flow below the stop.
    for op in report.ops[:k]:
        total -= op.grad_input
        total -= _op_weight_flops(report, op, active, granularity)
    stop = report.ops[k]
    for op in report.ops[k:]:
        if op is stop or (stop._source is not None and op._source == stop._source):
            total -= op.grad_input
    return total


def _op_weight_flops(report, op, active, granularity):
    # dW this op contributes to the step under the masks: a family variable's
    # dW is scaled by the fraction of active modules.
    owners = _var_owners(report)
    total = 0.0
    for k, f in op._weight_ids.items():
        name = owners.get(k)
        if name is None:
            total += f
            continue
        m = active[name]
        total += f * (float(np.mean(m)) if granularity == "module" else float(np.any(m)))
    return total


def _var_owners(report):
    return report._owners


def _stop_index(report, active, frozen_prefix):
    ops = report.ops
    if isinstance(frozen_prefix, bool):
        raise ValueError(
            f"`frozen_prefix` must be None, an int, a layer name or 'auto'. Received: {frozen_prefix!r}"
        )
    if isinstance(frozen_prefix, int):
        if not 0 <= frozen_prefix < len(ops):
            raise ValueError(
                f"`frozen_prefix` must index report.ops (0..{len(ops) - 1}). Received: {frozen_prefix}"
            )
        return frozen_prefix
    if frozen_prefix == "auto":
        owners = _var_owners(report)
        for i, op in enumerate(ops):
            for k in op._trainable_ids:
                name = owners.get(k)
                if name is None or np.any(active[name]):
                    return i
        return None  # nothing trained: no backward pass at all
    if isinstance(frozen_prefix, str):
        for i, op in enumerate(ops):
            if op.layer == frozen_prefix or op.layer.split("/")[-1] == frozen_prefix:
                return i
        raise ValueError(f"`frozen_prefix` names no counted layer. Received: frozen_prefix={frozen_prefix!r}")
    raise ValueError(
        f"`frozen_prefix` must be None, an int, a layer name or 'auto'. Received: {frozen_prefix!r}"
    )


def probe_flops(report_or_model, probe_samples, rows_per_sample=1, gram=True):
    """Approximate FLOPs of one lambda_max probe.

    The probe computes per-sample Jacobians of `rows_per_sample` scalar
    outputs with respect to every module parameter (`keras_mat.ntk`): per
    sample, one forward pass and one backward pass per row, each of the cost
    of a batch of 1. The backward pass counts all activation gradients (an
    upper bound) and the weight gradients of the module (probed) variables
    only. With `gram=True` the per-module Gram matrices `J_l J_l^T` of the
    `R = probe_samples * rows_per_sample` rows are added,
    `2 * R^2 * P` FLOPs for `P` probed parameters; the eigenvalue solves
    (`O(R^3)` per module) are ignored.

    So, per probe: `probe_samples * (forward_1 + rows_per_sample *
    (grad_input_1 + grad_weight_modules_1)) + 2 R^2 P`, where `_1` means per
    sample (`report` values divided by `report.batch_size`).

    Args:
        report_or_model: A `FlopsReport`, or a model (counted with
            `count_flops(model, batch_size=1)`).
        probe_samples: Number of probe samples.
        rows_per_sample: Jacobian rows per sample (outputs per sample for
            `ntk_output="logits"`, 1 for `"sum"`/`"loss"`).
        gram: Whether to add the Gram-matrix FLOPs.

    Returns:
        A float: FLOPs of one probe.
    """
    report = report_or_model
    if not isinstance(report, FlopsReport):
        report = count_flops(report_or_model, batch_size=1)
    if probe_samples < 0 or rows_per_sample < 1:
        raise ValueError(
            "`probe_samples` must be >= 0 and `rows_per_sample` >= 1. "
            f"Received: probe_samples={probe_samples}, rows_per_sample={rows_per_sample}"
        )
    b = float(report.batch_size)
    per_row = (report.grad_input + report.grad_weight_modules) / b
    flops = probe_samples * (report.forward / b + rows_per_sample * per_row)
    if gram:
        rows = float(probe_samples * rows_per_sample)
        params = float(
            sum(report.family_parameters[n] * report.families[n].shape[0] for n in report.families)
        )
        flops += 2.0 * rows * rows * params
    return float(flops)
