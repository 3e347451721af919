"""Replays readings of MAT's temporal policy on logged lambda_max trajectories.

    python benchmarks/temporal_replay.py benchmarks/results/paper_bert/plain_s0.json \\
        --out benchmarks/results/paper_bert/temporal_replay.md

Input: the JSON of a `benchmarks/paper_bert.py` run with `--log-lambda K`
(every head's lambda_max on a fixed probe set every K steps of training). The
replay feeds the logged measurements, in order, to `keras_mat.policy`'s pure
`policy_update` (the function the optimizer calls), for each candidate
reading of the paper's formula (7)
`|Delta(t) - Delta(t - 1)| / Delta(1) < beta`, `Delta(t) = |lambda(t) - lambda(0)|`:

- `period`: how many measurements make one temporal step `t` (`period=1`: `t`
  counts measurements; `period = steps per epoch / K`: `t` counts epochs,
  `Delta(1)` is the drift over the first epoch);
- `smoothing`: an exponential moving average of lambda_max over measurements
  (`s` in `lambda~(r) = s lambda~(r-1) + (1 - s) lambda(r)`) fed instead of
  the raw value;
- `beta`.

With `alpha=0` (the default here) every alive module is "updated", as in the
plain run the lambdas come from, so only the temporal rule acts. The table
gives, per reading: the fraction of heads stopped by the end, the epoch of
the first and of the median stop, the fraction stopped by the run's
best-validation epoch, and the median of the rule's statistic.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "harness"))
sys.path.insert(0, os.path.dirname(HERE))


import output  # noqa: E402  (benchmarks/harness/output.py)


def load_log(path):
    """`(steps, names, lam, steps_per_epoch, best_epoch)`; `lam` is (R, modules) float64."""
    with open(path) as f:
        run = json.load(f)
    log = run["lambda_log"]
    names = list(log[0]["lambda"])
    lam = np.array([np.concatenate([e["lambda"][k] for k in names]) for e in log], "float64")
    steps = np.array([e["step"] for e in log])
    sizes = [len(log[0]["lambda"][k]) for k in names]
    best = run.get("best", min(run["records"][1:], key=lambda r: r["val"]))
    return steps, names, sizes, lam, run["steps_per_epoch"], best["epoch"]


def smooth(lam, s):
    """Exponential moving average over measurements (rows), started at the first row."""
    out = np.array(lam)
    for r in range(1, len(lam)):
        out[r] = s * out[r - 1] + (1.0 - s) * lam[r]
    return out


def replay(lam, sizes, beta, period=1, alpha=0.0, warmup=1):
    """Runs `policy_update` over the rows of `lam`; returns the (R, modules) frozen flags."""
    from keras import ops

    from keras_mat import policy

    state = policy.initial_state(sizes)
    scopes = [0] * len(sizes)
    splits = np.cumsum(sizes)[:-1]
    frozen = []
    for row in lam:
        parts = [ops.convert_to_tensor(p, "float32") for p in np.split(row.astype("float32"), splits)]
        state = policy.policy_update(parts, state, alpha, beta, scopes, warmup=warmup, period=period)
        frozen.append(np.concatenate([ops.convert_to_numpy(f) for f in state.frozen]))
    return np.array(frozen)


def statistic(lam, period):
    """The rule's statistic at every temporal step t >= 2 (numpy, for the table)."""
    sub = lam[::period]
    delta = np.abs(sub - sub[0])
    if len(sub) < 3:
        return np.array([])
    return np.abs(delta[2:] - delta[1:-1]) / np.maximum(delta[1], 1e-12)


def summarize(frozen, steps, steps_per_epoch, best_epoch):
    epochs = steps / steps_per_epoch
    stopped_at = np.array([epochs[np.argmax(col)] if col.any() else np.inf for col in frozen.T])
    done = np.isfinite(stopped_at)
    return dict(
        stopped=float(done.mean()),
        first=float(stopped_at.min()) if done.any() else None,
        median=float(np.median(stopped_at[done])) if done.any() else None,
        by_best=float((stopped_at <= best_epoch).mean()),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logs", nargs="+")
    p.add_argument("--betas", default="1e-3,1e-2,0.05,0.1")
    p.add_argument("--periods", default="1,2,4,epoch/2,epoch", help="measurements per t; 'epoch' = one epoch")
    p.add_argument("--smoothings", default="0,0.5,0.8")
    p.add_argument("--alpha", type=float, default=0.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    lines = [
        "| log | period (measurements) | t unit (epochs) | smoothing | beta | median statistic | "
        "heads stopped | first stop (epoch) | median stop (epoch) | stopped by best-val epoch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for path in args.logs:
        steps, names, sizes, lam, spe, best_epoch = load_log(path)
        interval = int(steps[1] - steps[0])
        per_epoch = spe / interval
        periods = []
        for token in args.periods.split(","):
            if token.startswith("epoch"):
                frac = 0.5 if token == "epoch/2" else 1.0
                periods.append(max(1, round(per_epoch * frac)))
            else:
                periods.append(int(token))
        for period, s in itertools.product(
            dict.fromkeys(periods), [float(v) for v in args.smoothings.split(",")]
        ):
            lam_s = smooth(lam, s) if s else lam
            stat = statistic(lam_s, period)
            for beta in [float(b) for b in args.betas.split(",")]:
                frozen = replay(lam_s, sizes, beta, period=period, alpha=args.alpha)
                r = summarize(frozen, steps, spe, best_epoch)
                fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
                lines.append(
                    f"| {os.path.basename(path)} | {period} | {period / per_epoch:.2f} | {s:g} | {beta:g} | "
                    f"{np.median(stat) if stat.size else float('nan'):.3g} | {r['stopped']:.2f} | "
                    f"{fmt(r['first'])} | {fmt(r['median'])} | {r['by_best']:.2f} |"
                )
    output.emit(lines, args.out)


if __name__ == "__main__":
    main()
