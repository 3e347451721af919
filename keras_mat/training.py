"""The MAT training step that `keras_mat.annotate` installs on a model.

Every `probe_every` optimizer steps the step measures lambda_max of every
module on the probe batch, runs the modular and temporal policies
(`keras_mat.policy`) and writes the new masks into the optimizer's MAT state;
then it runs the model's normal Keras train step, whose optimizer update is
masked by `ModularAdaptiveOptimizer`.

- JAX: inside the jitted pure `train_step(state, data)`, the probe and the
  policy sit under `ops.cond` and update the optimizer-variable state.
- TensorFlow: inside the `tf.function` train step, under `ops.cond`; the
  probe itself is a nested XLA-compiled function (graph-mode
  `vectorized_map` crashes on attention models with oneDNN on), except on
  pure CNNs, where graph mode is safe and XLA is slow.
- PyTorch: eager, a plain `if`.

The probe set (`probe="fixed"`, default) is taken once per `fit` call from the
first `probe_samples` samples of the *raw* training data (before Keras
shuffles), so it is the same on every call and after resuming; it enters the
compiled step as a constant. `probe="batch"` uses the head of the current
training batch instead.

With a plain optimizer (no `keras_mat.wrap`) the model is in
measurement-only mode: it trains normally and a callback records lambda_max
every `probe_every` steps into `model.keras_mat_history`.
"""

from __future__ import annotations

import contextlib
import sys
import types
import warnings

import keras
import numpy as np
from keras import ops, tree

from keras_mat import backends, policy

_DEFAULT_MEASURE_EVERY = 100
_DEFAULT_MEASURE_SAMPLES = 16


def find_mat_optimizer(optimizer):
    """The `ModularAdaptiveOptimizer` inside `optimizer` (through
    `LossScaleOptimizer` nesting), or `None`."""
    from keras_mat.optimizer import ModularAdaptiveOptimizer

    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, ModularAdaptiveOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
        seen += 1
    return None


# --------------------------------------------------------------------------------------
# Probe set
# --------------------------------------------------------------------------------------


def _take(data, n):
    return tree.map_structure(lambda t: np.asarray(ops.convert_to_numpy(t))[:n], data)


def _size(data):
    return int(np.shape(tree.flatten(data)[0])[0])


def _concat(parts):
    return tree.map_structure(lambda *xs: np.concatenate(xs, axis=0), *parts)


def capture_probe_set(x, y, n):
    """First `n` samples of the training data, as numpy, or `None` if the
    data cannot be peeked without consuming it (a Python generator)."""
    from keras.src.trainers.data_adapters import data_adapter_utils

    if x is None:
        return None
    # A tf.data.Dataset implies TensorFlow is imported: importing it only to
    # ask would cost seconds on the JAX and torch backends.
    tf = sys.modules.get("tensorflow")
    is_dataset = tf is not None and isinstance(x, tf.data.Dataset)
    if is_dataset or isinstance(x, keras.utils.PyDataset):
        xs, ys, have = [], [], 0
        batches = iter(x) if is_dataset else (x[i] for i in range(len(x)))
        for batch in batches:
            bx, by, _ = data_adapter_utils.unpack_x_y_sample_weight(batch)
            xs.append(_take(bx, n - have))
            ys.append(None if by is None else _take(by, n - have))
            have += _size(xs[-1])
            if have >= n:
                break
        if not xs:
            return None
        px = _concat(xs)
        py = None if ys[0] is None else _concat(ys)
        return px, py
    if isinstance(x, types.GeneratorType) or (hasattr(x, "__next__") and not hasattr(x, "shape")):
        return None
    return _take(x, n), (None if y is None else _take(y, n))


# --------------------------------------------------------------------------------------
# Runtime: per-fit configuration shared by the backend steps
# --------------------------------------------------------------------------------------


# MAT state the policy rewrites, in `policy.PolicyState` field order.
_KEYS = ("mask", "frozen", "lambda_init", "delta_prev", "delta_first")


