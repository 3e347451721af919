"""lambda_max: fast Gram path and Lanczos against the dense reference."""

import keras
import numpy as np
import pytest

import keras_mat
from keras_mat import ntk
from keras_mat.reference import reference_lambda_max
from tests import models
from tests.cross_backend import only_in_jax_session, run_in_every_backend

BACKEND = keras.config.backend()
RTOL = 1e-3  # float32 (issue 3: below 1e-3 in float32)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def _check_against_reference(model, x, ntk_output, y=None, loss=None, **kwargs):
    models.set_weights_deterministic(model)
    keras_mat.annotate(model)
    fast = keras_mat.module_lambda_max(model, x, y=y, ntk_output=ntk_output, loss=loss, **kwargs)
    ref = reference_lambda_max(model, x, ntk_output=ntk_output, y=y, loss=loss)
    assert set(fast) == set(ref)
    for name in ref:
        assert fast[name].shape == ref[name].shape, name
        assert np.all(ref[name] > 0), f"degenerate reference for {name}: {ref[name]}"
        assert _rel_err(fast[name], ref[name]) < RTOL, (name, fast[name], ref[name])
    return fast, ref


@pytest.mark.parametrize("ntk_output", ["logits", "sum"])
def test_mlp_matches_reference(ntk_output):
    m = models.mlp()
    fast, _ = _check_against_reference(m, models.probe_batch(m, 5), ntk_output)
    assert set(fast) == {"fc0", "fc1"}


@pytest.mark.parametrize("ntk_output", ["logits", "sum", "loss"])
def test_attention_heads_match_reference(ntk_output):
    m = models.mha()
    x = models.probe_batch(m, 4)
    y = np.array([0, 2, 1, 1])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    fast, _ = _check_against_reference(m, x, ntk_output, y=y, loss=loss)
    assert fast["mha/heads"].shape == (2,)


def test_keras_hub_encoder_stack_heads():
    m = models.encoder_stack()
    fast, _ = _check_against_reference(m, models.probe_batch(m, 3), "sum")
    heads = [k for k in fast if k.endswith("/heads")]
    assert len(heads) == 2 and all(fast[k].shape == (2,) for k in heads)


def test_cnn_filters_match_reference():
    m = models.cnn()
    fast, _ = _check_against_reference(m, models.probe_batch(m, 3), "logits")
    assert fast["c0/filters"].shape == (4,) and fast["c1/filters"].shape == (6,)


def test_separable_and_depthwise_conv_match_reference():
    m = models.conv_zoo()
    fast, _ = _check_against_reference(m, models.probe_batch(m, 3), "logits")
    assert fast["sep/filters"].shape == (6,)
    assert fast["dw/filters"].shape == (6,)  # one per input channel (depth_multiplier=2)


def test_moe_experts_match_reference():
    m = models.moe()
    fast, _ = _check_against_reference(m, models.probe_batch(m, 4), "logits")
    assert fast["moe/experts"].shape == (3,)
    # The router is excluded from the expert family (it is always trained).
    g = [g for g in keras_mat.get_groups(m) if g.name == "moe/experts"][0]
    assert all("router" not in v.path for v in g.variables)


def test_auto_output_mode_follows_spec():
    m = models.mlp(outputs=3)
    x = models.probe_batch(m, 3)
    models.set_weights_deterministic(m)
    assert ntk.resolve_ntk_output(m, x, "auto") == "logits"
    auto = keras_mat.module_lambda_max(m, x)
    logits = keras_mat.module_lambda_max(m, x, ntk_output="logits")
    np.testing.assert_allclose(auto["fc1"], logits["fc1"], rtol=1e-6)
    wide = models.mlp(outputs=17)
    assert ntk.resolve_ntk_output(wide, models.probe_batch(wide, 2), "auto") == "sum"


def test_chunked_probe_equals_single_pass():
    m = models.mha()
    x = models.probe_batch(m, 3)
    models.set_weights_deterministic(m)
    keras_mat.annotate(m)
    one = keras_mat.module_lambda_max(m, x, ntk_output="sum")
    # 64 bytes forces one pass per variable.
    many = keras_mat.module_lambda_max(m, x, ntk_output="sum", max_probe_bytes=64)
    probe = ntk.get_probe(m, keras_mat.get_groups(m), "sum", max_probe_bytes=64, x=x)
    assert len(probe._chunk_plan(3)) == len(probe.entries) > 1
    for k in one:
        np.testing.assert_allclose(many[k], one[k], rtol=1e-5)


@pytest.mark.parametrize("ntk_output", ["logits", "sum"])
def test_lanczos_matches_gram(ntk_output):
    m = models.mha()
    x = models.probe_batch(m, 4)
    models.set_weights_deterministic(m)
    keras_mat.annotate(m)
    gram = keras_mat.module_lambda_max(m, x, ntk_output=ntk_output)
    lanczos = keras_mat.module_lambda_max(m, x, ntk_output=ntk_output, method="lanczos", lanczos_steps=20)
    for k in gram:
        assert _rel_err(lanczos[k], gram[k]) < RTOL, (k, lanczos[k], gram[k])


