"""lambda_max of every module's modular NTK (mat-spec sections 1-2).

Gram method (default): per-sample Jacobian rows of the scalarized outputs for
the probed variables, then, per family, G_l = J_l J_l^T by contracting every
axis but the module axis, summed over the family's variables, then the top
eigenvalue of every Gram in float64. The rows come from two routes in one
probe (see `Probe`): the layer-factored route of `ntk_layers.py` for Dense,
EinsumDense and convolution nodes of a Functional graph, and a vectorized
per-sample `jacrev` (the backend kernel) for everything else. Only the
differentiation is backend specific; the rest is `keras.ops`.

Matrix-free method (`method="lanczos"`): Lanczos with full
re-orthogonalisation and a breakdown guard on u -> J_l (J_l^T u), built from
one reverse and one forward product per step. For outputs too wide for the
Gram method; tests hold it to the Gram values.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import keras
import numpy as np
from keras import ops, tree

from keras_mat import _keras_private as kp
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
    if not isinstance(value, (str, type(None))) or value not in allowed:
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
    if isinstance(groups, ModuleGroup):
        groups = [groups]
    if isinstance(groups, (str, bytes)) or not hasattr(groups, "__iter__"):
        raise ValueError(f"`groups` must be a list of ModuleGroup. Received: groups={groups!r}")
    groups = list(groups)
    for g in groups:
        if not isinstance(g, ModuleGroup):
            raise ValueError(f"`groups` entries must be ModuleGroup. Received: groups entry={g!r}")
    if not groups:
        raise ValueError(
            f"Model {model.name!r} has no module to probe: no attention, conv or expert layer "
            "was found (Dense layers are modules with `annotate(model, dense=True)`) and no "
            "ModuleGroup was given. Received: groups=[]"
        )
    # Membership, not `variable.trainable`: a variable whose every module is
    # switched off may be made non-trainable while it is off.
    known = {id(v) for v in model.variables}
    for g in groups:
        for v in g.variables:
            if id(v) not in known:
                raise ValueError(
                    f"ModuleGroup {g.name!r}: variable {v.path!r} is not a variable "
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
        # One loss on several outputs: the sum of the per-output losses, each
        # against its own target (as Keras applies one loss to every output).
        targets = [y] if len(leaves) == 1 else tree.flatten(y)
        total = 0
        for target, o in zip(targets, leaves):
            values = loss_call(target, o)
            if len(values.shape) > 1:
                values = ops.mean(values, axis=tuple(range(1, len(values.shape))))
            total = total + values
        return ops.reshape(total, (-1, 1))
    raise ValueError(f"Unknown ntk_output. Received: ntk_output={mode!r}")


def _check_loss_targets(model, x, y):
    """A model with several outputs and one loss needs one target per output."""
    first = tree.map_structure(lambda t: t[:1], x)
    kwargs = {"training": False} if getattr(model, "_call_has_training_arg", True) else {}
    outputs = len(tree.flatten(model(first, **kwargs)))
    targets = len(tree.flatten(y))
    if outputs > 1 and targets != outputs:
        raise ValueError(
            f"ntk_output='loss' applies the one loss to each of the {outputs} outputs of model "
            f"{model.name!r}, so `y` must hold one target per output (a list or dict like the "
            f"outputs), or use ntk_output='sum' or 'logits'. Received: y with {targets} array(s)"
        )


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


#: Matrices up to this size get `top_eigenvalues_numpy`'s power run and dense
#: solve (no Lanczos run).
DENSE_EIGH_MAX = 48


def _eigvalsh64(matrices):
    """Ascending eigenvalues in float64; LAPACK's divide-and-conquer can fail
    to converge, then the singular values (equal for a PSD matrix) are used."""
    try:
        return np.linalg.eigvalsh(matrices)
    except np.linalg.LinAlgError:
        return np.sort(np.linalg.svd(matrices, compute_uv=False), axis=-1)


def _lanczos_batched(g, steps, rng, scale):
    """Top Ritz pair of every matrix of a symmetric `(B, m, m)` stack after
    `steps` Lanczos steps (full re-orthogonalisation, one start vector for
    all); a step whose next vector vanishes against the matrix's `scale`
    (an invariant subspace) adds zeros."""
    count, m = g.shape[0], g.shape[-1]
    k = min(steps, m)
    basis = np.zeros((count, k, m))
    alphas, betas = np.zeros((count, k)), np.zeros((count, k))
    v = rng.standard_normal(m)
    basis[:, 0] = v / np.linalg.norm(v)
    for j in range(k):
        w = np.einsum("bij,bj->bi", g, basis[:, j])
        alphas[:, j] = np.einsum("bm,bm->b", basis[:, j], w)
        done = basis[:, : j + 1]
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            w = w - np.einsum("bj,bjm->bm", np.einsum("bm,bjm->bj", w, done), done)
        if j + 1 == k:
            break
        b = np.linalg.norm(w, axis=1)
        alive = b > 1e-12 * scale
        betas[:, j] = np.where(alive, b, 0.0)
        basis[:, j + 1] = np.where(alive[:, None], w / np.where(alive, b, 1.0)[:, None], 0.0)
    t = np.zeros((count, k, k))
    idx = np.arange(k)
    t[:, idx, idx] = alphas
    t[:, idx[:-1], idx[1:]] = betas[:, : k - 1]
    t[:, idx[1:], idx[:-1]] = betas[:, : k - 1]
    theta, vecs = np.linalg.eigh(t)
    ritz = np.einsum("bj,bjm->bm", vecs[:, :, -1], basis)
    return theta[:, -1], ritz


def _dense_top(g, scale):
    # Symmetrized and scaled to order one, for LAPACK.
    g = (g + np.swapaxes(g, 1, 2)) * (0.5 / scale[:, None, None])
    return _eigvalsh64(g)[:, -1] * scale


#: Lanczos steps of the first run of `top_eigenvalues_numpy`, then of the
#: run for the matrices whose first Ritz pair was not accepted.
LANCZOS_STEPS = (6, 24)


#: Bytes of float64 matrices per task when `top_eigenvalues_numpy` spreads
#: its Lanczos runs over threads (measured best on 448 VGG "logits" Grams of
#: 160x160, two cores: about 60 matrices a task).
EIG_TASK_BYTES = 12 << 20
_EIG_POOL = None
_EIG_POOL_LOCK = threading.Lock()


def _eig_workers():
    # The cores this process may run on (a `taskset` is respected), at most 4.
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


def _eig_map(fn, items):
    """`map(fn, items)` on a small thread pool shared by the process (numpy
    releases the GIL in its batched products), in order; in the calling
    thread when there is one item or one core."""
    global _EIG_POOL
    workers = _eig_workers()
    if len(items) < 2 or workers < 2:
        return [fn(item) for item in items]
    with _EIG_POOL_LOCK:
        # (A forked child inherits the pool object but not its threads.)
        if _EIG_POOL is None or _EIG_POOL[0] != os.getpid():
            pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="keras_mat-eig")
            _EIG_POOL = (os.getpid(), pool)
        pool = _EIG_POOL[1]
    return list(pool.map(fn, items))


#: Squarings of the power run that `top_eigenvalues_numpy` gives small
#: matrices before their dense solve: the run iterates with G^(2^k).
POWER_SQUARINGS = 6


def _power_top(g, scale, tol):
    """`(theta, accepted)` for a symmetric `(B, m, m)` float64 stack: the
    Rayleigh quotient of the vector G^p x (p = 2^POWER_SQUARINGS, one start
    vector x for all), accepted where its residual `|G v - theta v|` is at
    most `tol * scale`, the test the Lanczos runs use, and positive (an
    indefinite matrix can lead the run to its most negative eigenvalue;
    it is left to the dense solve). The powers are formed
    by squaring G / trace(G), whose eigenvalues lie in [0, 1] with the
    largest at least 1/m (no overflow, and no underflow of the top one for
    m <= 48); a matrix whose trace is not positive is not accepted."""
    trace = np.trace(g, axis1=1, axis2=2)
    positive = trace > 0
    p = g / np.where(positive, trace, 1.0)[:, None, None]
    for _ in range(POWER_SQUARINGS):
        p = p @ p
    v = p @ np.random.default_rng(0).standard_normal(g.shape[-1])
    norm = np.linalg.norm(v, axis=1)
    v = v / np.where(norm > 0, norm, 1.0)[:, None]
    gv = np.einsum("bij,bj->bi", g, v)
    theta = np.einsum("bi,bi->b", v, gv)
    residual = np.linalg.norm(gv - theta[:, None] * v, axis=1)
    accepted = positive & (norm > 0) & (theta > 0) & (residual <= tol * scale)
    return theta, accepted


def _small_top(g, scale, tol=1e-6):
    """Top eigenvalues of a stack of small matrices: 0 for zero matrices, a
    power run (`_power_top`) for the others, and a dense solve for the
    matrices it leaves."""
    g = 0.5 * (g + np.swapaxes(g, 1, 2))
    top = np.zeros((g.shape[0],))
    todo = np.flatnonzero(np.any(g != 0, axis=(1, 2)))
    if todo.size:
        theta, accepted = _power_top(g[todo], scale[todo], tol)
        top[todo[accepted]] = theta[accepted]
        todo = todo[~accepted]
    if todo.size:
        top[todo] = _dense_top(g[todo], scale[todo])
    return top


#: Fewest small matrices a thread of `top_eigenvalues_numpy`'s solve of
#: small matrices takes. Measured on two cores, 16x16 Grams: 288 in 3.2 ms
#: on one thread, 2.3 ms on two; 448 of 32x32: 23.7 against 13.4 ms (dense
#: solves).
DENSE_TASK_MATRICES = 64


def _small_top_split(g, scale, tol=1e-6):
    # `_small_top` of a stack in equal parts on the eigensolve threads (each
    # matrix solved on its own: the same values).
    parts = min(_eig_workers(), g.shape[0] // DENSE_TASK_MATRICES)
    if parts < 2:
        return _small_top(g, scale, tol)
    bounds = np.linspace(0, g.shape[0], parts + 1).astype(int)
    spans = list(zip(bounds[:-1], bounds[1:]))
    return np.concatenate(
        _eig_map(lambda span: _small_top(g[span[0] : span[1]], scale[span[0] : span[1]], tol), spans)
    )


def _scale_of(g):
    scale = np.max(np.abs(np.diagonal(g, axis1=1, axis2=2)), axis=1)
    return np.where(scale > 0, scale, 1.0)


def _lanczos_part(grams, steps, tol):
    """The Lanczos runs of `top_eigenvalues_numpy` on a part of the stack:
    `(result, todo, g[todo], scale[todo])`, with `result` NaN at the
    non-finite matrices and at the indices `todo` whose Ritz pair was never
    accepted."""
    g = np.array(grams, dtype=np.float64)
    # (A float64 sum of float32 or float64 entries is finite exactly when
    # every entry is, short of float64 overflow.)
    finite = np.isfinite(g.sum(axis=(1, 2)))
    if not finite.all():
        g = np.where(finite[:, None, None], g, 0.0)
    scale = _scale_of(g)
    m = g.shape[-1]
    result = np.full((g.shape[0],), np.nan)
    todo = np.flatnonzero(finite)
    # The same start vectors for every part: the result does not depend on
    # how the stack was split.
    rng = np.random.default_rng(0)
    for k in steps if todo.size else ():
        gs = g if todo.size == g.shape[0] else g[todo]
        theta, ritz = _lanczos_batched(gs, k, rng, scale[todo])
        residual = np.linalg.norm(np.einsum("bij,bj->bi", gs, ritz) - theta[:, None] * ritz, axis=1)
        done = residual <= tol * scale[todo]
        result[todo[done]] = theta[done]
        todo = todo[~done]
        if not todo.size or k >= m:
            break
    return result, todo, g[todo], scale[todo]


def top_eigenvalues_numpy(grams, steps=LANCZOS_STEPS, tol=1e-6):
    """Largest eigenvalue of each symmetric PSD matrix of a `(B, m, m)` numpy
    stack, in float64.

    Small matrices (up to `DENSE_EIGH_MAX` rows) are 0 where they are zero;
    the others get a power run (`_power_top`: the vector G^64 x, formed by
    squaring), whose Rayleigh quotient is accepted under the residual test
    below, and a dense eigensolver takes what it leaves. Larger ones get a batched
    Lanczos run (`steps[0]` steps, full re-orthogonalisation); its top Ritz
    pair is accepted when its residual `|G v - theta v|` is at most
    `tol * max_i |G_ii|` (for a PSD matrix no entry is larger than the
    largest diagonal one, and that is at most `lambda_max`, so the eigenvalue
    is then right to `tol` relative). The others get a run of `steps[1]`
    steps, and what is still left is solved densely. Non-finite matrices give
    NaN. A large stack runs its Lanczos steps in parts of about
    `EIG_TASK_BYTES` on a few threads; every matrix is solved on its own, so
    the values do not depend on the split.

    A matrix that is symmetric only up to rounding is solved as its
    symmetric part: the Rayleigh quotients Lanczos takes do not see the
    antisymmetric part, and the residual test bounds what it adds.

    A large stack of small matrices is solved in parts on the same threads
    (`DENSE_TASK_MATRICES` or more a part), with the same values.

    Returns:
        A float64 array `(B,)`.
    """
    grams = np.asarray(grams)
    count, m = grams.shape[0], grams.shape[-1]
    top = np.full((count,), np.nan)
    if m <= DENSE_EIGH_MAX:
        if grams.dtype.itemsize <= 4:
            # (A float64 sum of float32 entries cannot overflow.)
            finite = np.isfinite(grams.sum(axis=(1, 2), dtype=np.float64))
        else:
            finite = np.all(np.isfinite(grams), axis=(1, 2))
        if finite.any():
            g = np.array(grams if finite.all() else grams[finite], dtype=np.float64)
            top[finite] = _small_top_split(g, _scale_of(g), tol)
        return top
    # Larger matrices: each part checks its own for finiteness, on the threads.
    per = max(1, EIG_TASK_BYTES // (m * m * 8))
    starts = list(range(0, count, per))
    parts = _eig_map(lambda start: _lanczos_part(grams[start : start + per], steps, tol), starts)
    result = np.concatenate([p[0] for p in parts])
    left = np.concatenate([p[1] + start for p, start in zip(parts, starts)])
    if left.size:
        # One dense solve for what Lanczos left, in this thread (LAPACK may
        # use threads of its own).
        result[left] = _dense_top(
            np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])
        )
    return result


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


def _check_max_probe_bytes(value):
    if value is None:
        return DEFAULT_MAX_PROBE_BYTES
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"`max_probe_bytes` must be a positive int (a number of bytes). Received: max_probe_bytes={value!r}"
        )
    return int(value)


def _unique_variables(model):
    out, seen = [], set()
    for v in model.variables:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def _forward(model, x):
    # Inference-mode call, inside the caller's StatelessScope; `training=False`
    # only if `call` takes it (subclassed models may not), as Keras's trainers do.
    if getattr(model, "_call_has_training_arg", True):
        return model.call(x, training=False)
    return model.call(x)


def _conv_variables(model):
    """ids of the variables of the model's convolution layers."""
    kinds = (kp.BaseConv, kp.BaseConvTranspose, kp.BaseDepthwiseConv, kp.BaseSeparableConv)
    return {
        id(v)
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, kinds)
        for v in layer.weights
    }


