"""MAT inside `fit` (`MATCallback`), `train_on_batch` and custom loops, on every backend."""

import os
import threading

import keras
import numpy as np
import pytest

import keras_mat
from keras_mat.callbacks import MATCallback, plot_lambda
from keras_mat.optimizer import wrap
from keras_mat.reference import module_selector
from keras_mat.training import find_mat_optimizer
from tests import models
from tests.cross_backend import only_in_jax_session, run_in_every_backend

BACKEND = keras.config.backend()
JIT = [False] if BACKEND == "torch" else [False, True]


def _data(model, n=64, classes=3, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, *model.inputs[0].shape[1:]).astype("float32")
    return x, rng.randint(0, classes, n)


def _sync(model):
    if BACKEND == "jax":
        model.jax_state_sync()


class _Snapshots(keras.callbacks.Callback):
    """Weights and effective masks at the end of every step."""

    def __init__(self):
        super().__init__()
        self.weights, self.active = [], []

    def on_train_begin(self, logs=None):
        # A fixed list: `trainable_variables` shrinks while MAT skips variables.
        self.variables = list(find_mat_optimizer(self.model.optimizer)._trainable_variables)
        self.weights.append([np.array(keras.ops.convert_to_numpy(v.value)) for v in self.variables])

    def on_train_batch_end(self, batch, logs=None):
        _sync(self.model)
        opt = find_mat_optimizer(self.model.optimizer)
        self.weights.append([np.array(keras.ops.convert_to_numpy(v.value)) for v in self.variables])
        self.active.append({k: v.copy() for k, v in opt.masks.items()})