class _Runtime:
    def __init__(self, model, mat, probe_data):
        from keras_mat import ntk

        self.model = model
        self.mat = mat
        self.families = list(mat.families)
        groups = self.families
        probe_x, probe_y = probe_data if probe_data is not None else (None, None)
        self.fixed = mat.probe == "fixed" and probe_x is not None
        self.probe_x = probe_x
        self.probe_y = probe_y
        if self.fixed:  # converted once; a constant of the compiled step
            self.fixed_probe = tree.map_structure(ops.convert_to_tensor, (probe_x, probe_y))
        sample = probe_x
        mode = mat.ntk_output
        if mode == "auto":
            if sample is None:
                raise ValueError(
                    "ntk_output='auto' needs a peekable training set to size the outputs; "
                    "pass ntk_output='logits'|'sum'|'loss' explicitly. Received: ntk_output='auto'"
                )
            mode = ntk.resolve_ntk_output(model, sample, "auto")
        self.mode = mode
        loss = None
        if mode == "loss":
            loss = model.loss
        self.probe = ntk.get_probe(model, groups, mode, loss=loss, x=sample)
        self.scopes = policy.scope_ids([g.kind for g in groups], mat.threshold_scope)
        self.alpha = float(mat.alpha)
        self.beta = float(mat.beta)
        self.warmup = int(mat.warmup)
        self.probe_every = int(mat.probe_every)
        self.samples = int(mat.probe_samples)
        self.active = mat.policy == "mat"
        self.schedule = not self.active and mat.policy is not None  # keras_mat.baselines
        self.state_vars = [mat.mat_state[g.name] for g in groups]
        # Where the MAT state sits in `model.optimizer.variables` (the JAX
        # step's optimizer state and the dispatcher read it by position).
        index = {id(v): i for i, v in enumerate(model.optimizer.variables)}
        self.positions = {k: [index[id(s[k])] for s in self.state_vars] for k in _KEYS + ("lambda_max",)}
        self.iterations_position = index[id(mat.iterations)]
        self.measurements_position = index[id(mat.num_measurements)]
        self.total_modules = float(sum(g.num_modules for g in groups))
        self.config = self._config(mat)
        # Weight-gradient skipping (see _Dispatcher): indices of trainable
        # variables whose every module is off, per family.
        index = {id(v): i for i, v in enumerate(model.trainable_variables)}
        self.family_vars = [tuple(index[id(v)] for v in g.variables) for g in groups]
        self.skip = ()  # the skip set the step being traced/called uses
        self.next_skip = ()  # the skip set for the coming non-measurement steps
        self.step = None
        self.num_compiles = 0
        self.skip_history = []
        self.traces = {}  # skip set -> times its step was traced (JAX/TF) or run (torch)
        # Analytic FLOPs (keras_mat.flops), accumulated host-side per step.
        self.flops_report = None
        self.batch_size = None
        self.active_np = None
        self.cum_train_flops = 0.0
        self.cum_probe_flops = 0.0
        self.cum_executed_flops = 0.0
        self._step_cost = {}
        self.probe_cost = 0.0

    def setup_flops(self, batch_size):
        from keras_mat import flops

        try:
            shapes = None
            if self.probe_x is not None:
                shapes = tree.map_structure(lambda a: tuple(np.shape(a)[1:]), self.probe_x)
            self.flops_report = flops.count_flops(self.model, 1, input_shapes=shapes, groups=self.families)
        except Exception as err:  # FLOPs are reporting only: never block training
            warnings.warn(f"keras_mat: FLOPs accounting is off for this model ({err})", stacklevel=3)
            self.flops_report = None
            return
        self.batch_size = batch_size
        rows = self.probe._rows_per_sample or 1
        self.probe_cost = flops.probe_flops(self.flops_report, self.samples, rows)

    def step_cost(self, skipping=True):
        """Training FLOPs of one step with the current masks: forward, the
        activation gradients down to the lowest trained op, and the weight
        gradients of active modules and always-trained variables.

        Returns `(analytic, executed)`: the weight gradients of active
        *modules* (MAT's accounting), and what the step computes: a
        variable's whole weight gradient while any of its modules is active
        (masks within a variable save no work), everything when `skipping`
        is off (measurement steps, `skip_gradients=False`).
        """
        from keras_mat import flops

        key = (tuple(tuple(bool(b) for b in m) for m in self.active_np), skipping)
        cost = self._step_cost.get(key)
        if cost is None:
            masks = {g.name: np.asarray(m, bool) for g, m in zip(self.families, self.active_np)}
            analytic = flops.step_flops(self.flops_report, masks, frozen_prefix="auto")
            if skipping:
                executed = flops.step_flops(
                    self.flops_report, masks, frozen_prefix="auto", granularity="family"
                )
            else:
                executed = flops.step_flops(self.flops_report, None)
            cost = (analytic * self.batch_size, executed * self.batch_size)
            self._step_cost[key] = cost
        return cost

    def skip_from_masks(self, masks, frozen):
        skip = []
        for f, (m, z) in enumerate(zip(masks, frozen)):
            if not np.any(np.asarray(m) * (1.0 - np.asarray(z)) > 0.5):
                skip.extend(self.family_vars[f])
        return tuple(sorted(skip))

    def _config(self, mat):
        return (
            id(mat),
            mat.alpha,
            mat.beta,
            mat.probe_every,
            mat.probe_samples,
            mat.warmup,
            mat.ntk_output,
            mat.threshold_scope,
            mat.policy,
            mat.probe,
        )

    def matches(self, mat, probe_data):
        if self._config(mat) != self.config:
            return False
        if (probe_data is None) != (self.probe_x is None):
            return False
        if probe_data is None:
            return True
        if (self.probe_y is None) != (probe_data[1] is None):
            return False
        mine = tree.flatten((self.probe_x, self.probe_y))
        theirs = tree.flatten(probe_data)
        return len(mine) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(mine, theirs))

    def probe_batch(self, data):
        from keras.src.trainers.data_adapters import data_adapter_utils

        if self.fixed:
            return self.fixed_probe
        x, y, _ = data_adapter_utils.unpack_x_y_sample_weight(data)
        n = tree.flatten(x)[0].shape[0]
        if n is not None and n < self.samples:
            raise ValueError(
                f"probe='batch' needs training batches of at least probe_samples={self.samples} "
                f"samples. Received: batch size {n}"
            )
        px = tree.map_structure(lambda t: t[: self.samples], x)
        py = None if y is None else tree.map_structure(lambda t: t[: self.samples], y)
        return px, py

    def policy_step(self, lam, *state):
        """Pure: new values for the MAT state from one measurement."""
        return _policy_step(self.mat, self.scopes, lam, *state)

    def with_fractions(self, logs, masks, frozen):
        """`logs` plus the fractions of modules updated and stopped (progress
        bar and History)."""
        # `> 0.5`: a schedule may write mask values other than 1 (gradient scales).
        active = sum(
            ops.sum(ops.cast(ops.greater(m, 0.5), "float32") * (1.0 - ops.cast(f, "float32")))
            for m, f in zip(masks, frozen)
        )
        stopped = sum(ops.sum(ops.cast(f, "float32")) for f in frozen)
        logs = dict(logs)
        logs["mat_active"] = active / self.total_modules
        logs["mat_frozen"] = stopped / self.total_modules
        return logs


