"""Benchmark: one Bayes-by-Backprop training step in funcbnn against a hand-written step and peers.

Models ``MLP 784-512-512-10`` and ``MLP 20-64-3``, classification, a batch of 128
(``x ~ N(0, 1)``, uniform labels), a training set of ``N = 10,000`` for the KL scaling,
mean-field Gaussian posterior (initial std 0.05), ``N(0, 1)`` prior, Adam (lr 1e-3).
One *step* is: draw the weights, forward, loss ``mean CE + KL / N``, backward, optimiser
step. Rows:

* ``baseline`` -- written inline here with nothing but torch: ``eps ~ N(0, 1)``,
  ``w = mu + softplus(rho) * eps``, ``torch.func.functional_call``, cross-entropy
  mean + analytic KL / N, ``backward()``, ``Adam.step()``;
* ``funcbnn vi.build_step`` -- ``step(state, opt, (x, y), generator=g)``;
* ``funcbnn vi.build_step, no checks`` -- the same under
  ``funcbnn.checks.set_finite_checks(False)``: the difference is what the non-finite
  checks of the inputs, targets and loss cost;
* ``funcbnn BayesianModule`` -- ``out = model(x)``; ``CE + model.kl_divergence() / N``;
  backward; Adam;
* peers, where installed: torchbayesian ``BayesianModule`` (same loop as above),
  bayesian-torch ``dnn_to_bnn`` + ``get_kl_loss`` (Reparameterization layers),
  posteriors ``posteriors.vi.diag`` (``build(log_posterior, torchopt.adam)``;
  ``update``; its log-posterior is ``-CE_mean + log prior / N`` and it estimates
  ``log q`` by Monte Carlo with stick-the-landing, so it does slightly different
  arithmetic for the same objective).

Then, for ``S = 1, 4, 8`` weight samples, funcbnn's ``vi.elbo(..., num_samples=S)``
forward + ``backward()`` with ``method="vmap"``, ``"loop"`` and ``"auto"`` (auto's
one-off calibration runs during warm-up and is not timed, its confirmation at the 8th call
lands in one timed round, which the minimum discards; ``path`` is what it chose,
read from ``funcbnn._engine.chosen_path``; ``auto/best`` is auto's time over the faster
forced path, right where <= 1.05). With ``S = 1`` all three take the same single-draw path.

Every time is the minimum of ``--repeats`` calls after two warm-up calls, the variants of
one table timed in interleaved rounds in a shuffled (seeded) order, so machine-load
drift hits all alike; ratios are against the baseline measured in the same rounds. A
missing peer prints a ``not installed`` row, a failing one an ``error`` row.

Run with::

    python benchmarks/vi_step.py            # full run (a minute or two on 2 cores)
    python benchmarks/vi_step.py --quick    # tiny sizes, 1 repeat: a smoke run
    python benchmarks/vi_step.py --repeats 31 --stat median
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _load import LoadMeter  # a sibling script module: the benchmarks run as scripts from benchmarks/

import funcbnn
from funcbnn import vi
from funcbnn._engine import chosen_path as _engine_choices

NUM_DATA = 10_000
INIT_STD = 0.05
LR = 1e-3
WARMUP = 2
TARGET_STEP = 1.15  # funcbnn step <= 1.15x the hand-written baseline
AUTO_TOL = 1.05  # auto within 5% of the faster of vmap / loop counts as "picked the faster"
STATS: dict[str, Callable[[list[float]], float]] = {"min": min, "median": statistics.median}


def mlp(sizes: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class Config:
    name: str
    sizes: tuple[int, ...]
    batch: int


FULL = (Config("MLP 784-512-512-10", (784, 512, 512, 10), 128), Config("MLP 20-64-3", (20, 64, 3), 128))
QUICK = (Config("MLP 784-64-10", (784, 64, 10), 16), Config("MLP 20-16-3", (20, 16, 3), 16))
SAMPLE_COUNTS = (1, 4, 8)


class NotInstalled(Exception):
    pass


def inverse_softplus(std: float) -> float:
    return std + math.log(-math.expm1(-std))


# ---------------------------------------------------------------------------------------------
# step builders: each returns a zero-argument callable doing one full training step


def build_baseline(module: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Any]:
    module = copy.deepcopy(module)
    rho0 = inverse_softplus(INIT_STD)
    mu = {k: v.detach().clone().requires_grad_(True) for k, v in module.named_parameters()}
    rho = {k: torch.full_like(v, rho0).requires_grad_(True) for k, v in mu.items()}
    opt = torch.optim.Adam([*mu.values(), *rho.values()], lr=LR)
    gen = torch.Generator().manual_seed(0)

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        weights, kl = {}, 0.0
        for k in mu:
            std = F.softplus(rho[k])
            eps = torch.randn(mu[k].shape, generator=gen)
            weights[k] = mu[k] + std * eps
            kl = kl + (0.5 * (std.square() + mu[k].square()) - torch.log(std) - 0.5).sum()
        out = torch.func.functional_call(module, weights, (x,))
        loss = F.cross_entropy(out, y) + kl / NUM_DATA
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def build_funcbnn_step(module: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Any]:
    apply_fn, params, _ = funcbnn.functionalize(copy.deepcopy(module))
    post, prior = funcbnn.diag_gaussian(init_std=INIT_STD), funcbnn.priors.gaussian(1.0)
    state = vi.trainable(post.init(params))
    opt = torch.optim.Adam(vi.leaves(state), lr=LR)
    train_step = vi.build_step(apply_fn, post, prior, num_data=NUM_DATA)
    gen = torch.Generator().manual_seed(0)

    def step() -> Tensor:
        _, info = train_step(state, opt, (x, y), generator=gen)
        return info.loss

    return step


def build_funcbnn_step_unchecked(module: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Any]:
    """The same step with the non-finite checks off (``funcbnn.checks.set_finite_checks(False)``):
    the difference to ``vi.build_step`` is what the checks cost (finite inputs and targets, finite loss:
    three host syncs per step)."""
    step = build_funcbnn_step(module, x, y)

    def unchecked() -> Tensor:
        with funcbnn.checks.set_finite_checks(False):
            return step()

    return unchecked


def _module_step(model: nn.Module, kl: Callable[[], Tensor], x: Tensor, y: Tensor) -> Callable[[], Any]:
    opt = torch.optim.Adam(model.parameters(), lr=LR)

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y) + kl() / NUM_DATA
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def build_funcbnn_module(module: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Any]:
    model = funcbnn.BayesianModule(
        copy.deepcopy(module), posterior=("pretrained_gaussian", {"init_std": INIT_STD})
    )
    return _module_step(model, model.kl_divergence, x, y)


def build_torchbayesian(module: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Any]:
    try:
        from torchbayesian.bnn import BayesianModule
    except ImportError as err:
        raise NotInstalled(str(err)) from None
    model = BayesianModule(copy.deepcopy(module))
    return _module_step(model, lambda: model.kl_divergence(reduction="sum"), x, y)


def build_bayesian_torch(module: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Any]:
    try:
        from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn, get_kl_loss
    except ImportError as err:
        raise NotInstalled(str(err)) from None
    model = copy.deepcopy(module)
    dnn_to_bnn(
        model,
        {
            "prior_mu": 0.0,
            "prior_sigma": 1.0,
            "posterior_mu_init": 0.0,
            "posterior_rho_init": inverse_softplus(INIT_STD),
            "type": "Reparameterization",
            "moped_enable": False,
        },
    )
    return _module_step(model, lambda: get_kl_loss(model), x, y)


def build_posteriors(module: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import posteriors
            import torchopt
    except ImportError as err:
        raise NotInstalled(str(err)) from None
    model = copy.deepcopy(module)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def log_posterior(p: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        xb, yb = batch
        out = torch.func.functional_call(model, p, (xb,))
        log_prior = sum(-0.5 * w.square().sum() for w in p.values())
        return -F.cross_entropy(out, yb) + log_prior / NUM_DATA, out

    transform = posteriors.vi.diag.build(
        log_posterior, torchopt.adam(lr=LR), temperature=1.0 / NUM_DATA, init_log_sds=math.log(INIT_STD)
    )
    holder = {"state": transform.init(params)}

    def step() -> Any:
        holder["state"], _ = transform.update(holder["state"], (x, y))
        return holder["state"].nelbo

    return step


STEP_ROWS: tuple[tuple[str, Callable[..., Callable[[], Any]]], ...] = (
    ("baseline (hand-written)", build_baseline),
    ("funcbnn vi.build_step", build_funcbnn_step),
    ("funcbnn vi.build_step, no checks", build_funcbnn_step_unchecked),
    ("funcbnn BayesianModule", build_funcbnn_module),
    ("torchbayesian BayesianModule", build_torchbayesian),
    ("bayesian-torch dnn_to_bnn", build_bayesian_torch),
    ("posteriors vi.diag", build_posteriors),
)
PEERS = ("torchbayesian BayesianModule", "bayesian-torch dnn_to_bnn", "posteriors vi.diag")


# ---------------------------------------------------------------------------------------------
# measurement


def measure(fns: dict[str, Callable[[], object]], repeats: int, stat: str, seed: int = 0) -> dict[str, float]:
    """Warm-up calls, then ``repeats`` interleaved rounds in a shuffled order, reduced by ``stat``."""
    for fn in fns.values():
        for _ in range(WARMUP):
            fn()
    names = list(fns)
    order = random.Random(seed)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        order.shuffle(names)
        for n in names:
            start = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - start)
    return {n: STATS[stat](ts) for n, ts in times.items()}


def elbo_fn(
    apply_fn: Any,
    post: Any,
    state: Any,
    prior: Any,
    x: Tensor,
    y: Tensor,
    s: int,
    method: str,
    gen: torch.Generator,
) -> Callable[[], Any]:
    leaves = vi.leaves(state)

    def run() -> None:
        for leaf in leaves:
            leaf.grad = None
        info = vi.elbo(
            apply_fn, post, state, prior, (x, y), NUM_DATA, num_samples=s, method=method, generator=gen
        )
        info.loss.backward()

    return run


def chosen_path(apply_fn: Any, s: int) -> str:
    """The path ``method="auto"`` settled on for ``s`` draws (funcbnn's private engine; ``?`` if it changes)."""
    if s == 1:
        return "single"
    try:
        # keys end with (S, chunk, timed with a backward pass)
        paths = {path for key, path in _engine_choices(apply_fn).items() if len(key) > 3 and key[-3] == s}
        (path,) = paths
        return path
    except Exception:  # noqa: BLE001 -- private layout changed: report "?"
        return "?"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.3f}"


