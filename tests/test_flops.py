"""Analytic FLOPs (`keras_mat.flops`): hand-derived formulas per layer type,
per-module split, `step_flops` under masks and the probe estimate.

Models use zero initializers: on JAX every random initializer of a new shape
compiles, which dominates the run time of these tiny tests.
"""

import keras
import numpy as np
import pytest

import keras_mat
from keras_mat import flops

Z = "zeros"
B = 4  # batch size used throughout


def _entry(report, name):
    c = report.layers[name]
    return c["forward"], c["grad_input"], c["grad_weight"]


def _mlp():
    inp = keras.Input((3, 5))
    x = keras.layers.Dense(7, kernel_initializer=Z, name="fc0")(inp)
    out = keras.layers.Dense(2, kernel_initializer=Z, name="fc1")(x)
    return keras.Model(inp, out, name="mlp")


def _mha():
    q = keras.Input((4, 8))
    v = keras.Input((6, 5))
    # value_dim != key_dim breaks Keras' JAX attention, so d_value = d_key here.
    layer = keras.layers.MultiHeadAttention(2, 3, kernel_initializer=Z, name="mha")
    return keras.Model([q, v], layer(q, v), name="cross")


# --------------------------------------------------------------------------------------
# Per-layer formulas
# --------------------------------------------------------------------------------------


def test_dense_mlp():
    model = _mlp()
    report = flops.count_flops(model, batch_size=B, groups=keras_mat.discover_groups(model, dense=True))
    rows = B * 3  # batch times the sequence axis
    assert _entry(report, "fc0") == (2.0 * rows * 5 * 7,) * 3
    assert _entry(report, "fc1") == (2.0 * rows * 7 * 2,) * 3
    total = 2.0 * rows * (5 * 7 + 7 * 2)
    assert (report.forward, report.grad_input, report.grad_weight) == (total, total, total)
    assert report.total == 3 * total
    # Dense layers as whole-layer families (discover_groups(dense=True)).
    np.testing.assert_allclose(report.families["fc0"], [2.0 * rows * 35])
    assert report.grad_weight_always == 0.0
    assert report.shared == 2 * total
    assert report.ops[0].weights == {"fc0/kernel": 2.0 * rows * 35}
    assert report.ops[0].input_shape == (B, 3, 5)
    assert report.ops[0].output_shape == (B, 3, 7)
    assert "fc1" in report.summary()


def test_conv_strides_padding_groups_dilation():
    inp = keras.Input((9, 9, 4))
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", groups=2, kernel_initializer=Z, name="grouped")(
        inp
    )
    x = keras.layers.Conv2D(4, 2, dilation_rate=2, kernel_initializer=Z, name="dilated")(x)
    y = keras.layers.Conv2DTranspose(3, 2, strides=2, kernel_initializer=Z, name="up")(x)
    model = keras.Model(inp, y)
    report = flops.count_flops(model, batch_size=B)
    # 9x9 stride 2 "same" -> 5x5; 3x3 taps of 4 / 2 groups = 2 input channels.
    f = 2.0 * B * 5 * 5 * 6 * (3 * 3 * 2)
    assert _entry(report, "grouped") == (f, f, f)
    # 5x5, 2x2 kernel dilated by 2 (span 3), valid -> 3x3.
    f = 2.0 * B * 3 * 3 * 4 * (2 * 2 * 6)
    assert _entry(report, "dilated") == (f, f, f)
    # Transposed: every input element scatters a 2x2 x 3 patch.
    f = 2.0 * B * 3 * 3 * 4 * (2 * 2 * 3)
    assert _entry(report, "up") == (f, f, f)
    g = report.families["grouped/filters"]
    assert g.shape == (6,)
    np.testing.assert_allclose(g.sum(), _entry(report, "grouped")[2])