# --------------------------------------------------------------------------------------
# Backend train steps
# --------------------------------------------------------------------------------------


def _jax_train_step(self, state, data):
    rt = self._keras_mat_runtime
    if rt is None:
        return type(self).train_step(self, state, data)
    tv, ntv, ov, mv = state
    pos = rt.positions

    def measure(ov):
        px, py = rt.probe_batch(data)
        lam = rt.probe.from_values(list(tv), list(ntv), px, py)
        read = {k: [ov[i] for i in pos[k]] for k in _KEYS}
        new, lam = rt.policy_step(lam, *(read[k] for k in _KEYS), ov[rt.measurements_position])
        ov = list(ov)
        for key, values in zip(_KEYS + ("lambda_max",), (*new[:5], lam)):
            for i, val in zip(pos[key], values):
                ov[i] = ops.cast(val, ov[i].dtype)
        n = rt.measurements_position
        ov[n] = ops.cast(new.measurement, ov[n].dtype)
        return ov

    if rt.active:
        do = ops.equal(ops.mod(ov[rt.iterations_position], rt.probe_every), 0)
        ov = ops.cond(do, lambda: measure(ov), lambda: list(ov))
    if rt.skip:
        logs, state = _jax_skipping_step(self, (tv, ntv, ov, mv), data, set(rt.skip))
    else:
        logs, state = type(self).train_step(self, (tv, ntv, ov, mv), data)
    ov = state[2]
    return rt.with_fractions(logs, [ov[i] for i in pos["mask"]], [ov[i] for i in pos["frozen"]]), state


def _policy_step(mat, scopes, lam, masks, frozen, lambda_init, delta_prev, delta_first, measurement):
    # Pure: new values for the MAT state from one measurement.
    state = policy.PolicyState(
        masks=list(masks),
        frozen=list(frozen),
        lambda_init=list(lambda_init),
        delta_prev=list(delta_prev),
        delta_first=list(delta_first),
        measurement=ops.cast(measurement, "int32"),
    )
    lam = [ops.cast(v, "float32") for v in lam]
    new = policy.policy_update(lam, state, mat.alpha, mat.beta, scopes, warmup=mat.warmup)
    return new, lam


def _write_measurement(mat, scopes, lam):
    # Stateful (TF, torch, custom loops): one measurement into the MAT state.
    sv = [mat.mat_state[g.name] for g in mat.families]
    new, lam = _policy_step(
        mat, scopes, lam, *([s[k].value for s in sv] for k in _KEYS), mat.num_measurements.value
    )
    for key, values in zip(_KEYS + ("lambda_max",), (*new[:5], lam)):
        for s, val in zip(sv, values):
            s[key].assign(val)
    mat.num_measurements.assign(ops.cast(new.measurement, mat.num_measurements.dtype))


def _stateful_measure(rt, data):
    px, py = rt.probe_batch(data)
    _write_measurement(rt.mat, rt.scopes, rt.probe(px, py))


