"""Baseline mask schedules (`keras_mat.baselines`): "Rand" (both readings) and
Multirate, on every backend, through `fit` with `keras_mat.MATCallback`."""

import keras
import numpy as np
import pytest

import keras_mat
from keras_mat import flops
from keras_mat.baselines import Multirate, PaperRand, RandomModules
from keras_mat.reference import module_selector
from keras_mat.training import find_mat_optimizer
from tests import models

BACKEND = keras.config.backend()
BATCH = 8


def _data(n, seed=0):
    # The first samples do not depend on n (two runs of different length share step 0).
    x = np.random.RandomState(seed).randn(n, 8, 8, 3).astype("float32")
    return x, np.random.RandomState(seed + 1).randint(0, 3, n)


class _Trace(keras.callbacks.Callback):
    """Weights before the first step and after every step, the masks in the
    optimizer state, the FLOPs counters of the `MATCallback` and the logs after
    every step. Variables are read from a list fixed before training: fully-off
    variables are made non-trainable while they are off."""

    def __init__(self, variables, mat):
        super().__init__()
        self.variables, self.mat = variables, mat
        self.weights, self.masks, self.logs, self.flops = [], [], [], []

    def _weights(self):
        return [np.array(keras.ops.convert_to_numpy(v.value)) for v in self.variables]

    def on_train_begin(self, logs=None):
        self.weights.append(self._weights())

    def on_train_batch_end(self, batch, logs=None):
        if BACKEND == "jax":
            self.model.jax_state_sync()
        opt = find_mat_optimizer(self.model.optimizer)
        self.weights.append(self._weights())
        self.masks.append(
            {k: np.asarray(keras.ops.convert_to_numpy(s["mask"].value)) for k, s in opt.mat_state.items()}
        )
        self.logs.append({k: float(v) for k, v in logs.items() if k.startswith("mat_")})
        self.flops.append(dict(self.mat.flops))


def _fit(schedule, inner=None, steps=8, seed_weights=0):
    # dense=True: the one-module classifier family is switched off whole at low fractions.
    model = models.set_weights_deterministic(keras_mat.annotate(models.cnn(), dense=True), seed=seed_weights)
    model.compile(
        optimizer=keras_mat.wrap(inner or keras.optimizers.Adam(1e-2), policy=schedule, ntk_output="sum"),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _data(steps * BATCH)
    # recompile="always": the skip set follows the schedule exactly (no compile-cost heuristic).
    mat = keras_mat.MATCallback(x, recompile="always", batch_size=BATCH)
    trace = _Trace(list(model.trainable_variables), mat)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[mat, trace])
    return model, trace


def _moved(model, trace, step):
    """family name -> bool array: which modules changed during `step`."""
    index = {id(v): i for i, v in enumerate(trace.variables)}
    before, after = trace.weights[step], trace.weights[step + 1]
    out = {}
    for g in keras_mat.get_groups(model):
        moved = np.zeros((g.num_modules,), bool)
        for m in range(g.num_modules):
            for v, axis in zip(g.variables, g.axes):
                sel = module_selector(tuple(v.shape), axis, g.num_modules, m)
                i = index[id(v)]
                moved[m] |= not np.array_equal(before[i][sel], after[i][sel])
        out[g.name] = moved
    return out


def _check_schedule_followed(schedule, model, trace, steps, all_updated_move=True):
    """Every step wrote the schedule's masks; masked modules stayed bit for bit
    and updated ones moved. Returns the expected masks per step."""
    fams = _families(model)
    names = [n for n, _ in fams]
    expected = []
    for step in range(steps):
        masks = dict(zip(names, schedule.masks(step, fams)))
        for name, m in trace.masks[step].items():
            np.testing.assert_array_equal(m, masks[name], err_msg=f"step {step} {name}")
        moved = _moved(model, trace, step)
        for name, m in masks.items():
            assert not np.any(moved[name] & (m < 0.5)), f"step {step}: a masked module of {name} moved"
            if all_updated_move:
                assert np.all(moved[name][m > 0.5]), f"step {step}: an updated module of {name} did not move"
            else:
                assert np.any(moved[name]) == bool(np.any(m > 0.5)), (step, name)
        expected.append(masks)
    return expected