def test_conv1d_depthwise_separable():
    inp = keras.Input((8, 2))
    x = keras.layers.Conv1D(3, 2, strides=2, kernel_initializer=Z, name="c1d")(inp)  # -> (4, 3)
    x = keras.layers.DepthwiseConv1D(2, depth_multiplier=2, depthwise_initializer=Z, name="dw")(x)  # (3, 6)
    x = keras.layers.SeparableConv1D(5, 3, depthwise_initializer=Z, pointwise_initializer=Z, name="sep")(x)
    model = keras.Model(inp, x)  # sep -> (1, 5)
    report = flops.count_flops(model, batch_size=B)
    f = 2.0 * B * 4 * 3 * (2 * 2)
    assert _entry(report, "c1d") == (f, f, f)
    f = 2.0 * B * 3 * 6 * 2
    assert _entry(report, "dw") == (f, f, f)
    depthwise = 2.0 * B * 1 * 6 * 3  # 1 position x 6 channels x 3 taps
    pointwise = 2.0 * B * 1 * 5 * 6
    f = depthwise + pointwise
    assert _entry(report, "sep") == (f, f, f)
    np.testing.assert_allclose(
        report.families["sep/depthwise"], [depthwise / 6] * 6
    )  # one filter per channel
    np.testing.assert_allclose(report.families["sep/filters"], [pointwise / 5] * 5)
    np.testing.assert_allclose(report.families["dw/filters"], [2.0 * B * 3 * 6 * 2 / 3] * 3)


def test_multi_head_attention():
    report = flops.count_flops(_mha(), batch_size=B)
    heads, key_dim, value_dim, t, s = 2, 3, 3, 4, 6
    proj = {
        "mha/query": 2.0 * B * t * 8 * heads * key_dim,
        "mha/key": 2.0 * B * s * 5 * heads * key_dim,
        "mha/value": 2.0 * B * s * 5 * heads * value_dim,
        "mha/attention_output": 2.0 * B * t * heads * value_dim * 8,
    }
    for name, f in proj.items():
        assert _entry(report, name) == (f, f, f)
    scores = 2.0 * B * heads * t * s * key_dim
    mix = 2.0 * B * heads * t * s * value_dim
    # The attention matmuls: no weights, backward = 2x forward, all dX.
    assert _entry(report, "mha") == (scores + mix, 2 * (scores + mix), 0.0)
    per_head = report.families["mha/heads"]
    assert per_head.shape == (heads,)
    np.testing.assert_allclose(per_head, [sum(proj.values()) / heads] * heads)


def test_multi_head_attention_called_with_keywords_and_a_mask():
    # As keras-hub's encoders call it: query/value by keyword, no key, and a
    # (batch, 1, S) padding mask in the third argument slot. The mask must
    # not be taken for the key (that gave S = 1).
    seq, heads, key_dim = 6, 2, 4
    x = keras.Input((seq, 8))
    mask = keras.Input((1, seq), dtype="bool")
    layer = keras.layers.MultiHeadAttention(heads, key_dim, name="mha")
    model = keras.Model([x, mask], layer(query=x, value=x, attention_mask=mask), name="self")
    report = flops.count_flops(model, batch_size=B)
    scores = mix = 2.0 * B * heads * seq * seq * key_dim
    assert _entry(report, "mha") == (scores + mix, 2 * (scores + mix), 0.0)


def test_einsum_dense():
    inp = keras.Input((3, 4))
    x = keras.layers.EinsumDense("abc,cde->abde", (3, 2, 5), kernel_initializer=Z, name="e1")(inp)
    x = keras.layers.Reshape((3, 10))(x)
    y = keras.layers.EinsumDense("...b,bc->...c", 6, kernel_initializer=Z, name="e2")(x)
    report = flops.count_flops(keras.Model(inp, y), batch_size=B)
    f = 2.0 * B * 3 * 4 * 2 * 5
    assert _entry(report, "e1") == (f, f, f)
    f = 2.0 * B * 3 * 10 * 6
    assert _entry(report, "e2") == (f, f, f)


def test_embedding_lookup_and_reverse():
    ids = keras.Input((5,), dtype="int32")
    emb = keras.layers.ReversibleEmbedding(10, 3, embeddings_initializer=Z, name="tok")
    x = emb(ids)
    x = keras.layers.Embedding(10, 3, embeddings_initializer=Z, name="plain")(ids) + x
    logits = emb(x, reverse=True)
    report = flops.count_flops(keras.Model(ids, logits), batch_size=B)
    # Lookup: no forward/dX FLOPs, dW = scatter-add of tokens * dim.
    assert _entry(report, "plain") == (0.0, 0.0, B * 5 * 3.0)
    # Shared layer counted per call: lookup + tied reverse matmul.
    mm = 2.0 * B * 5 * 3 * 10
    assert _entry(report, "tok") == (mm, mm, B * 5 * 3 + mm)
    assert [op.layer for op in report.ops].count("tok") == 2
    # Embeddings are in no family: always trained.
    assert report.grad_weight_always == report.grad_weight


