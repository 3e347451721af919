"""`keras_mat.plot_lambda` and its CSV reader (keras_mat/plotting.py)."""

import csv
import os
import subprocess
import sys

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

from keras_mat.callbacks import plot_lambda as plot_lambda_from_callbacks
from keras_mat.plotting import plot_lambda, read_log_csv

FIELDS = ("step", "measurement", "family", "module", "lambda_max", "active", "frozen", "train_flops")


def _rows(steps=(0, 10, 20), families=(("attention/heads", 4), ("dense", 1))):
    rows = []
    for r, step in enumerate(steps):
        for family, size in families:
            for m in range(size):
                rows.append(
                    dict(
                        step=step,
                        measurement=r,
                        family=family,
                        module=m,
                        lambda_max=float(m + 1) * (r + 1),
                        active=int(m % 2 == 0),
                        frozen=int(m == 3 and r == 2),
                        train_flops=1e6 * (step + 1),
                    )
                )
    return rows


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        for row in rows:
            writer.writerow([row[k] for k in FIELDS])


def test_returns_a_figure_and_keeps_the_global_backend(tmp_path):
    backend = matplotlib.get_backend()
    fig = plot_lambda(_rows(), str(tmp_path / "lambda.png"), title="three measurements")
    assert isinstance(fig, Figure)
    assert matplotlib.get_backend() == backend
    assert os.path.getsize(tmp_path / "lambda.png") > 1000
    ax = fig.axes[0]
    assert ax.get_title() == "three measurements"
    # Five modules (rows) by three measurements (columns), labelled per module.
    assert ax.images[0].get_array().shape == (5, 3)
    assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["attention/heads[0]", "attention/heads[1]"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "10", "20"]
    # Without a path nothing is written, and the same figure comes back.
    assert isinstance(plot_lambda(_rows()), Figure)
    assert plot_lambda_from_callbacks is plot_lambda


def test_heatmap_values_and_marks():
    fig = plot_lambda(_rows(), log_scale=False)
    ax = fig.axes[0]
    shown = np.ma.getdata(ax.images[0].get_array())
    np.testing.assert_allclose(shown[:, 0], [1, 2, 3, 4, 1])  # heads 0..3, then the dense layer
    np.testing.assert_allclose(shown[:, 2], [3, 6, 9, 12, 3])
    masked, frozen = ax.collections[0].get_offsets(), ax.collections[1].get_offsets()
    # Odd heads are masked at every measurement, except head 3, frozen at the last.
    assert sorted(map(tuple, np.asarray(masked, int).tolist())) == [(0, 1), (0, 3), (1, 1), (1, 3), (2, 1)]
    assert np.asarray(frozen, int).tolist() == [[2, 3]]


def test_reads_the_logger_csv(tmp_path):
    path = tmp_path / "mat.csv"
    _write_csv(path, _rows())
    rows = read_log_csv(path)
    assert rows == _rows()
    assert isinstance(rows[0]["module"], int) and isinstance(rows[0]["lambda_max"], float)
    assert isinstance(plot_lambda(str(path)), Figure)


def test_truncated_csv_names_the_line(tmp_path):
    path = tmp_path / "mat.csv"
    _write_csv(path, _rows())
    text = path.read_text()
    path.write_text(text[: text.rindex(",") - 3])  # cut off inside the last row
    last_line = len(text.splitlines())
    with pytest.raises(ValueError, match=rf"line {last_line}: the row is incomplete \(\d of 8 fields\)"):
        plot_lambda(str(path))
    path.write_text(text.replace("attention/heads,1,2.0", "attention/heads,1,2.0x", 1))
    with pytest.raises(ValueError, match="line 3: a value does not parse"):
        read_log_csv(path)
    path.write_text("step,family\n0,dense\n")
    with pytest.raises(ValueError, match="columns .*'lambda_max'.* are missing"):
        read_log_csv(path)


def test_many_modules_keep_a_readable_height(tmp_path):
    import matplotlib.image

    rows = _rows(families=(("conv1/filters", 150), ("conv2/filters", 250)))
    rows[3]["lambda_max"] = 0.0  # a dead filter: drawn black, outside the colour scale
    fig = plot_lambda(rows, str(tmp_path / "many.png"))
    height = matplotlib.image.imread(tmp_path / "many.png").shape[0]
    # Capped at 16 inches at 120 dpi; one row of 0.22 in per module would be 10,740 px.
    assert height <= 16 * 120, height
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["conv1/filters (150)", "conv2/filters (250)"]
    assert "black: 0" in fig.axes[1].get_ylabel()


def test_one_measurement_says_so():
    fig = plot_lambda(_rows(steps=(0,)))
    assert "one measurement only" in fig.axes[0].get_xlabel()
    assert "one measurement only" not in plot_lambda(_rows()).axes[0].get_xlabel()


def test_rejects_empty_and_unknown_sources():
    with pytest.raises(ValueError, match="no measurement"):
        plot_lambda([])
    with pytest.raises(TypeError, match="Received: source of type int"):
        plot_lambda(3)
    with pytest.raises(ValueError, match=r"row 0 has no \['family', 'module'"):
        plot_lambda([{"step": 0}])
    bad = _rows()
    bad[4] = dict(bad[4], lambda_max="x")
    with pytest.raises(ValueError, match="`lambda_max` of row 4 is not a number. Received: lambda_max='x'"):
        plot_lambda(bad)
    with pytest.raises(TypeError, match="Received: path=3"):
        plot_lambda(_rows(), path=3)


def test_leaves_the_user_backend_and_pyplot_alone():
    # A user's backend (here "svg", as a notebook's inline backend would be) stays selected, and
    # the figure is not registered with pyplot (no open-figure pile-up in loops).
    code = (
        "import matplotlib, matplotlib.pyplot as plt; from keras_mat.plotting import plot_lambda; "
        "plot_lambda([dict(step=0, family='d', module=0, lambda_max=1.0, active=1, frozen=0)]); "
        "print(matplotlib.get_backend(), len(plt.get_fignums()))"
    )
    env = dict(os.environ, MPLBACKEND="svg")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["svg", "0"]
