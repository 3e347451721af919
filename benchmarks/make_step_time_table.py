"""Writes benchmarks/results/step_time.md from the step_time_<backend>.json files."""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
rows, metas = [], []
for b in ["jax", "tensorflow", "torch"]:
    p = os.path.join(HERE, "results", f"step_time_{b}.json")
    if not os.path.exists(p):
        continue
    d = json.load(open(p))
    metas.append(d["meta"])
    for r in d["rows"]:
        rows.append((b, r))
out = [
    "# Step time with the bottom of the network frozen",
    "",
    "Generated from `benchmarks/results/step_time_<backend>.json` by `benchmarks/step_time.py`.",
    "Freezing is done with keras_mat masks (`wrap(Adam, policy=None)` + `set_masks`), with",
    "`annotate(model, embeddings=True, norms=True)` so that a frozen bottom can cut back-propagation.",
    "Step time: median over 3 interleaved rounds (6 timed steps per round after 2 warm-up steps), batch 32.",
    "Time ratio: step time / the all-trained step. FLOPs ratio: `keras_mat.flops.step_flops` with the",
    "same masks (`granularity='family'`, `frozen_prefix='auto'`) / the all-trained count.",
    "BERT: keras-hub BertMaskedLM, 4 layers, hidden 256, 4 heads, sequence 128, vocabulary 8000, 20 masked",
    "positions; frozen = encoder layers from the bottom (all their heads, dense layers, norms), 'bottom' =",
    "token/position/segment embeddings and their norm. VGG: 6 conv layers (W=32, 64, 128) + 2 Dense on",
    "32x32x3; frozen = conv layers above the first from the bottom, 'bottom' = the first conv (stem).",
    "",
    "| backend | model | frozen from bottom | embeddings / stem frozen | step ms | time ratio | FLOPs ratio | |time - FLOPs| |",
    "|---|---|---|---|---|---|---|---|",
]
for b, r in rows:
    out.append(
        f"| {b} | {r['model']} | {int(100 * r['frozen_fraction'])}% | {'yes' if r['bottom_frozen'] else 'no'} | {r['step_ms']:.0f} | {r['time_ratio']:.2f} | {r['flops_ratio']:.2f} | {abs(r['time_ratio'] - r['flops_ratio']):.2f} |"
    )
out += ["", "## Runs", ""]
for m in metas:
    out.append(
        f"* {m['backend']}: {m['date']}, {m['machine']}, keras {m['keras']}: "
        f"`KERAS_BACKEND={m['backend']} python benchmarks/step_time.py --models bert,vgg --rounds {m['args']['rounds']} --steps {m['args']['steps']}`"
    )
open(os.path.join(HERE, "results", "step_time.md"), "w").write("\n".join(out) + "\n")
print("\n".join(out[13:]))
