"""Bayes-by-Backprop (mean-field Gaussian VI) on 1-D regression with a gap in the data.

Writes ``docs/figures/vi.png``: the predictive mean and a 2-std band (weight
uncertainty plus the fixed observation noise) from 200 weight samples, and the
loss (``-ELBO / N`` per step) during training.

    python docs/examples/vi.py            # ~10 s on 2 cores
    python docs/examples/vi.py --fast     # a short run (what the test suite does)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import funcbnn
from funcbnn import vi

from _gap import gap_data, cli


def main(out: Path, fast: bool) -> Path:
    g = torch.Generator().manual_seed(0)
    x, y = gap_data(200, g)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 50), torch.nn.Tanh(), torch.nn.Linear(50, 1))
    apply_fn, params, _ = funcbnn.functionalize(net)

    post = funcbnn.diag_gaussian(init_std=1e-2)
    prior = funcbnn.priors.gaussian(std=1.0)
    lik = funcbnn.likelihoods.gaussian(sigma=0.1)          # known observation noise
    result = vi.fit(apply_fn, post, prior, post.init(params), (x, y), likelihood=lik,
                    epochs=40 if fast else 1000, num_samples=4, lr=1e-2, generator=g)

    grid = torch.linspace(-1.5, 1.5, 200)[:, None]
    samples = post.sample(result.state, 200, generator=g)
    outputs = funcbnn.sample_outputs(apply_fn, samples, grid)   # (200, 200, 1)
    s = funcbnn.summarize(outputs, lik)

    fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(8, 3), gridspec_kw={"width_ratios": [2, 1]})
    mean, std = s.mean[:, 0], s.total_var[:, 0].sqrt()
    ax.fill_between(grid[:, 0], mean - 2 * std, mean + 2 * std, alpha=0.3, label="mean ± 2 std")
    ax.plot(grid[:, 0], mean, label="predictive mean")
    ax.plot(grid[:, 0], torch.cos(4 * grid[:, 0] + 0.8), "k--", lw=1, label="truth")
    ax.scatter(x[:, 0], y[:, 0], s=8, c="k")
    ax.set(title="Bayes-by-Backprop, diagonal Gaussian", xlabel="x", ylim=(-3, 3))
    ax.legend(fontsize=7, loc="lower left")
    ax_loss.plot(result.history.loss)
    ax_loss.set(title="loss = -ELBO / N", xlabel="step", yscale="symlog")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "vi.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


if __name__ == "__main__":
    cli(main, __doc__)
