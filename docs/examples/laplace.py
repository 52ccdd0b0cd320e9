"""Laplace on 1-D regression with a gap: post-hoc on a MAP, and online marginal-likelihood training.

Writes ``docs/figures/laplace.png`` with two panels, each the linearised (GLM)
predictive mean and a 2-std band (observation noise included):

- left: a MAP network, then a last-layer Kronecker-factored Laplace whose prior
  precision and noise std are tuned by the marginal likelihood (post hoc);
- right: :func:`funcbnn.laplace.marglik_training`, which trains the weights,
  the per-layer prior precisions and the noise together (Immer et al. 2021).

    python docs/examples/laplace.py          # ~10 s on 2 cores
    python docs/examples/laplace.py --fast   # a short run (what the test suite does)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import funcbnn

from _gap import gap_data, mlp, train_map, cli


def main(out: Path, fast: bool) -> Path:
    g = torch.Generator().manual_seed(0)
    x, y = gap_data(200, g)
    grid = torch.linspace(-1.5, 1.5, 200)[:, None]
    panels = []

    # Post hoc: MAP first, then a last-layer KFAC Laplace tuned by the marginal likelihood.
    torch.manual_seed(0)
    apply_fn, params, _ = funcbnn.functionalize(train_map(mlp(), x, y, 100 if fast else 2000))
    la, state = funcbnn.laplace.fit(apply_fn, params, [(x, y)], "regression",
                                    subset="last_layer", structure="kron")
    state = la.tune(state)                                   # prior precision and sigma
    mean, var = la.predict(state, grid)                      # GLM predictive, sigma^2 included
    panels.append(("post-hoc last-layer KFAC Laplace", mean, var, state))

    # Online: weights and hyperparameters together.
    torch.manual_seed(0)
    apply_fn, params, _ = funcbnn.functionalize(mlp())
    params, la, state, info = funcbnn.laplace.marglik_training(
        apply_fn, params, [(x, y)], "regression", structure="kron",
        epochs=40 if fast else 2000, lr=1e-2, marglik_frequency=20 if fast else 100,
        burnin=10 if fast else 50)
    mean, var = la.predict(state, grid)
    panels.append(("marglik_training, all-layer KFAC", mean, var, state))

    fig, axes = plt.subplots(1, 2, figsize=(8, 3), sharey=True)
    for ax, (title, mean, var, state) in zip(axes, panels):
        m, s = mean[:, 0], var.reshape(len(grid), -1)[:, 0].sqrt()
        ax.fill_between(grid[:, 0], m - 2 * s, m + 2 * s, alpha=0.3, label="mean ± 2 std")
        ax.plot(grid[:, 0], m, label="predictive mean")
        ax.plot(grid[:, 0], torch.cos(4 * grid[:, 0] + 0.8), "k--", lw=1, label="truth")
        ax.scatter(x[:, 0], y[:, 0], s=6, c="k")
        ax.set(title=f"{title}\nsigma = {float(state.sigma):.3f}", xlabel="x", ylim=(-3, 3))
        ax.title.set_fontsize(9)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "laplace.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


if __name__ == "__main__":
    cli(main, __doc__)