def _compile(model, jit, **mat):
    opts = dict(alpha=0.6, beta=0.05, probe_every=2, probe_samples=4, warmup=1)
    opts.update(mat)
    model.compile(
        optimizer=wrap(keras.optimizers.Adam(1e-2), **opts),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    return find_mat_optimizer(model.optimizer)


def _module_slices(model, step_weights, group, module):
    index = {id(v): i for i, v in enumerate(find_mat_optimizer(model.optimizer)._trainable_variables)}
    out = []
    for v, axis in zip(group.variables, group.axes):
        sel = module_selector(tuple(v.shape), axis, group.num_modules, module)
        out.append(step_weights[index[id(v)]][sel])
    return out


def _check_masked_modules_unchanged(model, snaps):
    moved = 0
    for t, active in enumerate(snaps.active):
        before, after = snaps.weights[t], snaps.weights[t + 1]
        for g in keras_mat.get_groups(model):
            for m in range(g.num_modules):
                a = _module_slices(model, before, g, m)
                b = _module_slices(model, after, g, m)
                same = all(np.array_equal(x, y) for x, y in zip(a, b))
                if not active[g.name][m]:
                    assert same, f"step {t}: masked module {g.name}[{m}] moved"
                else:
                    moved += not same
    assert moved > 0, "no active module ever moved"


def _fit(model, x, y, callbacks=(), epochs=2, mat=None, **kwargs):
    mat = mat or MATCallback(x, y)
    hist = model.fit(
        x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False, callbacks=[mat, *callbacks], **kwargs
    )
    return hist, mat


@pytest.mark.parametrize("jit", JIT)
def test_fit_transformer_masks_change_and_masked_modules_stay(jit):
    m = models.set_weights_deterministic(keras_mat.annotate(models.mha(), dense=True))
    opt = _compile(m, jit)
    x, y = _data(m)
    snaps = _Snapshots()
    hist, log = _fit(m, x, y, [snaps])
    _check_masked_modules_unchanged(m, snaps)
    # The masks changed over time and some module was stopped for good.
    patterns = {tuple(np.concatenate([a[k] for k in sorted(a)])) for a in snaps.active}
    assert len(patterns) > 1
    assert any(f.any() for f in opt.frozen.values())
    # A frozen module stays frozen and never moves again.
    for g in keras_mat.get_groups(m):
        for i in range(g.num_modules):
            if opt.frozen[g.name][i]:
                t0 = max(t for t in range(len(snaps.active)) if snaps.active[t][g.name][i]) + 1
                ref = _module_slices(m, snaps.weights[t0], g, i)
                for w in snaps.weights[t0:]:
                    assert all(np.array_equal(a, b) for a, b in zip(ref, _module_slices(m, w, g, i)))
    # History sees the active/frozen fractions and the FLOPs counters.
    assert "mat_active" in hist.history and "mat_frozen" in hist.history
    assert 0 < hist.history["mat_active"][-1] < 1
    assert hist.history["mat_gflop_trained"][-1] > 0
    # The log holds every measurement (steps 0, 2, ..., 14).
    assert sorted({r["step"] for r in log.rows}) == list(range(0, 16, 2))
    assert int(keras.ops.convert_to_numpy(opt.num_measurements.value)) == 8


def test_fit_cnn_per_layer_scope(tmp_path):
    m = models.set_weights_deterministic(keras_mat.annotate(models.cnn()))
    opt = _compile(m, False, alpha=0.5, beta=1e-4)
    x, y = _data(m, n=32)
    snaps = _Snapshots()
    _, log = _fit(m, x, y, [snaps], epochs=1, mat=MATCallback(x, csv_path=tmp_path / "mat.csv"))
    _check_masked_modules_unchanged(m, snaps)
    # Per-layer thresholds: every conv layer keeps its top filter active.
    for name in ("c0/filters", "c1/filters"):
        assert any(a[name].any() for a in snaps.active)
        assert all(a[name].any() for a in snaps.active)
        assert not all(a[name].all() for a in snaps.active[2:])
    fig = plot_lambda(str(tmp_path / "mat.csv"), str(tmp_path / "lambda.png"))
    assert os.path.getsize(tmp_path / "lambda.png") > 1000 and fig is not None
    assert opt.lambda_max["c1/filters"].shape == (6,)


def test_measurement_only_mode_records_and_trains():
    m = keras_mat.annotate(models.set_weights_deterministic(models.mha()), dense=True)
    m.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _data(m, n=16)
    before = [np.array(keras.ops.convert_to_numpy(v.value)) for v in m.trainable_variables]
    log = MATCallback(x, probe_every=2, probe_samples=4)
    m.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[log])
    assert sorted({r["step"] for r in log.rows}) == [0, 2]
    assert {r["family"] for r in log.rows} == {"mha/heads", "head"}
    assert all(r["lambda_max"] > 0 and r["active"] == 1 for r in log.rows)
    after = [np.array(keras.ops.convert_to_numpy(v.value)) for v in m.trainable_variables]
    assert all(not np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("defer", [True, False])
def test_spectrum_logging_matches_module_spectrum(defer):
    # The first measurement sees the initial weights: its logged spectrum is
    # the one `module_spectrum` computes before training, for every module.
    m = keras_mat.annotate(models.set_weights_deterministic(models.mha()), dense=True)
    m.compile(
        optimizer=wrap(keras.optimizers.Adam(1e-2), probe_every=2, probe_samples=4, ntk_output="sum"),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _data(m, n=16)
    expected = keras_mat.module_spectrum(m, x[:4], ntk_output="sum", top_k=3)
    log = MATCallback(x, probe_every=2, probe_samples=4, spectrum=3, defer_first_measurement=defer)
    m.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[log])
    first = [r for r in log.rows if r["step"] == 0]
    assert len(first) == sum(g.num_modules for g in keras_mat.get_groups(m))
    for r in first:
        spec = expected[r["family"]]
        np.testing.assert_allclose(r["eigenvalues"], spec["eigenvalues"][r["module"]], rtol=1e-4)
        np.testing.assert_allclose(r["effective_rank"], spec["effective_rank"][r["module"]], rtol=1e-4)
    later = [r for r in log.rows if r["step"] > 0]
    assert later
    for r in log.rows:
        assert len(r["eigenvalues"]) == 3 and r["eigenvalues"] == sorted(r["eigenvalues"], reverse=True)
        np.testing.assert_allclose(r["eigenvalues"][0], r["lambda_max"], rtol=1e-4)
        assert r["effective_rank"] >= 1.0


def test_a_call_on_next_apply_runs_once_when_a_step_applies_the_optimizer():
    m = keras_mat.annotate(models.set_weights_deterministic(models.mha()), dense=True)
    opt = wrap(keras.optimizers.SGD(0.1), policy=None)
    m.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data(m, n=8)
    calls = []

    def cancelled():
        calls.append("cancelled")

    opt._call_on_next_apply(lambda: calls.append("applied"))
    opt._call_on_next_apply(cancelled)
    opt._cancel_on_next_apply(cancelled)
    m.train_on_batch(x, y)
    m.train_on_batch(x, y)
    assert calls == ["applied"]
    assert opt._on_next_apply == []


def probes_of(events):
    return [i for i, e in enumerate(events) if e[0] == "probe"]


def test_on_next_compile_calls_once_after_the_next_lowering():
    from keras_mat import backends

    trainer = backends.trainer()
    calls = []

    def call():
        calls.append(len(calls))

    if BACKEND != "jax":  # nothing tells when a step compiles: the caller starts it itself
        assert trainer.on_next_compile(call) is False
        return
    import jax

    assert trainer.on_next_compile(call) is True
    assert calls == []
    jax.jit(lambda t: t * 3.0 + 1.0).lower(np.float32(0))
    assert calls == [0]
    jax.jit(lambda t: t * 5.0 + 2.0).lower(np.float32(0))
    assert calls == [0]  # once
    trainer.on_next_compile(call)
    trainer.cancel_on_next_compile(call)
    jax.jit(lambda t: t - 7.0).lower(np.float32(0))
    assert calls == [0]


@pytest.mark.parametrize("traced", [True, False])
def test_deferred_first_measurement_waits_for_the_step_to_reach_the_optimizer(traced):
    # The warm-up measurement's thread starts once the first step reaches the
    # optimizer (at trace time where the step compiles; on JAX once that step
    # is lowered, when its compile begins). Where nothing calls
    # the optimizer's hook (`traced=False`: a step compiled before the fit),
    # the next batch starts it. Either way the measurement of step 0 sees the
    # initial weights.
    from unittest import mock

    from keras_mat import backends
    from keras_mat import training as T

    m = keras_mat.annotate(models.set_weights_deterministic(models.mha()), dense=True)
    opt = wrap(keras.optimizers.Adam(1e-2), probe_every=4, probe_samples=4, ntk_output="sum")
    m.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data(m, n=32)
    expected = keras_mat.module_lambda_max(m, x[:4], ntk_output="sum")
    events = []
    original_apply, original_lambda = type(opt)._applying, T._lambda_from

    def applying(self):
        events.append(("apply", None))
        if traced:
            original_apply(self)

    def lambda_from(*args, **kwargs):
        events.append(("probe", threading.current_thread().name))
        return original_lambda(*args, **kwargs)

    original_start = T.MATCallback._start_if_waiting

    def start_if_waiting(self):
        events.append(("compile", None))
        original_start(self)

    log = MATCallback(x, probe_every=4, probe_samples=4, defer_first_measurement=True)
    with (
        mock.patch.object(type(opt), "_applying", applying),
        mock.patch.object(T, "_lambda_from", lambda_from),
        mock.patch.object(T.MATCallback, "_start_if_waiting", start_if_waiting),
    ):
        m.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[log])
    if traced and BACKEND == "jax":
        # JAX: started once the traced step was lowered, before its compile.
        assert events.index(("apply", None)) < events.index(("compile", None)) < probes_of(events)[0]
    else:
        assert ("compile", None) not in events
    probes = probes_of(events)
    if not backends.trainer().background_measurement(m):
        assert probes == []  # PyTorch: measured on the training thread, no compile to hide
    else:
        assert events[probes[0]][1] == "keras_mat-probe"
    if probes and backends.trainer().compiles_train_step(m):
        # Started from the first apply, or (no hook) at the next batch: after it either way.
        assert events.index(("apply", None)) < probes[0], events[:5]
    assert opt._on_next_apply == []
    first = {r["family"]: r["lambda_max"] for r in log.rows if r["step"] == 0 and r["module"] == 0}
    assert set(first) == set(expected)
    for name, value in first.items():
        np.testing.assert_allclose(value, expected[name][0], rtol=1e-4)
    assert sorted({r["step"] for r in log.rows}) == [0, 4]


