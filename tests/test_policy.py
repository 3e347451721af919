"""Tests of the pure MAT policies (`keras_mat.policy`) on the active backend."""

import functools
import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_mat import policy as P

BACKEND = keras.config.backend()


def _t(values):
    return ops.convert_to_tensor(np.asarray(values, dtype="float32"))


def _lams(*families):
    return [_t(f) for f in families]


def _np(state):
    """A PolicyState as nested numpy (lists of arrays + int)."""
    fields = [[ops.convert_to_numpy(v) for v in getattr(state, name)] for name in P.PolicyState._fields[:5]]
    return (*fields, int(ops.convert_to_numpy(state.measurement)))


def _assert_state(state, masks=None, frozen=None, measurement=None):
    got = _np(state)
    if masks is not None:
        for g, e in zip(got[0], masks):
            np.testing.assert_array_equal(g, np.asarray(e, "float32"))
    if frozen is not None:
        for g, e in zip(got[1], frozen):
            np.testing.assert_array_equal(g, np.asarray(e, "float32"))
    if measurement is not None:
        assert got[5] == measurement


def _assert_same(a, b):
    a, b = _np(a), _np(b)
    for fa, fb in zip(a[:5], b[:5]):
        for x, y in zip(fa, fb):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=0)
    assert a[5] == b[5]


# Two head families share the global scope; one filter family is its own scope.
KINDS = ["head", "head", "filter"]
SCRIPT = [
    # r = 0: warm-up, everything trains; lambda_init := lambda(0).
    ([1, 2, 3], [4, 5], [1, 1, 1, 1]),
    # r = 1: Delta(1) = A [1,0,2], B [0,2], C [0,1,2,4]; no stopping (r < 2).
    # scope 0: {2,2,5,4,7} -> threshold 2 + 0.5*5 = 4.5; scope 1: {1,2,3,5} -> 3.
    ([2, 2, 5], [4, 7], [1, 2, 3, 5]),
    # r = 2: Delta = A [2,0,2.05], B [0,4], C [0,1,2.5,8].
    # A2 updated, |2.05-2|/2 = 0.025 < 0.1 -> frozen. A1, B0, C0 have change 0
    # but were not updated -> not frozen. B1: 2/2, C2: .5/2, C3: 4/4 -> alive.
    # scope 0 alive {3,2,4,9} -> threshold 5.5; scope 1 {1,2,3.5,9} -> 5.
    ([3, 2, 5.05], [4, 9], [1, 2, 3.5, 9]),
    # r = 3: A2 is frozen: its huge lambda neither unfreezes it nor enters lmax.
    # Delta = A [2,0,97], B [0,4.1], C [0,1,2.5,8.2]. B1: .1/2 = .05, C3:
    # .2/4 = .05 -> frozen. scope 0 alive {3,2,4} -> 3 (A0, B0 >= 3); scope 1
    # alive {1,2,3.5} -> 2.25.
    ([3, 2, 100], [4, 9.1], [1, 2, 3.5, 9.2]),
]
EXPECTED_MASKS = [
    ([1, 1, 1], [1, 1], [1, 1, 1, 1]),
    ([0, 0, 1], [0, 1], [0, 0, 1, 1]),
    ([0, 0, 0], [0, 1], [0, 0, 0, 1]),
    ([1, 0, 0], [1, 0], [0, 0, 1, 0]),
]
EXPECTED_FROZEN = [
    ([0, 0, 0], [0, 0], [0, 0, 0, 0]),
    ([0, 0, 0], [0, 0], [0, 0, 0, 0]),
    ([0, 0, 1], [0, 0], [0, 0, 0, 0]),
    ([0, 0, 1], [0, 1], [0, 0, 0, 1]),
]
CONFIG = dict(alpha=0.5, beta=0.1, warmup=1)


def _run_script(update):
    state = P.initial_state([3, 2, 4])
    states = []
    for lams in SCRIPT:
        state = update(_lams(*lams), state)
        states.append(state)
    return states


