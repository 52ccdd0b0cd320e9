"""Benchmark: funcbnn's batched Monte-Carlo prediction against plain Python loops.

For each model / batch size / number of weight samples ``S`` the script measures,
in the same process and under ``torch.no_grad()``:

* ``sample``   -- ``post.sample(state, S)`` for a diagonal Gaussian posterior
  (reported on its own; it is *not* part of the forward times below);
* ``baseline`` -- the loop a user would write by hand::

      torch.stack([torch.func.functional_call(module, {k: v[i] for k, v in samples.items()}, (x,))
                   for i in range(S)])

* ``ownloop``  -- ``funcbnn.sample_outputs(..., method="loop")``;
* ``vmap``     -- ``funcbnn.sample_outputs(..., method="vmap")``;
* ``auto``     -- ``funcbnn.sample_outputs(...)`` (default ``method="auto"``), timed
  after warm-up so its one-off vmap-vs-loop calibration is not included (its one
  confirming measurement, at the 8th call, falls in one timed round, which the
  minimum discards).

Every timing is the minimum (or, with ``--stat median``, the median) of
``--repeats`` calls (more for sub-millisecond rows: as many rounds as fit in half a second) measured with ``time.perf_counter`` after two warm-up calls;
the four forward variants are timed in interleaved rounds, in an order shuffled
(seeded) every round, so that drift in machine load and the after-effects of the previous
call (a call right after a loop runs slower) hit them alike. The minimum is the default because on a shared
machine other processes only ever add time to a call. The ratios ``base/auto``
and ``own/auto`` are speed-ups of funcbnn's default path (higher is better for
funcbnn); ``auto/best`` is auto's time over the faster of the two forced paths
(``ownloop``, ``vmap``): the path choice is right where it is <= 1.05. ``path``
is the route auto's calibration settled on (``vmap`` or ``loop``), read with
``funcbnn._engine.chosen_path``.

The last lines check the targets of the tracking issues: auto is never slower
than the baseline loop (``base/auto >= 0.95``), is within 5% of the faster
forced path on every row, and is at least 5x faster than the baseline for the
small MLP at batch <= 32. On Linux the script also reports how much CPU
other processes used during the run: with 2 cores, even one busy neighbour
slows multi-threaded small ops severalfold and can tip auto's one-shot
calibration the wrong way, so rerun when that number is high.

Run with::

    python benchmarks/mc_predict.py            # full run (about a minute on 2 idle cores)
    python benchmarks/mc_predict.py --quick    # fewer repeats
    python benchmarks/mc_predict.py --repeats 15 --stat median
    python benchmarks/mc_predict.py --only CNN # one model (a shorter run fits a quiet window)
    python benchmarks/mc_predict.py --finite-checks  # + auto with the non-finite output check off
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from _load import LoadMeter  # a sibling script module: the benchmarks run as scripts from benchmarks/

import funcbnn
from funcbnn._engine import chosen_path as _engine_choices

SAMPLE_COUNTS = (16, 64)
INIT_STD = 0.05
WARMUP = 2
MIN_ROUND_SECONDS = 0.5  # cheap rows get more rounds: about this much timing per measurement
MAX_ROUNDS = 201
AUTO_MIN_SPEEDUP = 0.95  # auto must not lose more than 5% to the baseline anywhere
AUTO_MAX_OVER_BEST = 1.05  # ... nor more than 5% to the faster of the two forced paths
SMALL_MLP_MIN_SPEEDUP = 5.0  # ... and must beat it 5x for the small MLP at batch <= 32
SMALL_MLP_MAX_BATCH = 32


@dataclass(frozen=True)
class Config:
    """One benchmarked model and input batch."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # without the batch axis
    batch: int
    small_mlp: bool = False  # subject to the ">= 5x faster" target when batch <= 32


@dataclass(frozen=True)
class Row:
    """Times (seconds) for one configuration and sample count."""

    config: Config
    num_samples: int
    sample: float
    baseline: float
    ownloop: float
    vmap: float
    auto: float
    auto_path: str
    auto_unchecked: float | None = None  # auto under set_finite_checks(False), with --finite-checks

    @property
    def base_over_auto(self) -> float:
        return self.baseline / self.auto

    @property
    def own_over_auto(self) -> float:
        return self.ownloop / self.auto

    @property
    def auto_over_best(self) -> float:
        return self.auto / min(self.ownloop, self.vmap)


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))