def test_fit_in_pieces_reads_the_training_clock_from_total_steps():
    # Two fits of 8 steps each, one training of 16: with `total_steps` the
    # "training" reading counts quarters of 16 steps in both; without it the
    # second fit warns that its clock is its own 8 steps.
    def model():
        m = keras_mat.annotate(models.set_weights_deterministic(models.mha()), dense=True)
        m.compile(
            optimizer=wrap(keras.optimizers.Adam(1e-2), probe_every=2, probe_samples=4, ntk_output="sum"),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return m

    m = model()
    x, y = _data(m, n=64)
    whole = keras_mat.policy.temporal_period("training", 2, 16, 1)
    assert whole == 2 != keras_mat.policy.temporal_period("training", 2, 8, 1)
    cb = MATCallback(x, total_steps=16)
    for _ in range(2):
        m.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])
        assert cb._period == whole
    m, cb = model(), MATCallback(x)
    m.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])
    assert "chunked" not in cb._warned  # a first fit is the whole training as far as it knows
    with pytest.warns(UserWarning, match="total_steps"):
        m.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])
    assert cb._period == keras_mat.policy.temporal_period("training", 2, 8, 1)


def test_wrap_without_annotate_fails_clearly():
    m = models.mlp()
    m.compile(optimizer=wrap(keras.optimizers.Adam()), loss="mse")
    x = np.zeros((8, 4))
    with pytest.raises(ValueError, match="keras_mat.annotate"):
        m.fit(x, np.zeros((8, 3)), verbose=0, callbacks=[MATCallback(x)])


