"""How to skip weight gradients: three strategies, timed on a stack of matmul layers.

A stack of `--layers` layers y = gelu(x @ W_l) on `--tokens` x `--dim` activations
(the shape of a BERT feed-forward block at batch 32, sequence 128) runs one
forward + backward pass per step in five variants:

* `full`: every weight gradient is computed (the unfrozen step);
* `compiled`: the upper half of the layers is frozen *at compile time*: their
  weights enter the traced step as constants (what keras_mat's skip-set step does
  on JAX/TensorFlow; `requires_grad=False` on torch), so no dW is built for them
  while back-propagation still runs through them to the trained layers below;
* `gated`: the same layers are frozen *at run time*: every layer is a custom
  gradient whose dW sits under a `cond` on a boolean input, so one compiled step
  serves every frozen set (no recompiles), at the price of a conditional per layer;
* `gathered@f`: a fraction f of every layer's output columns (modules) is active
  and the weight gradient is computed only for those columns (dW[:, idx] =
  x^T @ dy[:, idx], gathered; idx padded to a bucket), the within-variable case;
* `masked@f`: the same masks applied after a full dW (what keras_mat does today
  for a partly-active variable: full dW, then the optimizer keeps the masked slices).

Median wall-clock per step over `--rounds` interleaved rounds in one process.

    KERAS_BACKEND=jax python benchmarks/dw_strategies.py
"""

import argparse
import json
import os
import platform
import time

import numpy as np


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--fractions", default="0.25,0.5,0.75")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=None)
    return p.parse_args()


def _active_columns(dim, fraction, layer, seed=0):
    rng = np.random.RandomState(seed + layer)
    k = max(1, int(round(fraction * dim)))
    return np.sort(rng.permutation(dim)[:k]).astype("int32")


# --------------------------------------------------------------------------------------
# JAX
# --------------------------------------------------------------------------------------


