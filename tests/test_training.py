"""The MAT training step inside `fit`, on every backend."""

import os

import keras
import numpy as np
import pytest

import keras_mat
from keras_mat.callbacks import MATLogger, plot_lambda
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
        self.weights.append(
            [np.array(keras.ops.convert_to_numpy(v.value)) for v in self.model.trainable_variables]
        )

    def on_train_batch_end(self, batch, logs=None):
        _sync(self.model)
        opt = find_mat_optimizer(self.model.optimizer)
        self.weights.append(
            [np.array(keras.ops.convert_to_numpy(v.value)) for v in self.model.trainable_variables]
        )
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
    index = {id(v): i for i, v in enumerate(model.trainable_variables)}
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


@pytest.mark.parametrize("jit", JIT)
def test_fit_transformer_masks_change_and_masked_modules_stay(jit):
    m = models.set_weights_deterministic(keras_mat.annotate(models.mha()))
    opt = _compile(m, jit)
    x, y = _data(m)
    snaps, log = _Snapshots(), MATLogger()
    hist = m.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[snaps, log])
    _check_masked_modules_unchanged(m, snaps)
    # The masks changed over time and some module was stopped for good.
    patterns = {tuple(np.concatenate([a[k] for k in sorted(a)])) for a in snaps.active}
    assert len(patterns) > 1
    assert any(f.any() for f in opt.frozen.values())
    # A frozen module stays frozen and never moves again.
    first = {}
    for t, active in enumerate(snaps.active):
        for g in keras_mat.get_groups(m):
            for i in range(g.num_modules):
                if not active[g.name][i]:
                    first.setdefault((g.name, i), t)
    for (name, i), _ in first.items():
        if opt.frozen[name][i]:
            g = [g for g in keras_mat.get_groups(m) if g.name == name][0]
            t0 = max(t for t in range(len(snaps.active)) if snaps.active[t][name][i]) + 1
            ref = _module_slices(m, snaps.weights[t0], g, i)
            for w in snaps.weights[t0:]:
                assert all(np.array_equal(a, b) for a, b in zip(ref, _module_slices(m, w, g, i)))
    # History and the progress bar see the active/frozen fractions.
    assert "mat_active" in hist.history and "mat_frozen" in hist.history
    assert 0 < hist.history["mat_active"][-1] < 1
    # The logger saw every measurement (steps 0, 2, ..., 14).
    assert sorted({r["step"] for r in log.rows}) == list(range(0, 16, 2))
    assert int(keras.ops.convert_to_numpy(opt.num_measurements.value)) == 8


def test_fit_cnn_per_layer_scope(tmp_path):
    m = models.set_weights_deterministic(keras_mat.annotate(models.cnn()))
    opt = _compile(m, False, alpha=0.5, beta=1e-4)
    x, y = _data(m, n=32)
    snaps, log = _Snapshots(), MATLogger(str(tmp_path / "mat.csv"))
    m.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[snaps, log])
    _check_masked_modules_unchanged(m, snaps)
    # Per-layer thresholds: every conv layer keeps its top filter active.
    for name in ("c0/filters", "c1/filters"):
        assert any(a[name].any() for a in snaps.active)
        assert all(a[name].any() for a in snaps.active)
        assert not all(a[name].all() for a in snaps.active[2:])
    png = plot_lambda(str(tmp_path / "mat.csv"), str(tmp_path / "lambda.png"))
    assert os.path.getsize(png) > 1000
    assert opt.lambda_max["c1/filters"].shape == (6,)


def test_measurement_only_mode_records_and_trains():
    m = keras_mat.annotate(models.set_weights_deterministic(models.mha()))
    m.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _data(m, n=16)
    before = [np.array(keras.ops.convert_to_numpy(v.value)) for v in m.trainable_variables]
    log = MATLogger()
    m.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[log])
    assert len(m.keras_mat_history) == 1 and m.keras_mat_history[0]["step"] == 0
    assert set(m.keras_mat_history[0]["lambda_max"]) == {"mha/heads", "head"}
    assert {r["family"] for r in log.rows} == {"mha/heads", "head"}
    after = [np.array(keras.ops.convert_to_numpy(v.value)) for v in m.trainable_variables]
    assert all(not np.array_equal(a, b) for a, b in zip(before, after))


def test_wrap_without_annotate_fails_clearly():
    m = models.mlp()
    m.compile(optimizer=wrap(keras.optimizers.Adam()), loss="mse")
    with pytest.raises(ValueError, match="keras_mat.annotate"):
        m.fit(np.zeros((8, 4)), np.zeros((8, 3)), verbose=0)