def apply_measurement(optimizer, lambda_max):
    """Runs one MAT measurement on a wrapped optimizer from given lambda_max.

    What the MAT training step does at a measurement, for custom training
    loops: the temporal policy, then the modular policy, then the new masks,
    frozen set and policy state are written into the optimizer's MAT state
    and the measurement counter advances. Under data parallelism, pass the
    same `lambda_max` on every replica (measured on the same probe set and
    all-reduced, or measured on one rank and broadcast): the policy is
    deterministic, so every replica then holds the same masks.

    Args:
        optimizer: A built `ModularAdaptiveOptimizer` (from `keras_mat.wrap`,
            possibly inside a `LossScaleOptimizer`) with `policy="mat"`.
        lambda_max: A dict: family name -> array-like of shape
            `(num_modules,)`, e.g. what `keras_mat.module_lambda_max`
            returns, for every family of the optimizer.

    Returns:
        The effective masks after the update (`optimizer.masks`): family
        name -> boolean numpy array.

    Raises:
        ValueError: if `optimizer` is not a built MAT optimizer with
            `policy="mat"`, or `lambda_max` misses a family or has a wrong
            shape.

    Example:

    >>> lam = keras_mat.module_lambda_max(model, x_probe)  # doctest: +SKIP
    >>> masks = keras_mat.apply_measurement(model.optimizer, lam)  # doctest: +SKIP
    """
    mat = find_mat_optimizer(optimizer)
    if mat is None or not mat.built or mat.policy != "mat":
        state = "not a keras_mat optimizer" if mat is None else f"built={mat.built}, policy={mat.policy!r}"
        raise ValueError(
            "`optimizer` must be a built keras_mat.wrap(...) optimizer with policy='mat' (build it "
            f"with optimizer.build(model.trainable_variables)). Received: optimizer with {state}"
        )
    if not isinstance(lambda_max, dict) or set(lambda_max) != set(mat.mat_state):
        got = sorted(lambda_max) if isinstance(lambda_max, dict) else type(lambda_max).__name__
        raise ValueError(
            f"`lambda_max` must be a dict with one entry per module family {sorted(mat.mat_state)}. "
            f"Received: lambda_max keys={got}"
        )
    lam = []
    for g in mat.families:
        value = np.asarray(ops.convert_to_numpy(lambda_max[g.name]), dtype="float32")
        if value.shape != (g.num_modules,):
            raise ValueError(
                f"`lambda_max[{g.name!r}]` must have shape ({g.num_modules},). Received: shape {value.shape}"
            )
        lam.append(ops.convert_to_tensor(value))
    scopes = policy.scope_ids([g.kind for g in mat.families], mat.threshold_scope)
    _write_measurement(mat, scopes, lam)
    return mat.masks


def _stateful_train_step(self, data, measure_now, skipping_step):
    # TF and torch: the MAT state lives in the variables. `_fit` has built
    # the optimizer (and so the MAT state) before the first step.
    rt = self._keras_mat_runtime
    if rt is None:
        return type(self).train_step(self, data)
    if rt.active:
        measure_now(rt, data)
    if rt.skip:
        logs = skipping_step(self, data, set(rt.skip))
    else:
        logs = type(self).train_step(self, data)
    sv = rt.state_vars
    return rt.with_fractions(logs, [s["mask"].value for s in sv], [s["frozen"].value for s in sv])


def _tf_measure_now(rt, data):
    import tensorflow as tf

    def zero():
        return ops.convert_to_tensor(0)

    def measure():
        _stateful_measure(rt, data)
        return zero()

    do = ops.equal(ops.mod(rt.mat.iterations.value, rt.probe_every), 0)
    replica = tf.distribute.get_replica_context()
    if replica is None or replica.num_replicas_in_sync == 1:
        ops.cond(do, measure, zero)
        return
    # MirroredStrategy: every replica probes the same samples (a batch probe
    # is gathered from all replicas first) and lambda is averaged across
    # replicas before the policy, so masks agree on every replica even where
    # kernels are not bitwise deterministic. Collectives cannot sit inside
    # tf.cond here (merge_call), so they run on every step: a few floats,
    # plus the batch with probe="batch".
    if rt.fixed:
        px, py = rt.fixed_probe
    else:
        from keras.src.trainers.data_adapters import data_adapter_utils

        def head(t):  # the first probe_samples samples of the global batch
            return tf.ensure_shape(replica.all_gather(t, 0)[: rt.samples], (rt.samples,) + tuple(t.shape[1:]))

        x, y, _ = data_adapter_utils.unpack_x_y_sample_weight(data)
        px, py = tree.map_structure(head, x), (None if y is None else tree.map_structure(head, y))
    current = [ops.convert_to_tensor(s["lambda_max"].value) for s in rt.state_vars]
    lam = ops.cond(do, lambda: [ops.cast(v, "float32") for v in rt.probe(px, py)], lambda: current)
    lam = replica.all_reduce(tf.distribute.ReduceOp.MEAN, lam)

    def write():
        _write_measurement(rt.mat, rt.scopes, lam)
        return zero()

    ops.cond(do, write, zero)


