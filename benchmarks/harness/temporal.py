"""The temporal-policy reading for the benchmark scripts.

`apply(options, temporal, probe_every, steps_per_epoch, epochs)` passes
`temporal` to `keras_mat.wrap` when `wrap` takes it; otherwise it resolves
the reading to a period (`keras_mat.policy.temporal_period`) and makes the
optimizer's policy update use it (`policy_update(..., period=...)`), which is
what the `wrap` option does.
"""

from __future__ import annotations

import functools
import inspect


def parse(value):
    """A `--temporal` flag: an int string becomes an int (measurements per step)."""
    if value is None:
        return None
    return int(value) if str(value).isdigit() else value


def apply(options, temporal, probe_every, steps_per_epoch, epochs):
    """Adds the reading to `options` (wrap's keyword arguments) or installs it.

    Returns:
        The period in measurements that the run uses (an int).
    """
    import keras_mat
    from keras_mat import optimizer as optimizer_lib
    from keras_mat import policy

    temporal = parse(temporal)
    period = policy.temporal_period(temporal, probe_every, steps_per_epoch, epochs)
    if "temporal" in inspect.signature(keras_mat.wrap).parameters:
        options["temporal"] = temporal
    else:
        original = getattr(policy.policy_update, "func", policy.policy_update)
        optimizer_lib.policy_lib.policy_update = functools.partial(original, period=period)
    return period
