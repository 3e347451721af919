"""The package builds (`python -m build`) and installs (`pip install .`) in a clean virtual
environment, with its licence, and its metadata pins nothing.

Needs the package index that `make` installs from; about a minute. It runs in the JAX session
of the suite only (packaging does not depend on the Keras backend).
"""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="packaging is backend-independent: checked once, in the JAX session",
)


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A copy of the working tree without environments and build outputs (the build writes
    into its source folder)."""
    src = tmp_path_factory.mktemp("pkg") / "src"
    skip = (".venv", ".git", "results", "*.egg-info", "build", "dist", "__pycache__", ".cache")
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*skip))
    return src


def test_build_makes_a_wheel_and_sdist_with_the_licence(source, tmp_path):
    out = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(source)])
    wheels = list(out.glob("keras_mat-*.whl"))
    sdists = list(out.glob("keras_mat-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, os.listdir(out)
    with zipfile.ZipFile(wheels[0]) as whl:
        names = whl.namelist()
        metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "keras_mat/__init__.py" in names and "keras_mat/plotting.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert any(r.startswith("Requires-Dist: keras") for r in requires)
    pinned = [r for r in requires if "==" in r.split(";")[0]]
    assert not pinned, pinned  # ranges only: exact pins live in constraints.txt
    with tarfile.open(sdists[0]) as sdist:
        members = {m.split("/", 1)[-1] for m in sdist.getnames()}
    assert {"LICENSE", "pyproject.toml", "README.md", "keras_mat/plotting.py"} <= members


def test_pip_install_in_a_clean_venv_imports(source, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    constraints = os.path.join(ROOT, "constraints.txt")
    _run([python, "-m", "pip", "install", "--quiet", "-c", constraints, f"{source}[jax]"])
    code = (
        "import importlib.metadata as m, keras, keras_mat; "
        "print(keras_mat.__version__, m.version('keras-mat'), keras.config.backend())"
    )
    env = dict(os.environ, KERAS_BACKEND="jax")
    version, dist_version, backend = _run([python, "-c", code], env=env, cwd=str(tmp_path)).split()
    assert version == dist_version and backend == "jax"
    # The installed copy, not the working tree, was imported.
    where = _run([python, "-c", "import keras_mat; print(keras_mat.__file__)"], env=env, cwd=str(tmp_path))
    assert str(venv) in where