def _torch_measure_now(rt, data):
    if int(ops.convert_to_numpy(rt.mat.iterations.value)) % rt.probe_every == 0:
        _stateful_measure(rt, data)


def _tf_train_step(self, data):
    return _stateful_train_step(self, data, _tf_measure_now, _tf_skipping_step)


def _torch_train_step(self, data):
    return _stateful_train_step(self, data, _torch_measure_now, _torch_skipping_step)


def _full_gradients(weights, skip, active_grads, zeros_like):
    """Gradients for every trainable variable (JAX's `stateless_apply` takes
    them all): the computed ones in order, `None` for the skipped, which the
    MAT optimizer then leaves out of the update (no optimizer work for a
    fully masked variable). Zeros for all if every variable is skipped (the
    inner optimizer needs at least one gradient; the masks restore them)."""
    if len(skip) >= len(weights):
        return [zeros_like(w) for w in weights]
    active = iter(active_grads)
    return [None if i in skip else next(active) for i in range(len(weights))]


def _differentiated(weights, skip):
    """The variables a skipping step (TF, torch) differentiates and hands to
    the optimizer, a subset of `weights`: a skipped one costs no weight
    gradient and no update. All of them when every one is skipped, so that
    the step still counts as an optimizer iteration (they then get zero
    gradients, and the masks keep them as they are)."""
    live = [w for i, w in enumerate(weights) if i not in skip]
    return live or list(weights)


def _forward_and_loss(self, x, y, sample_weight, batch_size, unscale=lambda loss: loss):
    # The loss part of Keras's TF and torch train steps, shared by our
    # skipping variants of both.
    y_pred = self(x, training=True) if self._call_has_training_arg else self(x)
    loss = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
    self._loss_tracker.update_state(unscale(loss), sample_weight=batch_size)
    return y_pred, self.optimizer.scale_loss(loss)


def _jax_skipping_step(self, state, data, skip):
    # Keras's JAX train step, differentiating only the active variables: the
    # skipped ones are not differentiated, so XLA drops their weight
    # gradients and, below a frozen prefix, the whole backward pass.
    import jax
    from keras.src.trainers.data_adapters import data_adapter_utils

    tv, ntv, ov, mv = state
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    active = [i for i in range(len(tv)) if i not in skip]

    def loss_fn(active_values):
        values = list(tv)
        for i, val in zip(active, active_values):
            values[i] = val
        return self.compute_loss_and_updates(
            values, ntv, mv, x, y, sample_weight, training=True, optimizer_variables=ov
        )

    (_, aux), active_grads = jax.value_and_grad(loss_fn, has_aux=True)([tv[i] for i in active])
    unscaled_loss, y_pred, ntv, mv = aux
    grads = _full_gradients(tv, skip, active_grads, jax.numpy.zeros_like)
    tv, ov = self.optimizer.stateless_apply(ov, grads, tv)
    logs, mv = self._update_metrics_variables(mv, unscaled_loss, x, y, y_pred, sample_weight)
    return logs, (tv, ntv, ov, mv)


def _tf_skipping_step(self, data, skip):
    import tensorflow as tf
    from keras.src.losses import loss as loss_module
    from keras.src.trainers.data_adapters import data_adapter_utils

    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    weights = self.trainable_weights
    live = _differentiated(weights, skip)
    all_off = len(skip) >= len(weights)
    # Only those variables are watched: nothing is recorded for the
    # backward pass of a frozen prefix, and no skipped dW is computed.
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        for w in [] if all_off else live:
            tape.watch(w.value)
        batch_size = tf.shape(next(i for i in tree.flatten(x) if i is not None))[0]
        y_pred, loss = _forward_and_loss(
            self, x, y, sample_weight, batch_size, loss_module.unscale_loss_for_distribution
        )
    if all_off:
        grads = [tf.zeros_like(w.value) for w in live]
    else:  # a variable the loss does not reach keeps None (Keras's own step skips it too)
        grads = tape.gradient(loss, [w.value for w in live])
    self.optimizer.apply(grads, live)  # the MAT optimizer takes a subset
    return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _torch_skipping_step(self, data, skip):
    import torch
    from keras.src.trainers.data_adapters import data_adapter_utils

    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    weights = self.trainable_weights[:]
    skipped = [weights[i].value for i in skip]
    for p in skipped:
        p.requires_grad_(False)  # autograd records nothing for them
    try:
        self.zero_grad()
        batch_size = next(i for i in tree.flatten(x) if i is not None).shape[0]
        y_pred, loss = _forward_and_loss(self, x, y, sample_weight, batch_size)
        if loss.requires_grad:
            loss.backward()
    finally:
        for p in skipped:
            p.requires_grad_(True)
    live = _differentiated(weights, skip)
    # A variable the loss does not reach (or a skipped one, when all are) has no .grad: zeros,
    # as in Keras's step.
    grads = [torch.zeros_like(w.value) if w.value.grad is None else w.value.grad for w in live]
    with torch.no_grad():
        self.optimizer.apply(grads, live)  # the MAT optimizer takes a subset
    return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