def test_mat_without_its_callback_warns():
    m = keras_mat.annotate(models.mlp(), dense=True)
    m.compile(optimizer=wrap(keras.optimizers.Adam()), loss="mse")
    with pytest.warns(UserWarning, match="MATCallback"):
        m.fit(np.zeros((8, 4)), np.zeros((8, 3)), verbose=0)


def test_callback_arguments_are_checked():
    x = np.zeros((4, 3))
    for kwargs, name in (
        ({"probe_samples": 0}, "probe_samples"),
        ({"probe_every": "10"}, "probe_every"),
        ({"recompile": "sometimes"}, "recompile"),
        ({"batch_size": -1}, "batch_size"),
        ({"spectrum": 0}, "spectrum"),
        ({"spectrum": "top"}, "spectrum"),
        ({"total_steps": 0}, "total_steps"),
    ):
        with pytest.raises(ValueError, match=f"Received: {name}="):
            MATCallback(x, **kwargs)
    with pytest.raises(ValueError, match="Received: x=None"):
        MATCallback(None)


def test_probe_set_from_a_dataset_and_a_generator():
    x = np.arange(40, dtype="float32").reshape(20, 2)
    y = np.arange(20)
    batches = [(x[i : i + 3], y[i : i + 3]) for i in range(0, 20, 3)]
    px, py = keras_mat.take_probe_set(iter(batches), n=7)
    np.testing.assert_array_equal(px, x[:7])
    np.testing.assert_array_equal(py, y[:7])
    px, py = keras_mat.take_probe_set(x, n=5)
    assert py is None and px.shape == (5, 2)


@pytest.mark.skipif(BACKEND == "torch", reason="torch runs the step eagerly: there is no trace to count.")
def test_second_fit_and_unchanged_skip_sets_do_not_retrace():
    traces = []

    def loss(y_true, y_pred):
        traces.append(1)  # runs in Python only while tracing
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)

    m = models.set_weights_deterministic(keras_mat.annotate(models.mha()))
    m.compile(optimizer=wrap(keras.optimizers.Adam(1e-2), probe_every=2, probe_samples=4), loss=loss)
    x, y = _data(m, n=32)
    mat = MATCallback(x)
    m.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[mat])
    after_first = len(traces)
    m.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[mat])
    assert len(traces) == after_first


@pytest.mark.parametrize("reannotate", [False, True])
def test_resume_from_checkpoint_equals_uninterrupted(tmp_path, reannotate):
    def build():
        mdl = models.set_weights_deterministic(keras_mat.annotate(models.mha(), dense=True))
        _compile(mdl, False)
        return mdl

    x, y = _data(build(), n=32)
    straight = build()
    _, log_a = _fit(straight, x, y)

    first = build()
    _, log_b = _fit(first, x, y, epochs=1)
    path = str(tmp_path / "mat.keras")
    first.save(path)
    resumed = keras.models.load_model(path)
    if reannotate:
        keras_mat.annotate(resumed, dense=True)
    # Without annotating again, the optimizer re-attaches its saved families.
    _fit(resumed, x, y, epochs=1, mat=log_b)

    key = lambda r: (r["step"], r["family"], r["module"])  # noqa: E731
    a = sorted(log_a.rows, key=key)
    b = sorted(log_b.rows, key=key)
    assert [(r["step"], r["active"], r["frozen"]) for r in a] == [
        (r["step"], r["active"], r["frozen"]) for r in b
    ]
    np.testing.assert_allclose([r["lambda_max"] for r in a], [r["lambda_max"] for r in b], rtol=1e-5)
    for va, vb in zip(straight.trainable_variables, resumed.trainable_variables):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(va.value), keras.ops.convert_to_numpy(vb.value), rtol=1e-5, atol=1e-6
        )