def test_probe_on_current_batch():
    m = models.set_weights_deterministic(keras_mat.annotate(models.mha()))
    opt = _compile(m, False, probe="batch")
    x, y = _data(m, n=32)
    m.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert int(keras.ops.convert_to_numpy(opt.num_measurements.value)) == 2
    assert all(np.all(v > 0) for v in opt.lambda_max.values())


@pytest.mark.skipif(BACKEND == "torch", reason="torch runs the step eagerly: there is no trace to count.")
def test_second_fit_and_mask_changes_do_not_retrace():
    traces = []

    def loss(y_true, y_pred):
        traces.append(1)  # runs in Python only while tracing
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)

    m = models.set_weights_deterministic(keras_mat.annotate(models.mha()))
    m.compile(optimizer=wrap(keras.optimizers.Adam(1e-2), probe_every=2, probe_samples=4), loss=loss)
    x, y = _data(m, n=32)
    m.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    after_first = len(traces)
    m.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    assert len(traces) == after_first


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    def build():
        mdl = models.set_weights_deterministic(keras_mat.annotate(models.mha()))
        _compile(mdl, False)
        return mdl

    x, y = _data(build(), n=32)
    straight = build()
    log_a = MATLogger()
    straight.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[log_a])

    first = build()
    log_b = MATLogger()
    first.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[log_b])
    path = str(tmp_path / "mat.keras")
    first.save(path)
    resumed = keras.models.load_model(path)
    keras_mat.annotate(resumed)
    resumed.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[log_b])

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
from keras_mat.callbacks import MATLogger
from keras_mat.optimizer import wrap
from tests import models
from tests.cross_backend import only_in_jax_session, run_in_every_backend
m = models.set_weights_deterministic(keras_mat.annotate(models.mha()))
m.compile(optimizer=wrap(keras.optimizers.Adam(1e-2), alpha=0.6, beta=0.05, probe_every=2, probe_samples=4),
          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
rng = np.random.RandomState(0)
x = rng.randn(64, 4, 8).astype("float32"); y = rng.randint(0, 3, 64)
log = MATLogger()
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
        self.no_grad.append({i for i, v in enumerate(self.model.trainable_variables) if v.value.grad is None})


def _mlp_run(skip, epochs=2):
    from keras_mat.training import step_cache_info

    m = models.set_weights_deterministic(keras_mat.annotate(models.mlp(inputs=6, hidden=16)))
    opt = _compile(m, False, alpha=0.9, beta=1e-6, probe_every=3)
    opt.skip_gradients = skip
    x, y = _data(m, n=48)
    snaps = _Snapshots()
    cbs = [snaps] + ([_GradProbe()] if BACKEND == "torch" else [])
    hist = m.fit(x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False, callbacks=cbs)
    return m, opt, snaps, hist, step_cache_info(m), cbs


def test_frozen_variables_get_no_weight_gradient_and_same_result():
    m, opt, snaps, hist, info, cbs = _mlp_run(skip=True)
    _check_masked_modules_unchanged(m, snaps)
    skipped_sets = [s for _, s in info["skip_history"] if s]
    assert skipped_sets, f"no variable was ever skipped: {info}"
    # One compiled variant per distinct skip set (plus the no-skip one), bounded,
    # and each variant really traced with its own skip set.
    assert info["num_compiles"] <= len({s for _, s in info["skip_history"]}) + 1 <= 9
    if BACKEND != "torch":  # torch runs eagerly: nothing is traced
        assert set(info["traces"]) == set(info["cached"])
        assert any(key for key in info["traces"]), info
    if BACKEND == "torch":
        no_grad = cbs[1].no_grad
        assert any(no_grad), "torch computed every weight gradient"
        # Only fully-masked variables ever lack a gradient.
        for t, missing in enumerate(no_grad):
            for i in missing:
                v = m.trainable_variables[i]
                fam = keras_mat.groups.group_of(v)[0]
                assert not snaps.active[t][fam.name].any()
    m2, opt2, snaps2, hist2, info2, _ = _mlp_run(skip=False)
    assert info2["skip_history"] == []
    # Skipping is exact: same masks, same losses, same weights.
    assert [{k: v.tolist() for k, v in a.items()} for a in snaps.active] == [
        {k: v.tolist() for k, v in a.items()} for a in snaps2.active
    ]
    np.testing.assert_allclose(hist.history["loss"], hist2.history["loss"], rtol=1e-6)
    for a, b in zip(snaps.weights[-1], snaps2.weights[-1]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(
    BACKEND == "jax", reason="JAX on CPU cannot run float16 matmuls (fails without keras_mat too)."
)
def test_mixed_precision_fit_nests_in_loss_scale_optimizer():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        m = models.set_weights_deterministic(keras_mat.annotate(models.mha()))
        opt = _compile(m, False)
        assert isinstance(m.optimizer, keras.optimizers.LossScaleOptimizer)
        x, y = _data(m, n=32)
        snaps = _Snapshots()
        hist = m.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[snaps])
    finally:
        keras.config.set_dtype_policy("float32")
    _check_masked_modules_unchanged(m, snaps)
    assert np.all(np.isfinite(hist.history["loss"]))
    assert int(keras.ops.convert_to_numpy(opt.num_measurements.value)) == 4
    assert all(np.all(v > 0) for v in opt.lambda_max.values())


def test_within_variable_mask_changes_reuse_one_compiled_step():
    """Masks that change only *within* variables (some heads of a layer) never
    change the skip set, so the step cache holds one variant, traced once."""
    from keras_mat.training import step_cache_info

    m = models.set_weights_deterministic(keras_mat.annotate(models.mha(heads=4), exclude=["head"]))
    assert [g.name for g in keras_mat.get_groups(m)] == ["mha/heads"]
    _compile(m, BACKEND != "torch", alpha=0.5, beta=1e-12, probe_every=2)  # JAX eager would trace per call
    x, y = _data(m, n=32)
    snaps = _Snapshots()
    hist = m.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False, callbacks=[snaps])
    info = step_cache_info(m)
    counts = [int(a["mha/heads"].sum()) for a in snaps.active]
    assert any(0 < c < 4 for c in counts), counts  # some heads were off ...
    assert len({tuple(a["mha/heads"]) for a in snaps.active}) > 1, counts  # ... and masks changed
    assert len(info["skip_history"]) >= 5, info  # one entry per measurement
    assert all(key == () for _, key in info["skip_history"]), info
    assert info["num_compiles"] == 1 and list(info["cached"]) == [()], info
    if BACKEND != "torch":  # torch runs eagerly: nothing is traced
        assert info["traces"] == {(): 1}, info
    _check_masked_modules_unchanged(m, snaps)
    # MAT's accounting counts the active heads' weight gradients only; the step
    # computes every head's (no variable was fully off), and says so.
    logs = hist.history
    assert logs["mat_executed_flops"][-1] > logs["mat_total_flops"][-1] > logs["mat_train_flops"][-1] > 0


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
    from keras_mat.training import step_cache_info

    m = models.set_weights_deterministic(keras_mat.annotate(models.mlp(inputs=6, hidden=16)))
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
    m.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[snaps, slots])
    info = step_cache_info(m)
    tv = m.trainable_variables
    skipped_paths = {tv[i].path for _, s in info["skip_history"] for i in s}
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
    png = plot_lambda(rows, str(tmp_path / "many.png"))
    height = matplotlib.image.imread(png).shape[0]
    # Capped at 16 inches at 120 dpi; one row of 0.22 in per module would be 10,740 px.
    assert height <= 16 * 120, height
    with pytest.raises(ValueError, match="no measurement"):
        plot_lambda([], str(tmp_path / "none.png"))


