"""TensorFlow side of the training integration."""

import tensorflow as tf

from keras_mat.backends._compile_events import cancel_on_next_compile, on_next_compile  # noqa: F401  (trainer API)


def sync_state(model):
    """The state lives in the variables on TensorFlow: nothing to do."""
    del model


def compiles_train_step(model):
    """Whether `make_train_function` traces a `tf.function`."""
    return not model.run_eagerly


def background_measurement(model):
    """Whether a measurement may run in a thread beside training: a single
    replica (a `tf.distribute` scope is per thread)."""
    strategy = model.distribute_strategy
    return strategy.num_replicas_in_sync == 1 and not isinstance(strategy, tf.distribute.MirroredStrategy)


def check_distribution(model):
    """Raises where MAT would not keep every replica's masks identical."""
    strategy = model.distribute_strategy
    if strategy.num_replicas_in_sync > 1 and not isinstance(strategy, tf.distribute.MirroredStrategy):
        raise NotImplementedError(
            "keras_mat supports tf.distribute.MirroredStrategy (one machine, several devices) "
            f"and single-replica strategies. Received: {type(strategy).__name__} with "
            f"{strategy.num_replicas_in_sync} replicas"
        )
