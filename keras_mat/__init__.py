"""keras_mat: Modular Adaptive Training for Keras 3 (JAX, TensorFlow, PyTorch)."""

from keras_mat.groups import ModuleGroup, annotate, discover_groups, get_groups
from keras_mat.ntk import module_lambda_max
from keras_mat.version import __version__

__all__ = [
    "ModuleGroup",
    "__version__",
    "annotate",
    "discover_groups",
    "get_groups",
    "module_lambda_max",

]
