"""Wall-clock per training step with the bottom of the network frozen.

For a keras-hub BERT masked LM and a VGG-style CNN, freezes 0/25/50/75 % of the
encoder layers (conv layers) from the bottom, with and without the embeddings
(the stem conv), through keras_mat masks (`wrap(..., policy=None)` +
`set_masks`). keras_mat's training step then skips the weight gradients of
fully-masked variables and, when everything below a layer is frozen, the
backward pass below it. Reports the median step time over interleaved rounds
in one process, its ratio to the all-trained step, the analytic FLOPs ratio
from `keras_mat.flops`, and the matrix-product FLOPs ratio that the backend
itself counts in the step it runs (JAX: XLA's cost analysis of the compiled
step; TF: MatMul/Einsum/Conv ops of the traced step graph and their static
shapes; torch: `torch.utils.flop_counter` over one eager step).

All variants are compiled first; then every round runs every configuration
for `--steps` timed steps (after `--warmup` untimed ones), so that the
machine's drift hits all configurations alike. The time ratio of a row is the
median over rounds of (its median step in the round / the all-trained median
in the same round); the spread over rounds is reported with it.

    KERAS_BACKEND=jax python benchmarks/step_time.py --models bert,vgg --rounds 3
    # VGG steps are ~25x cheaper than BERT's: time more of them, in their own file
    KERAS_BACKEND=jax python benchmarks/step_time.py --models vgg --steps 30 \
        --out benchmarks/results/step_time_jax_vgg.json

`benchmarks/make_step_time_table.py` merges the files into step_time.md.
"""

import argparse
import json
import math
import os
import platform
import re
import time

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="bert,vgg")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="timed steps per config and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per config and round")
    p.add_argument("--no-count", action="store_true", help="skip the backend FLOPs counts")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bert-layers", type=int, default=4)
    p.add_argument("--bert-hidden", type=int, default=256)
    p.add_argument("--bert-heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--bert-dropout", type=float, default=0.1)
    p.add_argument("--vgg-width", type=int, default=32)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _batches(args):
    # Enough batches for the longest fit: the compile pass (2 steps) or warm-up + timed steps.
    return args.steps + max(getattr(args, "warmup", 2), 2)


def bert(args):
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=args.vocab,
        num_layers=args.bert_layers,
        num_heads=args.bert_heads,
        hidden_dim=args.bert_hidden,
        intermediate_dim=4 * args.bert_hidden,
        max_sequence_length=args.seq,
        dropout=getattr(args, "bert_dropout", 0.1),  # (probe_overhead.py passes its own args)
    )
    model = keras_hub.models.BertMaskedLM(backbone=backbone, preprocessor=None)
    rng = np.random.RandomState(0)
    n, masked = args.batch_size * _batches(args), 20
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
    n = args.batch_size * _batches(args)
    x = rng.rand(n, 32, 32, 3).astype("float32")
    y = rng.randint(0, 10, n)
    # The first conv is the "stem"; the rest are the layers frozen from the bottom.
    return model, x, y, names[1:], names[0]


def _dims(text):
    return [int(d) for d in text.split(",") if d]  # "4096,256" -> [4096, 256]; "" (scalar) -> []


def _hlo_matmul_flops(hlo):
    # Dots and convolutions of an optimized XLA module (what runs after XLA's
    # dead-code elimination): 2 x output size x contracted size. Every
    # instruction line declares its shape, so operands are looked up by name.
    shapes = {m[1]: _dims(m[2]) for m in re.finditer(r"%([\w.\-]+) = \w+\[([\d,]*)\]", hlo)}
    total = 0
    dot = r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\).*?lhs_contracting_dims=\{([\d,]*)\}"
    for m in re.finditer(dot, hlo):
        lhs = shapes[m[2]]
        total += 2 * math.prod(_dims(m[1])) * math.prod(lhs[i] for i in _dims(m[4]))
    conv = r"= \w+\[([\d,]*)\]\S* convolution\(%([\w.\-]+), %([\w.\-]+)\).*?dim_labels=\w+_(\w+)->"
    for m in re.finditer(conv, hlo):  # forward, input- and filter-gradient convolutions alike
        rhs = shapes[m[3]]
        total += 2 * math.prod(_dims(m[1])) * math.prod(d for d, c in zip(rhs, m[4]) if c != "o")
    return total


