"""keras_mat demo: MAT on a small conv + attention model on Fashion-MNIST.

Builds a model with conv filters and attention heads, measures lambda_max of
every head and filter at initialisation, trains it briefly with MAT
(`keras_mat.wrap(AdamW)`), and prints per-module tables: lambda_max before
and after, which modules MAT updates, which it stopped, and test accuracy.

    KERAS_BACKEND=jax python examples/demo.py --data-dir ../shared/data

With no `--data-dir` the standard Keras loader downloads Fashion-MNIST.
Runs the same on KERAS_BACKEND=jax, tensorflow or torch.
"""

import argparse
import os
import sys
import tempfile
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="folder with keras_home/datasets/fashion-mnist (offline)")
    p.add_argument("--train-samples", type=int, default=6000)
    p.add_argument("--test-samples", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--probe-every", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--beta", type=float, default=0.02)
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the plain-training run")
    p.add_argument("--ntk-output", default="sum", choices=["sum", "logits", "loss"])
    p.add_argument("--out-dir", default="results/demo")
    return p.parse_args(argv)


def use_offline_data(data_dir):
    """Points KERAS_HOME at a scratch folder whose datasets/ links the shared
    Fashion-MNIST files (Keras writes keras.json into KERAS_HOME, so never
    point it at the read-only data folder itself)."""
    src = os.path.realpath(os.path.join(data_dir, "keras_home", "datasets", "fashion-mnist"))
    if not os.path.isdir(src):
        sys.exit(f"--data-dir: no Fashion-MNIST under {src}. Received: --data-dir={data_dir}")
    home = tempfile.mkdtemp(prefix="keras_home_")
    os.makedirs(os.path.join(home, "datasets"))
    os.symlink(src, os.path.join(home, "datasets", "fashion-mnist"))
    os.environ["KERAS_HOME"] = home


def build_model():
    import keras

    inp = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inp)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D()(x)  # 7 x 7 x 32
    x = keras.layers.Reshape((49, 32))(x)
    x = x + keras.layers.MultiHeadAttention(4, 8, name="attention")(x, x)
    x = keras.layers.LayerNormalization()(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dense(64, activation="relu", name="hidden")(x)
    out = keras.layers.Dense(10, name="classifier")(x)
    return keras.Model(inp, out, name="demo")


def train(model, optimizer, train_data, val_data, args, callbacks=(), verbose=0):
    """Compiles and fits one model of the comparison; returns (History, seconds)."""
    import keras

    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    history = model.fit(
        *train_data,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=val_data,
        callbacks=list(callbacks),
        verbose=verbose,
    )
    return history, time.perf_counter() - start


def table(title, header, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(header, widths))
    print(f"\n{title}\n{line}\n{'-' * len(line)}")
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def main(argv=None):
    args = parse_args(argv)
    if args.data_dir:
        use_offline_data(args.data_dir)
    import keras

    import keras_mat
    from keras_mat.callbacks import MATLogger, plot_lambda

    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    x_train = (x_train[: args.train_samples, ..., None] / 255.0).astype("float32")
    y_train = y_train[: args.train_samples]
    x_test = (x_test[: args.test_samples, ..., None] / 255.0).astype("float32")
    y_test = y_test[: args.test_samples]

    model = build_model()
    keras_mat.annotate(model)
    probe = x_train[:16]
    before = keras_mat.module_lambda_max(model, probe, ntk_output=args.ntk_output)

    optimizer = keras_mat.wrap(
        keras.optimizers.AdamW(2e-3),
        alpha=args.alpha,
        beta=args.beta,
        probe_every=args.probe_every,
        probe_samples=16,
        # One scalar per sample: the exact 10-output ("logits") mNTK costs about
        # 10x more per probe on CPU; see README "Choosing ntk_output".
        ntk_output=args.ntk_output,
    )
    os.makedirs(args.out_dir, exist_ok=True)
    logger = MATLogger(os.path.join(args.out_dir, "mat_log.csv"))
    history, seconds = train(model, optimizer, (x_train, y_train), (x_test, y_test), args, [logger], 2)
    after = keras_mat.module_lambda_max(model, probe, ntk_output=args.ntk_output)
    masks, frozen = optimizer.masks, optimizer.frozen

    rows = []
    for g in keras_mat.get_groups(model):
        lam0, lam1 = before[g.name], after[g.name]
        rows.append(
            [
                g.name,
                g.kind,
                g.num_modules,
                f"{lam0.min():.3g}..{lam0.max():.3g}",
                f"{lam1.min():.3g}..{lam1.max():.3g}",
                int(masks[g.name].sum()),
                int(frozen[g.name].sum()),
            ]
        )
    table(
        f"lambda_max per module family (probe: 16 training images, ntk_output={args.ntk_output}), backend={keras.config.backend()}",
        ["family", "kind", "modules", "lambda init (min..max)", "lambda end", "updated now", "stopped"],
        rows,
    )
    heads = [g for g in keras_mat.get_groups(model) if g.kind == "head"][0]
    table(
        "attention heads",
        ["head", "lambda init", "lambda end", "updated now", "stopped"],
        [
            [
                i,
                f"{before[heads.name][i]:.4g}",
                f"{after[heads.name][i]:.4g}",
                bool(masks[heads.name][i]),
                bool(frozen[heads.name][i]),
            ]
            for i in range(heads.num_modules)
        ],
    )
    active = history.history["mat_active"]
    baseline = None
    if args.baseline:
        keras.utils.set_random_seed(0)
        plain = build_model()
        hist, plain_seconds = train(
            plain, keras.optimizers.AdamW(2e-3), (x_train, y_train), (x_test, y_test), args
        )
        baseline = (hist.history["val_accuracy"][-1], plain_seconds)
    print(
        f"\nMAT: trained {args.epochs} epochs in {seconds:.1f} s; val accuracy {history.history['val_accuracy'][-1]:.4f}; "
        f"active fraction of modules at the end of each epoch: {[round(a, 3) for a in active]}; "
        f"measurements: {int(keras.ops.convert_to_numpy(optimizer.num_measurements.value))}"
    )
    from keras_mat import flops

    report = flops.count_flops(model, args.batch_size)
    steps = -(-len(x_train) // args.batch_size) * args.epochs
    plain_flops = flops.step_flops(report, None, frozen_prefix="auto") * steps
    print(
        f"analytic training FLOPs: MAT {history.history['mat_train_flops'][-1]:.3e} "
        f"({history.history['mat_train_flops'][-1] / plain_flops:.2f}x of plain {plain_flops:.3e}); "
        f"with the lambda_max probes {history.history['mat_total_flops'][-1]:.3e} "
        f"({history.history['mat_total_flops'][-1] / plain_flops:.2f}x)"
    )
    if baseline is not None:
        print(
            f"plain AdamW, same model, data and seed: val accuracy {baseline[0]:.4f} in {baseline[1]:.1f} s "
            "(MAT wall-clock includes compiling a step per skip set and the probes)"
        )
    png = plot_lambda(logger, os.path.join(args.out_dir, "lambda_max.png"))
    print(f"lambda heatmap: {png}; per-measurement log: {logger.csv_path}")
    return history


if __name__ == "__main__":
    main()
