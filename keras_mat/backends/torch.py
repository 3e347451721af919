"""PyTorch kernels: `torch.func.vmap(torch.func.jacrev(f))` through Keras's
`stateless_call`, with a per-sample autograd loop as the clean fallback.

Why never `torch.func.functional_call`: Keras layers read their own
`Variable` values, so swapping the module's registered parameters silently
gives all-zero gradients (backend-notes section 3). Layers that do not compose
with functorch (`one_hot`'s data-dependent check, Keras's channels-last conv
clone, custom-gradient ops without `setup_context`) raise inside `vmap`; the
loop then computes the same rows one sample at a time.
"""

import contextlib
import warnings

import torch
from keras import tree


def _detached(values):
    return [v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(v) for v in values]


def _math_sdpa():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    except Exception:  # older torch: nothing to select
        return contextlib.nullcontext()


_vmap_failed = set()


def split_samples(tree):
    return tree


def per_sample_jacobians(fn, probe_values, x, y, key=None, split=True):
    probe_values = _detached(probe_values)
    if key in _vmap_failed:
        return per_sample_jacobians_loop(fn, probe_values, x, y)
    try:
        with _math_sdpa():
            jac = torch.func.vmap(torch.func.jacrev(fn), in_dims=(None, 0, 0))(probe_values, x, y)
        return list(jac)
    except (RuntimeError, NotImplementedError, TypeError) as err:
        if key not in _vmap_failed:
            _vmap_failed.add(key)  # warn once, and do not pay for a failing vmap on every probe
            warnings.warn(
                "keras_mat: torch.func.vmap does not compose with a layer of this model "
                f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); computing per-sample "
                "Jacobians with a per-sample autograd loop instead (same values, slower).",
                stacklevel=3,
            )
        return per_sample_jacobians_loop(fn, probe_values, x, y)


def per_sample_jacobians_loop(fn, probe_values, x, y):
    probe_values = [v.detach().requires_grad_(True) for v in _detached(probe_values)]
    n = tree.flatten(x)[0].shape[0]
    per_sample = []
    for i in range(n):
        xi = tree.map_structure(lambda t, i=i: t[i], x)
        yi = tree.map_structure(lambda t, i=i: t[i], y)
        out = fn(probe_values, xi, yi)
        rows = []
        for j in range(out.shape[0]):
            grads = torch.autograd.grad(out[j], probe_values, retain_graph=True, allow_unused=True)
            rows.append([torch.zeros_like(v) if g is None else g for g, v in zip(grads, probe_values)])
        per_sample.append([torch.stack([r[v] for r in rows]) for v in range(len(probe_values))])
    return [torch.stack([p[v] for p in per_sample]).detach() for v in range(len(probe_values))]


def output_gradients(run, rows, fast=False):
    """Gradients at the perturbation points of a batched forward pass (see
    the JAX kernel): one autograd graph, one backward pass per row."""
    del fast
    perturbations = {}

    def hook(key, z):
        p = torch.zeros_like(z, requires_grad=True)
        perturbations[key] = p
        return z + p

    with torch.enable_grad(), _math_sdpa():
        out, aux = run(hook)
    keys = list(perturbations)
    sources = [perturbations[k] for k in keys]
    per_row = []
    for j in range(rows):
        grads = torch.autograd.grad(out[:, j].sum(), sources, retain_graph=j < rows - 1, allow_unused=True)
        per_row.append([torch.zeros_like(s) if g is None else g for g, s in zip(grads, sources)])
    aux = {k: v.detach() for k, v in aux.items()}
    return aux, {k: torch.stack([r[i] for r in per_row]) for i, k in enumerate(keys)}


def conv_gram_route(positions, rows, values):
    # One product of the stacked patches beats one per tap on every layer of
    # a small VGG, n=16 (10 rows per sample: 261 against 450 ms for the six
    # layers; the taps of a 3-channel input cost 8x more). Summed per-tap
    # Grams, one row per sample, one 3x3 layer: 9.1 against 9.3 ms on a
    # 32x32 map of 32 channels, 8.3 against 6.2 ms on 8x8 of 128; not taken.
    del positions, rows, values
    return "patches"


def snapshot(variable):
    return variable.value.detach()


def copy_values(variables):
    """The variables' tensors with real copies of their current values (torch
    optimizers update the tensors in place, and `Variable.assign` copies into
    them, so the same tensors hold the new values afterwards)."""
    with torch.no_grad():
        return [(t, t.clone()) for t in (v.value.detach() for v in variables)]


def state_key(tensors):
    """A key that changes whenever one of these tensors is written, in place
    (its version counter) or replaced (its id; the caller holds the tensors),
    so that an eager step can reuse what it computed from them; None under
    `torch.compile`, which traces the step."""
    if torch.compiler.is_compiling():
        return None
    return tuple((id(t), t._version) for t in tensors)


def restore_masked(variables, conditions, olds):
    """Writes `where(condition, value, old)` into each variable's tensor in
    place, as Keras's own torch optimizers update them (`torch._foreach_*`
    on `variable.value`): raw torch ops, for an eager step pays per op; the
    tensors come from `copy_values` (reading `Variable.value` costs about
    5 us a call)."""
    del variables
    with torch.no_grad():
        for cond, (t, old) in zip(conditions, olds):
            torch.where(cond, t, old, out=t)


def gram_operand(flat):
    return flat


def compile_probe(fn, xla=True, fast=False):
    del xla, fast
    return fn


def vjp(fn, values):
    with _math_sdpa():
        out, pullback = torch.func.vjp(fn, _detached(values))
    return out.detach(), lambda u: [g.detach() for g in pullback(u)[0]]


def jvp(fn, values, tangents):
    with _math_sdpa():
        _, tangent_out = torch.func.jvp(fn, (_detached(values),), (list(tangents),))
    return tangent_out.detach()


def scalar_grad(fn, values):
    values = [v.detach().requires_grad_(True) for v in _detached(values)]
    out = fn(values)
    grads = torch.autograd.grad(out, values, allow_unused=True)
    return [torch.zeros_like(v) if g is None else g for g, v in zip(grads, values)]


def to_numpy(x):
    return x.detach().cpu().numpy()


def conv_sample_grads(a, d, kernel_shape, strides, padding, dilation, fast):
    # The stacked patches stay (one product per layer; PyTorch's "sum"
    # probes are within their target).
    del a, d, kernel_shape, strides, padding, dilation, fast
    return None


def split_factored(fast):
    # Nothing to split: the probe runs eagerly.
    del fast
    return False


#: Per-filter Grams are formed over chunks of filters whose per-sample
#: gradients take at most this many bytes. Eager temporaries larger than
#: the C allocator's mapping threshold (at most 32 MiB) come back as fresh
#: pages, zeroed on first touch, at every call; a small VGG's "logits" probe
#: (n=16) took 66,000 page faults and 534 ms whole, 15,000 and 464 ms in
#: chunks (a residual CNN's: equal).
GRAM_CHUNK_BYTES = 24 << 20

#: The identity's contractions run at about half the rate of the batched Gram
#: products (10 rows per sample, n=16, a 3x3 layer of 128 to 128 channels on
#: an 8x8 map, where the identity needs 0.52x the multiply-adds: 115 against
#: 81 ms from the stacked patches).
IDENTITY_COST_FACTOR = 2.0


# Keras's unfused optimizers assign through the StatelessScope; the fused ones
# (Adam, SGD, ...) update the tensors in place and are not blended at assignment.
ASSIGNS_IN_STATELESS_SCOPE = True
