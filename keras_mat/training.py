"""How MAT reaches Keras training, through Keras's own extension points.

- `MATCallback`: inside `fit`, measures `lambda_max` every `probe_every`
  optimizer steps on a fixed probe set, hands it to the optimizer's policy
  (`ModularAdaptiveOptimizer.update_masks`) and applies the skip set.
- `sync_trainable`: the skip set. A variable whose every module is masked
  or frozen is made non-trainable while it is off, so that whatever train
  step runs (Keras's, a subclass's own `train_step`, `train_on_batch`, a
  custom loop over `model.trainable_variables`) computes no weight gradient
  and no update for it, and back-propagation stops below the lowest trained
  layer. Compiled steps are rebuilt when the set changes.
- `measure`: one measurement for custom training loops.

Nothing here replaces a model's methods or a Keras class's: the masked
update is the optimizer's, the measurement is a callback, the savings are
Keras's own handling of non-trainable variables.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import sys
import threading
import time
import types
import warnings

import keras
import numpy as np
from keras import ops, tree

from keras_mat import backends, flops, ntk, policy
from keras_mat.groups import discover_groups, get_groups
from keras_mat.optimizer import ModularAdaptiveOptimizer, host_int

#: Probe samples of measurement-only mode (a plain optimizer).
DEFAULT_PROBE_SAMPLES = 16
#: Measurement interval of measurement-only mode.
DEFAULT_PROBE_EVERY = 100


def find_mat_optimizer(optimizer):
    """The `ModularAdaptiveOptimizer` inside `optimizer` (also inside a
    `LossScaleOptimizer`), or `None`."""
    for _ in range(8):
        if optimizer is None or isinstance(optimizer, ModularAdaptiveOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return None


# --------------------------------------------------------------------------------------
# Probe set
# --------------------------------------------------------------------------------------


def _take(data, n):
    return tree.map_structure(lambda t: np.asarray(ops.convert_to_numpy(t))[:n], data)


def _size(data):
    return int(np.shape(tree.flatten(data)[0])[0])


def take_probe_set(x, y=None, n=DEFAULT_PROBE_SAMPLES):
    """The first `n` samples of `x` (and `y`), as numpy.

    Args:
        x: Arrays (or a structure of arrays), a `tf.data.Dataset`, a
            `keras.utils.PyDataset`, or an iterable of batches. Batches are
            unpacked as Keras unpacks them: `(x, y)` or `(x, y, sample_weight)`.
        y: Targets for array `x` (only `ntk_output="loss"` uses them).
        n: Number of samples (int >= 1).

    Returns:
        A tuple `(x_probe, y_probe)`; `y_probe` may be `None`.

    Raises:
        ValueError: if `x` is empty or holds no batch.
    """
    px, py, _ = _take_probe_set(x, y, n)
    return px, py


def _take_probe_set(x, y, n):
    # Also returns the size of the first batch of batched data (the fit
    # batch size, for FLOPs), or None for arrays.
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"`n` must be an int >= 1. Received: n={n!r}")
    if x is None:
        raise ValueError("The probe data is empty. Received: x=None")
    tf = sys.modules.get("tensorflow")  # imported only if the data is a tf.data.Dataset
    batches = None
    if tf is not None and isinstance(x, tf.data.Dataset):
        batches = iter(x)
    elif isinstance(x, keras.utils.PyDataset):
        batches = (x[i] for i in range(len(x)))
    elif isinstance(x, types.GeneratorType) or (hasattr(x, "__next__") and not hasattr(x, "shape")):
        batches = x
    if batches is None:
        if _size(x) < 1:
            raise ValueError(f"The probe data is empty. Received: x of batch size {_size(x)}")
        return _take(x, n), (None if y is None else _take(y, n)), None
    xs, ys, have, first = [], [], 0, None
    for batch in batches:
        bx, by, _ = keras.utils.unpack_x_y_sample_weight(batch)
        first = first or _size(bx)
        xs.append(_take(bx, n - have))
        ys.append(None if by is None else _take(by, n - have))
        have += _size(xs[-1])
        if have >= n:
            break
    if not xs:
        raise ValueError(f"The probe data holds no batch. Received: x={x!r}")
    cat = lambda parts: tree.map_structure(lambda *a: np.concatenate(a, axis=0), *parts)  # noqa: E731
    return cat(xs), (None if ys[0] is None else cat(ys)), first


# --------------------------------------------------------------------------------------
# Skip set
# --------------------------------------------------------------------------------------


def _rebuild_functions(model):
    # Compiled steps captured which variables were trainable: a stale one
    # would differentiate (and, on JAX, map values onto) the wrong set.
    if model.train_function is not None:
        model.make_train_function(force=True)
    model.test_function = None
    model.predict_function = None


def sync_trainable(model, variables=None):
    """Makes the fully-off variables of the MAT optimizer non-trainable.

    Call it after changing masks by hand (`set_masks`, `update_masks`)
    before `train_on_batch` or a custom training step; `MATCallback` calls
    it inside `fit`. Every variable whose modules are all masked or frozen
    becomes non-trainable, the ones with an active module again become
    trainable, and the model's compiled train/test/predict functions are
    rebuilt if the set changed. A compiled step of your own (a `tf.function`
    or `jax.jit` over `model.trainable_variables`) must be retraced when
    this returns True.

    Args:
        model: A model compiled with a `keras_mat.wrap(...)` optimizer.
        variables: Optional subset of `optimizer.skippable_variables()` to
            skip (default: all of them).

    Returns:
        True if the set of trainable variables changed.

    Raises:
        ValueError: if the model's optimizer is not a built MAT optimizer,
            or `variables` holds a variable that has an active module.

    Example:

    >>> model.optimizer.set_masks({"dense/kernel": [False]})  # doctest: +SKIP
    >>> keras_mat.sync_trainable(model)  # doctest: +SKIP
    True
    """
    opt = find_mat_optimizer(getattr(model, "optimizer", None))
    if opt is None or not opt.built:
        raise ValueError(
            "`sync_trainable` needs a model compiled with a built keras_mat.wrap(...) optimizer "
            "(build it with `model.optimizer.build(model.trainable_variables)` or train one step). "
            f"Received: optimizer={getattr(model, 'optimizer', None)!r}"
        )
    skippable = opt.skippable_variables()
    if variables is None:
        variables = skippable
    else:
        allowed = {id(v) for v in skippable}
        extra = [v.path for v in variables if id(v) not in allowed]
        if extra:
            raise ValueError(
                "Only variables whose every module is masked or frozen can be skipped. "
                f"Received: variables with an active module: {extra}"
            )
    backends.trainer().sync_state(model)
    changed = opt._set_skipped(variables)
    if changed:
        _rebuild_functions(model)
    return changed


def measure(model, x_probe, y_probe=None, ntk_output=None, total_steps=None):
    """One MAT measurement step for custom training loops.

    If the optimizer's `should_measure()` is true, measures `lambda_max` on
    the probe set, runs the policy (`update_masks`) and `sync_trainable`.

    Args:
        model: A model compiled with a `keras_mat.wrap(...)` optimizer.
        x_probe: The probe inputs (the same samples at every call).
        y_probe: Probe targets (needed for `ntk_output="loss"`).
        ntk_output: Overrides the optimizer's `ntk_output`.
        total_steps: The planned number of optimizer steps, which sets the
            clock of the temporal rule for `temporal="training"` (see
            `keras_mat.policy.temporal_period`); `None` if unknown.

    Returns:
        True if the set of trainable variables changed (retrace a compiled
        step of your own).

    Example:

    >>> for x, y in dataset:  # doctest: +SKIP
    ...     keras_mat.measure(model, x_probe)
    ...     loss = model.train_on_batch(x, y)
    """
    opt = find_mat_optimizer(getattr(model, "optimizer", None))
    if opt is None:
        raise ValueError(
            "`measure` needs a model compiled with a keras_mat.wrap(...) optimizer. "
            f"Received: optimizer={getattr(model, 'optimizer', None)!r}"
        )
    if not opt.built:
        opt.build(model.trainable_variables)
    opt._driven = True
    if isinstance(opt.policy, str) and opt.should_measure():
        backends.trainer().sync_state(model)
        mode = ntk_output or opt.ntk_output
        lam = ntk.module_lambda_max(model, x_probe, y=y_probe, ntk_output=mode, groups=opt.families)
        period = policy.temporal_period(
            opt.temporal, opt.probe_every, total_steps, 1 if total_steps else None
        )
        opt.update_masks(lam, period=period)
    elif opt.policy is not None and not isinstance(opt.policy, str):
        backends.trainer().sync_state(model)
        opt.follow_schedule(host_int(opt.iterations))
    return sync_trainable(model)


# --------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------


def _lambda_from(probe, values, x, y, spectrum=None):
    # lambda_max of every family from given variable values (a snapshot),
    # and with `spectrum` (None, "all" or k) every module's leading
    # eigenvalues and effective rank from the same Grams.
    grams = [
        np.asarray(ops.convert_to_numpy(g), dtype=np.float64)
        for g in probe._grams(values, x, y, compiled=True)
    ]
    sizes = [g.shape[0] for g in grams]
    top = ntk.top_eigenvalues_numpy(np.concatenate(grams, axis=0))
    starts = np.cumsum([0] + sizes)
    lam = [top[a:b].astype(np.float32) for a, b in zip(starts[:-1], starts[1:])]
    if spectrum is None:
        return lam, None
    spectra = []
    for gram in grams:
        eig = ntk.gram_spectrum(gram)
        spectra.append((eig if spectrum == "all" else eig[:, :spectrum], ntk.effective_rank(eig)))
    return lam, spectra


#: A fit planned to measure at most this many times compiles its probe with
#: the backend's fast-compile options (on JAX on CPU: about half the compile
#: time, up to 3x the run time of each measurement).
FAST_COMPILE_MEASUREMENTS = 16


def _optional_int(name, value, allow_none=True):
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1. Received: {name}={value!r}")
    return int(value)


_FIELDS = (
    "step",
    "measurement",
    "family",
    "module",
    "lambda_max",
    "active",
    "frozen",
    "train_flops",
    "total_flops",
)


class MATCallback(keras.callbacks.Callback):
    """Runs Modular Adaptive Training inside `model.fit`.

    Every `probe_every` optimizer steps (the optimizer's option) it measures
    `lambda_max` of every module on a fixed probe set, runs the MAT policy
    (`optimizer.update_masks`) and skips the variables whose modules are all
    off (see `keras_mat.sync_trainable`). A new set of skipped variables
    needs a new compiled train step: it is compiled only when its predicted
    saving until the next measurement exceeds the measured compile time;
    until then the cached step with the largest still-valid skip set runs
    (the step without skipping is always valid and always exact).

    With a mask schedule (`policy=keras_mat.RandomModules(...)`) it writes
    the schedule's masks before each step. With a plain optimizer (no
    `keras_mat.wrap`) it only measures and records (`rows`).

    Every measurement is recorded in `rows` (one dict per module, with the
    fields of the CSV file: `step, measurement, family, module, lambda_max,
    active, frozen, train_flops, total_flops`), optionally in a CSV file and
    in TensorBoard. The fractions of modules updated and stopped go to the
    logs as `mat_active` and `mat_frozen`; the FLOPs counters go to History
    (see `flops`) and, with `show_flops=True`, to the progress bar.

    Args:
        x: Probe inputs: arrays, a `tf.data.Dataset`, a `PyDataset` or an
            iterable of batches; the first `probe_samples` samples are
            taken once (use training data).
        y: Probe targets for array `x` (`ntk_output="loss"` only).
        probe_samples: Samples of the probe set; defaults to the optimizer's
            `probe_samples` (16 with a plain optimizer).
        probe_every: Measurement interval with a plain optimizer (the MAT
            optimizer's own `probe_every` wins). Defaults to 100.
        csv_path: Optional path of a CSV file of the rows.
        tensorboard_dir: Optional TensorBoard log directory (needs
            TensorFlow and TensorBoard installed; any backend).
        append: Append to an existing CSV file (when resuming).
        count_flops: Count analytic training FLOPs (`keras_mat.flops`).
        show_flops: Also show the FLOPs counters in the progress bar.
        recompile: `"auto"` (compile a skip set only when it pays),
            `"always"` or `"never"` (skip only what needs no new compile).
        max_cached_steps: Compiled train steps kept (one per skip set).
        defer_first_measurement: On JAX and TensorFlow, run the first
            measurement of a fit (which compiles the probe and the policy)
            in a background thread on a snapshot of the weights, and apply
            it when the next measurement is due;
            only for a warm-up measurement (fewer than `warmup` taken so
            far), which leaves every module active anyway. Set False to
            measure synchronously.
        spectrum: Also record every module's mNTK spectrum at each
            measurement, from the same Gram matrices (solved in full in
            float64, as `keras_mat.module_spectrum`): `None` (default, off),
            an int k (the k largest eigenvalues) or `"all"`. Each row of
            `rows` then has `eigenvalues` (descending) and `effective_rank`.
        total_steps: Planned optimizer steps of the whole training, for
            a training run split over several `fit` calls: the `"training"`
            temporal reading then counts quarters of this length rather
            than of the current `fit`'s. `None` (default) reads each `fit`'s
            own `steps * epochs`.
        batch_size: Training batch size for the FLOPs counters. Defaults to
            the size of the first batch when `x` is batched data, else to
            32 (`fit`'s default).

    Example:

    >>> keras_mat.annotate(model)  # doctest: +SKIP
    >>> model.compile(optimizer=keras_mat.wrap(keras.optimizers.AdamW(1e-3)), loss=...)  # doctest: +SKIP
    >>> mat = keras_mat.MATCallback(x_train)  # doctest: +SKIP
    >>> model.fit(x_train, y_train, callbacks=[mat])  # doctest: +SKIP
    >>> keras_mat.plot_lambda(mat)  # doctest: +SKIP
    """

    def __init__(
        self,
        x,
        y=None,
        probe_samples=None,
        probe_every=DEFAULT_PROBE_EVERY,
        csv_path=None,
        tensorboard_dir=None,
        append=False,
        count_flops=True,
        show_flops=False,
        recompile="auto",
        max_cached_steps=8,
        batch_size=None,
        defer_first_measurement=True,
        spectrum=None,
        total_steps=None,
    ):
        super().__init__()
        probe_samples = _optional_int("probe_samples", probe_samples)
        probe_every = _optional_int("probe_every", probe_every, allow_none=False)
        max_cached_steps = _optional_int("max_cached_steps", max_cached_steps, allow_none=False)
        batch_size = _optional_int("batch_size", batch_size)
        if not isinstance(recompile, str) or recompile not in ("auto", "always", "never"):
            raise ValueError(
                f"`recompile` must be 'auto', 'always' or 'never'. Received: recompile={recompile!r}"
            )
        for name, path in (("csv_path", csv_path), ("tensorboard_dir", tensorboard_dir)):
            if path is not None and not isinstance(path, (str, os.PathLike)):
                raise ValueError(f"`{name}` must be a path (str or os.PathLike). Received: {name}={path!r}")
        if x is None:
            raise ValueError("MATCallback needs probe data (training inputs). Received: x=None")
        self._data = (x, y)
        self.probe_samples = probe_samples
        self.probe_every = probe_every
        self.csv_path = None if csv_path is None else os.fspath(csv_path)
        self.tensorboard_dir = tensorboard_dir
        self.append = bool(append)
        self.count_flops = bool(count_flops)
        self.show_flops = bool(show_flops)
        self.recompile = recompile
        self.max_cached_steps = max_cached_steps
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"`batch_size` must be an int >= 1. Received: batch_size={batch_size!r}")
        self.batch_size = batch_size
        self.defer_first_measurement = bool(defer_first_measurement)
        if spectrum is not None and spectrum != "all":
            if (
                isinstance(spectrum, (bool, np.bool_))
                or not isinstance(spectrum, (int, np.integer))
                or spectrum < 1
            ):
                raise ValueError(
                    "`spectrum` must be None, 'all' or an int >= 1 (eigenvalues kept per module). "
                    f"Received: spectrum={spectrum!r}"
                )
            spectrum = int(spectrum)
        self.spectrum = spectrum
        self.total_steps = _optional_int("total_steps", total_steps)
        self._first_batch = None
        self.rows = []
        self._flops = {"train": 0.0, "probe": 0.0, "executed": 0.0}
        self._in_flight = None
        self._probe_set = None
        self._probe_key = None
        self._writer = None
        self._cache = {}  # frozenset of skipped variable ids -> compiled train function
        self._order = []
        self._compile_seconds = []
        self._skip_history = []
        self._warned = set()
        self._report = None
        self._cost = {}
        self._num_compiles = 0
        self._measurement = 0
        self._probe_ready = False

    # ---------------------------------------------------------------------------------
    # Set-up
    # ---------------------------------------------------------------------------------

    def _families(self):
        if self._opt is not None:
            return list(self._opt.families)
        groups = get_groups(self.model)
        return list(groups) if groups is not None else list(discover_groups(self.model))

    def on_train_begin(self, logs=None):
        model = self.model
        self._opt = opt = find_mat_optimizer(getattr(model, "optimizer", None))
        if opt is not None:
            opt._driven = True
        backends.trainer().check_distribution(model)
        if opt is not None and not opt.built:
            scope = model.distribute_strategy.scope() if backends.name() == "tensorflow" else None
            with scope or contextlib.nullcontext():
                model.optimizer.build(model.trainable_variables)
        n = self.probe_samples or (opt.probe_samples if opt is not None else DEFAULT_PROBE_SAMPLES)
        if self._probe_set is None or _size(self._probe_set[0]) != n:
            px, py, first = _take_probe_set(*self._data, n)
            self._probe_set = (px, py)
            self._first_batch = first or self._first_batch
        self._every = opt.probe_every if opt is not None else self.probe_every
        if opt is not None and isinstance(opt.policy, str):
            # The temporal rule's clock, from the planned length of this fit.
            params = self.params or {}
            if self.total_steps is not None and opt.temporal == "training":
                self._period = policy.temporal_period(opt.temporal, opt.probe_every, self.total_steps, 1)
            else:
                self._period = policy.temporal_period(
                    opt.temporal, opt.probe_every, params.get("steps") or None, params.get("epochs") or None
                )
        self._measures = opt is None or isinstance(opt.policy, str)
        self._schedule = opt is not None and opt.policy is not None and not isinstance(opt.policy, str)
        if self._schedule and model.steps_per_execution != 1:
            raise ValueError(
                "A mask schedule sets the masks before every step: compile with "
                f"steps_per_execution=1. Received: steps_per_execution={model.steps_per_execution}"
            )
        families = self._families()
        if not families:
            raise ValueError(
                "MATCallback found no module family: call keras_mat.annotate(model) before "
                "compile(), or compile with a keras_mat.wrap(...) optimizer. Received: families=[]"
            )
        self._families_now = families
        mode = opt.ntk_output if opt is not None else "auto"
        px, py = self._probe_set
        mode = ntk.resolve_ntk_output(model, px, mode)
        loss = model.loss if mode == "loss" else None
        if mode == "loss" and loss is None:
            raise ValueError("ntk_output='loss' needs the model compiled with a loss. Received: loss=None")
        if mode == "loss" and py is None:
            raise ValueError(
                "ntk_output='loss' needs probe targets: pass `y` to MATCallback. Received: y=None"
            )
        self._probe = ntk.get_probe(model, families, mode, loss=loss, x=px)
        # A fit that measures a few times gains more from a short probe
        # compile than it loses to the slower compiled probe.
        params = self.params or {}
        planned = (params.get("steps") or 0) * (params.get("epochs") or 0)
        self._probe.fast_compile = (
            bool(planned) and self._measures and -(-planned // self._every) <= FAST_COMPILE_MEASUREMENTS
        )
        self._probe_inputs = (
            tree.map_structure(ops.convert_to_tensor, px),
            None if py is None else tree.map_structure(ops.convert_to_tensor, py),
        )
        self._started = False  # the step counter is read at the first batch
        self._pending = None
        self._in_flight = None
        self._first_call = None
        self._compiles = backends.trainer().compiles_train_step(model)
        self._step_seconds = None
        self._last_time = None
        self._pending_compile = None
        # Flags left from an interrupted fit: start from the full step.
        if opt is not None and opt.skipped_variables:
            opt._set_skipped([])
            _rebuild_functions(model)
        if self._cache.get(frozenset()) is not model.train_function:
            # A new compiled step (first fit, or the model was compiled again).
            self._cache = {frozenset(): model.train_function}
            self._order = [frozenset()]
        self._total_params = float(sum(int(np.prod(v.shape)) for v in model.trainable_variables))
        if self.count_flops and self._report is None:
            try:
                shapes = tree.map_structure(lambda a: tuple(np.shape(a)[1:]), px)
                self._report = flops.count_flops(model, 1, input_shapes=shapes, groups=families)
                rows = getattr(self._probe, "rows_per_sample", None) or getattr(
                    self._probe, "_rows_per_sample", 1
                )
                self._probe_cost = flops.probe_flops(self._report, _size(px), rows or 1)
            except Exception as err:  # FLOPs are reporting only: never block training
                self._warn("flops", f"keras_mat: FLOPs accounting is off for this model ({err})")
                self._report = None
        self._batch_size = self.batch_size or self._first_batch or 32
        if opt is None:
            self._active_host = [np.ones((g.num_modules,), bool) for g in families]
            self._frozen_host = [np.zeros((g.num_modules,), bool) for g in families]
        if self.csv_path and not (self.append and os.path.exists(self.csv_path)):
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(_FIELDS)
        if self.tensorboard_dir and self._writer is None:
            try:
                import tensorboard  # noqa: F401  (tf.summary writes through it)
                import tensorflow as tf
            except ImportError as err:  # pragma: no cover - depends on the install
                raise ImportError(
                    "MATCallback(tensorboard_dir=...) writes with tf.summary: install tensorflow and "
                    f"tensorboard. Received: tensorboard_dir={self.tensorboard_dir!r}"
                ) from err
            self._writer = tf.summary.create_file_writer(self.tensorboard_dir)

    @property
    def flops(self):
        """Cumulative analytic FLOPs of this callback's training so far: a
        dict with `train` (forward, backward and the weight gradients of
        updated modules, as MAT counts them), `probe` (the measurements) and
        `executed` (what the steps ran: a variable's whole weight gradient
        while any module of it trains). The step in flight counts."""
        out = dict(self._flops)
        if self._in_flight is not None and self._in_flight[2] is not None:
            _, spe, cost = self._in_flight
            out["train"] += cost[0] * self._batch_size * spe
            out["executed"] += cost[1] * self._batch_size * spe
        return out

    def _warn(self, key, message):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # ---------------------------------------------------------------------------------
    # Per step
    # ---------------------------------------------------------------------------------

    def _due(self, steps):
        # A measurement falls in the coming `steps` optimizer steps.
        return (-self._step) % self._every < steps

    def _start(self):
        # At the first batch rather than in on_train_begin: a callback listed
        # before this one (keras.callbacks.BackupAndRestore) may restore the
        # optimizer's step and MAT state in its own on_train_begin.
        self._started = True
        opt = self._opt
        self._step = host_int(opt.iterations) if opt is not None else 0
        self._first_step = self._step
        params = self.params or {}
        planned = (params.get("steps") or 0) * (params.get("epochs") or 0)
        if (
            opt is not None
            and isinstance(opt.policy, str)
            and opt.temporal == "training"
            and self.total_steps is None
            and 0 < planned <= self._step
        ):
            self._warn(
                "chunked",
                f"keras_mat: this fit ({planned} steps) continues a training already {self._step} steps "
                "long: the 'training' temporal reading counts quarters of this fit alone. When fit is "
                "called in pieces, pass MATCallback(total_steps=...) with the whole training's length.",
            )
        if opt is not None:
            self._apply_skip(self._steps_left())

    # Per-step bookkeeping happens at the next step's begin (or the epoch's
    # end), never in on_train_batch_end: a callback with a batch-end hook
    # makes Keras wait for every step's logs and loses JAX's asynchronous
    # dispatch.
    def on_train_batch_begin(self, batch, logs=None):
        now = time.perf_counter()
        if not self._started:
            self._start()
        else:
            self._account(now)
        spe = int(self.model.steps_per_execution or 1)
        if self._pending is not None:
            # A deferred warm-up measurement is applied when the next one is
            # due (or at the end of training): until then it changes nothing,
            # and applying it syncs the training state.
            if self._due(spe):
                self._finish_pending()
            elif self._pending[0].ident is None:
                self._start_pending()
        if self._measures and self._due(spe):
            self._measure_now()
        elif self._schedule:
            sync = lambda: backends.trainer().sync_state(self.model)  # noqa: E731
            if self._opt.follow_schedule(self._step, before_write=sync):
                self._apply_skip(1)
        cost = self._step_cost() if self._report is not None else None
        self._in_flight = (time.perf_counter(), spe, cost)

    def _account(self, now):
        # The call that began last has finished: count its steps and FLOPs,
        # and (when `now` is its successor's begin) time it.
        if self._in_flight is None:
            return
        begin, spe, cost = self._in_flight
        self._in_flight = None
        if cost is not None:
            self._flops["train"] += cost[0] * self._batch_size * spe
            self._flops["executed"] += cost[1] * self._batch_size * spe
        self._step += spe
        if now is None:
            return
        seconds = (now - begin) / spe
        if self._pending_compile is not None:
            # The first call of a new variant compiled it.
            key = self._pending_compile
            self._pending_compile = None
            base = self._step_seconds or 0.0
            self._compile_seconds.append((tuple(sorted(key)), max((seconds - base) * spe, 0.0)))
        elif self._first_call is None:
            self._first_call = seconds * spe  # compiles the step the first time it runs
        elif self._step_seconds is None:
            self._step_seconds = seconds
        else:
            self._step_seconds = 0.9 * self._step_seconds + 0.1 * seconds

    def _measure_now(self):
        model = self.model
        backends.trainer().sync_state(model)
        if self._defer_first_measurement():
            # The probe's first call compiles it (seconds). Measure on a
            # snapshot of these weights in a thread while training goes on;
            # the result is applied before the next measurement is due. A
            # warm-up measurement leaves every module active, so applying it
            # late changes nothing else.
            # Real copies: the train step donates (deletes) the state's buffers.
            values = [ops.copy(v) for v in self._probe._values()]
            holder = {}
            opt = self._opt
            # The policy's compile happens there too, off the training thread.
            warm = (
                opt._policy_warmer(self._period) if opt is not None and isinstance(opt.policy, str) else None
            )

            def work():
                try:
                    holder["lam"], holder["spectrum"] = _lambda_from(
                        self._probe, values, *self._probe_inputs, spectrum=self.spectrum
                    )
                    if warm is not None:
                        warm()
                except BaseException as err:  # re-raised on the training thread
                    holder["error"] = err

            thread = threading.Thread(target=work, name="keras_mat-probe", daemon=True)
            self._pending = (thread, holder, self._step)
            if opt is not None and self._compiles and self._first_call is None:
                # Started once the first step is traced and lowered, when its
                # compile leaves Python's lock free (JAX; elsewhere when the
                # trace reaches the optimizer): two threads tracing at once
                # run at half speed. On a small transformer (JAX) the probe
                # then traced in 0.09 s and the step lowered in 0.13 s, as in
                # a plain fit; started at the optimizer's trace, the step's
                # lowering had taken 0.17-0.35 s. (The next batch starts it
                # if no trace came.)
                opt._call_on_next_apply(self._start_at_compile)
            else:
                thread.start()
            return
        if self.spectrum is None:
            lam, spectrum = self._probe(*self._probe_inputs), None
        else:
            lam, spectrum = _lambda_from(
                self._probe, self._probe._values(), *self._probe_inputs, spectrum=self.spectrum
            )
        self._probe_ready = True
        self._apply_measurement(lam, self._step, spectrum)

    def _defer_first_measurement(self):
        if self._probe_ready or self.defer_first_measurement is False:
            return False
        if not backends.trainer().background_measurement(self.model):
            return False  # (distribution state is per thread)
        if not hasattr(self._probe, "_values") or not hasattr(self._probe, "_grams"):
            return False
        # Only a warm-up measurement (every module stays active, none stops)
        # may be applied late without changing the training.
        return self._opt is None or host_int(self._opt.num_measurements) < self._opt.warmup

    def _start_at_compile(self):
        # At the step's optimizer trace: start the thread once the step is
        # lowered and compiles (or now, where the backend cannot tell).
        if self._pending is None or self._pending[0].ident is not None:
            return
        if not backends.trainer().on_next_compile(self._start_if_waiting):
            self._pending[0].start()

    def _start_if_waiting(self):
        if self._pending is not None and self._pending[0].ident is None:
            self._pending[0].start()

    def _start_pending(self):
        # No step traced the optimizer (its step was compiled already), or
        # no compile followed its trace.
        thread = self._pending[0]
        if self._opt is not None:
            self._opt._cancel_on_next_apply(self._start_at_compile)
        backends.trainer().cancel_on_next_compile(self._start_if_waiting)
        if thread.ident is None:
            thread.start()

    def _finish_pending(self):
        thread, holder, step = self._pending
        if thread.ident is None:
            self._start_pending()
        thread.join()
        self._pending = None
        self._probe_ready = True
        if "error" in holder:
            raise holder["error"]
        backends.trainer().sync_state(self.model)
        self._apply_measurement(holder["lam"], step, holder.get("spectrum"))

    def _apply_measurement(self, lam, step, spectrum=None):
        opt = self._opt
        lam = {
            g.name: np.asarray(ops.convert_to_numpy(v), "float32") for g, v in zip(self._families_now, lam)
        }
        if self._report is not None:
            self._flops["probe"] += self._probe_cost
        finite = all(np.all(np.isfinite(v)) for v in lam.values())
        if not finite:
            self._warn(
                "nonfinite",
                "keras_mat: a measurement gave a non-finite lambda_max; it is skipped and the masks "
                "stay as they are (the next measurement takes its place).",
            )
            return
        if opt is None:
            self._emit(lam, None, None, step, spectrum)
            self._measurement += 1
            return
        opt.update_masks(lam, period=self._period)
        self._emit(lam, opt.masks, opt.frozen, step, spectrum)
        self._apply_skip(self._steps_left())

    def _steps_left(self):
        # Optimizer steps until the next measurement (or the end of training).
        until_next = self._every - (self._step % self._every) if self._measures else 1
        params = self.params or {}
        total = params.get("steps")
        epochs = params.get("epochs")
        if total and epochs:
            remaining = total * epochs - (self._step - self._first_step)
            until_next = min(until_next, max(remaining, 1))
        return until_next

    @property
    def _fractions(self):
        masks = self._active_host
        total = float(sum(g.num_modules for g in self._families_now))
        active = sum(float(np.sum(m)) for m in masks) / total
        frozen = sum(float(np.sum(f)) for f in self._frozen_host) / total
        return active, frozen

    def _step_cost(self):
        key = (self._skip_key, tuple(tuple(m.tolist()) for m in self._active_host))
        cost = self._cost.get(key)
        if cost is None:
            masks = {g.name: m for g, m in zip(self._families_now, self._active_host)}
            analytic = flops.step_flops(self._report, masks, frozen_prefix="auto")
            executed = flops.step_flops(
                self._report, self._executed_masks(self._skip_key), frozen_prefix="auto", granularity="family"
            )
            cost = self._cost[key] = (analytic, executed)
        return cost

    def _executed_masks(self, skipped_ids):
        out = {}
        for g in self._families_now:
            off = all(id(v) in skipped_ids for v in g.variables)
            out[g.name] = np.full((g.num_modules,), not off)
        return out

    def on_epoch_end(self, epoch, logs=None):
        self._account(None)
        pending = self._pending
        if pending is not None and pending[0].ident is not None and not pending[0].is_alive():
            # Done: counted in this epoch's logs (Keras has synced the state).
            self._finish_pending()
        if logs is not None and self._opt is not None:
            logs["mat_active"], logs["mat_frozen"] = self._fractions
        if self._report is None:
            return
        values = {
            "mat_gflop_trained": self.flops["train"] / 1e9,
            "mat_gflop_probes": self.flops["probe"] / 1e9,
            "mat_gflop_executed": (self.flops["executed"] + self.flops["probe"]) / 1e9,
        }
        if self.show_flops and logs is not None:
            logs.update(values)
            return
        history = getattr(self.model, "history", None)
        if isinstance(history, keras.callbacks.History):
            for key, value in values.items():
                history.history.setdefault(key, []).append(value)

    def on_train_end(self, logs=None):
        if self._pending is not None:
            self._finish_pending()
        self._probe.fast_compile = False  # other users of the cached probe get the fast-running one
        opt = self._opt
        if opt is not None and opt.skipped_variables:
            backends.trainer().sync_state(self.model)
            opt._set_skipped([])
            self._use_variant(frozenset())
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # Validation inside `fit` runs with every variable trainable (one compiled
    # test step whatever the skip set).
    def on_test_begin(self, logs=None):
        opt = self._opt
        if opt is not None and opt.skipped_variables:
            self._resume = frozenset(id(v) for v in opt.skipped_variables)
            backends.trainer().sync_state(self.model)
            opt._set_skipped([])
            self._use_variant(frozenset())
        else:
            self._resume = None

    def on_test_end(self, logs=None):
        resume = getattr(self, "_resume", None)
        if resume:
            variables = [v for v in self._opt._trainable_variables if id(v) in resume]
            self._opt._set_skipped(variables)
            self._use_variant(resume)
        self._resume = None

    # ---------------------------------------------------------------------------------
    # Skip set and compiled variants
    # ---------------------------------------------------------------------------------

    @property
    def _skip_key(self):
        return frozenset(id(v) for v in self._opt.skipped_variables) if self._opt is not None else frozenset()

    def _refresh_masks(self):
        opt = self._opt
        active = opt.masks
        frozen = opt.frozen
        self._active_host = [np.asarray(active[g.name], bool) for g in self._families_now]
        self._frozen_host = [np.asarray(frozen[g.name], bool) for g in self._families_now]

    def _ratio(self, key):
        # Predicted cost of a step with `key` skipped, relative to the full step.
        if not key:
            return 1.0
        if self._report is not None:
            full = flops.step_flops(self._report, None)
            part = flops.step_flops(
                self._report, self._executed_masks(key), frozen_prefix="auto", granularity="family"
            )
            return part / full if full else 1.0
        skipped = sum(int(np.prod(v.shape)) for v in self._opt._trainable_variables if id(v) in key)
        return 1.0 - skipped / max(self._total_params, 1.0) / 3.0  # a variable's dW is ~1/3 of its work

    def _use_variant(self, key):
        # Validation inside `fit` always runs with every variable trainable
        # (see on_test_begin), so the compiled test step never goes stale.
        if not self._compiles:
            return  # an eager step reads the `trainable` flags on every call
        fn = self._cache.get(key)
        if fn is not None:
            self.model.train_function = fn
            self._order.remove(key)
            self._order.append(key)
            return
        self.model.make_train_function(force=True)
        self._cache[key] = self.model.train_function
        self._order.append(key)
        self._pending_compile = key
        self._num_compiles += 1
        while len(self._cache) > self.max_cached_steps:
            oldest = next(k for k in self._order if k)  # the full step stays
            self._order.remove(oldest)
            self._cache.pop(oldest, None)

    def _apply_skip(self, steps_left):
        opt = self._opt
        self._refresh_masks()
        wanted = frozenset(id(v) for v in opt.skippable_variables())
        current = self._skip_key
        choice = wanted
        if wanted not in self._cache and self._compiles and self.recompile != "always":
            # The best cached variant still valid (a subset of what may be skipped).
            valid = [k for k in self._cache if k <= wanted]
            best = min(valid, key=self._ratio, default=frozenset())
            if self.recompile == "never":
                choice = best
            else:
                step = self._step_seconds
                compile_cost = max((c for _, c in self._compile_seconds), default=None)
                if compile_cost is None and step is not None and self._first_call is not None:
                    compile_cost = max(self._first_call - step, 0.0)  # the full step's own compile
                if step is None or compile_cost is None:
                    compile_cost = math.inf  # nothing measured yet: keep the cached steps
                saving = steps_left * (step or 0.0) * (self._ratio(best) - self._ratio(wanted))
                if saving <= compile_cost:
                    choice = best
        variables = [v for v in opt._trainable_variables if id(v) in choice]
        if choice != current:
            backends.trainer().sync_state(self.model)
            opt._set_skipped(variables)
            self._use_variant(choice)
            self._skip_history.append((self._step, tuple(v.path for v in variables)))

    # ---------------------------------------------------------------------------------
    # Records
    # ---------------------------------------------------------------------------------

    def _emit(self, lam, masks, frozen, step, spectrum=None):
        measurement = host_int(self._opt.num_measurements) - 1 if self._opt is not None else self._measurement
        new = []
        for f, (fam, values) in enumerate(lam.items()):
            for i, value in enumerate(np.asarray(values).reshape(-1)):
                new.append(
                    {
                        "step": step,
                        "measurement": measurement,
                        "family": fam,
                        "module": i,
                        "lambda_max": float(value),
                        "active": int(bool(masks[fam][i])) if masks is not None else 1,
                        "frozen": int(bool(frozen[fam][i])) if frozen is not None else 0,
                        "train_flops": self.flops["train"],
                        "total_flops": self.flops["train"] + self.flops["probe"],
                    }
                )
                if spectrum is not None:
                    new[-1]["eigenvalues"] = [float(e) for e in spectrum[f][0][i]]
                    new[-1]["effective_rank"] = float(spectrum[f][1][i])
        self.rows.extend(new)
        if self.csv_path:
            with open(self.csv_path, "a", newline="") as f:
                writer = csv.writer(f)
                for row in new:
                    writer.writerow([row[k] for k in _FIELDS])
        if self._writer is not None:
            import tensorflow as tf

            with self._writer.as_default(step=step):
                total = max(len(new), 1)
                tf.summary.scalar("mat/active_fraction", sum(r["active"] for r in new) / total)
                tf.summary.scalar("mat/frozen_fraction", sum(r["frozen"] for r in new) / total)
                for fam, values in lam.items():
                    tf.summary.histogram(f"mat/lambda_max/{fam}", np.asarray(values, np.float32))
            self._writer.flush()

    def step_cache_info(self):
        """How the skip set was applied in this callback's `fit` calls.

        Returns:
            A dict: `num_compiles` (train-step variants built for a skip
            set, the full step not counted), `compile_seconds` (list of
            `(skipped variable ids, seconds)` measured on each variant's
            first call), `cached` (skip sets with a cached step, as tuples of
            variable paths), `skip_history` (list of `(step, skipped variable
            paths)` at each change of the applied set).
        """
        paths = {id(v): v.path for v in (self._opt._trainable_variables if self._opt is not None else [])}
        return {
            "num_compiles": self._num_compiles,
            "compile_seconds": [(tuple(paths.get(i, i) for i in k), s) for k, s in self._compile_seconds],
            "cached": [tuple(sorted(paths.get(i, str(i)) for i in k)) for k in self._order],
            "skip_history": list(self._skip_history),
        }
