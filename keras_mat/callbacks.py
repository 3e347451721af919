"""Callbacks: `MATCallback` (MAT inside `fit`, with its measurement log) and
`plot_lambda` (the heatmap of that log, from `keras_mat.plotting`)."""

from keras_mat.plotting import plot_lambda
from keras_mat.training import MATCallback

__all__ = ["MATCallback", "plot_lambda"]
