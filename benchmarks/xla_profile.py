"""Where XLA's CPU time goes in the compiled MAT step (JAX only).

For the same models and frozen-from-the-bottom configurations as
`benchmarks/step_time.py`, profiles `--steps` training steps per
configuration with `jax.profiler` (host tracer level 3, which records every
XLA thunk the CPU runtime executes) and sums the thunks' durations per step,
split into

- `matmul`: thunks of an HLO dot or convolution (a fusion counts as matmul
  if its fused computation contains one),
- `other`: every other thunk: element-wise fusions (dropout's random bits,
  GELU, LayerNorm, softmax and their gradients), reductions, copies, scatter
  (the embedding gradient) and the optimizer update.

The sums are CPU-thread time: XLA runs independent thunks concurrently on
the cores, so they add up to more than the wall-clock step. The matmul part
is what `keras_mat.flops` counts; the other part it counts as zero FLOPs.

    KERAS_BACKEND=jax python benchmarks/xla_profile.py --models bert --steps 4
"""

import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import step_time  # noqa: E402  (the same models, configurations and arguments)


def matmul_thunks(hlo):
    """Names of the instructions of an optimized HLO module that run a dot or
    a convolution (directly, or as a fusion whose computation has one)."""
    heavy = set()
    computation = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            computation = head[1]
        elif re.search(r" (dot|convolution)\(", line) and computation is not None:
            heavy.add(computation)
    names = set()
    for m in re.finditer(r"%([\w.\-]+) = .*?(?: (dot|convolution)\(|calls=%([\w.\-]+))", hlo):
        if m[2] or m[3] in heavy:
            names.add(m[1])
    return names


def profile(setup, off, steps):
    import jax
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    setup.run(off, 2)  # compiled (and cached) before the trace
    heavy = matmul_thunks(step_time.jax_step_hlo(setup.model, *setup.batch))
    options = jax.profiler.ProfileOptions()
    options.host_tracer_level, options.python_tracer_level = 3, 0
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, profiler_options=options)
        t0 = time.perf_counter()
        setup.run(off, steps)
        wall = (time.perf_counter() - t0) / steps
        jax.profiler.stop_trace()
        space = xplane_pb2.XSpace()
        with open(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0], "rb") as f:
            space.ParseFromString(f.read())
    ms = collections.Counter()
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):  # XLA's worker threads
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
                    continue  # wrappers and waits, not work
                ms["matmul" if name in heavy else "other"] += event.duration_ps / 1e9 / steps
    return {"matmul_ms": ms["matmul"], "other_ms": ms["other"], "wall_ms": 1000 * wall}


def main():
    args = step_time.parse_args()
    import keras

    if keras.config.backend() != "jax":
        raise SystemExit(
            f"xla_profile.py profiles XLA on JAX. Received: KERAS_BACKEND={keras.config.backend()}"
        )
    rows = []
    for name in args.models.split(","):
        setup = step_time.Setup(name, args)
        for frac, with_bottom, off in setup.configs:
            r = profile(setup, off, args.steps)
            r.update(
                model=setup.label,
                frozen_fraction=frac,
                bottom_frozen=with_bottom,
                flops_ratio=setup.step_flops_ratio(off)[1],
            )
            rows.append(r)
            print(r, flush=True)
    out = args.out or "benchmarks/results/xla_profile_jax.json"
    with open(out, "w") as f:
        json.dump(
            {"meta": {"date": time.strftime("%Y-%m-%d"), "args": vars(args)}, "rows": rows}, f, indent=1
        )
    print(
        "| model | frozen | emb/stem frozen | matmul thread-ms | other thread-ms | other share | thread-time ratio "
        "| matmul ratio | FLOPs ratio | wall ms (profiled) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {}
    for r in rows:
        b = base.setdefault(r["model"], r)
        total, btotal = r["matmul_ms"] + r["other_ms"], b["matmul_ms"] + b["other_ms"]
        print(
            f"| {r['model']} | {int(100 * r['frozen_fraction'])}% | {'yes' if r['bottom_frozen'] else 'no'} "
            f"| {r['matmul_ms']:.0f} | {r['other_ms']:.0f} | {r['other_ms'] / total:.2f} | {total / btotal:.2f} "
            f"| {r['matmul_ms'] / b['matmul_ms']:.2f} | {r['flops_ratio']:.2f} | {r['wall_ms']:.0f} |"
        )


if __name__ == "__main__":
    main()