class _Experts(keras.layers.Layer):
    """Stacked-expert feed-forward (dense dispatch), zero-initialized."""

    def __init__(self, num_experts, hidden, top_k=None, **kwargs):
        super().__init__(**kwargs)
        self.num_experts, self.hidden = num_experts, hidden
        if top_k is not None:
            self.top_k = top_k

    def build(self, input_shape):
        d, e, h = input_shape[-1], self.num_experts, self.hidden
        self.router = self.add_weight(shape=(d, e), initializer=Z, name="router_kernel")
        self.w_in = self.add_weight(shape=(e, d, h), initializer=Z, name="expert_in")
        self.b_in = self.add_weight(shape=(e, h), initializer=Z, name="expert_in_bias")
        self.w_out = self.add_weight(shape=(e, h, d), initializer=Z, name="expert_out")

    def call(self, x):
        gate = keras.ops.softmax(keras.ops.matmul(x, self.router), axis=-1)
        h = keras.ops.einsum("...d,edh->...eh", x, self.w_in) + self.b_in
        y = keras.ops.einsum("...eh,ehd->...ed", h, self.w_out)
        return keras.ops.einsum("...ed,...e->...d", y, gate)


@pytest.mark.parametrize("top_k", [None, 2])
def test_stacked_experts(top_k):
    inp = keras.Input((3, 6))
    model = keras.Model(inp, _Experts(3, 5, top_k=top_k, name="moe")(inp))
    report = flops.count_flops(model, batch_size=B)
    tokens, e, h, d = B * 3, 3, 5, 6
    # Dense dispatch: every expert sees every token; top_k: k experts per token.
    experts = 2.0 * tokens * (top_k or e) * (d * h + h * d)
    router = 2.0 * tokens * d * e
    assert _entry(report, "moe") == (experts + router,) * 3
    np.testing.assert_allclose(report.families["moe/experts"], [experts / e] * e)
    assert report.grad_weight_always == router  # the router is in no family


def test_unknown_non_batch_dims_need_input_shapes():
    inp = keras.Input((None, 4))
    model = keras.Model(inp, keras.layers.Dense(2, kernel_initializer=Z, name="d")(inp))
    with pytest.raises(ValueError, match="input_shapes"):
        flops.count_flops(model, batch_size=B)
    report = flops.count_flops(model, batch_size=B, input_shapes=(7, 4))
    assert _entry(report, "d")[0] == 2.0 * B * 7 * 4 * 2
    with pytest.raises(ValueError, match="batch_size"):
        flops.count_flops(model, batch_size=0)


# --------------------------------------------------------------------------------------
# step_flops / probe_flops
# --------------------------------------------------------------------------------------


def test_step_flops_masks():
    model = _mha()
    keras_mat.annotate(model)
    report = flops.count_flops(model, batch_size=B)
    assert list(report.families) == [g.name for g in keras_mat.get_groups(model)] == ["mha/heads"]
    assert flops.step_flops(report) == report.total
    assert flops.step_flops(report, {"mha/heads": [True, True]}) == report.total
    heads = report.families["mha/heads"]
    assert flops.step_flops(report, {"mha/heads": [False, False]}) == report.total - heads.sum()
    assert flops.step_flops(report, [np.array([1.0, 0.0])]) == report.total - heads[1]
    assert flops.step_flops(report, {"mha/heads": [1, 0]}, granularity="family") == report.total
    with pytest.raises(ValueError, match="unknown"):
        flops.step_flops(report, {"nope": [1]})
    with pytest.raises(ValueError, match="entries"):
        flops.step_flops(report, {"mha/heads": [1, 0, 1]})


