"""VGG on CIFAR-10: plain training vs MAT vs "Rand" vs Multirate (modules = conv filters).

    KERAS_BACKEND=jax python examples/vgg_cifar10.py --preset demo
    python examples/vgg_cifar10.py --depth 11 --width 0.5 --train-samples 20000 --epochs 4
    python examples/vgg_cifar10.py --data-dir /path/to/data --preset demo   # offline copy

By default it loads CIFAR-10 with `keras.datasets.cifar10.load_data()`, which
downloads the official archive once (and checks its hash). Offline,
`--data-dir` names a folder holding `cifar10-jpeg/cifar-10-jpeg-q75.zip`, a zip
of the CIFAR-10 images as JPEG files (`cifar-10-jpeg/{train,test}/<class>/N.jpg`;
see docs/data.md); the selected images are decoded with Pillow and cached as
`.npz` in `--cache-dir`. Both splits are shuffled with `--seed` before the
`--train-samples` subset and the `--val-samples` validation subset (of the
test split) are taken.

The model is VGG11 or VGG16 (`--depth`), channels scaled by `--width`,
optional BatchNorm. The standard augmentation (random horizontal flip and a
random translation of up to 4 pixels) runs in the data pipeline, a
`keras.utils.PyDataset` in numpy, so the example needs no TensorFlow on JAX
or PyTorch. `keras_mat.annotate` makes every conv filter a module, with a
threshold per layer (the default scope for filters). `--ablation` also runs
MAT with `ntk_output` "logits", "sum" and "loss" and compares the modules
each one chooses (the comparison's own MAT run stands for its
`--ntk-output`).

Runs unchanged under KERAS_BACKEND=jax, tensorflow or torch.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import zipfile

import keras
import numpy as np

# The comparison harness (plain / MAT / Rand / Multirate) lives in benchmarks/harness.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "harness"))

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ARCHIVE = os.path.join("cifar10-jpeg", "cifar-10-jpeg-q75.zip")
CONFIGS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}
PRESETS = {
    # `make demo`: about 2 minutes on 2 CPU cores on JAX.
    "demo": dict(
        depth=11,
        width=0.125,
        train_samples=2048,
        val_samples=1000,
        epochs=4,
        batch_size=64,
        probe_every=8,
        probe_samples=8,
        ntk_output="sum",
    ),
}
NTK_OUTPUTS = ("logits", "sum", "loss")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named set of defaults (flags given win)")
    p.add_argument("--data-dir", default=None, help="folder holding cifar10-jpeg/ (offline); else download")
    p.add_argument(
        "--cache-dir", default=None, help="where the decoded .npz goes (default ~/.keras/datasets)"
    )
    p.add_argument("--depth", type=int, choices=sorted(CONFIGS), default=None, help="11 (default) or 16")
    p.add_argument("--width", type=float, default=None, help="channel multiplier (default 0.5 = half width)")
    p.add_argument("--batch-norm", dest="batch_norm", action="store_true", default=True)
    p.add_argument("--no-batch-norm", dest="batch_norm", action="store_false")
    p.add_argument("--train-samples", type=int, default=None, help="training subset (default: all 50000)")
    p.add_argument("--val-samples", type=int, default=None, help="validation subset of the test split")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--steps-per-epoch", type=int, default=None, help="steps between evaluations")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 (adamw) / 0.05 (sgd, momentum 0.9)")
    p.add_argument("--variants", default="plain,mat,rand,multirate", help="comma-separated subset")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--beta", type=float, default=1e-3)
    p.add_argument("--probe-every", type=int, default=None)
    p.add_argument("--probe-samples", type=int, default=None)
    p.add_argument("--threshold-scope", choices=("auto", "global", "per_layer"), default="auto")
    p.add_argument("--ntk-output", choices=("auto",) + NTK_OUTPUTS, default=None, help="default logits")
    p.add_argument("--multirate-k", type=int, default=4)
    p.add_argument("--ablation", action="store_true", help="also run MAT with each ntk_output")
    p.add_argument("--out-dir", default="results/vgg_cifar10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=1)
    args = p.parse_args(argv)
    defaults = dict(
        depth=11,
        width=0.5,
        epochs=4,
        batch_size=128,
        probe_every=50,
        probe_samples=8,
        ntk_output="logits",
        val_samples=2000,
    )
    defaults.update(PRESETS.get(args.preset, {}))  # flags given on the command line win
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lr is None:
        args.lr = 1e-3 if args.optimizer == "adamw" else 0.05
    if args.width <= 0:
        p.error(f"--width must be > 0. Received: --width={args.width}")
    variants = [v for v in args.variants.split(",") if v]
    args.variants = variants
    return args


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def _archive_members(zf):
    """`{"train": [(member, label), ...], "test": [...]}` in archive order."""
    members = {"train": [], "test": []}
    for name in zf.namelist():
        parts = name.split("/")
        if name.endswith(".jpg") and len(parts) == 4 and parts[1] in members and parts[2] in CLASSES:
            members[parts[1]].append((name, CLASSES.index(parts[2])))
    return members


def _decode(zf, members):
    from PIL import Image

    images = np.empty((len(members), 32, 32, 3), np.uint8)
    for i, (name, _) in enumerate(members):
        with Image.open(io.BytesIO(zf.read(name))) as im:
            images[i] = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return images, np.asarray([label for _, label in members], np.int32)


def _subset(n_total, n, rng):
    # One permutation of the whole split (it is grouped by class), then a prefix.
    order = rng.permutation(n_total)
    return order if n is None else order[: min(int(n), n_total)]


def load_cifar10(data_dir=None, cache_dir=None, train_samples=None, val_samples=None, seed=0, verbose=1):
    """Shuffled CIFAR-10 subsets: `(x_train, y_train), (x_val, y_val)`, uint8
    images and int32 labels; validation comes from the test split.

    Offline (`data_dir`), it decodes only the selected JPEGs of the archive
    and caches them as .npz in `cache_dir` (default `~/.keras/datasets`), so
    a second run with the same seed and sizes reads the cache. Without
    `data_dir`, it uses `keras.datasets.cifar10.load_data()` (downloads).
    The shuffle (`seed`) is the same either way.
    """
    rng = np.random.RandomState(seed)
    if data_dir is None:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
        train = _subset(len(x_train), train_samples, rng)
        test = _subset(len(x_test), val_samples, rng)
        return (
            (x_train[train], y_train.reshape(-1)[train].astype("int32")),
            (x_test[test], y_test.reshape(-1)[test].astype("int32")),
        )
    archive = os.path.join(data_dir, ARCHIVE)
    if not os.path.isfile(archive):
        raise FileNotFoundError(
            f"--data-dir: no CIFAR-10 JPEG archive at {archive}. Received: --data-dir={data_dir}"
        )
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".keras", "datasets")
    os.makedirs(cache_dir, exist_ok=True)
    cache = os.path.join(cache_dir, f"cifar10-jpeg-q75-seed{seed}-train{train_samples}-val{val_samples}.npz")
    if os.path.isfile(cache) and os.path.getmtime(cache) >= os.path.getmtime(archive):
        with np.load(cache) as data:
            return (data["x_train"], data["y_train"]), (data["x_val"], data["y_val"])
    with zipfile.ZipFile(archive) as zf:
        members = _archive_members(zf)
        train = [members["train"][i] for i in _subset(len(members["train"]), train_samples, rng)]
        test = [members["test"][i] for i in _subset(len(members["test"]), val_samples, rng)]
        if verbose:
            print(f"decoding {len(train) + len(test)} images of {archive} (cached in {cache})", flush=True)
        x_train, y_train = _decode(zf, train)
        x_val, y_val = _decode(zf, test)
    tmp = cache + ".tmp.npz"
    np.savez(tmp, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val)
    os.replace(tmp, cache)
    return (x_train, y_train), (x_val, y_val)


class AugmentedImages(keras.utils.PyDataset):
    """Shuffled batches of `(images, labels)` with the standard CIFAR augmentation, drawn per
    image in numpy: a random horizontal flip and a random translation by up to `shift` pixels
    (zero fill). Batches are float32 numpy arrays, so every backend trains on them without
    TensorFlow. The order and the augmentation depend only on `seed` and the epoch, so every
    variant of a comparison sees the same batches. The last partial batch is dropped.
    """

    def __init__(self, x, y, batch_size, seed, shift=4):
        super().__init__()
        self.x, self.y, self.batch_size, self.seed, self.shift = x, y, int(batch_size), seed, shift
        self.epoch = 0
        self._order = np.random.default_rng([seed, 0]).permutation(len(x))

    def __len__(self):
        return len(self.x) // self.batch_size

    def __getitem__(self, i):
        index = self._order[i * self.batch_size : (i + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        images = self.x[index].astype("float32")
        flip = rng.random(len(index)) < 0.5
        images[flip] = images[flip, :, ::-1]
        s = self.shift
        padded = np.pad(images, ((0, 0), (s, s), (s, s), (0, 0)))
        rows, cols = images.shape[1:3]
        out = np.empty_like(images)
        for k, (dy, dx) in enumerate(rng.integers(0, 2 * s + 1, size=(len(index), 2))):
            out[k] = padded[k, dy : dy + rows, dx : dx + cols]
        return out, self.y[index]

    def on_epoch_end(self):
        self.epoch += 1
        self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.x))


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------

MEAN = np.array([0.4914, 0.4822, 0.4465], "float32") * 255.0
STD = np.array([0.2470, 0.2435, 0.2616], "float32") * 255.0


def _numpy_fan_in_normal(scale):
    """Initializer: normal with variance `scale / fan_in` (He normal for 2),
    drawn with numpy's global RNG (seeded by `keras.utils.set_random_seed`):
    the same initial weights on every backend, and no random kernel compiled
    per weight shape on JAX (seconds each on CPU)."""
    import keras

    def init(shape, dtype=None):
        fan_in = float(np.prod(shape[:-1]))
        values = np.random.normal(0.0, np.sqrt(scale / fan_in), size=tuple(shape)).astype("float32")
        return keras.ops.convert_to_tensor(values, dtype=dtype)

    return init


def build_vgg(depth=11, width=0.5, batch_norm=True, num_classes=10):
    """VGG for 32x32 inputs: 3x3 convs (channels x `width`), 5 max-pools,
    one Dense classifier. Inputs are images in [0, 255]; the model normalises
    them (augmentation is in the data pipeline, `AugmentedImages`)."""
    import keras

    inp = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Normalization(mean=MEAN, variance=STD**2, name="normalize")(inp)
    conv, pool = 0, 0
    for item in CONFIGS[depth]:
        if item == "M":
            pool += 1
            x = keras.layers.MaxPooling2D(name=f"pool{pool}")(x)
            continue
        conv += 1
        filters = max(1, int(round(item * width)))
        x = keras.layers.Conv2D(
            filters,
            3,
            padding="same",
            use_bias=not batch_norm,
            kernel_initializer=_numpy_fan_in_normal(2.0),
            name=f"conv{conv}",
        )(x)
        if batch_norm:
            x = keras.layers.BatchNormalization(name=f"bn{conv}")(x)
        x = keras.layers.ReLU(name=f"relu{conv}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    out = keras.layers.Dense(num_classes, kernel_initializer=_numpy_fan_in_normal(1.0), name="classifier")(x)
    return keras.Model(inp, out, name=f"vgg{depth}")


# --------------------------------------------------------------------------------------
# Ablation of ntk_output
# --------------------------------------------------------------------------------------


def _jaccard(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def ablation_table(runs):
    """Markdown: per ntk_output the final/best metric and active fraction, the
    final active fraction per layer, and the overlap of the final masks."""
    modes = list(runs)
    families = list(next(iter(runs.values()))["final_active"])
    lines = [
        "| ntk_output | final val_accuracy | best val_accuracy | train FLOPs (T) | FLOPs with probes (T) | "
        "final active fraction |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    flat = {}
    for mode, r in runs.items():
        flat[mode] = np.concatenate([np.asarray(r["final_active"][f], bool) for f in families])
        lines.append(
            f"| {mode} | {r['final']:.4f} | {r['best']:.4f} | {r['train_flops'] / 1e12:.3f} | "
            f"{r['total_flops'] / 1e12:.3f} | {flat[mode].mean():.3f} |"
        )
    lines += ["", "Final active fraction per module family:", ""]
    lines.append("| family | " + " | ".join(modes) + " |")
    lines.append("| --- |" + " ---: |" * len(modes))
    for f in families:
        cells = [f"{np.mean(runs[m]['final_active'][f]):.2f}" for m in modes]
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    lines += ["", "Overlap (Jaccard) of the final sets of updated modules:", ""]
    lines.append("| | " + " | ".join(modes) + " |")
    lines.append("| --- |" + " ---: |" * len(modes))
    for a in modes:
        lines.append(f"| {a} | " + " | ".join(f"{_jaccard(flat[a], flat[b]):.2f}" for b in modes) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def main(argv=None):
    """Runs the comparison (and the ablation with `--ablation`).

    Returns:
        The `compare` results dict (variant -> record); with `--ablation` it
        also holds `"ablation"`: ntk_output -> the MAT run's record.
    """
    args = parse_args(argv)
    import keras
    from common import compare

    (x_train, y_train), (x_val, y_val) = load_cifar10(
        args.data_dir, args.cache_dir, args.train_samples, args.val_samples, args.seed, args.verbose
    )
    if args.verbose:
        print(
            f"VGG{args.depth} width {args.width} (batch norm {args.batch_norm}) on CIFAR-10: "
            f"{len(x_train)} training / {len(x_val)} validation images, backend {keras.config.backend()}",
            flush=True,
        )

    def build_model():
        return build_vgg(args.depth, args.width, args.batch_norm)

    def optimizer_fn():
        if args.optimizer == "sgd":
            return keras.optimizers.SGD(args.lr, momentum=0.9)
        return keras.optimizers.AdamW(args.lr, weight_decay=5e-4)

    mat_options = dict(
        alpha=args.alpha,
        beta=args.beta,
        probe_every=args.probe_every,
        probe_samples=args.probe_samples,
        ntk_output=args.ntk_output,
        threshold_scope=args.threshold_scope,
    )
    common_kwargs = dict(
        optimizer_fn=optimizer_fn,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        metric="val_accuracy",
        mode="max",
        seed=args.seed,
        verbose=args.verbose,
        batch_size=args.batch_size,
    )
    title = f"VGG{args.depth} x{args.width} CIFAR-10 ({keras.config.backend()})"
    x_val = x_val.astype("float32")

    def train_data():  # a fresh pipeline per variant: the same order and augmentation
        return AugmentedImages(x_train, y_train, args.batch_size, args.seed)

    results = {}
    if args.variants:
        results = compare(
            build_model,
            train_data,
            (x_val, y_val),
            variants=args.variants,
            mat_options=mat_options,
            multirate_options=dict(k=args.multirate_k),
            out_dir=args.out_dir,
            title=title,
            **common_kwargs,
        )
    if args.ablation:
        runs = {}
        for mode in NTK_OUTPUTS:
            if mode == args.ntk_output and "mat" in results:
                runs[mode] = results["mat"]  # the comparison's MAT run: not trained again
                continue
            out = os.path.join(args.out_dir, f"ablation_{mode}")
            runs[mode] = compare(
                build_model,
                train_data,
                (x_val, y_val),
                variants=("mat",),
                mat_options={**mat_options, "ntk_output": mode},
                out_dir=out,
                title=f"{title}, ntk_output={mode}",
                **common_kwargs,
            )["mat"]
        table = ablation_table(runs)
        with open(os.path.join(args.out_dir, "ablation.md"), "w") as f:
            f.write(f"## {title}: ntk_output ablation\n\n{table}\n")
        with open(os.path.join(args.out_dir, "ablation.json"), "w") as f:
            json.dump(runs, f, indent=1)
        if args.verbose:
            print(f"\n## {title}: ntk_output ablation\n\n{table}", flush=True)
        results["ablation"] = runs
    return results


if __name__ == "__main__":
    main()
