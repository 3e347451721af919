"""MAT under data parallelism: every replica holds the masks of a one-device run.

Trains a small annotated model (4 attention heads, two Dense layers) for a few
steps with `keras_mat.wrap(Adam)`, once on one device and once on several
simulated CPU devices, on the same global batches, and compares the mask
sequences, lambda_max and weights; it also checks that every replica (device
shard) holds bit-identical MAT state and weights.

    python examples/data_parallel.py --backend jax          # 4 devices: DataParallel, ModelParallel
    python examples/data_parallel.py --backend tensorflow   # 2 devices: MirroredStrategy

JAX uses `XLA_FLAGS=--xla_force_host_platform_device_count=N` and
`keras.distribution.DataParallel`, then `ModelParallel` with the heads of the
attention kernels split over a "model" mesh axis. TensorFlow splits the CPU
into N logical devices under `tf.distribute.MirroredStrategy`. PyTorch data
parallelism is a custom loop: see examples/torch_ddp.py. Exits with status 1
when a run disagrees with the one-device run or replicas disagree.
"""

import argparse
import contextlib
import json
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["jax", "tensorflow"], default=os.environ.get("KERAS_BACKEND", "jax"))
    p.add_argument("--devices", type=int, default=None, help="simulated devices (default: 4 on JAX, 2 on TF)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8, help="global batch size")
    p.add_argument("--probe-samples", type=int, default=8)
    p.add_argument("--ntk-output", choices=["sum", "logits", "loss"], default="sum")
    p.add_argument("--no-model-parallel", dest="model_parallel", action="store_false")
    p.add_argument("--json", action="store_true", help="print one JSON line with every run's results")
    args = p.parse_args(argv)
    if args.backend not in ("jax", "tensorflow"):
        p.error(f"--backend must be jax or tensorflow. Received: --backend={args.backend}")
    args.devices = args.devices or (4 if args.backend == "jax" else 2)
    if args.devices < 2 or args.batch_size % args.devices:
        p.error(
            "--devices must be >= 2 and divide --batch-size. "
            f"Received: --devices={args.devices}, --batch-size={args.batch_size}"
        )
    return args


def set_up_devices(backend, devices):
    """Must run before the backend initializes."""
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if backend == "jax":
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    else:
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)


def build_model():
    import keras

    # Zero initializers: `train` assigns numpy weights (the same on every
    # backend and run), and JAX would compile a random kernel per shape.
    init = {"kernel_initializer": "zeros"}
    inp = keras.Input((4, 8))
    x = keras.layers.MultiHeadAttention(4, 4, name="mha", **init)(inp, inp)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(6, activation="tanh", name="fc", **init)(x)
    return keras.Model(inp, keras.layers.Dense(3, name="out", **init)(x))


def replicas_agree(array_parts):
    """True when every copy of the same slice is bit-identical."""
    import numpy as np

    groups = {}
    for index, value in array_parts:
        groups.setdefault(index, []).append(np.asarray(value))
    return all(all(np.array_equal(vs[0], v) for v in vs[1:]) for vs in groups.values())


def parts(variable, strategy):
    """(slice index, value) of every copy of a variable on every device."""
    if strategy is not None:  # tf.distribute
        return [(0, v) for v in strategy.experimental_local_results(variable.value)]
    value = variable.value
    return [(str(s.index), s.data) for s in getattr(value, "addressable_shards", [])] or [(0, value)]


