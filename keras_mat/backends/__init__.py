"""The one place that reads `keras.config.backend()`.

Every backend module exposes the same small set of functions:

- `per_sample_jacobians(fn, probe_values, x, y, key=None, split=True)`: for a pure single-sample
  function `fn(probe_values, x_i, y_i) -> (k,)`, the Jacobian of every sample's
  k outputs with respect to each probed value, as a list of arrays shaped
  `(n, k, *value.shape)`, in one vectorized pass where the backend allows.
- `compile_probe(fn, xla, fast=False)`: wraps a pure function for repeated
  calls (`jax.jit`, `tf.function`, identity on torch; on CPU, JAX compiles
  with XLA's loop emitters); `xla` is True (XLA preferred), `"required"`
  (the pass needs it) or False; `fast` trades run time for a shorter
  compile where the backend allows (JAX on CPU: no LLVM optimization;
  TensorFlow: no XLA unless required).
- `vjp(fn, values)` / `jvp(fn, values, tangents)`: reverse and forward
  products of a batched function, for the matrix-free method.
- `gram_operand(flat)`: the `(rows, G, p)` block of a Gram contraction, laid
  out for it (JAX under `keras.distribution`: split over `p`; else as is).
- `output_gradients(run, rows, fast=False)`: for the layer-factored probe,
  the captured layer inputs and the gradients at the grouped layers'
  outputs, one batched backward pass per output row (`fast`: the probe is
  compiled for a short fit).
- `conv_gram_route(positions, rows, values)`: how the per-filter Grams of a
  convolution with this many output positions, probed with this many rows
  per sample, whose stacked per-sample gradients hold this many values, are
  formed: `"patches"` (per-sample gradients from the stacked patches, one
  product), `"taps"` (per-sample gradients tap by tap, one product per
  kernel tap) or `"tap_grams"` (one Gram per kernel tap, summed; no whole
  per-sample gradient is formed).
- `conv_sample_grads(a, d, kernel_shape, strides, padding, dilation, fast)`:
  a convolution's per-sample weight gradients as one gradient convolution
  per sample, where the backend runs that faster than the taps or patches
  (JAX: large maps, one row per sample, a probe not compiled for a short
  fit), else `None`.
- `split_factored(fast)`: whether the layer-factored probe compiles in two
  parts: the forward and backward pass as the train step runs (TensorFlow:
  a graph on its own kernels), and the per-sample products and Grams inside
  it with XLA (`compile_probe(products, xla=True)`).
- `GRAM_CHUNK_BYTES`: the most bytes of per-sample gradients formed at
  once for per-filter Grams (None: a whole layer at once).
- `IDENTITY_COST_FACTOR`: how many multiply-adds of a per-filter Gram
  product one multiply-add of the identity's contractions costs; the
  identity is taken where it is cheaper at that rate.
- `split_samples(tree)`: the probe samples laid out like a training batch
  (JAX under `keras.distribution`: split over the batch axis).
- `snapshot(variable)`: the variable's current value, for a probe pass.
- `scalar_grad(fn, values)`: plain gradient of a scalar function (used by the
  slow reference only).
- `copy_values(variables)` / `restore_masked(variables, conditions, olds)`:
  the masked optimizer update's snapshot (opaque to the caller) and its
  `where(condition, value, old)` write-back (`_stateful.py` for the traced
  backends; raw in-place torch ops on PyTorch, whose steps run eagerly).
- `state_key(tensors)`: a hashable key that changes whenever one of the
  tensors is written, for reusing what an eager step computed from them (the
  broadcast masks on PyTorch); None where steps are traced.
- `ASSIGNS_IN_STATELESS_SCOPE`: whether Keras's own optimizers write their
  variables through `Variable.assign` inside a `keras.StatelessScope` (JAX,
  PyTorch's unfused ones; TensorFlow's write the `tf.Variable`s), so that the
  masked `stateless_apply` can blend each assignment as it is made.
"""

import importlib

import keras

_SUPPORTED = ("jax", "tensorflow", "torch")


def name():
    """The active Keras backend name."""
    return keras.config.backend()


def get():
    """The keras_mat kernel module of the active Keras backend."""
    backend = keras.config.backend()
    if backend not in _SUPPORTED:
        raise NotImplementedError(
            f"keras_mat supports the Keras backends {_SUPPORTED}. Received: backend={backend!r}"
        )
    return importlib.import_module(f"keras_mat.backends.{backend}")


def trainer():
    """The keras_mat training-integration module of the active Keras backend
    (`<backend>_trainer.py`): state sync, whether the train step compiles,
    the distribution checks and a hook for when a step starts compiling
    (`on_next_compile`); chosen by backend, like Keras's trainers."""
    backend = keras.config.backend()
    if backend not in _SUPPORTED:
        raise NotImplementedError(
            f"keras_mat supports the Keras backends {_SUPPORTED}. Received: backend={backend!r}"
        )
    return importlib.import_module(f"keras_mat.backends.{backend}_trainer")
