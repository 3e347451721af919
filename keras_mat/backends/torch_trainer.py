"""PyTorch side of the training integration."""

import torch.distributed as dist

from keras_mat.backends._compile_events import cancel_on_next_compile, on_next_compile  # noqa: F401  (trainer API)


def sync_state(model):
    """The state lives in the variables on PyTorch: nothing to do."""
    del model


def compiles_train_step(model):
    """Eager steps see changed `trainable` flags (`requires_grad`) at once;
    only `jit_compile=True` (`torch.compile`) compiles."""
    return model.jit_compile is True and not model.run_eagerly


def background_measurement(model):
    """Probes run eagerly on torch: there is no compile to hide."""
    del model
    return False


def check_distribution(model):
    """Raises where MAT would not keep every replica's masks identical."""
    del model
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise NotImplementedError(
            "Keras's `fit` on PyTorch does not synchronize replicas, so each rank would train "
            "(and mask) its own copy. Use a custom loop with `optimizer.update_masks` on the same "
            "lambda_max on every rank (see docs/scaling.md and examples/torch_ddp.py). "
            f"Received: torch.distributed world_size={dist.get_world_size()}"
        )