ROUTES = ("auto", "factored", "generic")


class Probe:
    """A reusable lambda_max measurement for one model and one configuration.

    Two routes, in one probe:

    - factored (see `ntk_layers.py`): the grouped Dense, EinsumDense and
      convolution layers that are nodes of a Functional graph get their
      per-sample weight gradients from their inputs and the gradients at
      their outputs, from one batched forward pass and one batched backward
      pass per output row;
    - generic: every other probed variable gets per-sample Jacobians from a
      vectorized per-sample `jacrev` (the backend kernel), in passes of at
      most `max_probe_bytes`.

    With `route="auto"`, Dense and EinsumDense layers take the factored route
    only when no variable is left for the generic one (the generic pass
    yields them at little extra cost); convolutions always do.

    The probe holds the list of the model's variables taken when it is built
    and reads their values on every call (never cached: JAX donates
    buffers); it does not depend on `variable.trainable`. Its compiled
    functions (`jax.jit`, `tf.function`) are cached per input signature.

    Attributes:
        rows_per_sample: Rows of the NTK per probe sample (k for "logits", 1
            otherwise).
    """

    def __init__(
        self,
        model,
        groups,
        ntk_output,
        loss=None,
        max_probe_bytes=None,
        rows_per_sample=None,
        route="auto",
    ):
        from keras_mat import ntk_layers

        _check_option("route", route, ROUTES)
        self.model = model
        self.groups = list(groups)
        self.mode = ntk_output
        self.loss_call = _resolve_loss(model, loss) if ntk_output == "loss" else None
        self.max_probe_bytes = _check_max_probe_bytes(max_probe_bytes)
        self.rows_per_sample = int(rows_per_sample or 1)
        self.variables = _unique_variables(model)
        index = {id(v): i for i, v in enumerate(self.variables)}
        self.family_of, self.var_entries = {}, {}
        for f, g in enumerate(self.groups):
            for v, axis in zip(g.variables, g.axes):
                if id(v) not in index:
                    raise ValueError(
                        f"ModuleGroup {g.name!r}: variable {v.path!r} is not a variable of "
                        f"model {model.name!r}. Received: variable={v.path!r}"
                    )
                self.family_of[id(v)] = f
                self.var_entries[id(v)] = (axis, g.num_modules)
        wanted = set(self.var_entries)
        plan = None
        if route != "generic":
            plan = ntk_layers.GraphPlan(model, wanted)
            if route == "auto" and wanted - plan.variables:
                plan = ntk_layers.GraphPlan(model, wanted, kinds=ntk_layers.CONV_KINDS)
        self.plan = plan if plan else None
        factored = self.plan.variables if self.plan else set()
        # (variable index, family, axis, G) of every generically probed variable, model order.
        self.entries = sorted(
            (index[vid], self.family_of[vid], axis, g)
            for vid, (axis, g) in self.var_entries.items()
            if vid not in factored
        )
        self._kernels = {}
        # Shorter compiles, slower runs (see `backends.compile_probe`): for a
        # fit that measures only a few times (`MATCallback` decides).
        self.fast_compile = False
        # Convolution variables on the generic route: TF runs that pass as a
        # graph (XLA makes per-sample convolution gradients 10-40x slower), and
        # JAX does not split its samples over devices (see backends/jax.py).
        conv = _conv_variables(model)
        self._generic_conv = any(id(self.variables[e[0]]) in conv for e in self.entries)
        self._xla = not self._generic_conv
        # torch.func.vmap does not batch Keras's torch convolution (its
        # channels-last copy); the per-sample pass then runs the graph with
        # every known convolution as patches times kernel.
        self._vmap_plan = None
        if self.entries and conv and backends.name() == "torch":
            plan = ntk_layers.GraphPlan(model, conv, kinds=ntk_layers.CONV_KINDS, patches=True)
            self._vmap_plan = plan if plan else None

    # Kept for the training integration's cost accounting.
    @property
    def _rows_per_sample(self):
        return self.rows_per_sample

    @property
    def route(self):
        """`"factored"`, `"generic"` or `"mixed"`: which routes this probe runs."""
        if self.plan and self.entries:
            return "mixed"
        return "factored" if self.plan else "generic"

    # ------------------------------------------------------------------ generic route

    def _single_fn(self, probe_pos, values):
        model, mode, loss_call, variables = self.model, self.mode, self.loss_call, self.variables
        plan = self._vmap_plan

        def fn(probe_values, xi, yi):
            vals = list(values)
            for pos, val in zip(probe_pos, probe_values):
                vals[pos] = val
            xb = tree.map_structure(lambda t: ops.expand_dims(t, 0), xi)
            yb = tree.map_structure(lambda t: ops.expand_dims(t, 0), yi)
            with keras.StatelessScope(state_mapping=list(zip(variables, vals))):
                if plan is None:
                    out = _forward(model, xb)
                else:
                    out = plan.run(xb, lambda key, z: z, {})
            return ops.reshape(scalarize(out, yb, mode, loss_call), (-1,))

        return fn

    def _chunk_plan(self, n):
        if not self.entries:
            return []
        rows = n * self.rows_per_sample
        sizes = [int(np.prod(self.variables[e[0]].shape)) for e in self.entries]
        itemsize = 4 if "64" not in str(self.variables[self.entries[0][0]].dtype) else 8
        return _chunks(sizes, rows, itemsize, self.max_probe_bytes)

    def _generic_fn(self, chunk):
        entries = [self.entries[i] for i in chunk]
        probe_pos = [e[0] for e in entries]
        fams = sorted({e[1] for e in entries})
        kernel = backends.get()
        split = not self._generic_conv

        def run(values, x, y):
            fn = self._single_fn(probe_pos, values)
            probe_values = [values[p] for p in probe_pos]
            jacs = kernel.per_sample_jacobians(
                fn, probe_values, x, y, key=(id(self), tuple(chunk)), split=split
            )
            grams = {}
            for (_, fam, axis, g), jac in zip(entries, jacs):
                jac = ops.reshape(jac, (-1,) + tuple(jac.shape[2:]))
                if jac.dtype not in ("float32", "float64"):
                    jac = ops.cast(jac, "float32")
                c = module_gram(jac, axis, g)
                grams[fam] = c if fam not in grams else grams[fam] + c
            return [grams[f] for f in fams]

        return fams, run

    # ----------------------------------------------------------------- factored route

    def _factored_fn(self, split):
        kernel = backends.get()
        plan, rows, mode, loss_call = self.plan, self.rows_per_sample, self.mode, self.loss_call
        fast = self.fast_compile
        entries = {vid: self.var_entries[vid] for vid in plan.variables}
        fams = sorted({self.family_of[vid] for vid in plan.variables})

        def products(captures, grads):
            return plan.variable_grams(
                captures, grads, rows, entries, module_gram, self.max_probe_bytes, fast=fast
            )

        if split:  # (TensorFlow: the products alone under XLA, see `split_factored`.)
            products = kernel.compile_probe(products, xla=True, fast=fast)

        def factored_pass(values, x, y):
            x, y = kernel.split_samples((x, y))
            with keras.StatelessScope(state_mapping=list(zip(self.variables, values))):

                def forward(hook):
                    captures = {}
                    out = plan.run(x, hook, captures)
                    return scalarize(out, y, mode, loss_call), captures

                captures, grads = kernel.output_gradients(forward, rows, fast=fast)
                parts = products(captures, grads)
            grams = {}
            for vid, c in parts.items():
                fam = self.family_of[vid]
                grams[fam] = c if fam not in grams else grams[fam] + c
            return [grams[f] for f in fams]

        return fams, factored_pass

    # ------------------------------------------------------------------------ running

    def _passes(self, n, compiled):
        """`[(families, fn(values, x, y) -> list of Grams)]` for a batch of n."""
        out = []
        if self.plan:
            split = compiled and backends.get().split_factored(self.fast_compile)
            key = ("factored", compiled, self.fast_compile, split)
            if key not in self._kernels:
                fams, fn = self._factored_fn(split)
                self._kernels[key] = (
                    fams,
                    backends.get().compile_probe(fn, xla=not split, fast=self.fast_compile)
                    if compiled
                    else fn,
                )
            out.append(self._kernels[key])
        for chunk in self._chunk_plan(n):
            key = ("generic", tuple(chunk), compiled, self.fast_compile)
            if key not in self._kernels:
                fams, fn = self._generic_fn(chunk)
                self._kernels[key] = (
                    fams,
                    # (TensorFlow's vectorized per-sample pass needs XLA on attention models.)
                    backends.get().compile_probe(
                        fn, xla="required" if self._xla else False, fast=self.fast_compile
                    )
                    if compiled
                    else fn,
                )
            out.append(self._kernels[key])
        return out

    def _grams(self, values, x, y, compiled):
        n = _batch_size(x)
        if y is None:
            y = ops.zeros((n,), dtype="float32")
        grams = [None] * len(self.groups)
        for fams, fn in self._passes(n, compiled):
            for f, part in zip(fams, fn(values, x, y)):
                grams[f] = part if grams[f] is None else grams[f] + part
        return grams

    def _values(self):
        kernel = backends.get()
        return [kernel.snapshot(v) for v in self.variables]

    def grams(self, x, y=None):
        """The modular NTK Grams now: a list of `(G, n*R, n*R)` tensors, one
        per family (R = `rows_per_sample`; rows sample-major)."""
        x = tree.map_structure(ops.convert_to_tensor, x)
        y = None if y is None else tree.map_structure(ops.convert_to_tensor, y)
        return self._grams(self._values(), x, y, compiled=True)

    def __call__(self, x, y=None):
        """Measures lambda_max now from the variables' current values, with
        compiled kernels; returns a list of `(G,)` float32 tensors, one per
        family (NaN where a Gram is not finite)."""
        grams = [np.asarray(ops.convert_to_numpy(g)) for g in self.grams(x, y)]
        sizes = [g.shape[0] for g in grams]
        top = top_eigenvalues_numpy(np.concatenate(grams, axis=0))
        starts = np.cumsum([0] + sizes)
        return [ops.convert_to_tensor(top[a:b].astype(np.float32)) for a, b in zip(starts[:-1], starts[1:])]


