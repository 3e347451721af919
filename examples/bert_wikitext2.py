"""BERT masked-LM on WikiText-2: plain training vs MAT vs "Rand" vs Multirate (modules = attention heads).

    KERAS_BACKEND=jax python examples/bert_wikitext2.py --preset demo
    # CPU scale (4 layers x 4 heads, hidden 256, seq 128), the run in benchmarks/RESULTS.md:
    python examples/bert_wikitext2.py --batch-size 8 --epochs 4 --steps-per-epoch 20 \
        --val-samples 128 --probe-every 10 --probe-samples 8
    # ntk_output "sum" vs "loss" (MAT only; add the variants to reuse the comparison's MAT run):
    python examples/bert_wikitext2.py --preset demo --epochs 6 --variants "" --ablation

A BERT built from a keras-hub config (`keras_hub.models.BertBackbone`, no
pretrained weights) in a `keras_hub.models.BertMaskedLM`, trained from scratch
on masked-token prediction. Data (`benchmarks/harness/wikitext.py`): a
WordPiece vocabulary learned from the training text and cached in
`--cache-dir`; the `BertMaskedLMPreprocessor`'s packer and masker with seeded
masking, so every run and every backend sees the same masked tokens. By
default it downloads the official WikiText-2 raw archive (`keras.utils.get_file`
with its sha256) and uses the standard train / valid splits. `--data-dir`
names an offline folder holding `wikitext-2-raw/wiki.test.raw` and
`wiki.valid.raw`; it then trains on the *test* split and validates on the
valid split.

Needs keras-hub, TensorFlow and tensorflow-text on every backend
(`pip install "keras-mat[hub]"`): the WordPiece vocabulary is learned with
tensorflow-text and the data is tokenized with tf.data.

`keras_mat.annotate(model)` makes every attention head a module;
`--embeddings-norms` also puts the embeddings and layer norms under MAT. The comparison metric is the
validation masked-LM cross-entropy `val_mlm_loss` (lower is better; its exp
is the perplexity), averaged over the real masked tokens; the masked-token
accuracy is logged as `val_accuracy`. `--ablation` runs MAT with
`ntk_output` "sum" and "loss" and compares the modules each one chooses.

Runs unchanged under KERAS_BACKEND=jax, tensorflow or torch.
"""

from __future__ import annotations

import argparse
import os
import sys

# The comparison harness and the WikiText-2 pipeline live in benchmarks/harness.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "harness"))

import wikitext  # noqa: E402  (benchmarks/harness/wikitext.py)

# CPU scale: 4 layers x 4 heads, hidden 256, sequence 128, ~8000 WordPieces.
DEFAULTS = {**wikitext.DEFAULTS, **dict(layers=4, heads=4, hidden=256, epochs=3, lr=5e-4)}
DEFAULTS["out_dir"] = "results/bert_wikitext2"
# `make demo`: about 2 minutes on 2 CPU cores on JAX (all four variants).
PRESETS = {
    "demo": {**wikitext.DEMO, **dict(layers=2, heads=4, hidden=64, lr=1e-3, out_dir="results/demo_bert")}
}
ABLATION_OUTPUTS = ("sum", "loss")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    wikitext.add_arguments(p, PRESETS)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--ablation", action="store_true", help="also run MAT with ntk_output sum and loss")
    args = p.parse_args(argv)
    return wikitext.resolve(p, args, DEFAULTS, PRESETS)


def build_bert(vocabulary_size, layers, heads, hidden, intermediate, seq, dropout=0.1):
    """A fresh keras-hub `BertMaskedLM` (no preprocessor: data comes preprocessed)."""
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=vocabulary_size,
        num_layers=layers,
        num_heads=heads,
        hidden_dim=hidden,
        intermediate_dim=intermediate,
        dropout=dropout,
        max_sequence_length=seq,
    )
    return keras_hub.models.BertMaskedLM(backbone=backbone, preprocessor=None)


def main(argv=None):
    """Runs the comparison (and the ntk_output ablation with `--ablation`).

    Returns:
        The `compare` results dict (variant -> record); with `--ablation` it
        also holds `"ablation"`: ntk_output -> the MAT run's record.
    """
    args = parse_args(argv)

    def build_model(vocabulary_size):
        return build_bert(
            vocabulary_size, args.layers, args.heads, args.hidden, args.intermediate, args.seq, args.dropout
        )

    title = f"BERT {args.layers}x{args.heads} heads, hidden {args.hidden}, seq {args.seq}, WikiText-2 MLM"
    run, data = wikitext.prepare(args, build_model, title)
    results = run(args.variants, args.out_dir) if args.variants else {}
    if args.ablation:
        done = {}
        if "mat" in results:  # the comparison's MAT run is the ablation's run for its ntk_output
            done[args.ntk_output] = (results["mat"], os.path.join(args.out_dir, "mat_log.csv"))
        results["ablation"] = wikitext.ntk_output_ablation(
            run, args.out_dir, data["title"], ABLATION_OUTPUTS, args.verbose, done
        )
    return results


if __name__ == "__main__":
    main()