def test_scope_ids():
    assert P.scope_ids(KINDS) == [0, 0, 1]
    assert P.scope_ids(["filter", "head", "expert", "filter", "layer", "custom", "layer", "custom"]) == [
        0,
        1,
        1,
        2,
        3,
        4,
        3,
        5,
    ]
    assert P.scope_ids(KINDS, "global") == [0, 0, 0]
    assert P.scope_ids(KINDS, "per_layer") == [0, 1, 2]
    assert P.scope_ids([], "auto") == []
    with pytest.raises(ValueError, match=r"`threshold_scope`.*Received: threshold_scope='layer'"):
        P.scope_ids(KINDS, "layer")
    with pytest.raises(ValueError, match=r"`kinds`.*Received: kinds="):
        P.scope_ids(["head", "neuron"])


def test_scripted_sequence():
    update = functools.partial(P.policy_update, scopes=P.scope_ids(KINDS), **CONFIG)
    states = _run_script(update)
    for r, state in enumerate(states):
        _assert_state(state, EXPECTED_MASKS[r], EXPECTED_FROZEN[r], r + 1)
    masks, frozen, lambda_init, delta_prev, delta_first, _ = _np(states[-1])
    for got, exp in zip(lambda_init, SCRIPT[0]):
        np.testing.assert_array_equal(got, np.asarray(exp, "float32"))
    for got, exp in zip(delta_first, ([1, 0, 2], [0, 2], [0, 1, 2, 4])):
        np.testing.assert_array_equal(got, np.asarray(exp, "float32"))
    for got, exp in zip(delta_prev, ([2, 0, 97], [0, 4.1], [0, 1, 2.5, 8.2])):
        np.testing.assert_allclose(got, np.asarray(exp, "float32"), rtol=1e-6)
    for m in masks + frozen + lambda_init + delta_prev + delta_first:
        assert m.dtype == np.float32 and np.all(np.isfinite(m))
    assert ops.convert_to_numpy(states[-1].measurement).dtype == np.int32


def test_per_layer_scope_changes_thresholds():
    # Same measurements, every family its own scope: B's threshold at r = 1 is
    # 4 + 0.5 * 3 = 5.5 (not the shared 4.5) and A's is 2 + 0.5 * 3 = 3.5.
    update = functools.partial(P.policy_update, scopes=P.scope_ids(KINDS, "per_layer"), **CONFIG)
    states = _run_script(update)
    _assert_state(states[1], masks=([0, 0, 1], [0, 1], [0, 0, 1, 1]))
    # r = 2: A alive {3,2} -> 2.5 (A2 frozen); B {4,9} -> 6.5.
    _assert_state(states[2], masks=([1, 0, 0], [0, 1], [0, 0, 0, 1]), frozen=EXPECTED_FROZEN[2])


def test_modular_alpha_zero_updates_all_alive():
    rng = np.random.default_rng(0)
    lams = [_t(rng.uniform(0, 10, 5)), _t(rng.uniform(0, 10, 3))]
    frozen = [_t([0, 1, 0, 0, 1]), _t([0, 0, 0])]
    masks = P.modular_masks(lams, frozen, alpha=0.0, scopes=[0, 0])
    np.testing.assert_array_equal(ops.convert_to_numpy(masks[0]), [1, 0, 1, 1, 0])
    np.testing.assert_array_equal(ops.convert_to_numpy(masks[1]), [1, 1, 1])


def test_modular_ties_are_updated():
    # threshold = 0 + 0.25 * 4 = 1 exactly: the module at 1 is updated.
    masks = P.modular_masks([_t([0, 1, 4]), _t([1, 0.5])], [_t([0, 0, 0]), _t([0, 0])], 0.25, [0, 0])
    np.testing.assert_array_equal(ops.convert_to_numpy(masks[0]), [0, 1, 1])
    np.testing.assert_array_equal(ops.convert_to_numpy(masks[1]), [1, 0])


def test_modular_all_equal_updates_all():
    masks = P.modular_masks([_t([2, 2, 2]), _t([2])], [_t([0, 0, 0]), _t([0])], 0.99, [0, 0])
    np.testing.assert_array_equal(ops.convert_to_numpy(masks[0]), [1, 1, 1])
    np.testing.assert_array_equal(ops.convert_to_numpy(masks[1]), [1])


def test_modular_largest_is_always_updated():
    # lmin + alpha * (lmax - lmin) may round above lmax; it is clipped at lmax.
    lam = _t([1.0, np.nextafter(np.float32(1.0), np.float32(2.0))])
    masks = P.modular_masks([lam], [_t([0, 0])], 0.999999, [0])
    assert ops.convert_to_numpy(masks[0])[1] == 1.0