class _Dispatcher:
    """`model.train_function` while MAT trains: one compiled step per set of
    fully-off variables (skip set), cached and bounded.

    Masks only change at measurement steps, so the skip set is read back
    (a few bytes) only after those. A measurement step always runs the
    no-skip step: a family that the measurement turns on must get its real
    gradient in that very step.
    """

    def __init__(self, model, rt, max_cached=8):
        self.model = model
        self.rt = rt
        self.max_cached = max_cached
        self.cache = {}
        self.order = []
        self.reset_schedule()

    def _keyed_step(self, installed, key):
        # A distinct function object per skip set: JAX caches traces by the
        # function's identity, so jit-wrapping the same bound method again
        # would silently reuse the first variant's trace.
        rt = self.rt

        def step(*args):
            rt.skip = key
            rt.traces[key] = rt.traces.get(key, 0) + 1  # Python: runs per trace (JAX/TF)
            return installed(*args)

        return step

    def _function(self, key, args=()):
        fn = self.cache.get(key)
        if fn is None:
            model = self.model
            installed = model.train_step
            object.__setattr__(model, "train_step", self._keyed_step(installed, key))
            if backends.name() == "jax" and keras.distribution.distribution() is not None:
                # Keras pins the step's output shardings to the variables'
                # shardings, but inside `fit` the variables are purged: take
                # them from the state this step receives (same structure).
                spec = tuple([a.sharding for a in part] for part in args[0])
                object.__setattr__(model, "_get_state_sharding_spec", lambda: spec)
            try:
                model.train_function = None
                type(model).make_train_function(model, force=True)
                fn = model.train_function
            finally:
                object.__setattr__(model, "train_step", installed)
                model.__dict__.pop("_get_state_sharding_spec", None)
                model.train_function = self
            self.cache[key] = fn
            self.rt.num_compiles += 1
            while len(self.cache) > self.max_cached:
                oldest = self.order.pop(0)
                self.cache.pop(oldest, None)
        if key in self.order:
            self.order.remove(key)
        self.order.append(key)
        return fn

    def reset_schedule(self):
        self._written = None  # masks last written by a schedule (host copy)
        self._frozen = None

    def _apply_schedule(self, args):
        # A mask schedule (keras_mat.baselines) decides on the host: when its
        # masks change, write them into the optimizer's mask state (on JAX,
        # into the state passed to the step) and derive the skip set and the
        # FLOPs from them. No probe or MAT policy runs (rt.active is False).
        rt = self.rt
        masks = rt.mat.policy.masks(rt.step, [(g.name, g.num_modules) for g in rt.families])
        written = self._written
        if written is not None and all(np.array_equal(a, b) for a, b in zip(masks, written)):
            return args
        if backends.name() == "jax":
            state, *rest = args
            ov = list(state[2])
            for i, m in zip(rt.positions["mask"], masks):
                ov[i] = ops.convert_to_tensor(m, dtype=ov[i].dtype)
            if self._frozen is None:
                self._frozen = [np.asarray(ov[i]) for i in rt.positions["frozen"]]
            args = ((state[0], state[1], ov, state[3]), *rest)
        else:
            for s, m in zip(rt.state_vars, masks):
                s["mask"].assign(m)
            if self._frozen is None:
                self._frozen = [ops.convert_to_numpy(s["frozen"].value) for s in rt.state_vars]
        self._written = masks
        if getattr(rt.mat, "skip_gradients", True):
            rt.next_skip = rt.skip_from_masks(masks, self._frozen)
            rt.skip_history.append((rt.step, rt.next_skip))  # as after a measurement
        rt.active_np = [(np.asarray(m) > 0.5) * (1.0 - np.asarray(z)) for m, z in zip(masks, self._frozen)]
        return args

    def __call__(self, *args):
        rt = self.rt
        if rt.schedule:
            args = self._apply_schedule(args)
        measuring = rt.active and rt.step % rt.probe_every == 0
        key = () if measuring else rt.next_skip
        fn = self._function(key, args)
        rt.skip = key  # torch's step looks up train_step per call; JAX/TF pinned it at trace
        out = fn(*args)
        rt.step += 1
        if measuring:
            rt.next_skip = self._read_skip(out)
            rt.skip_history.append((rt.step - 1, rt.next_skip))
            rt.cum_probe_flops += rt.probe_cost
        if rt.flops_report is not None:
            skipping = not measuring and getattr(rt.mat, "skip_gradients", True)
            analytic, executed = rt.step_cost(skipping)
            rt.cum_train_flops += analytic
            rt.cum_executed_flops += executed
            logs = out[0] if backends.name() == "jax" else out
            logs["mat_train_flops"] = rt.cum_train_flops
            logs["mat_total_flops"] = rt.cum_train_flops + rt.cum_probe_flops
            logs["mat_executed_flops"] = rt.cum_executed_flops + rt.cum_probe_flops
        return out

    def _read_skip(self, out):
        rt = self.rt
        if backends.name() == "jax":
            ov = out[1][2]
            masks = [np.asarray(ov[i]) for i in rt.positions["mask"]]
            frozen = [np.asarray(ov[i]) for i in rt.positions["frozen"]]
        else:
            masks = [ops.convert_to_numpy(s["mask"].value) for s in rt.state_vars]
            frozen = [ops.convert_to_numpy(s["frozen"].value) for s in rt.state_vars]
        rt.active_np = [np.asarray(m) * (1.0 - np.asarray(z)) for m, z in zip(masks, frozen)]
        return rt.skip_from_masks(masks, frozen)


