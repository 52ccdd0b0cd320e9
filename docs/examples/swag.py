"""SWAG and MultiSWAG on 1-D regression with a gap in the data.

Writes ``docs/figures/swag.png``: SGD from a MAP network collects a SWAG
state (low-rank plus diagonal Gaussian, Maddox et al. 2019); the panels show the
predictive mean and a 2-std band of the network's outputs over 100 SWAG draws
(epistemic only), for one SWAG run and for MultiSWAG (three runs, a mixture).

    python docs/examples/swag.py          # ~10 s on 2 cores
    python docs/examples/swag.py --fast   # a short run (what the test suite does)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import funcbnn
from funcbnn import swag

from _gap import gap_data, mlp, train_map, cli


def main(out: Path, fast: bool) -> Path:
    g = torch.Generator().manual_seed(0)
    x, y = gap_data(200, g)
    grid = torch.linspace(-1.5, 1.5, 200)[:, None]
    batches = [(x[i:i + 20], y[i:i + 20]) for i in range(0, len(x), 20)]
    runs = []
    for seed in range(3):
        torch.manual_seed(seed)
        apply_fn, params, _ = funcbnn.functionalize(train_map(mlp(), x, y, 100 if fast else 800))
        result = swag.fit(apply_fn, params, batches, "regression", epochs=4 if fast else 20, lr=0.005)
        runs.append(result.state)

    fig, axes = plt.subplots(1, 2, figsize=(8, 3), sharey=True)
    post, q = swag.posterior(runs[0])                       # a lowrank_gaussian family and its state
    single = funcbnn.sample_outputs(apply_fn, post.sample(q, 100, generator=g), grid)
    post, q = swag.multiswag(runs)                          # a mixture of the three
    multi = funcbnn.sample_outputs(apply_fn, post.sample(q, 100, generator=g), grid)
    for ax, title, outputs in zip(axes, ["SWAG (one run)", "MultiSWAG (three runs)"], [single, multi]):
        s = funcbnn.summarize(outputs, "regression")        # noise_std=0: the epistemic band
        m, sd = s.mean[:, 0], s.epistemic_var[:, 0].sqrt()
        ax.fill_between(grid[:, 0], m - 2 * sd, m + 2 * sd, alpha=0.3, label="mean ± 2 std (epistemic)")
        ax.plot(grid[:, 0], m, label="predictive mean")
        ax.plot(grid[:, 0], torch.cos(4 * grid[:, 0] + 0.8), "k--", lw=1, label="truth")
        ax.scatter(x[:, 0], y[:, 0], s=6, c="k")
        ax.set(title=title, xlabel="x", ylim=(-3, 3))
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "swag.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


if __name__ == "__main__":
    cli(main, __doc__)
