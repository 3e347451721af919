"""The user-facing text: the README's first screen, the docs and the examples speak of the
project only, and their links resolve."""

import ast
import inspect
import os
import re
import subprocess
import sys

import keras
import pytest

import keras_mat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = os.path.join(ROOT, "..", "shared", "data", "keras_home", "datasets", "fashion-mnist")


def _user_files():
    files = [os.path.join(ROOT, "README.md")]
    for folder in ("docs", "examples"):
        for base, _, names in os.walk(os.path.join(ROOT, folder)):
            files += [os.path.join(base, n) for n in names if n.endswith((".md", ".py"))]
    return files


def test_readme_first_screen():
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    assert any("pip install" in line for line in lines[:60])
    head = "\n".join(lines[:80])
    for call in ("keras_mat.annotate(", "keras_mat.wrap(", "keras_mat.MATCallback(", "plot_lambda("):
        assert call in head, call
    assert os.path.isfile(os.path.join(ROOT, "LICENSE"))


def test_user_text_names_nothing_outside_the_repository():
    history = re.compile(r"session[ -]?[0-9]|\bissue #?[0-9]+|the issue\b", re.IGNORECASE)
    found = []
    for path in _user_files():
        for number, line in enumerate(open(path, encoding="utf-8"), 1):
            if "../shared" in line or history.search(line):
                found.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_relative_links_resolve():
    broken = []
    for path in [os.path.join(ROOT, "README.md")] + [
        os.path.join(ROOT, "docs", n) for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md")
    ]:
        text = open(path, encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            if not os.path.exists(os.path.join(os.path.dirname(path), target)):
                broken.append(f"{os.path.relpath(path, ROOT)} -> {target}")
    assert not broken, broken


def test_api_page_covers_every_public_name():
    page = open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8").read()
    names = [
        n for n in keras_mat.__all__ if not n.startswith("_") and not inspect.ismodule(getattr(keras_mat, n))
    ]
    missing = [n for n in names if f"## `keras_mat.{n}`" not in page]
    assert not missing, f"run `make docs` to add {missing} to docs/api.md"


@pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST),
    reason="needs the offline Fashion-MNIST copy beside the repository (keras.datasets would download it)",
)
def test_readme_example_runs(tmp_path):
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    code = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    # The README's code as written, on fewer samples and steps.
    for old, new in (
        ("6000", "256"),
        ("1000", "64"),
        ("epochs=3", "epochs=2"),
        ("probe_every=20", "probe_every=2"),
    ):
        assert old in code, old
        code = code.replace(old, new)
    home = tmp_path / "keras_home"
    (home / "datasets").mkdir(parents=True)
    os.symlink(os.path.realpath(FASHION_MNIST), home / "datasets" / "fashion-mnist")
    env = dict(
        os.environ, KERAS_HOME=str(home), KERAS_BACKEND=keras.config.backend(), TF_CPP_MIN_LOG_LEVEL="3"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = ast.literal_eval(proc.stdout.strip().splitlines()[-1])  # the printed History dict
    for key in ("mat_active", "mat_frozen", "mat_gflop_trained", "mat_gflop_probes", "mat_gflop_executed"):
        assert len(history[key]) == 2, key
    assert min(history["mat_active"]) < 1.0  # masks changed
    assert os.path.getsize(tmp_path / "lambda.png") > 1000
