"""Tables of experiments A and B (mean ± std over seeds) from their run JSONs.

    python benchmarks/paper_table.py bert benchmarks/results/paper_bert --out benchmarks/results/paper_bert/table.md
    python benchmarks/paper_table.py vgg benchmarks/results/paper_vgg --out benchmarks/results/paper_vgg/table.md

Runs are grouped by file name: `<setting>_s<seed>.json` (`plain_s0.json`,
`mat_a0.3_s1.json`, ...); the setting named `plain` is the reference.

Experiment A (`bert`, lower is better): validation loss at three training
FLOPs budgets (a quarter, half and all of the plain runs' mean FLOPs to their
best validation loss; each run's curve is interpolated linearly, "n/a" past
its last evaluation), test loss at the best-validation checkpoint, best
validation loss, training FLOPs (and their ratio to plain's mean) and
wall-clock to the run's own best, and to plain's mean best validation loss
(the first evaluation at or below it). "heads trained (mean)" averages the
fraction of heads the masks updated at the end of each epoch (for Multirate:
the fast heads only; its FLOPs include the slow heads' updates).

Experiment B (`vgg`): training FLOPs (and wall-clock) until the epoch's
training accuracy first reaches 95 % and 99 % (or the highest level every
plain run reaches, if lower; `--levels` names others), its ratio to plain's mean
("x plain", where every run of both reaches the level), total training FLOPs and
wall-clock, and the final training and test accuracy.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness"))


import output  # noqa: E402  (benchmarks/harness/output.py)


def load_runs(folder):
    runs = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        m = re.match(r"(.+)_s(\d+)\.json$", os.path.basename(path))
        if not m:
            continue
        with open(path) as f:
            runs[m.group(1)].append(json.load(f))
    return runs


def ms(values, fmt="{:.3f}"):
    """'mean ± std (n)' over the finite values; std with ddof=1."""
    vals = np.array([v for v in values if v is not None and np.isfinite(v)], "float64")
    if not len(vals):
        return "not reached"
    text = fmt.format(vals.mean())
    if len(vals) > 1:
        text += " ± " + fmt.format(vals.std(ddof=1))
    if len(vals) < len(values):
        text += f" ({len(vals)} of {len(values)})"
    return text


def first_reach(records, key, target, mode):
    for r in records:
        if (r[key] <= target) if mode == "min" else (r[key] >= target):
            return r
    return None


#: Experiment A's settings in table order (others follow, sorted).
ORDER = ("plain", "mat", "rand", "paper_rand", "multirate")


def setting_order(runs):
    return [k for k in ORDER if k in runs] + sorted(k for k in runs if k not in ORDER)


def bert_table(runs):
    plain = runs["plain"]
    best = [r["best"] for r in plain]
    f_best = float(np.mean([b["flops"] for b in best]))
    target = float(np.mean([b["val"] for b in best]))
    budgets = [f_best / 4, f_best / 2, f_best]
    lines = [
        f"Budgets: {', '.join(f'{b / 1e12:.2f} T' for b in budgets)} training FLOPs (a quarter, half and all of "
        f"plain's mean FLOPs to its best); plain's mean best validation loss: {target:.4f}.",
        "",
        "| setting | seeds | val @ B1 | val @ B2 | val @ B3 | best val | test at best val | epoch of best | "
        "FLOPs to own best (T) | x plain's | wall-clock to own best (s) | FLOPs to plain's best (T) | "
        "wall-clock to plain's best (s) | heads trained (mean) | heads stopped (end) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in setting_order(runs):
        rs = runs[name]
        cells = []
        for b in budgets:
            vals = []
            for r in rs:
                f = [e["flops"] for e in r["records"] if e["val"] is not None]
                v = [e["val"] for e in r["records"] if e["val"] is not None]
                vals.append(float(np.interp(b, f, v)) if b <= f[-1] else None)
            cells.append(ms(vals))
        own = [r["best"] for r in rs]
        reach = [first_reach(r["records"][1:], "val", target, "min") for r in rs]
        active = [np.mean([e.get("active", 1.0) for e in r["records"][1:]]) for r in rs]
        frozen = [r["records"][-1].get("frozen", 0.0) for r in rs]
        cells += [
            ms([o["val"] for o in own]),
            ms([o["test"] for o in own]),
            ms([o["epoch"] for o in own], "{:.1f}"),
            ms([o["flops"] / 1e12 for o in own], "{:.2f}"),
            f"{np.mean([o['flops'] for o in own]) / f_best:.2f}",
            ms([o["seconds"] for o in own], "{:.0f}"),
            ms([x["flops"] / 1e12 if x else None for x in reach], "{:.2f}"),
            ms([x["seconds"] if x else None for x in reach], "{:.0f}"),
            ms(active, "{:.2f}"),
            ms(frozen, "{:.2f}"),
        ]
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    return lines


def vgg_table(runs, levels=None):
    plain = runs["plain"]
    top = min(max(e["train_acc"] for e in r["records"]) for r in plain)
    if levels is None:
        levels = [lv for lv in (0.95, 0.99) if lv <= top] or [float(np.floor(top * 100) / 100)]
    plain_flops = {}
    for lv in levels:
        reach = [first_reach(r["records"], "train_acc", lv, "max") for r in plain]
        plain_flops[lv] = np.mean([x["flops"] for x in reach]) if all(reach) else None
    lines = [
        "| setting | seeds | "
        + " | ".join(f"FLOPs to train acc {lv:.0%} (T) | x plain | wall-clock (s)" for lv in levels)
        + " | total FLOPs (T) | total wall-clock (s) | final train acc | final test acc | epochs | "
        "filters trained (mean) | filters stopped (end) |",
        "| --- | ---: | "
        + " | ".join("---: | ---: | ---:" for _ in levels)
        + " | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in setting_order(runs):
        rs = runs[name]
        cells = []
        for lv in levels:
            reach = [first_reach(r["records"], "train_acc", lv, "max") for r in rs]
            ratio = "n/a"
            if plain_flops[lv] and all(reach):
                ratio = f"{np.mean([x['flops'] for x in reach]) / plain_flops[lv]:.2f}"
            cells += [
                ms([x["flops"] / 1e12 if x else None for x in reach], "{:.2f}"),
                ratio,
                ms([x["seconds"] if x else None for x in reach], "{:.0f}"),
            ]
        cells += [
            ms([r["records"][-1]["flops"] / 1e12 for r in rs], "{:.2f}"),
            ms([r["records"][-1]["seconds"] for r in rs], "{:.0f}"),
            ms([r["records"][-1]["train_acc"] for r in rs], "{:.4f}"),
            ms([r["records"][-1]["test_acc"] for r in rs], "{:.4f}"),
            ms([r["records"][-1]["epoch"] for r in rs], "{:.0f}"),
            ms([np.mean([e.get("active", 1.0) for e in r["records"]]) for r in rs], "{:.2f}"),
            ms([r["records"][-1].get("frozen", 0.0) for r in rs], "{:.2f}"),
        ]
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", choices=("bert", "vgg"))
    p.add_argument("folder")
    p.add_argument("--out", default=None)
    p.add_argument(
        "--levels",
        default=None,
        help="vgg: comma-separated training-accuracy levels (default: 0.95,0.99 as reached)",
    )
    args = p.parse_args(argv)
    runs = load_runs(args.folder)
    if args.experiment == "bert":
        lines = bert_table(runs)
    else:
        levels = [float(v) for v in args.levels.split(",")] if args.levels else None
        lines = vgg_table(runs, levels)
    output.emit(lines, args.out)


if __name__ == "__main__":
    main()
