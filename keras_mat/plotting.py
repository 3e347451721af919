"""Plots of MAT's measurements: `plot_lambda`, the lambda_max heatmap.

Figures are built with `matplotlib.figure.Figure` and the Agg canvas
directly, so plotting never changes matplotlib's global backend: inline
plots in notebooks keep working, and scripts need no display.
"""

from __future__ import annotations

import collections
import csv
import os

import numpy as np

#: Columns `plot_lambda` needs in each row (a `MATCallback` records more).
REQUIRED_COLUMNS = ("step", "family", "module", "lambda_max", "active", "frozen")
_INT_COLUMNS = ("step", "measurement", "module", "active", "frozen")
_MAX_ROWS_LABELLED = 80


def _parse(column, value):
    if column in _INT_COLUMNS:
        return int(value)
    if column == "lambda_max":
        return float(value)
    try:  # other columns (e.g. FLOPs counters) are numbers when they parse, else text
        return value if column == "family" else float(value)
    except ValueError:
        return value


def read_log_csv(path):
    """Reads the CSV file written by `keras_mat.MATCallback(csv_path=...)`.

    Args:
        path: Path of the CSV file.

    Returns:
        A list of dicts, one per module and measurement, with int `step`,
        `measurement`, `module`, `active` and `frozen`, float `lambda_max`,
        str `family`, and any other column as float where it parses.

    Raises:
        ValueError: if a required column is missing, or a row is incomplete
            or holds a value that does not parse (e.g. a file cut off in the
            middle of a row by an interrupted run).
    """
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{path} is not a MATCallback CSV file: columns {missing} are missing. Received: columns={header}"
            )
        for row in reader:
            line = reader.line_num
            if None in row or any(v is None or v == "" for v in row.values()):
                filled = sum(v not in (None, "") for k, v in row.items() if k is not None)
                raise ValueError(
                    f"{path}, line {line}: the row is incomplete ({filled} of {len(header)} fields); "
                    "the file may have been cut off in the middle of a row. Delete that line (or "
                    f"rerun) and plot again. Received: {dict(row)}"
                )
            try:
                rows.append({k: _parse(k, v) for k, v in row.items()})
            except ValueError as err:
                raise ValueError(
                    f"{path}, line {line}: a value does not parse ({err}); the file may have been cut "
                    f"off in the middle of a row. Received: {dict(row)}"
                ) from None
    return rows


def _checked(rows):
    """The rows with the columns `plot_lambda` reads, as numbers (family as text)."""
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"plot_lambda: each row must be a dict. Received: row {i} = {row!r}")
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"plot_lambda: row {i} has no {missing}. Received: row {i} = {row!r}")
        clean = {"family": str(row["family"])}
        for column in ("step", "module", "lambda_max", "active", "frozen"):
            try:
                clean[column] = float(row[column]) if column == "lambda_max" else int(row[column])
            except (TypeError, ValueError):
                raise ValueError(
                    f"plot_lambda: `{column}` of row {i} is not a number. Received: {column}={row[column]!r}"
                ) from None
        out.append(clean)
    return out


def _load_rows(source):
    if isinstance(source, (str, os.PathLike)):
        return _checked(read_log_csv(source))
    if isinstance(source, (list, tuple)):
        return _checked(source)
    rows = getattr(source, "rows", None)  # a MATCallback
    if isinstance(rows, list):
        return _checked(rows)
    raise TypeError(
        "plot_lambda takes a MATCallback, the path of its CSV file, or a list of its rows. "
        f"Received: source of type {type(source).__name__}"
    )


