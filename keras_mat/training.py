"""The MAT training step installed on a model by `annotate` (placeholder until
the training-step work lands: `install` only records that MAT is enabled)."""


def install(model):
    object.__setattr__(model, "_keras_mat_enabled", True)
    return model
