"""Run one script under every Keras backend (each in its own process)."""

import json
import os
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("jax", "tensorflow", "torch")

#: The cross-backend tests start one subprocess per backend and cover all three,
#: so they run once, in the KERAS_BACKEND=jax session, instead of three times.
only_in_jax_session = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="Runs all three backends in subprocesses; done once, in the KERAS_BACKEND=jax session.",
)


def run_in_every_backend(script):
    """`{backend: the JSON the script printed last}`; fails on a non-zero exit."""
    results = {}
    for backend in BACKENDS:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        proc = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"{backend}: {proc.stderr[-3000:]}"
        results[backend] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results
