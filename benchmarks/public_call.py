"""The public measurement call against one training step, on the residual CNN.

Times `keras_mat.module_lambda_max(model, x, ntk_output=...)` (after
`keras_mat.annotate(model)`: every filter of every convolution and every
neuron of the Dense head is a module) against `model.train_on_batch(x, y)` at
the same batch size n, both after warm-up, interleaved over `--rounds` rounds
in one process; the ratio is taken inside each round and the median is
reported. The model is `lambda_max.py`'s residual CNN (a 3x3 stem, two
residual blocks of 3x3 and 1x1 convolutions, the second strided with a 1x1
projection, global pooling, a 10-way Dense head), which no test uses.

Targets at n=16: "sum" at most 1.5x a training step on JAX and TensorFlow, 2x
on PyTorch; "logits" (10 classes) at most 12x.

    KERAS_BACKEND=jax .venv/bin/python benchmarks/public_call.py --out benchmarks/results/public_call_jax.json
"""

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--outputs", default="sum,logits")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import keras
    import lambda_max
    import numpy as np

    import keras_mat

    load_before = os.getloadavg()
    keras.utils.set_random_seed(0)
    model, _ = lambda_max.build_resnet(lambda_max.parse_args([]))
    x, y = lambda_max.vgg_batch(None, args.n, np.random.default_rng(0))
    keras_mat.annotate(model)
    outputs = [o for o in args.outputs.split(",") if o]

    def step():
        keras.ops.convert_to_numpy(model.train_on_batch(x, y))

    def call(mode):
        lam = keras_mat.module_lambda_max(model, x, ntk_output=mode)
        [keras.ops.convert_to_numpy(v) for v in lam.values()]

    for _ in range(3):  # warm-up: compiles the step and each probe
        step()
        for mode in outputs:
            call(mode)
    times = {"train_on_batch": []} | {mode: [] for mode in outputs}
    ratios = {mode: [] for mode in outputs}
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        step()
        base = time.perf_counter() - t0
        times["train_on_batch"].append(base)
        for mode in outputs:
            t0 = time.perf_counter()
            call(mode)
            seconds = time.perf_counter() - t0
            times[mode].append(seconds)
            ratios[mode].append(seconds / base)
    result = {
        "backend": keras.config.backend(),
        "n": args.n,
        "rounds": args.rounds,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "ratio_median": {k: statistics.median(v) for k, v in ratios.items()},
        "ratio_per_round": ratios,
    }
    print(
        result["backend"],
        {k: round(v, 1) for k, v in result["median_ms"].items()},
        {k: round(v, 2) for k, v in result["ratio_median"].items()},
        "load",
        result["load_before"],
        result["load_after"],
        flush=True,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