def large_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


CONFIGS: tuple[Config, ...] = (
    Config("MLP 20-64-3", small_mlp, (20,), 1, small_mlp=True),
    Config("MLP 20-64-3", small_mlp, (20,), 32, small_mlp=True),
    Config("MLP 20-64-3", small_mlp, (20,), 256, small_mlp=True),
    Config("MLP 784-512-512-10", large_mlp, (784,), 256),
    Config("CNN 1x8x8", small_cnn, (1, 8, 8), 256),
)


def time_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


STATS: dict[str, Callable[[list[float]], float]] = {"min": min, "median": statistics.median}


def measure(fns: dict[str, Callable[[], object]], repeats: int, stat: str) -> dict[str, float]:
    """Wall time of each function: warm-up calls, then interleaved rounds, reduced by ``stat``.

    At least ``repeats`` rounds, more for sub-millisecond calls: as many as fit in
    :data:`MIN_ROUND_SECONDS` (at most :data:`MAX_ROUNDS`), since the minimum of 9
    calls of 0.1 ms still moves by 10% from one run to the next on a shared machine.
    """
    warm = 0.0
    for fn in fns.values():
        for _ in range(WARMUP):
            warm += time_once(fn)
    per_round = warm / WARMUP
    repeats = max(repeats, min(MAX_ROUNDS, int(MIN_ROUND_SECONDS / max(per_round, 1e-9))))
    names = list(fns)
    order = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        # Shuffle the order every round: a call right after a loop over samples runs
        # measurably slower (cache and allocator state), and a fixed order (or a
        # rotation of it) would always hand that penalty to the same variant.
        order.shuffle(names)
        for name in names:
            times[name].append(time_once(fns[name]))
    return {name: STATS[stat](ts) for name, ts in times.items()}


def chosen_path(apply_fn: object) -> str:
    """The path ``method="auto"`` settled on for ``apply_fn`` (one input shape, S and chunk size).

    Reads funcbnn's private engine, so it answers ``"?"`` rather than failing if
    that changes.
    """
    try:
        (path,) = set(_engine_choices(apply_fn).values())
        return path
    except Exception:
        return "?"


def _unchecked(fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        with funcbnn.checks.set_finite_checks(False):
            return fn()

    return call


def bench(config: Config, num_samples: int, repeats: int, stat: str, finite_checks: bool = False) -> Row:
    """Time sampling and the four forward variants for one configuration."""
    module = config.build().eval()
    apply_fn, params, _ = funcbnn.functionalize(module)
    post = funcbnn.diag_gaussian(init_std=INIT_STD)
    state = post.init(params)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(config.batch, *config.input_shape)
    samples = post.sample(state, num_samples, generator=generator)

    def baseline() -> Tensor:
        return torch.stack(
            [
                torch.func.functional_call(module, {k: v[i] for k, v in samples.items()}, (x,))
                for i in range(num_samples)
            ]
        )

    variants: dict[str, Callable[[], object]] = {
        "baseline": baseline,
        "ownloop": lambda: funcbnn.sample_outputs(apply_fn, samples, x, method="loop"),
        "vmap": lambda: funcbnn.sample_outputs(apply_fn, samples, x, method="vmap"),
        "auto": lambda: funcbnn.sample_outputs(apply_fn, samples, x),
    }
    if finite_checks:  # the cost of the non-finite check of the outputs, timed in the same rounds
        variants["auto_unchecked"] = _unchecked(variants["auto"])
    # Sanity check (also the first auto call, which runs its calibration): all agree.
    reference = baseline()
    for name, fn in variants.items():
        out = fn()
        shape_ok = isinstance(out, Tensor) and out.shape == reference.shape
        if not (shape_ok and torch.allclose(out, reference, rtol=1e-4, atol=1e-5)):
            where = f"{config.name} batch {config.batch} S={num_samples}"
            raise AssertionError(f"{where}: {name} differs from the baseline loop")

    def draw() -> object:
        return post.sample(state, num_samples, generator=generator)

    sample_time = measure({"sample": draw}, repeats, stat)
    forward = measure(variants, repeats, stat)
    return Row(config, num_samples, sample_time["sample"], **forward, auto_path=chosen_path(apply_fn))


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f}"


