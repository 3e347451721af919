"""Experiment B: VGG16 on CIFAR-10 with SGD + momentum and conv filters as modules.

    KERAS_BACKEND=jax python benchmarks/paper_vgg.py --data-dir DATA --variant plain --seed 0 \\
        --out benchmarks/results/paper_vgg/plain_s0.json

The model and data are the ones of `examples/vgg_cifar10.py` (`build_vgg`,
`load_cifar10`): VGG16 for 32x32 images at a reduced width (`--width`),
without BatchNorm by default (`--batch-norm` adds it), trained with SGD,
momentum 0.9, a constant learning rate and weight decay, on a training
subset of `--train-samples` images (no augmentation: the paper's Table 3
metric is compute until the *training* accuracy reaches a level), tested on
`--test-samples` images of the test split.

Variants: `plain` (the SGD optimizer alone) and `mat` (`keras_mat.wrap` with
every conv filter a module, per-layer threshold scope, `--ntk-output`
(default "logits", the exact mNTK of the 10 outputs),
and a `keras_mat.MATCallback` probing `--probe-samples` fixed training
images every `--probe-every` steps).

Per epoch the JSON records: the epoch's running training accuracy (Keras's
`accuracy` over the epoch), the test accuracy, cumulative analytic training
FLOPs (`keras_mat.flops`, module masks of each interval) and training
wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(HERE, "harness"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where the decoded images are cached as .npz (default ~/.keras/datasets)",
    )
    p.add_argument("--variant", choices=("plain", "mat"), default="plain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--batch-norm", action="store_true")
    p.add_argument("--train-samples", type=int, default=5000)
    p.add_argument("--test-samples", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--beta", type=float, default=1e-3)
    p.add_argument(
        "--temporal",
        default=None,
        help='reading of the temporal rule over the planned training (default "training")',
    )
    p.add_argument("--probe-every", type=int, default=20)
    p.add_argument("--probe-samples", type=int, default=8)
    p.add_argument("--ntk-output", choices=("logits", "sum", "loss"), default="logits")
    p.add_argument(
        "--stop-at", type=float, default=0.995, help="stop once the epoch's train accuracy reaches it"
    )
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import keras
    import temporal
    from vgg_cifar10 import build_vgg, load_cifar10

    import keras_mat
    from keras_mat import flops as flops_lib

    (x_train, y_train), (x_test, y_test) = load_cifar10(
        args.data_dir,
        cache_dir=args.cache_dir,
        train_samples=args.train_samples,
        val_samples=args.test_samples,
        seed=0,
        verbose=0,
    )
    x_train, x_test = x_train.astype("float32"), x_test.astype("float32")
    keras.utils.set_random_seed(args.seed)
    model = build_vgg(16, args.width, args.batch_norm)
    groups = [g for g in keras_mat.discover_groups(model, include=("filter",)) if g.kind == "filter"]
    inner = keras.optimizers.SGD(args.lr, momentum=0.9, weight_decay=args.weight_decay)
    optimizer, callbacks, period = inner, [], None
    if args.variant == "mat":
        keras_mat.annotate(model, groups=groups)
        options = dict(
            alpha=args.alpha, beta=args.beta, probe_every=args.probe_every, ntk_output=args.ntk_output
        )
        options["probe_samples"] = args.probe_samples
        steps_per_epoch = len(y_train) // args.batch_size
        period = temporal.apply(
            options, args.temporal or "training", args.probe_every, steps_per_epoch, args.epochs
        )
        if "temporal" in options:
            # `fit` runs in chunks of `probe_every` steps (below), so `MATCallback` would take each
            # chunk for the whole training and read "training" as one measurement per step `t`.
            # The reading is resolved here, on the planned training, and passed as its period.
            options["temporal"] = period
        optimizer = keras_mat.wrap(inner, **options)
        callbacks.append(keras_mat.MATCallback(x_train[: args.probe_samples], y_train[: args.probe_samples]))
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    report = flops_lib.count_flops(model, args.batch_size, groups=groups)
    steps_per_epoch = len(y_train) // args.batch_size
    chunk = args.probe_every if args.variant == "mat" else steps_per_epoch
    records, flops, seconds, step = [], 0.0, 0.0, 0
    for epoch in range(args.epochs):
        order = np.random.RandomState(args.seed * 1000 + epoch).permutation(len(y_train))
        order = order[: steps_per_epoch * args.batch_size]
        correct = 0.0
        for start in range(0, steps_per_epoch, chunk):
            n = min(chunk, steps_per_epoch - start)
            idx = order[start * args.batch_size : (start + n) * args.batch_size]
            t0 = time.perf_counter()
            hist = model.fit(
                x_train[idx],
                y_train[idx],
                batch_size=args.batch_size,
                epochs=1,
                shuffle=False,
                callbacks=callbacks,
                verbose=0,
            )
            seconds += time.perf_counter() - t0
            correct += hist.history["accuracy"][-1] * len(idx)
            masks = None
            if args.variant == "mat":
                masks = model.optimizer.masks  # in force during this chunk (chunks align with measurements)
            flops += n * flops_lib.step_flops(report, masks=masks, frozen_prefix="auto")
            step += n
        test_acc = float(np.mean(np.argmax(model.predict(x_test, batch_size=256, verbose=0), -1) == y_test))
        rec = dict(epoch=epoch + 1, step=step, flops=flops, seconds=seconds, train_acc=correct / len(order))
        rec["test_acc"] = test_acc
        if args.variant == "mat":
            masks, frozen = model.optimizer.masks, model.optimizer.frozen
            rec["active"] = float(np.mean(np.concatenate(list(masks.values()))))
            rec["frozen"] = float(np.mean(np.concatenate(list(frozen.values()))))
        records.append(rec)
        print(json.dumps(rec), flush=True)
        if rec["train_acc"] >= args.stop_at:
            break
    out = dict(args=vars(args), records=records, plain_step_flops=flops_lib.step_flops(report))
    out["backend"] = keras.backend.backend()
    out["temporal_period"] = period  # measurements per step t of the temporal rule (mat)
    out["train_samples"], out["test_samples"] = len(y_train), len(y_test)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