def train(args, scope, strategy=None):
    """One run; `scope` is a distribution scope (or a null context)."""
    import time

    import keras
    import numpy as np

    import keras_mat

    start = time.perf_counter()
    with scope:
        model = build_model()
        rng = np.random.RandomState(0)  # the same weights on every backend and run
        for v in model.trainable_variables:
            v.assign(rng.uniform(-0.5, 0.5, size=tuple(v.shape)).astype("float32"))
        keras_mat.annotate(model, dense=True)
        optimizer = keras_mat.wrap(
            keras.optimizers.Adam(1e-2),
            alpha=0.5,
            beta=0.05,
            probe_every=2,
            probe_samples=args.probe_samples,
            ntk_output=args.ntk_output,
        )
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        data = np.random.RandomState(1)
        n = args.steps * args.batch_size
        x, y = data.randn(n, 4, 8).astype("float32"), data.randint(0, 3, n)
        masks = []

        class Record(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if keras.config.backend() == "jax":
                    self.model.jax_state_sync()
                masks.append({k: "".join(str(int(b)) for b in m) for k, m in optimizer.masks.items()})

        # MATCallback measures on the first probe_samples training samples, the same
        # fixed probe set for every replica.
        mat = keras_mat.MATCallback(x)
        model.fit(
            x, y, batch_size=args.batch_size, epochs=1, shuffle=False, verbose=0, callbacks=[mat, Record()]
        )
    state = [s[k] for s in optimizer.mat_state.values() for k in s] + [optimizer.num_measurements]
    checked = state + list(model.trainable_variables) + list(optimizer.inner_optimizer.variables)
    return {
        "seconds": time.perf_counter() - start,
        "masks": masks,
        "lambda_max": {k: v.tolist() for k, v in optimizer.lambda_max.items()},
        "weights": [
            np.asarray(keras.ops.convert_to_numpy(v.value)).tolist() for v in model.trainable_variables
        ],
        "copies": max(len(parts(v, strategy)) for v in checked),
        "replicas_agree": all(replicas_agree(parts(v, strategy)) for v in checked),
    }


def main(argv=None):
    args = parse_args(argv)
    set_up_devices(args.backend, args.devices)
    import numpy as np

    runs = {"one device": train(args, contextlib.nullcontext())}
    if args.backend == "jax":
        import jax
        import keras

        devices = jax.devices()[: args.devices]
        runs["DataParallel"] = train(args, keras.distribution.DataParallel(devices=devices).scope())
        if args.model_parallel and args.devices % 2 == 0:
            mesh = keras.distribution.DeviceMesh((args.devices // 2, 2), ["batch", "model"], devices=devices)
            layout = keras.distribution.LayoutMap(mesh)
            layout["mha/(query|key|value)/kernel"] = (None, "model", None)  # (dim, heads, head_dim)
            layout["mha/(query|key|value)/bias"] = ("model", None)
            layout["mha/attention_output/kernel"] = ("model", None, None)
            distribution = keras.distribution.ModelParallel(layout_map=layout, batch_dim_name="batch")
            runs["ModelParallel (heads split)"] = train(args, distribution.scope())
    else:
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(args.devices)])
        runs["MirroredStrategy"] = train(args, strategy.scope(), strategy)

    reference = runs["one device"]
    ok = True
    for name, run in runs.items():
        lam = max(
            float(np.max(np.abs(np.subtract(run["lambda_max"][k], v)) / np.maximum(np.abs(v), 1e-12)))
            for k, v in reference["lambda_max"].items()
        )
        weights = max(
            float(np.max(np.abs(np.subtract(a, b)))) for a, b in zip(run["weights"], reference["weights"])
        )
        same = run["masks"] == reference["masks"]
        run["summary"] = {"same_masks": same, "lambda_rel_diff": lam, "weight_abs_diff": weights}
        ok &= same and run["replicas_agree"] and lam < 1e-4 and weights < 1e-3
        if not args.json:
            print(
                f"{name} ({run['seconds']:.0f} s): {run['copies']} copies per variable, "
                f"replicas bit-identical: {run['replicas_agree']}"
            )
            print(f"  masks per step: {[' '.join(f'{k}={v}' for k, v in m.items()) for m in run['masks']]}")
            print(
                f"  same masks as one device: {same}; max rel. lambda diff {lam:.1e}; max weight diff {weights:.1e}"
            )
    if args.json:
        print(json.dumps(runs))
    else:
        print("OK: every run and replica agrees" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
