"""ModuleGroup validation, automatic discovery and annotate()."""

import gc
import warnings

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
    # The classifier is in no module by default, and a whole-layer module with dense=True.
    assert set(_names(m)) == {"mha/heads"}
    assert group_of(m.get_layer("head").kernel) == (None, None)
    dense = _names(keras_mat.annotate(m, dense=True))
    assert set(dense) == {"mha/heads", "head"}
    assert dense["head"].kind == "layer" and dense["head"].num_modules == 1
    assert group_of(mha._output_dense.bias) == (None, None)  # still shared, still in no module


def test_keras_hub_encoder_discovered():
    m = keras_mat.annotate(models.encoder_stack(layers=2, heads=2))
    names = _names(m)
    assert set(names) == {"enc0/self_attention_layer/heads", "enc1/self_attention_layer/heads"}
    # Feed-forward Dense layers inside the encoder are layer-level modules only with dense=True.
    names = _names(keras_mat.annotate(m, dense=True))
    assert names["enc0/feedforward_intermediate_dense"].kind == "layer"
    assert names["cls"].kind == "layer"
    assert names["enc0/self_attention_layer/heads"].kind == "head"
    # LayerNorms are in no module.
    for v in m.trainable_variables:
        if "norm" in v.path:
            assert group_of(v) == (None, None)


def test_conv_filters_and_variants():
    m = keras_mat.annotate(models.conv_zoo())
    names = _names(m)
    assert names["c1d/filters"].num_modules == 4 and names["c1d/filters"].axes == [2, 0]
    assert names["sep/filters"].num_modules == 6
    # The separable conv's depthwise kernel: one filter per input channel (4 from c1d).
    assert names["sep/depthwise"].kind == "filter" and names["sep/depthwise"].num_modules == 4
    assert names["sep/depthwise"].axes == [1]
    assert all(g.kind == "filter" for g in names.values())  # the Dense classifier is in no module
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
    assert set(_names(m)) == {"units"}  # no heads, filters or experts in an MLP
    keras_mat.annotate(m, groups=["auto", explicit], dense=True)
    names = _names(m)
    assert set(names) == {"units", "fc1"}
    assert group_of(fc0.kernel)[0] is explicit
    keras_mat.annotate(m, groups=[explicit])  # explicit only
    assert set(_names(m)) == {"units"}
    assert group_of(m.get_layer("fc1").kernel) == (None, None)
    keras_mat.annotate(m, exclude=["fc1"], dense=True)
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
    with pytest.raises(ValueError, match=r"model.build\(input_shape\).*not built"):
        keras_mat.annotate(m)
    m.build((None, 3))
    assert keras_mat.get_groups(keras_mat.annotate(m, dense=True))[0].kind == "layer"


def test_embeddings_and_norms_options():
    import keras_hub

    inp = keras.Input((5,), dtype="int32")
    x = keras_hub.layers.TokenAndPositionEmbedding(20, 5, 8, name="emb")(inp)
    x = keras_hub.layers.TransformerEncoder(12, 2, name="enc")(x)
    out = keras.layers.Dense(2, name="cls")(keras.layers.GlobalAveragePooling1D()(x))
    m = keras.Model(inp, out)
    default = _names(keras_mat.annotate(m))
    assert not any(k.endswith("/embedding") or k.endswith("/norm") for k in default)
    both = _names(keras_mat.annotate(m, embeddings=True, norms=True, dense=True))
    emb = [k for k in both if k.endswith("/embedding")]
    norms = [k for k in both if k.endswith("/norm")]
    assert emb and all(both[k].kind == "layer" and both[k].num_modules == 1 for k in emb)
    assert len(norms) == 2  # the encoder's attention and feed-forward LayerNorms
    # Everything trainable is now in some module, the heads' shared output bias included.
    assert all(group_of(v)[0] is not None for v in m.trainable_variables)
    assert both["enc/self_attention_layer/output_bias"].kind == "layer"


