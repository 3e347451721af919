"""JAX side of the training integration."""

import jax
import keras


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
