"""The compiled JAX train step with the wrapped optimizer, against plain AdamW.

Builds `fit_overhead.py`'s transformer classifier (2 encoder blocks, hidden
96) three times: with plain AdamW, and with `keras_mat.wrap(AdamW)` over every
head and Dense neuron, its masked update taken in two ways:

- `assign`: each assignment blended as it is made (the default for
  elementwise optimizers, see `keras_mat.optimizer._MaskingScope`);
- `after`: the whole inner update first, then a blend of its outputs (the way
  taken for optimizers that mix the elements of a variable).

Each step is compiled ahead of time from the same jitted `train_step` the JAX
trainer runs (state donated); the script reports the compile time, the copies
in the optimized program and the step time, the latter over `--rounds`
interleaved rounds of `--steps` steps (median). JAX only: the other backends
do not take the stateless path.

    KERAS_BACKEND=jax .venv/bin/python benchmarks/masked_step.py --out benchmarks/results/masked_step_jax.json
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
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def compiled_step(variant, batch):
    import jax
    import keras
    from fit_overhead import encoder_classifier

    import keras_mat

    model = encoder_classifier(2)
    optimizer = keras.optimizers.AdamW(1e-3)
    if variant != "plain":
        keras_mat.annotate(model, dense=True)
        optimizer = keras_mat.wrap(optimizer, policy=None)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    optimizer.build(model.trainable_variables)
    if variant == "after":
        optimizer._blends_in_scope = False
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
    state = jax.tree_util.tree_map(lambda a: jax.numpy.array(a, copy=True), state)
    step = jax.jit(model.train_step, donate_argnums=0)
    lowered = step.lower(state, batch)
    start = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    return compiled, state, seconds, compiled.as_text().count(" copy(")


def main(argv=None):
    args = parse_args(argv)
    import jax
    import keras

    if keras.config.backend() != "jax":
        raise SystemExit("masked_step.py measures the JAX train step: run it with KERAS_BACKEND=jax")
    import warnings

    from fit_overhead import data

    warnings.simplefilter("ignore")  # the policy-less wrapper's "no callback" warning
    x, y = data(args.batch_size)
    batch = (x, y)
    variants = ("plain", "assign", "after")
    steps, info = {}, {}
    for variant in variants:
        compiled, state, seconds, copies = compiled_step(variant, batch)
        steps[variant] = [compiled, state]
        info[variant] = {"compile_seconds": seconds, "copies": copies, "step_ms": []}
        print(f"{variant}: compile {seconds:.2f} s, {copies} copies", flush=True)
    for _ in range(args.rounds):
        for variant in variants:
            compiled, state = steps[variant]
            for _ in range(3):
                _, state = compiled(state, batch)
            jax.block_until_ready(state)
            start = time.perf_counter()
            for _ in range(args.steps):
                _, state = compiled(state, batch)
            jax.block_until_ready(state)
            info[variant]["step_ms"].append(1000 * (time.perf_counter() - start) / args.steps)
            steps[variant][1] = state
    for variant in variants:
        info[variant]["median_step_ms"] = statistics.median(info[variant]["step_ms"])
        ratio = info[variant]["median_step_ms"] / info["plain"]["median_step_ms"]
        info[variant]["step_ratio_to_plain"] = ratio
        print(f"{variant}: step {info[variant]['median_step_ms']:.2f} ms ({ratio:.2f}x plain)")
    result = {"backend": "jax", "rounds": args.rounds, "steps": args.steps, "variants": info}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
