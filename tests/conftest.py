"""Shared test set-up. The suite runs once per KERAS_BACKEND."""

import os

import keras
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield


def pytest_report_header(config):
    return f"keras backend: {keras.config.backend()}"
