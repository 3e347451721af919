"""Wall-clock per training step with the bottom of the network frozen.

For a keras-hub BERT masked LM and a VGG-style CNN, freezes 0/25/50/75 % of the
encoder layers (conv layers) from the bottom, with and without the embeddings
(the stem conv), through keras_mat masks (`wrap(..., policy=None)` +
`set_masks`). keras_mat's training step then skips the weight gradients of
fully-masked variables and, when everything below a layer is frozen, the
backward pass below it. Reports the median step time over interleaved rounds
in one process, its ratio to the all-trained step, and the analytic FLOPs
ratio from `keras_mat.flops`.

    KERAS_BACKEND=jax python benchmarks/step_time.py --models bert,vgg --rounds 3
    # VGG steps are ~25x cheaper than BERT's: time more of them, in their own file
    KERAS_BACKEND=jax python benchmarks/step_time.py --models vgg --steps 30 \
        --out benchmarks/results/step_time_jax_vgg.json

`benchmarks/make_step_time_table.py` merges the files into step_time.md.
"""

import argparse
import json
import os
import platform
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="bert,vgg")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="timed steps per config and round")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bert-layers", type=int, default=4)
    p.add_argument("--bert-hidden", type=int, default=256)
    p.add_argument("--bert-heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--vgg-width", type=int, default=32)
    p.add_argument("--out", default=None)
    return p.parse_args()


def bert(args):
    import keras_hub
    import numpy as np

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=args.vocab,
        num_layers=args.bert_layers,
        num_heads=args.bert_heads,
        hidden_dim=args.bert_hidden,
        intermediate_dim=4 * args.bert_hidden,
        max_sequence_length=args.seq,
        dropout=0.1,
    )
    model = keras_hub.models.BertMaskedLM(backbone=backbone, preprocessor=None)
    rng = np.random.RandomState(0)
    n, masked = args.batch_size * (args.steps + 2), 20
    x = {
        "token_ids": rng.randint(1, args.vocab, (n, args.seq)).astype("int32"),
        "segment_ids": np.zeros((n, args.seq), "int32"),
        "padding_mask": np.ones((n, args.seq), "int32"),
        "mask_positions": np.sort(rng.rand(n, args.seq).argsort(axis=1)[:, :masked], axis=1).astype("int32"),
    }
    y = rng.randint(1, args.vocab, (n, masked)).astype("int32")
    model({k: v[:1] for k, v in x.items()})  # build
    layers = [f"transformer_layer_{i}" for i in range(args.bert_layers)]
    return model, x, y, layers, "embedding"


def vgg(args):
    import keras
    import numpy as np

    w = args.vgg_width
    inp = keras.Input((32, 32, 3))
    h = inp
    names = []
    for block, width in enumerate((w, 2 * w, 4 * w)):
        for j in range(2):
            name = f"conv{block}_{j}"
            names.append(name)
            h = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name=name)(h)
        h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(256, activation="relu", name="fc1")(h)
    out = keras.layers.Dense(10, name="fc2")(h)
    model = keras.Model(inp, out, name="vgg")
    rng = np.random.RandomState(0)
    x = rng.rand(args.batch_size * (args.steps + 2), 32, 32, 3).astype("float32")
    y = rng.randint(0, 10, args.batch_size * (args.steps + 2))
    # The first conv is the "stem"; the rest are the layers frozen from the bottom.
    return model, x, y, names[1:], names[0]


class _Timer:
    def __init__(self):
        import keras

        class CB(keras.callbacks.Callback):
            def __init__(cb):
                super().__init__()
                cb.times = []

            def on_train_batch_begin(cb, batch, logs=None):
                cb.t = time.perf_counter()

            def on_train_batch_end(cb, batch, logs=None):
                float(logs["loss"])  # wait for the step (JAX dispatches asynchronously)
                cb.times.append(time.perf_counter() - cb.t)

        self.cb = CB()


def run_model(name, args):
    import keras
    import numpy as np

    import keras_mat
    from keras_mat import flops

    model, x, y, layers, bottom = {"bert": bert, "vgg": vgg}[name](args)
    keras_mat.annotate(model, embeddings=True, norms=True)
    groups = keras_mat.get_groups(model)
    opt = keras_mat.wrap(keras.optimizers.Adam(1e-4), policy=None)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=opt, loss=loss)
    opt.build(model.trainable_variables)
    report = flops.count_flops(
        model, args.batch_size, input_shapes=keras.tree.map_structure(lambda a: tuple(a.shape[1:]), x)
    )
    full_flops = flops.step_flops(report, None, frozen_prefix="auto")

    def families_of(prefixes):
        return [g.name for g in groups if any(g.name.startswith(p) or f"/{p}" in g.name for p in prefixes)]

    configs = []
    for frac in (0.0, 0.25, 0.5, 0.75):
        k = int(round(frac * len(layers)))
        for with_bottom in (False, True):
            if frac == 0.0 and with_bottom:
                continue
            off = families_of(layers[:k]) + (families_of([bottom]) if with_bottom else [])
            configs.append((frac, with_bottom, sorted(set(off))))
    rows = {i: [] for i in range(len(configs))}
    timer = _Timer()
    steps = args.steps + 2  # two warm-up steps per fit are not timed
    for r in range(args.rounds):
        for i, (_, _, off) in enumerate(configs):
            opt.set_masks({g.name: np.ones(g.num_modules, bool) for g in groups})
            opt.set_masks({n: np.zeros([g for g in groups if g.name == n][0].num_modules, bool) for n in off})
            timer.cb.times = []
            model.fit(
                x,
                y,
                batch_size=args.batch_size,
                epochs=1,
                steps_per_epoch=steps,
                verbose=0,
                shuffle=False,
                callbacks=[timer.cb],
            )
            rows[i].append(float(np.median(timer.cb.times[2:])))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    out = []
    base = None
    for i, (frac, with_bottom, off) in enumerate(configs):
        med = float(np.median(rows[i]))
        masks = {g.name: np.asarray([g.name not in off] * g.num_modules) for g in groups}
        fl = flops.step_flops(report, masks, frozen_prefix="auto", granularity="family")
        if base is None:
            base = med
        label = name if name != "vgg" or args.vgg_width == 32 else f"vgg_w{args.vgg_width}"
        out.append(
            {
                "model": label,
                "frozen_fraction": frac,
                "bottom_frozen": with_bottom,
                "frozen_families": len(off),
                "step_ms": 1000 * med,
                "time_ratio": med / base,
                "flops_ratio": fl / full_flops,
                "per_round_ms": [1000 * t for t in rows[i]],
            }
        )
    return out


def main():
    args = parse_args()
    import keras

    backend = keras.config.backend()
    results = []
    for name in args.models.split(","):
        results.extend(run_model(name, args))
    meta = {
        "backend": backend,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "keras": keras.__version__,
        "args": vars(args),
    }
    out = args.out or f"benchmarks/results/step_time_{backend}.json"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": results}, f, indent=1)
    print(
        "| backend | model | frozen from bottom | embeddings/stem frozen | step ms | time ratio | FLOPs ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {backend} | {r['model']} | {int(100 * r['frozen_fraction'])}% | {'yes' if r['bottom_frozen'] else 'no'} "
            f"| {r['step_ms']:.0f} | {r['time_ratio']:.2f} | {r['flops_ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
