"""Tests for `keras_mat.optimizer`: masked updates of variables and slots on
every built-in optimizer, options, `fit` without retracing, save/load and
validation. Runs once per KERAS_BACKEND."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_mat.groups import ModuleGroup, annotate, group_of
from keras_mat.optimizer import ModularAdaptiveOptimizer, wrap
from tests import models

BACKEND = keras.backend.backend()


def make_model(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((3, 4))
    x = keras.layers.MultiHeadAttention(num_heads=2, key_dim=2, name="mha")(inp, inp)
    x = keras.layers.Conv1D(4, 2, name="conv")(x)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(2, name="out")(x)
    return annotate(keras.Model(inp, out), dense=True)


def data(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3, 4)).astype("float32"), rng.normal(size=(n, 2)).astype("float32")


def random_masks(opt, rng):
    masks = {}
    for g in opt.families:
        m = rng.integers(0, 2, size=g.num_modules).astype(bool)
        if g.num_modules > 1:
            m[0], m[-1] = True, False  # both cases always present
        masks[g.name] = m
    return masks


def keep_array(variable, masks):
    """Numpy boolean array of `variable`'s shape: True where updates are kept."""
    group, axis = group_of(variable)
    if group is None:
        return np.ones(variable.shape, bool)
    m = np.asarray(masks[group.name])
    if axis is None:
        return np.full(variable.shape, bool(m[0]))
    m = np.repeat(m, variable.shape[axis] // group.num_modules)
    shape = [1] * len(variable.shape)
    shape[axis] = variable.shape[axis]
    return np.broadcast_to(m.reshape(shape), variable.shape)


def wrapped_twins(make_inner):
    """Two identical models, each with a built wrapper of its own inner optimizer."""
    pairs = []
    for _ in range(2):
        model, opt = make_model(), wrap(make_inner())
        opt.build(model.trainable_variables)
        pairs.append((model, opt))
    return pairs


def values(variables):
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in variables]


def random_grads(model, rng):
    return [
        ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32")) for v in model.trainable_variables
    ]


def check_masked_steps(make_inner, steps=2, seed=0):
    """Runs `steps` masked steps and compares each with a bare copy of the
    inner optimizer started from the wrapper's current state (valid for every
    optimizer, even those that couple slices of a variable)."""
    rng = np.random.default_rng(seed)
    model = make_model()
    twin = make_model()
    opt = wrap(make_inner())
    bare = make_inner()
    opt.build(model.trainable_variables)
    bare.build(twin.trainable_variables)
    owners = models.slot_owners(opt.inner_optimizer, model)
    assert len(opt.inner_optimizer.variables) == len(bare.variables)
    masks = random_masks(opt, rng)
    opt.set_masks(masks)
    for step in range(steps):
        grads = random_grads(model, rng)
        w0, s0 = values(model.trainable_variables), values(opt.inner_optimizer.variables)
        for v, x in zip(twin.trainable_variables, w0):
            v.assign(x)
        for v, x in zip(bare.variables, s0):
            v.assign(x)
        if BACKEND == "jax" and step % 2:
            stateless_step(opt, model, grads)  # the path the JAX trainer takes
        else:
            opt.apply(grads, model.trainable_variables)
        bare.apply(grads, twin.trainable_variables)
        w1, s1 = values(model.trainable_variables), values(opt.inner_optimizer.variables)
        wb, sb = values(twin.trainable_variables), values(bare.variables)
        for v, a, b, ref in zip(model.trainable_variables, w0, w1, wb):
            keep = keep_array(v, masks)
            assert np.array_equal(b[~keep], a[~keep]), v.path
            np.testing.assert_allclose(b[keep], ref[keep], rtol=1e-6, atol=1e-7, err_msg=v.path)
        for k, (a, b, ref) in enumerate(zip(s0, s1, sb)):
            if k in owners:
                keep = keep_array(owners[k], masks)
                assert np.array_equal(b[~keep], a[~keep]), opt.inner_optimizer.variables[k].path
                np.testing.assert_allclose(b[keep], ref[keep], rtol=1e-6, atol=1e-7)
            else:
                np.testing.assert_allclose(b, ref, rtol=1e-6, atol=1e-7)
    # Every grouped slot-like variable was found by the name-based map.
    n_slots = sum(1 for k in owners if group_of(owners[k])[0] is not None)
    return opt, model, masks, n_slots


OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "sgd_momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "sgd_nesterov": lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adam_amsgrad": lambda: keras.optimizers.Adam(0.01, amsgrad=True),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
    "adamax": lambda: keras.optimizers.Adamax(0.01),
    "adagrad": lambda: keras.optimizers.Adagrad(0.01),
    "adadelta": lambda: keras.optimizers.Adadelta(1.0),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01, momentum=0.9, centered=True),
    "nadam": lambda: keras.optimizers.Nadam(0.01),
    "lion": lambda: keras.optimizers.Lion(0.01),
    "ftrl": lambda: keras.optimizers.Ftrl(
        0.01, l1_regularization_strength=0.01, l2_regularization_strength=0.01
    ),
    "lamb": lambda: keras.optimizers.Lamb(0.01),
}
if hasattr(keras.optimizers, "Muon"):
    OPTIMIZERS["muon"] = lambda: keras.optimizers.Muon(0.01)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_masked_slices_frozen_and_active_slices_match_bare(name):
    _, _, _, n_slots = check_masked_steps(OPTIMIZERS[name])
    if name != "sgd":
        assert n_slots > 0


def test_elementwise_optimizer_matches_bare_over_several_steps():
    # Adam is elementwise: with a fixed mask, active slices follow exactly the
    # bare optimizer run on its own for several steps.
    rng = np.random.default_rng(1)
    model, twin = make_model(), make_model()
    opt, bare = wrap(keras.optimizers.Adam(0.01)), keras.optimizers.Adam(0.01)
    opt.build(model.trainable_variables)
    masks = random_masks(opt, rng)
    opt.set_masks(masks)
    w0 = values(model.trainable_variables)
    for _ in range(3):
        grads = random_grads(model, rng)
        opt.apply(grads, model.trainable_variables)
        bare.apply(grads, twin.trainable_variables)
    for v, a, b, ref in zip(
        model.trainable_variables, w0, values(model.trainable_variables), values(twin.trainable_variables)
    ):
        keep = keep_array(v, masks)
        assert np.array_equal(b[~keep], a[~keep])
        np.testing.assert_allclose(b[keep], ref[keep], rtol=1e-6, atol=1e-7)


ELEMENTWISE = {"sgd", "sgd_momentum", "sgd_nesterov", "adam", "adam_amsgrad", "adamw", "adamax", "adagrad"}
ELEMENTWISE |= {"adadelta", "rmsprop", "nadam", "lion", "ftrl"}


def stateless_into(opt, model, grads):
    new_t, new_o = opt.stateless_apply(
        [v.value for v in opt.variables], grads, [v.value for v in model.trainable_variables]
    )
    for v, x in zip(model.trainable_variables, new_t):
        v.assign(x)
    for v, x in zip(opt.variables, new_o):
        v.assign(x)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_blend_at_assignment_equals_blend_after_update(name):
    # `stateless_apply` blends each assignment of an elementwise inner
    # optimizer as it is made. Its values equal those of the stateful apply,
    # which blends after the whole update, bit for bit. Optimizers that mix
    # the elements of a variable (Lamb's norms, Muon's orthogonalization), and
    # PyTorch's fused optimizers (they update in place), are left out.
    rng = np.random.default_rng(3)
    (model, opt), (twin, ref) = wrapped_twins(OPTIMIZERS[name])
    public = type(opt.inner_optimizer).__module__.startswith("keras.src.optimizers")
    assert opt._blends_in_scope == (name in ELEMENTWISE and public and BACKEND != "tensorflow")
    if BACKEND == "tensorflow":  # its optimizers write their variables directly
        with pytest.raises(ValueError, match="stateless_apply is not supported"):
            stateless_into(opt, model, random_grads(model, rng))
        return
    if name == "lamb":  # why Lamb is left out: its trust ratio reads the masked moments
        opt._blends_in_scope = True
    elif not opt._blends_in_scope:
        return  # (the assertion above is this case's check: it blends after the update)
    masks = random_masks(opt, rng)
    opt.set_masks(masks)
    ref.set_masks(masks)
    for _ in range(2):  # the second step starts from non-zero slots
        grads = random_grads(model, rng)
        stateless_into(opt, model, grads)
        ref.apply(grads, twin.trainable_variables)
    got = values(model.trainable_variables) + values(opt.variables)
    want = values(twin.trainable_variables) + values(ref.variables)
    same = [np.array_equal(a, b) for a, b in zip(got, want)]
    if name == "lamb":
        assert not all(same)
    else:
        assert all(same), [v.path for v, ok in zip(model.trainable_variables + opt.variables, same) if not ok]


