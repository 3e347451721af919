"""WikiText-2 masked-LM data shared by the text examples (BERT and Switch MoE).

- Text: offline (`data_dir`), `<data_dir>/wikitext-2-raw/wiki.test.raw` is the
  training text and `wiki.valid.raw` the validation text (the official train
  split is not in the offline copy); online (`data_dir=None`) the official
  `wikitext-2-raw-v1.zip` is downloaded with `keras.utils.get_file` and the
  standard train / valid splits are used. Paragraphs are the non-empty,
  non-heading lines.
- Vocabulary: a WordPiece vocabulary learned from the training paragraphs
  with `keras_hub.tokenizers.compute_word_piece_vocabulary` (always runs
  through TensorFlow and tensorflow-text), cached as a text file in
  `cache_dir` under a name keyed by the text's hash, the size and the casing.
- Sequences: the paragraphs are tokenized (`keras_hub.models.BertTokenizer`),
  concatenated into one token stream and cut into chunks of
  `sequence_length - 2` tokens, which the preprocessor's packer wraps in
  `[CLS] ... [SEP]` (the last chunk is padded).
- Masking: the preprocessor's `MaskedLMMaskGenerator` (`BertMaskedLMPreprocessor`
  settings: 15 % of the tokens selected; of those 80 % `[MASK]`, 10 % random,
  10 % kept) on its Python path, seeded with `random.seed(seed)`, so that the
  masked arrays are identical in every run and on every backend (the
  TensorFlow path of the masker draws from unseeded stateful ops). Every
  variant of a comparison sees the same masked arrays; `copies > 1` masks
  the training text several times (dynamic masking, precomputed).

The result is numpy arrays in the layout `keras_hub.models.BertMaskedLM`
takes: `x = {"token_ids", "segment_ids", "padding_mask", "mask_positions"}`,
`y = mask_ids`, `sample_weight = mask_weights` (0 on padded mask slots).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
import random

import numpy as np

OFFICIAL_URL = "https://wikitext.smerity.com/wikitext-2-raw-v1.zip"
OFFICIAL_SHA256 = "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11"
DEFAULT_CACHE_DIR = os.path.join("~", ".keras", "keras_mat")
#: Defaults shared by the text examples (each adds its model size and output folder).
DEFAULTS = dict(
    seq=128,
    vocab=8000,
    batch_size=32,
    mask_copies=1,
    val_samples=512,  # 16 batches: evaluation stays cheap next to an epoch of training
    alpha=0.3,
    beta=1e-3,
    probe_every=25,
    probe_samples=16,
    ntk_output="sum",  # one scalar per sample: the spec's default for MLM-sized outputs
)
#: The `--preset demo` data and schedule (`make demo`), shared by the text examples.
DEMO = dict(
    seq=64,
    vocab=2000,
    epochs=3,
    train_samples=640,
    val_samples=160,
    probe_every=5,
    probe_samples=8,
    max_text_bytes=400_000,
)


def read_paragraphs(path, max_bytes=None):
    """Non-empty, non-heading lines of a WikiText raw file (headings look like
    ` = Title = `). `max_bytes` stops after that many bytes of text."""
    out, size = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or (line.startswith("=") and line.endswith("=")):
                continue
            out.append(line)
            size += len(line.encode("utf-8"))
            if max_bytes is not None and size >= max_bytes:
                break
    return out


def _find(root, name):
    for folder, _, files in os.walk(root):
        if name in files:
            return os.path.join(folder, name)
    raise FileNotFoundError(f"{name} not found under {root}. Received: root={root!r}")


def load_text(data_dir=None, max_bytes=None):
    """`(train_paragraphs, valid_paragraphs, description)`.

    Args:
        data_dir: Folder holding `wikitext-2-raw/wiki.test.raw` and
            `wiki.valid.raw` (offline: trains on the test split), or `None`
            to download the official archive (standard train / valid splits).
        max_bytes: Optional cap on the text read from each split (tests).
    """
    if data_dir is not None:
        folder = os.path.join(data_dir, "wikitext-2-raw")
        paths = [os.path.join(folder, name) for name in ("wiki.test.raw", "wiki.valid.raw")]
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"--data-dir: no WikiText-2 raw file at {path}. Received: --data-dir={data_dir}"
                )
        description = (
            "WikiText-2 raw, offline copy: trained on the TEST split (wiki.test.raw; the train split is "
            "not in the offline copy), validated on the valid split (wiki.valid.raw)"
        )
    else:
        import keras

        archive = keras.utils.get_file(
            fname="wikitext-2-raw-v1.zip", origin=OFFICIAL_URL, file_hash=OFFICIAL_SHA256, extract=True
        )
        root = archive if os.path.isdir(archive) else os.path.dirname(archive)
        paths = [_find(root, "wiki.train.raw"), _find(root, "wiki.valid.raw")]
        description = "WikiText-2 raw (official archive): trained on the train split, validated on valid"
    train, valid = (read_paragraphs(p, max_bytes) for p in paths)
    return train, valid, description


def wordpiece_vocabulary(paragraphs, vocabulary_size, cache_dir=None, lowercase=True, verbose=1):
    """A WordPiece vocabulary learned from `paragraphs`, cached in `cache_dir`.

    The cache file name holds a hash of the text, the requested size and the
    casing, so a different text or size never reads a stale vocabulary.
    Returns the list of tokens (`[PAD]`, `[CLS]`, `[SEP]`, `[UNK]`, `[MASK]`
    first; fewer than `vocabulary_size` on a small text).
    """
    if not isinstance(vocabulary_size, int) or vocabulary_size < 16:
        raise ValueError(
            f"`vocabulary_size` must be an int >= 16. Received: vocabulary_size={vocabulary_size!r}"
        )
    cache_dir = os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)
    os.makedirs(cache_dir, exist_ok=True)
    digest = hashlib.sha256("\n".join(paragraphs).encode("utf-8")).hexdigest()[:16]
    path = os.path.join(
        cache_dir, f"wordpiece-{vocabulary_size}-{'lower' if lowercase else 'cased'}-{digest}.txt"
    )
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.rstrip("\n")]
    import keras_hub
    import tensorflow as tf

    if verbose:
        print(f"learning a {vocabulary_size}-token WordPiece vocabulary (cached in {path})", flush=True)
    vocabulary = keras_hub.tokenizers.compute_word_piece_vocabulary(
        tf.data.Dataset.from_tensor_slices(paragraphs).batch(256),
        vocabulary_size,
        lowercase=lowercase,
        strip_accents=lowercase,
    )
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(vocabulary) + "\n")
    os.replace(tmp, path)
    return list(vocabulary)


def mask_selection_length(sequence_length):
    """Mask slots per sequence: 20 at length 128, as in BERT (15 % plus slack)."""
    return max(2, round(0.15 * sequence_length) + 1)


def make_preprocessor(vocabulary, sequence_length, lowercase=True):
    """A `BertMaskedLMPreprocessor` with a `BertTokenizer` over `vocabulary`."""
    import keras_hub

    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=lowercase)
    preprocessor = keras_hub.models.BertMaskedLMPreprocessor(
        tokenizer,
        sequence_length=sequence_length,
        mask_selection_rate=0.15,
        mask_selection_length=mask_selection_length(sequence_length),
    )
    preprocessor.build(None)  # creates its packer and masker
    return preprocessor


def token_chunks(tokenizer, paragraphs, chunk_length, max_chunks=None):
    """Token ids of `paragraphs` as one stream cut into `(n, chunk_length)` rows
    (the final partial chunk is kept, padded with -1)."""
    import tensorflow as tf

    if not paragraphs:
        raise ValueError("No text: the WikiText split is empty. Received: paragraphs=[]")
    dataset = tf.data.Dataset.from_tensor_slices(paragraphs).batch(512).map(tokenizer)
    stream = np.concatenate([batch.flat_values.numpy() for batch in dataset]).astype("int32")
    n = math.ceil(len(stream) / chunk_length)
    if max_chunks is not None:
        n = min(n, int(max_chunks))
        stream = stream[: n * chunk_length]
    padded = np.full(n * chunk_length, -1, "int32")
    padded[: len(stream)] = stream
    return padded.reshape(n, chunk_length)


def masked_lm_arrays(preprocessor, paragraphs, max_sequences=None, seed=0, copies=1):
    """Masked-LM arrays `(x, y, sample_weight)` of `paragraphs` (see the module
    docstring); `copies` independent maskings of the same sequences are
    concatenated (copy `c` is masked with seed `seed + c`)."""
    import tensorflow as tf

    length = preprocessor.sequence_length
    chunks = token_chunks(preprocessor.tokenizer, paragraphs, length - 2, max_sequences)
    ragged = tf.RaggedTensor.from_tensor(chunks, padding=-1)
    token_ids, segment_ids = preprocessor.packer(ragged)
    token_ids = np.asarray(token_ids, "int32")
    segment_ids = np.asarray(segment_ids, "int32")
    padding_mask = token_ids != preprocessor.tokenizer.pad_token_id
    parts = []
    state = random.getstate()  # the masker's Python path draws from `random`: seed it, then restore
    for c in range(int(copies)):
        random.seed(seed + c)
        masked = preprocessor.masker(token_ids)
        parts.append(
            (
                {
                    "token_ids": np.asarray(masked["token_ids"], "int32"),
                    "segment_ids": segment_ids,
                    "padding_mask": padding_mask,
                    "mask_positions": np.asarray(masked["mask_positions"], "int32"),
                },
                np.asarray(masked["mask_ids"], "int32"),
                np.asarray(masked["mask_weights"], "float32"),
            )
        )
    random.setstate(state)
    if len(parts) == 1:
        return parts[0]
    x = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
    return x, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def as_dataset(arrays, batch_size, shuffle_seed=None, drop_keys=(), repeat=False):
    """A batched `tf.data.Dataset` of `(x, y, sample_weight)`; shuffled every
    epoch (reproducibly) when `shuffle_seed` is given; endless with `repeat`."""
    import tensorflow as tf

    x, y, w = arrays
    x = {k: v for k, v in x.items() if k not in drop_keys}
    ds = tf.data.Dataset.from_tensor_slices((x, y, w))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(y), seed=shuffle_seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    return ds.batch(batch_size).prefetch(2)


def load(args, verbose=1):
    """Text, vocabulary and masked arrays for an example's parsed `args`.

    Returns a dict: `train`, `val` (arrays), `vocabulary_size`, `description`.
    """
    train_text, valid_text, description = load_text(args.data_dir, getattr(args, "max_text_bytes", None))
    vocabulary = wordpiece_vocabulary(train_text, args.vocab, args.cache_dir, verbose=verbose)
    preprocessor = make_preprocessor(vocabulary, args.seq)
    train = masked_lm_arrays(preprocessor, train_text, args.train_samples, args.seed, args.mask_copies)
    # Validation masking is fixed (seed 10_000 + seed), independent of the copies.
    val = masked_lm_arrays(preprocessor, valid_text, args.val_samples, 10_000 + args.seed)
    test = None
    if getattr(args, "test_samples", None):
        # Held out: the second half of the validation text's sequences (masked with its own seed).
        x, y, w = masked_lm_arrays(preprocessor, valid_text, None, 20_000 + args.seed)
        half = len(y) // 2
        if len(val[1]) > half:
            raise ValueError(
                f"--test-samples takes the second half of the validation text ({half} sequences), so "
                f"--val-samples must be <= {half}. Received: --val-samples={args.val_samples}"
            )
        part = slice(half, half + args.test_samples)
        test = ({k: v[part] for k, v in x.items()}, y[part], w[part])
    return {
        "train": train,
        "val": val,
        "test": test,
        "vocabulary_size": len(vocabulary),
        "description": description,
        "masked_tokens": (float(train[2].sum()), float(val[2].sum())),
    }


def add_arguments(parser, presets):
    """Flags shared by the text examples (defaults filled in by `resolve`)."""
    p = parser
    p.add_argument("--preset", choices=sorted(presets), help="a named set of defaults (flags given win)")
    p.add_argument("--data-dir", default=None, help="folder holding wikitext-2-raw/ (offline); else download")
    p.add_argument("--cache-dir", default=None, help=f"vocabulary cache (default {DEFAULT_CACHE_DIR})")
    p.add_argument("--vocab", type=int, default=None, help="WordPiece vocabulary size to learn")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--steps-per-epoch", type=int, default=None, help="steps between evaluations")
    p.add_argument(
        "--train-samples", "--max-seqs", dest="train_samples", type=int, default=None,
        help="training sequences (default: all of the training text)",
    )  # fmt: skip
    p.add_argument("--val-samples", type=int, default=None, help="validation sequences (default: all)")
    p.add_argument(
        "--test-samples", type=int, default=None,
        help="held-out test sequences (the validation text's second half), evaluated after training",
    )  # fmt: skip
    p.add_argument(
        "--mask-copies", type=int, default=None, help="maskings of the training text (dynamic masking)"
    )
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None, help="feed-forward width (default 4 x hidden)")
    p.add_argument("--seq", type=int, default=None, help="sequence length")
    p.add_argument("--variants", default="plain,mat,rand,multirate", help="comma-separated subset")
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--probe-every", type=int, default=None)
    p.add_argument("--probe-samples", type=int, default=None)
    p.add_argument("--ntk-output", choices=("auto", "logits", "sum", "loss"), default=None)
    p.add_argument("--threshold-scope", choices=("auto", "global", "per_layer"), default="auto")
    p.add_argument(
        "--embeddings-norms", action="store_true",
        help="annotate(embeddings=True, norms=True): embeddings and norms become MAT modules too",
    )  # fmt: skip
    p.add_argument("--multirate-k", type=int, default=4)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=1)
    # Caps the text read from each split (tests and the demo preset; also shrinks the vocabulary's text).
    p.add_argument("--max-text-bytes", type=int, default=None, help=argparse.SUPPRESS)
    return p


def resolve(parser, args, defaults, presets):
    """Fills the flags left unset from `presets[args.preset]`, then `defaults`."""
    merged = dict(defaults)
    merged.update(presets.get(args.preset, {}))
    for key, value in merged.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.intermediate is None:
        args.intermediate = 4 * args.hidden
    for name in ("layers", "heads", "hidden", "seq", "epochs", "batch_size", "probe_every", "probe_samples"):
        value = getattr(args, name)
        if not isinstance(value, int) or value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive int. Received: {value!r}")
    if args.hidden % args.heads:
        parser.error(
            f"--hidden must be a multiple of --heads. Received: --hidden={args.hidden}, --heads={args.heads}"
        )
    if args.seq < 8:
        parser.error(f"--seq must be >= 8. Received: --seq={args.seq}")
    args.variants = [v for v in args.variants.split(",") if v]
    return args


def compile_kwargs():
    """Masked-LM compile arguments (fresh metric objects per call): the loss,
    and weighted metrics over the real mask slots only: masked-token accuracy
    and the mean cross-entropy `mlm_loss` (its exp is the perplexity)."""
    import keras

    return dict(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[],
        weighted_metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="mlm_loss"),
        ],
    )


def perplexity_lines(results):
    """Markdown lines: per variant, final and best validation perplexity
    (exp of `val_mlm_loss`) and masked-token accuracy; the final test loss
    and perplexity when the records hold a `test` evaluation."""
    test = any(isinstance(r, dict) and "test" in r for r in results.values())
    lines = [
        "| variant | final val perplexity | best val perplexity | final val masked-token accuracy |"
        + (" final test loss | final test perplexity |" if test else ""),
        "| --- | ---: | ---: | ---: |" + (" ---: | ---: |" if test else ""),
    ]
    for name, r in results.items():
        if not isinstance(r, dict) or "epochs" not in r:
            continue
        losses = [e["logs"].get("val_mlm_loss") for e in r["epochs"]]
        losses = [v for v in losses if v is not None and math.isfinite(v)]
        acc = r["epochs"][-1]["logs"].get("val_accuracy", float("nan"))
        if losses:
            line = f"| {name} | {math.exp(losses[-1]):.2f} | {math.exp(min(losses)):.2f} | {acc:.4f} |"
            if test:
                loss = r.get("test", {}).get("mlm_loss", float("nan"))
                line += f" {loss:.4f} | {math.exp(loss):.2f} |"
            lines.append(line)
    return lines


def prepare(args, build_model, title, drop_keys=()):
    """Loads the data for `args` and returns a runner of `common.compare`.

    Args:
        args: Parsed flags (see `add_arguments` and `resolve`).
        build_model: `(vocabulary_size) -> keras.Model`, fresh and uncompiled.
        title: Title of the results tables (the backend is appended).
        drop_keys: Input keys the model does not take (e.g. `"segment_ids"`).

    Returns:
        `(run, data)`: `run(variants, out_dir, **mat_overrides)` trains the
        variants with the same seed and data and returns the harness's dict
        (variant -> record), adding a perplexity table to
        `out_dir/results.md`; `data` is the dict of `load`, plus `title`.
    """
    import importlib

    import keras

    # The harness's sibling module, whether the harness folder is on sys.path
    # (scripts) or imported as the package `benchmarks.harness`.
    compare = importlib.import_module(f"{__package__}.common" if __package__ else "common").compare

    data = load(args, verbose=args.verbose)
    train, val, test = data["train"], data["val"], data["test"]
    slots = train[0]["mask_positions"].shape[1]
    if args.verbose:
        print(
            f"{data['description']}\n{len(train[1])} training / {len(val[1])} validation sequences of "
            f"{args.seq} tokens ({data['masked_tokens'][0]:.0f} / {data['masked_tokens'][1]:.0f} masked "
            f"tokens), vocabulary {data['vocabulary_size']}, backend {keras.config.backend()}",
            flush=True,
        )
    shapes = {"token_ids": (args.seq,), "segment_ids": (args.seq,), "padding_mask": (args.seq,)}
    shapes = {k: v for k, v in shapes.items() if k not in drop_keys}
    shapes["mask_positions"] = (slots,)
    # With --steps-per-epoch the epochs are evaluation points, not passes: repeat the data.
    repeat = args.steps_per_epoch is not None
    mat_options = {k: getattr(args, k) for k in ("alpha", "beta", "probe_every", "probe_samples")}
    mat_options.update(ntk_output=args.ntk_output, threshold_scope=args.threshold_scope)
    data["title"] = f"{title} ({keras.config.backend()})"
    annotate_kwargs = dict(embeddings=True, norms=True) if args.embeddings_norms else {}
    if getattr(args, "module_kinds", None):  # an example's --modules: only these kinds are modules
        kinds = tuple(args.module_kinds) + (("layer",) if args.embeddings_norms else ())
        annotate_kwargs["include"] = kinds

    test_data = (
        None if test is None else functools.partial(as_dataset, test, args.batch_size, drop_keys=drop_keys)
    )

    def run(variants, out_dir, run_title=None, **mat_overrides):
        results = compare(
            lambda: build_model(data["vocabulary_size"]),
            lambda: as_dataset(train, args.batch_size, args.seed, drop_keys, repeat),
            lambda: as_dataset(val, args.batch_size, drop_keys=drop_keys),
            variants=variants,
            optimizer_fn=lambda: keras.optimizers.AdamW(args.lr, weight_decay=0.01),
            mat_options={**mat_options, **mat_overrides},
            epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch,
            metric="val_mlm_loss",
            mode="min",
            out_dir=out_dir,
            seed=args.seed,
            flops_input_shapes=shapes,
            verbose=args.verbose,
            title=run_title or data["title"],
            compile_kwargs=compile_kwargs,
            annotate_kwargs=annotate_kwargs,
            multirate_options=dict(k=args.multirate_k),
            test_data=test_data,
        )
        extra = "\n".join(["", "Validation perplexity = exp(val_mlm_loss):", ""] + perplexity_lines(results))
        with open(os.path.join(out_dir, "results.md"), "a") as f:
            f.write(extra + "\n")
        if args.verbose:
            print(extra, flush=True)
        return results

    return run, data


# --------------------------------------------------------------------------------------
# ntk_output ablation
# --------------------------------------------------------------------------------------


def _read_log(path):
    """`{measurement: {(family, module): (lambda_max, active)}}` from a MATCallback CSV (`csv_path`)."""
    import csv

    table = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            cell = table.setdefault(int(row["measurement"]), {})
            cell[(row["family"], int(row["module"]))] = (float(row["lambda_max"]), int(row["active"]))
    return table


def _jaccard(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if np.std(ra) == 0 or np.std(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def ablation_report(runs, logs, title):
    """Markdown comparison of MAT runs that differ only in `ntk_output`.

    Args:
        runs: `{ntk_output: the MAT record of common.compare}`.
        logs: `{ntk_output: _read_log(its mat_log.csv)}`.
        title: Heading.
    """
    modes = list(runs)
    families = list(runs[modes[0]]["final_active"])
    final = {
        m: np.concatenate([np.asarray(runs[m]["final_active"][f], bool) for f in families]) for m in modes
    }
    lines = [
        f"## {title}: ntk_output ablation",
        "",
        "| ntk_output | final val_mlm_loss | best val_mlm_loss | best perplexity | final val accuracy | "
        "train FLOPs (T) | FLOPs with probes (T) | mean active fraction | final active | final stopped |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in modes:
        r, log = runs[m], logs[m]
        mean_active = np.mean([a for cell in log.values() for _, a in cell.values()]) if log else float("nan")
        last = r["epochs"][-1]["logs"]
        stopped = last.get("mat_frozen", float("nan"))
        lines.append(
            f"| {m} | {r['final']:.4f} | {r['best']:.4f} | {math.exp(r['best']):.2f} | "
            f"{last.get('val_accuracy', float('nan')):.4f} | {r['train_flops'] / 1e12:.3f} | "
            f"{r['total_flops'] / 1e12:.3f} | {mean_active:.3f} | {final[m].mean():.3f} | {stopped:.3f} |"
        )
    lines += ["", "Final fraction of updated modules per module family:", ""]
    lines += ["| family | " + " | ".join(modes) + " |", "| --- |" + " ---: |" * len(modes)]
    for f in families:
        lines.append(
            f"| {f} | " + " | ".join(f"{np.mean(runs[m]['final_active'][f]):.2f}" for m in modes) + " |"
        )
    lines += [
        "",
        "Agreement between settings (each pair of runs; measurement r of both runs is at the same step; "
        "r = 0 is on identical initial weights): Jaccard overlap of the updated sets, Spearman "
        "correlation of lambda_max over all modules.",
        "",
        "| pair | Jaccard, final masks | mean Jaccard over measurements | Spearman at r=0 | Spearman at last r |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for i, a in enumerate(modes):
        for b in modes[i + 1 :]:
            common_r = sorted(set(logs[a]) & set(logs[b]))
            jac, rho0, rho1 = [], float("nan"), float("nan")
            for r in common_r:
                keys = sorted(set(logs[a][r]) & set(logs[b][r]))
                act_a = np.array([logs[a][r][k][1] for k in keys], bool)
                act_b = np.array([logs[b][r][k][1] for k in keys], bool)
                jac.append(_jaccard(act_a, act_b))
                rho = _spearman([logs[a][r][k][0] for k in keys], [logs[b][r][k][0] for k in keys])
                rho0 = rho if r == common_r[0] else rho0
                rho1 = rho
            mean_jac = float(np.mean(jac)) if jac else float("nan")
            lines.append(
                f"| {a} vs {b} | {_jaccard(final[a], final[b]):.2f} | {mean_jac:.2f} | {rho0:.2f} | {rho1:.2f} |"
            )
    return "\n".join(lines)


def ntk_output_ablation(run, out_dir, title, outputs, verbose=1, done=None):
    """MAT once per `ntk_output` in `outputs` (same seed, data and options);
    writes `out_dir/ablation.md` and `ablation.json`; returns
    `{ntk_output: MAT record}`. `done` maps an ntk_output to a finished
    run's `(MAT record, its mat_log.csv)`, e.g. the comparison's own MAT run,
    which is then not trained again."""
    import json

    runs, logs = {}, {}
    for mode in outputs:
        if done and mode in done:
            runs[mode], log = done[mode]
        else:
            folder = os.path.join(out_dir, f"ablation_{mode}")
            runs[mode] = run(("mat",), folder, f"{title}, ntk_output={mode}", ntk_output=mode)["mat"]
            log = os.path.join(folder, "mat_log.csv")
        logs[mode] = _read_log(log)
    report = ablation_report(runs, logs, title)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "ablation.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(out_dir, "ablation.json"), "w") as f:
        json.dump(runs, f, indent=1)
    if verbose:
        print("\n" + report, flush=True)
    return runs
