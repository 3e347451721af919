"""lambda_max of every module's modular NTK (mat-spec sections 1-2).

Gram method (default): per-sample Jacobians of the scalarized outputs for the
probed variables in one vectorized pass (the backend kernel), then, per
family, G_l = J_l J_l^T by contracting every axis but the module axis, summed
over the family's variables, then one batched symmetric eigensolve. Only the
per-sample Jacobian is backend specific; the rest is `keras.ops`.

Matrix-free method (`method="lanczos"`): Lanczos with full
re-orthogonalisation and a breakdown guard on u -> J_l (J_l^T u), built from
one reverse and one forward product per step. For outputs too wide for the
Gram method; tests hold it to the Gram values.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops, tree

from keras_mat import backends
from keras_mat.groups import ModuleGroup, discover_groups, get_groups
from keras_mat.policy import expand_mask

NTK_OUTPUTS = ("auto", "logits", "sum", "loss")
METHODS = ("gram", "lanczos")
#: "auto" uses all outputs when a sample has at most this many (spec §2).
AUTO_LOGITS_MAX_OUTPUTS = 16
#: Default bound on the per-sample Jacobians held at once, in bytes.
DEFAULT_MAX_PROBE_BYTES = 1 << 30


# --------------------------------------------------------------------------------------
# Validation helpers (fail early, with the argument and the value received)
# --------------------------------------------------------------------------------------


def _check_option(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}. Received: {name}={value!r}")


def _batch_size(x, arg="x"):
    leaves = tree.flatten(x)
    if not leaves:
        raise ValueError(f"The probe batch `{arg}` is empty. Received: {arg}={x!r}")
    sizes = set()
    for leaf in leaves:
        shape = tuple(getattr(leaf, "shape", ()))
        if len(shape) == 0:
            raise ValueError(
                f"The probe batch `{arg}` must have a leading batch axis on every input. "
                f"Received: {arg} leaf of shape {shape}"
            )
        sizes.add(int(shape[0]))
    if len(sizes) != 1:
        raise ValueError(
            f"Every input of the probe batch `{arg}` must have the same batch size. "
            f"Received: batch sizes {sorted(sizes)}"
        )
    n = sizes.pop()
    if n < 1:
        raise ValueError(f"The probe batch `{arg}` needs at least one sample. Received: batch size {n}")
    return n


def _check_input_shapes(model, x):
    inputs = getattr(model, "inputs", None)
    if not inputs:
        return
    try:
        expected = tree.flatten(model._inputs_struct) if hasattr(model, "_inputs_struct") else inputs
        got = tree.flatten(x)
    except Exception:  # structure mismatch is reported by Keras itself
        return
    if len(expected) != len(got):
        raise ValueError(
            f"The probe batch has {len(got)} inputs but model {model.name!r} takes "
            f"{len(expected)}. Received: x with {len(got)} inputs"
        )
    for spec, leaf in zip(expected, got):
        want = tuple(spec.shape)[1:]
        have = tuple(leaf.shape)[1:]
        if len(want) != len(have) or any(w is not None and w != h for w, h in zip(want, have)):
            raise ValueError(
                f"The probe batch does not match the input shape of model {model.name!r}: "
                f"expected (batch, {', '.join(str(w) for w in want)}). "
                f"Received: x of shape {tuple(leaf.shape)}"
            )


def resolve_groups(model, groups=None):
    """The families to probe: `groups`, else `annotate`'s, else discovered."""
    if groups is None:
        groups = get_groups(model)
        if groups is None:
            groups = discover_groups(model)
    groups = list(groups)
    for g in groups:
        if not isinstance(g, ModuleGroup):
            raise ValueError(f"`groups` entries must be ModuleGroup. Received: groups entry={g!r}")
    if not groups:
        raise ValueError(
            f"Model {model.name!r} has no module to probe: no attention, conv, expert or "
            "Dense layer was found and no ModuleGroup was given. Received: groups=[]"
        )
    trainable = {id(v) for v in model.trainable_variables}
    for g in groups:
        for v in g.variables:
            if id(v) not in trainable:
                raise ValueError(
                    f"ModuleGroup {g.name!r}: variable {v.path!r} is not a trainable variable "
                    f"of model {model.name!r}. Received: variable={v.path!r}"
                )
    return groups