def test_stateless_apply_rejects_a_wrong_number_of_values():
    model = make_model()
    opt = wrap(keras.optimizers.Adam(0.01))
    opt.build(model.trainable_variables)
    values_ = [v.value for v in model.trainable_variables][:-1]
    grads = [ops.zeros_like(v) for v in values_]
    with pytest.raises(ValueError, match=r"one value per variable .*Received: \d+ values"):
        opt.stateless_apply([v.value for v in opt.variables], grads, values_)


def test_blend_at_assignment_only_for_the_exact_elementwise_types():
    class MyAdam(keras.optimizers.Adam):  # may override update_step
        pass

    model = make_model()
    for inner, expected in (
        (keras.optimizers.Ftrl(0.01), BACKEND != "tensorflow"),
        (keras.optimizers.SGD(0.01), BACKEND == "jax"),  # PyTorch's is a fused subclass
        (MyAdam(0.01), False),
        (keras.optimizers.Lamb(0.01), False),
        (keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01)), False),
    ):
        opt = wrap(inner)
        opt.build(model.trainable_variables)
        assert opt._blends_in_scope is expected, type(inner).__name__


@pytest.mark.parametrize(
    "name",
    [
        "weight_decay",
        "clipnorm",
        "global_clipnorm",
        "clipvalue",
        "use_ema",
        "grad_accumulation",
        "schedule",
        "loss_scale_factor",
    ],
)
def test_optimizer_options(name):
    options = {
        "weight_decay": lambda: keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=0.5),
        "clipnorm": lambda: keras.optimizers.Adam(0.01, clipnorm=0.1),
        # global_clipnorm uses the norm of *all* gradients, masked ones included.
        "global_clipnorm": lambda: keras.optimizers.Adam(0.01, global_clipnorm=0.1),
        "clipvalue": lambda: keras.optimizers.Adam(0.01, clipvalue=0.1),
        "use_ema": lambda: keras.optimizers.Adam(
            0.01, use_ema=True, ema_momentum=0.5, ema_overwrite_frequency=2
        ),
        "grad_accumulation": lambda: keras.optimizers.Adam(0.01, gradient_accumulation_steps=2),
        "schedule": lambda: keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(0.1, 1, 0.5)),
        "loss_scale_factor": lambda: keras.optimizers.Adam(0.01, loss_scale_factor=4.0),
    }
    _, _, masks, _ = check_masked_steps(options[name], steps=3)
    # The comparison above covered both masked and updated modules.
    flat = np.concatenate([np.asarray(m).reshape(-1) for m in masks.values()])
    assert flat.any() and not flat.all(), masks


def test_adafactor_whole_layer_families_only():
    # Adafactor's factored accumulators do not have their variable's shape:
    # multi-module families are refused at build time ...
    model = make_model()
    opt = wrap(keras.optimizers.Adafactor(0.01))
    with pytest.raises(ValueError, match="cannot be masked per module"):
        opt.build(model.trainable_variables)
    # ... one-module families are masked all-or-nothing.
    model = make_model()
    annotate(model, conv_modules=1, exclude=["mha"], dense=True)
    opt = wrap(keras.optimizers.Adafactor(0.01))
    opt.build(model.trainable_variables)
    masks = {g.name: np.array([g.name != "out"]) for g in opt.families}
    opt.set_masks(masks)
    out_vars = [v for v in model.trainable_variables if v.path.startswith("out/")]
    before = values(out_vars)
    slots = [s for s in opt.inner_optimizer.variables if "out" in s.path or s.name in ("kernel", "bias")]
    rng = np.random.default_rng(0)
    for _ in range(2):
        opt.apply(random_grads(model, rng), model.trainable_variables)
    for a, b in zip(before, values(out_vars)):
        assert np.array_equal(a, b)
    # The "out" slots (velocities) never moved from their initial zeros.
    out_slots = [
        s for s in slots if s.path.endswith("out_kernel_velocity") or s.path.endswith("out_bias_velocity")
    ]
    assert out_slots and all(not np.any(x) for x in values(out_slots))


