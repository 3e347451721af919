"""The README's demo runs end to end (tiny size) on every backend."""

import os
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data")


@pytest.mark.skipif(
    not os.path.isdir(os.path.join(DATA, "keras_home", "datasets", "fashion-mnist")),
    reason="needs the offline Fashion-MNIST copy in ../shared/data (present on CI and dev machines)",
)
def test_demo_runs_offline(tmp_path):
    # A subprocess: the demo sets KERAS_HOME before importing Keras, as a user's run does.
    cmd = [
        sys.executable,
        os.path.join(ROOT, "examples", "demo.py"),
        "--data-dir", DATA,
        "--train-samples", "128",
        "--test-samples", "64",
        "--epochs", "1",
        "--batch-size", "32",
        "--probe-every", "2",
        "--out-dir", str(tmp_path / "out"),
    ]  # fmt: skip
    env = dict(os.environ, KERAS_BACKEND=keras.config.backend(), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "attention/heads" in out and "conv2/filters" in out
    assert "plain AdamW" in out and "analytic training FLOPs" in out
    assert os.path.getsize(tmp_path / "out" / "lambda_max.png") > 1000
