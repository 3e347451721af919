"""Tiny models used across tests (built deterministically from numpy weights)."""

import keras
import numpy as np
from keras import ops


def set_weights_deterministic(model, seed=0, scale=0.5):
    """Same weights on every backend: numpy RNG, assigned in variable order."""
    rng = np.random.RandomState(seed)
    for v in model.weights:
        if v.trainable:
            v.assign(rng.uniform(-scale, scale, size=tuple(v.shape)).astype(v.dtype))
    return model


def mlp(inputs=4, hidden=5, outputs=3):
    inp = keras.Input((inputs,))
    x = keras.layers.Dense(hidden, activation="tanh", name="fc0")(inp)
    out = keras.layers.Dense(outputs, name="fc1")(x)
    return keras.Model(inp, out, name="mlp")


def mha(seq=4, dim=8, heads=2, outputs=3):
    inp = keras.Input((seq, dim))
    x = keras.layers.MultiHeadAttention(heads, 4, name="mha")(inp, inp)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(outputs, name="head")(x)
    return keras.Model(inp, out, name="mha_model")


def encoder_stack(seq=5, dim=8, heads=2, layers=2, outputs=3):
    import keras_hub

    inp = keras.Input((seq, dim))
    x = inp
    for i in range(layers):
        x = keras_hub.layers.TransformerEncoder(12, heads, dropout=0.1, name=f"enc{i}")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    out = keras.layers.Dense(outputs, name="cls")(x)
    return keras.Model(inp, out, name="encoders")


def cnn(size=8, outputs=3):
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="c0")(inp)
    x = keras.layers.Conv2D(6, 3, activation="relu", name="c1")(x)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(outputs, name="fc")(x)
    return keras.Model(inp, out, name="cnn")


def conv_zoo(outputs=2):
    inp = keras.Input((9, 4))
    x = keras.layers.Conv1D(4, 3, activation="tanh", name="c1d")(inp)
    x = keras.layers.SeparableConv1D(6, 3, activation="tanh", name="sep")(x)
    x = keras.layers.DepthwiseConv1D(3, depth_multiplier=2, name="dw")(x)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(outputs, name="fc")(x)
    return keras.Model(inp, out, name="conv_zoo")


class StackedExperts(keras.layers.Layer):
    """Switch-style MoE feed-forward: top-1 routing over stacked experts."""

    def __init__(self, num_experts, hidden, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.hidden = hidden

    def build(self, input_shape):
        d = input_shape[-1]
        e, h = self.num_experts, self.hidden
        self.router = self.add_weight(shape=(d, e), name="router_kernel")
        self.w_in = self.add_weight(shape=(e, d, h), name="expert_in")
        self.b_in = self.add_weight(shape=(e, h), name="expert_in_bias", initializer="zeros")
        self.w_out = self.add_weight(shape=(e, h, d), name="expert_out")

    def call(self, x):
        logits = ops.matmul(x, self.router)
        probs = ops.softmax(logits, axis=-1)
        # one-hot of the argmax without ops.one_hot (it breaks torch.func.vmap).
        top = ops.cast(
            ops.equal(ops.expand_dims(ops.argmax(logits, axis=-1), -1), ops.arange(self.num_experts)),
            x.dtype,
        )
        gate = probs * top
        h = ops.tanh(ops.einsum("...d,edh->...eh", x, self.w_in) + self.b_in)
        y = ops.einsum("...eh,ehd->...ed", h, self.w_out)
        return ops.einsum("...ed,...e->...d", y, gate)


def moe(seq=3, dim=6, experts=3, outputs=2):
    inp = keras.Input((seq, dim))
    x = inp + StackedExperts(experts, 5, name="moe")(inp)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(outputs, name="fc")(x)
    return keras.Model(inp, out, name="moe_model")


def probe_batch(model, n=4, seed=1):
    rng = np.random.RandomState(seed)
    shape = (n,) + tuple(model.inputs[0].shape[1:])
    return rng.randn(*shape).astype("float32")


def conv_transpose(outputs=2):
    inp = keras.Input((4, 4, 2))
    x = keras.layers.Conv2DTranspose(3, 3, strides=2, name="ct")(inp)
    x = keras.layers.Conv3D(2, 2, name="c3")(keras.layers.Reshape((9, 9, 3, 1))(x))
    x = keras.layers.Flatten()(x)
    return keras.Model(inp, keras.layers.Dense(outputs, name="fc")(x), name="conv_t")


def nested_multi_io():
    inner = keras.Sequential(
        [keras.layers.Dense(5, activation="relu"), keras.layers.BatchNormalization(), keras.layers.Dense(4)],
        name="inner",
    )
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = inner(keras.layers.Concatenate()([a, b]))
    out = {"o1": keras.layers.Dense(2, name="o1")(h), "o2": keras.layers.Dense(1, name="o2")(h)}
    return keras.Model({"a": a, "b": b}, out, name="multi_io")


class Subclassed(keras.Model):
    """A subclassed model whose `call` takes no `training` argument."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.att = keras.layers.MultiHeadAttention(
            2, 3, name="att"
        )  # value_dim != key_dim breaks Keras on JAX
        self.out = keras.layers.Dense(2, name="out")

    def call(self, x):
        return self.out(ops.mean(self.att(x, x), axis=1))


def cross_attention():
    q, kv = keras.Input((3, 4)), keras.Input((5, 6))
    h = keras.layers.MultiHeadAttention(3, 2, name="xatt")(q, kv)
    return keras.Model([q, kv], keras.layers.Dense(2, name="fc")(keras.layers.Flatten()(h)), name="xatt")


def slot_owners(inner, model):
    """Independent (name-based) map from inner slot to model variable: Keras
    names slots `<variable path with / -> _>_<slot name>`."""
    owners = {}
    prefixes = sorted(
        ((v.path.replace("/", "_") + "_", v) for v in model.trainable_variables), key=lambda t: -len(t[0])
    )
    for k, s in enumerate(inner.variables):
        for prefix, v in prefixes:
            if s.name.startswith(prefix) and tuple(s.shape) == tuple(v.shape):
                owners[k] = v
                break
    return owners
