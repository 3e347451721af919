"""Whole-`fit` cost of MAT and Rand against plain training, and the
`train_on_batch` step with lower encoder layers masked.

Part 1 (`fit`): a small transformer classifier (2 encoder blocks, hidden 96,
token inputs) trained for `--steps` steps from a fresh model, once plain
(AdamW), once with MAT (`keras_mat.wrap` + `MATCallback`, `probe_every=40`)
and once with the compute-matched Rand schedule (`RandomModules`). Each fit
is timed whole: compilation, probes and any recompiles included. Variants
are interleaved over `--rounds` rounds in one process; the ratios are per
round, against that round's plain fit.

Part 2 (`train_on_batch`): a 4-layer encoder; the attention heads and the
feed-forward layers of the lower 3 layers are masked (`set_masks`), the skip
set applied (`keras_mat.sync_trainable`), and `train_on_batch` is timed
against the unmasked step, after warm-up, median over interleaved rounds.

    KERAS_BACKEND=jax python benchmarks/fit_overhead.py --out benchmarks/results/fit_overhead_jax.json
"""

import argparse
import json
import os
import statistics
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--probe-every", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tob-steps", type=int, default=20, help="timed train_on_batch calls per round")
    p.add_argument("--skip-fit", action="store_true")
    p.add_argument("--skip-tob", action="store_true")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def encoder_classifier(layers, hidden=96, heads=4, seq=32, vocab=500, classes=4, seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    ids = keras.Input((seq,), dtype="int32")
    x = keras.layers.Embedding(vocab, hidden, name="embed")(ids)
    for i in range(layers):
        a = keras.layers.MultiHeadAttention(heads, hidden // heads, name=f"l{i}_mha")(x, x)
        x = keras.layers.LayerNormalization(name=f"l{i}_ln1")(x + a)
        f = keras.layers.Dense(4 * hidden, activation="gelu", name=f"l{i}_ff1")(x)
        f = keras.layers.Dense(hidden, name=f"l{i}_ff2")(f)
        x = keras.layers.LayerNormalization(name=f"l{i}_ln2")(x + f)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(ids, keras.layers.Dense(classes, name="cls")(x))


def data(n, seq=32, vocab=500, classes=4, seed=1):
    import numpy as np

    rng = np.random.RandomState(seed)
    x = rng.randint(0, vocab, size=(n, seq)).astype("int32")
    y = (x[:, :4].sum(axis=1) % classes).astype("int32")  # a learnable rule
    return x, y


def one_fit(variant, args, x, y):
    import keras

    import keras_mat

    model = encoder_classifier(2)
    callbacks = []
    inner = keras.optimizers.AdamW(1e-3)
    if variant == "plain":
        optimizer = inner
    else:
        keras_mat.annotate(model, dense=True)
        policy = "mat" if variant == "mat" else keras_mat.RandomModules(0.5, every=args.probe_every, seed=0)
        optimizer = keras_mat.wrap(inner, probe_every=args.probe_every, policy=policy)
        callbacks.append(keras_mat.MATCallback(x, recompile="auto"))
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    start = time.perf_counter()
    hist = model.fit(
        x, y, batch_size=args.batch_size, epochs=1, steps_per_epoch=args.steps, verbose=0, callbacks=callbacks
    )
    seconds = time.perf_counter() - start
    info = callbacks[0].step_cache_info() if callbacks else {}
    return seconds, float(hist.history["loss"][-1]), info


def fit_part(args):
    x, y = data(args.steps * args.batch_size)
    rows = []
    for r in range(args.rounds):
        times = {}
        for variant in ("plain", "mat", "rand"):
            seconds, loss, info = one_fit(variant, args, x, y)
            times[variant] = seconds
            rows.append(
                {
                    "round": r,
                    "variant": variant,
                    "seconds": seconds,
                    "loss": loss,
                    "num_compiles": info.get("num_compiles"),
                    "compile_seconds": [s for _, s in info.get("compile_seconds", [])],
                    "skip_changes": len(info.get("skip_history", [])),
                }
            )
        print(f"round {r}: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()), flush=True)
    ratios = {}
    for variant in ("mat", "rand"):
        per_round = [
            next(q["seconds"] for q in rows if q["round"] == r and q["variant"] == variant)
            / next(q["seconds"] for q in rows if q["round"] == r and q["variant"] == "plain")
            for r in range(args.rounds)
        ]
        ratios[variant] = {"median": statistics.median(per_round), "per_round": per_round}
    return {"runs": rows, "ratio_to_plain": ratios}


def tob_part(args):
    import keras
    import numpy as np

    import keras_mat

    model = encoder_classifier(4)
    keras_mat.annotate(model, dense=True)
    opt = keras_mat.wrap(keras.optimizers.AdamW(1e-3), policy=None)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data(args.batch_size, seed=2)
    opt.build(model.trainable_variables)
    lower = {
        g.name: np.zeros(g.num_modules, bool)
        for g in opt.families
        if g.name.split("_")[0] in ("l0", "l1", "l2")
    }
    everything = {g.name: np.ones(g.num_modules, bool) for g in opt.families}

    def set_state(masked):
        opt.set_masks(lower if masked else everything)
        keras_mat.sync_trainable(model)

    def timed(n):
        model.train_on_batch(x, y)  # the step is current (compiled) before timing
        start = time.perf_counter()
        for _ in range(n):
            logs = model.train_on_batch(x, y)
        keras.ops.convert_to_numpy(logs if not isinstance(logs, (list, tuple)) else logs[0])
        return (time.perf_counter() - start) / n

    for masked in (False, True):  # warm-up: compile both steps
        set_state(masked)
        timed(2)
    ratios, full, part = [], [], []
    for _ in range(args.rounds * 2):
        set_state(False)
        a = timed(args.tob_steps)
        set_state(True)
        b = timed(args.tob_steps)
        full.append(a)
        part.append(b)
        ratios.append(b / a)
    return {
        "masked_families": sorted(lower),
        "skipped_variables": len(opt.skipped_variables),
        "seconds_unmasked": statistics.median(full),
        "seconds_masked": statistics.median(part),
        "ratio_median": statistics.median(ratios),
        "ratio_per_round": ratios,
    }


def main(argv=None):
    args = parse_args(argv)
    import keras

    load_before = os.getloadavg()
    result = {"backend": keras.config.backend(), "args": vars(args), "load_before": load_before}
    if not args.skip_fit:
        result["fit"] = fit_part(args)
        print(
            "fit ratio to plain:",
            {k: round(v["median"], 3) for k, v in result["fit"]["ratio_to_plain"].items()},
        )
    if not args.skip_tob:
        result["train_on_batch"] = tob_part(args)
        print("train_on_batch masked/unmasked:", round(result["train_on_batch"]["ratio_median"], 3))
    result["load_after"] = os.getloadavg()
    print("load average before/after:", load_before, result["load_after"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