def _tiny_bert():
    import keras_hub

    return keras_hub.models.BertBackbone(
        vocabulary_size=30,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=6,
        name="bert",
    )


def test_default_modules_are_the_papers_heads_on_keras_hub_bert():
    m = _tiny_bert()
    groups = keras_mat.get_groups(keras_mat.annotate(m))
    assert len(groups) == 2
    assert all(g.kind == "head" and g.num_modules == 2 for g in groups)
    in_family = {id(v) for g in groups for v in g.variables}
    # Feed-forward, pooler, embeddings and norms are always trained by default.
    others = [v for v in m.trainable_variables if id(v) not in in_family]
    assert any("feedforward" in v.path for v in others) and any("pooled_dense" in v.path for v in others)
    assert all(group_of(v) == (None, None) for v in others)
    kinds = {g.kind for g in keras_mat.get_groups(keras_mat.annotate(m, dense=True))}
    assert kinds == {"head", "layer"}


def test_default_modules_are_filters_on_a_cnn_and_experts_on_moe():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="c0")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.SeparableConv2D(6, 3, name="sep")(x)
    x = keras.layers.Dense(5, name="fc0")(keras.layers.Flatten()(x))
    m = keras.Model(inp, keras.layers.Dense(3, name="fc1")(x))
    names = _names(keras_mat.annotate(m))
    assert set(names) == {"c0/filters", "sep/filters", "sep/depthwise"}
    assert {g.kind for g in names.values()} == {"filter"}
    assert [names[k].num_modules for k in sorted(names)] == [4, 4, 6]
    assert set(_names(keras_mat.annotate(models.moe(experts=3)))) == {"moe/experts"}
    # discover_groups has the same default and option.
    assert {g.name for g in keras_mat.discover_groups(m)} == set(names)
    assert {g.name for g in keras_mat.discover_groups(m, dense=True)} == set(names) | {"fc0", "fc1"}


def test_exclude_string_is_one_pattern_and_entries_are_checked():
    m = models.mlp()
    # One string is one regular expression, not a list of one-character ones.
    keras_mat.annotate(m, exclude="fc1", dense=True)
    assert set(_names(m)) == {"fc0"}
    keras_mat.annotate(m, exclude=m.get_layer("fc0"), dense=True)
    assert set(_names(m)) == {"fc1"}
    keras_mat.annotate(m, exclude=("fc0", m.get_layer("fc1")), dense=True)
    assert _names(m) == {}
    with pytest.raises(TypeError, match=r"exclude entry=42 .*exclude=\[42\]"):
        keras_mat.annotate(m, exclude=[42], dense=True)
    with pytest.raises(TypeError, match="exclude=3.5"):
        keras_mat.annotate(m, exclude=3.5)
    with pytest.raises(ValueError, match=r"`exclude`.*'fc\(1'"):
        keras_mat.annotate(m, exclude="fc(1", dense=True)
    with pytest.raises(ValueError, match=r"`exclude`.*'\[a'"):
        keras_mat.discover_groups(m, exclude=["fc0", "[a"])
    # Checked even when no discovery runs (explicit families only).
    g = keras_mat.ModuleGroup("g", [m.get_layer("fc0").kernel], axes=1, num_modules=5)
    with pytest.raises(TypeError, match="exclude"):
        keras_mat.annotate(m, groups=[g], exclude=[None])


def test_numpy_integers_are_ints():
    m = models.mlp()
    k, b = m.get_layer("fc0").kernel, m.get_layer("fc0").bias  # (4, 5), (5,)
    g = keras_mat.ModuleGroup("g", [k], axes=np.int64(1), num_modules=np.int64(5))
    assert g.axes == [1] and g.num_modules == 5 and type(g.num_modules) is int
    g = keras_mat.ModuleGroup("g", [k, b], axes=[np.int64(-1), np.int32(0)], num_modules=np.int16(5))
    assert g.axes == [1, 0] and type(g.axes[0]) is int
    assert g.num_parameters == 5
    c = keras_mat.annotate(models.cnn(), conv_modules=np.int64(2))
    assert _names(c)["c0/filters"].num_modules == 2
    for bad in (True, 1.0, "1"):
        with pytest.raises(ValueError, match="axis="):
            keras_mat.ModuleGroup("g", [k], axes=[bad], num_modules=1)
    for bad in (np.float64(2.0), True, 0, "2", None):
        with pytest.raises(ValueError, match="num_modules="):
            keras_mat.ModuleGroup("g", [k], axes=1, num_modules=bad)


