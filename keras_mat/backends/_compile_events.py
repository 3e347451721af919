"""The compile-start hook of backends that cannot tell when a train step
starts compiling (TensorFlow, PyTorch): the caller starts its work itself.
JAX's hook is in `jax_trainer.py`."""


def on_next_compile(fn):
    """False: nothing tells when a train step starts compiling here."""
    del fn
    return False


def cancel_on_next_compile(fn):
    del fn
