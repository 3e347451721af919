"""Writes docs/api.md from the docstrings of keras_mat's public names.

python docs/make_api.py        # or: make docs
"""

import inspect
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("KERAS_BACKEND", "jax")

import keras_mat  # noqa: E402

# The order of the page: what a user meets first comes first.
ORDER = [
    "annotate",
    "wrap",
    "MATCallback",
    "plot_lambda",
    "module_lambda_max",
    "ModularAdaptiveOptimizer",
    "ModuleGroup",
    "discover_groups",
    "get_groups",
    "RandomModules",
    "Multirate",
    "measure",
    "sync_trainable",
]
MODULES = {"flops": ["count_flops", "step_flops"]}


def public_names():
    names = [n for n in keras_mat.__all__ if not n.startswith("_")]
    objects = [n for n in names if not inspect.ismodule(getattr(keras_mat, n))]
    return sorted(objects, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def section(qualname, obj):
    try:
        signature = str(inspect.signature(obj))
    except (TypeError, ValueError):
        signature = "(...)"
    kind = "class" if inspect.isclass(obj) else "def"
    doc = inspect.getdoc(obj) or "(no docstring)"
    return f"## `{qualname}`\n\n```python\n{kind} {qualname}{signature}\n```\n\n```text\n{doc}\n```\n"


def render():
    parts = [
        "# API reference\n",
        "Generated from the docstrings by `docs/make_api.py` (`make docs`). Start with `annotate`, "
        "`wrap` and `MATCallback`; [algorithm.md](algorithm.md) explains the options.\n",
    ]
    for name in public_names():
        parts.append(section(f"keras_mat.{name}", getattr(keras_mat, name)))
    for module, names in MODULES.items():
        for name in names:
            parts.append(section(f"keras_mat.{module}.{name}", getattr(getattr(keras_mat, module), name)))
    return "\n".join(parts)


if __name__ == "__main__":
    with open(os.path.join(HERE, "api.md"), "w") as f:
        f.write(render())