def test_reentering_module_resumes_from_own_slots():
    model = make_model()
    opt = wrap(keras.optimizers.SGD(0.1, momentum=0.9))
    opt.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    opt.apply(random_grads(model, rng), model.trainable_variables)
    momentum = [s for s in opt.inner_optimizer.variables if s.path.endswith("mha_query_kernel_momentum")][0]
    saved = values([momentum])[0]
    opt.set_masks({"mha/heads": [False, False]})
    for _ in range(2):
        opt.apply(random_grads(model, rng), model.trainable_variables)
    assert np.array_equal(values([momentum])[0], saved)
    opt.set_masks({"mha/heads": [True, True]})
    kernel = [v for v in model.trainable_variables if v.path == "mha/query/kernel"][0]
    w = values([kernel])[0]
    g = random_grads(model, rng)
    opt.apply(g, model.trainable_variables)
    g_kernel = keras.ops.convert_to_numpy(g[model.trainable_variables.index(kernel)])
    expected_m = 0.9 * saved - 0.1 * g_kernel
    np.testing.assert_allclose(values([momentum])[0], expected_m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(values([kernel])[0], w + expected_m, rtol=1e-5, atol=1e-6)


def stateless_step(opt, model, grads):
    tv, ov = opt.stateless_apply(
        [v.value for v in opt.variables], grads, [v.value for v in model.trainable_variables]
    )
    for v, x in zip(model.trainable_variables, tv):
        v.assign(x)
    for v, x in zip(opt.variables, ov):
        v.assign(x)


def loss_scale_step(opt, model, grads):
    # LossScaleOptimizer's stateful apply does not run on JAX (even bare):
    # the JAX trainer only uses stateless_apply.
    if BACKEND == "jax":
        stateless_step(opt, model, grads)
    else:
        opt.apply(grads, model.trainable_variables)


def assert_only_active_moved(model, before, masks):
    for v, a, b in zip(model.trainable_variables, before, values(model.trainable_variables)):
        keep = keep_array(v, masks)
        assert np.array_equal(b[~keep], a[~keep]), v.path
        if keep.any():
            assert not np.array_equal(b[keep], a[keep]), v.path


def test_loss_scale_optimizer_around_wrapper():
    model = make_model()
    opt = keras.optimizers.LossScaleOptimizer(wrap(keras.optimizers.Adam(0.01)), initial_scale=8.0)
    opt.build(model.trainable_variables)
    mat = opt.inner_optimizer
    masks = random_masks(mat, np.random.default_rng(0))
    mat.set_masks(masks)
    before = values(model.trainable_variables)
    rng = np.random.default_rng(1)
    for _ in range(2):
        loss_scale_step(opt, model, [g * 8.0 for g in random_grads(model, rng)])
    assert_only_active_moved(model, before, masks)


@pytest.mark.parametrize("write", ["set_masks", "assign", "frozen"])
def test_masks_written_between_steps_take_effect_at_the_next_apply(write):
    # An eager step (PyTorch) reuses the broadcast masks while the mask state
    # is unwritten. A write through `set_masks`, or straight to the state
    # variables (as a checkpoint restore does), counts from the next apply.
    # Families with every module updating are left out of the write-back.
    rng = np.random.default_rng(4)
    model = make_model()
    opt = wrap(keras.optimizers.Adam(0.01), policy=None)
    opt.build(model.trainable_variables)
    everything = {g.name: np.ones(g.num_modules, bool) for g in opt.families}
    before = values(model.trainable_variables)
    opt.apply(random_grads(model, rng), model.trainable_variables)
    assert_only_active_moved(model, before, everything)
    first = random_masks(opt, rng)
    opt.set_masks(first)
    before = values(model.trainable_variables)
    opt.apply(random_grads(model, rng), model.trainable_variables)
    assert_only_active_moved(model, before, first)
    second = {k: ~v for k, v in first.items()}
    if write == "set_masks":
        opt.set_masks(second)
    elif write == "assign":
        for g in opt.families:
            opt.mat_state[g.name]["mask"].assign(second[g.name].astype("float32"))
    else:  # stop the modules `first` updated, keep the masks: only `first`'s masked ones move
        for g in opt.families:
            opt.mat_state[g.name]["frozen"].assign(first[g.name].astype("float32"))
            opt.mat_state[g.name]["mask"].assign(np.ones(g.num_modules, "float32"))
    before = values(model.trainable_variables)
    opt.apply(random_grads(model, rng), model.trainable_variables)
    assert_only_active_moved(model, before, second)


def test_wrapper_around_loss_scale_optimizer():
    model = make_model()
    opt = wrap(keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01)))
    opt.build(model.trainable_variables)
    masks = random_masks(opt, np.random.default_rng(0))
    opt.set_masks(masks)
    before = values(model.trainable_variables)
    grads = random_grads(model, np.random.default_rng(1))
    loss_scale_step(opt, model, grads)
    assert_only_active_moved(model, before, masks)


