"""What the lambda_max probes add to MAT's training wall-clock at default settings.

Trains the small keras-hub BERT masked LM of `step_time.py` (4 layers, hidden 256,
4 heads, sequence 128, batch 32) with `keras_mat.wrap(AdamW)` at the default MAT
settings (probe_every=100, probe_samples=16, ntk_output="auto" -> "sum") and times
every step (synchronised on the loss). The probe's cost is what a measurement step
takes beyond an ordinary step:

    overhead = sum over measurement steps (t_step - median ordinary step) / sum of all t_step

Two runs: with gradient skipping off (every step does the same training work, so
the difference is the probe alone) and on (ordinary steps get cheaper as MAT
freezes modules, while a measurement step always runs the full no-skip step;
there the difference is an upper bound on the probe's share). Step 0 (compiles)
is excluded.

    KERAS_BACKEND=jax python benchmarks/probe_overhead.py --steps 401
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=401)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bert-layers", type=int, default=4)
    p.add_argument("--bert-hidden", type=int, default=256)
    p.add_argument("--bert-heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--probe-every", type=int, default=100)
    p.add_argument("--out", default=None)
    return p.parse_args()


def run(args, skip):
    import keras
    from step_time import _Timer, bert

    import keras_mat

    keras.utils.set_random_seed(0)
    steps = args.steps
    args.steps = steps - 2  # step_time.bert makes batch_size * (steps + 2) samples
    model, x, y, _, _ = bert(args)
    args.steps = steps
    keras_mat.annotate(model)
    opt = keras_mat.wrap(keras.optimizers.AdamW(1e-4), probe_every=args.probe_every)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    opt.skip_gradients = skip

    timer = _Timer().cb
    t0 = time.perf_counter()
    hist = model.fit(
        x,
        y,
        batch_size=args.batch_size,
        epochs=1,
        steps_per_epoch=steps,
        verbose=0,
        shuffle=False,
        callbacks=[timer],
    )
    wall = time.perf_counter() - t0
    t = np.asarray(timer.times[1:])  # step 0 compiles
    index = np.arange(1, len(timer.times))
    measuring = index % args.probe_every == 0
    ordinary = float(np.median(t[~measuring]))
    extra = float(np.sum(t[measuring] - ordinary))
    return {
        "skip_gradients": skip,
        "steps_timed": int(len(t)),
        "measurements_timed": int(measuring.sum()),
        "ordinary_step_ms": 1e3 * ordinary,
        "measurement_step_ms": [1e3 * float(v) for v in t[measuring]],
        "probe_extra_s": extra,
        "timed_s": float(t.sum()),
        "overhead": extra / float(t.sum()),
        "fit_wall_s": wall,
        "final_active_fraction": float(hist.history.get("mat_active", [np.nan])[-1]),
    }


def main():
    args = parse_args()
    import keras

    rows = []
    for skip in (False, True):
        rows.append(run(args, skip))
        print(rows[-1], flush=True)
    for r in rows:
        print(
            f"skip_gradients={r['skip_gradients']}: ordinary step {r['ordinary_step_ms']:.0f} ms, "
            f"measurement steps {[round(v) for v in r['measurement_step_ms']]} ms, "
            f"probe overhead {100 * r['overhead']:.2f}% of {r['timed_s']:.0f} s"
        )
    meta = {
        "backend": keras.config.backend(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "keras": keras.__version__,
        "args": vars(args),
    }
    out = args.out or os.path.join(
        os.path.dirname(__file__), "results", f"probe_overhead_{keras.config.backend()}.json"
    )
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
