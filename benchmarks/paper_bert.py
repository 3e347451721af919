"""Experiment A: a small BERT in the overfitting regime of the MAT paper's Figure 4.

    KERAS_BACKEND=jax python benchmarks/paper_bert.py --data-dir DATA --variant plain --seed 0 \\
        --epochs 8 --log-lambda 25 --out benchmarks/results/paper_bert/plain_s0.json

A keras-hub `BertBackbone` (4 layers, 4 heads, hidden 128, intermediate 512,
dropout 0.1) in a `BertMaskedLM`, trained from scratch on a 64-token
masked-LM task with static masking (one seeded masking of the training text,
reused every epoch), so that it overfits within a few epochs.

Data (offline copy of WikiText-2, which has no train split): the model trains
on the test split; the valid split's sequences are cut in two halves, the
first for validation (early stopping, best checkpoint) and the second as the
held-out test set. Online (no `--data-dir`): the official train split, and
the valid split cut the same way.

Variants (`--variant`):

- `plain`: the inner optimizer (AdamW) alone;
- `mat`: `keras_mat.wrap` with attention heads as the only modules and a
  `keras_mat.MATCallback` probing `--probe-samples` fixed training sequences
  every `--probe-every` steps;
- `rand`: `keras_mat.RandomModules` over the heads at a fixed fraction
  (`--rand-fraction`), redrawn every `--probe-every` steps;
- `paper_rand`: `keras_mat.PaperRand` over the heads, the paper's Rand: a
  fixed share (`--rand-fraction`, or MAT's mean active fraction with
  `--rand-from`) redrawn every step;
- `multirate`: `keras_mat.Multirate` over the heads: a random split (drawn
  from `--seed`) makes `--multirate-fast` of each layer's heads fast (updated
  every step), the others slow (updated every `--multirate-k`-th step).

With `--log-lambda K` every variant also records every head's lambda_max on
the fixed probe set every K steps (`keras_mat.module_lambda_max`, heads only,
`ntk_output="sum"`), which is what the temporal-policy replay
(`benchmarks/temporal_replay.py`) reads.

The output JSON holds the arguments, per-evaluation records (step, epoch,
cumulative training FLOPs, wall-clock, validation and test masked-LM loss,
fraction of heads trained) and the lambda log.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "harness"))
sys.path.insert(0, os.path.dirname(HERE))

import output  # noqa: E402  (benchmarks/harness/output.py)
import temporal  # noqa: E402  (benchmarks/harness/temporal.py)
import wikitext  # noqa: E402  (benchmarks/harness/wikitext.py)

VARIANTS = ("plain", "mat", "rand", "paper_rand", "multirate")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--variant", choices=VARIANTS, default="plain")
    p.add_argument(
        "--seed", type=int, default=0, help="weights, batch order and (with 1000+seed) nothing else"
    )
    p.add_argument("--data-seed", type=int, default=0, help="masking seed (the same for every run)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument(
        "--patience", type=int, default=0, help="stop after this many evaluations without a new best"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--train-samples", type=int, default=None)
    p.add_argument(
        "--val-samples", type=int, default=1024, help="validation sequences (first of the first half)"
    )
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--beta", type=float, default=1e-3)
    p.add_argument(
        "--temporal", default=None, help="temporal reading passed to keras_mat.wrap (if supported)"
    )
    p.add_argument("--probe-every", type=int, default=25)
    p.add_argument("--probe-samples", type=int, default=16)
    p.add_argument(
        "--rand-fraction", type=float, default=0.5, help="paper_rand's share (or rand's, without --rand-from)"
    )
    p.add_argument(
        "--rand-from", default=None,
        help="a MAT run's JSON: rand draws MAT's active fraction after each of its measurements (compute-matched)",
    )  # fmt: skip
    p.add_argument(
        "--multirate-k", type=int, default=4, help="multirate: slow heads are updated every k-th step"
    )
    p.add_argument(
        "--multirate-fast",
        type=float,
        default=0.5,
        help="multirate: share of each layer's heads that are fast",
    )
    p.add_argument("--log-lambda", type=int, default=0, help="log heads' lambda_max every K steps (0: off)")
    p.add_argument(
        "--spectrum-epochs",
        default="",
        help="comma list of epochs (0: start) to record every head's mNTK spectrum",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--verbose", type=int, default=1)
    return p.parse_args(argv)


def load_data(args):
    """`(train, val, test, vocabulary_size, description)`; arrays as `wikitext.masked_lm_arrays`."""
    train_text, valid_text, description = wikitext.load_text(args.data_dir)
    vocabulary = wikitext.wordpiece_vocabulary(train_text, args.vocab, args.cache_dir, verbose=0)
    pre = wikitext.make_preprocessor(vocabulary, args.seq)
    train = wikitext.masked_lm_arrays(pre, train_text, args.train_samples, seed=args.data_seed)
    held = wikitext.masked_lm_arrays(pre, valid_text, None, seed=10_000 + args.data_seed)
    half = len(held[1]) // 2

    def part(arrays, sl):
        x, y, w = arrays
        return {k: v[sl] for k, v in x.items()}, y[sl], w[sl]

    val, test = part(held, slice(0, min(half, args.val_samples or half))), part(held, slice(half, None))
    description += "; the valid split's sequences cut in halves: validation (first), held-out test (second)"
    return train, val, test, len(vocabulary), description


def build_model(args, vocabulary_size):
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=vocabulary_size,
        num_layers=args.layers,
        num_heads=args.heads,
        hidden_dim=args.hidden,
        intermediate_dim=4 * args.hidden,
        dropout=args.dropout,
        max_sequence_length=args.seq,
    )
    return keras_hub.models.BertMaskedLM(backbone=backbone, preprocessor=None)


def head_groups(model):
    """The attention-head families of `model` (the paper's BERT modules)."""
    import keras_mat

    return [g for g in keras_mat.discover_groups(model, include=("head",)) if g.kind == "head"]


def head_spectra(model, x, groups):
    """Every head's full mNTK spectrum on the probe set (`ntk_output="sum"`), descending:
    dict family -> (heads, n) list. `keras_mat.module_spectrum` when the library has it,
    else the eigenvalues of the dense reference's Gram matrices."""
    import keras_mat

    if hasattr(keras_mat, "module_spectrum"):
        out = keras_mat.module_spectrum(model, x, ntk_output="sum", groups=groups)
        return {k: np.asarray(v["eigenvalues"]).tolist() for k, v in out.items()}
    from keras_mat import reference

    _, grams = reference.reference_lambda_max(model, x, groups=groups, ntk_output="sum", return_grams=True)
    return {
        k: np.sort(np.linalg.eigvalsh(np.asarray(g)), axis=-1)[:, ::-1].tolist() for k, g in grams.items()
    }


def plain_step_flops(model, x0, groups):
    """Analytic FLOPs of one plain training step on the batch `x0` (every head trained),
    counted with the data's per-sample shapes (`mask_positions`: the masked-LM slots)."""
    from keras_mat import flops as flops_lib

    shapes = {k: tuple(v.shape[1:]) for k, v in x0.items()}
    batch = len(next(iter(x0.values())))
    return flops_lib.step_flops(flops_lib.count_flops(model, batch, input_shapes=shapes, groups=groups))


def masked_loss(model, arrays, batch_size):
    """Mean masked-LM cross-entropy over the real mask slots (inference mode)."""
    x, y, w = arrays
    total, count = 0.0, 0.0
    for i in range(0, len(y), batch_size):
        xb = {k: v[i : i + batch_size] for k, v in x.items()}
        logits = np.asarray(model.predict_on_batch(xb), "float64")
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        yb, wb = y[i : i + batch_size], w[i : i + batch_size]
        nll = -np.take_along_axis(logp, yb[..., None], axis=-1)[..., 0]
        total += float((nll * wb).sum())
        count += float(wb.sum())
    return total / max(count, 1.0)


def mat_fractions(path):
    """A MAT run's fraction of heads updated after each of its measurements."""
    with open(path) as f:
        rows = json.load(f)["mat_rows_masks"]
    by_step = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(float(r["active"]) * (1.0 - float(r["frozen"])))
    return [float(np.mean(v)) for _, v in sorted(by_step.items())]


def main(argv=None):
    args = parse_args(argv)
    import keras

    import keras_mat

    keras.utils.set_random_seed(args.seed)
    train, val, test, vocab_size, description = load_data(args)
    n_train = len(train[1])
    steps_per_epoch = n_train // args.batch_size
    model = build_model(args, vocab_size)
    x0 = {k: v[: args.batch_size] for k, v in train[0].items()}
    model(x0)
    groups = head_groups(model)
    keras_mat.annotate(model, groups=groups)  # heads only; a plain optimizer ignores it
    probe_x = {k: v[: args.probe_samples] for k, v in train[0].items()}
    probe_y = train[1][: args.probe_samples]

    inner = keras.optimizers.AdamW(args.lr, weight_decay=args.weight_decay)
    optimizer, mat_cb = inner, None
    if args.variant == "mat":
        options = dict(alpha=args.alpha, beta=args.beta, probe_every=args.probe_every, ntk_output="sum")
        options["probe_samples"] = args.probe_samples
        if args.temporal is not None:
            temporal.apply(options, args.temporal, args.probe_every, steps_per_epoch, args.epochs)
        optimizer = keras_mat.wrap(inner, **options)
    elif args.variant in ("rand", "paper_rand", "multirate"):
        if args.variant == "rand":
            fractions = mat_fractions(args.rand_from) if args.rand_from else args.rand_fraction
            schedule = keras_mat.RandomModules(fractions, every=args.probe_every, seed=args.seed)
        elif args.variant == "paper_rand":
            fraction = float(np.mean(mat_fractions(args.rand_from))) if args.rand_from else args.rand_fraction
            schedule = keras_mat.baselines.PaperRand(fraction, every=1, seed=args.seed)
        else:
            schedule = keras_mat.Multirate(args.multirate_fast, k=args.multirate_k, seed=args.seed)
        optimizer = keras_mat.wrap(inner, policy=schedule)
    if args.variant != "plain" or args.log_lambda:
        every = args.log_lambda or args.probe_every
        mat_cb = keras_mat.MATCallback(
            probe_x, probe_y, probe_samples=args.probe_samples, probe_every=every, batch_size=args.batch_size
        )
    model.compile(optimizer=optimizer, **wikitext.compile_kwargs())
    plain_step = plain_step_flops(model, x0, groups)

    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.perf_counter()

        def on_test_begin(self, logs=None):
            if getattr(self, "_t", None) is not None:
                times.append(time.perf_counter() - self._t)
                self._t = None

    best = {"val": float("inf")}

    class Best(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs["val_mlm_loss"] < best["val"]:
                best.update(val=float(logs["val_mlm_loss"]), epoch=epoch + 1)
                best["weights"] = [np.array(w) for w in self.model.get_weights()]

    spectra = {}
    spectrum_epochs = {int(e) for e in args.spectrum_epochs.split(",") if e.strip()}

    class Spectrum(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if 0 in spectrum_epochs:
                spectra[0] = head_spectra(self.model, probe_x, groups)

        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 in spectrum_epochs:
                spectra[epoch + 1] = head_spectra(self.model, probe_x, groups)

    callbacks = [Timer(), Best(), Spectrum()] + ([mat_cb] if mat_cb is not None else [])
    if args.patience:
        callbacks.append(keras.callbacks.EarlyStopping("val_mlm_loss", patience=args.patience))
    t_start = time.perf_counter()
    hist = model.fit(
        wikitext.as_dataset(train, args.batch_size, shuffle_seed=args.seed),
        epochs=args.epochs,
        validation_data=wikitext.as_dataset(val, 64),
        callbacks=callbacks,
        verbose=2 if args.verbose else 0,
    )
    wall = time.perf_counter() - t_start
    h = hist.history
    records, seconds = [], 0.0
    for e in range(len(h["val_mlm_loss"])):
        seconds += times[e]
        flops = (
            h["mat_gflop_trained"][e] * 1e9
            if "mat_gflop_trained" in h and args.variant != "plain"
            else plain_step * steps_per_epoch * (e + 1)
        )
        rec = dict(epoch=e + 1, step=steps_per_epoch * (e + 1), flops=flops, seconds=seconds)
        rec["val"] = float(h["val_mlm_loss"][e])
        rec["train"] = float(h["mlm_loss"][e])
        rec["active"] = float(h["mat_active"][e]) if "mat_active" in h else 1.0
        rec["frozen"] = float(h["mat_frozen"][e]) if "mat_frozen" in h else 0.0
        if "mat_gflop_probes" in h:
            rec["probe_flops"] = h["mat_gflop_probes"][e] * 1e9
        records.append(rec)
    best_record = dict(records[best["epoch"] - 1])
    model.set_weights(best.pop("weights"))
    best_record["test"] = masked_loss(model, test, 64)
    lambda_log = []
    if mat_cb is not None:
        by_step = {}
        for row in mat_cb.rows:
            entry = by_step.setdefault(row["step"], {})
            entry.setdefault(row["family"], {})[int(row["module"])] = float(row["lambda_max"])
        for step, fams in sorted(by_step.items()):
            lam = {k: [v[i] for i in sorted(v)] for k, v in fams.items()}
            lambda_log.append({"step": int(step), "lambda": lam})
    out = dict(
        args=vars(args),
        best=best_record,
        description=description,
        train_sequences=n_train,
        val_sequences=len(val[1]),
        test_sequences=len(test[1]),
        steps_per_epoch=steps_per_epoch,
        plain_step_flops=plain_step,
        records=[dict(epoch=0, step=0, flops=0.0, seconds=0.0, val=None)] + records,
        lambda_log=lambda_log,
        spectra=spectra,
        wall_seconds=wall,
        backend=keras.backend.backend(),
    )
    if mat_cb is not None and args.variant == "mat":
        out["mat_rows_masks"] = [
            {"step": int(r["step"]), "family": r["family"], "module": int(r["module"]), "active": r["active"],
             "frozen": r["frozen"]}
            for r in mat_cb.rows
        ]  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(output.json_safe(out), f)
    return out


if __name__ == "__main__":
    main()
