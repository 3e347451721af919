"""Cost of one lambda_max probe versus one training step, per-sample route against
layer-factored route.

For a small keras-hub BERT masked LM, a small VGG-style CNN and a small residual CNN,
and for each probe size n, measures on the active Keras backend (KERAS_BACKEND):

* one training step at batch size n (`model.train_on_batch`, Adam, after warm-up);
* one lambda_max probe at the same n (`keras_mat.ntk.get_probe(...)(x, y)`, which
  re-reads the weights and compiles itself on the first call), for each case:
  * `generic`: every probed variable on the vectorized per-sample Jacobian route;
  * `auto`: the default, the layer-factored route for the Dense/EinsumDense/convolution
    nodes of a Functional graph, the per-sample route for the rest (all of BERT's
    heads: its encoder layers are not Functional graphs);
* the ratio probe / train step inside each round (train step, then every probe case,
  interleaved over the n values), median over rounds.

The machine load (`os.getloadavg`) is recorded before and after the run.

Targets at n=16: a "sum" probe of every filter of a CNN at most 1.5x a training step on
JAX and TensorFlow, 2x on PyTorch; "logits" with 10 classes at most 12x; BERT probes not
slower than before.

Usage:
    KERAS_BACKEND=jax .venv/bin/python benchmarks/lambda_max.py --models vgg,resnet,bert --n 8,16,32 --rounds 3
    .venv/bin/python benchmarks/lambda_max.py --table   # rebuild results/lambda_max.md from the JSONs

The module families are those `keras_mat.discover_groups` finds (attention heads, conv
filters), without `annotate`, so that `train_on_batch` is the plain Keras step.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SUM_TARGETS = {"jax": 1.5, "tensorflow": 1.5, "torch": 2.0}
LOGITS_TARGET = 12.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bert,vgg")
    p.add_argument("--n", default="8,16,32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--routes", default="generic,auto")
    p.add_argument("--vgg-outputs", default="sum,logits", help="ntk_output values probed on the CNNs")
    p.add_argument("--out", default=None, help="default: benchmarks/results/lambda_max_<backend>.json")
    p.add_argument("--bert-layers", type=int, default=4)
    p.add_argument("--bert-hidden", type=int, default=256)
    p.add_argument("--bert-heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--mask-positions", type=int, default=20)
    p.add_argument("--vgg-width", type=int, default=32, help="base width of both CNNs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table", action="store_true", help="only rebuild the markdown table from existing JSONs")
    p.add_argument("--md", default=os.path.join(RESULTS, "lambda_max.md"))
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------


def build_bert(args):
    import keras
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=args.vocab,
        num_layers=args.bert_layers,
        num_heads=args.bert_heads,
        hidden_dim=args.bert_hidden,
        intermediate_dim=4 * args.bert_hidden,
        max_sequence_length=args.seq,
    )
    model = keras_hub.models.BertMaskedLM(backbone=backbone, preprocessor=None)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model, ["sum"]


def bert_batch(args, n, rng):
    import numpy as np

    m = args.mask_positions
    x = {
        "token_ids": rng.integers(1, args.vocab, size=(n, args.seq)).astype("int32"),
        "segment_ids": np.zeros((n, args.seq), "int32"),
        "padding_mask": np.ones((n, args.seq), "int32"),
        "mask_positions": np.stack(
            [np.sort(rng.choice(args.seq, m, replace=False)) for _ in range(n)]
        ).astype("int32"),
    }
    return x, rng.integers(1, args.vocab, size=(n, m)).astype("int32")


def build_vgg(args):
    import keras

    w = args.vgg_width
    layers = [keras.Input((32, 32, 3))]
    for c in (w, 2 * w, 4 * w):
        layers += [
            keras.layers.Conv2D(c, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(c, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
        ]
    layers += [keras.layers.Flatten(), keras.layers.Dense(4 * w, activation="relu"), keras.layers.Dense(10)]
    model = keras.Sequential(layers, name="vgg")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model, [m for m in args.vgg_outputs.split(",") if m]


def vgg_batch(args, n, rng):
    x = rng.standard_normal((n, 32, 32, 3)).astype("float32")
    return x, rng.integers(0, 10, size=(n,)).astype("int32")


def build_resnet(args):
    """A small residual CNN (not one of the test models): a 3x3 stem, two
    residual blocks of 3x3 and 1x1 convolutions (the second strided, with a
    1x1 projection), global pooling and a 10-way Dense head."""
    import keras

    w = args.vgg_width
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(w, 3, padding="same", activation="relu")(inputs)
    for c, stride in ((w, 1), (2 * w, 2)):
        r = keras.layers.Conv2D(c, 3, strides=stride, padding="same", activation="relu")(h)
        r = keras.layers.Conv2D(c, 1)(r)
        skip = h if stride == 1 and c == h.shape[-1] else keras.layers.Conv2D(c, 1, strides=stride)(h)
        h = keras.layers.Activation("relu")(keras.layers.Add()([r, skip]))
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(10)(h), name="resnet")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model, [m for m in args.vgg_outputs.split(",") if m]


MODELS = {
    "bert": (build_bert, bert_batch),
    "vgg": (build_vgg, vgg_batch),
    "resnet": (build_resnet, vgg_batch),
}


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def _timed(fn):
    from keras import ops

    t0 = time.perf_counter()
    out = fn()
    if isinstance(out, list):
        [ops.convert_to_numpy(t) for t in out]
    return time.perf_counter() - t0


def run_model(name, args, backend):
    import keras
    import numpy as np

    import keras_mat
    from keras_mat import ntk

    build, batch = MODELS[name]
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model, outputs = build(args)
    ns = [int(s) for s in args.n.split(",") if s]
    data = {n: batch(args, n, rng) for n in ns}
    model(data[ns[0]][0], training=False)
    groups = keras_mat.discover_groups(model)
    cases = [(mode, route) for mode in outputs for route in args.routes.split(",") if route]
    probes = {}
    for mode, route in cases:
        probes[(mode, route)] = ntk.get_probe(model, groups, mode, x=data[ns[0]][0], route=route)
    info = {
        "model": name,
        "probed_params": int(sum(g.num_parameters * g.num_modules for g in groups)),
        "num_modules": int(sum(g.num_modules for g in groups)),
        "num_families": len(groups),
        "routes": {f"{m}/{r}": p.route for (m, r), p in probes.items()},
        "rows_per_sample": {f"{m}/{r}": p.rows_per_sample for (m, r), p in probes.items()},
    }
    print(f"[{backend}] {name}: {json.dumps(info)}", flush=True)
    per_n = {n: {"train_ms": [], "compile_s": {}} for n in ns}
    for n in ns:  # warm-up: compile every function once, then once more warm
        x, y = data[n]
        model.train_on_batch(x, y)
        model.train_on_batch(x, y)
        for (mode, route), probe in probes.items():
            label = f"{mode}/{route}"
            per_n[n]["compile_s"][label] = _timed(lambda probe=probe, x=x, y=y: probe(x, y))
            _timed(lambda probe=probe, x=x, y=y: probe(x, y))
            per_n[n].setdefault("probe_ms", {})[label] = []
            per_n[n].setdefault("ratio", {})[label] = []
        print(f"  n={n} warm: compile {per_n[n]['compile_s']}", flush=True)
    for r in range(args.rounds):
        for n in ns:
            x, y = data[n]
            d = per_n[n]
            t_train = _timed(lambda x=x, y=y: model.train_on_batch(x, y))
            d["train_ms"].append(t_train * 1e3)
            for (mode, route), probe in probes.items():
                label = f"{mode}/{route}"
                t = _timed(lambda probe=probe, x=x, y=y: probe(x, y))
                d["probe_ms"][label].append(t * 1e3)
                d["ratio"][label].append(t / t_train)
        print(
            f"  round {r + 1}/{args.rounds}: "
            + "; ".join(
                f"n={n} train {per_n[n]['train_ms'][-1]:.0f}ms "
                + " ".join(f"{k} {v[-1]:.0f}" for k, v in per_n[n]["probe_ms"].items())
                for n in ns
            ),
            flush=True,
        )
    for n in ns:
        d = per_n[n]
        d["train_ms_median"] = statistics.median(d["train_ms"])
        d["probe_ms_median"] = {k: statistics.median(v) for k, v in d["probe_ms"].items()}
        d["ratio_median"] = {k: statistics.median(v) for k, v in d["ratio"].items()}
    info["results"] = {str(n): per_n[n] for n in ns}
    return info


def versions():
    import importlib

    out = {"python": platform.python_version()}
    for mod in ("keras", "keras_hub", "jax", "tensorflow", "torch", "numpy"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:
            pass
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        write_table(args.md)
        return
    import keras

    backend = keras.config.backend()
    out = args.out or os.path.join(RESULTS, f"lambda_max_{backend}.json")
    record = {
        "backend": backend,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()}-core CPU, no GPU",
        "load_before": list(os.getloadavg()),
        "versions": versions(),
        "command": f"KERAS_BACKEND={backend} .venv/bin/python " + " ".join([sys.argv[0]] + sys.argv[1:]),
        "models": {},
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for name in [m for m in args.models.split(",") if m]:
        t0 = time.perf_counter()
        record["models"][name] = run_model(name, args, backend)
        record["models"][name]["wall_s"] = time.perf_counter() - t0
        record["load_after"] = list(os.getloadavg())
        with open(out, "w") as f:  # partial results after every model
            json.dump(record, f, indent=1)
        keras.backend.clear_session()
    print(f"wrote {out}")
    write_table(args.md)


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def write_table(md_path):
    records = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "lambda_max_*.json"))):
        with open(path) as f:
            rec = json.load(f)
        if "load_before" in rec:
            records.append(rec)
    order = {"jax": 0, "tensorflow": 1, "torch": 2}
    records.sort(key=lambda r: (order.get(r["backend"], 9), r["date"]))
    lines = [
        "# lambda_max probe vs. one training step: per-sample route vs. layer-factored route",
        "",
        "Generated by `benchmarks/lambda_max.py` from `benchmarks/results/lambda_max_<backend>.json`.",
        "Train step = `model.train_on_batch` at batch n (Adam, after warm-up). Probe =",
        "`keras_mat.ntk.get_probe(model, groups, ntk_output, route=...)(x, y)` at the same n, after",
        "warm-up (it re-reads the weights on every call). `generic`: every probed variable on the",
        "vectorized per-sample Jacobian route (what keras_mat did before the factored route);",
        "`auto`: the default (factored route for the graph's Dense/conv nodes). Ratio = probe / train",
        "step inside each round, median over interleaved rounds in one process; ms are medians.",
        "Targets at n=16: VGG `sum` <= 1.5x (JAX, TF) / 2x (torch); VGG `logits` <= 12x; BERT not slower.",
        "",
        "| backend | run (UTC) | model | ntk_output | n | train ms | generic ms | auto ms | generic ratio |"
        " auto ratio | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        for name, model in rec["models"].items():
            modes = sorted({k.split("/")[0] for k in model["routes"]})
            for mode in modes:
                for n, d in model["results"].items():
                    pm, rm = d["probe_ms_median"], d["ratio_median"]
                    g, a = pm.get(f"{mode}/generic"), pm.get(f"{mode}/auto")
                    cells = [
                        rec["backend"],
                        rec["date"][:16].replace("T", " "),
                        name,
                        mode,
                        n,
                        f"{d['train_ms_median']:.0f}",
                        "-" if g is None else f"{g:.0f}",
                        "-" if a is None else f"{a:.0f}",
                        "-" if g is None else f"{rm[f'{mode}/generic']:.2f}x",
                        "-" if a is None else f"{rm[f'{mode}/auto']:.2f}x",
                        "-" if g is None or a is None else f"{g / a:.1f}x",
                    ]
                    lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Runs", ""]
    for rec in records:
        load = f"load average {rec['load_before'][0]:.1f} before, {rec.get('load_after', [float('nan')])[0]:.1f} after"
        lines.append(f"* **{rec['backend']}**: {rec['date']}, {rec['machine']}, {load}.")
        lines.append(f"  `{rec['command']}`")
        for name, model in rec["models"].items():
            lines.append(
                f"  * {name}: {model['probed_params']:,} probed parameters in {model['num_modules']} modules /"
                f" {model['num_families']} families; routes taken: {model['routes']}"
            )
    if records:
        lines.append("")
        lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in records[0]["versions"].items()))
    notes = os.path.join(RESULTS, "lambda_max_notes.md")
    if os.path.exists(notes):
        with open(notes) as f:
            lines += ["", f.read().strip()]
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {md_path}")


if __name__ == "__main__":
    main()
