"""ModuleGroup validation, automatic discovery and annotate()."""

import keras
import numpy as np
import pytest

import keras_mat
from keras_mat.groups import group_of
from tests import models


def _names(model):
    return {g.name: g for g in keras_mat.get_groups(model)}


def test_mha_heads_span_qkv_and_output_kernel():
    m = keras_mat.annotate(models.mha(heads=2))
    g = _names(m)["mha/heads"]
    assert g.kind == "head" and g.num_modules == 2
    paths = {v.path.split("/", 1)[1]: a for v, a in zip(g.variables, g.axes)}
    assert paths == {
        "query/kernel": 1,
        "query/bias": 0,
        "key/kernel": 1,
        "key/bias": 0,
        "value/kernel": 1,
        "value/bias": 0,
        "attention_output/kernel": 0,
    }
    # The attention-output bias is shared by all heads: in no module, always trained.
    mha = m.get_layer("mha")
    assert group_of(mha._output_dense.bias) == (None, None)
    # The classifier is a whole-layer module.
    assert _names(m)["head"].kind == "layer" and _names(m)["head"].num_modules == 1


def test_keras_hub_encoder_discovered():
    m = keras_mat.annotate(models.encoder_stack(layers=2, heads=2))
    names = _names(m)
    assert {"enc0/self_attention_layer/heads", "enc1/self_attention_layer/heads"} <= set(names)
    # Feed-forward Dense layers inside the encoder are layer-level modules.
    assert names["enc0/feedforward_intermediate_dense"].kind == "layer"
    # LayerNorms are in no module.
    for v in m.trainable_variables:
        if "norm" in v.path:
            assert group_of(v) == (None, None)


def test_conv_filters_and_variants():
    m = keras_mat.annotate(models.conv_zoo())
    names = _names(m)
    assert names["c1d/filters"].num_modules == 4 and names["c1d/filters"].axes == [2, 0]
    assert names["sep/filters"].num_modules == 6
    assert names["sep/depthwise"].kind == "layer"
    assert names["dw/filters"].num_modules == 6 and names["dw/filters"].axes == [1, 0]


def test_conv_modules_option_groups_filters():
    m = keras_mat.annotate(models.cnn(), conv_modules=2)
    assert _names(m)["c0/filters"].num_modules == 2
    with pytest.raises(ValueError, match="conv_modules=4"):
        keras_mat.annotate(models.cnn(), conv_modules=4)  # 6 filters in c1


def test_moe_experts_discovered():
    m = keras_mat.annotate(models.moe(experts=3))
    g = _names(m)["moe/experts"]
    assert g.kind == "expert" and g.num_modules == 3
    assert sorted(v.name for v in g.variables) == ["expert_in", "expert_in_bias", "expert_out"]


def test_exclude_and_explicit_on_top_of_auto():
    m = models.mlp()
    fc0 = m.get_layer("fc0")
    explicit = keras_mat.ModuleGroup("units", [fc0.kernel, fc0.bias], axes=[1, 0], num_modules=5)
    keras_mat.annotate(m, groups=["auto", explicit])
    names = _names(m)
    assert set(names) == {"units", "fc1"}
    assert group_of(fc0.kernel)[0] is explicit
    keras_mat.annotate(m, groups=[explicit])  # explicit only
    assert set(_names(m)) == {"units"}
    assert group_of(m.get_layer("fc1").kernel) == (None, None)
    keras_mat.annotate(m, exclude=["fc1"])
    assert set(_names(m)) == {"fc0"}


def test_explicit_groups_match_reference_lambda():
    from keras_mat.reference import reference_lambda_max

    m = models.set_weights_deterministic(models.mlp())
    fc0 = m.get_layer("fc0")
    explicit = keras_mat.ModuleGroup("units", [fc0.kernel, fc0.bias], axes=[1, 0], num_modules=5)
    keras_mat.annotate(m, groups=[explicit])
    x = models.probe_batch(m, 3)
    fast = keras_mat.module_lambda_max(m, x, ntk_output="logits")
    ref = reference_lambda_max(m, x, ntk_output="logits")
    np.testing.assert_allclose(fast["units"], ref["units"], rtol=1e-3)