@pytest.fixture
def mixed_precision():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    yield
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.skipif(
    BACKEND == "jax",
    reason="JAX on CPU cannot run float16 matmuls (dot_general precision F16_F16_F32 unsupported), "
    "with or without keras_mat; LossScaleOptimizer(wrap(...)) is tested directly above",
)
def test_mixed_float16_fit(mixed_precision):
    model = make_model()
    # policy=None: the masks set here must not be replaced by the MAT policy.
    model.compile(optimizer=wrap(keras.optimizers.Adam(0.01), policy=None), loss="mse")
    x, y = data()
    model.optimizer.build(model.trainable_variables)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    mat = model.optimizer.inner_optimizer
    masks = random_masks(mat, np.random.default_rng(0))
    mat.set_masks(masks)
    before = values(model.trainable_variables)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    for v, a, b in zip(model.trainable_variables, before, values(model.trainable_variables)):
        keep = keep_array(v, masks)
        assert np.array_equal(b[~keep], a[~keep])


class _CountingLoss(keras.losses.Loss):
    # A Python side effect runs once per trace on compiled backends.
    traces = 0

    def call(self, y_true, y_pred):
        type(self).traces += 1
        return ops.mean(ops.square(y_true - y_pred), axis=-1)


@pytest.mark.parametrize(
    "jit_compile",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                BACKEND == "torch",
                reason="jit_compile=True on torch means torch.compile (dynamo), which is slow on CPU and not part of this contract",
            ),
        ),
    ],
)
def test_fit_masks_are_state_not_constants(jit_compile):
    # The optimizer alone inside Keras's own train step (no MATCallback).
    model = make_model()
    # policy=None: the masks set by the callback are not replaced by the MAT policy.
    opt = wrap(keras.optimizers.Adam(0.01), policy=None)
    _CountingLoss.traces = 0
    model.compile(optimizer=opt, loss=_CountingLoss(), jit_compile=jit_compile)
    x, y = data(8)
    rng = np.random.default_rng(0)
    opt.build(model.trainable_variables)
    seen, traces = [], []

    class FlipMasks(keras.callbacks.Callback):
        # Changes the masks before every batch and checks after it.
        def on_train_batch_begin(self, batch, logs=None):
            if BACKEND == "jax":
                model.jax_state_sync()
            self.masks = random_masks(opt, rng)
            opt.set_masks(self.masks)
            self.before = values(model.trainable_variables)

        def on_train_batch_end(self, batch, logs=None):
            if BACKEND == "jax":
                model.jax_state_sync()
            seen.append({k: v.copy() for k, v in opt.masks.items()})
            traces.append(_CountingLoss.traces)
            for v, a, b in zip(model.trainable_variables, self.before, values(model.trainable_variables)):
                keep = keep_array(v, self.masks)
                assert np.array_equal(b[~keep], a[~keep]), v.path
                # The attention key bias has an exactly zero gradient (the softmax over
                # keys is invariant to q . b_k, a constant per query), so Adam may leave
                # it in place (XLA gets exact zeros on some CPUs): not a "must move" check.
                if keep.any() and not v.path.endswith("key/bias"):
                    assert not np.array_equal(b[keep], a[keep]), v.path

    model.fit(x, y, batch_size=4, epochs=2, verbose=0, shuffle=False, callbacks=[FlipMasks()])
    assert len(seen) == 4
    # Masks differ on every batch.
    assert any(not np.array_equal(seen[0][k], seen[1][k]) for k in seen[0])
    # A second fit with other masks reuses the same compiled step.
    opt.set_masks({g.name: np.ones(g.num_modules, bool) for g in opt.families})
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    if BACKEND == "tensorflow" or (BACKEND == "jax" and jit_compile):
        # Keras traces the loss once more for its symbolic build (also without
        # keras_mat); after the first batch nothing is traced again.
        assert traces[0] <= 2
        assert traces[-1] == traces[0] == _CountingLoss.traces