def test_wrong_types_name_the_argument():
    m = models.mlp()
    k = m.get_layer("fc0").kernel
    with pytest.raises(TypeError, match="variables=5"):
        keras_mat.ModuleGroup("g", 5)
    with pytest.raises(TypeError, match="variables='kernel'"):
        keras_mat.ModuleGroup("g", "kernel")
    with pytest.raises(TypeError, match="axes='1'"):
        keras_mat.ModuleGroup("g", [k], axes="1")
    with pytest.raises(TypeError, match="axes=1.5"):
        keras_mat.ModuleGroup("g", [k], axes=1.5)
    with pytest.raises(ValueError, match=r"kind=\['head'\]"):
        keras_mat.ModuleGroup("g", [k], axes=1, num_modules=5, kind=["head"])
    with pytest.raises(TypeError, match="dense='yes'"):
        keras_mat.annotate(m, dense="yes")
    with pytest.raises(TypeError, match="norms=1"):
        keras_mat.discover_groups(m, norms=1)
    with pytest.raises(ValueError, match="include='neuron'"):
        keras_mat.discover_groups(m, include="neuron")
    assert keras_mat.discover_groups(m, include="layer", dense=True)  # one str is one kind
    with pytest.raises(ValueError, match="conv_modules=2.0"):
        keras_mat.annotate(m, conv_modules=2.0)
    with pytest.raises(ValueError, match="groups=7"):
        keras_mat.annotate(m, groups=7)
    with pytest.raises(TypeError, match="model=3"):
        keras_mat.annotate(3)
    with pytest.raises(TypeError, match="model=3"):
        keras_mat.discover_groups(3)
    with pytest.raises(TypeError, match="model=3"):
        keras_mat.get_groups(3)
    assert keras_mat.get_groups(models.mlp()) is None  # never annotated
    assert keras_mat.get_groups(keras_mat.annotate(models.mlp())) == ()  # annotated, no module


class _Owner:
    """Stands for a built optimizer in the re-annotation tests."""


def test_reannotating_families_in_use_warns():
    from keras_mat.groups import in_use, mark_in_use

    m = keras_mat.annotate(models.mha())
    old = keras_mat.get_groups(m)
    owner = _Owner()
    mark_in_use(old, owner)
    assert in_use(old[0]) == [owner]
    # The same families again: same objects, nothing to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keras_mat.annotate(m)
    assert keras_mat.get_groups(m)[0] is old[0]
    with pytest.warns(UserWarning, match=r"keeps masking the families it was built with.*new families="):
        keras_mat.annotate(m, dense=True)
    assert {g.name for g in keras_mat.get_groups(m)} == {"mha/heads", "head"}
    assert keras_mat.get_groups(m)[0] is old[0]  # unchanged family kept
    # Once the owner is gone nothing is in use.
    del owner
    gc.collect()
    assert in_use(old[0]) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keras_mat.annotate(m)
    with pytest.raises(TypeError, match="groups entry=3"):
        mark_in_use([3], _Owner())


def test_reannotating_after_the_optimizer_is_built_warns():
    m = keras_mat.annotate(models.mha())
    opt = keras_mat.wrap(keras.optimizers.SGD(0.1))
    opt.build(m.trainable_variables)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keras_mat.annotate(m)  # the same families: nothing changes
    with pytest.warns(UserWarning, match=r"keeps masking.*new families=\['mha/heads', 'head'\]"):
        keras_mat.annotate(m, dense=True)
    assert [g.name for g in opt.families] == ["mha/heads"]  # what the warning says