_XB_SCRIPT = r"""
import json, sys
import numpy as np, keras, keras_mat
from keras_mat.optimizer import wrap
from tests import models
m = models.set_weights_deterministic(keras_mat.annotate(models.mha(), dense=True))
m.compile(optimizer=wrap(keras.optimizers.Adam(1e-2), alpha=0.6, beta=0.05, probe_every=2, probe_samples=4),
          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
rng = np.random.RandomState(0)
x = rng.randn(64, 4, 8).astype("float32"); y = rng.randint(0, 3, 64)
log = keras_mat.MATCallback(x)
m.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[log])
json.dump(log.rows, sys.stdout)
"""


@only_in_jax_session
def test_backends_produce_the_same_mask_sequence():
    rows = run_in_every_backend(_XB_SCRIPT)
    ref = rows["jax"]
    assert len(ref) > 0 and any(r["frozen"] for r in ref) and any(not r["active"] for r in ref)
    for backend in ("tensorflow", "torch"):
        other = rows[backend]
        assert [(r["step"], r["family"], r["module"], r["active"], r["frozen"]) for r in other] == [
            (r["step"], r["family"], r["module"], r["active"], r["frozen"]) for r in ref
        ], backend
        np.testing.assert_allclose(
            [r["lambda_max"] for r in other], [r["lambda_max"] for r in ref], rtol=1e-3, err_msg=backend
        )


class _GradProbe(keras.callbacks.Callback):
    """torch: which trainable variables got no .grad in each step."""

    def __init__(self):
        super().__init__()
        self.no_grad = []

    def on_train_batch_end(self, batch, logs=None):
        opt = find_mat_optimizer(self.model.optimizer)
        self.no_grad.append({v.path for v in opt._trainable_variables if v.value.grad is None})


def _mlp_run(skip, epochs=2):
    m = models.set_weights_deterministic(keras_mat.annotate(models.mlp(inputs=6, hidden=16), dense=True))
    opt = _compile(m, False, alpha=0.9, beta=1e-6, probe_every=3, skip_gradients=skip)
    x, y = _data(m, n=48)
    snaps = _Snapshots()
    cbs = [snaps] + ([_GradProbe()] if BACKEND == "torch" else [])
    mat = MATCallback(x, recompile="always")
    hist, _ = _fit(m, x, y, cbs, epochs=epochs, mat=mat)
    return m, opt, snaps, hist, mat.step_cache_info(), cbs


