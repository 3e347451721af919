"""Output helpers shared by the benchmark scripts."""

from __future__ import annotations

import numpy as np


def emit(lines, path=None):
    """Prints `lines` (a list of strings) and, with `path`, writes them there as one text file."""
    text = "\n".join(lines)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    return text


def json_safe(x):
    """`x` with numpy arrays and scalars turned into lists and Python numbers, other objects into strings."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "tolist"):
        return np.asarray(x).tolist()
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return str(x)
