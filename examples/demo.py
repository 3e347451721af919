"""MAT at work on data that ships with the repository: plain training, MAT and Rand.

    make demo                                   # installs JAX + matplotlib, then runs this
    KERAS_BACKEND=torch python examples/demo.py # any backend

Two small tasks, each trained three times from the same initial weights and
batches:

- images: a conv + attention classifier on 2,000 Fashion-MNIST images (its
  modules: 16 + 32 conv filters and 4 attention heads);
- text: a two-layer transformer language model (next word, 1,000-word
  vocabulary) on 1,024 sequences of 32 words of WikiText-2 (its modules:
  2 x 4 attention heads; the embeddings, feed-forward and output layers are
  in no module and always trained, so MAT saves less here).

The three runs are plain AdamW; MAT (`keras_mat.wrap` + `keras_mat.MATCallback`:
every few steps it measures lambda_max of every module and updates only the
modules above the threshold); and "Rand", which updates as many modules of
each kind as MAT did, chosen at random (the compute-matched control).

It prints one table per task and writes to `--out-dir`:
`<task>_lambda.png` (lambda_max per module over time, masked and stopped
modules marked), `<task>_masks_and_loss.png` (fraction of modules updated over
time; validation loss against training FLOPs) and `<task>_mat.csv` (every
measurement). At this size the runs show how MAT behaves; they are not
evidence of a speed-up (see docs/benchmarks.md).

Data: `examples/data` (see its README for sources and licences). Runs offline
and unchanged on KERAS_BACKEND=jax, tensorflow or torch.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import os
import re
import time

import keras
import numpy as np

import keras_mat

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
VARIANTS = ("plain", "mat", "rand")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="images,text", help="comma-separated: images, text")
    p.add_argument(
        "--data-dir", default=DATA_DIR, help="folder of the shipped slices (default: examples/data)"
    )
    p.add_argument("--out-dir", default="results/demo")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-samples", type=int, default=None, help="cap on training samples (tests)")
    p.add_argument("--probe-every", type=int, default=10, help="optimizer steps between measurements")
    p.add_argument("--alpha", type=float, default=0.3, help="MAT's threshold (0: update every module)")
    p.add_argument("--beta", type=float, default=0.02, help="MAT's tolerance for stopping a module")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------


def load_images(data_dir, limit=None):
    with np.load(os.path.join(data_dir, "fashion_mnist_slice.npz")) as data:
        x_train, y_train = data["x_train"][:limit], data["y_train"][:limit]
        x_test, y_test = data["x_test"], data["y_test"]
    scale = lambda x: (x[..., None] / 255.0).astype("float32")  # noqa: E731
    return (scale(x_train), y_train.astype("int32")), (scale(x_test), y_test.astype("int32"))


def image_model():
    inp = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inp)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D()(x)  # 7 x 7 x 32: 49 positions for the attention
    x = keras.layers.Reshape((49, 32))(x)
    x = keras.layers.LayerNormalization()(x + keras.layers.MultiHeadAttention(4, 8, name="attention")(x, x))
    x = keras.layers.GlobalAveragePooling1D()(x)
    out = keras.layers.Dense(10, name="classifier")(x)
    return keras.Model(inp, out, name="images")


def _words(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", f.read().lower())


def load_text(data_dir, limit=None, vocabulary=1000, length=32):
    """Next-word prediction: `(x, y)` arrays of `length` word ids, the most frequent
    `vocabulary - 1` words of the training text plus one id (0) for every other word."""
    train = _words(os.path.join(data_dir, "wikitext2_test_head.txt.gz"))
    valid = _words(os.path.join(data_dir, "wikitext2_valid_head.txt.gz"))
    counts = collections.Counter(train).most_common(vocabulary - 1)
    ids = {word: i + 1 for i, (word, _) in enumerate(counts)}

    def sequences(words, cap):
        stream = np.array([ids.get(w, 0) for w in words], "int32")
        n = (len(stream) - 1) // length
        n = n if cap is None else min(n, cap)
        x = stream[: n * length].reshape(n, length)
        y = stream[1 : n * length + 1].reshape(n, length)
        return x, y

    return sequences(train, limit), sequences(valid, 256)


class PositionEmbedding(keras.layers.Layer):
    """Adds a learned vector per position."""

    def build(self, input_shape):
        self.table = self.add_weight(shape=tuple(input_shape[1:]), initializer="zeros", name="table")

    def call(self, x):
        return x + self.table


def text_model(vocabulary=1000, length=32, dim=64, layers=2, heads=4):
    tokens = keras.Input((length,), dtype="int32")
    x = keras.layers.Embedding(vocabulary, dim, name="embedding")(tokens)
    x = PositionEmbedding(name="positions")(x)
    for i in range(layers):
        attention = keras.layers.MultiHeadAttention(heads, dim // heads, name=f"block{i}_attention")
        x = keras.layers.LayerNormalization()(x + attention(x, x, use_causal_mask=True))
        hidden = keras.layers.Dense(2 * dim, activation="gelu", name=f"block{i}_ffn_in")(x)
        x = keras.layers.LayerNormalization()(x + keras.layers.Dense(dim, name=f"block{i}_ffn_out")(hidden))
    out = keras.layers.Dense(vocabulary, name="next_word")(x)
    return keras.Model(tokens, out, name="text")


# --------------------------------------------------------------------------------------
# The three runs
# --------------------------------------------------------------------------------------


def rand_fractions(rows, kinds):
    """Per family and measurement, the fraction of modules Rand updates: as many modules of
    each kind (filters, heads) as MAT had active after that measurement, drawn from all
    modules of the kind, split by family as a uniform draw would split them."""
    active = collections.defaultdict(dict)  # family -> measurement -> active flags
    for r in rows:
        active[r["family"]].setdefault(r["measurement"], []).append(r["active"])
    fractions = {f: [] for f in active}
    for m in sorted({m for per in active.values() for m in per}):
        rng = np.random.default_rng(m)
        for kind in sorted(set(kinds.values())):
            families = [f for f in active if kinds[f] == kind]
            owner = np.repeat(np.arange(len(families)), [len(active[f][m]) for f in families])
            chosen = owner[rng.permutation(len(owner))[: int(sum(sum(active[f][m]) for f in families))]]
            for i, f in enumerate(families):
                fractions[f].append(float(np.sum(chosen == i)) / len(active[f][m]))
    return fractions


def run(task, build, train, val, args, batch_size, lr):
    """Trains plain, MAT and Rand from the same weights; returns {variant: record} and the
    MAT callback."""
    records, mat_callback = {}, None
    for variant in VARIANTS:
        keras.utils.set_random_seed(args.seed)
        model = build()
        callbacks = []
        if variant == "plain":
            optimizer = keras.optimizers.AdamW(lr)
            report = keras_mat.flops.count_flops(model, 1)
            step_gflop = keras_mat.flops.step_flops(report, None, frozen_prefix="auto") * batch_size / 1e9
        else:
            keras_mat.annotate(model)
            if variant == "mat":
                policy = "mat"
            else:
                kinds = {g.name: g.kind for g in keras_mat.get_groups(model)}
                policy = keras_mat.RandomModules(
                    rand_fractions(mat_callback.rows, kinds), every=args.probe_every, seed=args.seed
                )
            optimizer = keras_mat.wrap(
                keras.optimizers.AdamW(lr),
                alpha=args.alpha,
                beta=args.beta,
                probe_every=args.probe_every,
                probe_samples=16,
                # One scalar per sample: the exact 10-output kernel ("logits", the default for
                # 10 classes) costs about 10x more per measurement.
                ntk_output="sum",
                policy=policy,
            )
            csv = os.path.join(args.out_dir, f"{task}_mat.csv") if variant == "mat" else None
            callbacks.append(keras_mat.MATCallback(train[0], csv_path=csv, batch_size=batch_size))
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        start = time.perf_counter()
        history = model.fit(
            *train,
            batch_size=batch_size,
            epochs=args.epochs,
            validation_data=val,
            callbacks=callbacks,
            verbose=0,
        ).history
        seconds = time.perf_counter() - start
        print(f"  {task}: {variant} trained in {seconds:.0f} s", flush=True)
        if variant == "plain":
            steps = -(-len(train[0]) // batch_size)
            gflop = [step_gflop * steps * (e + 1) for e in range(args.epochs)]
            probes = [0.0] * args.epochs
        else:
            gflop, probes = history["mat_gflop_trained"], history["mat_gflop_probes"]
        records[variant] = dict(
            val_loss=history["val_loss"],
            val_accuracy=history["val_accuracy"][-1],
            gflop=gflop,
            probe_gflop=probes[-1],
            seconds=seconds,
            active=history.get("mat_active", [1.0])[-1],
        )
        if variant == "mat":
            mat_callback = callbacks[0]
    return records, mat_callback


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def print_table(title, records):
    plain = records["plain"]["gflop"][-1]
    header = [
        "run",
        "val loss",
        "val accuracy",
        "train GFLOP",
        "vs plain",
        "+ probes",
        "updated at end",
        "time",
    ]
    rows = [
        [
            name,
            f"{r['val_loss'][-1]:.3f}",
            f"{r['val_accuracy']:.3f}",
            f"{r['gflop'][-1]:.1f}",
            f"{r['gflop'][-1] / plain:.2f}x",
            f"{r['probe_gflop']:.2f}",
            f"{r['active']:.0%}",
            f"{r['seconds']:.0f} s",
        ]
        for name, r in records.items()
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(f"\n{title}\n{line}\n{'-' * len(line)}")
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def plot_masks_and_loss(records, rows, path, title):
    """Left: fraction of each family's modules MAT updates after each measurement.
    Right: validation loss against cumulative training FLOPs, per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    by_family = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in rows:
        by_family[r["family"]][r["step"]].append(r["active"])
    for family, steps in sorted(by_family.items()):
        xs = sorted(steps)
        left.step(xs, [np.mean(steps[s]) for s in xs], where="post", marker=".", label=family)
    left.set(xlabel="training step", ylabel="fraction of modules updated", ylim=(-0.05, 1.05))
    left.set_title("MAT's masks over time")
    left.legend(fontsize=7)
    for name, r in records.items():
        right.plot(r["gflop"], r["val_loss"], marker="o", label=name)
    right.set(xlabel="cumulative training GFLOP", ylabel="validation loss")
    right.set_title("loss against compute")
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - {"images", "text"})
    if unknown:
        raise SystemExit(f"--tasks: unknown task {unknown}. Received: --tasks={args.tasks}")
    print(f"keras_mat demo, backend {keras.config.backend()}, data from {args.data_dir}", flush=True)
    results = {}
    for task in tasks:
        if task == "images":
            train, val = load_images(args.data_dir, args.train_samples)
            title = f"images: Fashion-MNIST, {len(train[0])} training images, conv filters + attention heads"
            records, mat = run(task, image_model, train, val, args, batch_size=64, lr=2e-3)
        else:
            train, val = load_text(args.data_dir, args.train_samples or 1024)
            title = (
                f"text: WikiText-2 next word, {len(train[0])} sequences of 32 words, 2 x 4 attention heads"
            )
            records, mat = run(task, text_model, train, val, args, batch_size=32, lr=1e-3)
        print_table(title, records)
        heatmap = os.path.join(args.out_dir, f"{task}_lambda.png")
        keras_mat.plot_lambda(mat, heatmap, title=f"{task}: lambda_max per module (MAT run)")
        summary = plot_masks_and_loss(
            records, mat.rows, os.path.join(args.out_dir, f"{task}_masks_and_loss.png"), title
        )
        measurements = len({r["step"] for r in mat.rows})
        print(f"MAT measured {measurements} times; figures: {heatmap}, {summary}", flush=True)
        results[task] = records
    return results


if __name__ == "__main__":
    main()
