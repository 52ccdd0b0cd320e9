"""What the guide examples share: the 1-D regression data with a gap, the small MLP, a MAP fit, the CLI.

Each example is run as a script (``python docs/examples/<method>.py``), so this module sits beside
them and is imported by name.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch


def gap_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x uniform on [-1, -0.7] and [0.5, 1], y = cos(4x + 0.8) + N(0, 0.1^2)."""
    u = torch.rand(n, 1, generator=generator)
    x = torch.where(torch.arange(n)[:, None] < n // 2, -1 + 0.3 * u, 0.5 + 0.5 * u)
    y = torch.cos(4 * x + 0.8) + 0.1 * torch.randn(n, 1, generator=generator)
    return x, y


def mlp() -> torch.nn.Module:
    """The 1-50-1 tanh network of the VI, Laplace, SWAG and ensemble guides."""
    return torch.nn.Sequential(torch.nn.Linear(1, 50), torch.nn.Tanh(), torch.nn.Linear(50, 1))


def train_map(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.nn.Module:
    """Full-batch Adam on the squared error (a small weight decay as the prior), in place; returns ``net``."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return net


def cli(main: Callable[[Path, bool], Path], doc: str) -> None:
    """``--out DIR`` (default ``docs/figures``) and ``--fast`` (the test suite's short run), then ``main``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "figures")
    parser.add_argument("--fast", action="store_true", help="train briefly (for the test suite)")
    args = parser.parse_args()
    print(main(args.out, args.fast))