def step_cache_info(model):
    """How the MAT step skipped work in the last `fit`.

    Returns:
        A dict: `num_compiles` (compiled step variants built, one per distinct
        skip set; 0 on torch's eager step would still count variants),
        `cached` (skip sets currently cached), `skip_history` (list of
        `(step, skipped trainable-variable indices)` after each measurement,
        or each change of a mask schedule's masks),
        `traces` (skip set -> number of times its step was traced on JAX/TF,
        or run on torch).
    """
    rt = getattr(model, "_keras_mat_runtime", None)
    if rt is None:
        return {"num_compiles": 0, "cached": [], "skip_history": []}
    fn = model.train_function
    cached = list(fn.cache) if isinstance(fn, _Dispatcher) else []
    return {
        "num_compiles": rt.num_compiles,
        "cached": cached,
        "skip_history": list(rt.skip_history),
        "traces": dict(rt.traces),
    }


# --------------------------------------------------------------------------------------
# Measurement-only mode
# --------------------------------------------------------------------------------------


class _MeasureCallback(keras.callbacks.Callback):
    """Records lambda_max every `probe_every` steps (plain optimizer)."""

    def __init__(self, probe_data, every, ntk_output="auto"):
        super().__init__()
        self.probe_data = probe_data
        self.every = every
        self.ntk_output = ntk_output
        self.step = 0

    def on_train_batch_begin(self, batch, logs=None):
        if self.step % self.every == 0:
            from keras_mat.ntk import module_lambda_max

            if backends.name() == "jax":
                self.model.jax_state_sync()
            px, py = self.probe_data
            mode = self.ntk_output
            lam = module_lambda_max(self.model, px, y=py, ntk_output=mode)
            self.model.keras_mat_history.append({"step": self.step, "lambda_max": lam})
        self.step += 1


# --------------------------------------------------------------------------------------
# Installation
# --------------------------------------------------------------------------------------


def _batch_size_of(x, kwargs, probe_data):
    # Nominal batch size for FLOPs: fit's batch_size for arrays (default 32),
    # else the first batch of a dataset (a short last batch is over-counted).
    if kwargs.get("batch_size"):
        return int(kwargs["batch_size"])
    tf = sys.modules.get("tensorflow")  # (see capture_probe_set)
    if tf is not None and isinstance(x, tf.data.Dataset):
        first = next(iter(x))
        return int(np.shape(tree.flatten(first)[0])[0])
    if isinstance(x, keras.utils.PyDataset):
        return int(np.shape(tree.flatten(x[0])[0])[0])
    if probe_data is not None and isinstance(x, (np.ndarray, dict, list, tuple)):
        return min(32, _size(x))
    return 32


def _check_distribution(model):
    """Raises where MAT under a distribution engine would not keep the
    replicas' masks identical (see README, "Scaling out")."""
    name = backends.name()
    if name == "tensorflow":
        import tensorflow as tf

        strategy = model.distribute_strategy
        if strategy.num_replicas_in_sync > 1 and not isinstance(strategy, tf.distribute.MirroredStrategy):
            raise NotImplementedError(
                "keras_mat's MAT step supports tf.distribute.MirroredStrategy (one machine, several "
                f"devices) and single-replica strategies. Received: {type(strategy).__name__} with "
                f"{strategy.num_replicas_in_sync} replicas"
            )
    elif name == "jax":
        import jax

        if jax.process_count() > 1:
            raise NotImplementedError(
                "keras_mat's MAT step runs in one JAX process (keras.distribution over its local "
                "devices); multi-process training would probe a different fixed probe set in "
                f"every process. Received: jax.process_count()={jax.process_count()}"
            )
    elif name == "torch":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise NotImplementedError(
                "Keras's `fit` on torch does not synchronize replicas, so each rank would train "
                "(and mask) its own copy. Use a custom loop with keras_mat.apply_measurement "
                '(README, "Scaling out"; examples/torch_ddp.py). Received: torch.distributed '
                f"world_size={dist.get_world_size()}"
            )