#: Probes kept per model (least recently used dropped first).
PROBE_CACHE_SIZE = 8


def _group_key(groups):
    # Families by content (variables, axes, module count), not by object: groups
    # rediscovered on every call find the same probe.
    return tuple((tuple(id(v) for v in g.variables), tuple(g.axes), g.num_modules) for g in groups)


def get_probe(model, groups, ntk_output, loss=None, max_probe_bytes=None, x=None, route="auto"):
    """A cached `Probe` for this model and configuration.

    The cache key holds the families' variables (by identity), axes and module
    counts, the active `keras.distribution` (JAX), the model's variable list, the output mode, the loss in effect
    (`loss`, else the model's compiled loss) and `max_probe_bytes`; at most
    `PROBE_CACHE_SIZE` probes are kept per model.
    """
    max_probe_bytes = _check_max_probe_bytes(max_probe_bytes)
    cache = model.__dict__.setdefault("_keras_mat_probes", {})
    effective_loss = loss if loss is not None else getattr(model, "loss", None)
    rows = output_size(model, x) if (ntk_output == "logits" and x is not None) else 1
    distribution = keras.distribution.distribution() if backends.name() == "jax" else None
    key = (
        _group_key(groups),
        id(distribution),
        tuple(id(v) for v in model.variables),
        ntk_output,
        id(effective_loss) if ntk_output == "loss" else None,
        max_probe_bytes,
        rows,
        route,
    )
    probe = cache.pop(key, None)
    if probe is None:
        probe = Probe(
            model,
            groups,
            ntk_output,
            loss=loss,
            max_probe_bytes=max_probe_bytes,
            rows_per_sample=rows,
            route=route,
        )
        # The probe holds the loss object, so its id stays unique while cached.
    cache[key] = probe
    while len(cache) > PROBE_CACHE_SIZE:
        cache.pop(next(iter(cache)))
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
        The largest Ritz value, a float (NaN when the operator gives a
        non-finite product).
    """
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(dim)
    v /= np.linalg.norm(v)
    basis, alphas, betas = [v], [], []
    for _ in range(min(steps, dim)):
        w = matvec(basis[-1])
        if not np.all(np.isfinite(w)):
            return float("nan")  # reported by the caller as a non-finite lambda_max
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
    variables = _unique_variables(model)
    index = {id(v): i for i, v in enumerate(variables)}
    values = [kernel.snapshot(v) for v in variables]
    results = []
    for g in groups:
        pos = [index[id(v)] for v in g.variables]

        def fn(vals, pos=pos):
            full = list(values)
            for p, val in zip(pos, vals):
                full[p] = val
            with keras.StatelessScope(state_mapping=list(zip(variables, full))):
                out = _forward(model, x)
            return ops.reshape(scalarize(out, y, mode, loss_call), (-1,))

        vals = [values[p] for p in pos]
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
    >>> _ = keras_mat.annotate(model, dense=True)  # the Dense layer as one module
    >>> lam = module_lambda_max(model, np.ones((8, 4), "float32"))
    >>> [v.shape for v in lam.values()]
    [(1,)]
    """
    _check_option("method", method, METHODS)
    if not isinstance(lanczos_steps, int) or lanczos_steps < 1:
        raise ValueError(f"`lanczos_steps` must be a positive int. Received: lanczos_steps={lanczos_steps!r}")
    groups, mode = _prepare(model, x, y, groups, ntk_output, "module_lambda_max")
    if method == "lanczos":
        loss_call = _resolve_loss(model, loss) if mode == "loss" else None
        lams = _lanczos(model, groups, x, y, mode, loss_call, lanczos_steps)
    else:
        probe = get_probe(model, groups, mode, loss=loss, max_probe_bytes=max_probe_bytes, x=x)
        lams = probe(x, y)
    out = {}
    for g, lam in zip(groups, lams):
        arr = np.asarray(ops.convert_to_numpy(lam), dtype=np.float64)
        _check_finite(g, arr, "lambda_max")
        out[g.name] = np.maximum(arr, 0.0)
    return out


