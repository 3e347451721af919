"""TensorFlow kernels: `tf.vectorized_map` over a per-sample `GradientTape`.

Why not `tape.jacobian` of the batch: it costs O(n^2) (11-17x a train step
at n=32, backend-notes section 5). `vectorized_map` without XLA crashes on
attention models while oneDNN is on, so `ntk.py` asks for XLA except on
pure convolution models, where XLA makes per-sample conv gradients 10-40x
slower and graph mode is both safe and fast.
"""

import tensorflow as tf

from keras_mat.backends._stateful import copy_values, restore_masked, state_key  # noqa: F401  (kernel API)


def _rows(fn, probe_values, xi, yi):
    with tf.GradientTape(persistent=True) as tape:
        # A per-iteration copy: inside `vectorized_map` the tape does not
        # connect gradients to loop-invariant captured tensors (all zeros).
        local = [tf.identity(v) for v in probe_values]
        tape.watch(local)
        # Rows are sliced inside the tape: a slice taken after it is unrecorded.
        outs = tf.unstack(fn(local, xi, yi))
    rows = [tape.gradient(o, local, unconnected_gradients=tf.UnconnectedGradients.ZERO) for o in outs]
    return [tf.stack([r[i] for r in rows]) for i in range(len(probe_values))]


def split_samples(tree):
    return tree


def per_sample_jacobians(fn, probe_values, x, y, key=None, split=True):
    probe_values = [tf.convert_to_tensor(v) for v in probe_values]
    return tf.vectorized_map(
        lambda args: _rows(fn, probe_values, args[0], args[1]), (x, y), fallback_to_while_loop=True
    )


def output_gradients(run, rows, fast=False):
    """Gradients at the perturbation points of a batched forward pass (see
    the JAX kernel): one `GradientTape`, one `gradient` call per row.
    (`tape.jacobian` of the rows, vectorized by pfor, took 150 against 99 ms
    for a small VGG's ten rows, n=16.)"""
    del fast
    perturbations = {}
    with tf.GradientTape(persistent=rows > 1) as tape:

        def hook(key, z):
            p = tf.zeros_like(z)
            tape.watch(p)
            perturbations[key] = p
            return z + p

        out, aux = run(hook)
        # Rows are summed inside the tape: an op taken after it is unrecorded.
        columns = [tf.reduce_sum(out[:, j]) for j in range(rows)]
    keys = list(perturbations)
    sources = [perturbations[k] for k in keys]
    per_row = [tape.gradient(c, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO) for c in columns]
    return aux, {k: tf.stack([g[i] for g in per_row]) for i, k in enumerate(keys)}


def conv_gram_route(positions, rows, values):
    # Measured under XLA on single 3x3 layers, n=16. One row per sample: the
    # summed per-tap Grams take 4.3-5.7 ms against 8.6-10.5 ms from the
    # stacked patches on a 32x32 map of 32 channels, 4.1-5.6 against
    # 7.5-10.2 ms on 16x16 of 64, 5.0-6.7 against 7.4-9.7 ms on 8x8 of 128.
    # Ten rows per sample (the Gram products dominate): the stacked patches
    # are faster on 32x32 and 16x16 maps (a small VGG's four layers: 79
    # against 130 ms tap by tap), the taps on 8x8 maps (169 against 247 ms).
    del values
    if rows == 1:
        return "tap_grams"
    return "patches" if positions >= 256 else "taps"


def snapshot(variable):
    # A tensor, not the tf.Variable (which a tf.function would capture).
    return tf.convert_to_tensor(variable.value)


def gram_operand(flat):
    return flat


def compile_probe(fn, xla=True, fast=False):
    # `fast` (a fit that measures a few times): a graph without XLA where
    # the pass does not need XLA (`xla=True` rather than "required").
    # Measured on layer-factored probes: a small transformer's compiles in
    # 0.8 s instead of 2.9 s and runs as fast; a VGG's "logits" probe runs
    # 1.5x slower without XLA, which a long fit repays.
    jit_compile = xla == "required" or (bool(xla) and not fast)
    # One trace per input signature (batch size included): a relaxed
    # signature would leave the batch size unknown (None) inside the probe.
    return tf.function(fn, jit_compile=jit_compile, autograph=False)


def vjp(fn, values):
    values = [tf.convert_to_tensor(v) for v in values]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(values)
        out = fn(values)

    def pullback(u):
        return tape.gradient(
            out, values, output_gradients=u, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )

    return out, pullback


def jvp(fn, values, tangents):
    values = [tf.convert_to_tensor(v) for v in values]
    with tf.autodiff.ForwardAccumulator(values, list(tangents)) as acc:
        out = fn(values)
    return acc.jvp(out, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def scalar_grad(fn, values):
    values = [tf.convert_to_tensor(v) for v in values]
    with tf.GradientTape() as tape:
        tape.watch(values)
        out = fn(values)
    return tape.gradient(out, values, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def to_numpy(x):
    return x.numpy()


def conv_sample_grads(a, d, kernel_shape, strides, padding, dilation, fast):
    # The stacked patches stay: per-sample filter-gradient convolutions ran
    # at 14.5 ms under XLA against 5.9 ms from the patches (n=16, 3x3, 32 to
    # 32 channels, 32x32 map), and without XLA they made whole "sum" probes
    # of a small VGG and a residual CNN no faster.
    del a, d, kernel_shape, strides, padding, dilation, fast
    return None


#: Whether a layer-factored probe not compiled for a short fit runs its
#: forward and backward pass as a plain graph (TensorFlow's own convolution
#: kernels, as Keras runs the CPU train step) and only its per-sample
#: products and Grams under XLA. A/B in one process, n=16, 7 rounds: a small
#: VGG's "sum" probe 60.2 against 63.7 ms (compile 2.3 against 3.7 s),
#: "logits" 434 against 452 ms; a residual CNN's "sum" probe within 2 %,
#: "logits" 207 against 217 ms.
SPLIT_FACTORED = True


def split_factored(fast):
    # A probe compiled for a short fit is a plain graph already.
    return SPLIT_FACTORED and not fast


#: Per-filter Grams are formed a whole layer at once: TensorFlow's allocator
#: keeps its memory, and chunks only lengthened the compile (A/B on a small
#: VGG's "logits" probe, n=16).
GRAM_CHUNK_BYTES = None

#: Under TensorFlow's XLA the identity's contractions run at about 0.6 of the
#: rate of the batched Gram products. Ten rows per sample, n=16, 3x3 layers
#: on an 8x8 map: 128 to 128 channels (the identity needs 0.52x the
#: multiply-adds) 67-91 against 94-115 ms tap by tap; 64 to 128 channels
#: (0.81x) 71 against 65 ms.
IDENTITY_COST_FACTOR = 1.6


# Keras's TensorFlow optimizers write the tf.Variables directly (and refuse
# stateless_apply): no blend at assignment.
ASSIGNS_IN_STATELESS_SCOPE = False
