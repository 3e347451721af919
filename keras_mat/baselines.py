"""Baselines of the MAT paper as mask schedules: "Rand" and Multirate.

Two Rand controls are offered. `RandomModules` is the compute-matched one:
given MAT's own active fraction after each measurement it updates as many
random modules as MAT does, so it isolates *which* modules MAT picks (the
stricter control). `PaperRand` is Rand as the paper runs it: a fixed share
of random modules, redrawn throughout training and never stopped for good,
so it is not matched to MAT's compute and, once MAT's temporal policy has
stopped modules, it trains more than MAT.

A mask schedule decides, on the host and before each training step, which
modules the step updates. Pass one as the policy of the MAT optimizer:

    opt = keras_mat.wrap(keras.optimizers.SGD(0.05), policy=RandomModules(0.4, every=50))

The MAT training step then runs no lambda_max probe and no MAT policy (no
probe FLOPs); before each step it writes the schedule's masks into the
optimizer's mask state, so that the masked update (`ModularAdaptiveOptimizer`),
the weight-gradient skipping and the FLOPs accounting (`mat_train_flops`)
all follow the schedule. The model must be annotated
(`keras_mat.annotate(model)`) as for MAT.

Module counts are rounded half up: a family of `n` modules at fraction `f`
gets `floor(f * n + 0.5)` modules (so a one-module family, e.g. a Dense layer,
is updated at `f >= 0.5` and not below).
"""

from __future__ import annotations

import math

import keras
import numpy as np


def _is_number(x):
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _count(fraction, n):
    return int(min(n, math.floor(fraction * n + 0.5)))


def _check_masks_args(schedule, step, families, method="masks"):
    """`(step as int, [(name, n), ...])`, or a clear error naming the argument."""
    name = f"{type(schedule).__name__}.{method}"
    if not _is_int(step) or step < 0:
        raise ValueError(f"{name}: `step` must be an int >= 0. Received: step={step!r}")
    if isinstance(families, (str, bytes)) or not isinstance(families, (list, tuple)):
        raise TypeError(
            f"{name}: `families` must be a list of (family name, num_modules) pairs. "
            f"Received: families={families!r}"
        )
    out = []
    for entry in families:
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) != 2
            or not isinstance(entry[0], str)
            or not _is_int(entry[1])
            or entry[1] < 1
        ):
            raise ValueError(
                f"{name}: every entry of `families` must be a (name, num_modules >= 1) pair. "
                f"Received: families entry={entry!r}"
            )
        out.append((entry[0], int(entry[1])))
    return int(step), out


def _check_fraction_list(value, where):
    if _is_number(value):
        values = [float(value)]
    elif isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0:
        values = list(value)
    else:
        raise ValueError(
            f"`fractions`{where} must be a float in [0, 1] or a non-empty sequence of them. "
            f"Received: fractions{where}={value!r}"
        )
    for v in values:
        if not _is_number(v) or not 0.0 <= float(v) <= 1.0 or math.isnan(float(v)):
            raise ValueError(
                f"`fractions`{where} must hold floats in [0, 1]. Received: fractions{where}={value!r}"
            )
    return [float(v) for v in values]