def _prepare(model, x, y, groups, ntk_output, caller):
    _check_option("ntk_output", ntk_output, NTK_OUTPUTS)
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"`model` must be a Keras model. Received: model={model!r}")
    if not model.built:
        raise ValueError(f"{caller} needs a built model. Received: model={model.name!r} (not built)")
    _batch_size(x)
    _check_input_shapes(model, x)
    groups = resolve_groups(model, groups)
    mode = resolve_ntk_output(model, x, ntk_output)
    if y is not None and mode == "loss":
        n, m = _batch_size(x), _batch_size(y, "y")
        if n != m:
            raise ValueError(
                f"`y` must hold one target per probe sample ({n}). Received: y of batch size {m}"
            )
    if mode == "loss":
        if y is None:
            raise ValueError("ntk_output='loss' needs targets `y`. Received: y=None")
        _check_loss_targets(model, x, y)
    return groups, mode


def _check_finite(group, values, what):
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"Non-finite {what} for module family {group.name!r} (the model's outputs or "
            f"gradients overflowed on this probe batch). Received: {what}={np.asarray(values).tolist()}"
        )


def gram_spectrum(gram):
    """Every eigenvalue of a stack of float64 Gram matrices `(G, m, m)`,
    descending and clipped at 0 (symmetrized first, solved in full)."""
    return np.maximum(_eigvalsh64(0.5 * (gram + np.swapaxes(gram, 1, 2)))[:, ::-1], 0.0)