def test_save_load_round_trip(tmp_path):
    model = make_model()
    model.compile(
        optimizer=wrap(keras.optimizers.Adam(0.01), alpha=0.25, probe_every=7, policy=None), loss="mse"
    )
    x, y = data(8)
    model.optimizer.build(model.trainable_variables)
    masks = random_masks(model.optimizer, np.random.default_rng(0))
    model.optimizer.set_masks(masks)
    model.optimizer.mat_state["conv/filters"]["lambda_max"].assign(np.arange(4, dtype="float32"))
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    opt = loaded.optimizer
    assert isinstance(opt, ModularAdaptiveOptimizer)
    assert (opt.alpha, opt.probe_every, opt.policy) == (0.25, 7, None)
    assert type(opt.inner_optimizer) is type(model.optimizer.inner_optimizer)
    assert [g.name for g in opt.families] == [g.name for g in model.optimizer.families]
    for name in masks:
        assert np.array_equal(opt.masks[name], masks[name])
    np.testing.assert_array_equal(opt.lambda_max["conv/filters"], np.arange(4, dtype="float32"))
    assert len(opt.variables) == len(model.optimizer.variables)
    for a, b in zip(values(model.optimizer.variables), values(opt.variables)):
        np.testing.assert_array_equal(a, b)
    # Families are re-attached to the loaded variables by path.
    assert group_of(loaded.get_layer("conv").kernel)[0].name == "conv/filters"
    model.train_on_batch(x[:4], y[:4])
    loaded.train_on_batch(x[:4], y[:4])
    for v, a, b in zip(
        model.trainable_variables, values(model.trainable_variables), values(loaded.trainable_variables)
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=v.path)
        keep = keep_array(v, masks)
        assert np.array_equal(a[~keep], b[~keep])


def test_config_round_trip():
    opt = wrap(keras.optimizers.SGD(0.5, momentum=0.5), alpha=0.1, beta=0.01, warmup=3, skip_gradients=False)
    config = opt.get_config()
    clone = ModularAdaptiveOptimizer.from_config(config)
    assert isinstance(clone.inner_optimizer, keras.optimizers.SGD)
    assert clone.inner_optimizer.momentum == 0.5
    assert (clone.alpha, clone.beta, clone.warmup, clone.skip_gradients) == (0.1, 0.01, 3, False)
    # Older configs carry probe="fixed"; another probe is refused by name.
    assert ModularAdaptiveOptimizer.from_config({**config, "probe": "fixed"}).alpha == 0.1
    with pytest.raises(ValueError, match="Received: probe='batch'"):
        ModularAdaptiveOptimizer.from_config({**config, "probe": "batch"})
    clone2 = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(clone2, ModularAdaptiveOptimizer)


def test_delegation_and_state_layout():
    model = make_model()
    inner = keras.optimizers.Adam(0.01)
    opt = wrap(inner)
    assert float(keras.ops.convert_to_numpy(opt.learning_rate)) == pytest.approx(0.01)
    opt.learning_rate = 0.02
    assert float(keras.ops.convert_to_numpy(inner.learning_rate)) == pytest.approx(0.02)
    opt.build(model.trainable_variables)
    assert [g.name for g in opt.families] == ["mha/heads", "conv/filters", "out"]
    assert opt.variables[: len(opt._variables)] == opt._variables
    assert opt.variables[len(opt._variables) :] == inner.variables
    for g in opt.families:
        state = opt.mat_state[g.name]
        assert sorted(state) == sorted(
            ["mask", "frozen", "lambda_max", "lambda_init", "delta_prev", "delta_first"]
        )
        for v in state.values():
            assert tuple(v.shape) == (g.num_modules,)
    assert opt.masks["mha/heads"].dtype == bool and opt.masks["mha/heads"].all()
    assert not opt.frozen["conv/filters"].any()
    assert opt.lambda_max["out"].dtype == np.float32
    assert int(keras.ops.convert_to_numpy(opt.num_measurements.value)) == 0
    opt.apply(random_grads(model, np.random.default_rng(0)), model.trainable_variables)
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 1
    # Frozen modules are not updated even with mask 1.
    opt.mat_state["conv/filters"]["frozen"].assign(np.array([1, 0, 0, 0], "float32"))
    assert opt.masks["conv/filters"].tolist() == [False, True, True, True]
    active = opt.active_masks()
    assert keras.ops.convert_to_numpy(active["conv/filters"]).tolist() == [False, True, True, True]