def _resolve_loss(model, loss):
    loss = loss if loss is not None else getattr(model, "loss", None)
    if loss is None:
        raise ValueError(
            "ntk_output='loss' needs a loss: compile the model or pass `loss=`. Received: loss=None"
        )
    if isinstance(loss, (dict, list, tuple)):
        raise ValueError(
            "ntk_output='loss' supports a single loss; pass `loss=` for multi-output models. "
            f"Received: loss={loss!r}"
        )
    fn = keras.losses.get(loss) if isinstance(loss, str) else loss
    call = getattr(fn, "call", None) if isinstance(fn, keras.losses.Loss) else fn
    if not callable(call):
        raise ValueError(f"`loss` must be a Keras loss, its name, or a callable. Received: loss={loss!r}")
    return call


def stateless_forward(model, trainable_values, non_trainable_values, x):
    """Inference-mode `stateless_call`; `training=False` only if `call` takes it
    (subclassed models may not), as Keras's own trainers do."""
    kwargs = {"training": False} if getattr(model, "_call_has_training_arg", True) else {}
    return model.stateless_call(trainable_values, non_trainable_values, x, **kwargs)


# --------------------------------------------------------------------------------------
# Scalarization: one row per (sample, output)
# --------------------------------------------------------------------------------------


def scalarize(outputs, y, mode, loss_call=None):
    """Rows of the NTK for a batch: shape `(batch, k)`.

    `"logits"`: every output; `"sum"`: per sample, the outputs summed over the
    last axis and averaged over the other non-batch axes (sequence positions);
    `"loss"`: the per-sample loss (mean over non-batch axes of the unreduced
    loss).
    """
    leaves = tree.flatten(outputs)
    if mode == "logits":
        return ops.concatenate([ops.reshape(o, (ops.shape(o)[0], -1)) for o in leaves], axis=1)
    if mode == "sum":
        total = 0
        for o in leaves:
            if len(o.shape) > 1:
                o = ops.sum(o, axis=-1)
            if len(o.shape) > 1:
                o = ops.mean(o, axis=tuple(range(1, len(o.shape))))
            total = total + o
        return ops.reshape(total, (-1, 1))
    if mode == "loss":
        values = loss_call(y, outputs)
        if len(values.shape) > 1:
            values = ops.mean(values, axis=tuple(range(1, len(values.shape))))
        return ops.reshape(values, (-1, 1))
    raise ValueError(f"Unknown ntk_output. Received: ntk_output={mode!r}")


def output_size(model, x):
    """Number of outputs per sample of `model` on inputs shaped like `x`."""
    first = tree.map_structure(lambda t: t[:1], x)
    kwargs = {"training": False} if getattr(model, "_call_has_training_arg", True) else {}
    out = model(first, **kwargs)
    return int(sum(int(np.prod(o.shape[1:])) for o in tree.flatten(out)))


def resolve_ntk_output(model, x, ntk_output):
    if ntk_output != "auto":
        return ntk_output
    return "logits" if output_size(model, x) <= AUTO_LOGITS_MAX_OUTPUTS else "sum"


# --------------------------------------------------------------------------------------
# Pure pieces (traceable; also used inside the compiled training step)
# --------------------------------------------------------------------------------------


def module_gram(jac, axis, num_modules):
    """Per-module Gram matrices of one variable's rows.

    Args:
        jac: `(rows, *variable.shape)` Jacobian rows.
        axis: The variable's module axis, or `None`.
        num_modules: G.

    Returns:
        `(G, rows, rows)`: for each module, J_l J_l^T restricted to this
        variable's slice of the module.
    """
    rows = jac.shape[0]
    if axis is None:
        flat = ops.reshape(jac, (rows, 1, -1))
    else:
        flat = ops.reshape(ops.moveaxis(jac, axis + 1, 1), (rows, num_modules, -1))
    flat = backends.get().gram_operand(flat)
    return ops.einsum("rgp,sgp->grs", flat, flat)


