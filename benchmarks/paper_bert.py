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
- `multirate`: `keras_mat.Multirate` over the heads.

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

import wikitext  # noqa: E402  (benchmarks/harness/wikitext.py)

VARIANTS = ("plain", "mat", "rand", "multirate")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--variant", choices=VARIANTS, default="plain")
    p.add_argument(
        "--seed", type=int, default=0, help="weights, batch order and (with 1000+seed) nothing else"
    )
    p.add_argument("--data-seed", type=int, default=0, help="masking seed (the same for every run)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument(
        "--patience", type=int, default=0, help="stop after this many evaluations without a new best"
    )
    p.add_argument("--evals-per-epoch", type=int, default=2)
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
    p.add_argument("--rand-fraction", type=float, default=0.5)
    p.add_argument("--multirate-k", type=int, default=4)
    p.add_argument("--log-lambda", type=int, default=0, help="log heads' lambda_max every K steps (0: off)")
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


def main(argv=None):
    args = parse_args(argv)
    import keras

    import keras_mat
    from keras_mat import flops as flops_lib

    keras.utils.set_random_seed(args.seed)
    train, val, test, vocab_size, description = load_data(args)
    n_train = len(train[1])
    steps_per_epoch = n_train // args.batch_size
    model = build_model(args, vocab_size)
    x0 = {k: v[: args.batch_size] for k, v in train[0].items()}
    model(x0)
    groups = head_groups(model)
    probe_x = {k: v[: args.probe_samples] for k, v in train[0].items()}
    probe_y = train[1][: args.probe_samples]

    inner = keras.optimizers.AdamW(args.lr, weight_decay=args.weight_decay)
    callbacks, optimizer, mat_cb = [], inner, None
    if args.variant != "plain":
        keras_mat.annotate(model, groups=groups)
    if args.variant == "mat":
        options = dict(alpha=args.alpha, beta=args.beta, probe_every=args.probe_every, ntk_output="sum")
        options["probe_samples"] = args.probe_samples
        if args.temporal is not None:
            options["temporal"] = args.temporal
        optimizer = keras_mat.wrap(inner, **options)
        mat_cb = keras_mat.MATCallback(probe_x, probe_y)
        callbacks.append(mat_cb)
    elif args.variant in ("rand", "multirate"):
        if args.variant == "rand":
            schedule = keras_mat.RandomModules(args.rand_fraction, every=args.probe_every, seed=args.seed)
        else:
            schedule = keras_mat.Multirate(k=args.multirate_k)
        optimizer = keras_mat.wrap(inner, policy=schedule)
    model.compile(optimizer=optimizer, **wikitext.compile_kwargs())

    report = flops_lib.count_flops(
        model, args.batch_size, input_shapes={k: (args.seq,) for k in x0}, groups=groups
    )
    plain_step = flops_lib.step_flops(report)
    families = [(g.name, g.num_modules) for g in groups]
    schedule = locals().get("schedule")

    state = dict(step=0, flops=0.0, train_time=0.0, lambda_log=[], active=[])

    def current_masks():
        """Dict family -> 0/1 array of heads trained this step (None: all)."""
        if schedule is not None:
            return dict(zip([f for f, _ in families], schedule.masks(state["step"], families)))
        return mat_masks(model.optimizer)

    def step_cost(masks):
        if masks is not None:
            masks = {k: np.asarray(v) > 0 for k, v in masks.items()}
        return flops_lib.step_flops(report, masks=masks, frozen_prefix="auto")

    class Recorder(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self._t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            state["train_time"] += time.perf_counter() - self._t
            masks = current_masks()
            state["flops"] += step_cost(masks)
            if masks is not None:
                on = sum(float(np.sum(m)) for m in masks.values())
                tot = sum(np.size(m) for m in masks.values())
                state["active"].append(on / max(tot, 1))
            state["step"] += 1

    recorder = Recorder()
    records = []
    best = (float("inf"), -1)
    evals = 0
    eval_every = max(1, steps_per_epoch // args.evals_per_epoch)
    # Evaluate at step 0 as well (all variants start from the same weights for one seed).
    records.append(
        dict(step=0, epoch=0.0, flops=0.0, seconds=0.0, val=masked_loss(model, val, 64), test=None)
    )
    total_steps = args.epochs * steps_per_epoch
    order = np.concatenate(
        [np.random.RandomState(args.seed * 1000 + e).permutation(n_train) for e in range(args.epochs)]
    )

    def log_lambda():
        t0 = time.perf_counter()
        lam = keras_mat.module_lambda_max(model, probe_x, groups=groups, ntk_output="sum")
        entry = {k: np.asarray(v, "float64").tolist() for k, v in lam.items()}
        seconds = time.perf_counter() - t0
        state["lambda_log"].append({"step": state["step"], "lambda": entry, "seconds": seconds})

    def train_steps(n):
        """`n` optimizer steps of `fit` on the next batches of the fixed order."""
        start = state["step"] * args.batch_size
        idx = order[start : start + n * args.batch_size]
        x, y, w = train
        model.fit(
            {k: v[idx] for k, v in x.items()},
            y[idx],
            sample_weight=w[idx],
            batch_size=args.batch_size,
            epochs=1,
            shuffle=False,
            callbacks=[recorder, *callbacks],
            verbose=0,
        )

    if args.log_lambda:
        log_lambda()
    t_start = time.perf_counter()
    stop = False
    while state["step"] < total_steps and not stop:
        n = min(eval_every, total_steps - state["step"])
        chunk = args.log_lambda or n
        target = state["step"] + n
        while state["step"] < target:
            train_steps(min(chunk - state["step"] % chunk, target - state["step"]))
            if args.log_lambda and state["step"] % args.log_lambda == 0:
                log_lambda()
        v = masked_loss(model, val, 64)
        rec = dict(
            step=state["step"],
            epoch=state["step"] / steps_per_epoch,
            flops=state["flops"],
            seconds=state["train_time"],
            val=v,
            active=float(np.mean(state["active"][-n:])) if state["active"] else 1.0,
        )
        if mat_cb is not None and hasattr(model.optimizer, "frozen_fraction"):
            rec["frozen"] = float(model.optimizer.frozen_fraction())
        records.append(rec)
        evals += 1
        if args.verbose:
            print(json.dumps(rec), flush=True)
        if v < best[0]:
            best = (v, evals)
            best_weights = [np.array(w) for w in model.get_weights()]
        elif args.patience and evals - best[1] >= args.patience:
            stop = True
    best_record = min(records[1:], key=lambda r: r["val"])
    model.set_weights(best_weights)
    best_record["test"] = masked_loss(model, test, 64)
    out = dict(
        args=vars(args),
        best=best_record,
        description=description,
        train_sequences=n_train,
        val_sequences=len(val[1]),
        test_sequences=len(test[1]),
        steps_per_epoch=steps_per_epoch,
        plain_step_flops=plain_step,
        records=records,
        lambda_log=state["lambda_log"],
        wall_seconds=time.perf_counter() - t_start,
        backend=keras.backend.backend(),
    )
    if mat_cb is not None and hasattr(mat_cb, "history"):
        out["mat_history"] = _json_safe(mat_cb.history)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f)
    return out


def mat_masks(optimizer):
    """Dict family -> trained-module mask of a MAT optimizer (None for a plain one)."""
    for name in ("active_masks", "current_masks", "masks_dict"):
        fn = getattr(optimizer, name, None)
        if callable(fn):
            return {k: np.asarray(v) for k, v in fn().items()}
    return None


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if hasattr(x, "tolist"):
        return np.asarray(x).tolist()
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return str(x)


if __name__ == "__main__":
    main()
