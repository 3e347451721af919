"""The MAT paper's Figures 3 and 5 from a logged run of experiment A.

    python benchmarks/paper_figures.py benchmarks/results/paper_bert/plain_s0.json \\
        --out-dir benchmarks/results/figures

- `fig3_lambda_per_layer.png` (Figure 3): lambda_max of every layer's heads
  (mean over the layer's heads, shaded from its smallest to its largest head)
  against training steps, log scale, with the validation loss on a second
  axis and the best-validation epoch marked.
- `fig5_spectrum.png` (Figure 5): every head's mNTK spectrum on the probe set
  normalized by its largest eigenvalue, `lambda_i / lambda_1` against `i`,
  per recorded epoch (median over heads, shaded between the quartiles): the
  few leading eigenvalues span the "information space", the long tail of
  small ones the "nuisance space".
"""

from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np


def layer_of(family):
    m = re.search(r"(\d+)", family)
    return int(m.group(1)) if m else 0


def figure3(run, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = run["lambda_log"]
    steps = np.array([e["step"] for e in log])
    families = sorted(log[0]["lambda"], key=layer_of)
    fig, ax = plt.subplots(figsize=(7, 4))
    for fam in families:
        lam = np.array([e["lambda"][fam] for e in log])
        ax.plot(steps, lam.mean(axis=1), label=f"layer {layer_of(fam)}")
        ax.fill_between(steps, lam.min(axis=1), lam.max(axis=1), alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("lambda_max of the heads' mNTK")
    records = [r for r in run["records"] if r.get("val") is not None]
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in records], [r["val"] for r in records], "k--", label="validation loss")
    ax2.set_ylabel("validation masked-LM loss")
    best = run["best"]["step"]
    ax.axvline(best, color="grey", lw=0.8)
    ax.legend(loc="lower right", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    ax.set_title("lambda_max per layer (mean over heads, range shaded); line: best validation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure5(run, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spectra = run.get("spectra") or {}
    if not spectra:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for epoch in sorted(spectra, key=int):
        heads = np.concatenate([np.asarray(v, "float64") for v in spectra[epoch].values()])
        norm = heads / np.maximum(heads[:, :1], 1e-30)
        idx = np.arange(1, norm.shape[1] + 1)
        med = np.median(norm, axis=0)
        ax.plot(idx, med, marker="o", ms=3, label=f"epoch {epoch}")
        ax.fill_between(idx, np.quantile(norm, 0.25, axis=0), np.quantile(norm, 0.75, axis=0), alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index i")
    ax.set_ylabel("lambda_i / lambda_1 (median over heads)")
    ax.set_title("Normalized mNTK spectrum of the heads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--out-dir", default="benchmarks/results/figures")
    args = p.parse_args(argv)
    with open(args.run) as f:
        run = json.load(f)
    os.makedirs(args.out_dir, exist_ok=True)
    figure3(run, os.path.join(args.out_dir, "fig3_lambda_per_layer.png"))
    if figure5(run, os.path.join(args.out_dir, "fig5_spectrum.png")):
        print("wrote fig3_lambda_per_layer.png, fig5_spectrum.png")
    else:
        print("wrote fig3_lambda_per_layer.png (no spectra in the run)")


if __name__ == "__main__":
    main()