def bench_steps(cfg: Config, repeats: int, stat: str, results: dict) -> None:
    torch.manual_seed(0)
    module = mlp(cfg.sizes)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(cfg.batch, cfg.sizes[0], generator=gen)
    y = torch.randint(0, cfg.sizes[-1], (cfg.batch,), generator=gen)
    fns: dict[str, Callable[[], object]] = {}
    status: dict[str, str] = {}
    for name, build in STEP_ROWS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn = build(module, x, y)
                loss = fn()
            if not torch.isfinite(torch.as_tensor(loss)).all():
                raise FloatingPointError("non-finite loss")
            fns[name] = fn
        except NotInstalled as err:
            status[name] = f"not installed ({err})"
        except Exception as err:  # noqa: BLE001 -- a failing peer must not stop the benchmark
            status[name] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = measure(fns, repeats, stat)
    base = times["baseline (hand-written)"]
    print(f"\n### VI step: {cfg.name}, batch {cfg.batch}\n")
    header = f"| {'method':<30} | {'ms/step':>9} | {'x base':>7} | note |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name, _ in STEP_ROWS:
        if name in times:
            print(f"| {name:<30} | {ms(times[name])} | {times[name] / base:6.2f}x |  |")
        else:
            print(f"| {name:<30} | {'-':>9} | {'-':>7} | {status[name]} |")
    results[cfg.name] = {"steps": times, "status": status}