def _attention_model(layer, seq=5, dim=8):
    inp = keras.Input((seq, dim))
    return keras.Model(inp, layer(inp, inp), name="att_model")


def _head_contributions_add_up(model, group, x):
    """Zeroing one module's slices removes exactly that module's part of the output.

    An attention layer's output is its output bias plus one term per head, so
    the modules partition the heads correctly iff the parts removed by zeroing
    each module in turn add up to the part removed by zeroing all of them.
    """
    from keras_mat.reference import module_selector

    originals = [np.array(keras.ops.convert_to_numpy(v.value)) for v in group.variables]

    def output(zeroed):
        for v, axis, value in zip(group.variables, group.axes, originals):
            keep = np.ones(value.shape, bool)
            for m in zeroed:
                keep &= ~module_selector(value.shape, axis, group.num_modules, m)
            v.assign(value * keep)
        out = np.asarray(keras.ops.convert_to_numpy(model(x)), np.float64)
        for v, value in zip(group.variables, originals):
            v.assign(value)
        return out

    full = output([])
    parts = [full - output([m]) for m in range(group.num_modules)]
    everything = full - output(range(group.num_modules))
    assert all(np.abs(p).max() > 1e-6 for p in parts)  # every module contributes
    np.testing.assert_allclose(sum(parts), everything, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mha", "gqa", "gqa_as_mha"])
def test_attention_head_modules_partition_the_heads(kind):
    if kind == "mha":
        layer = keras.layers.MultiHeadAttention(4, 3, name="att")
        modules = 4
    else:
        # Grouped-query attention: 4 query heads over 2 (or 4) key/value heads.
        kv = 2 if kind == "gqa" else 4
        layer = keras.layers.GroupQueryAttention(3, 4, kv, name="att")
        modules = kv
    m = models.set_weights_deterministic(_attention_model(layer))
    names = _names(keras_mat.annotate(m))
    assert set(names) == {"att/heads"}
    g = names["att/heads"]
    assert g.kind == "head" and g.num_modules == modules
    paths = {v.path.split("/", 1)[1] for v in g.variables}
    assert {"query/kernel", "key/kernel", "value/kernel", "attention_output/kernel"} <= paths
    assert "attention_output/bias" not in paths  # shared by all heads
    _head_contributions_add_up(m, g, models.probe_batch(m, 2))


def test_grouped_query_attention_lambda_matches_reference():
    from keras_mat.reference import reference_lambda_max

    m = models.set_weights_deterministic(
        _attention_model(keras.layers.GroupQueryAttention(3, 4, 2, name="att"))
    )
    keras_mat.annotate(m)
    x = models.probe_batch(m, 3)
    fast = keras_mat.module_lambda_max(m, x, ntk_output="sum")
    ref = reference_lambda_max(m, x, ntk_output="sum")
    assert fast["att/heads"].shape == (2,)
    np.testing.assert_allclose(fast["att/heads"], ref["att/heads"], rtol=1e-3)


def test_unknown_attention_layout_is_left_to_dense():
    class OddAttention(keras.layers.Layer):
        """Has the projection attributes but a fused (d, 3 * d) query kernel."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.num_heads = 2
            self._query_dense = keras.layers.Dense(12, name="query")
            self._key_dense = keras.layers.Dense(4, name="key")
            self._value_dense = keras.layers.Dense(4, name="value")
            self._output_dense = keras.layers.Dense(8, name="out")

        def call(self, x):
            q = self._query_dense(x)[..., :4]
            return self._output_dense(q * self._key_dense(x) + self._value_dense(x))

    inp = keras.Input((5, 8))
    m = keras.Model(inp, OddAttention(name="odd")(inp))
    assert keras_mat.get_groups(keras_mat.annotate(m)) == ()
    assert {g.kind for g in keras_mat.get_groups(keras_mat.annotate(m, dense=True))} == {"layer"}
