"""Benchmark: deep ensembles trained as one vmapped model, MC-dropout prediction, SWAG's collection cost.

Rows, all measured in this process (minimum over ``--repeats`` after a warm-up):

* **ensemble epoch** -- one epoch (``N = 1024`` examples, batch 128, Adam) of ``K`` members on
  the MLPs 20-64-3 and 784-512-512-10: ``vmap`` (``funcbnn.ensemble.fit``, one vmapped forward
  and backward per step), ``loop`` (``method="loop"``: the members one after another inside the
  same step) and ``torch`` (``K`` ordinary ``nn.Module`` copies, each with its own Adam, trained
  one after another: what a user writes without funcbnn). Target: vmap >= 3x the torch loop on
  the small MLP and never slower than the faster loop on the big one. ``finite checks``: the
  vmap epoch's time with the non-finite checks (data once, the losses every step) over its time
  under ``funcbnn.checks.set_finite_checks(False)``.
* **MC dropout** -- ``S`` seeded-mask predictions (``funcbnn.mc_dropout``) on a batch of 128,
  ``sample_outputs(method="vmap")`` vs ``method="loop"``, and the global-RNG baseline (the
  module in train mode called ``S`` times).
* **SWAG collection** -- ``swag.update`` (K = 20 deviations) once per epoch, as a share of one
  SGD epoch on the big MLP. Target: under 5%.

Run with ``python benchmarks/ensembles.py`` (``--quick`` for fewer repeats).
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Callable

import torch
from torch import nn

from _load import LoadMeter

import funcbnn
from funcbnn import ensemble, mc_dropout, swag
from funcbnn.families.dropout import dropout


def mlp(sizes: tuple[int, ...], p: float = 0.0) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if p:
                layers.append(nn.Dropout(p))
    return nn.Sequential(*layers)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def torch_loop_epoch(nets: list[nn.Module], opts: list[torch.optim.Optimizer], x, y, orders, batch: int) -> None:
    for k, (net, opt) in enumerate(zip(nets, opts)):
        for start in range(0, x.shape[0], batch):
            idx = orders[k, start : start + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()


def ensemble_rows(repeats: int) -> list[str]:
    rows = []
    for sizes in ((20, 64, 3), (784, 512, 512, 10)):
        torch.manual_seed(0)
        n, batch = 1024, 128
        x, y = torch.randn(n, sizes[0]), torch.randint(0, sizes[-1], (n,))
        net = mlp(sizes)
        apply_fn, _, _ = funcbnn.functionalize(net)
        for k in (5, 10):
            members = ensemble.init_members(net, k, generator=torch.Generator().manual_seed(0))
            times = {}
            for method in ("vmap", "loop"):
                times[method] = best_of(
                    lambda: ensemble.fit(apply_fn, members, (x, y), epochs=1, batch_size=batch, method=method,
                                         generator=torch.Generator().manual_seed(1)),
                    repeats,
                )
            with funcbnn.checks.set_finite_checks(False):  # what the non-finite checks cost an epoch
                times["unchecked"] = best_of(
                    lambda: ensemble.fit(apply_fn, members, (x, y), epochs=1, batch_size=batch, method="vmap",
                                         generator=torch.Generator().manual_seed(1)),
                    repeats,
                )
            nets = [copy.deepcopy(net) for _ in range(k)]
            opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in nets]
            orders = torch.stack([torch.randperm(n) for _ in range(k)])
            times["torch"] = best_of(lambda: torch_loop_epoch(nets, opts, x, y, orders, batch), repeats)
            name = "-".join(map(str, sizes))
            rows.append(
                f"ensemble epoch {name:>16} K={k:<3} vmap {times['vmap'] * 1e3:8.1f} ms  loop {times['loop'] * 1e3:8.1f} ms  "
                f"torch {times['torch'] * 1e3:8.1f} ms  torch/vmap {times['torch'] / times['vmap']:5.2f}x  "
                f"loop/vmap {times['loop'] / times['vmap']:5.2f}x  "
                f"finite checks {100 * (times['vmap'] / times['unchecked'] - 1):+5.1f}%"
            )
    return rows


def dropout_rows(repeats: int) -> list[str]:
    rows = []
    for sizes, s in (((20, 64, 3), 64), ((784, 512, 512, 10), 32)):
        torch.manual_seed(0)
        net = mlp(sizes, p=0.2).eval()
        apply_fn, params, _ = mc_dropout.functionalize(net)
        post = dropout()
        draws = post.sample(post.init(params), s, generator=torch.Generator().manual_seed(0))
        x = torch.randn(128, sizes[0])
        with torch.no_grad():
            t_vmap = best_of(lambda: funcbnn.sample_outputs(apply_fn, draws, x, method="vmap"), repeats)
            t_loop = best_of(lambda: funcbnn.sample_outputs(apply_fn, draws, x, method="loop"), repeats)
            live = copy.deepcopy(net).train()
            t_torch = best_of(lambda: torch.stack([live(x) for _ in range(s)]), repeats)
        name = "-".join(map(str, sizes))
        rows.append(
            f"MC dropout {name:>16} S={s:<3} vmap {t_vmap * 1e3:8.2f} ms  loop {t_loop * 1e3:8.2f} ms  "
            f"global-RNG loop {t_torch * 1e3:8.2f} ms  loop/vmap {t_loop / t_vmap:5.2f}x"
        )
    return rows


def swag_rows(repeats: int) -> list[str]:
    torch.manual_seed(0)
    sizes = (784, 512, 512, 10)
    net = mlp(sizes)
    apply_fn, params, _ = funcbnn.functionalize(net)
    n = 50 * 128  # a small epoch: 50 steps of 128 (MNIST's is 469)
    x, y = torch.randn(n, 784), torch.randint(0, 10, (n,))
    theta = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.SGD(list(theta.values()), lr=0.01, momentum=0.9)

    def epoch() -> None:
        for start in range(0, n, 128):
            opt.zero_grad()
            nn.functional.cross_entropy(apply_fn(theta, x[start : start + 128]), y[start : start + 128]).backward()
            opt.step()

    state = swag.init(params, max_rank=20)
    t_epoch = best_of(epoch, repeats)
    t_update = best_of(lambda: swag.update(state, theta), repeats)
    return [
        f"SWAG collection (784-512-512-10, K=20): update {t_update * 1e3:.2f} ms, SGD epoch (50 x 128) "
        f"{t_epoch * 1e3:.1f} ms: {100 * t_update / t_epoch:.1f}% of an epoch (target < 5%)"
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    meter = LoadMeter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {repeats}")
    for row in ensemble_rows(repeats) + dropout_rows(repeats) + swag_rows(repeats):
        print(row, flush=True)
    print(meter.footer())


if __name__ == "__main__":
    main()
