"""Keras's own optimizer test cases, run with every optimizer class wrapped.

Each Keras optimizer class in a Keras test module is replaced by a
`ModularAdaptiveOptimizer` around it (every variable its own one-module
family, masks all on): the wrapper must behave as the bare optimizer does,
weight decay, clipping, EMA and gradient accumulation included.
"""

import importlib
import unittest

import keras
import pytest

from keras_mat import ModularAdaptiveOptimizer, ModuleGroup, annotate_variables
from keras_mat.groups import group_of

MODULES = (
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "ftrl",
    "lamb",
    "lion",
    "nadam",
    "rmsprop",
    "sgd",
)
# Inherent to any wrapper: the wrapper's own variables add to the count, and
# the config test compares the bare optimizer's config keys.
LEFT_OUT = {"test_single_step": "sgd", "test_config": None}


def _wrapped(cls):
    class Wrapped(ModularAdaptiveOptimizer):
        def __init__(self, *args, **kwargs):
            super().__init__(cls(*args, **kwargs), policy=None)

        def build(self, var_list):
            for v in var_list:
                if group_of(v)[0] is None:
                    annotate_variables([ModuleGroup(f"v{id(v)}", [v], None, 1, "custom")])
            super().build(var_list)

    return Wrapped


def _cases(name):
    module = importlib.import_module(f"keras.src.optimizers.{name}_test")
    for attr in dir(module):
        obj = getattr(module, attr)
        if isinstance(obj, type) and issubclass(obj, keras.optimizers.Optimizer):
            if not issubclass(obj, ModularAdaptiveOptimizer):
                setattr(module, attr, _wrapped(obj))
    suite = unittest.defaultTestLoader.loadTestsFromModule(module)
    out = []

    def flatten(s):
        for t in s:
            if isinstance(t, unittest.TestSuite):
                flatten(t)
            else:
                out.append(t)

    flatten(suite)
    return [
        t for t in out if not (t._testMethodName in LEFT_OUT and LEFT_OUT[t._testMethodName] in (None, name))
    ]


@pytest.mark.parametrize("name", MODULES)
def test_keras_optimizer_cases_pass_through_the_wrapper(name):
    cases = _cases(name)
    assert cases, name
    result = unittest.TestResult()
    for case in cases:
        case.run(result)
    problems = [f"{t.id()}: {tb.strip().splitlines()[-1]}" for t, tb in result.failures + result.errors]
    assert not problems, "\n".join(problems)
    assert result.testsRun == len(cases)