def test_lanczos_solver_on_known_spectrum():
    rng = np.random.RandomState(0)
    q, _ = np.linalg.qr(rng.randn(30, 30))
    eig = np.linspace(0.1, 1.0, 30)
    eig[-1] = 5.0
    a = (q * eig) @ q.T
    assert abs(ntk.lanczos_top_eigenvalue(lambda u: a @ u, 30, steps=30) - 5.0) < 1e-8
    # rank-1 operator: the breakdown guard must stop, not blow up.
    v = rng.randn(30)
    r1 = np.outer(v, v)
    assert abs(ntk.lanczos_top_eigenvalue(lambda u: r1 @ u, 30, steps=20) - v @ v) < 1e-6 * (v @ v)


def test_gram_contraction_pure_function():
    rng = np.random.RandomState(0)
    jac = rng.randn(5, 3, 4, 6).astype("float32")  # rows, then a (3, 4, 6) variable
    grams = keras.ops.convert_to_numpy(ntk.module_gram(keras.ops.convert_to_tensor(jac), 2, 2))
    for m in range(2):
        sub = jac[:, :, :, m * 3 : (m + 1) * 3].reshape(5, -1)
        np.testing.assert_allclose(grams[m], sub @ sub.T, rtol=1e-5, atol=1e-5)
    whole = keras.ops.convert_to_numpy(ntk.module_gram(keras.ops.convert_to_tensor(jac), None, 1))
    np.testing.assert_allclose(whole[0], jac.reshape(5, -1) @ jac.reshape(5, -1).T, rtol=1e-5, atol=1e-4)


def test_repeated_probe_reads_fresh_weights():
    m = models.mlp()
    x = models.probe_batch(m, 3)
    models.set_weights_deterministic(m)
    first = keras_mat.module_lambda_max(m, x)
    m.get_layer("fc1").kernel.assign(m.get_layer("fc1").kernel * 2.0)
    second = keras_mat.module_lambda_max(m, x)
    # fc0's Jacobian is linear in fc1's kernel: lambda scales by 4.
    np.testing.assert_allclose(second["fc0"], 4 * first["fc0"], rtol=1e-4)


# ----------------------------------------------------------------------------- errors


def test_bad_options_raise_with_names():
    m = models.mlp()
    x = models.probe_batch(m, 2)
    with pytest.raises(ValueError, match="ntk_output='nope'"):
        keras_mat.module_lambda_max(m, x, ntk_output="nope")
    with pytest.raises(ValueError, match="method='power'"):
        keras_mat.module_lambda_max(m, x, method="power")
    with pytest.raises(ValueError, match="y=None"):
        keras_mat.module_lambda_max(m, x, ntk_output="loss", loss="mse")
    with pytest.raises(ValueError, match="loss=None"):
        keras_mat.module_lambda_max(m, x, y=np.zeros((2, 3)), ntk_output="loss")


def test_probe_batch_of_wrong_shape():
    m = models.mlp(inputs=4)
    with pytest.raises(ValueError, match=r"Received: x of shape \(3, 5\)"):
        keras_mat.module_lambda_max(m, np.zeros((3, 5), "float32"))
    with pytest.raises(ValueError, match="leading batch axis"):
        keras_mat.module_lambda_max(m, np.float32(1.0))


def test_non_finite_lambda_raises():
    m = models.mlp()
    models.set_weights_deterministic(m)
    m.get_layer("fc0").kernel.assign(np.full((4, 5), np.inf, "float32"))
    with pytest.raises(ValueError, match="Non-finite lambda_max"):
        keras_mat.module_lambda_max(m, models.probe_batch(m, 2))


# ----------------------------------------------------------------------------- cross-backend

_XB_SCRIPT = r"""
import json, sys
import numpy as np
import keras, keras_mat
from tests import models
from tests.cross_backend import only_in_jax_session, run_in_every_backend
out = {}
for name in ["mlp", "mha", "cnn", "moe"]:
    m = getattr(models, name)()
    models.set_weights_deterministic(m)
    keras_mat.annotate(m)
    lam = keras_mat.module_lambda_max(m, models.probe_batch(m, 3), ntk_output="sum" if name == "mha" else "logits")
    out[name] = {k: v.tolist() for k, v in lam.items()}
json.dump(out, sys.stdout)
"""


@only_in_jax_session
def test_backends_agree_on_identical_weights():
    results = run_in_every_backend(_XB_SCRIPT)
    for model_name, fams in results["jax"].items():
        for fam, values in fams.items():
            for backend in ("tensorflow", "torch"):
                other = results[backend][model_name][fam]
                assert _rel_err(other, values) < 1e-4, (backend, model_name, fam, other, values)


def _unusual(name):
    rng = np.random.RandomState(3)
    if name == "conv_transpose":
        return models.conv_transpose(), rng.randn(3, 4, 4, 2).astype("float32")
    if name == "nested_multi_io":
        return models.nested_multi_io(), {
            "a": rng.randn(3, 3).astype("float32"),
            "b": rng.randn(3, 2).astype("float32"),
        }
    if name == "subclassed":
        m = models.Subclassed()
        m(np.zeros((1, 3, 4), "float32"))
        return m, rng.randn(3, 3, 4).astype("float32")
    m = models.cross_attention()
    return m, [rng.randn(3, 3, 4).astype("float32"), rng.randn(3, 5, 6).astype("float32")]


@pytest.mark.parametrize("name", ["conv_transpose", "nested_multi_io", "subclassed", "cross_attention"])
def test_unusual_architectures_match_reference(name):
    m, x = _unusual(name)
    fast, _ = _check_against_reference(m, x, "logits")
    assert len(fast) >= 2