def effective_rank(eigenvalues):
    """Participation ratio `(sum l)^2 / sum l^2` of non-negative eigenvalues
    along the last axis: between 1 (one direction) and the number of nonzero
    eigenvalues (all equal); 0 for an all-zero spectrum."""
    lam = np.maximum(np.asarray(eigenvalues, dtype=np.float64), 0.0)
    total = lam.sum(axis=-1)
    squares = (lam**2).sum(axis=-1)
    return np.where(squares > 0, total**2 / np.where(squares > 0, squares, 1.0), 0.0)


def module_spectrum(
    model, x, y=None, ntk_output="auto", groups=None, top_k=None, loss=None, max_probe_bytes=None
):
    """Eigenvalues and effective rank of every module's modular NTK.

    The same Gram matrices as `module_lambda_max` (same probe, same
    `ntk_output` rows), solved in full in float64.

    Args:
        model: A built Keras model.
        x: The probe batch.
        y: Targets, needed only for `ntk_output="loss"`.
        ntk_output: `"logits"`, `"sum"`, `"loss"` or `"auto"` (see
            `module_lambda_max`).
        groups: Module families; default: those of `keras_mat.annotate`,
            else discovered automatically.
        top_k: Keep the `top_k` largest eigenvalues of each module, or
            `None` for all (n * rows per sample).
        loss: The loss for `ntk_output="loss"` (default: the compiled loss).
        max_probe_bytes: See `module_lambda_max`.

    Returns:
        A dict `family name -> {"eigenvalues": array (num_modules, k),
        "effective_rank": array (num_modules,)}`. Eigenvalues are in
        descending order, clipped at 0. The effective rank is the
        participation ratio `(sum_i l_i)^2 / sum_i l_i^2` over the full
        spectrum (before `top_k`): 1 when one direction carries all of the
        kernel, m when m eigenvalues are equal, 0 for a module with a zero
        kernel.

    Raises:
        ValueError: as `module_lambda_max`, and on a `top_k` that is not a
            positive int.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> _ = keras_mat.annotate(model, dense=True)
    >>> spec = module_spectrum(model, np.ones((8, 4), "float32"), top_k=2)
    >>> [s["eigenvalues"].shape for s in spec.values()]
    [(1, 2)]
    """
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1
    ):
        raise ValueError(f"`top_k` must be None or a positive int. Received: top_k={top_k!r}")
    groups, mode = _prepare(model, x, y, groups, ntk_output, "module_spectrum")
    probe = get_probe(model, groups, mode, loss=loss, max_probe_bytes=max_probe_bytes, x=x)
    out = {}
    for g, gram in zip(groups, probe.grams(x, y)):
        gram = np.asarray(ops.convert_to_numpy(gram), dtype=np.float64)
        _check_finite(g, gram, "modular NTK")
        lam = gram_spectrum(gram)
        out[g.name] = {
            "eigenvalues": lam if top_k is None else lam[:, : int(top_k)],
            "effective_rank": effective_rank(lam),
        }
    return out
