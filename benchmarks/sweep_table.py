"""One table for a sweep of MAT settings against one plain run.

Each sweep point is an example run with `--variants mat` (or `mat,rand`) and
the same data, model, seed and schedule as a full comparison whose
`results.json` holds the plain run. This script puts every point's MAT (and
Rand) record beside that plain record and scores them as `benchmarks/harness/common.py`
scores a comparison: final and best validation metric, metric at the plain
run's FLOPs budget, training FLOPs and wall-clock to reach the plain run's
best, and the mean fraction of modules MAT updated.

    python benchmarks/sweep_table.py --reference results/full/vgg/results.json \\
        --point "alpha 0.3 (comparison)=results/full/vgg" --point "alpha 0.1=results/sweep/vgg_alpha0.1" \\
        --out benchmarks/results/sweep_vgg.md
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness"))

import common  # noqa: E402  (benchmarks/harness/common.py)


def _load(path):
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    with open(path) as f:
        return json.load(f)


def _mean_active(record):
    values = [e["logs"].get("mat_active") for e in record["epochs"]]
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def sweep_rows(reference, points):
    """`reference`: a comparison's results dict; `points`: [(label, results dict)].

    Returns a list of row dicts (label, variant and the scored record): the
    plain run first, then every non-plain record of every point, each scored
    by `common._summarize` beside the plain run."""
    mode = reference["mode"]
    entries = [("plain", "plain", None)] + [
        (label, variant, record)
        for label, data in points
        for variant, record in data["records"].items()
        if variant != "plain"
    ]
    rows = []
    for label, variant, record in entries:
        records = {"plain": copy.deepcopy(reference["records"]["plain"])}
        if record is not None:
            records[variant] = copy.deepcopy(record)
        common._summarize(records, mode)
        rows.append({"label": label, "variant": variant, "record": records[variant], "mode": mode})
    return rows


def markdown(rows, metric):
    fmt = common._fmt_metric
    lines = [
        f"| setting | variant | final {metric} | best {metric} | plain's {metric} at the same FLOPs | "
        "train FLOPs to plain best | wall-clock to plain best | train FLOPs | FLOPs with probes | "
        "mean active fraction | train wall-clock |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    plain = rows[0]["record"]["epochs"]
    plain_best = rows[0]["record"]["best"]
    for row in rows:
        r = row["record"]
        # What plain training had reached with this run's training FLOPs.
        at_plain = _interp(
            r["epochs"][-1]["train_flops"], [e["train_flops"] for e in plain], [e["metric"] for e in plain]
        )
        if r["flops_to_target"] is None:
            reach_f = reach_t = "not reached"
        else:
            reach_f = f"{r['flops_to_target'] / 1e12:.3f} T ({r['flops_ratio_to_target']:.2f}x)"
            reach_t = f"{r['wall_to_target']:.0f} s ({r['wall_ratio_to_target']:.2f}x)"
        last = r["epochs"][-1]
        active = _mean_active(r)
        lines.append(
            f"| {row['label']} | {row['variant']} | {fmt(r['final'])} | {fmt(r['best'])} | {fmt(at_plain)} | "
            f"{reach_f} | {reach_t} | {last['train_flops'] / 1e12:.3f} T | {last['total_flops'] / 1e12:.3f} T | "
            f"{'1.00' if row['variant'] == 'plain' else ('n/a' if active is None else f'{active:.2f}')} | "
            f"{last['wall_s']:.0f} s |"
        )
    note = (
        f"'to plain best' ratios are to the plain run's own FLOPs and wall-clock at its best evaluation "
        f"(plain best = {fmt(plain_best)}). "
        "'plain's ... at the same FLOPs' interpolates the plain run's curve at this run's final training "
        "FLOPs (compare with 'final'; n/a beyond the plain run's budget)."
    )
    return "\n".join(lines) + "\n\n" + note


def _interp(x, xs, ys):
    if not xs[0] <= x <= xs[-1] * (1 + 1e-9):
        return float("nan")  # outside the plain run's evaluations: n/a
    return float(np.interp(x, xs, ys))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="results.json (or its folder) of a full comparison")
    p.add_argument("--point", action="append", default=[], help="LABEL=results folder or json (repeat)")
    p.add_argument("--title", default="")
    p.add_argument("--out", default=None, help="markdown file to write")
    args = p.parse_args(argv)
    reference = _load(args.reference)
    points = []
    for item in args.point:
        if "=" not in item:
            p.error(f"--point must be LABEL=PATH. Received: --point={item!r}")
        label, path = item.split("=", 1)
        points.append((label, _load(path)))
    rows = sweep_rows(reference, points)
    text = (f"### {args.title}\n\n" if args.title else "") + markdown(rows, reference["metric"])
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
