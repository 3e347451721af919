"""JAX kernels: `vmap(jacrev)` per-sample Jacobians under `jax.jit`."""

import functools
import math

import jax
import numpy as np

from keras_mat.backends._stateful import copy_values, restore_masked, state_key  # noqa: F401  (kernel API)


def _batch_axis():
    # (jax mesh, batch axis name, its size) of the active
    # `keras.distribution`, or None when nothing is split over samples.
    import keras

    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    mesh = distribution.device_mesh
    size = dict(zip(mesh.axis_names, mesh.shape)).get(distribution.batch_dim_name, 1)
    return (mesh.backend_mesh, distribution.batch_dim_name, size) if size > 1 else None


def _constrain(t, axis, spec):
    return jax.lax.with_sharding_constraint(t, jax.sharding.NamedSharding(axis[0], spec))


def split_samples(tree):
    """Under `keras.distribution`, constrains every leaf with a leading axis
    the batch axis divides to be split over it (as a training batch is), so
    that each device works on its share of the probe samples."""
    axis = _batch_axis()
    if axis is None:
        return tree
    P = jax.sharding.PartitionSpec

    def split(t):
        if t is None or t.ndim == 0 or t.shape[0] % axis[2]:
            return t
        return _constrain(t, axis, P(axis[1]))

    return jax.tree_util.tree_map(split, tree)


def per_sample_jacobians(fn, probe_values, x, y, key=None, split=True):
    # jacrev over the k outputs of one sample, vmapped over samples: one
    # vectorized reverse pass per output row, no O(n^2) batch Jacobian.
    # `split`: split the samples over the devices of `keras.distribution`.
    # The caller turns it off when the forward pass has a convolution: a
    # vmapped per-sample convolution gradient of sample-split inputs makes
    # XLA's SPMD partitioner emit an invalid slice ("Expected instruction to
    # have shape equal to f32[1,4,3,48], actual shape is f32[1,4,3,192]").
    if split:
        x, y = split_samples((x, y))
    jac = jax.vmap(jax.jacrev(fn), in_axes=(None, 0, 0))(probe_values, x, y)
    return list(jac)


def output_gradients(run, rows, fast=False):
    """Gradients at the perturbation points of a batched forward pass.

    Args:
        run: `run(hook) -> (outputs (n, rows), aux)`; `hook(key, z)` is called
            at every perturbation point and returns the tensor to use.
        rows: Output rows per sample.
        fast: The probe is compiled for a short fit.

    Returns:
        `(aux, {key: (rows, *z.shape)})`: for each row j, the gradient of
        `outputs[:, j].sum()` at every point; one reverse pass per row,
        unrolled (vmapped where `fast`).
    """
    shapes = {}

    def record(key, z):
        shapes[key] = jax.ShapeDtypeStruct(z.shape, z.dtype)
        return z

    jax.eval_shape(lambda: run(record)[0])

    def f(perturbations):
        return run(lambda key, z: z + perturbations[key])

    zeros = {k: jax.numpy.zeros(s.shape, s.dtype) for k, s in shapes.items()}
    out, pullback, aux = jax.vjp(f, zeros, has_aux=True)
    if rows == 1:
        # One row: the pullback itself. Its vmap would add a batching pass
        # over the backward pass to every first call (a small transformer's
        # "sum" probe: 0.69 against 0.73 s to trace, compile and run).
        (grads,) = pullback(jax.numpy.ones_like(out))
        return aux, jax.tree_util.tree_map(lambda g: g[None], grads)
    eye = jax.numpy.eye(rows, dtype=out.dtype)
    if fast:
        # One vmapped pass compiles faster (a small VGG's ten rows: 3.2
        # against 4.0 s for the whole probe's first call).
        cotangents = jax.numpy.broadcast_to(eye[:, None, :], (rows,) + tuple(out.shape))
        (grads,) = jax.vmap(pullback)(cotangents)
        return aux, grads
    # One pass per row runs faster than their vmap, which XLA lays out
    # worse: a small VGG's "logits" probe (ten rows, n=16) 575 against
    # 674 ms, a residual CNN's 229 against 308 ms; the same values.
    per_row = [pullback(jax.numpy.broadcast_to(eye[j], out.shape))[0] for j in range(rows)]
    return aux, jax.tree_util.tree_map(lambda *g: jax.numpy.stack(g), *per_row)


#: One row per sample: a convolution whose stacked per-sample gradients hold
#: at least this many values forms its per-filter Grams as a sum of per-tap
#: Grams (each tap's part stays in cache). Measured, n=16, 3x3 layers, Gram
#: included, per-tap Grams against tap by tap: 8x8 map of 128 to 128
#: channels (2.4M values) 7.8 against 10.5 ms, 4x4 of 192 (5.3M) 14.1
#: against 31.7 ms, 16x16 of 96 (1.3M) 9.0 against 13.2 ms; below, 8x8 of
#: 64 to 128 (1.2M) 4.1 against 3.9 ms, 16x16 of 64 (0.6M) 6.9 against
#: 5.1 ms.
TAP_GRAMS_MIN_VALUES = 1_250_000


def conv_gram_route(positions, rows, values):
    # Otherwise tap by tap: XLA fuses the stacked patches into the
    # contraction badly (measured on every layer of a small VGG, n=16: 28 ms
    # for the six layers tap by tap against 35 ms from patches with one row
    # per sample). With ten rows per sample the taps are fastest on every
    # layer of that VGG (its 8x8 layer of 128 channels: 186 ms against 236 ms
    # as per-tap Grams).
    del positions
    return "tap_grams" if rows == 1 and values >= TAP_GRAMS_MIN_VALUES else "taps"