def test_scope_all_frozen_gives_zero_masks_without_nan():
    lams = [_t([3, 7, 1]), _t([5, 2]), _t([1e30, 0])]
    frozen = [_t([1, 1, 1]), _t([0, 0]), _t([1, 1])]
    masks = P.modular_masks(lams, frozen, 0.5, scopes=[0, 1, 0])
    np.testing.assert_array_equal(ops.convert_to_numpy(masks[0]), [0, 0, 0])
    np.testing.assert_array_equal(ops.convert_to_numpy(masks[1]), [1, 0])
    np.testing.assert_array_equal(ops.convert_to_numpy(masks[2]), [0, 0])
    # Through the full update too: nothing non-finite anywhere.
    state = P.initial_state([3, 2, 2])._replace(frozen=frozen)
    for _ in range(3):
        state = P.policy_update(lams, state, 0.5, 0.1, scopes=[0, 1, 0], warmup=0)
        for field in _np(state)[:5]:
            assert all(np.all(np.isfinite(v)) for v in field)
        np.testing.assert_array_equal(_np(state)[0][0], [0, 0, 0])


def test_warmup_updates_all_alive_and_suppresses_stopping():
    update = functools.partial(P.policy_update, alpha=0.9, beta=1e9, scopes=[0, 0], warmup=3)
    state = P.initial_state([3, 2])._replace(frozen=[_t([0, 1, 0]), _t([0, 0])])
    lams = _lams([1, 2, 30], [4, 5])
    for r in range(3):
        state = update(lams, state)
        # Everything alive trains; beta is huge, but r < warmup stops nothing.
        _assert_state(state, masks=([1, 0, 1], [1, 1]), frozen=([0, 1, 0], [0, 0]), measurement=r + 1)
    state = update(lams, state)
    # r = 3 >= max(2, warmup): every updated alive module is stopped.
    _assert_state(state, masks=([0, 0, 0], [0, 0]), frozen=([1, 1, 1], [1, 1]), measurement=4)


def test_warmup_zero_applies_threshold_from_first_measurement():
    state = P.policy_update(_lams([1, 2, 3]), P.initial_state([3]), 0.5, 0.1, scopes=[0], warmup=0)
    _assert_state(state, masks=([0, 1, 1],), frozen=([0, 0, 0],), measurement=1)


def test_no_stopping_before_second_measurement():
    update = functools.partial(P.policy_update, alpha=0.0, beta=1e9, scopes=[0], warmup=0)
    state = P.initial_state([2])
    lams = _lams([1, 2])
    for r in range(2):
        state = update(lams, state)
        _assert_state(state, masks=([1, 1],), frozen=([0, 0],), measurement=r + 1)
    state = update(lams, state)
    _assert_state(state, masks=([0, 0],), frozen=([1, 1],), measurement=3)


def test_stop_is_permanent():
    update = functools.partial(P.policy_update, alpha=0.0, beta=0.5, scopes=[0], warmup=0)
    state = P.initial_state([2])
    # Delta(1) = [1, 1]; Delta(2) = [1.1, 3]: module 0 changed by .1/1 -> stopped.
    for lam in ([1, 1], [2, 2], [2.1, 4]):
        state = update(_lams(lam), state)
    _assert_state(state, masks=([0, 1],), frozen=([1, 0],))
    # Its lambda now moves a lot, and its old mask is forced back to 1: it
    # stays frozen, masked and out of the threshold.
    state = state._replace(masks=[_t([1, 1])])
    for lam in ([50, 9], [-3, 20]):
        state = update(_lams(lam), state)
        _assert_state(state, frozen=([1, 0],), masks=([0, 1],))