def top_eigenvalues(grams):
    """Largest eigenvalue of each symmetric PSD matrix in a `(G, m, m)` stack.

    Each matrix is scaled by its largest absolute entry before the solve, and
    the solve runs in float64 where the backend has it (not JAX without x64):
    float32 `eigh` failed to converge on tiny rank-deficient conv Grams
    (torch, |G| ~ 6e-3, rank 20 of 80).
    """
    dtype = grams.dtype
    grams = 0.5 * (grams + ops.transpose(grams, (0, 2, 1)))
    # Non-finite Grams (overflowed model) are solved as zeros and reported
    # as NaN: some eigensolvers raise on NaN input instead of returning NaN.
    finite = ops.all(ops.isfinite(grams), axis=(1, 2))
    grams = ops.where(ops.reshape(finite, (-1, 1, 1)), grams, ops.zeros_like(grams))
    scale = ops.max(ops.abs(grams), axis=(1, 2), keepdims=True)
    scale = ops.where(scale > 0, scale, ops.ones_like(scale))
    normed = grams / scale
    if backends.name() != "jax":
        normed = ops.cast(normed, "float64")
    top = ops.cast(backends.get().eigenvalues(normed)[:, -1], dtype) * ops.reshape(scale, (-1,))
    return ops.where(finite, top, ops.full_like(top, float("nan")))


def _chunks(sizes, rows, itemsize, max_bytes):
    # Greedy partition of the probed variables (in model order) so that each
    # pass holds at most `max_bytes` of per-sample Jacobians (>= 1 variable).
    chunks, current, used = [], [], 0
    for i, size in enumerate(sizes):
        cost = rows * size * itemsize
        if current and used + cost > max_bytes:
            chunks.append(current)
            current, used = [], 0
        current.append(i)
        used += cost
    if current:
        chunks.append(current)
    return chunks


