"""The examples and their comparison harness (examples/common.py) run end to
end at a tiny size on every backend."""

import json
import os
import sys

import keras
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data")

sys.path.insert(0, os.path.join(ROOT, "examples"))

import common  # noqa: E402  (examples/common.py)


def _arrays(n, seed):
    x = np.random.RandomState(seed).randn(n, 6, 6, 2).astype("float32")
    y = (x[:, :3, :3, 0].mean(axis=(1, 2)) > 0).astype("int32") + (x[:, 3:, 3:, 1].mean(axis=(1, 2)) > 0)
    return x, y


def _tiny_cnn():
    # One conv layer (4 filter modules) and a classifier (one module): quick to compile.
    inp = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    out = keras.layers.Dense(3, name="fc")(keras.layers.Flatten()(x))
    return keras.Model(inp, out)


def test_compare_runs_all_variants_and_writes_results(tmp_path):
    out = tmp_path / "cmp"
    results = common.compare(
        _tiny_cnn,
        _arrays(64, 0),
        _arrays(32, 1),
        optimizer_fn=lambda: keras.optimizers.Adam(1e-2),
        mat_options=dict(alpha=0.5, beta=1e-3, probe_every=2, probe_samples=4, ntk_output="sum"),
        multirate_options=dict(k=2),
        epochs=2,
        batch_size=16,
        out_dir=str(out),
        verbose=0,
        title="tiny",
    )
    assert list(results) == ["plain", "mat", "rand", "multirate"]
    plain = results["plain"]
    for name, r in results.items():
        assert len(r["epochs"]) == 2, name
        assert all(0.0 <= e["metric"] <= 1.0 for e in r["epochs"]), name
        flops = [e["train_flops"] for e in r["epochs"]]
        assert 0 < flops[0] < flops[1], (name, flops)
        assert r["best"] >= r["final"] - 1e-12 and r["best"] == max(e["metric"] for e in r["epochs"])
        assert r["target"] == plain["best"]
        assert r["at_equal_flops"] is None or 0.0 <= r["at_equal_flops"] <= 1.0
    # Same epochs and batches: masked variants never cost more than plain, and
    # the same analytic model counts them (MAT's first step trains everything).
    assert plain["flops_to_target"] is not None and plain["flops_ratio_to_target"] == 1.0
    for name in ("mat", "rand", "multirate"):
        assert results[name]["train_flops"] <= plain["train_flops"] * (1 + 1e-9), name
    assert results["mat"]["total_flops"] > results["mat"]["train_flops"]  # probes
    assert results["rand"]["total_flops"] == results["rand"]["train_flops"]  # no probe
    # Rand is compute-matched to MAT: the same number of active modules per family.
    for fam, active in results["mat"]["final_active"].items():
        assert sum(results["rand"]["final_active"][fam]) == sum(active), fam
    table = (out / "results.md").read_text()
    assert table.startswith("## tiny") and all(f"| {v} |" in table for v in results)
    saved = json.loads((out / "results.json").read_text())
    assert saved["records"]["plain"]["best"] == plain["best"]
    assert os.path.getsize(out / "val_vs_flops.png") > 1000
    assert os.path.getsize(out / "lambda_max.png") > 1000


def test_compare_rejects_bad_arguments(tmp_path):
    kw = dict(optimizer_fn=keras.optimizers.Adam, mat_options={}, epochs=1, out_dir=str(tmp_path), verbose=0)
    data = _arrays(8, 0)
    with pytest.raises(ValueError, match="variants"):
        common.compare(_tiny_cnn, data, data, variants=("plain", "sage"), **kw)
    with pytest.raises(ValueError, match="include 'mat'"):
        common.compare(_tiny_cnn, data, data, variants=("plain", "rand"), **kw)
    with pytest.raises(ValueError, match="mode"):
        common.compare(_tiny_cnn, data, data, mode="up", **kw)


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(DATA, "cifar10-jpeg", "cifar-10-jpeg-q75.zip")),
    reason="needs the offline CIFAR-10 JPEG archive in ../shared/data (present on CI and dev machines)",
)
def test_vgg_cifar10_example_runs_offline(tmp_path):
    import vgg_cifar10

    argv = [
        "--data-dir", DATA, "--cache-dir", str(tmp_path / "cache"),
        "--train-samples", "256", "--val-samples", "128", "--depth", "11", "--width", "0.0625",
        "--epochs", "1", "--batch-size", "64", "--probe-every", "2", "--probe-samples", "4",
        "--ntk-output", "sum", "--out-dir", str(tmp_path / "out"), "--verbose", "0",
        # MAT only: compiling each variant's VGG step costs seconds; the harness runs all
        # four variants in test_compare_runs_all_variants_and_writes_results.
        "--variants", "mat",
    ]  # fmt: skip
    results = vgg_cifar10.main(argv)
    assert list(results) == ["mat"]
    # VGG11: 8 conv layers of filters (64 x 0.0625 = 4 in the first) and the classifier.
    families = results["mat"]["final_active"]
    assert len(families) == 9 and len(families["conv1/filters"]) == 4 and len(families["classifier"]) == 1
    for r in results.values():
        assert 0.0 <= r["final"] <= 1.0 and r["train_flops"] > 0
    assert os.path.getsize(tmp_path / "out" / "results.md") > 100
    # The decoded subset is cached: a second load reads it and gives the same shuffled images.
    (a, _), _ = vgg_cifar10.load_cifar10(DATA, str(tmp_path / "cache"), 256, 128, 0, 0)
    (b, yb), _ = vgg_cifar10.load_cifar10(DATA, str(tmp_path / "cache2"), 256, 128, 0, 0)
    np.testing.assert_array_equal(a, b)
    assert len(set(yb.tolist())) == 10  # shuffled: every class among the first 256
