"""Comparison harness of the benchmarks and examples: plain training, MAT, "Rand" and
Multirate on the same model, data and seed, on one training-FLOPs axis.

    from common import compare   # benchmarks/harness/ on sys.path (the scripts add it)

    results = compare(build_model, train_data, val_data, optimizer_fn=lambda: keras.optimizers.AdamW(1e-3),
                      mat_options=dict(alpha=0.3, probe_every=50), epochs=5, out_dir="results/x")

Variants:

- "plain": the inner optimizer alone, model not annotated (no probe). Its
  training FLOPs are counted with the same analytic model
  (`keras_mat.flops`, every module trained) so that all variants share one
  FLOPs axis.
- "mat": `keras_mat.annotate` + `keras_mat.wrap(optimizer_fn(), **mat_options)`
  and a `keras_mat.MATCallback` (measurements, masks, FLOPs counters, CSV log).
- "rand": `keras_mat.RandomModules`, compute-matched to the MAT run: after
  each of MAT's measurements r it draws, per kind of module (heads, filters,
  experts, whole layers), as many modules as MAT had active of that kind,
  uniformly from all modules of the kind, with `every = probe_every` (needs
  "mat" in `variants`; it runs after it).
- "multirate": `keras_mat.Multirate(**multirate_options)` (defaults: half of
  each family fast, slow modules every 4 steps).

Per epoch it records the validation metric, the cumulative training FLOPs
(`mat_train_flops`; with probes: `mat_total_flops`) and the training
wall-clock (validation excluded, compilation included), then writes
`results.md`, `results.json`, `val_vs_flops.png` and the MAT run's lambda
heatmap `lambda_max.png` into `out_dir` and prints the table.

Table columns (all from the per-epoch records, so "reach" has epoch
resolution: use `steps_per_epoch` for finer evaluation points):

- final / best: validation metric at the last epoch / best over epochs;
- at equal FLOPs: each run's validation metric linearly interpolated on its
  (cumulative training FLOPs, metric) curve at F = the smallest final
  training FLOPs among the variants ("n/a" when F lies before a run's
  first evaluation);
- FLOPs / wall-clock to target: at the first epoch whose metric reaches the
  plain run's best (">=" for mode "max", "<=" for "min"), with the ratio to
  the plain run's own; "not reached" otherwise;
- FLOPs with probes: total training FLOPs plus lambda_max probes.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings

import keras
import numpy as np

import keras_mat
from keras_mat import flops as flops_lib
from keras_mat.training import find_mat_optimizer

VARIANTS = ("plain", "mat", "rand", "multirate")


def _batch_size(data, batch_size):
    """Nominal batch size of the training data (as keras_mat's step counts it)."""
    if isinstance(data, tuple):
        n = int(np.shape(keras.tree.flatten(data[0])[0])[0])
        return min(int(batch_size or 32), n)
    if isinstance(data, keras.utils.PyDataset):
        first = data[0]
    else:
        first = next(iter(data))
    return int(np.shape(keras.tree.flatten(first)[0])[0])


class _Recorder(keras.callbacks.Callback):
    """Per-epoch validation metric, cumulative training FLOPs and wall-clock.

    For the plain run (no keras_mat step) it counts the training FLOPs itself:
    every step costs `step_flops(report, all modules trained)`.
    """

    def __init__(self, metric, plain_step_flops=None, mat_callback=None):
        super().__init__()
        self.metric = metric
        self.plain_step_flops = plain_step_flops
        self.mat_callback = mat_callback
        self.epochs = []
        self.train_seconds = 0.0
        self.plain_flops = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()
        self._train_end = None

    def on_train_batch_end(self, batch, logs=None):
        if self.plain_step_flops is not None:
            self.plain_flops += self.plain_step_flops

    def on_test_begin(self, logs=None):
        if self._train_end is None:  # validation inside fit starts: training of the epoch ended
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        end = self._train_end if self._train_end is not None else time.perf_counter()
        self.train_seconds += end - self._t0
        logs = logs or {}
        if self.plain_step_flops is not None:
            train = total = self.plain_flops
        elif self.mat_callback is not None:  # its on_epoch_end ran first: counters are up to date
            train = float(self.mat_callback.flops["train"])
            total = train + float(self.mat_callback.flops["probe"])
        else:
            train = total = float("nan")
        value = logs.get(self.metric)
        self.epochs.append(
            {
                "epoch": epoch + 1,
                "metric": float("nan") if value is None else float(value),
                "train_flops": train,
                "total_flops": total,
                "wall_s": self.train_seconds,
                "logs": {k: float(v) for k, v in logs.items() if np.ndim(v) == 0},
            }
        )


def _plain_step_flops(model, batch_size, input_shapes):
    report = flops_lib.count_flops(
        model, 1, input_shapes=input_shapes, groups=keras_mat.discover_groups(model)
    )
    return flops_lib.step_flops(report, None, frozen_prefix="auto") * batch_size


def _rand_fractions(logger, kinds, seed):
    """Per family, the fraction of its modules that Rand updates after each of
    MAT's measurements.

    Compute-matched *per kind* of module, not per family: after measurement r,
    if MAT had A of the heads (filters, experts, whole layers) active, Rand
    draws A heads uniformly from all heads of the model, wherever they are.
    (Matching per family would copy MAT's choice whenever MAT turns whole
    families on or off, as it does with a global threshold: Rand would then
    *be* MAT.) `RandomModules` then picks which modules within each family.
    """
    table = {}
    for row in logger.rows:
        table.setdefault(row["family"], {}).setdefault(row["measurement"], []).append(row["active"])
    families = sorted(table)
    measurements = sorted({r for per in table.values() for r in per})
    out = {f: [] for f in families}
    for r in measurements:
        rng = np.random.default_rng([seed, r])
        for kind in sorted({kinds.get(f, "custom") for f in families}):
            members = [f for f in families if kinds.get(f, "custom") == kind]
            sizes = [len(table[f][r]) for f in members]
            active = int(sum(int(np.sum(table[f][r])) for f in members))
            owner = np.repeat(np.arange(len(members)), sizes)
            chosen = owner[rng.permutation(len(owner))[:active]]
            for i, f in enumerate(members):
                out[f].append(float(np.sum(chosen == i)) / sizes[i])
    return out


def _annotate(model, annotate_kwargs):
    """`keras_mat.annotate(model, **annotate_kwargs)`; an `include` entry keeps only those kinds."""
    kwargs = dict(annotate_kwargs)
    include = kwargs.pop("include", None)
    if include is None:
        return keras_mat.annotate(model, **kwargs)
    return keras_mat.annotate(
        model, groups=keras_mat.discover_groups(model, include=tuple(include), **kwargs)
    )


def _better(a, b, mode):
    return a >= b if mode == "max" else a <= b


def _summarize(records, mode):
    finals = [r["epochs"][-1]["train_flops"] for r in records.values()]
    finals = [f for f in finals if math.isfinite(f)]
    equal_flops = min(finals) if finals else float("nan")
    plain = records.get("plain")
    target = plain["best"] if plain else None
    for r in records.values():
        xs = np.array([e["train_flops"] for e in r["epochs"]], dtype="float64")
        ys = np.array([e["metric"] for e in r["epochs"]], dtype="float64")
        r["equal_flops"] = equal_flops
        if len(xs) and np.all(np.isfinite(xs)) and xs[0] <= equal_flops * (1 + 1e-9):
            r["at_equal_flops"] = float(np.interp(equal_flops, xs, ys))
        else:
            r["at_equal_flops"] = None
        r["target"] = target
        r["flops_to_target"] = r["wall_to_target"] = r["epoch_to_target"] = None
        if target is not None:
            for e in r["epochs"]:
                if math.isfinite(e["metric"]) and _better(e["metric"], target, mode):
                    r["flops_to_target"], r["wall_to_target"] = e["train_flops"], e["wall_s"]
                    r["epoch_to_target"] = e["epoch"]
                    break
    if plain and plain["flops_to_target"]:
        for r in records.values():
            r["flops_ratio_to_target"] = (
                None if r["flops_to_target"] is None else r["flops_to_target"] / plain["flops_to_target"]
            )
            r["wall_ratio_to_target"] = (
                None if r["wall_to_target"] is None else r["wall_to_target"] / plain["wall_to_target"]
            )


def _fmt_flops(x):
    return "n/a" if x is None or not math.isfinite(x) else f"{x / 1e12:.3f} T"


def _fmt_metric(x):
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4f}"


