"""Compatibility shim: the research harness lives in `benchmarks/harness/common.py`.

Scripts should put `benchmarks/harness` on `sys.path` and `import common`;
this file only keeps `import common` with `examples/` on `sys.path` working.
"""

import importlib.util
import os
import sys

_HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "harness")
if _HARNESS not in sys.path:
    sys.path.insert(0, _HARNESS)
_spec = importlib.util.spec_from_file_location("common", os.path.join(_HARNESS, "common.py"))
_module = importlib.util.module_from_spec(_spec)
sys.modules["common"] = _module
_spec.loader.exec_module(_module)
