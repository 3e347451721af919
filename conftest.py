"""Doctest namespace for the examples in keras_mat docstrings."""

import keras
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    import keras_mat

    doctest_namespace.update(keras=keras, keras_mat=keras_mat, np=np)