def test_not_updated_module_is_not_stopped():
    state = P.initial_state([2])._replace(
        masks=[_t([0, 1])],
        lambda_init=[_t([1, 1])],
        delta_prev=[_t([1, 1])],
        delta_first=[_t([1, 1])],
        measurement=ops.convert_to_tensor(5, "int32"),
    )
    # Both have change 0 < beta, only the updated one stops.
    frozen, *_ = P.temporal_stop(_lams([2, 2]), state, beta=0.1)
    np.testing.assert_array_equal(ops.convert_to_numpy(frozen[0]), [0, 1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_lambda_is_a_no_op(bad):
    update = functools.partial(P.policy_update, scopes=P.scope_ids(KINDS), **CONFIG)
    state = _run_script(update)[2]
    lams = _lams([3, 2, 100], [4, bad], [1, 2, 3.5, 9.2])
    assert not bool(ops.convert_to_numpy(P.all_finite(lams)))
    assert bool(ops.convert_to_numpy(P.all_finite(_lams(*SCRIPT[3]))))
    new = update(lams, state)
    _assert_same(new, state)
    # The next finite measurement takes its place (r = 3), as in the script.
    _assert_state(update(_lams(*SCRIPT[3]), new), EXPECTED_MASKS[3], EXPECTED_FROZEN[3], 4)


def test_non_finite_first_measurement_does_not_set_lambda_init():
    update = functools.partial(P.policy_update, alpha=0.5, beta=0.1, scopes=[0])
    state = P.initial_state([2])
    new = update(_lams([float("nan"), 1]), state)
    _assert_same(new, state)


def _reference(script, kinds_scopes, alpha, beta, warmup, eps=1e-12, period=1):
    """Plain numpy MAT, straight from the spec, one module at a time; the
    temporal rule at every `period`-th measurement (t = r / period)."""
    sizes = [len(f) for f in script[0]]
    n = len(sizes)
    frozen = [np.zeros(g) for g in sizes]
    masks = [np.ones(g) for g in sizes]
    init = [np.zeros(g) for g in sizes]
    prev = [np.zeros(g) for g in sizes]
    first = [np.zeros(g) for g in sizes]
    out = []
    for r, lams in enumerate(script):
        for i in range(n):
            lam = np.asarray(lams[i], "float64")
            if r == 0:
                init[i] = lam.copy()
            delta = np.abs(lam - init[i])
            if r % period:
                continue
            if r == period:
                first[i] = delta.copy()
            for j in range(sizes[i]):
                if r >= max(2 * period, warmup) and masks[i][j] == 1 and not frozen[i][j]:
                    if abs(delta[j] - prev[i][j]) / max(first[i][j], eps) < beta:
                        frozen[i][j] = 1
            prev[i] = delta
        new_masks = []
        for i in range(n):
            lam = np.asarray(lams[i], "float64")
            alive = [
                (lams[k][j], frozen[k][j])
                for k in range(n)
                if kinds_scopes[k] == kinds_scopes[i]
                for j in range(sizes[k])
            ]
            alive = [v for v, f in alive if not f]
            if r < warmup:
                new_masks.append(1.0 - frozen[i])
            elif not alive:
                new_masks.append(np.zeros(sizes[i]))
            else:
                lo, hi = min(alive), max(alive)
                thr = lo + alpha * (hi - lo)
                new_masks.append(np.where((frozen[i] == 0) & (lam >= thr), 1.0, 0.0))
        masks = new_masks
        out.append(([m.copy() for m in masks], [f.copy() for f in frozen]))
    return out


def _random_script(seed, length=7):
    rng = np.random.default_rng(seed)
    sizes = [4, 3, 5, 2]
    base = [rng.uniform(1, 10, g) for g in sizes]
    drift = [rng.uniform(0, 2, g) for g in sizes]
    # Saturating drift (Delta settles, so the module stops part-way) for some
    # modules, linear drift (relative change 1 > beta, never stops) for others.
    linear = [rng.uniform(size=g) < 0.4 for g in sizes]
    script = []
    for r in range(length):
        script.append(
            [
                np.round(b + d * np.where(lin, r, 1 - 0.5**r), 3).astype("float32")
                for b, d, lin in zip(base, drift, linear)
            ]
        )
    return script


@pytest.mark.parametrize("threshold_scope", ["auto", "global", "per_layer"])
def test_matches_numpy_reference(threshold_scope):
    kinds = ["head", "filter", "head", "filter"]
    scopes = P.scope_ids(kinds, threshold_scope)
    script = _random_script(1)
    expected = _reference(script, scopes, alpha=0.4, beta=0.3, warmup=2)
    state = P.initial_state([len(f) for f in script[0]])
    history = []
    for r, lams in enumerate(script):
        state = P.policy_update(_lams(*lams), state, 0.4, 0.3, scopes=scopes, warmup=2)
        masks, frozen = _np(state)[:2]
        for got, exp in zip(masks, expected[r][0]):
            np.testing.assert_array_equal(got, exp)
        for got, exp in zip(frozen, expected[r][1]):
            np.testing.assert_array_equal(got, exp)
        history.append((sum(int(f.sum()) for f in frozen), sum(int(m.sum()) for m in masks)))
    # The scenario is not degenerate: stopping is gradual and partial.
    stopped = [h[0] for h in history]
    assert stopped[2] == 0 and 0 < stopped[3] <= stopped[-1] < sum(len(f) for f in script[0])


@pytest.mark.parametrize("threshold_scope", ["global", "per_layer"])
def test_flat_update_matches_numpy_reference(threshold_scope):
    # The optimizer runs the flat form: one (M,) vector per quantity.
    kinds = ["head", "filter", "head", "filter"]
    scopes = P.scope_ids(kinds, threshold_scope)
    script = _random_script(3)
    sizes = [len(f) for f in script[0]]
    expected = _reference(script, scopes, alpha=0.4, beta=0.3, warmup=2)
    layout = P.module_scopes(sizes, scopes)
    start = P.initial_state(sizes)
    state = P.PolicyState(*(P.flatten_families(v) for v in start[:5]), start.measurement)
    for r, lams in enumerate(script):
        state = P.policy_update_flat(
            ops.convert_to_tensor(np.concatenate(lams)), state, 0.4, 0.3, layout, warmup=2
        )
        masks = np.split(ops.convert_to_numpy(state.masks), np.cumsum(sizes)[:-1])
        frozen = np.split(ops.convert_to_numpy(state.frozen), np.cumsum(sizes)[:-1])
        for got, exp in zip(masks, expected[r][0]):
            np.testing.assert_array_equal(got, exp)
        for got, exp in zip(frozen, expected[r][1]):
            np.testing.assert_array_equal(got, exp)
        assert int(ops.convert_to_numpy(state.measurement)) == r + 1
    assert 0 < int(ops.convert_to_numpy(state.frozen).sum()) < sum(sizes)


@pytest.mark.parametrize("period", [2, 3])
def test_period_matches_numpy_reference(period):
    # t counts `period` measurements: Delta(1) is the drift over the first
    # `period` measurements and the rule only runs at r = t * period.
    scopes = P.scope_ids(["head", "filter", "head", "filter"])
    script = _random_script(2, length=4 * period + 2)
    expected = _reference(script, scopes, alpha=0.4, beta=0.3, warmup=2, period=period)
    state = P.initial_state([len(f) for f in script[0]])
    stops = []
    for r, lams in enumerate(script):
        state = P.policy_update(_lams(*lams), state, 0.4, 0.3, scopes=scopes, warmup=2, period=period)
        masks, frozen = _np(state)[:2]
        for got, exp in zip(masks, expected[r][0]):
            np.testing.assert_array_equal(got, exp)
        for got, exp in zip(frozen, expected[r][1]):
            np.testing.assert_array_equal(got, exp)
        stops.append(sum(int(f.sum()) for f in frozen))
    # Nothing stops before t = 2; stops happen only on t boundaries.
    assert stops[2 * period - 1] == 0 and stops[-1] > 0
    changes = [r for r in range(1, len(stops)) if stops[r] != stops[r - 1]]
    assert changes and all(r % period == 0 for r in changes)


def test_period_equals_subsampled_per_measurement_reading():
    # With every module updated (alpha = 0), the rule at period W over a
    # script freezes what period 1 freezes over every W-th measurement.
    script = _random_script(3, length=13)
    period = 3
    sizes = [len(f) for f in script[0]]
    update = functools.partial(P.policy_update, alpha=0.0, beta=0.3, scopes=[0, 0, 0, 0], warmup=1)
    state_w, state_1 = P.initial_state(sizes), P.initial_state(sizes)
    for r, lams in enumerate(script):
        state_w = update(_lams(*lams), state_w, period=period)
        if r % period == 0:
            state_1 = update(_lams(*lams), state_1)
            for a, b in zip(_np(state_w)[1], _np(state_1)[1]):
                np.testing.assert_array_equal(a, b)
    assert sum(int(f.sum()) for f in _np(state_w)[1]) > 0


def test_period_one_is_the_per_measurement_reading():
    update = functools.partial(P.policy_update, scopes=P.scope_ids(KINDS), **CONFIG)
    for a, b in zip(_run_script(update), _run_script(functools.partial(update, period=1))):
        _assert_same(a, b)


def _compiled_variants(fn):
    """(name, compiled fn) pairs for the active backend; torch runs eager only."""
    if BACKEND == "jax":
        import jax

        return [("jax.jit", jax.jit(fn))]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return [
            ("tf.function", tf.function(fn, jit_compile=False)),
            ("tf.function(jit_compile=True)", tf.function(fn, jit_compile=True)),
        ]
    return []


@pytest.mark.skipif(BACKEND not in ("jax", "tensorflow"), reason="compiled variants exist on jax/tf only")
def test_compiled_matches_eager():
    update = functools.partial(P.policy_update, scopes=P.scope_ids(KINDS), **CONFIG)
    eager = _run_script(update)
    bad = _lams([3, 2, 100], [4, float("nan")], [1, 2, 3.5, 9.2])
    for _, compiled in _compiled_variants(update):
        states = _run_script(compiled)
        for a, b in zip(states, eager):
            _assert_same(a, b)
        _assert_same(compiled(bad, eager[2]), eager[2])
    # A period given as a tensor argument of the compiled function.
    script = _random_script(2, length=8)
    scopes = P.scope_ids(["head", "filter", "head", "filter"])
    periodic = functools.partial(P.policy_update, alpha=0.4, beta=0.3, scopes=scopes, warmup=2)
    for _, compiled in _compiled_variants(periodic):
        a = b = P.initial_state([len(f) for f in script[0]])
        for lams in script:
            a = compiled(_lams(*lams), a, period=ops.convert_to_tensor(2, "int32"))
            b = periodic(_lams(*lams), b, period=2)
            _assert_same(a, b)
    for _, compiled in _compiled_variants(P.all_finite):
        assert not bool(ops.convert_to_numpy(compiled(bad)))
    mask_fn = functools.partial(P.expand_mask, shape=(2, 6, 3), axis=1)
    for _, compiled in _compiled_variants(mask_fn):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(compiled(_t([1, 0, 1]))), ops.convert_to_numpy(mask_fn(_t([1, 0, 1])))
        )


def test_expand_mask():
    m = ops.convert_to_numpy(P.expand_mask(_t([1, 0]), (3, 4), 1))
    np.testing.assert_array_equal(m, [[1, 1, 0, 0]])
    m = ops.convert_to_numpy(P.expand_mask(_t([1, 0, 1]), (6, 2, 5), 0))
    assert m.shape == (6, 1, 1)
    np.testing.assert_array_equal(m.ravel(), [1, 1, 0, 0, 1, 1])
    m = ops.convert_to_numpy(P.expand_mask(_t([0, 1, 1]), (2, 3), -1))
    np.testing.assert_array_equal(m, [[0, 1, 1]])
    m = ops.convert_to_numpy(P.expand_mask(_t([0]), (2, 3), None))
    assert m.shape == (1, 1) and m.item() == 0
    m = ops.convert_to_numpy(P.expand_mask(_t([1]), (), None))
    assert m.shape == () and m.item() == 1
    # Broadcasting onto the variable selects exactly the module's block.
    w = np.arange(24, dtype="float32").reshape(2, 12)
    got = ops.convert_to_numpy(ops.multiply(_t(w), P.expand_mask(_t([0, 1, 0, 1]), w.shape, 1)))
    np.testing.assert_array_equal(got, w * np.repeat([0, 1, 0, 1], 3)[None, :])
    with pytest.raises(ValueError, match=r"Received: mask.shape=\(2,\)"):
        P.expand_mask(_t([1, 0]), (3, 4), None)
    with pytest.raises(ValueError, match=r"Received: mask.shape=\(3,\)"):
        P.expand_mask(_t([1, 0, 1]), (3, 4), 1)
    with pytest.raises(ValueError, match=r"Received: axis=2"):
        P.expand_mask(_t([1, 0]), (3, 4), 2)


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), True, "0.5", None])
def test_check_alpha_rejects(value):
    with pytest.raises(ValueError, match=r"`alpha`.*Received: alpha="):
        P.check_alpha(value)


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan"), False, "1"])
def test_check_beta_rejects(value):
    with pytest.raises(ValueError, match=r"`beta`.*Received: beta="):
        P.check_beta(value)