def test_validation_errors_name_argument_and_value():
    m = models.mlp()
    k = m.get_layer("fc0").kernel  # shape (4, 5)
    with pytest.raises(ValueError, match="axis=2"):
        keras_mat.ModuleGroup("g", [k], axes=2, num_modules=1)
    with pytest.raises(ValueError, match="num_modules=3"):
        keras_mat.ModuleGroup("g", [k], axes=1, num_modules=3)
    with pytest.raises(ValueError, match="num_modules=2"):
        keras_mat.ModuleGroup("g", [k], axes=None, num_modules=2)
    with pytest.raises(ValueError, match="kind='neuron'"):
        keras_mat.ModuleGroup("g", [k], axes=1, num_modules=5, kind="neuron")
    with pytest.raises(TypeError, match="keras.Variable"):
        keras_mat.ModuleGroup("g", [np.zeros(3)], axes=0)
    frozen = keras.Variable(np.zeros((2,)), trainable=False)
    with pytest.raises(ValueError, match="not trainable"):
        keras_mat.ModuleGroup("g", [frozen], axes=0, num_modules=2)
    a = keras_mat.ModuleGroup("a", [k], axes=1, num_modules=5)
    b = keras_mat.ModuleGroup("b", [k, m.get_layer("fc0").bias], axes=[0, 0], num_modules=1)
    with pytest.raises(ValueError, match="overlap"):
        keras_mat.annotate(m, groups=[a, b])
    other = models.mlp()
    foreign = keras_mat.ModuleGroup("f", [other.get_layer("fc0").kernel], axes=1, num_modules=5)
    with pytest.raises(ValueError, match="not a variable of model"):
        keras_mat.annotate(m, groups=[foreign])
    with pytest.raises(ValueError, match="groups='heads'"):
        keras_mat.annotate(m, groups="heads")
    with pytest.raises(ValueError, match="groups entry=3"):
        keras_mat.annotate(m, groups=[3])


def test_frozen_layer_variable_rejected_by_annotate():
    m = models.mlp()
    fc0 = m.get_layer("fc0")
    g = keras_mat.ModuleGroup("units", [fc0.kernel], axes=1, num_modules=5)
    fc0.trainable = False
    with pytest.raises(ValueError, match="not trainable in model"):
        keras_mat.annotate(m, groups=[g])


def test_annotate_needs_built_model():
    m = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not built"):
        keras_mat.annotate(m)


def test_embeddings_and_norms_options():
    import keras_hub

    inp = keras.Input((5,), dtype="int32")
    x = keras_hub.layers.TokenAndPositionEmbedding(20, 5, 8, name="emb")(inp)
    x = keras_hub.layers.TransformerEncoder(12, 2, name="enc")(x)
    out = keras.layers.Dense(2, name="cls")(keras.layers.GlobalAveragePooling1D()(x))
    m = keras.Model(inp, out)
    default = _names(keras_mat.annotate(m))
    assert not any(k.endswith("/embedding") or k.endswith("/norm") for k in default)
    both = _names(keras_mat.annotate(m, embeddings=True, norms=True))
    emb = [k for k in both if k.endswith("/embedding")]
    norms = [k for k in both if k.endswith("/norm")]
    assert emb and all(both[k].kind == "layer" and both[k].num_modules == 1 for k in emb)
    assert len(norms) == 2  # the encoder's attention and feed-forward LayerNorms
    # Everything trainable is now in some module, the heads' shared output bias included.
    assert all(group_of(v)[0] is not None for v in m.trainable_variables)
    assert both["enc/self_attention_layer/output_bias"].kind == "layer"