def _step_matmuls(model, x, y):
    """Matrix products one MAT train step runs, for the skip set `fit` chose
    (model's runtime `next_skip`), counted where each backend does the work:
    JAX, `dot` ops in the XLA-optimized step (after dead-code elimination);
    TF, MatMul ops in the traced step graph; torch, `aten.mm` calls dispatched
    by one eager step (forward, autograd backward and optimizer)."""
    rt = model._keras_mat_runtime
    rt.skip = rt.next_skip
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
        return sum(op.type in ("MatMul", "BatchMatMulV2") for op in graph.get_operations())
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
    keras_mat.annotate(m)
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
        before = [keras.ops.convert_to_numpy(v.value) for v in m.trainable_variables]
        m.fit(x, y, batch_size=8, epochs=1, verbose=0)
        skipped = {m.trainable_variables[i].path.split("/")[0] for i in m._keras_mat_runtime.next_skip}
        assert skipped == set(off), (off, m._keras_mat_runtime.next_skip)
        for v, b in zip(m.trainable_variables, before):  # frozen variables stay bit for bit
            moved = not np.array_equal(keras.ops.convert_to_numpy(v.value), b)
            assert moved == (v.path.split("/")[0] not in off), (off, v.path)
        got[off] = _step_matmuls(m, x, y)
    assert got == expected