def bench_samples(cfg: Config, repeats: int, stat: str, results: dict) -> None:
    torch.manual_seed(0)
    module = mlp(cfg.sizes)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(cfg.batch, cfg.sizes[0], generator=gen)
    y = torch.randint(0, cfg.sizes[-1], (cfg.batch,), generator=gen)
    apply_fn, params, _ = funcbnn.functionalize(module)
    post, prior = funcbnn.diag_gaussian(init_std=INIT_STD), funcbnn.priors.gaussian(1.0)
    state = vi.trainable(post.init(params))
    print(f"\n### ELBO forward+backward with S weight samples: {cfg.name}, batch {cfg.batch}\n")
    header = (
        f"| {'S':>2} | {'vmap ms':>9} | {'loop ms':>9} | {'auto ms':>9} | {'loop/vmap':>9} | "
        f"{'auto/best':>9} | {'path':>6} |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    rows = []
    for s in SAMPLE_COUNTS:
        fns = {
            m: elbo_fn(apply_fn, post, state, prior, x, y, s, m, torch.Generator().manual_seed(2))
            for m in ("vmap", "loop", "auto")
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = measure(fns, repeats, stat, seed=s)
        path = chosen_path(apply_fn, s)
        best = min(t["vmap"], t["loop"])
        rows.append((s, t, path))
        print(
            f"| {s:>2} | {ms(t['vmap'])} | {ms(t['loop'])} | {ms(t['auto'])} | {t['loop'] / t['vmap']:8.2f}x | "
            f"{t['auto'] / best:8.2f}x | {path:>6} |"
        )
    results[cfg.name]["samples"] = rows


def bench_local_reparam(cfg: Config, repeats: int, stat: str, draws: int) -> None:
    """Variance of the minibatch gradient in the posterior means, weight sampling vs local
    reparameterisation (Kingma et al. 2015), one draw per estimate; and the cost of one ELBO
    forward+backward each."""
    from funcbnn.local_reparam import local_reparameterize

    torch.manual_seed(0)
    module = mlp(cfg.sizes)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(cfg.batch, cfg.sizes[0], generator=gen)
    y = torch.randint(0, cfg.sizes[-1], (cfg.batch,), generator=gen)
    post, prior = funcbnn.diag_gaussian(init_std=INIT_STD), funcbnn.priors.gaussian(1.0)
    plain_fn, params, _ = funcbnn.functionalize(module)
    local_fn, _, _ = local_reparameterize(module)
    state = vi.trainable(post.init(params))
    leaves = list(state.mean.values())
    names = [k for k in state.mean if k.endswith("weight")]

    def grads(apply_fn: Any, seed: int) -> list[Tensor]:
        loss = vi.elbo(apply_fn, post, state, prior, (x, y), NUM_DATA,
                       generator=torch.Generator().manual_seed(seed)).loss
        return torch.autograd.grad(loss, leaves)

    print(f"\n### Local reparameterisation: {cfg.name}, batch {cfg.batch}, init std {INIT_STD}, {draws} draws\n")
    print("| layer weight | grad var (weights) | grad var (local) | reduction |")
    print("|---|---|---|---|")
    var = {}
    for label, fn in (("weights", plain_fn), ("local", local_fn)):
        g = [grads(fn, seed) for seed in range(draws)]
        var[label] = {k: torch.stack([gi[i] for gi in g]).var(0).mean().item()
                      for i, k in enumerate(state.mean) if k in names}
    for k in names:
        print(f"| {k} | {var['weights'][k]:.3e} | {var['local'][k]:.3e} | {var['weights'][k] / var['local'][k]:.1f}x |")
    times = measure({"weights": lambda: grads(plain_fn, 0), "local": lambda: grads(local_fn, 0)}, repeats, stat)
    print(f"\nELBO forward+backward, 1 draw: weight sampling {ms(times['weights'])} ms, "
          f"local reparameterisation {ms(times['local'])} ms ({times['local'] / times['weights']:.2f}x)")


def print_targets(results: dict) -> None:
    print()
    for model, res in results.items():
        steps, status = res["steps"], res["status"]
        base = steps["baseline (hand-written)"]
        for row in ("funcbnn vi.build_step", "funcbnn BayesianModule"):
            if row in steps:
                r = steps[row] / base
                print(
                    f"[{'PASS' if r <= TARGET_STEP else 'MISS'}] {model}: {row} {r:.2f}x the hand-written step (target <= {TARGET_STEP})"
                )
        own = steps.get("funcbnn vi.build_step")
        unchecked = steps.get("funcbnn vi.build_step, no checks")
        if own is not None and unchecked is not None:
            print(f"[INFO] {model}: the non-finite checks cost {100 * (own / unchecked - 1):+.1f}% of a step")
        for peer in PEERS:
            if peer not in steps:
                print(f"[SKIP] {model}: {peer}: {status.get(peer, 'not run')}")
            elif own is not None:
                speedup = steps[peer] / own
                print(
                    f"[{'PASS' if speedup > 1 else 'MISS'}] {model}: funcbnn step vs {peer}: {speedup:.2f}x faster"
                )
        for s, t, path in res.get("samples", []):
            if s == 1:
                continue
            vm_ok = t["vmap"] <= t["loop"]
            auto_ok = t["auto"] <= AUTO_TOL * min(t["vmap"], t["loop"])
            print(
                f"[{'PASS' if vm_ok else 'MISS'}] {model} S={s}: vmap {t['vmap'] * 1e3:.2f} ms vs loop {t['loop'] * 1e3:.2f} ms "
                f"({t['loop'] / t['vmap']:.2f}x); "
                f"[{'PASS' if auto_ok else 'MISS'}] auto ({path}) {t['auto'] / min(t['vmap'], t['loop']):.2f}x the faster"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 21; quick 1)")
    parser.add_argument(
        "--stat", choices=sorted(STATS), default="min", help="how the repeats are reduced (default min)"
    )
    args = parser.parse_args()
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 21)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    configs = QUICK if args.quick else FULL
    print(
        f"funcbnn {funcbnn.__version__} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
        f"{args.stat} of {repeats} after {WARMUP} warm-up calls | N={NUM_DATA} | times in ms"
    )
    load = LoadMeter()
    results: dict = {}
    for cfg in configs:
        bench_steps(cfg, repeats, args.stat, results)
        bench_samples(cfg, repeats, args.stat, results)
    for cfg in configs:
        bench_local_reparam(cfg, repeats, args.stat, draws=5 if args.quick else 50)
    print_targets(results)
    if args.quick:
        print("(--quick: tiny models and 1 repeat; the PASS/MISS lines above say nothing about the targets)")
    print("\n" + load.footer())


if __name__ == "__main__":
    main()
