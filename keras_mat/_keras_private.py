"""The one place that reaches into Keras internals (`keras.src`).

Each name below has no public equivalent in Keras 3; the comment beside it
says why keras_mat needs it. Everything else in the package uses the public
API.
"""

# Shape-only tracing of a whole model on every backend (JAX eval_shape, TF
# FuncGraph, torch meta tensors) for the analytic FLOPs count; the public
# `Layer.compute_output_spec` is per layer and does not run nested layers.
from keras.src.backend import compute_output_spec  # noqa: F401

# Keras-style mask propagation for the layer-factored probe, which runs a
# Functional graph operation by operation as `Functional.call` does.
from keras.src.backend.common.masking import get_keras_mask, set_keras_mask  # noqa: F401

# Convolution families are recognised by their base classes (Conv1D/2D/3D and
# their transpose, depthwise and separable variants share them); Keras exports
# only the concrete classes.
from keras.src.layers.convolutional.base_conv import BaseConv  # noqa: F401
from keras.src.layers.convolutional.base_conv_transpose import BaseConvTranspose  # noqa: F401
from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv  # noqa: F401
from keras.src.layers.convolutional.base_separable_conv import BaseSeparableConv  # noqa: F401

# The Functional graph interpreter (the class whose own `call` runs the
# graph, and the per-operation call wrapper that passes `training`), for the
# layer-factored probe's capture of grouped layers' inputs and output gradients;
# Keras exports `Sequential` but not `Functional`.
from keras.src.models.functional import Functional, operation_fn  # noqa: F401

# Optimizer state kept in plain dicts must not be re-tracked by Keras's
# attribute tracking (it would register every MAT state variable twice).
from keras.src.utils.tracking import no_automatic_dependency_tracking  # noqa: F401


# MultiHeadAttention's own causal mask and attention computation (private
# methods; Keras exports only the whole `call`), for the layer-factored probe,
# which evaluates the layer's projections itself and must compute the rest
# exactly as `call` does.
def attention_causal_mask(layer, query, value):
    return layer._compute_attention_mask(query, value, use_causal_mask=True)


def attention_output(layer, query, key, value, mask):
    return layer._compute_attention(query, key, value, attention_mask=mask, training=False)[0]