def test_step_flops_family_off_and_frozen_prefix():
    model = keras_mat.annotate(_mlp(), dense=True)
    report = flops.count_flops(model, batch_size=B)
    fc0, fc1 = _entry(report, "fc0"), _entry(report, "fc1")
    assert flops.step_flops(report, {"fc1": [False]}) == report.total - fc1[2]
    # Backprop stops at fc1: fc1's dW only; no dX anywhere, nothing of fc0.
    assert flops.step_flops(report, frozen_prefix="fc1") == report.forward + fc1[2]
    assert flops.step_flops(report, frozen_prefix=1) == report.forward + fc1[2]
    # "auto": fc0 off -> backprop stops at fc1; all on -> only fc0's dX skipped.
    assert flops.step_flops(report, {"fc0": [0]}, frozen_prefix="auto") == report.forward + fc1[2]
    assert flops.step_flops(report, frozen_prefix="auto") == report.total - fc0[1]
    assert flops.step_flops(report, {"fc0": [0], "fc1": [0]}, frozen_prefix="auto") == report.forward
    with pytest.raises(ValueError, match="frozen_prefix"):
        flops.step_flops(report, frozen_prefix="missing")


def test_auto_frozen_prefix_stops_below_self_attention():
    # stem (frozen) -> self-attention called with keywords -> head. Back-
    # propagation stops at the attention's input: no dX for the query, key or
    # value projections (all read the stem's output), but the attention
    # matmuls' backward and the output projection's dX still run.
    x = keras.Input((6, 5))
    h = keras.layers.Dense(8, name="stem")(x)
    h = keras.layers.MultiHeadAttention(2, 4, name="mha")(query=h, value=h)
    model = keras.Model(x, keras.layers.Dense(3, name="head")(keras.layers.Flatten()(h)))
    keras_mat.annotate(model, dense=True)
    report = flops.count_flops(model, batch_size=B)
    order = [op.layer for op in report.ops]
    assert order.index("mha") > order.index("mha/value"), order  # its matmuls run after q/k/v
    e = {name: _entry(report, name) for name in ("stem", "mha", "head")}
    proj = {p: _entry(report, f"mha/{p}") for p in ("query", "key", "value", "attention_output")}
    expected = (
        report.forward
        + e["head"][1]
        + e["head"][2]
        + e["mha"][1]
        + proj["attention_output"][1]
        + sum(f[2] for f in proj.values())
    )
    assert flops.step_flops(report, {"stem": [0]}, frozen_prefix="auto") == pytest.approx(expected)


def test_probe_flops():
    model = keras_mat.annotate(_mlp(), dense=True)
    report = flops.count_flops(model, batch_size=B)
    rows, samples = 6, 3  # 3 outputs per position x 2, say
    per_sample_fwd = report.forward / B
    per_row = (report.grad_input + report.grad_weight_modules) / B
    params = 5 * 7 + 7 * 2  # Dense biases are in the families too
    params += 7 + 2
    expected = samples * (per_sample_fwd + rows * per_row) + 2.0 * (samples * rows) ** 2 * params
    assert flops.probe_flops(report, samples, rows) == pytest.approx(expected)
    assert flops.probe_flops(model, samples, rows) == pytest.approx(expected)
    assert flops.probe_flops(report, samples, rows, gram=False) == pytest.approx(
        samples * (per_sample_fwd + rows * per_row)
    )


def test_keras_hub_transformer_encoder():
    import keras_hub  # a declared dependency: a missing install must fail, not skip

    ids = keras.Input((6,), dtype="int32")
    emb = keras_hub.layers.TokenAndPositionEmbedding(20, 6, 8, embeddings_initializer=Z, name="emb")
    x = emb(ids)
    x = keras_hub.layers.TransformerEncoder(12, 2, kernel_initializer=Z, name="enc")(x)
    logits = emb.token_embedding(x, reverse=True)
    model = keras.Model(ids, logits)
    keras_mat.annotate(model)
    report = flops.count_flops(model, batch_size=B)
    heads = [n for n in report.families if n.endswith("/heads")]
    assert heads and all(report.families[n].shape == (2,) for n in heads)
    tokens = B * 6
    attn = report.layers["enc/self_attention_layer"]
    assert attn["forward"] == 2.0 * (2.0 * tokens * 2 * 6 * 4)  # QK^T + AV, d_head = 4
    ffn = 2.0 * tokens * 8 * 12
    assert report.layers["enc/feedforward_intermediate_dense"]["grad_weight"] == ffn
    # Position embedding: dW sums the output gradient over the batch.
    assert report.layers["emb/position_embedding"]["grad_weight"] == tokens * 8
    assert flops.step_flops(report) == report.total
    off = {n: np.zeros(2) for n in heads}
    assert flops.step_flops(report, off) == pytest.approx(
        report.total - sum(report.families[n].sum() for n in heads)
    )