@pytest.mark.parametrize("value", [-1, 1.5, True, "1", None])
def test_check_warmup_rejects(value):
    with pytest.raises(ValueError, match=r"`warmup`.*Received: warmup="):
        P.check_warmup(value)


def test_checks_accept_and_normalize():
    assert P.check_alpha(0) == 0.0 and isinstance(P.check_alpha(0), float)
    assert P.check_alpha(np.float32(0.5)) == 0.5
    assert P.check_beta(2) == 2.0
    assert P.check_warmup(0) == 0 and P.check_warmup(np.int64(3)) == 3
    assert math.isclose(P.check_beta(1e-6), 1e-6)


def test_structure_errors():
    with pytest.raises(ValueError, match=r"`scopes`.*Received: len\(scopes\)=1"):
        P.modular_masks(_lams([1], [2]), _lams([0], [0]), 0.5, scopes=[0])
    with pytest.raises(TypeError, match=r"`lambda_max`"):
        P.modular_masks(_t([1, 2]), _lams([0, 0]), 0.5, [0])


def test_temporal_period_readings():
    # "training": a quarter of the planned steps (8 epochs x 80 steps / 4 = 160 steps = 16 measurements).
    assert P.temporal_period("training", probe_every=10, steps_per_epoch=80, epochs=8) == 16
    assert P.temporal_period("training", probe_every=50, steps_per_epoch=10, epochs=2) == 1
    assert P.temporal_period("training", probe_every=10, steps_per_epoch=80) == P.FALLBACK_PERIOD
    assert P.temporal_period("training", probe_every=10, epochs=8) == P.FALLBACK_PERIOD
    assert P.temporal_period("epoch", probe_every=25, steps_per_epoch=160) == 6
    assert P.temporal_period("epoch", probe_every=10, steps_per_epoch=5) == 1
    assert P.temporal_period("epoch", probe_every=10, steps_per_epoch=None) == P.FALLBACK_PERIOD
    assert P.temporal_period("measurement", probe_every=25, steps_per_epoch=160) == 1
    assert P.temporal_period(4, probe_every=25, steps_per_epoch=160) == 4
    assert P.temporal_period(np.int64(3), probe_every=7) == 3
    assert P.check_temporal("measurement") == "measurement"
    assert P.check_temporal(np.int32(2)) == 2 and isinstance(P.check_temporal(np.int32(2)), int)


