"""The masked optimizer update's in-place half, written with `keras.ops`
(JAX and TensorFlow, whose steps are traced once, so per-op cost does not
repeat)."""

from keras import ops


def copy_values(variables):
    """Real copies of the variables' current values."""
    return [ops.copy(v.value) for v in variables]


def restore_masked(variables, conditions, olds):
    """Assigns `where(condition, value, old)` to each variable."""
    for v, cond, old in zip(variables, conditions, olds):
        v.assign(ops.where(cond, v.value, old))


def state_key(tensors):
    """None: a traced step computes what depends on these tensors once per
    trace, so nothing is reused between steps."""
    del tensors
    return None
