"""The user-facing text: the README's first screen, the docs and the examples speak of the
project only, and their links resolve."""

import inspect
import os
import re

import keras_mat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