@pytest.mark.parametrize("value", ["epochs", "", 0, -1, 1.5, True, None])
def test_check_temporal_rejects(value):
    with pytest.raises(ValueError, match=r"`temporal`.*Received: temporal="):
        P.check_temporal(value)


def test_temporal_period_rejects():
    with pytest.raises(ValueError, match=r"Received: probe_every=0"):
        P.temporal_period("epoch", probe_every=0, steps_per_epoch=10)
    with pytest.raises(ValueError, match=r"Received: steps_per_epoch=0"):
        P.temporal_period("epoch", probe_every=5, steps_per_epoch=0)
    with pytest.raises(ValueError, match=r"Received: epochs=-2"):
        P.temporal_period("training", probe_every=5, steps_per_epoch=10, epochs=-2)
    with pytest.raises(ValueError, match=r"Received: temporal='week'"):
        P.temporal_period("week", probe_every=5)


def test_static_options_and_shapes_are_checked():
    state = P.initial_state([2])
    with pytest.raises(ValueError, match=r"Received: alpha=2.0"):
        P.policy_update(_lams([1, 2]), state, 2.0, 1e-3, [0])
    with pytest.raises(ValueError, match=r"Received: beta=0.0"):
        P.policy_update(_lams([1, 2]), state, 0.5, 0.0, [0])
    with pytest.raises(ValueError, match=r"Received: period=0"):
        P.policy_update(_lams([1, 2]), state, 0.5, 1e-3, [0], period=0)
    with pytest.raises(ValueError, match=r"`frozen\[0\]`.*Received: frozen\[0\].shape=\(2,\)"):
        P.modular_masks(_lams([1, 2, 3]), _lams([0, 0]), 0.5, [0])
    with pytest.raises(
        ValueError, match=r"`state.delta_prev\[0\]`.*Received: state.delta_prev\[0\].shape=\(3,\)"
    ):
        P.temporal_stop(_lams([1, 2]), state._replace(delta_prev=[_t([0, 0, 0])]), 0.1)
    # Options given as tensors are not checked (trace-safe) and still work.
    new = P.policy_update(_lams([1, 2]), state, ops.convert_to_tensor(0.5), ops.convert_to_tensor(0.1), [0])
    _assert_state(new, masks=([1, 1],), measurement=1)