# Per-sample convolution weight gradients as one batch-1 gradient
# convolution per sample, unrolled in the probe: XLA runs each on its
# convolution kernel, near the rate of the batch weight gradient, where the
# taps run as small batched products. Measured with one row per sample,
# n=16: one 3x3 layer of 32 to 32 channels on a 32x32 map, Gram included,
# 3.5-4 ms against 6.2 ms tap by tap; the small residual CNN's whole "sum"
# probe 44 -> 26 ms (its three layers on 32x32 maps). On 16x16 maps and
# smaller the taps are as fast or faster. Each unrolled convolution adds
# about 20 ms of compile time (0.65 s for that CNN at n=16), so a probe
# compiled for a short fit keeps the taps, and so does a probe with several
# rows per sample (n*R convolutions).
_SAMPLE_CONV_POSITIONS = 1024
_SAMPLE_CONV_MAX = 32


def conv_sample_grads(a, d, kernel_shape, strides, padding, dilation, fast):
    """Per-sample weight gradients `(n, *kernel_shape)` of a channels-last
    convolution (one group) from its input `a (n, *spatial, Cin)` and output
    gradient `d (1, n, *out_spatial, C)`, or `None` where the taps are faster."""
    rows, n = d.shape[0], d.shape[1]
    positions = math.prod(d.shape[2:-1])
    if fast or rows != 1 or n > _SAMPLE_CONV_MAX or positions < _SAMPLE_CONV_POSITIONS:
        return None
    rank = len(kernel_shape) - 2
    spec = "DHW"[3 - rank :]
    numbers = ("N" + spec + "C", spec + "IO", "N" + spec + "C")
    lax = jax.lax

    def conv(sample):
        return lambda w: lax.conv_general_dilated(
            sample,
            w,
            tuple(strides),
            padding.upper(),
            rhs_dilation=tuple(dilation),
            dimension_numbers=numbers,
        )

    spec_w = jax.ShapeDtypeStruct(tuple(kernel_shape), a.dtype)
    grads = []
    for i in range(n):
        (g,) = jax.linear_transpose(conv(a[i : i + 1]), spec_w)(d[0, i : i + 1].astype(a.dtype))
        grads.append(g)
    return jax.numpy.stack(grads)


def snapshot(variable):
    return variable.value


def gram_operand(flat):
    """The `(rows, G, p)` Jacobian block of a Gram contraction.

    Under `keras.distribution` it is split over the parameters `p` along the
    batch axis: each device contracts its slice and the partial Grams are
    summed across devices (an all-reduce of `(G, rows, rows)`). Left to
    itself XLA all-gathers the row-split Jacobian onto every device instead
    (the whole `rows x p` block per device).
    """
    axis = _batch_axis()
    if axis is None or flat.shape[-1] % axis[2]:
        return flat
    P = jax.sharding.PartitionSpec
    return _constrain(flat, axis, P(None, P.UNCONSTRAINED, axis[1]))


# XLA options for probes on CPU.
# - Always: XLA's loop emitters rather than its fusion emitters. Measured on
#   a probe of every filter of a small VGG (n=16): "logits" runs 26 % faster
#   and compiles 25 % faster, "sum" runs as fast; BERT heads run as fast.
# - For a fit that measures only a few times (`fast`): no LLVM optimization
#   either. A probe of two convolutions and an attention layer then compiles
#   in 0.8 s instead of 3.2 s and runs in 37 ms instead of 12 ms.
# Options this jaxlib does not know are left out.
_PROBE_COMPILE = {"xla_cpu_use_fusion_emitters": False}
_FAST_COMPILE = {
    **_PROBE_COMPILE,
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    # One LLVM module, compiled on the calling thread: a small transformer's
    # probe compiled in 0.21-0.24 s instead of 0.30 s (5 fresh probes each),
    # and a first measurement, which compiles in the background while the
    # train step compiles, leaves the other core to it.
    "xla_cpu_parallel_codegen_split_count": 1,
}


def _compiles_with(options):
    try:
        jax.jit(lambda t: t + 1, compiler_options=options).lower(np.float32(0)).compile()
    except Exception:  # an option this jaxlib does not have
        return False
    return True


@functools.cache
def _known_options(fast):
    options = _FAST_COMPILE if fast else _PROBE_COMPILE
    if _compiles_with(options):  # one test compile when the jaxlib knows them all
        return dict(options)
    return {name: value for name, value in options.items() if _compiles_with({name: value})}


def compile_probe(fn, xla=True, fast=False):
    del xla
    if jax.default_backend() == "cpu":
        return jax.jit(fn, compiler_options=_known_options(bool(fast)))
    return jax.jit(fn)


def vjp(fn, values):
    out, pullback = jax.vjp(fn, values)
    return out, lambda u: pullback(u)[0]


def jvp(fn, values, tangents):
    return jax.jvp(fn, (values,), (tangents,))[1]


def scalar_grad(fn, values):
    return jax.grad(fn)(values)


def to_numpy(x):
    import numpy as np

    return np.asarray(x)


def split_factored(fast):
    # One compiled function for the whole probe.
    del fast
    return False


#: Per-filter Grams are formed a whole layer at once: XLA takes every
#: temporary of a probe from one fresh allocation per call whatever the
#: split (A/B on a small VGG's "logits" probe, n=16: equal run time, longer
#: compiles in chunks).
GRAM_CHUNK_BYTES = None

#: The identity's contractions run at about half the rate of the batched Gram
#: products (10 rows per sample, n=16, a 3x3 layer of 128 to 128 channels on
#: an 8x8 map, where the identity needs 0.52x the multiply-adds: 168 against
#: 150 ms tap by tap).
IDENTITY_COST_FACTOR = 2.0


# Keras's JAX optimizers assign through the StatelessScope (the trainer's only path).
ASSIGNS_IN_STATELESS_SCOPE = True
