"""`MATLogger`: CSV / TensorBoard / in-memory log of every measurement.

`plot_lambda` (the heatmap of those logs) lives in `keras_mat.plotting` and
is importable from here as well."""

from __future__ import annotations

import csv
import os

import keras
import numpy as np

from keras_mat import backends
from keras_mat.plotting import plot_lambda  # noqa: F401  (its former home; keeps old imports working)

_FIELDS = (
    "step",
    "measurement",
    "family",
    "module",
    "lambda_max",
    "active",
    "frozen",
    "train_flops",
    "total_flops",
)


def _mat(model):
    from keras_mat.training import find_mat_optimizer

    return find_mat_optimizer(getattr(model, "optimizer", None))


class MATLogger(keras.callbacks.Callback):
    """Logs lambda_max, masks and frozen modules after every MAT measurement.

    Works with the MAT training step (a `keras_mat.wrap` optimizer) and with
    measurement-only mode (plain optimizer). Rows are kept in `self.rows`
    (one per module and measurement) and optionally written to a CSV file and
    to TensorBoard (`tf.summary`, needs TensorFlow installed; any backend).

    Args:
        csv_path: Optional path of a CSV file with columns `step,
            measurement, family, module, lambda_max, active, frozen`.
        tensorboard_dir: Optional TensorBoard log directory.
        append: Append to an existing CSV (e.g. when resuming).

    Example:

    >>> logger = MATLogger("mat.csv")
    >>> # model.fit(x, y, callbacks=[logger]); keras_mat.plot_lambda(logger, "lambda.png")
    """

    def __init__(self, csv_path=None, tensorboard_dir=None, append=False):
        super().__init__()
        self.csv_path = csv_path
        self.tensorboard_dir = tensorboard_dir
        self.append = append
        self.rows = []
        self._writer = None
        self._seen_measurements = set()
        self._history_len = 0

    def on_train_begin(self, logs=None):
        if self.csv_path and not (self.append and os.path.exists(self.csv_path)):
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(_FIELDS)
        if self.tensorboard_dir and self._writer is None:
            try:
                import tensorboard  # noqa: F401  (tf.summary needs it since TF 2.21)
                import tensorflow as tf
            except ImportError as err:  # pragma: no cover - depends on the install
                raise ImportError(
                    "MATLogger(tensorboard_dir=...) writes with tf.summary: install tensorflow "
                    "and tensorboard (pip install 'keras-mat[tensorflow,plot]'). "
                    f"Received: tensorboard_dir={self.tensorboard_dir!r}"
                ) from err
            self._writer = tf.summary.create_file_writer(self.tensorboard_dir)
        self._history_len = len(getattr(self.model, "keras_mat_history", []))
        mat = _mat(self.model)
        # Variables are current at train begin (even on JAX); afterwards the
        # step is counted here so that JAX syncs only after measurement steps.
        self._step = int(keras.ops.convert_to_numpy(mat.iterations.value)) if mat is not None else 0

    def _emit(self, step, measurement, lam, masks, frozen, logs=None):
        logs = logs or {}
        flops = (
            float(logs.get("mat_train_flops", float("nan"))),
            float(logs.get("mat_total_flops", float("nan"))),
        )
        new = []
        for fam in lam:
            for i, value in enumerate(np.asarray(lam[fam]).reshape(-1)):
                new.append(
                    {
                        "step": int(step),
                        "measurement": int(measurement),
                        "family": fam,
                        "module": i,
                        "lambda_max": float(value),
                        "active": int(bool(masks[fam][i])) if masks is not None else 1,
                        "frozen": int(bool(frozen[fam][i])) if frozen is not None else 0,
                        "train_flops": flops[0],
                        "total_flops": flops[1],
                    }
                )
        self.rows.extend(new)
        if self.csv_path:
            with open(self.csv_path, "a", newline="") as f:
                w = csv.writer(f)
                for r in new:
                    w.writerow([r[k] for k in _FIELDS])
        if self._writer is not None:
            import tensorflow as tf

            with self._writer.as_default(step=int(step)):
                total = max(len(new), 1)
                tf.summary.scalar("mat/active_fraction", sum(r["active"] for r in new) / total)
                tf.summary.scalar("mat/frozen_fraction", sum(r["frozen"] for r in new) / total)
                for fam in lam:
                    tf.summary.histogram(f"mat/lambda_max/{fam}", np.asarray(lam[fam], np.float32))
            self._writer.flush()

    def on_train_batch_end(self, batch, logs=None):
        mat = _mat(self.model)
        if mat is None:
            history = getattr(self.model, "keras_mat_history", [])
            for rec in history[self._history_len :]:
                self._emit(rec["step"], len(self._seen_measurements), rec["lambda_max"], None, None)
                self._seen_measurements.add(rec["step"])
            self._history_len = len(history)
            return
        self._step += 1
        if mat.policy != "mat" or (self._step - 1) % int(mat.probe_every) != 0:
            return
        if backends.name() == "jax":
            # fit keeps the JAX state outside the Variables between steps.
            self.model.jax_state_sync()
        measurement = int(keras.ops.convert_to_numpy(mat.num_measurements.value))
        if measurement == 0 or measurement in self._seen_measurements:
            return
        self._seen_measurements.add(measurement)
        self._emit(self._step - 1, measurement - 1, mat.lambda_max, mat.masks, mat.frozen, logs)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
