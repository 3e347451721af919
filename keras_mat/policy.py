"""The modular and temporal policies of MAT as pure functions of tensors.

Everything that runs per measurement is written with `keras.ops` only: no
Python branch on a tensor value, no numpy, no data-dependent shape. The same
code therefore runs in eager mode, inside `jax.jit`, inside a `tf.function`
(with or without `jit_compile=True`) and in eager torch. Only the *structure*
(number of families, their sizes, their threshold scopes, `alpha`, `beta`,
`warmup`, `eps`) is static Python.

State is kept per module family: one float32 vector of length `G` (the
family's number of modules) per quantity, and all families are processed
together as lists (see `PolicyState`). Families that share a scope id share
one threshold (see `scope_ids`).

One measurement `r` (`policy_update`) does, in this order:

1. **Finite guard.** If any measured `lambda_max` is NaN or inf, the whole
   update is a no-op: the input state is returned unchanged, including the
   masks and the measurement counter (so the next good measurement takes this
   one's place). `all_finite` exposes the same flag so an eager caller can
   raise instead.
2. **Temporal policy** (`temporal_stop`), the paper's formula (7) on a clock
   of `period` measurements per time step `t` (`temporal_period`; by
   default a quarter of the planned training). `Delta = |lambda - lambda_init|`. At `r = 0`,
   `lambda_init := lambda(0)`; at `r = period`, `delta_first := Delta`. At
   every `r = t * period >= max(2 * period, warmup)`, an alive module that
   was updated during the last interval is frozen *permanently* when
   `|Delta - delta_prev| / max(delta_first, eps) < beta`; then
   `delta_prev := Delta`. `period=1` evaluates the rule at every
   measurement. Warm-up suppresses temporal stopping on purpose: "every
   module is updated until measurement `warmup`" would otherwise be
   violated.
3. **Modular policy** (`modular_masks`), on the modules still alive after
   step 2: per scope, `threshold = lmin + alpha * (lmax - lmin)` over the
   alive modules of the scope, and `mask = alive & (lambda >= threshold)`.
   Ties are updated. While `r < warmup` the mask is every alive module.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from keras import ops

from keras_mat.groups import KINDS

THRESHOLD_SCOPES = ("auto", "global", "per_layer")
#: Readings of the temporal policy's time `t` (see `temporal_period`).
TEMPORAL_READINGS = ("training", "epoch", "measurement")
#: Temporal steps per planned training run under `temporal="training"`.
TRAINING_STEPS = 4
#: Measurements per temporal step when the reading needs a length that is unknown.
FALLBACK_PERIOD = 10


class PolicyState(NamedTuple):
    """The MAT policy state: one float32 vector (G,) per family, and a counter.

    A `NamedTuple`, hence a pytree for JAX and a nested structure for
    `tf.function`; `policy_update` returns the same structure it takes.

    Attributes:
        masks: List of float32 (G,) tensors: 1.0 where the module is updated
            during the coming interval. As an *input* to `policy_update` this
            is the mask that was in force during the last interval (the
            "updated" set of the temporal policy).
        frozen: List of float32 (G,) tensors: 1.0 where the module is stopped
            permanently.
        lambda_init: List of float32 (G,) tensors: `lambda_max` at `r = 0`.
        delta_prev: List of float32 (G,) tensors: `Delta(r - 1)`.
        delta_first: List of float32 (G,) tensors: `Delta(1)`.
        measurement: int32 scalar tensor: the index `r` of the *next*
            measurement (0 before the first one).
    """

    masks: list
    frozen: list
    lambda_init: list
    delta_prev: list
    delta_first: list
    measurement: Any


# --------------------------------------------------------------------------------------
# Static validation (plain Python, for constructors)
# --------------------------------------------------------------------------------------


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_alpha(alpha):
    """Validates the modular-policy threshold `alpha`.

    Args:
        alpha: A real number in `[0, 1)`.

    Returns:
        `alpha` as a Python float.

    Raises:
        ValueError: if `alpha` is not a finite real number in `[0, 1)`.

    Example:

    >>> check_alpha(0.5)
    0.5
    """
    if not _is_real(alpha) or not 0.0 <= alpha < 1.0:
        raise ValueError(
            "`alpha` must be a real number in [0, 1); alpha=0 updates every alive "
            f"module. Received: alpha={alpha!r}"
        )
    return float(alpha)


def check_beta(beta):
    """Validates the temporal-policy tolerance `beta`.

    Args:
        beta: A finite real number `> 0`.

    Returns:
        `beta` as a Python float.

    Raises:
        ValueError: if `beta` is not a finite real number `> 0`.

    Example:

    >>> check_beta(1e-3)
    0.001
    """
    if not _is_real(beta) or not beta > 0.0:
        raise ValueError(f"`beta` must be a finite real number > 0. Received: beta={beta!r}")
    return float(beta)


def check_warmup(warmup):
    """Validates `warmup`, the number of measurements during which all modules train.

    Args:
        warmup: An int `>= 0`. Every alive module is updated while the
            measurement index `r < warmup`; `warmup=0` applies the modular
            policy from the first measurement.

    Returns:
        `warmup` as a Python int.

    Raises:
        ValueError: if `warmup` is not an int `>= 0`.

    Example:

    >>> check_warmup(1)
    1
    """
    if not isinstance(warmup, numbers.Integral) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"`warmup` must be an int >= 0. Received: warmup={warmup!r}")
    return int(warmup)


def check_temporal(temporal):
    """Validates the temporal-policy reading `temporal`.

    Args:
        temporal: `"training"` (`t` counts quarters of the planned
            training), `"epoch"` (`t` counts epochs), `"measurement"` (`t`
            counts measurements) or an int `>= 1` (`t` counts that many
            measurements). See `temporal_period`.

    Returns:
        `temporal` (an int is returned as a Python int).

    Raises:
        ValueError: on any other value.

    Example:

    >>> check_temporal("training")
    'training'
    """
    if isinstance(temporal, str) and temporal in TEMPORAL_READINGS:
        return temporal
    if isinstance(temporal, numbers.Integral) and not isinstance(temporal, bool) and temporal >= 1:
        return int(temporal)
    raise ValueError(
        f"`temporal` must be one of {TEMPORAL_READINGS} or an int >= 1 (measurements per temporal "
        f"step). Received: temporal={temporal!r}"
    )


def _check_length(name, value):
    if value is not None and (
        not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1
    ):
        raise ValueError(f"`{name}` must be an int >= 1 or None. Received: {name}={value!r}")


def temporal_period(temporal, probe_every, steps_per_epoch=None, epochs=None):
    """Measurements per temporal step `t` of the temporal policy (static Python).

    The paper's formula (7) compares the drift `Delta(t)` of each module's
    `lambda_max` between consecutive times `t`, relative to the first drift
    `Delta(1)`. Early in training `lambda_max` grows by orders of magnitude
    (on a small BERT, from about 1e3 to 1e7-1e8 within the first few hundred
    steps) and then fluctuates around a level. The rule can only single out
    modules that have settled if `Delta(1)` spans that growth; which clock
    `t` runs on decides it:

    - `"training"` (the default of `keras_mat.wrap`): `t` counts quarters of
      the planned training (`epochs * steps_per_epoch` optimizer steps, as
      `fit` is called): `Delta(1)` is the drift over the first quarter and the
      rule is checked at one half, three quarters and the end. The period is
      `round(epochs * steps_per_epoch / (TRAINING_STEPS * probe_every))`
      measurements (at least 1).
    - `"epoch"`: `t` counts epochs, `round(steps_per_epoch / probe_every)`
      measurements. With epochs shorter than the growth phase of
      `lambda_max`, `Delta(1)` is small and the rule does not fire.
    - `"measurement"`: `t` counts measurements (period 1). `Delta(1)` is the
      drift over the first `probe_every` steps: the rule either never fires
      (small `beta`) or stops modules in the first few measurements, before
      `lambda_max` has grown (larger `beta`).
    - an int `k >= 1`: `t` counts `k` measurements.

    A length that is unknown (`None`, e.g. an endless dataset) falls back to
    `FALLBACK_PERIOD` measurements.

    Args:
        temporal: The reading (see `check_temporal`).
        probe_every: Steps between measurements (int `>= 1`).
        steps_per_epoch: Optimizer steps per epoch, or `None` if unknown.
        epochs: Planned epochs, or `None` if unknown.

    Returns:
        An int `>= 1`, the `period` argument of `policy_update`.

    Raises:
        ValueError: on an invalid `temporal`, `probe_every`,
            `steps_per_epoch` or `epochs`.

    Example:

    >>> temporal_period("training", probe_every=10, steps_per_epoch=80, epochs=8)
    16
    >>> temporal_period("epoch", probe_every=25, steps_per_epoch=160)
    6
    >>> temporal_period("measurement", probe_every=25, steps_per_epoch=160)
    1
    """
    temporal = check_temporal(temporal)
    if not isinstance(probe_every, numbers.Integral) or isinstance(probe_every, bool) or probe_every < 1:
        raise ValueError(f"`probe_every` must be an int >= 1. Received: probe_every={probe_every!r}")
    _check_length("steps_per_epoch", steps_per_epoch)
    _check_length("epochs", epochs)
    if isinstance(temporal, int):
        return temporal
    if temporal == "measurement":
        return 1
    if temporal == "epoch":
        steps = steps_per_epoch
    else:
        steps = (
            None if steps_per_epoch is None or epochs is None else steps_per_epoch * epochs / TRAINING_STEPS
        )
    if steps is None:
        return FALLBACK_PERIOD
    return max(1, int(round(steps / probe_every)))


def scope_ids(kinds, threshold_scope="auto"):
    """Maps family kinds to threshold scope ids (families with equal ids share a threshold).

    - `"auto"` (the paper's choice, extended): every `"head"` and `"expert"`
      family shares one global scope; every `"filter"` family is its own scope
      (per layer); every `"layer"` family (one module per layer) shares one
      scope with the other layer families, because a scope of a single module
      would always be updated; every `"custom"` family is its own scope.
    - `"global"`: every family, whatever its kind, shares one scope.
    - `"per_layer"`: every family is its own scope (a family of a single
      module is then never masked by the modular policy, only stopped by the
      temporal one).

    Ids are contiguous ints starting at 0, in order of first appearance.

    Args:
        kinds: Sequence of family kinds, each one of `"head"`, `"filter"`,
            `"expert"`, `"layer"`, `"custom"`.
        threshold_scope: One of `"auto"`, `"global"`, `"per_layer"`.

    Returns:
        A list of ints, one per family.

    Raises:
        ValueError: on an unknown `threshold_scope` or kind.

    Example:

    >>> scope_ids(["head", "filter", "head", "filter", "layer", "layer"])
    [0, 1, 0, 2, 3, 3]
    """
    if threshold_scope not in THRESHOLD_SCOPES:
        raise ValueError(
            f"`threshold_scope` must be one of {THRESHOLD_SCOPES}. Received: threshold_scope={threshold_scope!r}"
        )
    kinds = list(kinds)
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"Every entry of `kinds` must be one of {KINDS}. Received: kinds={kinds!r}")
    if threshold_scope == "global":
        return [0] * len(kinds)
    if threshold_scope == "per_layer":
        return list(range(len(kinds)))
    ids, shared = [], {}
    next_id = 0
    for kind in kinds:
        key = {"head": "global", "expert": "global", "layer": "layer"}.get(kind)
        if key is not None and key in shared:
            ids.append(shared[key])
            continue
        if key is not None:
            shared[key] = next_id
        ids.append(next_id)
        next_id += 1
    return ids


# --------------------------------------------------------------------------------------
# Pure tensor functions
# --------------------------------------------------------------------------------------


def _float_list(values, name):
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"`{name}` must be a list with one tensor per family. Received: {name}={values!r}")
    return [ops.cast(v, "float32") for v in values]


def _check_lengths(n, **lists):
    for name, values in lists.items():
        if len(values) != n:
            raise ValueError(
                f"`{name}` must have one entry per family ({n} families). Received: len({name})={len(values)}"
            )


def _check_shapes(reference, **lists):
    """Every list's i-th tensor has the (static) shape of `reference[i]`."""
    for name, values in lists.items():
        for i, (ref, value) in enumerate(zip(reference, values)):
            if tuple(value.shape) != tuple(ref.shape):
                raise ValueError(
                    f"`{name}[{i}]` must have the shape of `lambda_max[{i}]` {tuple(ref.shape)}. "
                    f"Received: {name}[{i}].shape={tuple(value.shape)}"
                )


def _check_static(alpha=None, beta=None, period=None):
    """Validates the options given as Python numbers (tensors pass unchecked: trace-safe)."""
    if isinstance(alpha, numbers.Number):
        check_alpha(alpha)
    if isinstance(beta, numbers.Number):
        check_beta(beta)
    if isinstance(period, numbers.Number) and (
        not isinstance(period, numbers.Integral) or isinstance(period, bool) or period < 1
    ):
        raise ValueError(f"`period` must be an int >= 1. Received: period={period!r}")


def initial_state(num_modules):
    """Builds the policy state before the first measurement.

    Masks are all ones (every module trains until the first measurement), no
    module is frozen, the temporal quantities are zero and the measurement
    counter is 0.

    Args:
        num_modules: Sequence of ints, the number of modules of each family.

    Returns:
        A `PolicyState`.

    Example:

    >>> state = initial_state([4, 2])
    >>> [tuple(m.shape) for m in state.masks]
    [(4,), (2,)]
    """
    if isinstance(num_modules, (str, bytes)) or not isinstance(num_modules, Sequence):
        raise ValueError(
            f"`num_modules` must be a list of ints, one per family. Received: num_modules={num_modules!r}"
        )
    for g in num_modules:
        if not isinstance(g, numbers.Integral) or isinstance(g, bool) or g < 1:
            raise ValueError(
                f"Every entry of `num_modules` must be an int >= 1. Received: num_modules={list(num_modules)!r}"
            )
    sizes = [int(g) for g in num_modules]
    return PolicyState(
        masks=[ops.ones((g,), "float32") for g in sizes],
        frozen=[ops.zeros((g,), "float32") for g in sizes],
        lambda_init=[ops.zeros((g,), "float32") for g in sizes],
        delta_prev=[ops.zeros((g,), "float32") for g in sizes],
        delta_first=[ops.zeros((g,), "float32") for g in sizes],
        measurement=ops.convert_to_tensor(0, "int32"),
    )


def all_finite(lambda_max):
    """Returns a scalar boolean tensor: is every measured `lambda_max` finite?

    Args:
        lambda_max: List of tensors, one per family.

    Returns:
        A scalar boolean tensor, `False` if any entry is NaN or +-inf.

    Example:

    >>> bool(all_finite([ops.ones((3,)), ops.zeros((2,))]))
    True
    """
    flags = [ops.all(ops.isfinite(ops.cast(v, "float32"))) for v in lambda_max]
    result = ops.convert_to_tensor(True)
    for flag in flags:
        result = ops.logical_and(result, flag)
    return result


def modular_masks(lambda_max, frozen, alpha, scopes):
    """The modular policy: masks of the modules above each scope's threshold.

    For each scope (the families sharing a scope id), with `lmin`/`lmax` the
    smallest/largest `lambda_max` over the *alive* modules (`frozen == 0`) of
    the scope, `threshold = lmin + alpha * (lmax - lmin)` and a module is
    updated iff it is alive and `lambda_max >= threshold` (ties are updated).
    `alpha = 0` and all-equal lambdas update every alive module; the module
    with the largest lambda is always updated (the threshold is clipped at
    `lmax` against rounding). A scope without alive modules yields zero masks
    and no NaN.

    Args:
        lambda_max: List of float (G,) tensors, one per family. Must be finite
            (see `all_finite`).
        frozen: List of float (G,) tensors, 1.0 where the module is stopped.
        alpha: Threshold in `[0, 1)` (a float or a scalar tensor).
        scopes: Static list of scope ids, one per family (see `scope_ids`).

    Returns:
        A list of float32 (G,) masks, one per family.

    Raises:
        ValueError: on lists of different lengths or shapes, or a Python
            `alpha` outside `[0, 1)`.

    Example:

    >>> masks = modular_masks([ops.array([1.0, 2.0, 3.0])], [ops.zeros((3,))],
    ...                       alpha=0.5, scopes=[0])
    >>> ops.convert_to_numpy(masks[0]).tolist()
    [0.0, 1.0, 1.0]
    """
    lambda_max = _float_list(lambda_max, "lambda_max")
    frozen = _float_list(frozen, "frozen")
    scopes = list(scopes)
    _check_lengths(len(lambda_max), frozen=frozen, scopes=scopes)
    _check_shapes(lambda_max, frozen=frozen)
    _check_static(alpha=alpha)
    sizes = _sizes(lambda_max)
    layout = module_scopes(sizes, scopes)
    masks = _modular_flat(
        flatten_families(lambda_max), flatten_families(frozen) <= 0.0, ops.cast(alpha, "float32"), layout
    )
    return split_families(masks, sizes)


def temporal_stop(lambda_max, state, beta, warmup=1, eps=1e-12, period=1):
    """The temporal policy: permanent stopping of modules whose mNTK stopped moving.

    The paper's formula (7): with `Delta(t) = |lambda_max(t) - lambda_max(0)|`,
    a module that was updated is stopped for good when
    `|Delta(t) - Delta(t - 1)| / Delta(1) < beta`. Here `t` counts *temporal
    steps* of `period` measurements each: with `r = state.measurement`,
    `t = r / period`, and the rule is evaluated only at the measurements
    `r = t * period`.

    - At `r = 0`, `lambda_init := lambda_max`.
    - At `r = period` (t = 1), `delta_first := Delta`: the drift over the whole
      first temporal step.
    - At every `r = t * period` with `r >= max(2 * period, warmup)`, an alive
      module that was updated during the last interval (`state.masks == 1`)
      is frozen when `|Delta(r) - delta_prev| / max(delta_first, eps) < beta`.
      Frozen modules never unfreeze.
    - At every `r = t * period`, `delta_prev := Delta(r)`; in between, the
      state's temporal quantities are unchanged.

    `period=1` is the per-measurement reading (`t` counts measurements).
    `period = steps_per_epoch / probe_every` makes `t` count epochs (see
    `temporal_period`), the reading under which the rule stops modules during
    training.

    Args:
        lambda_max: List of float (G,) tensors, one per family. Must be finite.
        state: The `PolicyState` before this measurement.
        beta: Tolerance `> 0` (a float or a scalar tensor).
        warmup: Int; no temporal stopping while `r < max(2 * period, warmup)`.
        eps: Floor of the `delta_first` denominator.
        period: Measurements per temporal step: an int `>= 1` or an int32
            scalar tensor.

    Returns:
        A tuple `(frozen, lambda_init, delta_prev, delta_first)` of lists of
        float32 (G,) tensors.

    Raises:
        ValueError: on state lists whose lengths or shapes differ from
            `lambda_max`, a Python `beta <= 0` or a Python `period < 1`.

    Example:

    >>> state = initial_state([2])
    >>> frozen, *_ = temporal_stop([ops.array([1.0, 2.0])], state, beta=0.1)
    >>> ops.convert_to_numpy(frozen[0]).tolist()
    [0.0, 0.0]
    """
    lambda_max = _float_list(lambda_max, "lambda_max")
    n = len(lambda_max)
    updated = _float_list(state.masks, "state.masks")
    frozen = _float_list(state.frozen, "state.frozen")
    lambda_init = _float_list(state.lambda_init, "state.lambda_init")
    delta_prev = _float_list(state.delta_prev, "state.delta_prev")
    delta_first = _float_list(state.delta_first, "state.delta_first")
    _check_lengths(
        n,
        masks=updated,
        frozen=frozen,
        lambda_init=lambda_init,
        delta_prev=delta_prev,
        delta_first=delta_first,
    )
    _check_shapes(
        lambda_max,
        **{
            "state.masks": updated,
            "state.frozen": frozen,
            "state.lambda_init": lambda_init,
            "state.delta_prev": delta_prev,
            "state.delta_first": delta_first,
        },
    )
    _check_static(beta=beta, period=period)
    sizes = _sizes(lambda_max)
    flat = PolicyState(
        *(flatten_families(v) for v in (updated, frozen, lambda_init, delta_prev, delta_first)),
        state.measurement,
    )
    out = _temporal_flat(flatten_families(lambda_max), flat, beta, warmup, eps, period)
    return tuple(split_families(v, sizes) for v in out)


def policy_update(lambda_max, state, alpha, beta, scopes, warmup=1, eps=1e-12, period=1):
    """One MAT measurement: temporal stopping, then the modular masks.

    Pure and trace-safe (see the module docstring). If any `lambda_max` is
    non-finite the update is a no-op: `state` is returned unchanged, masks and
    measurement counter included; check `all_finite` in eager code to raise.

    Args:
        lambda_max: List of float (G,) tensors, the current `lambda_max` of
            every module of each family.
        state: The `PolicyState` before this measurement (`state.masks` are
            the masks that were in force during the last interval). Start from
            `initial_state`.
        alpha: Modular threshold in `[0, 1)`.
        beta: Temporal tolerance `> 0`.
        scopes: Static list of threshold scope ids, one per family (see
            `scope_ids`).
        warmup: Static int `>= 0`: every alive module is updated while
            `r < warmup`, and no module is stopped while `r < max(2, warmup)`.
        eps: Floor of the `delta_first` denominator.
        period: Measurements per temporal step of the temporal policy (see
            `temporal_stop` and `temporal_period`); 1 evaluates the rule at
            every measurement.

    Returns:
        The new `PolicyState`: `(masks, frozen, lambda_init, delta_prev,
        delta_first, measurement)` with `measurement = r + 1`.

    Raises:
        ValueError: on state lists whose lengths or shapes differ from
            `lambda_max`, or options given as Python numbers out of range
            (tensor options are not checked, so that the function stays
            trace-safe).

    Example:

    >>> state = initial_state([3])
    >>> state = policy_update([ops.array([1.0, 2.0, 3.0])], state,
    ...                       alpha=0.5, beta=0.1, scopes=[0], warmup=0)
    >>> ops.convert_to_numpy(state.masks[0]).tolist()
    [0.0, 1.0, 1.0]
    """
    lambda_max = _float_list(lambda_max, "lambda_max")
    _check_static(alpha=alpha, beta=beta, period=period)
    fields = ("masks", "frozen", "lambda_init", "delta_prev", "delta_first")
    lists = {f: _float_list(getattr(state, f), f"state.{f}") for f in fields}
    _check_lengths(len(lambda_max), scopes=list(scopes), **lists)
    _check_shapes(lambda_max, **{f"state.{f}": v for f, v in lists.items()})
    sizes = _sizes(lambda_max)
    flat = PolicyState(*(flatten_families(lists[f]) for f in fields), state.measurement)
    new = policy_update_flat(
        flatten_families(lambda_max),
        flat,
        alpha,
        beta,
        module_scopes(sizes, scopes),
        warmup=warmup,
        eps=eps,
        period=period,
    )
    return PolicyState(*(split_families(v, sizes) for v in new[:5]), new.measurement)


def policy_update_flat(lambda_max, state, alpha, beta, layout, warmup=1, eps=1e-12, period=1):
    """`policy_update` on the concatenation of every family's modules.

    The same measurement, bit for bit, with each quantity held as one vector
    over all modules (the families' vectors concatenated in order). A
    constant number of tensor ops whatever the number of families, so it
    compiles in a fraction of the time of the per-family form; the
    optimizer's `update_masks` runs this.

    Args:
        lambda_max: float (M,) tensor, M = total number of modules.
        state: A `PolicyState` whose five lists are replaced by (M,) vectors.
        alpha, beta, warmup, eps, period: As in `policy_update`.
        layout: `module_scopes(sizes, scopes)`: the static threshold-scope
            index of every module.

    Returns:
        The new `PolicyState` of (M,) vectors and the advanced counter.

    Example:

    >>> layout = module_scopes([2, 1], [0, 0])
    >>> state = PolicyState(*([ops.zeros((3,))] * 5), measurement=ops.convert_to_tensor(1))
    >>> new = policy_update_flat(ops.array([1.0, 2.0, 3.0]), state, 0.5, 0.1, layout, warmup=0)
    >>> ops.convert_to_numpy(new.masks).tolist()
    [0.0, 1.0, 1.0]
    """
    _check_static(alpha=alpha, beta=beta, period=period)
    lam = ops.cast(lambda_max, "float32")
    old = PolicyState(
        *(ops.cast(v, "float32") for v in state[:5]), measurement=ops.cast(state.measurement, "int32")
    )
    ok = ops.all(ops.isfinite(lam))
    # Non-finite entries are zeroed before any arithmetic so that nothing
    # non-finite is ever computed, even in the branch `ok` discards.
    safe = ops.where(ops.isfinite(lam), lam, 0.0)
    frozen, lambda_init, delta_prev, delta_first = _temporal_flat(safe, old, beta, warmup, eps, period)
    masks = _modular_flat(safe, frozen <= 0.0, ops.cast(alpha, "float32"), layout)
    r = old.measurement
    masks = ops.where(ops.less(r, ops.cast(warmup, "int32")), 1.0 - frozen, masks)
    new = (masks, frozen, lambda_init, delta_prev, delta_first)
    return PolicyState(*(ops.where(ok, n, o) for n, o in zip(new, old[:5])), ops.where(ok, r + 1, r))


# ---------------------------------------------------------------------------------------
# The flat core: every family's modules in one vector
# ---------------------------------------------------------------------------------------


def module_scopes(sizes, scopes):
    """The static threshold-scope layout of the concatenated modules.

    Args:
        sizes: Number of modules of each family.
        scopes: Scope id of each family (see `scope_ids`).

    Returns:
        `(index, num_scopes)`: an int32 numpy vector giving every module's
        scope as 0, 1, ... in order of first appearance, and the count.
    """
    order = {s: i for i, s in enumerate(dict.fromkeys(scopes))}
    index = np.concatenate([np.full((int(g),), order[s], "int32") for g, s in zip(sizes, scopes)])
    return index, len(order)


def _sizes(values):
    return [int(v.shape[0]) for v in values]


def flatten_families(values):
    """Concatenates per-family (G,) vectors into one (M,) vector."""
    return values[0] if len(values) == 1 else ops.concatenate(list(values), axis=0)


def split_families(flat, sizes):
    """Splits an (M,) vector into per-family vectors of the given sizes."""
    if len(sizes) == 1:
        return [flat]
    starts = np.cumsum([0] + list(sizes[:-1]))
    return [ops.slice(flat, (int(a),), (int(g),)) for a, g in zip(starts, sizes)]


def _modular_flat(lam, alive, alpha, layout):
    index, num_scopes = layout
    if num_scopes == 1:
        member = alive[None, :]
    else:
        # (scopes, modules): module m alive and in scope s.
        member = ops.logical_and(
            ops.convert_to_tensor(index[None, :] == np.arange(num_scopes)[:, None]), alive
        )
    any_alive = ops.any(member, axis=1)
    # +-inf fills keep frozen modules out of min/max; the `where` on
    # `any_alive` keeps inf - inf = NaN out of an empty scope.
    lmin = ops.min(ops.where(member, lam, float("inf")), axis=1)
    lmax = ops.max(ops.where(member, lam, float("-inf")), axis=1)
    lmin = ops.where(any_alive, lmin, 0.0)
    lmax = ops.where(any_alive, lmax, 0.0)
    threshold = ops.minimum(lmin + alpha * (lmax - lmin), lmax)
    threshold = threshold[0] if num_scopes == 1 else ops.take(threshold, ops.convert_to_tensor(index), axis=0)
    return ops.cast(ops.logical_and(alive, lam >= threshold), "float32")


def _temporal_flat(lam, state, beta, warmup, eps, period):
    r = ops.cast(state.measurement, "int32")
    period = ops.maximum(ops.cast(period, "int32"), 1)
    beta = ops.cast(beta, "float32")
    is_first = ops.equal(r, 0)
    on_step = ops.equal(ops.mod(r, period), 0)
    is_second = ops.equal(r, period)
    may_stop = ops.logical_and(
        on_step, ops.greater_equal(r, ops.maximum(ops.cast(warmup, "int32"), 2 * period))
    )
    init = ops.where(is_first, lam, state.lambda_init)
    delta = ops.abs(lam - init)
    first = ops.where(is_second, delta, state.delta_first)
    change = ops.abs(delta - state.delta_prev) / ops.maximum(first, eps)
    stop = ops.logical_and(ops.logical_and(may_stop, state.masks > 0.0), change < beta)
    return (
        ops.where(stop, 1.0, state.frozen),
        init,
        ops.where(on_step, delta, state.delta_prev),
        first,
    )


def expand_mask(mask, shape, axis):
    """Broadcasts a family mask (G,) onto one of the family's variables.

    Module `i` owns the `i`-th of `G` contiguous blocks of size `S / G` along
    `axis` (size `S`), so the mask is repeated `S / G` times along that axis
    and reshaped to rank `len(shape)` with 1 elsewhere.

    Args:
        mask: A (G,) tensor.
        shape: Static shape (tuple of ints) of the variable.
        axis: The module axis (negative allowed), or `None` when the variable
            belongs whole to the only module (`G == 1`).

    Returns:
        A tensor broadcastable to `shape`: `S` along `axis`, 1 elsewhere.

    Raises:
        ValueError: if `G` does not divide `S`, or `axis=None` with `G != 1`.

    Example:

    >>> m = expand_mask(ops.array([1.0, 0.0]), (3, 4), axis=1)
    >>> ops.convert_to_numpy(m).tolist()
    [[1.0, 1.0, 0.0, 0.0]]
    """
    shape = tuple(int(d) for d in shape)
    rank = len(shape)
    num_modules = int(mask.shape[0])
    if axis is None:
        if num_modules != 1:
            raise ValueError(
                f"`axis=None` (whole variable) needs a mask of one module. Received: mask.shape={tuple(mask.shape)}"
            )
        return ops.reshape(mask, (1,) * rank)
    if not -rank <= axis < rank:
        raise ValueError(f"`axis` out of range for shape {shape}. Received: axis={axis}")
    axis = axis % rank
    size = shape[axis]
    if size % num_modules:
        raise ValueError(
            f"The number of modules ({num_modules}) must divide axis {axis} of shape {shape}. "
            f"Received: mask.shape={tuple(mask.shape)}"
        )
    repeated = ops.repeat(mask, size // num_modules, axis=0) if size != num_modules else mask
    target = [1] * rank
    target[axis] = size
    return ops.reshape(repeated, tuple(target))
