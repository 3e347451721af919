"""keras_mat: Modular Adaptive Training for Keras 3 (JAX, TensorFlow, PyTorch)."""

from keras_mat import baselines, callbacks, policy
from keras_mat.baselines import Multirate, RandomModules
from keras_mat.callbacks import MATLogger, plot_lambda
from keras_mat.groups import ModuleGroup, annotate, discover_groups, get_groups
from keras_mat.ntk import module_lambda_max
from keras_mat.optimizer import ModularAdaptiveOptimizer, wrap
from keras_mat.training import apply_measurement
from keras_mat.version import __version__

__all__ = [
    "MATLogger",
    "Multirate",
    "RandomModules",
    "ModularAdaptiveOptimizer",
    "ModuleGroup",
    "__version__",
    "annotate",
    "apply_measurement",
    "baselines",
    "callbacks",
    "discover_groups",
    "get_groups",
    "module_lambda_max",
    "plot_lambda",
    "policy",
    "wrap",
]
