"""Training FLOPs of the Switch-MoE example under `keras_mat.flops`, per mask set.

    KERAS_BACKEND=jax python benchmarks/moe_recount.py --out benchmarks/results/moe_recount.md

Builds the model of `examples/moe_wikitext2.py` (2 layers, 4 heads, hidden
128, 4 experts of width 512 per layer, sequence 128, 4,423 WordPieces, batch
16), annotated with the paper's modules (heads and experts), and counts one
training step: every module trained (plain), and the mask sets MAT used in
the example's recorded runs. `frozen_prefix="auto"` stops back-propagation
below the lowest trained parameter. The analytic counts include the attention
matmuls `Q K^T` and `A V` of every `MultiHeadAttention` call; expert matmuls
count one expert per token (top-1 routing), without capacity slack or the
dispatch/combine einsums.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "harness"))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))


import output  # noqa: E402  (benchmarks/harness/output.py)


def mask_sets(groups):
    """Named mask sets: dict name -> dict family -> bool array (families by kind and block)."""
    heads = {g.name: g.num_modules for g in groups if g.kind == "head"}
    experts = {g.name: g.num_modules for g in groups if g.kind == "expert"}

    def block(name):
        return 1 if "block1" in name else 0

    def masks(head_on, expert_on):
        out = {}
        for name, n in heads.items():
            out[name] = np.arange(n) < head_on[block(name)]
        for name, n in experts.items():
            out[name] = np.arange(n) < expert_on[block(name)]
        return out

    return {
        "plain (every module)": None,
        "top block's heads only (default scope: what MAT kept)": masks((0, 4), (0, 0)),
        "per-layer scope, last measurement: 1 + 2 heads, 1 + 1 experts": masks((1, 2), (1, 1)),
        "no module (heads and experts all off)": masks((0, 0), (0, 0)),
        "experts only, all heads off": masks((0, 0), (4, 4)),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=4423)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from moe_wikitext2 import build_moe

    import keras_mat
    from keras_mat import flops as flops_lib

    model = build_moe(args.vocab, 2, 4, 128, 512, 4, args.seq)
    groups = [g for g in keras_mat.discover_groups(model, include=("head", "expert"))]
    slots = max(2, round(0.15 * args.seq) + 1)
    shapes = {"token_ids": (args.seq,), "padding_mask": (args.seq,), "mask_positions": (slots,)}
    report = flops_lib.count_flops(model, args.batch_size, input_shapes=shapes, groups=groups)
    plain = flops_lib.step_flops(report)
    lines = [
        f"Switch MoE example, batch {args.batch_size}, sequence {args.seq}, {slots} mask slots, "
        f"vocabulary {args.vocab}: one training step",
        "",
        "| mask set | step FLOPs (G) | ratio to plain | with frozen_prefix='auto' (G) | ratio |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, masks in mask_sets(groups).items():
        full = flops_lib.step_flops(report, masks=masks)
        auto = flops_lib.step_flops(report, masks=masks, frozen_prefix="auto")
        lines.append(
            f"| {name} | {full / 1e9:.3f} | {full / plain:.3f} | {auto / 1e9:.3f} | {auto / plain:.3f} |"
        )
    lines += [
        "",
        f"forward {report.forward / 1e9:.3f} G, activation gradients {report.grad_input / 1e9:.3f} G, "
        f"weight gradients {report.grad_weight / 1e9:.3f} G "
        f"(always-trained part {report.grad_weight_always / 1e9:.3f} G); "
        f"families: {', '.join(f'{g.name} ({g.num_modules})' for g in groups)}",
    ]
    output.emit(lines, args.out)


if __name__ == "__main__":
    main()