def results_table(records, metric, mode):
    """The comparison as a markdown table (see the module docstring)."""
    any_record = next(iter(records.values()))
    eq = _fmt_flops(any_record.get("equal_flops"))
    target = any_record.get("target")
    lines = [
        f"| variant | final {metric} | best {metric} | {metric} at {eq} train FLOPs | "
        f"train FLOPs to plain best ({_fmt_metric(target)}) | wall-clock to plain best | "
        "train FLOPs (total) | FLOPs with probes | train wall-clock |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in records.items():
        if r["flops_to_target"] is None:
            reach_f = reach_t = "not reached" if target is not None else "n/a"
        else:
            fr, wr = r.get("flops_ratio_to_target"), r.get("wall_ratio_to_target")
            reach_f = _fmt_flops(r["flops_to_target"]) + (f" ({fr:.2f}x)" if fr is not None else "")
            reach_t = f"{r['wall_to_target']:.1f} s" + (f" ({wr:.2f}x)" if wr is not None else "")
        last = r["epochs"][-1]
        lines.append(
            f"| {name} | {_fmt_metric(r['final'])} | {_fmt_metric(r['best'])} | "
            f"{_fmt_metric(r['at_equal_flops'])} | {reach_f} | {reach_t} | {_fmt_flops(last['train_flops'])} | "
            f"{_fmt_flops(last['total_flops'])} | {last['wall_s']:.1f} s |"
        )
    return "\n".join(lines)


def _plot(records, metric, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in records.items():
        xs = [e["train_flops"] / 1e12 for e in r["epochs"]]
        ax.plot(xs, [e["metric"] for e in r["epochs"]], marker="o", ms=3, label=name)
    target = next(iter(records.values())).get("target")
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=0.8, label="plain best")
    ax.set_xlabel("cumulative training FLOPs (T)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs training FLOPs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    return x


def compare(
    build_model,
    train_data,
    val_data,
    *,
    variants=VARIANTS,
    optimizer_fn,
    mat_options,
    epochs,
    steps_per_epoch=None,
    metric="val_accuracy",
    mode="max",
    out_dir,
    seed=0,
    flops_input_shapes=None,
    verbose=1,
    title="",
    compile_kwargs=None,
    annotate_kwargs=None,
    multirate_options=None,
    batch_size=None,
    test_data=None,
):
    """Trains each variant with the same seed and data and compares them.

    Args:
        build_model: `() -> keras.Model`: a fresh, uncompiled model; called
            after `keras.utils.set_random_seed(seed)`, so every variant
            starts from the same weights.
        train_data: Training data: a `tf.data.Dataset`, a `PyDataset`, an
            `(x, y)` tuple (arrays, batched by `batch_size`), or a `() -> data` callable (called per
            variant after seeding, e.g. to rebuild a shuffled dataset).
        val_data: Validation data (as `fit`'s `validation_data`), or a
            callable returning it.
        variants: Subset of `("plain", "mat", "rand", "multirate")`.
        optimizer_fn: `() -> keras.optimizers.Optimizer`: a fresh inner
            optimizer per variant.
        mat_options: Dict of `keras_mat.wrap` options for the MAT run.
        epochs: Number of epochs.
        steps_per_epoch: Optional steps per epoch (evaluation points).
        metric: The logged validation metric to compare.
        mode: `"max"` or `"min"` (higher or lower `metric` is better).
        out_dir: Folder for results.md, results.json, val_vs_flops.png and
            lambda_max.png (created).
        seed: Seed for weights, data order and the baselines' draws.
        flops_input_shapes: Per-sample input shapes for `keras_mat.flops`
            when the model's inputs have unknown dimensions.
        verbose: `fit` verbosity (1: progress bar) and printing.
        title: Title of the table and the plot.
        compile_kwargs: Dict (or `() -> dict`) of `compile` arguments other
            than the optimizer; default: sparse categorical cross-entropy
            from logits and accuracy.
        annotate_kwargs: Dict of `keras_mat.annotate` options (MAT, Rand,
            Multirate). An `include` entry (kinds, e.g. `("expert",)`)
            restricts the modules to those kinds: the model is annotated
            with `keras_mat.discover_groups(model, include=..., **rest)`.
        multirate_options: Dict of `keras_mat.Multirate` options.
        batch_size: `fit`'s batch size for array data.
        test_data: Optional held-out data (as `evaluate`'s `x`, or a callable
            returning it), evaluated once after training; its metrics go to
            the record's `test` dict.

    Returns:
        A dict variant -> record (JSON-safe): `epochs` (per-epoch metric,
        FLOPs, wall-clock, logs), `final`, `best`, `at_equal_flops`,
        `flops_to_target`, `wall_to_target` (and ratios to plain),
        `train_flops`, `total_flops`, `wall_s`; MAT-driven variants add
        `final_active` (family -> list of 0/1 of the last step's masks),
        `step_variants` (compiled step variants, one per distinct set of
        fully-off variables) and `skip_set_changes` (how often that set
        changed between measurements).

    Raises:
        ValueError: on an unknown or repeated variant, a "rand" without
            "mat", a bad `mode`, `epochs` or `mat_options`, or a run that logs
            no finite `metric`.
    """
    variants = tuple(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants or len(set(variants)) != len(variants):
        raise ValueError(
            f"`variants` must be distinct names from {VARIANTS}. Received: variants={variants!r}"
        )
    if "rand" in variants and "mat" not in variants:
        raise ValueError(
            f"'rand' is compute-matched to the MAT run: include 'mat'. Received: variants={variants!r}"
        )
    if mode not in ("max", "min"):
        raise ValueError(f"`mode` must be 'max' or 'min'. Received: mode={mode!r}")
    if not isinstance(mat_options, dict):
        raise ValueError(f"`mat_options` must be a dict of keras_mat.wrap options. Received: {mat_options!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"`epochs` must be an int >= 1. Received: epochs={epochs!r}")
    os.makedirs(out_dir, exist_ok=True)
    order = [v for v in VARIANTS if v in variants]  # plain first (the target), rand after mat
    mat_options = dict(mat_options)
    probe_every = int(mat_options.get("probe_every", 100))
    annotate_kwargs = dict(annotate_kwargs or {})
    records, mat_log = {}, None

    def resolve(data):
        return data() if callable(data) and not isinstance(data, keras.utils.PyDataset) else data

    for name in order:
        keras.utils.set_random_seed(seed)
        model = build_model()
        train = resolve(train_data)
        val = resolve(val_data)
        inner = optimizer_fn()
        callbacks = []
        plain_step, mat_cb = None, None
        nominal_batch = _batch_size(train, batch_size)
        if name == "plain":
            optimizer = inner
            try:
                plain_step = _plain_step_flops(model, nominal_batch, flops_input_shapes)
            except Exception as err:  # FLOPs are reporting only
                warnings.warn(f"FLOPs of the plain run could not be counted ({err})", stacklevel=2)
                plain_step = float("nan")
        else:
            _annotate(model, annotate_kwargs)
            # The callback drives MAT's measurements and the schedules' masks, and counts FLOPs;
            # its probe set is the first training samples.
            probe = train if not isinstance(train, tuple) else train[:2]
            csv_path = os.path.join(out_dir, "mat_log.csv") if name == "mat" else None
            mat_cb = keras_mat.MATCallback(*probe if isinstance(probe, tuple) else (probe,), csv_path=csv_path,
                                           batch_size=nominal_batch)  # fmt: skip
            callbacks.append(mat_cb)
            if name == "mat":
                optimizer = keras_mat.wrap(inner, **mat_options)
                mat_log = mat_cb
            else:
                if name == "rand":
                    kinds = {g.name: g.kind for g in keras_mat.get_groups(model)}
                    fractions = _rand_fractions(mat_log, kinds, seed)
                    if not fractions:
                        raise ValueError(
                            "The MAT run logged no measurement, so Rand has no active fraction to match. "
                            f"Received: probe_every={probe_every}"
                        )
                    schedule = keras_mat.RandomModules(fractions, every=probe_every, seed=seed)
                else:
                    schedule = keras_mat.Multirate(**{"seed": seed, **(multirate_options or {})})
                keep = {k: mat_options[k] for k in ("ntk_output", "probe_samples") if k in mat_options}
                optimizer = keras_mat.wrap(inner, policy=schedule, **keep)
        ck = compile_kwargs() if callable(compile_kwargs) else dict(compile_kwargs or {})
        ck.setdefault("loss", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        ck.setdefault("metrics", ["accuracy"])
        model.compile(optimizer=optimizer, **ck)
        recorder = _Recorder(metric, plain_step, mat_cb)
        callbacks.append(recorder)
        if verbose:
            print(f"\n=== {title + ': ' if title else ''}{name} ===", flush=True)
        # Arrays: batched and shuffled by fit; datasets come batched and shuffled.
        fit_kwargs = {"batch_size": batch_size} if isinstance(train, tuple) else {"shuffle": False}
        x, y = (train[0], train[1]) if isinstance(train, tuple) else (train, None)
        keras.utils.set_random_seed(seed)
        model.fit(
            x,
            y,
            validation_data=val,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            callbacks=callbacks,
            verbose=verbose,
            **fit_kwargs,
        )
        values = [e["metric"] for e in recorder.epochs]
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            raise ValueError(
                f"The {name} run logged no finite {metric!r}: pass validation data and a metric it logs. "
                f"Received: metric={metric!r}, logged keys={sorted(recorder.epochs[-1]['logs'])}"
            )
        last = recorder.epochs[-1]
        record = {
            "epochs": recorder.epochs,
            "final": values[-1],
            "best": max(finite) if mode == "max" else min(finite),
            "train_flops": last["train_flops"],
            "total_flops": last["total_flops"],
            "wall_s": last["wall_s"],
        }
        if name != "plain":
            if keras.config.backend() == "jax":
                model.jax_state_sync()
            opt = find_mat_optimizer(model.optimizer)
            record["final_active"] = {k: v.astype(int).tolist() for k, v in opt.masks.items()}
            info = mat_cb.step_cache_info()
            # Compiled step variants (one per distinct set of fully-off variables) and how
            # often that set changed: each change costs a compile on JAX and TensorFlow.
            record["step_variants"] = int(info["num_compiles"])
            history = [skip for _, skip in info["skip_history"]]
            record["skip_set_changes"] = sum(a != b for a, b in zip(history, history[1:]))
        if test_data is not None:
            scores = model.evaluate(resolve(test_data), return_dict=True, verbose=0)
            record["test"] = {k: float(v) for k, v in scores.items()}
        records[name] = record
    _summarize(records, mode)
    table = results_table(records, metric, mode)
    header = f"## {title}\n\n" if title else ""
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(header + table + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(_json_safe({"metric": metric, "mode": mode, "records": records}), f, indent=1)
    _plot(records, metric, os.path.join(out_dir, "val_vs_flops.png"), title)
    if mat_log is not None and mat_log.rows:
        keras_mat.plot_lambda(
            mat_log, os.path.join(out_dir, "lambda_max.png"), title=f"{title} MAT lambda_max"
        )
    if verbose:
        print("\n" + header + table, flush=True)
    return _json_safe(records)
