"""lambda_max under `keras.distribution.DataParallel` (JAX, 4 simulated CPU
devices) equals the one-device value, for a model whose probe mixes the
factored route (a strided patch-embedding convolution, the Dense head) and
the per-sample route (attention heads), for a pure CNN, and with every
variable on the per-sample route.

The number of simulated devices must be set before JAX initializes, so the
check runs in its own process.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.cross_backend import ROOT

_SCRIPT = r"""
import json
import numpy as np
import keras
import keras_mat

L = keras.layers


def patch_attention():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(12, 4, strides=4, name="patch")(inp)
    x = L.Reshape((4, 12))(x)
    x = L.MultiHeadAttention(2, 6, name="mha")(x, x)
    x = L.GlobalAveragePooling1D()(x)
    return keras.Model(inp, L.Dense(3, name="head")(x))


def cnn():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="c0")(inp)
    x = L.Conv2D(6, 3, activation="relu", name="c1")(x)
    return keras.Model(inp, L.Dense(3, name="head")(L.Flatten()(x)))


def measure():
    out = {}
    rng = np.random.RandomState(0)
    x = rng.randn(8, 8, 8, 3).astype("float32")
    for name, build in (("patch_attention", patch_attention), ("cnn", cnn)):
        keras.utils.set_random_seed(1)
        m = build()
        keras_mat.annotate(m, dense=True)
        for mode in ("sum", "logits"):
            lam = keras_mat.module_lambda_max(m, x, ntk_output=mode)
            out[f"{name}/{mode}"] = {k: v.tolist() for k, v in lam.items()}
        # Every variable on the per-sample route (the convolution's included).
        groups = keras_mat.get_groups(m)
        probe = keras_mat.ntk.get_probe(m, groups, "sum", x=x, route="generic")
        lam = probe(x)
        out[f"{name}/generic"] = {g.name: np.asarray(v).tolist() for g, v in zip(groups, lam)}
    return out


one = measure()
devices = keras.distribution.list_devices()
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
many = measure()
print(json.dumps({"devices": len(devices), "one": one, "data_parallel": many}))
"""


@pytest.mark.skipif(keras.config.backend() != "jax", reason="JAX keras.distribution; runs in the JAX session")
def test_data_parallel_probe_matches_one_device():
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        TF_CPP_MIN_LOG_LEVEL="3",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
    )
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    assert set(result["one"]) == set(result["data_parallel"])
    for case, families in result["one"].items():
        for family, values in families.items():
            got = result["data_parallel"][case][family]
            np.testing.assert_allclose(got, values, rtol=1e-4, err_msg=f"{case} {family}")
