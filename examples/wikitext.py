"""Compatibility shim: the research harness lives in `benchmarks/harness/wikitext.py`.

Scripts should put `benchmarks/harness` on `sys.path` and `import wikitext`;
this file only keeps `import wikitext` with `examples/` on `sys.path` working.
"""

import importlib.util
import os
import sys

_HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "harness")
if _HARNESS not in sys.path:
    sys.path.insert(0, _HARNESS)
_spec = importlib.util.spec_from_file_location("wikitext", os.path.join(_HARNESS, "wikitext.py"))
_module = importlib.util.module_from_spec(_spec)
sys.modules["wikitext"] = _module
_spec.loader.exec_module(_module)
