"""`make demo` (examples/demo.py) runs on the data shipped in examples/data, on every backend."""

import gzip
import hashlib
import os
import sys

import keras
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import demo  # noqa: E402  (examples/demo.py)


def test_shipped_data_is_small_and_intact():
    data = os.path.join(ROOT, "examples", "data")
    total = sum(os.path.getsize(os.path.join(data, f)) for f in os.listdir(data))
    assert total < 3 * 2**20, total
    # The text slices are the leading lines of the WikiText-2 splits, as examples/data/README.md says.
    readme = open(os.path.join(data, "README.md")).read()
    for name in ("wikitext2_test_head.txt.gz", "wikitext2_valid_head.txt.gz"):
        with gzip.open(os.path.join(data, name)) as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        assert digest in readme, name
    (x, y), (xt, yt) = demo.load_images(data)
    assert x.shape == (2000, 28, 28, 1) and xt.shape == (500, 28, 28, 1) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and set(y.tolist()) == set(range(10)) == set(yt.tolist())
    (tx, ty), (vx, vy) = demo.load_text(data, limit=64)
    assert tx.shape == ty.shape == (64, 32) and vx.shape == (256, 32)
    np.testing.assert_array_equal(tx[:, 1:], ty[:, :-1])  # next word
    assert tx.max() < 1000 and np.mean(tx == 0) < 0.3  # three words in four are in the vocabulary


def test_rand_matches_mat_per_kind():
    rows = []
    masks = {  # measurement -> family -> active flags
        0: {"a/heads": [1, 1], "b/heads": [1, 1], "c/filters": [1, 1, 1]},
        1: {"a/heads": [1, 1], "b/heads": [0, 0], "c/filters": [0, 1, 0]},
    }
    for m, per in masks.items():
        for family, flags in per.items():
            rows += [dict(measurement=m, family=family, module=i, active=a) for i, a in enumerate(flags)]
    kinds = {"a/heads": "head", "b/heads": "head", "c/filters": "filter"}
    fractions = demo.rand_fractions(rows, kinds)
    assert fractions["c/filters"] == [1.0, pytest.approx(1 / 3)]
    assert fractions["a/heads"][0] == fractions["b/heads"][0] == 1.0
    # Two of the four heads at measurement 1, drawn over both layers.
    assert fractions["a/heads"][1] * 2 + fractions["b/heads"][1] * 2 == 2


@pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="`make demo` runs on JAX; the code it drives (annotate, wrap, MATCallback, schedules) "
    "is tested on every backend in test_training.py and test_baselines.py",
)
def test_demo_runs_and_shows_masks_changing(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--out-dir", str(out), "--train-samples", "64", "--epochs", "3", "--probe-every", "1"]
    results = demo.main(argv)
    printed = capsys.readouterr().out
    for task in ("images", "text"):
        records = results[task]
        assert list(records) == ["plain", "mat", "rand"]
        plain, mat, rand = records["plain"], records["mat"], records["rand"]
        assert all(np.isfinite(r["val_loss"]).all() for r in records.values())
        # MAT and Rand update fewer modules, so they cost less than plain; Rand draws as many.
        assert mat["gflop"][-1] < plain["gflop"][-1] and rand["gflop"][-1] < plain["gflop"][-1]
        assert mat["probe_gflop"] > 0 and rand["probe_gflop"] == 0
        assert os.path.getsize(out / f"{task}_lambda.png") > 1000
        assert os.path.getsize(out / f"{task}_masks_and_loss.png") > 1000
        log = open(out / f"{task}_mat.csv").read().splitlines()
        steps = {int(line.split(",")[0]) for line in log[1:]}
        assert len(steps) >= 3  # several measurements, so masks can change
        assert any(line.split(",")[5] == "0" for line in log[1:])  # some module was masked
    assert "images: Fashion-MNIST" in printed and "text: WikiText-2" in printed
    assert printed.count("plain  ") >= 2 and "vs plain" in printed