HEADER = (
    f"{'config':<20} {'batch':>5} {'S':>3} | {'sample':>9} | {'baseline':>9} {'ownloop':>9} "
    f"{'vmap':>9} {'auto':>9} | {'base/auto':>9} {'own/auto':>8} {'auto/best':>9} {'path':>5}"
)


def format_row(r: Row) -> str:
    text = (
        f"{r.config.name:<20} {r.config.batch:>5} {r.num_samples:>3} | {ms(r.sample)} | "
        f"{ms(r.baseline)} {ms(r.ownloop)} {ms(r.vmap)} {ms(r.auto)} | "
        f"{r.base_over_auto:>8.2f}x {r.own_over_auto:>7.2f}x {r.auto_over_best:>8.2f}x {r.auto_path:>5}"
    )
    if r.auto_unchecked is not None:
        text += f" | {ms(r.auto_unchecked)} {(r.auto - r.auto_unchecked) * 1e6:>8.1f}"
    return text


def label(row: Row) -> str:
    return f"{row.config.name} batch {row.config.batch} S={row.num_samples}"


def print_targets(rows: list[Row]) -> None:
    worst = min(rows, key=lambda r: r.base_over_auto)
    ok = worst.base_over_auto >= AUTO_MIN_SPEEDUP
    print(
        f"[{'PASS' if ok else 'MISS'}] auto/baseline speed >= {AUTO_MIN_SPEEDUP} everywhere: "
        f"worst {worst.base_over_auto:.2f}x ({label(worst)})"
    )
    worst = max(rows, key=lambda r: r.auto_over_best)
    ok = worst.auto_over_best <= AUTO_MAX_OVER_BEST
    print(
        f"[{'PASS' if ok else 'MISS'}] auto within {AUTO_MAX_OVER_BEST} of the faster forced path everywhere: "
        f"worst {worst.auto_over_best:.2f}x ({label(worst)}, auto took {worst.auto_path})"
    )
    small = [r for r in rows if r.config.small_mlp and r.config.batch <= SMALL_MLP_MAX_BATCH]
    if not small:
        return
    worst = min(small, key=lambda r: r.base_over_auto)
    ok = worst.base_over_auto >= SMALL_MLP_MIN_SPEEDUP
    print(
        f"[{'PASS' if ok else 'MISS'}] >= {SMALL_MLP_MIN_SPEEDUP:g}x faster than the baseline loop for the "
        f"small MLP at batch <= {SMALL_MLP_MAX_BATCH}: worst {worst.base_over_auto:.2f}x ({label(worst)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (3) for a fast smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 9)")
    parser.add_argument(
        "--stat", choices=sorted(STATS), default="min", help="how the repeats are reduced (default min)"
    )
    parser.add_argument(
        "--only", default=None, help="run only the configurations whose name contains this text (e.g. CNN)"
    )
    parser.add_argument(
        "--finite-checks", action="store_true",
        help="also time auto with funcbnn.checks.set_finite_checks(False): columns 'unchecked' (ms) and "
        "'check us' (what the non-finite check of the outputs costs per call)",
    )
    args = parser.parse_args()
    configs = [c for c in CONFIGS if args.only is None or args.only in c.name]
    if not configs:
        parser.error(f"--only {args.only!r} matches none of {sorted({c.name for c in CONFIGS})}")
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 9)
    if repeats < 1:
        parser.error("--repeats must be >= 1")

    torch.manual_seed(0)
    print(
        f"funcbnn {funcbnn.__version__} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
        f"{args.stat} of >= {repeats} after {WARMUP} warm-up calls | times in ms"
    )
    header = HEADER + (f" | {'unchecked':>9} {'check us':>8}" if args.finite_checks else "")
    print(header)
    print("-" * len(header))
    rows: list[Row] = []
    load = LoadMeter()
    with torch.no_grad():
        for config in configs:
            for num_samples in SAMPLE_COUNTS:
                rows.append(bench(config, num_samples, repeats, args.stat, args.finite_checks))
                print(format_row(rows[-1]), flush=True)
    print_targets(rows)
    print(load.footer())


if __name__ == "__main__":
    main()