def _fit(self, x=None, y=None, *args, **kwargs):
    mat = find_mat_optimizer(getattr(self, "optimizer", None))
    callbacks = list(kwargs.pop("callbacks", None) or [])
    if mat is None:
        # Measurement-only mode.
        probe_data = capture_probe_set(x, y, _DEFAULT_MEASURE_SAMPLES)
        if probe_data is not None:
            callbacks.append(_MeasureCallback(probe_data, _DEFAULT_MEASURE_EVERY))
        object.__setattr__(self, "_keras_mat_runtime", None)
        return type(self).fit(self, x, y, *args, callbacks=callbacks, **kwargs)
    if getattr(self, "_keras_mat_enabled", False) is not True:
        raise ValueError(
            "The model was compiled with a keras_mat optimizer but never annotated: call "
            "`keras_mat.annotate(model)` before `fit`. Received: model not annotated"
        )
    _check_distribution(self)
    if not mat.built:
        # TF: under the model's tf.distribute strategy, as Keras builds it.
        tf_strategy = backends.name() == "tensorflow"
        with self.distribute_strategy.scope() if tf_strategy else contextlib.nullcontext():
            self.optimizer.build(self.trainable_variables)
    if not mat.families:
        raise ValueError(
            "keras_mat.wrap(...) found no module family among the model's trainable variables: "
            "call keras_mat.annotate(model) before compile(). Received: families=[]"
        )
    # Peeked even with probe="batch": ntk_output="auto" needs a sample to size the outputs.
    probe_data = capture_probe_set(x, y, mat.probe_samples)
    if mat.probe == "fixed" and probe_data is None:
        warnings.warn(
            "keras_mat: the training data cannot be peeked (a Python generator); "
            "probing on the current batch instead (probe='batch').",
            stacklevel=2,
        )
    previous = getattr(self, "_keras_mat_runtime", None)
    if previous is not None and previous.matches(mat, probe_data):
        runtime = previous  # same probe set and options: keep the compiled step
    else:
        runtime = _Runtime(self, mat, probe_data)
        # The probe set is a constant of the compiled step: retrace only when
        # it (or the MAT configuration) changed.
        self.train_function = None
    object.__setattr__(self, "_keras_mat_runtime", runtime)
    runtime.step = int(mat.iterations.numpy())  # (convert_to_numpy fails on a TF mirrored int in scope)
    if runtime.schedule and self.steps_per_execution != 1:
        raise ValueError(
            "A mask schedule (keras_mat.baselines) sets the masks before every step: compile "
            f"with steps_per_execution=1. Received: steps_per_execution={self.steps_per_execution}"
        )
    # With policy=None the masks are the user's: the skip set is taken from
    # them here, at the start of fit (change masks between fits, not inside).
    if self.steps_per_execution == 1 and (getattr(mat, "skip_gradients", True) or runtime.schedule):
        masks = [ops.convert_to_numpy(s["mask"].value) for s in runtime.state_vars]
        frozen = [ops.convert_to_numpy(s["frozen"].value) for s in runtime.state_vars]
        runtime.next_skip = (
            runtime.skip_from_masks(masks, frozen) if getattr(mat, "skip_gradients", True) else ()
        )
        runtime.active_np = [np.asarray(m) * (1.0 - np.asarray(z)) for m, z in zip(masks, frozen)]
        if runtime.flops_report is None and getattr(mat, "count_flops", True):
            runtime.setup_flops(_batch_size_of(x, kwargs, probe_data))
        if not isinstance(self.train_function, _Dispatcher) or self.train_function.rt is not runtime:
            dispatcher = _Dispatcher(self, runtime)
            if self.train_function is not None:
                # Reuse the step compiled by the previous fit for its skip set.
                dispatcher.cache[runtime.skip] = self.train_function
                dispatcher.order.append(runtime.skip)
            self.train_function = dispatcher
        self.train_function.reset_schedule()
    return type(self).fit(self, x, y, *args, callbacks=callbacks, **kwargs)


def install(model):
    """Installs the MAT train step and `fit` on this model instance."""
    step = {"jax": _jax_train_step, "tensorflow": _tf_train_step, "torch": _torch_train_step}[backends.name()]
    object.__setattr__(model, "train_step", types.MethodType(step, model))
    object.__setattr__(model, "fit", types.MethodType(_fit, model))
    object.__setattr__(model, "_keras_mat_enabled", True)
    if not hasattr(model, "_keras_mat_runtime"):
        object.__setattr__(model, "_keras_mat_runtime", None)
    if not hasattr(model, "keras_mat_history"):
        object.__setattr__(model, "keras_mat_history", [])
    return model