def jax_variants(args, fractions):
    import jax
    import jax.numpy as jnp

    L, d = args.layers, args.dim
    rng = np.random.RandomState(0)
    ws = [jnp.asarray((rng.randn(d, d) / np.sqrt(d)).astype("float32")) for _ in range(L)]
    x = jnp.asarray(rng.randn(args.tokens, d).astype("float32"))
    frozen = [i >= L // 2 for i in range(L)]

    def loss_of(layer_fn, ws, x):
        h = x
        for i, w in enumerate(ws):
            h = jax.nn.gelu(layer_fn(i, h, w))
        return jnp.mean(h * h)

    def plain(i, h, w):
        return h @ w

    @jax.custom_vjp
    def gated_matmul(h, w, on):
        return h @ w

    def gated_fwd(h, w, on):
        return h @ w, (h, w, on)

    def gated_bwd(res, g):
        h, w, on = res
        dw = jax.lax.cond(on, lambda: h.T @ g, lambda: jnp.zeros_like(w))
        return g @ w.T, dw, None

    gated_matmul.defvjp(gated_fwd, gated_bwd)

    def gathered_layer(idx):
        @jax.custom_vjp
        def f(h, w):
            return h @ w

        def fwd(h, w):
            return h @ w, (h, w)

        def bwd(res, g):
            h, w = res
            dw_active = h.T @ jnp.take(g, idx, axis=1)
            return g @ w.T, jnp.zeros_like(w).at[:, idx].set(dw_active)

        f.defvjp(fwd, bwd)
        return f

    full = jax.jit(jax.grad(lambda ws, x: loss_of(plain, ws, x)))

    def compiled_loss(trained, x):
        it = iter(trained)
        all_ws = [ws[i] if frozen[i] else next(it) for i in range(L)]  # frozen: constants
        return loss_of(plain, all_ws, x)

    compiled = jax.jit(jax.grad(compiled_loss))
    trained_ws = [w for w, f in zip(ws, frozen) if not f]

    gated = jax.jit(jax.grad(lambda ws, x, on: loss_of(lambda i, h, w: gated_matmul(h, w, on[i]), ws, x)))
    on = jnp.asarray([not f for f in frozen])

    variants = {
        "full": lambda: full(ws, x),
        "compiled": lambda: compiled(trained_ws, x),
        "gated": lambda: gated(ws, x, on),
    }
    for f in fractions:
        layers = [gathered_layer(jnp.asarray(_active_columns(d, f, i))) for i in range(L)]
        g = jax.jit(jax.grad(lambda ws, x, layers=layers: loss_of(lambda j, h, w: layers[j](h, w), ws, x)))
        masks = [jnp.zeros((d,), bool).at[_active_columns(d, f, i)].set(True) for i in range(L)]
        m = jax.jit(lambda ws, x, masks=masks: [jnp.where(k, gw, 0.0) for k, gw in zip(masks, full(ws, x))])
        variants[f"gathered@{f}"] = lambda g=g: g(ws, x)
        variants[f"masked@{f}"] = lambda m=m: m(ws, x)

    def block(out):
        jax.block_until_ready(out)

    return variants, block


# --------------------------------------------------------------------------------------
# TensorFlow
# --------------------------------------------------------------------------------------


def tf_variants(args, fractions):
    import tensorflow as tf

    L, d = args.layers, args.dim
    rng = np.random.RandomState(0)
    ws = [tf.Variable((rng.randn(d, d) / np.sqrt(d)).astype("float32")) for _ in range(L)]
    x = tf.constant(rng.randn(args.tokens, d).astype("float32"))
    frozen = [i >= L // 2 for i in range(L)]

    def gelu(h):
        return tf.nn.gelu(h, approximate=True)

    def make_gated(on):
        @tf.custom_gradient
        def f(h, w):
            def grad(g):
                dw = tf.cond(on, lambda: tf.matmul(h, g, transpose_a=True), lambda: tf.zeros_like(w))
                return tf.matmul(g, w, transpose_b=True), dw

            return tf.matmul(h, w), grad

        return f

    def make_gathered(idx):
        @tf.custom_gradient
        def f(h, w):
            def grad(g):
                dw_active = tf.matmul(h, tf.gather(g, idx, axis=1), transpose_a=True)
                dw = tf.transpose(tf.scatter_nd(idx[:, None], tf.transpose(dw_active), [d, d]))
                return tf.matmul(g, w, transpose_b=True), dw

            return tf.matmul(h, w), grad

        return f

    def grads(layer_fns, watch):
        with tf.GradientTape() as tape:
            h = x
            for i, w in enumerate(ws):
                h = gelu(layer_fns[i](h, w))
            loss = tf.reduce_mean(h * h)
        return tape.gradient(loss, watch)

    mm = [tf.matmul] * L
    xla = dict(jit_compile=True)
    full = tf.function(lambda: grads(mm, ws), **xla)
    trained = [w for w, f in zip(ws, frozen) if not f]
    compiled = tf.function(lambda: grads(mm, trained), **xla)
    on = tf.Variable([not f for f in frozen])
    gated = tf.function(lambda: grads([make_gated(on[i]) for i in range(L)], ws), **xla)
    variants = {"full": full, "compiled": compiled, "gated": gated}
    for f in fractions:
        idx = [tf.constant(_active_columns(d, f, i)) for i in range(L)]
        g = tf.function(lambda idx=idx: grads([make_gathered(i) for i in idx], ws), **xla)
        masks = [tf.constant(np.isin(np.arange(d), _active_columns(d, f, i))) for i in range(L)]
        m = tf.function(
            lambda masks=masks: [tf.where(k, gw, 0.0) for k, gw in zip(masks, grads(mm, ws))], **xla
        )
        variants[f"gathered@{f}"] = g
        variants[f"masked@{f}"] = m

    def block(out):
        [o.numpy() for o in out]

    return variants, block


# --------------------------------------------------------------------------------------
# PyTorch (eager: "compiled" and "gated" are the same thing, requires_grad per step)
# --------------------------------------------------------------------------------------


def torch_variants(args, fractions):
    import torch

    torch.manual_seed(0)
    L, d = args.layers, args.dim
    rng = np.random.RandomState(0)
    ws = [
        torch.tensor((rng.randn(d, d) / np.sqrt(d)).astype("float32"), requires_grad=True) for _ in range(L)
    ]
    x = torch.tensor(rng.randn(args.tokens, d).astype("float32"))
    frozen = [i >= L // 2 for i in range(L)]
    gelu = torch.nn.functional.gelu

    class Gathered(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w, idx):
            ctx.save_for_backward(h, w, idx)
            return h @ w

        @staticmethod
        def backward(ctx, g):
            h, w, idx = ctx.saved_tensors
            dw = torch.zeros_like(w)
            dw[:, idx] = h.T @ g[:, idx]
            return g @ w.T, dw, None

    def step(layer_fn, need):
        for w, n in zip(ws, need):
            w.requires_grad_(n)
            w.grad = None
        h = x
        for i, w in enumerate(ws):
            h = gelu(layer_fn(i, h, w))
        (h * h).mean().backward()
        return [w.grad for w in ws]

    def plain(i, h, w):
        return h @ w

    everything = [True] * L
    variants = {
        "full": lambda: step(plain, everything),
        "compiled": lambda: step(plain, [not f for f in frozen]),
    }
    for f in fractions:
        idx = [torch.tensor(_active_columns(d, f, i), dtype=torch.long) for i in range(L)]
        masks = [torch.tensor(np.isin(np.arange(d), _active_columns(d, f, i))) for i in range(L)]
        variants[f"gathered@{f}"] = lambda idx=idx: step(
            lambda j, h, w: Gathered.apply(h, w, idx[j]), everything
        )
        variants[f"masked@{f}"] = lambda masks=masks: [
            torch.where(k, g, 0.0) for k, g in zip(masks, step(plain, everything))
        ]

    def block(out):
        pass

    return variants, block


def main():
    args = parse_args()
    import keras

    backend = keras.config.backend()
    fractions = [float(f) for f in args.fractions.split(",") if f]
    build = {"jax": jax_variants, "tensorflow": tf_variants, "torch": torch_variants}[backend]
    variants, block = build(args, fractions)
    for fn in variants.values():  # compile / warm up
        block(fn())
        block(fn())
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                block(fn())
            times[name].append((time.perf_counter() - t0) / args.steps)
    med = {k: float(np.median(v)) for k, v in times.items()}
    rows = [{"variant": k, "step_ms": 1e3 * v, "ratio_to_full": v / med["full"]} for k, v in med.items()]
    for r in rows:
        print(f"{backend:10s} {r['variant']:16s} {r['step_ms']:8.1f} ms  {r['ratio_to_full']:.2f}x")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"dw_strategies_{backend}.json")
    meta = {
        "backend": backend,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "keras": keras.__version__,
        "args": vars(args),
    }
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    write_markdown(os.path.dirname(out))


IDEAL = "ideal (3 matmuls per layer: forward, dX, dW)"


def ideal_ratio(variant):
    if variant == "full":
        return 1.0
    if variant in ("compiled", "gated"):
        return 2.5 / 3  # half the layers skip dW
    kind, f = variant.split("@")
    return (2 + float(f)) / 3 if kind == "gathered" else 1.0


def write_markdown(folder):
    """results/dw_strategies.md from every dw_strategies_<backend>.json in `folder`."""
    lines = [
        "# Skipping weight gradients: compiled skip set vs run-time gate vs gathered columns",
        "",
        "Generated by `benchmarks/dw_strategies.py` (see its docstring for the variants). Median step",
        "time (forward + backward) of 8 layers gelu(x @ W), x 4096 x 256, W 256 x 256; ratio to `full`;",
        f"{IDEAL}. `compiled`/`gated`: upper 4 layers frozen; `@f`: fraction f of each W's columns active.",
        "",
        "| backend | variant | step ms | ratio to full | ideal |",
        "|---|---|---|---|---|",
    ]
    runs = []
    for backend in ("jax", "tensorflow", "torch"):
        path = os.path.join(folder, f"dw_strategies_{backend}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            data = json.load(f)
        m = data["meta"]
        runs.append(
            f"* {backend}: {m['date']}, {m['machine']}, keras {m['keras']}, {m['args']['rounds']} rounds"
            f" x {m['args']['steps']} steps: `KERAS_BACKEND={backend} python benchmarks/dw_strategies.py`"
        )
        for r in data["rows"]:
            lines.append(
                f"| {backend} | {r['variant']} | {r['step_ms']:.0f} | {r['ratio_to_full']:.2f} "
                f"| {ideal_ratio(r['variant']):.2f} |"
            )
    with open(os.path.join(folder, "dw_strategies.md"), "w") as f:
        f.write("\n".join(lines + ["", "## Runs", ""] + runs) + "\n")


if __name__ == "__main__":
    main()