class Probe:
    """A reusable lambda_max measurement for one model and one configuration.

    Holds the variable bookkeeping and the compiled per-chunk kernels so that
    repeated probes (every `probe_every` steps) never retrace. `__call__`
    reads the current variable values (never cached: JAX donates buffers),
    `from_values` is the pure form for use inside a compiled training step.
    """

    def __init__(self, model, groups, ntk_output, loss=None, max_probe_bytes=None, rows_per_sample=None):
        self.model = model
        self.groups = list(groups)
        self.mode = ntk_output
        self.loss_call = _resolve_loss(model, loss) if ntk_output == "loss" else None
        self.max_probe_bytes = DEFAULT_MAX_PROBE_BYTES if max_probe_bytes is None else int(max_probe_bytes)
        if self.max_probe_bytes < 1:
            raise ValueError(
                f"`max_probe_bytes` must be positive. Received: max_probe_bytes={max_probe_bytes}"
            )
        trainable = list(model.trainable_variables)
        index = {id(v): i for i, v in enumerate(trainable)}
        # (trainable index, family index, axis, G) for every probed variable, model order.
        entries = []
        for f, g in enumerate(self.groups):
            for v, axis in zip(g.variables, g.axes):
                entries.append((index[id(v)], f, axis, g.num_modules))
        entries.sort()
        self.entries = entries
        self.num_trainable = len(trainable)
        self._kernels = {}
        self._rows_per_sample = rows_per_sample
        self._xla = not _is_conv_only(model)

    # The single-sample function whose Jacobian is the NTK row block.
    def _single_fn(self, probe_pos, other_values, non_trainable_values):
        model, mode, loss_call = self.model, self.mode, self.loss_call

        def fn(probe_values, xi, yi):
            values = list(other_values)
            for pos, val in zip(probe_pos, probe_values):
                values[pos] = val
            xb = tree.map_structure(lambda t: ops.expand_dims(t, 0), xi)
            yb = tree.map_structure(lambda t: ops.expand_dims(t, 0), yi)
            out, _ = stateless_forward(model, values, non_trainable_values, xb)
            return ops.reshape(scalarize(out, yb, mode, loss_call), (-1,))

        return fn

    def _chunk_plan(self, n):
        rows = n * (self._rows_per_sample or 1)
        trainable = self.model.trainable_variables
        sizes = [int(np.prod(trainable[e[0]].shape)) for e in self.entries]
        itemsize = 4 if "64" not in str(trainable[self.entries[0][0]].dtype) else 8
        return _chunks(sizes, rows, itemsize, self.max_probe_bytes)

    def _chunk_fn(self, chunk, compiled):
        """The per-chunk Gram kernel (cached): `(probe positions, families,
        fn(probe_values, trainable, non_trainable, x, y) -> list of Grams)`."""
        cached = self._kernels.get((tuple(chunk), compiled))
        if cached is not None:
            return cached
        entries = [self.entries[i] for i in chunk]
        probe_pos = [e[0] for e in entries]
        fams = sorted({e[1] for e in entries})
        kernel = backends.get()

        def run(probe_values, trainable_values, non_trainable_values, x, y):
            fn = self._single_fn(probe_pos, trainable_values, non_trainable_values)
            jacs = kernel.per_sample_jacobians(fn, probe_values, x, y, key=(id(self), tuple(chunk)))
            grams = {}
            for (_, fam, axis, g), jac in zip(entries, jacs):
                jac = ops.reshape(jac, (-1,) + tuple(jac.shape[2:]))
                if jac.dtype not in ("float32", "float64"):
                    jac = ops.cast(jac, "float32")
                c = module_gram(jac, axis, g)
                grams[fam] = c if fam not in grams else grams[fam] + c
            return [grams[f] for f in fams]

        if compiled:
            run = kernel.compile_probe(run, xla=self._xla)
        self._kernels[(tuple(chunk), compiled)] = (probe_pos, fams, run)
        return probe_pos, fams, run

    def _measure(self, trainable_values, non_trainable_values, x, y, compiled):
        n = _batch_size(x)
        if y is None:
            y = ops.zeros((n,), dtype="float32")
        grams = [None] * len(self.groups)
        for chunk in self._chunk_plan(n):
            probe_pos, fams, run = self._chunk_fn(chunk, compiled)
            probe_values = [trainable_values[p] for p in probe_pos]
            for f, part in zip(fams, run(probe_values, trainable_values, non_trainable_values, x, y)):
                grams[f] = part if grams[f] is None else grams[f] + part
        # One eigensolve for every family (all Grams are rows x rows): a single
        # LAPACK call in the step, never several that could block each other.
        sizes = [int(g.shape[0]) for g in grams]
        top = top_eigenvalues(grams[0] if len(grams) == 1 else ops.concatenate(grams, axis=0))
        starts = np.cumsum([0] + sizes)
        return [top[a:b] for a, b in zip(starts[:-1], starts[1:])]

    def from_values(self, trainable_values, non_trainable_values, x, y=None):
        """Pure measurement (traceable inside a compiled training step): list of
        `(G,)` lambda_max, one per family."""
        return self._measure(trainable_values, non_trainable_values, x, y, compiled=False)

    def __call__(self, x, y=None):
        """Measures lambda_max now from the variables' current values (never
        cached: JAX donates buffers), with compiled kernels; returns a list of
        `(G,)` tensors."""
        x = tree.map_structure(ops.convert_to_tensor, x)
        y = None if y is None else tree.map_structure(ops.convert_to_tensor, y)
        # ops.convert_to_tensor: a tensor snapshot (TF would otherwise pass tf.Variables).
        trainable = [ops.convert_to_tensor(v.value) for v in self.model.trainable_variables]
        non_trainable = [ops.convert_to_tensor(v.value) for v in self.model.non_trainable_variables]
        return self._measure(trainable, non_trainable, x, y, compiled=True)


