"""JAX side of the training integration."""

import threading

import jax
import keras

# Callbacks waiting for the next lowering to finish (see `on_next_compile`).
_waiting = []
_lock = threading.Lock()
_listening = False
# Recorded by JAX once a jitted function is lowered, just before XLA compiles it.
_LOWERED_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


def _on_event(event, duration, **kwargs):
    del duration, kwargs
    if event != _LOWERED_EVENT or not _waiting:
        return
    with _lock:
        calls = list(_waiting)
        _waiting.clear()
    for fn in calls:
        fn()


def on_next_compile(fn):
    """Calls `fn()` (on the compiling thread) once the next jitted program is
    lowered, when XLA starts compiling it without Python's lock. Returns True.

    A first measurement's thread started there traces its probe while the
    train step compiles, instead of while the step is still being traced and
    lowered (two threads that trace share Python's lock and each runs at half
    speed). One listener of JAX's compile events serves the process; it does
    nothing while no call waits. (Should a JAX release rename the event, `fn`
    waits for the caller's fallback: the next batch.)"""
    global _listening
    with _lock:
        if not _listening:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _listening = True
        _waiting.append(fn)
    return True


def cancel_on_next_compile(fn):
    with _lock:
        if fn in _waiting:
            _waiting.remove(fn)


def sync_state(model):
    """Writes the state `fit` keeps outside the variables back into them.

    Inside `fit` Keras's JAX trainer holds the model and optimizer state as
    arrays between steps; after this call the variables are current and the
    next step gathers the state again (so changed `trainable` flags take
    effect there)."""
    model.jax_state_sync()


def compiles_train_step(model):
    """Whether `make_train_function` compiles (a new skip set then costs a compile)."""
    return bool(model.jit_compile) and not model.run_eagerly


def background_measurement(model):
    """Whether a measurement may run in a thread beside training: not under
    `keras.distribution` (its state is per thread)."""
    del model
    return keras.distribution.distribution() is None


def check_distribution(model):
    """Raises where MAT would not keep every replica's masks identical."""
    del model
    if jax.process_count() > 1:
        raise NotImplementedError(
            "keras_mat measures in one JAX process (keras.distribution over its local devices); "
            "several processes would each measure their own probe set. "
            f"Received: jax.process_count()={jax.process_count()}"
        )