def test_ungrouped_variables_always_updated():
    model = make_model()
    annotate(model, groups=[ModuleGroup("conv_only", [model.get_layer("conv").kernel], -1, 2, "filter")])
    opt = wrap(keras.optimizers.SGD(0.1))
    opt.build(model.trainable_variables)
    assert [g.name for g in opt.families] == ["conv_only"]
    opt.set_masks({"conv_only": [False, False]})
    before = values(model.trainable_variables)
    opt.apply(random_grads(model, np.random.default_rng(0)), model.trainable_variables)
    for v, a, b in zip(model.trainable_variables, before, values(model.trainable_variables)):
        assert np.array_equal(a, b) == (v.path == "conv/kernel"), v.path


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": "x"}, "alpha"),
        ({"beta": 0.0}, "beta"),
        ({"beta": float("inf")}, "beta"),
        ({"probe_every": 0}, "probe_every"),
        ({"probe_every": 2.5}, "probe_every"),
        ({"probe_samples": 0}, "probe_samples"),
        ({"warmup": -1}, "warmup"),
        ({"ntk_output": "logit"}, "ntk_output"),
        ({"threshold_scope": "layer"}, "threshold_scope"),
        ({"policy": "random"}, "policy"),
        ({"probe": "random"}, "probe"),
        ({"weight_decay": 0.1}, "weight_decay"),
        ({"ntk_output": np.array(["sum"])}, "ntk_output"),
        ({"policy": np.array([1.0])}, "policy"),
        ({"skip_gradients": "yes"}, "skip_gradients"),
    ],
)
def test_invalid_options(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        ModularAdaptiveOptimizer(keras.optimizers.Adam(), **kwargs)
    assert "Received:" in str(info.value)


def test_wrap_signature_and_identifiers():
    import inspect

    params = inspect.signature(wrap).parameters
    assert params["alpha"].default == 0.5 and params["probe_every"].default == 100
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for name, p in params.items() if name != "optimizer")
    opt = wrap("adamw", probe_every=7)
    assert isinstance(opt.inner_optimizer, keras.optimizers.AdamW) and opt.probe_every == 7
    with pytest.raises(ValueError, match="Received: optimizer='no-such-optimizer'"):
        wrap("no-such-optimizer")
    with pytest.raises(TypeError):
        wrap(keras.optimizers.Adam(), weight_decay=0.1)  # belongs on the inner optimizer


def test_exclude_from_weight_decay_reaches_the_inner_optimizer():
    model = make_model()
    opt = wrap(keras.optimizers.AdamW(0.1, weight_decay=0.5), policy=None)
    opt.exclude_from_weight_decay(var_names=["bias"])
    opt.build(model.trainable_variables)
    biases = [v for v in model.trainable_variables if "bias" in v.name]
    before = values(biases)
    kernel = model.get_layer("out").kernel
    kernel_before = np.array(keras.ops.convert_to_numpy(kernel.value))
    zeros = [keras.ops.zeros(tuple(v.shape)) for v in model.trainable_variables]
    opt.apply(zeros, model.trainable_variables)
    # A zero gradient moves a variable only through weight decay.
    for v, b in zip(biases, before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v.value), b, err_msg=v.path)
    assert not np.array_equal(keras.ops.convert_to_numpy(kernel.value), kernel_before)  # decayed


def test_invalid_inner_optimizer():
    with pytest.raises(TypeError, match="inner_optimizer"):
        ModularAdaptiveOptimizer("adam")
    with pytest.raises(ValueError, match="inner_optimizer"):
        wrap(wrap(keras.optimizers.Adam()))
    built = keras.optimizers.Adam()
    built.build(make_model().trainable_variables)
    with pytest.raises(ValueError, match="inner_optimizer"):
        wrap(built)


def test_set_masks_validation():
    model = make_model()
    opt = wrap(keras.optimizers.Adam())
    with pytest.raises(ValueError, match="not built"):
        opt.set_masks({"out": [True]})
    with pytest.raises(ValueError, match="not built"):
        _ = opt.masks
    opt.build(model.trainable_variables)
    with pytest.raises(ValueError, match="Unknown module family"):
        opt.set_masks({"nope": [True]})
    with pytest.raises(ValueError, match="shape"):
        opt.set_masks({"mha/heads": [True, False, True]})
    with pytest.raises(ValueError, match="boolean"):
        opt.set_masks({"mha/heads": [0.5, 1.0]})
    with pytest.raises(ValueError, match="dict"):
        opt.set_masks([True])
    opt.set_masks({"mha/heads": np.array([1, 0])})
    assert opt.masks["mha/heads"].tolist() == [True, False]


SUBSET_OPTIMIZERS = {
    **OPTIMIZERS,
    # EMA (with overwrite every step) and gradient accumulation act on every variable,
    # whatever subset an apply gets: the left-out ones must still stay bit for bit.
    "adam_ema_overwrite": lambda: keras.optimizers.Adam(0.01, use_ema=True, ema_overwrite_frequency=1),
    "sgd_accumulate": lambda: keras.optimizers.SGD(0.1, momentum=0.9, gradient_accumulation_steps=2),
}