def plot_lambda(source, path=None, title=None, log_scale=True):
    """Heatmap of lambda_max per module (rows) over measurements (columns).

    Masked (not updated) cells are marked with a white dot, permanently
    frozen ones with a red x. Up to 80 modules every row is labelled; with
    more (e.g. the filters of a CNN) the figure keeps a readable height, each
    family is labelled once (with its module count) and masked / frozen
    cells are shaded. A module with lambda_max = 0 (e.g. a dead ReLU filter)
    is drawn black, outside the colour scale.

    The figure is built without pyplot and never changes matplotlib's
    backend: in a notebook, the returned figure displays inline.

    Args:
        source: A `keras_mat.MATCallback` (its `rows`), the path of its CSV
            file, or a list of its rows (dicts with `step`, `family`,
            `module`, `lambda_max`, `active` and `frozen`).
        path: Optional file to save the figure to (any format matplotlib
            writes, e.g. `"lambda.png"`).
        title: Optional figure title.
        log_scale: Colour by log10(lambda_max).

    Returns:
        The `matplotlib.figure.Figure`.

    Raises:
        ValueError: if the source holds no measurement, a row lacks a column
            or holds a value that is not a number, or the CSV file is
            incomplete (see `read_log_csv`).
        TypeError: if `source` or `path` is of an unsupported type.

    Example:

    >>> rows = [dict(step=s, family="dense", module=0, lambda_max=1.0 + s, active=1, frozen=0)
    ...         for s in (0, 10)]
    >>> fig = keras_mat.plot_lambda(rows)
    >>> type(fig).__name__
    'Figure'
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if path is not None and not isinstance(path, (str, os.PathLike)) and not hasattr(path, "write"):
        raise TypeError(
            f"`path` must be a file path, a writable file object or None. Received: path={path!r}"
        )
    rows = _load_rows(source)
    if not rows:
        raise ValueError(f"plot_lambda: no measurement to plot. Received: {len(rows)} rows")
    modules = sorted({(r["family"], r["module"]) for r in rows})
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
    compact = n > _MAX_ROWS_LABELLED
    height = min(16.0, 0.22 * n + 1.5) if compact else max(3.0, 0.22 * n + 1.5)
    fig = Figure(figsize=(max(4.0, 0.35 * len(steps) + 3), height))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positive = lam > 0
    if log_scale:
        shown = np.ma.masked_where(~positive, np.log10(np.where(positive, lam, 1.0)))
    else:
        shown = np.ma.masked_invalid(lam)
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("black")
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap=cmap)
    label = "log10 lambda_max" if log_scale else "lambda_max"
    if np.any(~positive & np.isfinite(lam)):
        label += " (black: 0)"
    fig.colorbar(image, ax=ax, label=label)
    masked, stopped = ~active & ~frozen, frozen
    if compact:
        overlay = np.zeros(lam.shape + (4,))
        overlay[masked] = (1.0, 1.0, 1.0, 0.55)
        overlay[stopped] = (1.0, 0.0, 0.0, 0.6)
        ax.imshow(overlay, aspect="auto", interpolation="nearest")
        handles = [
            Patch(color=(1, 1, 1, 0.55), label="masked (shaded)"),
            Patch(color=(1, 0, 0, 0.6), label="frozen"),
        ]
        ax.legend(handles=handles, loc="upper right", fontsize=6)
        starts = [i for i, (f, _) in enumerate(modules) if i == 0 or modules[i - 1][0] != f]
        sizes = collections.Counter(f for f, _ in modules)
        for i in starts[1:]:
            ax.axhline(i - 0.5, color="white", lw=0.6)
        ax.set_yticks(starts)
        ax.set_yticklabels([f"{modules[i][0]} ({sizes[modules[i][0]]})" for i in starts])
    else:
        yy, xx = np.nonzero(masked)
        ax.scatter(xx, yy, s=8, c="white", marker="o", label="masked")
        yy, xx = np.nonzero(stopped)
        ax.scatter(xx, yy, s=14, c="red", marker="x", label="frozen")
        ax.legend(loc="upper right", fontsize=6, facecolor="0.6")
        ax.set_yticks(range(n))
        ax.set_yticklabels([f"{f}[{m}]" for f, m in modules], fontsize=6)
    ax.set_xticks(range(len(steps)))
    ax.set_xticklabels([str(s) for s in steps], rotation=90, fontsize=6)
    xlabel = "training step of the measurement"
    if len(steps) == 1:
        # One column: the run ended before the second measurement.
        xlabel += "\n(one measurement only: lower probe_every or train longer to see masks change)"
    ax.set_xlabel(xlabel)
    ax.set_title(title or "MAT: lambda_max per module")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