def test_frozen_variables_get_no_weight_gradient_and_same_result():
    m, opt, snaps, hist, info, cbs = _mlp_run(skip=True)
    _check_masked_modules_unchanged(m, snaps)
    skipped_sets = [s for _, s in info["skip_history"] if s]
    assert skipped_sets, f"no variable was ever skipped: {info}"
    # One compiled variant per distinct skip set, bounded by the cache.
    assert len(info["cached"]) <= 8
    assert set(info["cached"]) - {()} <= {tuple(sorted(s)) for _, s in info["skip_history"]}
    compiled = keras_mat.backends.trainer().compiles_train_step(m)
    distinct = len({tuple(sorted(s)) for _, s in info["skip_history"] if s})
    assert info["num_compiles"] == (distinct if compiled else 0), info
    # After fit every variable is trainable again.
    assert all(v.trainable for v in opt._trainable_variables) and not opt.skipped_variables
    if BACKEND == "torch":
        no_grad = cbs[1].no_grad
        assert any(no_grad), "torch computed every weight gradient"
        # Only fully-masked variables ever lack a gradient.
        for t, missing in enumerate(no_grad):
            for path in missing:
                v = next(v for v in opt._trainable_variables if v.path == path)
                fam = keras_mat.groups.group_of(v)[0]
                assert not snaps.active[t][fam.name].any()
    m2, opt2, snaps2, hist2, info2, _ = _mlp_run(skip=False)
    assert info2["skip_history"] == [] and info2["num_compiles"] == 0
    # Skipping is exact: same masks, same losses, same weights.
    assert [{k: v.tolist() for k, v in a.items()} for a in snaps.active] == [
        {k: v.tolist() for k, v in a.items()} for a in snaps2.active
    ]
    np.testing.assert_allclose(hist.history["loss"], hist2.history["loss"], rtol=1e-6)
    for a, b in zip(snaps.weights[-1], snaps2.weights[-1]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_recompile_never_runs_only_cached_steps():
    m = models.set_weights_deterministic(keras_mat.annotate(models.mlp(inputs=6, hidden=16), dense=True))
    _compile(m, BACKEND != "torch", alpha=0.9, beta=1e-6, probe_every=3)
    x, y = _data(m, n=48)
    snaps = _Snapshots()
    mat = MATCallback(x, recompile="never")
    _fit(m, x, y, [snaps], mat=mat)
    info = mat.step_cache_info()
    assert info["num_compiles"] == 0 and info["cached"] == [()], info
    # An eager step (torch) needs no compile: it skips at once.
    assert bool(info["skip_history"]) == (not keras_mat.backends.trainer().compiles_train_step(m)), info
    _check_masked_modules_unchanged(m, snaps)


def test_train_on_batch_and_custom_loop_skip_masked_variables():
    # set_masks + sync_trainable: train_on_batch differentiates only the
    # active variables; measure() drives MAT in a loop without fit.
    m = models.set_weights_deterministic(keras_mat.annotate(models.mlp(inputs=6, hidden=16), dense=True))
    opt = _compile(m, False, policy=None)
    x, y = _data(m, n=16)
    opt.build(m.trainable_variables)
    opt.set_masks({"fc0": [False]})
    assert keras_mat.sync_trainable(m)
    assert [v.path for v in opt.skipped_variables] == ["fc0/kernel", "fc0/bias"]
    assert len(m.trainable_variables) == 2
    before = [np.array(keras.ops.convert_to_numpy(v.value)) for v in opt._trainable_variables]
    m.train_on_batch(x, y)
    after = [np.array(keras.ops.convert_to_numpy(v.value)) for v in opt._trainable_variables]
    assert [not np.array_equal(a, b) for a, b in zip(before, after)] == [False, False, True, True]
    opt.set_masks({"fc0": [True]})
    assert keras_mat.sync_trainable(m) and not opt.skipped_variables
    m.train_on_batch(x, y)
    final = [np.array(keras.ops.convert_to_numpy(v.value)) for v in opt._trainable_variables]
    assert all(not np.array_equal(a, b) for a, b in zip(after, final))
    with pytest.raises(ValueError, match="active module"):
        keras_mat.sync_trainable(m, variables=[opt._trainable_variables[0]])

    m2 = models.set_weights_deterministic(keras_mat.annotate(models.mlp(inputs=6, hidden=16), dense=True))
    opt2 = _compile(m2, False, alpha=0.9, beta=1e-6, probe_every=2)
    for _ in range(6):
        keras_mat.measure(m2, x[:4])
        m2.train_on_batch(x, y)
    assert int(keras.ops.convert_to_numpy(opt2.num_measurements.value)) == 3


@pytest.mark.skipif(
    BACKEND == "jax", reason="JAX on CPU cannot run float16 matmuls (fails without keras_mat too)."
)
def test_mixed_precision_fit_nests_in_loss_scale_optimizer():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        m = models.set_weights_deterministic(keras_mat.annotate(models.mha(), dense=True))
        opt = _compile(m, False)
        assert isinstance(m.optimizer, keras.optimizers.LossScaleOptimizer)
        x, y = _data(m, n=32)
        snaps = _Snapshots()
        hist, _ = _fit(m, x, y, [snaps])
    finally:
        keras.config.set_dtype_policy("float32")
    _check_masked_modules_unchanged(m, snaps)
    assert np.all(np.isfinite(hist.history["loss"]))
    assert int(keras.ops.convert_to_numpy(opt.num_measurements.value)) == 4
    assert all(np.all(v > 0) for v in opt.lambda_max.values())


def test_within_variable_mask_changes_reuse_one_compiled_step():
    """Masks that change only *within* variables (some heads of a layer) never
    change the skip set: the one compiled step serves every measurement."""
    m = models.set_weights_deterministic(keras_mat.annotate(models.mha(heads=4)))
    assert [g.name for g in keras_mat.get_groups(m)] == ["mha/heads"]
    _compile(m, BACKEND != "torch", alpha=0.5, beta=1e-12, probe_every=2)  # JAX eager would trace per call
    x, y = _data(m, n=32)
    snaps = _Snapshots()
    hist, mat = _fit(m, x, y, [snaps], epochs=3)
    info = mat.step_cache_info()
    counts = [int(a["mha/heads"].sum()) for a in snaps.active]
    assert any(0 < c < 4 for c in counts), counts  # some heads were off ...
    assert len({tuple(a["mha/heads"]) for a in snaps.active}) > 1, counts  # ... and masks changed
    assert info["skip_history"] == [] and info["num_compiles"] == 0 and info["cached"] == [()], info
    _check_masked_modules_unchanged(m, snaps)
    # MAT's accounting counts the active heads' weight gradients only; the step
    # computes every head's (no variable was fully off), and says so.
    logs = hist.history
    assert logs["mat_gflop_executed"][-1] > logs["mat_gflop_trained"][-1] + logs["mat_gflop_probes"][-1] > 0


class _CountingAdam(keras.optimizers.Adam):
    """Adam that records which variables each update touched (per call on
    torch, per trace on JAX and TF: what the compiled step updates)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.updated = []

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        self.updated.append({v.path for v in trainable_variables})
        return super()._backend_update_step(grads, trainable_variables, learning_rate)


def test_skipped_variables_cost_no_optimizer_update():
    # A variable whose modules are all off is left out of the optimizer's
    # update altogether (no Adam work, no snapshot), and its slots stay put.
    m = models.set_weights_deterministic(keras_mat.annotate(models.mlp(inputs=6, hidden=16), dense=True))
    inner = _CountingAdam(1e-2, name="counting_adam")
    m.compile(
        optimizer=wrap(inner, alpha=0.9, beta=1e-6, probe_every=3, probe_samples=4, warmup=1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _data(m, n=48)

    class Slots(keras.callbacks.Callback):
        def __init__(cb):
            super().__init__()
            cb.values = []

        def on_train_batch_end(cb, batch, logs=None):
            _sync(m)
            cb.values.append([np.array(keras.ops.convert_to_numpy(v.value)) for v in inner.variables])

    slots, snaps = Slots(), _Snapshots()
    _, mat = _fit(m, x, y, [snaps, slots], mat=MATCallback(x, recompile="always"))
    info = mat.step_cache_info()
    tv = m.trainable_variables
    skipped_paths = {p for _, s in info["skip_history"] for p in s}
    assert skipped_paths, f"no variable was ever skipped: {info}"
    everything = {v.path for v in tv}
    partial = [u for u in inner.updated if u != everything]
    assert partial, f"every update touched every variable: {inner.updated}"
    for u in partial:  # only fully-off variables are ever left out
        assert everything - u <= skipped_paths, (everything - u, skipped_paths)
    # A skipped variable's slots (Adam's m and v) do not move while it is skipped.
    _check_masked_modules_unchanged(m, snaps)
    owners = models.slot_owners(inner, m)  # inner variable index -> model variable (by name)
    checked = 0
    for t in range(1, len(slots.values)):
        off = {
            id(v) for g in keras_mat.get_groups(m) if not snaps.active[t][g.name].any() for v in g.variables
        }
        for k, v in owners.items():
            if id(v) in off:
                np.testing.assert_array_equal(slots.values[t - 1][k], slots.values[t][k], err_msg=v.path)
                checked += 1
    assert checked > 0, "no slot of a skipped variable was checked"


def test_plot_lambda_many_modules_stays_readable(tmp_path):
    # Hundreds of filter modules: the figure height is capped, lambda = 0 is allowed
    # (dead filters), and masked / frozen cells are shaded rather than marked.
    import matplotlib.image

    rows = []
    for step in (0, 10, 20):
        for f, size in (("conv1/filters", 150), ("conv2/filters", 250)):
            for m in range(size):
                rows.append(
                    dict(
                        step=step,
                        measurement=step // 10,
                        family=f,
                        module=m,
                        lambda_max=0.0 if m == 3 else float(m + 1),
                        active=int(m % 3 == 0),
                        frozen=int(m % 7 == 0 and step == 20),
                    )
                )
    plot_lambda(rows, str(tmp_path / "many.png"))
    height = matplotlib.image.imread(str(tmp_path / "many.png")).shape[0]
    # Capped at 16 inches at 120 dpi; one row of 0.22 in per module would be 10,740 px.
    assert height <= 16 * 120, height
    with pytest.raises(ValueError, match="no measurement"):
        plot_lambda([], str(tmp_path / "none.png"))


def _step_matmuls(model, x, y):
    """Matrix products one train step runs with the current `trainable` flags
    (the skip set), counted where each backend does the work:
    JAX, `dot` ops in the XLA-optimized step (after dead-code elimination);
    TF, MatMul ops in the traced step graph; torch, `aten.mm` calls dispatched
    by one eager step (forward, autograd backward and optimizer)."""
    if BACKEND == "jax":
        import jax

        state = model._get_jax_state(
            trainable_variables=True,
            non_trainable_variables=True,
            optimizer_variables=True,
            metrics_variables=True,
        )
        hlo = jax.jit(lambda s, d: model.train_step(s, d)).lower(state, (x, y)).compile().as_text()
        return hlo.count(" dot(")
    if BACKEND == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda d: model.train_step(d))
        graph = fn.get_concrete_function((tf.constant(x), tf.constant(y))).graph
        # Products that feed an output or a state update; the others (the
        # weight gradients of non-trainable variables that the tape's MatMul
        # gradient forms) are pruned before the graph runs.
        live, todo = (
            set(),
            [t.op for t in graph.outputs] + [o for o in graph.get_operations() if o.op_def.is_stateful],
        )
        while todo:
            op = todo.pop()
            if op.name in live:
                continue
            live.add(op.name)
            todo.extend(t.op for t in op.inputs)
            todo.extend(op.control_inputs)
        return sum(
            op.type in ("MatMul", "BatchMatMulV2") and op.name in live for op in graph.get_operations()
        )
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        model.train_step((torch.tensor(x), torch.tensor(y)))
    assert "matmul" not in calls and "addmm" not in calls, calls  # 2-D Dense products dispatch as mm
    return calls.count("mm") + calls.count("bmm")


def test_step_runs_only_the_matmuls_of_trained_variables():
    # Three Dense layers (one module each), so per step: 3 forward products,
    # one weight gradient per trained layer, and an activation gradient into
    # every layer below the top that still has a trained layer under it.
    # The same counts on every backend: a skipped weight gradient is really
    # not computed, and back-propagation stops at the lowest trained layer.
    inp = keras.Input((6,))
    h = keras.layers.Dense(16, activation="tanh", name="fc0")(inp)
    h = keras.layers.Dense(16, activation="tanh", name="fc1")(h)
    m = keras.Model(inp, keras.layers.Dense(3, name="fc2")(h))
    keras_mat.annotate(m, dense=True)
    groups = keras_mat.get_groups(m)
    assert [(g.name, g.num_modules) for g in groups] == [("fc0", 1), ("fc1", 1), ("fc2", 1)]
    opt = wrap(keras.optimizers.Adam(1e-2), policy=None)
    m.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    opt.build(m.trainable_variables)
    x, y = _data(m, n=8)
    expected = {(): 8, ("fc1",): 7, ("fc0",): 6, ("fc0", "fc1"): 4, ("fc0", "fc1", "fc2"): 3}
    got = {}
    for off in expected:
        opt.set_masks({g.name: np.asarray([g.name not in off]) for g in groups})
        keras_mat.sync_trainable(m)
        skipped = {v.path.split("/")[0] for v in opt.skipped_variables}
        assert skipped == set(off), (off, skipped)
        before = [keras.ops.convert_to_numpy(v.value) for v in opt._trainable_variables]
        m.fit(x, y, batch_size=8, epochs=1, verbose=0)
        for v, b in zip(opt._trainable_variables, before):  # frozen variables stay bit for bit
            moved = not np.array_equal(keras.ops.convert_to_numpy(v.value), b)
            assert moved == (v.path.split("/")[0] not in off), (off, v.path)
        got[off] = _step_matmuls(m, x, y)
    assert got == expected