@pytest.mark.parametrize("name", ["adamw", "sgd_momentum", "lamb", "adam_ema_overwrite", "sgd_accumulate"])
def test_subset_apply_equals_masked_full_apply(name):
    # The MAT step passes only the variables it differentiated (stateful
    # apply: a subset in any order; stateless: `None` gradients). That must
    # equal a full apply where the left-out variables' families are all off,
    # and leave the left-out variables and their slots bit for bit.
    rng = np.random.default_rng(1)
    (full_m, full_o), (sub_m, sub_o) = wrapped_twins(SUBSET_OPTIMIZERS[name])
    masks = random_masks(full_o, rng)
    off = {g.name for g in full_o.families if g.name.startswith("mha")}
    masks = {k: (np.zeros_like(v) if k in off else v) for k, v in masks.items()}
    full_o.set_masks(masks)
    sub_o.set_masks(masks)
    left_out = [
        i
        for i, v in enumerate(sub_m.trainable_variables)
        if group_of(v)[0] is not None and group_of(v)[0].name in off
    ]
    assert left_out, "the MHA families own no variable"
    owners = models.slot_owners(sub_o.inner_optimizer, sub_m)
    left_slots = [k for k, v in owners.items() if any(v is sub_m.trainable_variables[i] for i in left_out)]
    assert left_slots, "no slot of a left-out variable was found"
    for step in range(3):
        grads = random_grads(full_m, rng)
        full_o.apply(grads, full_m.trainable_variables)
        w0, s0 = values(sub_m.trainable_variables), values(sub_o.inner_optimizer.variables)
        if BACKEND == "jax" and step == 1:  # the JAX trainer's path: None for the left-out
            stateless_step(sub_o, sub_m, [None if i in left_out else g for i, g in enumerate(grads)])
        else:  # TF / torch steps: the differentiated subset, here in reverse order
            keep = [i for i in range(len(grads)) if i not in left_out][::-1]
            sub_o.apply([grads[i] for i in keep], [sub_m.trainable_variables[i] for i in keep])
        w1, s1 = values(sub_m.trainable_variables), values(sub_o.inner_optimizer.variables)
        for i in left_out:
            assert np.array_equal(w0[i], w1[i]), sub_m.trainable_variables[i].path
        for k in left_slots:
            assert np.array_equal(s0[k], s1[k]), sub_o.inner_optimizer.variables[k].path
        for a, b in zip(values(full_m.trainable_variables), w1):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        for a, b in zip(values(full_o.inner_optimizer.variables), s1):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # Every apply counts as a step (the iterations of an accumulating optimizer count updates).
    assert int(ops.convert_to_numpy(sub_o.iterations)) == int(ops.convert_to_numpy(full_o.iterations))
    assert int(ops.convert_to_numpy(sub_o.inner_optimizer._iterations)) == 3


@pytest.mark.parametrize("stateless", [False, True])
def test_skipped_variables_subset_apply(stateless):
    # Variables made non-trainable while all their modules are off: the train
    # step hands over only the trainable ones (JAX: to `stateless_apply`).
    # Both ways equal a full masked apply, and leave the skipped variables and
    # their slots bit for bit.
    rng = np.random.default_rng(2)
    (full_m, full_o), (sub_m, sub_o) = wrapped_twins(lambda: keras.optimizers.Adam(0.01))
    masks = {g.name: np.asarray([not g.name.startswith("mha")] * g.num_modules) for g in full_o.families}
    full_o.set_masks(masks)
    sub_o.set_masks(masks)
    assert sub_o._set_skipped(sub_o.skippable_variables())
    skipped = {id(v) for v in sub_o.skipped_variables}
    assert skipped and all(not v.trainable for v in sub_o.skipped_variables)
    live = [v for v in sub_o._trainable_variables if id(v) not in skipped]
    assert [v.path for v in sub_m.trainable_variables] == [v.path for v in live]
    for _ in range(2):
        grads = random_grads(full_m, rng)
        full_o.apply(grads, full_m.trainable_variables)
        sub_grads = [g for g, v in zip(grads, sub_o._trainable_variables) if id(v) not in skipped]
        before = values(sub_o.skipped_variables)
        if stateless:
            new_t, new_o = sub_o.stateless_apply(
                [v.value for v in sub_o.variables], sub_grads, [v.value for v in live]
            )
            for v, value in zip(live, new_t):
                v.assign(value)
            for v, value in zip(sub_o.variables, new_o):
                v.assign(value)
        else:
            sub_o.apply(sub_grads, live)
        for a, b in zip(before, values(sub_o.skipped_variables)):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(values(full_m.trainable_variables), values(sub_o._trainable_variables)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        for a, b in zip(values(full_o.inner_optimizer.variables), values(sub_o.inner_optimizer.variables)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert sub_o._set_skipped([]) and all(v.trainable for v in sub_o._trainable_variables)
