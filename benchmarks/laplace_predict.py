"""Benchmark: a prior-precision search by validation NLL, with and without reusing the linearisation.

Workload (the one that motivated :class:`funcbnn.laplace.Linearization`): an MLP 64-100-100-5 (tanh),
a Laplace approximation fitted on ``N_train = 1000`` synthetic examples (batches of 100), and a
33-point grid of prior precisions (``logspace(-4, 4, 33)``) scored by the NLL of the GLM probit
predictive on ``N_val = 500`` validation examples. Rows, for the structures ``diag`` (all weights),
``kron`` (all weights) and ``full`` (last layer):

* ``fresh`` -- ``la.predict(state, x_val, prior_precision=p)`` per grid point: every call
  linearises the network again (outputs and Jacobian pieces);
* ``reused`` -- one ``lin = la.linearize(state, x_val)``, then ``la.predict(state, lin, prior_precision=p)``
  per grid point (only the hyperparameter-dependent weighing is redone);
* ``tune(val_nll)`` -- the library's search, ``la.tune_validation(state, (x_val, y_val), grid=grid)``.

Each row is the minimum over ``--repeats`` timed runs after one warm-up; ``x fresh`` divides by the
``fresh`` row of the same structure (measured in the same process). The three must pick the same
prior precision (checked, ``best`` column). Run with ``python benchmarks/laplace_predict.py``.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from _load import LoadMeter

import funcbnn
from funcbnn.laplace import fit


def best_of(fn: Callable[[], float], repeats: int) -> tuple[float, float]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the workload is small)")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 9 grid points: a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    grid = torch.logspace(-4, 4, 9 if args.quick else 33)
    load = LoadMeter()
    print(f"funcbnn {funcbnn.__version__} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"{grid.numel()}-point grid | min of {repeats} runs")

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 100), nn.Tanh(), nn.Linear(100, 100), nn.Tanh(), nn.Linear(100, 5))
    x, y = torch.randn(1000, 64), torch.randint(0, 5, (1000,))
    xv, yv = torch.randn(500, 64), torch.randint(0, 5, (500,))
    apply_fn, params, _ = funcbnn.functionalize(net)
    data = [(x[i : i + 100], y[i : i + 100]) for i in range(0, 1000, 100)]

    print(f"\n| {'structure':<22} | {'search':<14} | {'time s':>8} | {'x fresh':>7} | {'best':>9} |")
    print(f"|{'-' * 24}|{'-' * 16}|{'-' * 10}|{'-' * 9}|{'-' * 11}|")
    for structure, subset in (("diag", "all"), ("kron", "all"), ("full", "last_layer")):
        la, state = fit(apply_fn, params, data, "categorical", structure=structure, subset=subset)

        def nll(probs: torch.Tensor) -> float:
            return float(F.nll_loss(probs.log(), yv))

        def fresh() -> float:
            scores = [nll(la.predict(state, xv, prior_precision=float(p))) for p in grid]
            return float(grid[min(range(len(scores)), key=scores.__getitem__)])

        def reused() -> float:
            lin = la.linearize(state, xv)
            scores = [nll(la.predict(state, lin, prior_precision=float(p))) for p in grid]
            return float(grid[min(range(len(scores)), key=scores.__getitem__)])

        def tuned() -> float:
            return float(la.tune_validation(state, (xv, yv), grid=grid)[0].prior_precision)

        with torch.no_grad():
            rows = [(name, *best_of(fn, repeats)) for name, fn in (("fresh", fresh), ("reused", reused),
                                                                  ("tune(val_nll)", tuned))]
        base = rows[0][1]
        label = f"{structure} ({subset})"
        for name, seconds, best in rows:
            flag = "" if best == rows[0][2] else " !!"
            print(f"| {label:<22} | {name:<14} | {seconds:8.3f} | {seconds / base:6.3f}x | {best:9.3g}{flag} |")
    print("\n" + load.footer())


if __name__ == "__main__":
    main()
