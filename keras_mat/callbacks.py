"""`MATLogger` (CSV / TensorBoard / in-memory log of every measurement) and
`plot_lambda` (heatmap of lambda_max per module over time, masks overlaid)."""

from __future__ import annotations

import collections
import csv
import os

import keras
import numpy as np

from keras_mat import backends

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


def _load_rows(source):
    if isinstance(source, MATLogger):
        return source.rows
    if isinstance(source, (str, os.PathLike)):
        with open(source, newline="") as f:
            return [
                {
                    k: (
                        v
                        if k == "family"
                        else float(v)
                        if k in ("lambda_max", "train_flops", "total_flops")
                        else int(v)
                    )
                    for k, v in row.items()
                }
                for row in csv.DictReader(f)
            ]
    if isinstance(source, list):
        return source
    raise TypeError(
        "plot_lambda takes a MATLogger, the path of its CSV, or its rows. "
        f"Received: source of type {type(source).__name__}"
    )


_MAX_ROWS_LABELLED = 80


def plot_lambda(source, path="lambda_max.png", title=None, log_scale=True):
    """Heatmap of lambda_max per module (rows) over measurements (columns).

    Masked (not updated) cells are marked with a dot, permanently frozen ones
    with an x. Up to 80 modules every row is labelled; with more (e.g. the
    filters of a CNN) the figure keeps a readable height, each family is
    labelled once (with its module count) and separated by a line.

    Args:
        source: A `MATLogger`, the path of its CSV, or a list of its rows.
        path: Where to write the PNG.
        title: Optional figure title.
        log_scale: Colour by log10(lambda_max).

    Returns:
        `path`.

    Raises:
        ValueError: if the source holds no measurement.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches  # noqa: F401  (legend patches of the compact view)
    import matplotlib.pyplot as plt

    rows = _load_rows(source)
    if not rows:
        raise ValueError(f"plot_lambda: no measurement to plot. Received: {len(rows)} rows")
    modules = sorted({(r["family"], r["module"]) for r in rows}, key=lambda t: (t[0], t[1]))
    steps = sorted({r["step"] for r in rows})
    mi = {m: i for i, m in enumerate(modules)}
    si = {s: i for i, s in enumerate(steps)}
    lam = np.full((len(modules), len(steps)), np.nan)
    active = np.ones_like(lam, dtype=bool)
    frozen = np.zeros_like(lam, dtype=bool)
    for r in rows:
        i, j = mi[(r["family"], r["module"])], si[r["step"]]
        lam[i, j] = r["lambda_max"]
        active[i, j] = bool(r["active"])
        frozen[i, j] = bool(r["frozen"])
    n = len(modules)
    # One labelled row per module up to `_MAX_ROWS_LABELLED` modules; beyond that the figure
    # stops growing (at most 16 inches), rows are labelled per family, and masked / frozen
    # cells are shaded instead of marked.
    compact = n > _MAX_ROWS_LABELLED
    height = min(16.0, 0.22 * n + 1.5) if compact else max(3, 0.22 * n + 1.5)
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(steps) + 3), height))
    # lambda_max = 0 (e.g. a dead ReLU filter) is drawn black, outside the colour scale.
    positive = lam > 0
    if log_scale:
        shown = np.ma.masked_where(~positive, np.log10(np.where(positive, lam, 1.0)))
    else:
        shown = np.ma.masked_invalid(lam)
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("black")
    im = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap=cmap)
    label = "log10 lambda_max" if log_scale else "lambda_max"
    fig.colorbar(im, ax=ax, label=label + (" (black: 0)" if np.any(~positive & np.isfinite(lam)) else ""))
    masked, stopped = ~active & ~frozen, frozen
    if compact:
        overlay = np.zeros(lam.shape + (4,))
        overlay[masked] = (1.0, 1.0, 1.0, 0.55)
        overlay[stopped] = (1.0, 0.0, 0.0, 0.6)
        ax.imshow(overlay, aspect="auto", interpolation="nearest")
        handles = [
            matplotlib.patches.Patch(color=(1, 1, 1, 0.55), label="masked (shaded)"),
            matplotlib.patches.Patch(color=(1, 0, 0, 0.6), label="frozen"),
        ]
        ax.legend(handles=handles, loc="upper right", fontsize=6)
    else:
        yy, xx = np.nonzero(masked)
        ax.scatter(xx, yy, s=8, c="white", marker="o", label="masked")
        yy, xx = np.nonzero(stopped)
        ax.scatter(xx, yy, s=14, c="red", marker="x", label="frozen")
        ax.legend(loc="upper right", fontsize=6)
    if compact:
        starts = [i for i, (f, _) in enumerate(modules) if i == 0 or modules[i - 1][0] != f]
        sizes = collections.Counter(f for f, _ in modules)
        for i in starts[1:]:
            ax.axhline(i - 0.5, color="white", lw=0.6)
        ax.set_yticks(starts)
        ax.set_yticklabels([f"{modules[i][0]} ({sizes[modules[i][0]]})" for i in starts])
    else:
        ax.set_yticks(range(n))
        ax.set_yticklabels([f"{f}[{m}]" for f, m in modules], fontsize=6)
    ax.set_xticks(range(len(steps)))
    ax.set_xticklabels([str(s) for s in steps], rotation=90, fontsize=6)
    ax.set_xlabel("training step of the measurement")
    ax.set_title(title or "MAT: lambda_max per module")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