def _is_conv_only(model):
    # TF needs to know: XLA for attention/dense models, graph mode for pure
    # CNNs (see backends/tensorflow.py).
    from keras.src.layers.convolutional.base_conv import BaseConv

    has_conv = has_attention = False
    for layer in model._flatten_layers(include_self=False, recursive=True):
        has_conv |= isinstance(layer, BaseConv)
        has_attention |= isinstance(layer, keras.layers.MultiHeadAttention)
    return has_conv and not has_attention


def get_probe(model, groups, ntk_output, loss=None, max_probe_bytes=None, x=None):
    """A cached `Probe` for this model and configuration."""
    cache = model.__dict__.setdefault("_keras_mat_probes", {})
    key = (tuple(id(g) for g in groups), ntk_output, id(loss), max_probe_bytes)
    probe = cache.get(key)
    if probe is None:
        rows = output_size(model, x) if (ntk_output == "logits" and x is not None) else 1
        probe = Probe(
            model, groups, ntk_output, loss=loss, max_probe_bytes=max_probe_bytes, rows_per_sample=rows
        )
        cache[key] = probe
    return probe


# --------------------------------------------------------------------------------------
# Matrix-free method
# --------------------------------------------------------------------------------------


def lanczos_top_eigenvalue(matvec, dim, steps=20, seed=0):
    """Largest eigenvalue of a symmetric PSD operator by Lanczos.

    Full re-orthogonalisation (two Gram-Schmidt passes) and a breakdown guard
    (stop when the next off-diagonal is below 1e-6 of the largest diagonal
    seen): without the guard a low-rank module's Ritz value blows up.

    Args:
        matvec: `u (dim,) float64 -> (dim,) float64`.
        dim: Dimension of the operator.
        steps: Maximum Krylov dimension.
        seed: Seed of the start vector.

    Returns:
        The largest Ritz value, a float.
    """
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(dim)
    v /= np.linalg.norm(v)
    basis, alphas, betas = [v], [], []
    for _ in range(min(steps, dim)):
        w = matvec(basis[-1])
        a = float(basis[-1] @ w)
        alphas.append(a)
        Q = np.stack(basis)
        for _ in range(2):
            w = w - Q.T @ (Q @ w)
        b = float(np.linalg.norm(w))
        scale = max(abs(x) for x in alphas) or 1.0
        if b < 1e-6 * scale or len(basis) == dim:
            break
        betas.append(b)
        basis.append(w / b)
    m = len(alphas)
    T = np.diag(alphas) + np.diag(betas[: m - 1], 1) + np.diag(betas[: m - 1], -1)
    return float(np.linalg.eigvalsh(T)[-1])


def _lanczos(model, groups, x, y, mode, loss_call, steps):
    kernel = backends.get()
    n = _batch_size(x)
    x = tree.map_structure(ops.convert_to_tensor, x)
    y = ops.zeros((n,), dtype="float32") if y is None else tree.map_structure(ops.convert_to_tensor, y)
    trainable_vars = model.trainable_variables
    index = {id(v): i for i, v in enumerate(trainable_vars)}
    trainable = [ops.convert_to_tensor(v.value) for v in trainable_vars]
    non_trainable = [ops.convert_to_tensor(v.value) for v in model.non_trainable_variables]
    results = []
    for g in groups:
        pos = [index[id(v)] for v in g.variables]

        def fn(vals, pos=pos, trainable=trainable, non_trainable=non_trainable):
            values = list(trainable)
            for p, val in zip(pos, vals):
                values[p] = val
            out, _ = stateless_forward(model, values, non_trainable, x)
            return ops.reshape(scalarize(out, y, mode, loss_call), (-1,))

        vals = [trainable[p] for p in pos]
        out, pullback = kernel.vjp(fn, vals)
        dim = int(out.shape[0])
        dtype = out.dtype
        lam = []
        for m in range(g.num_modules):
            one_hot = ops.convert_to_tensor(np.eye(g.num_modules, dtype=np.float32)[m])
            masks = [
                None if axis is None else ops.cast(expand_mask(one_hot, tuple(v.shape), axis), v.dtype)
                for v, axis in zip(g.variables, g.axes)
            ]

            def matvec(u, masks=masks, fn=fn, vals=vals, pullback=pullback, dtype=dtype):
                ut = ops.convert_to_tensor(u.astype(np.float32), dtype=dtype)
                grads = pullback(ut)
                tangents = [gr if mk is None else gr * mk for gr, mk in zip(grads, masks)]
                return kernel.to_numpy(kernel.jvp(fn, vals, tangents)).astype(np.float64)

            lam.append(lanczos_top_eigenvalue(matvec, dim, steps=steps))
        results.append(ops.convert_to_tensor(np.asarray(lam, dtype=np.float32)))
    return results


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


