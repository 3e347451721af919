"""MAT with PyTorch data parallelism (`torch.distributed`) in a custom loop.

Keras's `fit` on the torch backend does not synchronise replicas, so data
parallelism on torch is a custom loop, as in Keras's guide "Multi-GPU
distributed training with PyTorch": the Keras model is wrapped in
`torch.nn.parallel.DistributedDataParallel`, which broadcasts rank 0's
weights and averages gradients in `backward()`. MAT adds three things:

1. every `probe_every` steps, each rank measures lambda_max with
   `keras_mat.module_lambda_max` on the *same* probe set (the first
   `probe_samples` samples of the global training data);
2. lambda_max is all-reduced (mean), so every rank holds the same numbers
   even where a kernel is not bitwise deterministic;
3. `optimizer.update_masks(lambda_max)` runs the MAT policies
   and writes the masks: deterministic, so every rank gets the same masks. The
   wrapped Keras optimizer then applies the averaged gradients with them.

    KERAS_BACKEND=torch python examples/torch_ddp.py --world-size 2

Runs on CPU with the `gloo` backend over 127.0.0.1 (one process per rank,
started with `torch.multiprocessing.spawn`); on GPUs use `--backend nccl`
and move each rank to its device. `--world-size 1` is the same training on
one process (no process group): the masks and weights must match.
"""

import argparse
import json
import os
import socket


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--backend", default="gloo", help="torch.distributed backend (gloo on CPU, nccl on GPU)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8, help="global batch size (split over ranks)")
    p.add_argument("--probe-every", type=int, default=2)
    p.add_argument("--probe-samples", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--out", default=None, help="write every rank's masks, lambda_max and weights here (JSON)")
    args = p.parse_args(argv)
    if args.world_size < 1 or args.batch_size % args.world_size:
        p.error(
            f"--batch-size must be a positive multiple of --world-size. "
            f"Received: --batch-size={args.batch_size}, --world-size={args.world_size}"
        )
    return args


def build_model(seed=0):
    """Attention heads and two Dense layers: head and whole-layer modules,
    with numpy-seeded weights (the same in every process and run)."""
    import keras
    import numpy as np

    inp = keras.Input((4, 8))
    x = keras.layers.MultiHeadAttention(4, 4, name="mha")(inp, inp)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(6, activation="tanh", name="fc")(x)
    model = keras.Model(inp, keras.layers.Dense(3, name="out")(x))
    rng = np.random.RandomState(seed)
    for v in model.trainable_variables:
        v.assign(rng.uniform(-0.5, 0.5, size=tuple(v.shape)).astype("float32"))
    return model


def make_data(n=64, seed=0):
    import numpy as np

    rng = np.random.RandomState(seed)
    return rng.randn(n, 4, 8).astype("float32"), rng.randint(0, 3, n)


def all_reduce_mean(lambda_max, world_size):
    """`{family: array}` averaged over ranks (identical on every rank after)."""
    import numpy as np
    import torch
    import torch.distributed as dist

    if world_size == 1:
        return lambda_max
    names = sorted(lambda_max)
    flat = torch.tensor(np.concatenate([np.asarray(lambda_max[k], "float32") for k in names]))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = (flat / world_size).numpy()
    out, start = {}, 0
    for k in names:
        size = np.asarray(lambda_max[k]).size
        out[k] = flat[start : start + size]
        start += size
    return out


def train(rank, args, port=None):
    os.environ["KERAS_BACKEND"] = "torch"
    import keras
    import numpy as np
    import torch
    import torch.distributed as dist

    import keras_mat

    world = args.world_size
    if world > 1:
        dist.init_process_group(
            args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    model = build_model()
    keras_mat.annotate(model, dense=True)
    optimizer = keras_mat.wrap(
        keras.optimizers.Adam(1e-2),
        alpha=args.alpha,
        beta=args.beta,
        probe_every=args.probe_every,
        probe_samples=args.probe_samples,
    )
    optimizer.build(model.trainable_variables)
    # DDP broadcasts rank 0's weights and averages gradients in backward().
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x, y = make_data()
    probe_x = x[: args.probe_samples]  # the same fixed probe set on every rank
    local = args.batch_size // world
    record = {"masks": [], "lambda_max": []}
    for step in range(args.steps):
        if step % args.probe_every == 0:
            lam = keras_mat.module_lambda_max(model, probe_x)
            lam = all_reduce_mean(lam, world)
            optimizer.update_masks(lam)
            record["lambda_max"].append({k: np.asarray(v).tolist() for k, v in optimizer.lambda_max.items()})
        start = step * args.batch_size + rank * local
        xb = torch.as_tensor(x[start : start + local])
        yb = torch.as_tensor(y[start : start + local])
        model.zero_grad()
        loss = loss_fn(yb, ddp(xb))
        loss.backward()
        variables = model.trainable_variables
        grads = [torch.zeros_like(v.value) if v.value.grad is None else v.value.grad for v in variables]
        with torch.no_grad():
            optimizer.apply(grads, variables)
        record["masks"].append({k: m.astype(int).tolist() for k, m in optimizer.masks.items()})
    record["weights"] = [
        np.asarray(keras.ops.convert_to_numpy(v.value)).tolist() for v in model.trainable_variables
    ]
    if rank == 0:
        print("masks per step:", [{k: "".join(map(str, m)) for k, m in s.items()} for s in record["masks"]])
    if args.out:
        with open(f"{args.out}.rank{rank}", "w") as f:
            json.dump(record, f)
    if world > 1:
        # Every rank's last collective done before teardown: the group's
        # destructor joins gloo's worker thread, which may still need Python's
        # lock to release the last work's tensors (a hang at exit otherwise).
        dist.barrier()
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    args = parse_args(argv)
    if args.world_size == 1:
        train(0, args)
    else:
        import torch.multiprocessing as mp

        mp.spawn(train, args=(args, _free_port()), nprocs=args.world_size, join=True)
    if args.out:
        ranks = []
        for rank in range(args.world_size):
            with open(f"{args.out}.rank{rank}") as f:
                ranks.append(json.load(f))
            os.remove(f"{args.out}.rank{rank}")
        with open(args.out, "w") as f:
            json.dump(ranks, f)


if __name__ == "__main__":
    main()
