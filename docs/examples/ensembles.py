"""A deep ensemble on 1-D regression with a gap in the data, all members trained in one vmapped step.

Writes ``docs/figures/ensembles.png``: five members of the same MLP, each from
its own initialisation (``ensemble.init_members``) and data order, trained at
once by ``ensemble.fit``; the panel shows every member and the ensemble's mean
with a 2-std band of the members' spread (epistemic only).

    python docs/examples/ensembles.py          # ~10 s on 2 cores
    python docs/examples/ensembles.py --fast   # a short run (what the test suite does)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import funcbnn
from funcbnn import ensemble

from _gap import gap_data, mlp, cli


def main(out: Path, fast: bool) -> Path:
    g = torch.Generator().manual_seed(0)
    x, y = gap_data(200, g)
    grid = torch.linspace(-1.5, 1.5, 200)[:, None]
    net = mlp()
    apply_fn, _, _ = funcbnn.functionalize(net)
    members = ensemble.init_members(net, 5, generator=g)    # leaves (5, *shape)
    result = ensemble.fit(apply_fn, members, (x, y), "regression", epochs=15 if fast else 150,
                          batch_size=50, optimizer=lambda leaves: torch.optim.Adam(leaves, lr=1e-2),
                          generator=g)
    outputs = funcbnn.sample_outputs(apply_fn, result.state.members, grid)   # (5, 200, 1)
    s = funcbnn.summarize(outputs, "regression")

    fig, ax = plt.subplots(figsize=(5.5, 3))
    m, sd = s.mean[:, 0], s.epistemic_var[:, 0].sqrt()
    ax.fill_between(grid[:, 0], m - 2 * sd, m + 2 * sd, alpha=0.3, label="mean ± 2 std (members)")
    ax.plot(grid[:, 0], outputs[..., 0].T, c="C1", lw=0.7, alpha=0.7)
    ax.plot(grid[:, 0], m, label="ensemble mean")
    ax.plot(grid[:, 0], torch.cos(4 * grid[:, 0] + 0.8), "k--", lw=1, label="truth")
    ax.scatter(x[:, 0], y[:, 0], s=6, c="k")
    ax.set(title="deep ensemble, 5 members (orange)", xlabel="x", ylim=(-3, 3))
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ensembles.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


if __name__ == "__main__":
    cli(main, __doc__)