def module_lambda_max(
    model,
    x,
    y=None,
    groups=None,
    ntk_output="auto",
    method="gram",
    loss=None,
    max_probe_bytes=None,
    lanczos_steps=20,
):
    """lambda_max of the modular NTK of every module (measurement only).

    For a probe batch `x` of n samples, module l's Jacobian J_l is taken of
    the scalarized outputs (see `ntk_output`) with respect to the module's
    parameters, and lambda_l is the largest eigenvalue of J_l J_l^T. Weights
    are read as they are now; nothing is trained. The model runs with
    `training=False` (no dropout; BatchNorm in inference mode so that samples
    stay independent).

    Args:
        model: A built Keras model.
        x: The probe batch (array, or dict/list of arrays as the model takes).
        y: Targets, needed only for `ntk_output="loss"`.
        groups: Module families; default: those of `keras_mat.annotate`,
            else discovered automatically.
        ntk_output: `"logits"` (all k outputs per sample, exact mNTK of size
            nk x nk), `"sum"` (one scalar per sample: outputs summed over the
            last axis, averaged over positions), `"loss"` (per-sample loss),
            or `"auto"`: "logits" when a sample has at most 16 outputs, else
            "sum".
        method: `"gram"` (per-sample Jacobians + batched eigh, exact) or
            `"lanczos"` (matrix-free, for very wide outputs).
        loss: The loss for `ntk_output="loss"` (default: the compiled loss).
        max_probe_bytes: Upper bound on the per-sample Jacobians held at once
            (n * rows * probed parameters * 4 bytes); variables are probed in
            as many passes as needed. Default 1 GiB.
        lanczos_steps: Krylov dimension for `method="lanczos"`.

    Returns:
        A dict `family name -> numpy array (num_modules,)` of lambda_max.

    Raises:
        ValueError: on an unknown option, a probe batch whose shape does not
            match the model, groups that are not the model's trainable
            variables, or a non-finite lambda_max.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> lam = module_lambda_max(model, np.ones((8, 4), "float32"))
    >>> [v.shape for v in lam.values()]
    [(1,)]
    """
    _check_option("ntk_output", ntk_output, NTK_OUTPUTS)
    _check_option("method", method, METHODS)
    if not isinstance(lanczos_steps, int) or lanczos_steps < 1:
        raise ValueError(f"`lanczos_steps` must be a positive int. Received: lanczos_steps={lanczos_steps!r}")
    if not model.built:
        raise ValueError(f"module_lambda_max needs a built model. Received: model={model.name!r} (not built)")
    _batch_size(x)
    _check_input_shapes(model, x)
    groups = resolve_groups(model, groups)
    mode = resolve_ntk_output(model, x, ntk_output)
    if mode == "loss" and y is None:
        raise ValueError("ntk_output='loss' needs targets `y`. Received: y=None")
    if method == "lanczos":
        loss_call = _resolve_loss(model, loss) if mode == "loss" else None
        lams = _lanczos(model, groups, x, y, mode, loss_call, lanczos_steps)
    else:
        probe = get_probe(model, groups, mode, loss=loss, max_probe_bytes=max_probe_bytes, x=x)
        lams = probe(x, y)
    out = {}
    for g, lam in zip(groups, lams):
        arr = np.asarray(ops.convert_to_numpy(lam), dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError(
                f"Non-finite lambda_max for module family {g.name!r} (the model's outputs or "
                f"gradients overflowed on this probe batch). Received: lambda_max={arr.tolist()}"
            )
        out[g.name] = np.maximum(arr, 0.0)
    return out
