"""Train wall-clock of MAT and Rand against plain training in `make demo`.

Runs the demo's two comparisons (`examples/demo.py`: images and text, plain,
MAT and Rand each, same data, models and settings as `make demo`) for
`--rounds` rounds in one process and records every run's `fit` time
(compilation, probes and validation included), as the demo prints it. The
first round is what `make demo` shows (plain runs first in a fresh
process); later rounds run with the process warm.

    KERAS_BACKEND=jax python benchmarks/demo_wallclock.py --out benchmarks/results/demo_wallclock_jax.json
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tasks", default="images,text")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import demo
    import keras

    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory() as out_dir:
        demo_args = demo.parse_args(["--out-dir", out_dir])
        for r in range(args.rounds):
            for task in args.tasks.split(","):
                if task == "images":
                    train, val = demo.load_images(demo_args.data_dir)
                    records, _ = demo.run(
                        task, demo.image_model, train, val, demo_args, batch_size=64, lr=2e-3
                    )
                else:
                    train, val = demo.load_text(demo_args.data_dir, 1024)
                    records, _ = demo.run(
                        task, demo.text_model, train, val, demo_args, batch_size=32, lr=1e-3
                    )
                row = {"round": r, "task": task}
                row.update({f"{v}_seconds": rec["seconds"] for v, rec in records.items()})
                row.update({f"{v}_val_loss": rec["val_loss"][-1] for v, rec in records.items()})
                for v in ("mat", "rand"):
                    row[f"{v}_ratio"] = records[v]["seconds"] / records["plain"]["seconds"]
                print(
                    f"round {r} {task}: plain {row['plain_seconds']:.1f}s, MAT {row['mat_ratio']:.2f}x, "
                    f"Rand {row['rand_ratio']:.2f}x",
                    flush=True,
                )
                runs.append(row)
    summary = {}
    for task in args.tasks.split(","):
        rows = [q for q in runs if q["task"] == task]
        summary[task] = {
            v: {
                "first_round": rows[0][f"{v}_ratio"],
                "median": statistics.median(q[f"{v}_ratio"] for q in rows),
            }
            for v in ("mat", "rand")
        }
    result = {
        "backend": keras.config.backend(),
        "rounds": args.rounds,
        "runs": runs,
        "ratio_to_plain": summary,
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