class MaskSchedule:
    """Base class of host-side mask schedules (`wrap(opt, policy=schedule)`).

    Subclasses implement `masks(step, families)`. A schedule must be a pure
    function of the step (so that resuming from a checkpoint continues the
    same sequence) and serializable through `get_config`.
    """

    #: True when mask values other than 0/1 scale gradients (see `Multirate`).
    scales_gradients = False

    def masks(self, step, families):
        """Masks for one training step.

        Args:
            step: The optimizer step (int) about to run.
            families: List of `(family name, num_modules)`, in the
                optimizer's family order.

        Returns:
            A list of float32 numpy arrays, one per family, shape
            `(num_modules,)`: 0 for a module the step does not update, and
            the gradient scale (1 unless `scales_gradients`) for one it does.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement masks(step, families)")

    def get_config(self):
        raise NotImplementedError(f"{type(self).__name__} must implement get_config()")

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package="keras_mat")
class RandomModules(MaskSchedule):
    """ "Rand" of the MAT paper: random modules at a given active fraction.

    At steps `0, every, 2 * every, ...` (change `r = step // every`) it picks
    uniformly at random, independently per family, `round(f * num_modules)`
    modules of each family to update until the next change, where
    `f = fractions[r]` (the last value repeats once the list is exhausted).
    No lambda_max probe runs. With `fractions` set to MAT's own active
    fraction after each measurement and `every` to MAT's `probe_every`, it
    is the compute-matched control of the paper.

    Draws depend only on `(seed, r, family index)`, so the sequence is the
    same on every backend and after resuming.

    Args:
        fractions: The fraction of modules to update: a float in `[0, 1]`
            (constant), a non-empty sequence of floats (one per change), or
            a dict family name -> float or sequence (per-family fractions;
            families not listed are always updated).
        every: Positive int: steps between changes of the random subset.
        seed: Int seed of the draws.

    Raises:
        ValueError: on fractions outside `[0, 1]`, an empty sequence, a
            non-positive `every` or a non-int `seed`; at the first step, on
            a dict naming an unknown family.

    Example:

    >>> schedule = RandomModules([1.0, 0.5, 0.25], every=10, seed=0)
    >>> [m.tolist() for m in schedule.masks(10, [("conv/filters", 4)])]  # step 10: half the filters
    [[1.0, 0.0, 0.0, 1.0]]
    """

    def __init__(self, fractions, every, seed=0):
        if isinstance(fractions, dict):
            if not fractions:
                raise ValueError(
                    f"`fractions` as a dict must name at least one family. Received: {fractions!r}"
                )
            self._fractions = {str(k): _check_fraction_list(v, f"[{k!r}]") for k, v in fractions.items()}
        else:
            self._fractions = _check_fraction_list(fractions, "")
        if not _is_int(every) or every < 1:
            raise ValueError(f"`every` must be an int >= 1. Received: every={every!r}")
        if not _is_int(seed):
            raise ValueError(f"`seed` must be an int. Received: seed={seed!r}")
        # Plain Python numbers: the config is what `get_config` and `repr` show.
        if isinstance(self._fractions, dict):
            self.fractions = {k: v[0] if _is_number(fractions[k]) else v for k, v in self._fractions.items()}
        else:
            self.fractions = self._fractions[0] if _is_number(fractions) else list(self._fractions)
        self.every = int(every)
        self.seed = int(seed)

    def fraction_at(self, change, family=None):
        """The fraction used at change `change` (for `family` with dict fractions;
        `None` when the family is not listed, i.e. always updated)."""
        values = self._fractions
        if isinstance(values, dict):
            values = values.get(family)
            if values is None:
                return None
        return values[min(change, len(values) - 1)]

    def masks(self, step, families):
        step, families = _check_masks_args(self, step, families)
        names = [name for name, _ in families]
        if isinstance(self._fractions, dict):
            unknown = sorted(set(self._fractions) - set(names))
            if unknown:
                raise ValueError(
                    f"RandomModules: `fractions` names unknown module families {unknown}; "
                    f"known families: {names}. Received: fractions keys={sorted(self._fractions)}"
                )
        change = step // self.every
        out = []
        for index, (name, n) in enumerate(families):
            fraction = self.fraction_at(change, name)
            mask = np.ones((n,), "float32")
            if fraction is not None:
                rng = np.random.default_rng([self.seed, change, index])
                mask[:] = 0.0
                mask[rng.permutation(n)[: _count(fraction, n)]] = 1.0
            out.append(mask)
        return out

    def get_config(self):
        return {"fractions": self.fractions, "every": self.every, "seed": self.seed}


@keras.saving.register_keras_serializable(package="keras_mat")
class Multirate(MaskSchedule):
    """Multirate training (Vlaar and Leimkuhler, 2022) on modules.

    A fixed random split (drawn once from `seed`, per family) makes
    `round(fast_fraction * num_modules)` modules of each family *fast* and
    the others *slow*. Fast modules are updated on every step; slow modules
    only on steps `0, k, 2k, ...`, and on the steps between their parameters
    and optimizer slots do not move (bit for bit).

    Step size of the slow modules. The method gives slow parameters the step
    `k * h` on their update steps. A masked Keras optimizer has no
    per-module learning rate, so this schedule scales the slow modules'
    *gradients* by `slow_lr_scale` on their update steps instead (default:
    `k`). That equals the step `k * h` for plain SGD only (no momentum, no
    weight decay); with momentum it is approximate, and Adam-type optimizers
    (Adam, AdamW, RMSprop, ...) are nearly invariant to the gradient scale,
    so there the slow modules take an ordinary step `h` on their update
    steps. `slow_lr_scale=1` turns the scaling off. The "linear drift" of
    the slow parameters between their updates is not implemented.

    Args:
        fast_fraction: Float in `[0, 1]`: fraction of each family's modules
            that are fast.
        k: Int >= 1: slow modules are updated every `k`-th step.
        seed: Int seed of the fast/slow split.
        slow_lr_scale: Positive float or `None` (= `k`): gradient scale of
            the slow modules on their update steps.

    Raises:
        ValueError: on an argument out of range.

    Example:

    >>> schedule = Multirate(fast_fraction=0.5, k=4, seed=0)
    >>> families = [("dense", 1), ("conv/filters", 4)]
    >>> [m.tolist() for m in schedule.masks(1, families)]  # fast modules only
    [[1.0], [1.0, 0.0, 0.0, 1.0]]
    >>> [m.tolist() for m in schedule.masks(4, families)]  # slow ones too, gradients x k
    [[1.0], [1.0, 4.0, 4.0, 1.0]]
    """

    def __init__(self, fast_fraction=0.5, k=4, seed=0, slow_lr_scale=None):
        if not _is_number(fast_fraction) or not 0.0 <= float(fast_fraction) <= 1.0:  # NaN fails too
            raise ValueError(
                f"`fast_fraction` must be a float in [0, 1]. Received: fast_fraction={fast_fraction!r}"
            )
        if not _is_int(k) or k < 1:
            raise ValueError(f"`k` must be an int >= 1. Received: k={k!r}")
        if not _is_int(seed):
            raise ValueError(f"`seed` must be an int. Received: seed={seed!r}")
        if slow_lr_scale is not None and (
            not _is_number(slow_lr_scale)
            or not math.isfinite(float(slow_lr_scale))
            or float(slow_lr_scale) <= 0
        ):
            raise ValueError(
                f"`slow_lr_scale` must be a finite float > 0 or None. Received: slow_lr_scale={slow_lr_scale!r}"
            )
        self.fast_fraction = float(fast_fraction)
        self.k = int(k)
        self.seed = int(seed)
        self.slow_lr_scale = None if slow_lr_scale is None else float(slow_lr_scale)
        self.scales_gradients = self.scale != 1.0

    @property
    def scale(self):
        """The gradient scale of slow modules on their update steps."""
        return float(self.k) if self.slow_lr_scale is None else self.slow_lr_scale

    def fast_modules(self, families):
        """The fixed split: a list of boolean arrays, True for fast modules."""
        _, families = _check_masks_args(self, 0, families, "fast_modules")
        key = tuple(families)
        cached = getattr(self, "_split", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        out = []
        for index, (_, n) in enumerate(key):
            rng = np.random.default_rng([self.seed, index])
            fast = np.zeros((n,), bool)
            fast[rng.permutation(n)[: _count(self.fast_fraction, n)]] = True
            out.append(fast)
        self._split = (key, out)
        return out

    def masks(self, step, families):
        step, families = _check_masks_args(self, step, families)
        slow_step = step % self.k == 0
        out = []
        for fast in self.fast_modules(families):
            mask = fast.astype("float32")
            if slow_step:
                mask[~fast] = self.scale
            out.append(mask)
        return out

    def get_config(self):
        return {
            "fast_fraction": self.fast_fraction,
            "k": self.k,
            "seed": self.seed,
            "slow_lr_scale": self.slow_lr_scale,
        }


@keras.saving.register_keras_serializable(package="keras_mat")
class PaperRand(RandomModules):
    """ "Rand" as the MAT paper runs it: a fixed share of random modules.

    Every `every` steps (by default every step) it draws, uniformly at
    random and independently per family, `round(fraction * num_modules)`
    modules of each family to update; the others are masked (parameters and
    optimizer slots unchanged) until the next draw. The share never changes
    and no module is ever stopped for good, and no lambda_max probe runs.

    This is the paper's control, not the compute-matched one: its share does
    not follow MAT's active fraction over time, so once MAT's temporal policy
    has stopped modules, a Rand at MAT's early share trains more modules (and
    spends more FLOPs) than MAT. `RandomModules` fed with MAT's fraction
    after each measurement is the stricter, compute-matched comparison; run
    both to see both comparisons.

    Redrawing often changes the set of variables whose modules are all off,
    so with few modules per family (e.g. one-module whole-layer families)
    `every=1` can cost a compile per new skip set on JAX/TensorFlow; a
    larger `every` trades redraw frequency for fewer compiles.

    Args:
        fraction: Float in `[0, 1]`: the share of each family's modules
            updated between draws.
        every: Int >= 1: steps between draws.
        seed: Int seed of the draws.

    Raises:
        ValueError: on a `fraction` outside `[0, 1]` (or NaN), a
            non-positive `every` or a non-int `seed`.

    Example:

    >>> schedule = PaperRand(0.5, seed=0)
    >>> [int(m.sum()) for m in schedule.masks(0, [("heads", 4), ("filters", 6)])]
    [2, 3]
    >>> schedule.masks(0, [("heads", 4)])[0].tolist() != schedule.masks(1, [("heads", 4)])[0].tolist()
    True
    """

    def __init__(self, fraction=0.5, every=1, seed=0):
        if not _is_number(fraction) or not 0.0 <= float(fraction) <= 1.0:  # NaN fails too
            raise ValueError(f"`fraction` must be a float in [0, 1]. Received: fraction={fraction!r}")
        super().__init__(float(fraction), every=every, seed=seed)
        self.fraction = float(fraction)

    def get_config(self):
        return {"fraction": self.fraction, "every": self.every, "seed": self.seed}
