"""Modular Adaptive Training in a custom training loop.

Without `fit`, two calls do what `keras_mat.MATCallback` does inside it:

- `keras_mat.measure(model, x_probe)` before each step: when the optimizer's
  step is a multiple of `probe_every` it measures lambda_max on the probe set
  and runs the MAT policy (`optimizer.update_masks`); every step it makes the
  variables whose modules are all off non-trainable (`keras_mat.sync_trainable`),
  so the step below computes no weight gradient for them. It returns True when
  that set changed: retrace a compiled step of your own then.
- the step itself, over `model.trainable_variables` (here `train_on_batch`,
  which runs on every backend; a hand-written PyTorch step is shown too).

    KERAS_BACKEND=torch python examples/custom_loop.py --steps 60
"""

import argparse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--probe-every", type=int, default=10)
    return p.parse_args(argv)


def build_model():
    import keras

    inp = keras.Input((8, 16))
    x = keras.layers.MultiHeadAttention(4, 8, name="mha")(inp, inp)
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dense(32, activation="relu", name="hidden")(x)
    return keras.Model(inp, keras.layers.Dense(3, name="out")(x))


def make_data(n, seed=0):
    import numpy as np

    rng = np.random.RandomState(seed)
    x = rng.randn(n, 8, 16).astype("float32")
    y = (x[:, :, :3].mean(axis=1).argmax(axis=1)).astype("int32")  # a learnable rule
    return x, y


def main(argv=None):
    args = parse_args(argv)
    import keras

    import keras_mat

    keras.utils.set_random_seed(0)
    model = keras_mat.annotate(build_model(), dense=True)  # heads, and each Dense layer as one module
    optimizer = keras_mat.wrap(keras.optimizers.Adam(1e-3), alpha=0.5, probe_every=args.probe_every)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = make_data(args.steps * args.batch_size)
    x_probe = x[:16]  # the same probe samples at every measurement

    torch_step = keras.config.backend() == "torch"
    if torch_step:
        import torch

        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        optimizer.build(model.trainable_variables)

    changes = 0
    for step in range(args.steps):
        changes += keras_mat.measure(model, x_probe)
        xb = x[step * args.batch_size : (step + 1) * args.batch_size]
        yb = y[step * args.batch_size : (step + 1) * args.batch_size]
        if torch_step:  # a hand-written step: differentiate the trainable variables only
            variables = model.trainable_variables
            model.zero_grad()
            loss = loss_fn(torch.as_tensor(yb), model(torch.as_tensor(xb), training=True))
            loss.backward()
            grads = [
                v.value.grad if v.value.grad is not None else torch.zeros_like(v.value) for v in variables
            ]
            with torch.no_grad():
                optimizer.apply(grads, variables)
            loss = float(loss.detach())
        else:
            loss = float(model.train_on_batch(xb, yb))
        if step % args.probe_every == 0:
            active = {
                name: "".join("1" if m else "0" for m in mask) for name, mask in optimizer.masks.items()
            }
            skipped = [v.path for v in optimizer.skipped_variables]
            print(f"step {step:3d}  loss {loss:.3f}  active {active}  skipped {skipped}")
    keras_mat.sync_trainable(model, variables=[])  # every variable trainable again
    print(f"measurements: {int(optimizer.num_measurements.numpy())}, skip-set changes: {changes}")
    return optimizer


if __name__ == "__main__":
    main()