def _families(model):
    return [(g.name, g.num_modules) for g in find_mat_optimizer(model.optimizer).families]


def test_random_modules_counts_and_change_steps():
    fams = [("a", 4), ("b", 6), ("c", 1)]
    schedule = RandomModules([1.0, 0.5, 0.25], every=3, seed=7)
    seen = []
    for step in range(12):
        masks = schedule.masks(step, fams)
        fraction = [1.0, 0.5, 0.25][min(step // 3, 2)]
        for (_, n), m in zip(fams, masks):
            assert m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0}
            assert int(m.sum()) == int(np.floor(fraction * n + 0.5)), (step, n, m)
        seen.append(tuple(np.concatenate(masks)))
    # Constant within an interval, redrawn at each change (steps 6 and 9 both at 0.25).
    for step in range(12):
        assert seen[step] == seen[step - step % 3]
    assert seen[6] != seen[9]
    # Deterministic: a fresh schedule with the same seed gives the same draws.
    again = RandomModules([1.0, 0.5, 0.25], every=3, seed=7)
    assert all(tuple(np.concatenate(again.masks(s, fams))) == seen[s] for s in range(12))
    # Per-family fractions; unlisted families are always updated.
    per = RandomModules({"b": [0.5, 0.0]}, every=2)
    assert [m.sum() for m in per.masks(0, fams)] == [4, 3, 1]
    assert [m.sum() for m in per.masks(5, fams)] == [4, 0, 1]
    with pytest.raises(ValueError, match="unknown module families"):
        RandomModules({"zz": 0.5}, every=2).masks(0, fams)


def test_rand_fit_follows_schedule_masked_modules_stay_and_flops_follow():
    schedule = RandomModules([1.0, 0.5, 0.25], every=2, seed=3)
    model, trace = _fit(schedule)
    opt = find_mat_optimizer(model.optimizer)
    expected = _check_schedule_followed(schedule, model, trace, 8, all_updated_move=False)
    report = flops.count_flops(model, 1, groups=opt.families)
    total = 0.0
    for step, masks in enumerate(expected):
        total += (
            flops.step_flops(report, {k: v > 0.5 for k, v in masks.items()}, frozen_prefix="auto") * BATCH
        )
        assert trace.flops[step]["train"] == pytest.approx(total, rel=1e-9)
        # No probe runs: no probe FLOPs, no measurement.
        assert trace.flops[step]["probe"] == 0.0
    assert trace.flops[7]["train"] < 8 * flops.step_flops(report, None, frozen_prefix="auto") * BATCH
    assert int(keras.ops.convert_to_numpy(opt.num_measurements.value)) == 0
    assert all(np.all(v == 0) for v in opt.lambda_max.values())
    # Each change of the set of fully-off variables is recorded with that set: the
    # variables of the families the schedule turned off completely.
    groups = {g.name: g for g in keras_mat.get_groups(model)}

    def off_paths(masks):
        return sorted(v.path for n, m in masks.items() if not np.any(m > 0.5) for v in groups[n].variables)

    changes, previous = [], []
    for step, masks in enumerate(expected):
        if off_paths(masks) != previous:
            previous = off_paths(masks)
            changes.append((step, previous))
    history = trace.mat.step_cache_info()["skip_history"]
    assert [(step, sorted(paths)) for step, paths in history] == changes
    assert changes, "the schedule never switched a family off: the test would check nothing"


def test_multirate_fast_every_step_slow_every_k_steps():
    k = 3
    schedule = Multirate(fast_fraction=0.5, k=k, seed=1)
    model, trace = _fit(schedule, inner=keras.optimizers.SGD(0.05), steps=7)
    fams = _families(model)
    fast = dict(zip([n for n, _ in fams], schedule.fast_modules(fams)))
    assert [int(f.sum()) for f in fast.values()] == [int(np.floor(0.5 * n + 0.5)) for _, n in fams]
    for step in range(7):
        moved = _moved(model, trace, step)
        for name, f in fast.items():
            assert np.all(moved[name][f]), f"step {step}: a fast module of {name} did not move"
            if step % k == 0:
                assert np.all(moved[name][~f]), f"step {step}: a slow module of {name} did not move"
            else:
                assert not np.any(moved[name][~f]), f"step {step}: a slow module of {name} moved"
    # Slow step size: the slow modules' gradients are scaled by k on their
    # update steps, which for plain SGD is exactly the step k*h.
    plain, plain_trace = _fit(
        Multirate(fast_fraction=0.5, k=k, seed=1, slow_lr_scale=1.0), keras.optimizers.SGD(0.05), 1
    )
    index = {id(v): i for i, v in enumerate(trace.variables)}
    for g in keras_mat.get_groups(model):
        for v, axis in zip(g.variables, g.axes):
            i = index[id(v)]
            for m in range(g.num_modules):
                sel = module_selector(tuple(v.shape), axis, g.num_modules, m)
                scaled = trace.weights[1][i][sel] - trace.weights[0][i][sel]
                ordinary = plain_trace.weights[1][i][sel] - plain_trace.weights[0][i][sel]
                factor = 1.0 if fast[g.name][m] else k
                np.testing.assert_allclose(scaled, factor * ordinary, rtol=1e-4, atol=1e-7)


def test_schedule_serializes_with_the_optimizer():
    for schedule in (
        RandomModules([1.0, 0.3], every=5, seed=2),
        Multirate(0.25, k=2, slow_lr_scale=1.5),
        PaperRand(0.4, every=3, seed=5),
    ):
        opt = keras_mat.wrap(keras.optimizers.SGD(0.1), policy=schedule)
        config = keras.optimizers.serialize(opt)
        restored = keras.optimizers.deserialize(config)
        assert type(restored.policy) is type(schedule)
        assert restored.policy.get_config() == schedule.get_config()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: RandomModules(1.5, every=2), "fractions"),
        (lambda: RandomModules([], every=2), "fractions"),
        (lambda: RandomModules([0.5, -0.1], every=2), "fractions"),
        (lambda: RandomModules(0.5, every=0), "every"),
        (lambda: RandomModules(0.5, every=2, seed=1.5), "seed"),
        (lambda: Multirate(fast_fraction=2.0), "fast_fraction"),
        (lambda: Multirate(k=0), "`k`"),
        (lambda: Multirate(slow_lr_scale=-1.0), "slow_lr_scale"),
        (lambda: keras_mat.wrap(keras.optimizers.SGD(), policy="rand"), "policy"),
        (lambda: PaperRand(1.5), "fraction=1.5"),
        (lambda: PaperRand(float("nan")), "fraction=nan"),
        (lambda: PaperRand([0.5]), "fraction"),
        (lambda: PaperRand(0.5, every=0), "every=0"),
        (lambda: PaperRand(0.5, seed="a"), "seed='a'"),
        (lambda: RandomModules(float("nan"), every=2), "fractions"),
        (lambda: Multirate(fast_fraction=float("nan")), "fast_fraction"),
        (lambda: Multirate(slow_lr_scale=float("inf")), "slow_lr_scale"),
        (lambda: RandomModules(0.5, every=2).masks(-1, [("a", 2)]), "step=-1"),
        (lambda: RandomModules(0.5, every=2).masks(1.5, [("a", 2)]), "step=1.5"),
        (lambda: PaperRand(0.5).masks(0, [("a", 0)]), r"families entry=\('a', 0\)"),
        (lambda: Multirate().masks(0, [("a",)]), "families entry"),
        (lambda: Multirate().masks(0, [(1, 2)]), "families entry"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_configs_hold_plain_python_numbers():
    cases = [
        (RandomModules(np.float32(0.5), every=np.int64(2), seed=np.int64(3)), 0.5),
        (RandomModules(np.array([0.5, 0.25]), every=2), [0.5, 0.25]),
        (RandomModules((1.0, np.float64(0.5)), every=2), [1.0, 0.5]),
        (
            RandomModules({"a": np.float32(0.5), "b": np.array([1.0, 0.0])}, every=2),
            {"a": 0.5, "b": [1.0, 0.0]},
        ),
        (PaperRand(np.float32(0.25), every=np.int64(3)), 0.25),
    ]
    for schedule, fractions in cases:
        config = schedule.get_config()
        assert config.get("fractions", config.get("fraction")) == fractions
        assert repr(schedule).count("np.") == 0 and "array" not in repr(schedule)
        assert all(type(v) in (int, float, list, dict) for v in config.values())
        assert type(schedule).from_config(config).get_config() == config
    with pytest.raises(TypeError, match=r"Multirate.fast_modules: `families`.*families='ab'"):
        Multirate().fast_modules("ab")


def test_masks_families_must_be_a_list():
    for schedule in (RandomModules(0.5, every=2), Multirate(), PaperRand()):
        with pytest.raises(TypeError, match="families='ab'"):
            schedule.masks(0, "ab")
    # numpy ints are ints.
    masks = PaperRand(0.5).masks(np.int64(3), [("a", np.int32(4))])
    assert masks[0].shape == (4,) and masks[0].sum() == 2


def test_paper_rand_fixed_share_redrawn_every_step():
    fams = [("a", 4), ("b", 6), ("c", 1), ("d", 8)]
    schedule = PaperRand(0.5, seed=11)
    draws = []
    for step in range(20):
        masks = schedule.masks(step, fams)
        for (_, n), m in zip(fams, masks):
            assert m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0}
            assert int(m.sum()) == int(np.floor(0.5 * n + 0.5)), (step, n, m)
        draws.append(tuple(np.concatenate(masks)))
    # Redrawn at every step: over 20 steps the 8-module family takes many subsets,
    # and every module of it is updated at some step and masked at another.
    d = np.array([x[11:] for x in draws])
    assert len({tuple(r) for r in d}) > 10
    assert np.all(d.max(axis=0) == 1.0) and np.all(d.min(axis=0) == 0.0)
    # Pure function of (seed, step): resuming or another backend gives the same draws.
    again = PaperRand(0.5, seed=11)
    assert [tuple(np.concatenate(again.masks(s, fams))) for s in (7, 3, 19)] == [draws[s] for s in (7, 3, 19)]
    assert tuple(np.concatenate(PaperRand(0.5, seed=12).masks(7, fams))) != draws[7]
    # every=k keeps a draw for k steps; the share never changes over time.
    slow = PaperRand(0.25, every=4, seed=0)
    assert all(np.array_equal(slow.masks(s, fams)[3], slow.masks(s - s % 4, fams)[3]) for s in range(12))
    assert [float(slow.masks(s, fams)[3].sum()) for s in (0, 100, 10_000)] == [2.0, 2.0, 2.0]
    assert PaperRand(0.0).masks(0, fams)[0].sum() == 0 and PaperRand(1.0).masks(0, fams)[1].sum() == 6


def test_paper_rand_fit_masked_modules_stay():
    schedule = PaperRand(0.5, every=1, seed=4)
    model, trace = _fit(schedule, steps=5)
    expected = _check_schedule_followed(schedule, model, trace, 5)
    # Redrawn during the run.
    changed = sum(any(not np.array_equal(a[k], b[k]) for k in a) for a, b in zip(expected[1:], expected[:-1]))
    assert changed >= 3


def test_schedule_needs_one_step_per_execution():
    model = keras_mat.annotate(models.cnn())
    model.compile(
        optimizer=keras_mat.wrap(
            keras.optimizers.SGD(), policy=RandomModules(0.5, every=2), ntk_output="sum"
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=2,
    )
    x, y = _data(16)
    with pytest.raises(ValueError, match="steps_per_execution"):
        model.fit(x, y, batch_size=BATCH, verbose=0, callbacks=[keras_mat.MATCallback(x)])