def _tf_live_ops(graph):
    # What a tf.function runs: TF prunes the ops that feed neither an output
    # nor a stateful op (its control outputs), e.g. the filter gradient of a
    # frozen conv, which TF's Conv2D gradient emits whatever is watched.
    live, todo = set(), [t.op for t in graph.outputs] + list(graph.control_outputs)
    while todo:
        op = todo.pop()
        if op.name not in live:
            live.add(op.name)
            todo.extend(t.op for t in op.inputs)
            todo.extend(op.control_inputs)
    return [op for op in graph.get_operations() if op.name in live]


def _tf_graph_matmul_flops(graph):
    total = 0
    for op in _tf_live_ops(graph):
        t = op.type
        if t in ("MatMul", "BatchMatMulV2", "BatchMatMulV3"):
            a = op.inputs[0].shape
            trans = op.get_attr("transpose_a" if t == "MatMul" else "adj_x")
            total += 2 * math.prod(op.outputs[0].shape) * (a[-2] if trans else a[-1])
        elif t == "Einsum" and len(op.inputs) == 2:
            sizes = {}
            for spec, x in zip(op.get_attr("equation").decode().split("->")[0].split(","), op.inputs):
                sizes.update(zip(spec, x.shape))
            total += 2 * math.prod(sizes.values())
        elif t in ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter"):
            kernel = op.outputs[0].shape if t == "Conv2DBackpropFilter" else op.inputs[1].shape
            out = op.outputs[0].shape if t == "Conv2D" else op.inputs[2].shape
            total += 2 * math.prod(out) * math.prod(kernel[:3])
    return total


def jax_step_hlo(model, x, y):
    """The XLA-optimized HLO text of the MAT train step for the skip set
    `fit` chose last (JAX), compiled for the batch `(x, y)`."""
    import jax

    model._keras_mat_runtime.skip = model._keras_mat_runtime.next_skip
    state = model._get_jax_state(
        trainable_variables=True,
        non_trainable_variables=True,
        optimizer_variables=True,
        metrics_variables=True,
    )
    return jax.jit(lambda s, d: model.train_step(s, d)).lower(state, (x, y)).compile().as_text()


def backend_flops(model, x, y):
    """Matrix-product and convolution FLOPs of one MAT train step, counted by
    the backend in the step it runs for the skip set `fit` chose."""
    import keras

    model._keras_mat_runtime.skip = model._keras_mat_runtime.next_skip
    backend = keras.config.backend()
    if backend == "jax":
        return _hlo_matmul_flops(jax_step_hlo(model, x, y))
    if backend == "tensorflow":
        import tensorflow as tf

        data = keras.tree.map_structure(tf.constant, (x, y))
        return _tf_graph_matmul_flops(
            tf.function(lambda d: model.train_step(d)).get_concrete_function(data).graph
        )
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    data = keras.tree.map_structure(torch.as_tensor, (x, y))
    with FlopCounterMode(display=False) as counter:
        model.train_step(data)  # one real step (the benchmark's weights are throw-away)
    return counter.get_total_flops()


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


