"""MC dropout on 1-D regression with a gap in the data, with masks drawn from an explicit generator.

Writes ``docs/figures/mc-dropout.png``: a network with dropout trained as usual
(dropout on, weight decay as the prior, Gal & Ghahramani 2016), then evaluated
with 200 seeded dropout masks in one batched call; the panel shows the
predictive mean and a 2-std band of the outputs over masks (epistemic only).

    python docs/examples/mc-dropout.py          # ~10 s on 2 cores
    python docs/examples/mc-dropout.py --fast   # a short run (what the test suite does)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import funcbnn
from funcbnn.families import dropout

from _gap import gap_data, train_map, cli


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(1, 100), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                               torch.nn.Linear(100, 100), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                               torch.nn.Linear(100, 1))


def main(out: Path, fast: bool) -> Path:
    g = torch.Generator().manual_seed(0)
    x, y = gap_data(200, g)
    grid = torch.linspace(-1.5, 1.5, 200)[:, None]
    torch.manual_seed(0)
    net = train_map(mlp().train(), x, y, 100 if fast else 1000)   # dropout active while training

    apply_fn, params, _ = funcbnn.mc_dropout.functionalize(net)  # seeded masks; other layers in eval mode
    post = dropout()
    num_masks = 50 if fast else 200
    draws = post.sample(post.init(params), num_masks, generator=g)  # {"params": ..., "seed": (num_masks,)}
    outputs = funcbnn.sample_outputs(apply_fn, draws, grid)         # (num_masks, 200, 1), one batched call
    s = funcbnn.summarize(outputs, "regression")

    fig, ax = plt.subplots(figsize=(5.5, 3))
    m, sd = s.mean[:, 0], s.epistemic_var[:, 0].sqrt()
    ax.fill_between(grid[:, 0], m - 2 * sd, m + 2 * sd, alpha=0.3, label="mean ± 2 std (masks)")
    ax.plot(grid[:, 0], m, label="predictive mean")
    ax.plot(grid[:, 0], torch.cos(4 * grid[:, 0] + 0.8), "k--", lw=1, label="truth")
    ax.scatter(x[:, 0], y[:, 0], s=6, c="k")
    ax.set(title=f"MC dropout, p = 0.1, {num_masks} masks", xlabel="x", ylim=(-3, 3))
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "mc-dropout.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


if __name__ == "__main__":
    cli(main, __doc__)
