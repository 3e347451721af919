"""keras_mat: Modular Adaptive Training for Keras 3 (JAX, TensorFlow, PyTorch)."""

from keras_mat import baselines, callbacks, flops, policy
from keras_mat.baselines import Multirate, PaperRand, RandomModules
from keras_mat.callbacks import plot_lambda
from keras_mat.groups import ModuleGroup, annotate, annotate_variables, discover_groups, get_groups
from keras_mat.ntk import module_lambda_max, module_spectrum
from keras_mat.optimizer import ModularAdaptiveOptimizer, wrap
from keras_mat.training import MATCallback, measure, sync_trainable, take_probe_set
from keras_mat.version import __version__

__all__ = [
    "MATCallback",
    "Multirate",
    "PaperRand",
    "RandomModules",
    "ModularAdaptiveOptimizer",
    "ModuleGroup",
    "__version__",
    "annotate",
    "annotate_variables",
    "baselines",
    "callbacks",
    "discover_groups",
    "flops",
    "get_groups",
    "measure",
    "module_lambda_max",
    "module_spectrum",
    "plot_lambda",
    "policy",
    "sync_trainable",
    "take_probe_set",
    "wrap",
]