class Setup:
    """One benchmark model, annotated and compiled with a mask-driven MAT
    optimizer, and its frozen-from-the-bottom configurations."""

    def __init__(self, name, args):
        import keras

        import keras_mat
        from keras_mat import flops

        self.args = args
        model, self.x, self.y, layers, bottom = {"bert": bert, "vgg": vgg}[name](args)
        keras_mat.annotate(model, embeddings=True, norms=True)
        self.model, self.groups = model, keras_mat.get_groups(model)
        self.opt = keras_mat.wrap(keras.optimizers.Adam(1e-4), policy=None)
        model.compile(optimizer=self.opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        self.opt.build(model.trainable_variables)
        shapes = keras.tree.map_structure(lambda a: tuple(a.shape[1:]), self.x)
        self.report = flops.count_flops(model, args.batch_size, input_shapes=shapes)
        self.full_flops = flops.step_flops(self.report, None, frozen_prefix="auto")
        self.batch = keras.tree.map_structure(lambda a: a[: args.batch_size], (self.x, self.y))  # one batch
        self.label = name if name != "vgg" or args.vgg_width == 32 else f"vgg_w{args.vgg_width}"
        # (fraction of layers frozen, bottom frozen too, names of the families turned off)
        self.configs = []
        for frac in (0.0, 0.25, 0.5, 0.75):
            k = int(round(frac * len(layers)))
            for with_bottom in (False, True):
                if frac == 0.0 and with_bottom:
                    continue
                off = self.families_of(layers[:k]) + (self.families_of([bottom]) if with_bottom else [])
                self.configs.append((frac, with_bottom, sorted(set(off))))

    def families_of(self, prefixes):
        return [
            g.name for g in self.groups if any(g.name.startswith(p) or f"/{p}" in g.name for p in prefixes)
        ]

    def masks(self, off):
        return {g.name: np.asarray([g.name not in off] * g.num_modules) for g in self.groups}

    def run(self, off, steps, callbacks=()):
        """`fit` for `steps` steps with the families `off` masked."""
        self.opt.set_masks(self.masks(off))
        self.model.fit(
            self.x,
            self.y,
            batch_size=self.args.batch_size,
            epochs=1,
            steps_per_epoch=steps,
            verbose=0,
            shuffle=False,
            callbacks=list(callbacks),
        )

    def step_flops_ratio(self, off):
        from keras_mat import flops

        fl = flops.step_flops(self.report, self.masks(off), frozen_prefix="auto", granularity="family")
        return fl, fl / self.full_flops


def run_model(name, args):
    s = Setup(name, args)
    model, configs = s.model, s.configs
    timer = _Timer()

    def run(off, steps):
        timer.cb.times = []
        s.run(off, steps, [timer.cb])
        return timer.cb.times

    counted = []
    for _, _, off in configs:  # compile every variant (and count its work) before timing
        run(off, 2)
        counted.append(None if args.no_count else float(backend_flops(model, *s.batch)))
    rows = [[] for _ in configs]  # per configuration: its median step in each round
    for r in range(args.rounds):
        for i, (_, _, off) in enumerate(configs):
            rows[i].append(float(np.median(run(off, args.warmup + args.steps)[args.warmup :])))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    out = []
    base = np.asarray(rows[0])
    for i, (frac, with_bottom, off) in enumerate(configs):
        ratios = np.asarray(rows[i]) / base  # paired: the same round's all-trained step
        fl, fl_ratio = s.step_flops_ratio(off)
        out.append(
            {
                "model": s.label,
                "frozen_fraction": frac,
                "bottom_frozen": with_bottom,
                "frozen_families": len(off),
                "step_ms": 1000 * float(np.median(rows[i])),
                "time_ratio": float(np.median(ratios)),
                "time_ratio_range": [float(ratios.min()), float(ratios.max())],
                "flops_ratio": fl_ratio,
                "analytic_gflops": fl / 1e9,
                "backend_gflops": None if counted[i] is None else counted[i] / 1e9,
                "backend_flops_ratio": None if counted[i] is None else counted[i] / counted[0],
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
        "| backend | model | frozen from bottom | embeddings/stem frozen | step ms | time ratio (range) "
        "| FLOPs ratio | backend-counted FLOPs ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {backend} | {r['model']} | {int(100 * r['frozen_fraction'])}% | {'yes' if r['bottom_frozen'] else 'no'} "
            f"| {r['step_ms']:.0f} | {r['time_ratio']:.2f} ({r['time_ratio_range'][0]:.2f}-{r['time_ratio_range'][1]:.2f}) "
            f"| {r['flops_ratio']:.2f} | {r['backend_flops_ratio'] or float('nan'):.2f} |"
        )


if __name__ == "__main__":
    main()
