"""Recounts the plain step FLOPs of experiment A's run JSONs (`benchmarks/paper_bert.py`).

    KERAS_BACKEND=jax python benchmarks/paper_bert_recount.py --data-dir DATA benchmarks/results/paper_bert/*.json

Rebuilds each run's model and data from its stored arguments and counts one
plain training step with `paper_bert.plain_step_flops` (the data's
per-sample shapes: the masked-LM head runs on the `mask_positions` slots, 11
per 64-token sequence, not on every token). Writes `plain_step_flops` into
every JSON and, in the plain runs (whose training FLOPs are that step times
the steps taken), the FLOPs of every record and of the best checkpoint. The
other variants' FLOPs come from `keras_mat.MATCallback`, which counts with
the data's shapes, and are left as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import paper_bert  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="the data folder (overrides the stored one)")
    p.add_argument("runs", nargs="+", help="run JSONs of paper_bert.py")
    args = p.parse_args(argv)
    counted = {}
    for path in args.runs:
        with open(path) as f:
            run = json.load(f)
        stored = dict(run["args"])
        if args.data_dir is not None:
            stored["data_dir"] = args.data_dir
        keys = ("data_dir", "vocab", "seq", "train_samples", "data_seed", "layers", "heads", "hidden")
        key = tuple(stored.get(k) for k in keys + ("batch_size",))
        if key not in counted:
            run_args = paper_bert.parse_args(["--out", path])
            for k, v in stored.items():
                setattr(run_args, k, v)
            train, _, _, vocab_size, _ = paper_bert.load_data(run_args)
            model = paper_bert.build_model(run_args, vocab_size)
            x0 = {k: v[: run_args.batch_size] for k, v in train[0].items()}
            model(x0)
            counted[key] = paper_bert.plain_step_flops(model, x0, paper_bert.head_groups(model))
        step = counted[key]
        before = run.get("plain_step_flops")
        run["plain_step_flops"] = step
        if stored["variant"] == "plain":
            for record in run["records"]:
                record["flops"] = step * record["step"]
            run["best"]["flops"] = step * run["best"]["step"]
        with open(path, "w") as f:
            json.dump(run, f)
        print(f"{path}: plain step {before / 1e9:.3f} -> {step / 1e9:.3f} GFLOP ({stored['variant']})")


if __name__ == "__main__":
    main()
