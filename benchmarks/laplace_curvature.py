"""Benchmark: funcbnn Laplace curvature (diagonal EF / GGN / MC-GGN, KFAC) vs a plain backward and peers.

Two classifiers, ``N = 1024`` synthetic examples (``x ~ N(0, 1)``, uniform labels), always
processed in **batches of 256** (four batches; the same list of batches for every row
unless a row says otherwise):

* ``MLP 784-512-512-10`` (669,706 weights) on 784-d inputs;
* ``CNN`` ``Conv2d(1,16,3)-ReLU-Conv2d(16,32,3)-ReLU-Flatten-Linear(4608,10)`` on 1x16x16
  inputs (51,562 weights). 16x16 rather than 28x28 keeps the last layer's KFAC input
  factor at 4608^2 instead of 18432^2 (1.4 GB).

**Baseline**: one plain pass of forward + ``torch.autograd.grad`` of the summed
cross-entropy over the same four batches -- what one epoch of gradient computation
costs. Every row's time is divided by a baseline timed *in the same process,
interleaved with that row* (the order of the two is shuffled every round), so
``x base`` compares like with like even when machine load drifts.

Rows (each computes the quantity over all N examples; ``~`` marks a time extrapolated
linearly from a subset, see the ``note`` column):

* funcbnn ``diag_curvature`` -- EF (structured), exact GGN (structured), MC-GGN (1 label
  sample, structured), EF through ``method="generic"`` (chunked ``vmap(grad)``);
* a hand-written per-example loop (one ``torch.autograd.grad`` per example on a batch of
  1, squares summed) on the first 64 examples, scaled by N/64;
* funcbnn KFAC (``funcbnn.laplace.kron.kron_curvature``), if that module exists;
* laplace-torch 0.3 ``DiagLaplace(model, "classification", backend=...).fit(loader)``
  with the BackPACK, ASDL and Curvlinops backends, EF and GGN. The "loader" is the
  same list of pre-made batches with a ``.dataset`` attribute (no DataLoader
  collation cost is charged to anyone). laplace-torch's ``CurvlinopsGGN.diag`` goes
  through laplace's own ``torch.func.jacrev`` path, which holds a ``B x C x P``
  Jacobian (about 14 GB for the MLP at B=256); that row uses batches of 32 for
  the MLP (same data, same total) and says so;
* laplace-torch Kronecker curvature pass: ``la.backend.kron(x, y, N)`` over the
  batches (the curvature only; ``KronLaplace.fit`` adds an eigendecomposition of
  every factor, which for the CNN's 4608x4608 factor costs far more than the pass);
  where slow, timed on the first batch and scaled by 4;
* posteriors 0.1.3 ``posteriors.laplace.diag_fisher`` (build / init / update per batch,
  default ``per_sample=False``, i.e. posteriors vmaps a per-example log-likelihood).

A peer that is not installed (ImportError) gives a ``not installed`` row; any other
failure an ``error`` row; the script itself never fails on a peer.

**Timing**: ``time.perf_counter``; one warm-up call on an 8-example batch, then up to
``--repeats`` timed calls of the row (the first one also measures memory; the others
alternate with the baseline in a shuffled order), stopping early once the row has used
``--budget`` seconds; the baseline alongside gets at least 3 calls. The minimum is
reported (on a shared machine other processes only ever add time). ``reps`` says how
many timed calls a row got: slow rows get one.

**Peak memory** (``peak MB``): torch's CPU allocations are invisible to ``tracemalloc``,
so the script measures the process's resident set. Before the first full-size call of a
row it runs ``gc.collect()`` and glibc ``malloc_trim(0)`` (so freed memory is handed back
to the OS and cannot be silently reused), reads ``VmRSS`` from ``/proc/self/status``,
resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``) and after the
call reads ``VmHWM``: ``peak MB = VmHWM - VmRSS_before``, the extra resident memory the
call needed at its worst moment (inputs, model and imports excluded). Where the reset
is not possible (non-Linux) the column falls back to ``ru_maxrss`` deltas, a lower
bound, marked ``>=``. Rows run in one subprocess per library (funcbnn + loop,
laplace-torch, posteriors) so one library's imports and hooks cannot affect another's.

**Check**: every diagonal row is compared with funcbnn's structured result of the same
kind on the same examples, ``max|d - d_ref| / max|d_ref|``; MC-GGN and KFAC rows have no
exact reference (``-``).

Run with::

    python benchmarks/laplace_curvature.py            # full run (a few minutes on 2 cores)
    python benchmarks/laplace_curvature.py --quick    # tiny sizes, 1 repeat: a smoke run
    python benchmarks/laplace_curvature.py --models mlp --only funcbnn --repeats 9
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import random
import re
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _load import LoadMeter  # a sibling script module: the benchmarks run as scripts from benchmarks/

GROUPS = ("funcbnn", "laplace-torch", "posteriors")
CHECK_TOL = 1e-3  # relative max-abs difference above which a row is flagged
TARGET_EF = 1.5  # funcbnn diag EF <= 1.5x baseline
TARGET_KFAC = 2.0  # funcbnn KFAC <= 2x baseline
TARGET_GGN = 5.0  # funcbnn exact diag GGN <= 5x baseline (issue 12; the CNN's weak spot)
JACOBIAN_BUDGET_BYTES = (
    2 * 2**30
)  # largest B x C x P Jacobian (x2 for laplace's torch.cat copy) we let a row build


# ---------------------------------------------------------------------------------------------
# models and data


def mlp(sizes: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def cnn(side: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * (side - 4) ** 2, 10),
    )


@dataclass
class Sizes:
    num_data: int
    batch: int
    loop_subset: int
    mlp: tuple[int, ...]
    cnn_side: int


FULL = Sizes(num_data=1024, batch=256, loop_subset=64, mlp=(784, 512, 512, 10), cnn_side=16)
QUICK = Sizes(num_data=64, batch=32, loop_subset=8, mlp=(784, 64, 10), cnn_side=8)


def model_names(sizes: Sizes) -> dict[str, str]:
    return {
        "mlp": "MLP " + "-".join(map(str, sizes.mlp)),
        "cnn": f"CNN 1x{sizes.cnn_side}x{sizes.cnn_side}",
    }


class Batches(list):
    """A list of (x, y) batches with the ``.dataset`` laplace-torch reads N from."""

    dataset: Any = None


@dataclass
class Ctx:
    """One model (with fixed weights) and its data, as the rows see it."""

    model: nn.Module
    batches: Batches
    num_data: int
    loop_subset: int

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def rebatch(self, size: int) -> Batches:
        x = torch.cat([b[0] for b in self.batches])
        y = torch.cat([b[1] for b in self.batches])
        out = Batches((x[i : i + size], y[i : i + size]) for i in range(0, len(y), size))
        out.dataset = range(len(y))
        return out

    def tiny(self) -> Ctx:
        x, y = self.batches[0]
        b = Batches([(x[:8], y[:8])])
        b.dataset = range(8)
        return Ctx(self.model, b, 8, min(self.loop_subset, 4))


def make_ctx(which: str, sizes: Sizes) -> Ctx:
    torch.manual_seed(0)
    model = mlp(sizes.mlp) if which == "mlp" else cnn(sizes.cnn_side)
    gen = torch.Generator().manual_seed(1)
    shape = (sizes.mlp[0],) if which == "mlp" else (1, sizes.cnn_side, sizes.cnn_side)
    x = torch.randn(sizes.num_data, *shape, generator=gen)
    y = torch.randint(0, 10, (sizes.num_data,), generator=gen)
    batches = Batches(
        (x[i : i + sizes.batch], y[i : i + sizes.batch]) for i in range(0, sizes.num_data, sizes.batch)
    )
    batches.dataset = range(sizes.num_data)
    return Ctx(model, batches, sizes.num_data, sizes.loop_subset)


def flat(model: nn.Module, tree: dict[str, Tensor]) -> Tensor:
    return torch.cat([tree[name].detach().reshape(-1) for name, _ in model.named_parameters()])


# ---------------------------------------------------------------------------------------------
# rows


class NotInstalled(Exception):
    pass


@dataclass
class Prepared:
    call: Callable[[], Tensor | None]  # returns the flat diagonal (for the check) or None
    scale: float = 1.0  # time multiplier to the whole data set (subset rows)
    note: str = ""
    check: str | None = None  # "ef" / "ggn": compare with funcbnn's structured result
    check_batches: Any = None  # the examples the returned diagonal covers (default: all)


@dataclass
class RowSpec:
    name: str
    group: str
    build: Callable[[Ctx], Prepared]
    key: str = ""  # stable id used by the target checks


def _baseline(ctx: Ctx) -> Prepared:
    model = ctx.fresh()
    params = [p for p in model.parameters()]

    def call() -> None:
        for x, y in ctx.batches:
            loss = F.cross_entropy(model(x), y, reduction="sum")
            torch.autograd.grad(loss, params)

    return Prepared(call, note="forward + autograd.grad of summed CE, per batch")


def _funcbnn_diag(kind: str, method: str) -> Callable[[Ctx], Prepared]:
    def build(ctx: Ctx) -> Prepared:
        import funcbnn
        from funcbnn.laplace import diag_curvature

        model = ctx.fresh()
        apply_fn, params, _ = funcbnn.functionalize(model)
        gen = torch.Generator().manual_seed(0)

        def call() -> Tensor:
            diag, _ = diag_curvature(
                apply_fn,
                params,
                ctx.batches,
                "categorical",
                kind=kind,
                method=method,
                num_mc=1,
                generator=gen,
            )
            return flat(model, diag)

        return Prepared(call, check=kind if kind != "mc_ggn" else None)

    return build


def _loop(ctx: Ctx) -> Prepared:
    model = ctx.fresh()
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    x, y = ctx.batches[0]
    n = min(ctx.loop_subset, len(y))
    xs, ys = x[:n], y[:n]
    sub = Batches([(xs, ys)])

    def call() -> Tensor:
        acc = [torch.zeros_like(p) for p in params]
        for i in range(n):
            loss = F.cross_entropy(model(xs[i : i + 1]), ys[i : i + 1], reduction="sum")
            for a, g in zip(acc, torch.autograd.grad(loss, params)):
                a.add_(g.square())
        return flat(model, dict(zip(names, acc)))

    return Prepared(
        call,
        scale=ctx.num_data / n,
        note=f"~ {n} examples x{ctx.num_data / n:g}",
        check="ef",
        check_batches=sub,
    )


def _funcbnn_kron(kind: str) -> Callable[[Ctx], Prepared]:
    def build(ctx: Ctx) -> Prepared:
        import funcbnn

        try:
            from funcbnn.laplace.kron import kron_curvature
        except ImportError as err:
            raise NotInstalled(f"funcbnn.laplace.kron absent ({err})") from None
        model = ctx.fresh()
        apply_fn, params, _ = funcbnn.functionalize(model)
        gen = torch.Generator().manual_seed(0)

        def call() -> None:
            kron_curvature(apply_fn, params, ctx.batches, "categorical", kind=kind, generator=gen)

        return Prepared(call, note=f"kron_curvature(kind={kind!r})")

    return build


def _laplace_import():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import laplace
            from laplace import curvature
    except ImportError as err:
        raise NotInstalled(str(err)) from None
    return laplace, curvature


def _jacrev_bytes(model: nn.Module, x: Tensor, batch: int, outputs: int = 10) -> float:
    """Rough memory of laplace-torch's ``jacrev`` Jacobian at ``batch`` examples.

    ``jacrev`` vmaps a backward over all ``B*C`` output cotangents, each carrying the
    whole batch's activation gradients, and returns a ``B x C x P`` Jacobian that
    laplace then copies once (``torch.cat``): about ``B*C*(2P + B*A)`` floats, ``A`` the
    activations of one example.
    """
    sizes: list[int] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: sizes.append(o[0].numel()))
        for m in model.modules()
        if not list(m.children())
    ]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    num_params = sum(p.numel() for p in model.parameters())
    return batch * outputs * (2 * num_params + batch * sum(sizes)) * 4.0


def _laplace_diag(backend_name: str, kind: str) -> Callable[[Ctx], Prepared]:
    def build(ctx: Ctx) -> Prepared:
        laplace, curvature = _laplace_import()
        backend = getattr(curvature, backend_name, None)
        if backend is None:
            raise NotInstalled(f"laplace.curvature.{backend_name} unavailable (backend package missing)")
        model = ctx.fresh()
        data, note = ctx.batches, ""
        if backend_name == "CurvlinopsGGN":
            batch = len(data[0][1])
            while batch > 1 and _jacrev_bytes(model, data[0][0], batch) > JACOBIAN_BUDGET_BYTES:
                batch //= 2
            if batch < len(data[0][1]):
                # laplace's jacrev path is slow as well as big: time one small batch and scale.
                data = Batches(ctx.rebatch(batch)[:1])
                data.dataset = range(batch)
                scale = ctx.num_data / batch
                full = len(ctx.batches[0][1])
                note = (
                    f"~ one batch of {batch} x{scale:g}: jacrev at batch {full} needs "
                    f"~{_jacrev_bytes(model, ctx.batches[0][0], full) / 2**30:.0f} GB"
                )
                la = laplace.DiagLaplace(model, "classification", backend=backend)

                def call_small() -> Tensor:
                    la.fit(data)
                    return la.H.detach().clone()

                return Prepared(call_small, scale=scale, note=note, check=kind, check_batches=data)
        la = laplace.DiagLaplace(model, "classification", backend=backend)

        def call() -> Tensor:
            la.fit(data)
            return la.H.detach().clone()

        return Prepared(call, note=note, check=kind)

    return build


def _laplace_kron(backend_name: str, subset_for: tuple[str, ...] = ()) -> Callable[[Ctx], Prepared]:
    def build(ctx: Ctx) -> Prepared:
        laplace, curvature = _laplace_import()
        backend = getattr(curvature, backend_name, None)
        if backend is None:
            raise NotInstalled(f"laplace.curvature.{backend_name} unavailable (backend package missing)")
        model = ctx.fresh()
        la = laplace.KronLaplace(model, "classification", backend=backend)
        be = la.backend
        data, scale, note = ctx.batches, 1.0, "backend.kron per batch (no eigendecomposition)"
        if any(isinstance(m, nn.Conv2d) for m in model.modules()) and "cnn" in subset_for and len(data) > 1:
            data, scale = data[:1], float(len(data))
            note = f"~ first batch x{scale:g}; " + note

        def call() -> None:
            for x, y in data:
                be.kron(x, y, N=ctx.num_data)

        return Prepared(call, scale=scale, note=note)

    return build


def _posteriors_diag_fisher(ctx: Ctx) -> Prepared:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from posteriors.laplace import diag_fisher
    except ImportError as err:
        raise NotInstalled(str(err)) from None
    model = ctx.fresh()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def log_lik(p: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch
        out = torch.func.functional_call(model, p, (x,))
        return -F.cross_entropy(out, y, reduction="sum"), out

    transform = diag_fisher.build(log_lik)
    # jacrev of a vmapped per-example function costs O(B^2): time the first batch (of the
    # same size as everyone's) and scale by the number of batches.
    data = Batches(ctx.batches[:1])
    scale = float(len(ctx.batches))

    def call() -> Tensor:
        state = transform.init(params)
        for batch in data:
            state, _ = transform.update(state, batch)
        return flat(
            model, dict(state.prec_diag.items()) if hasattr(state.prec_diag, "items") else state.prec_diag
        )

    note = "per_sample=False: jacrev of a vmapped per-example log-lik"
    if scale > 1:
        note = f"~ first batch x{scale:g}; " + note
    return Prepared(call, scale=scale, check="ef", check_batches=data, note=note)


ROWS: tuple[RowSpec, ...] = (
    RowSpec("baseline: forward+backward", "funcbnn", _baseline, "baseline"),
    RowSpec("funcbnn diag EF (structured)", "funcbnn", _funcbnn_diag("ef", "structured"), "f_ef"),
    RowSpec("funcbnn diag GGN exact (structured)", "funcbnn", _funcbnn_diag("ggn", "structured"), "f_ggn"),
    RowSpec("funcbnn diag MC-GGN, 1 sample", "funcbnn", _funcbnn_diag("mc_ggn", "structured"), "f_mc"),
    RowSpec("funcbnn diag EF (method=generic)", "funcbnn", _funcbnn_diag("ef", "generic"), "f_ef_gen"),
    RowSpec("per-example loop EF (batch of 1)", "funcbnn", _loop, "loop"),
    RowSpec("funcbnn KFAC GGN", "funcbnn", _funcbnn_kron("ggn"), "f_kfac"),
    RowSpec("funcbnn KFAC EF", "funcbnn", _funcbnn_kron("ef"), "f_kfac_ef"),
    RowSpec("funcbnn KFAC MC-GGN, 1 sample", "funcbnn", _funcbnn_kron("mc_ggn"), "f_kfac_mc"),
    RowSpec("laplace-torch diag EF, BackPACK", "laplace-torch", _laplace_diag("BackPackEF", "ef"), "l_ef_bp"),
    RowSpec("laplace-torch diag EF, ASDL", "laplace-torch", _laplace_diag("AsdlEF", "ef"), "l_ef_asdl"),
    RowSpec(
        "laplace-torch diag EF, Curvlinops", "laplace-torch", _laplace_diag("CurvlinopsEF", "ef"), "l_ef_cl"
    ),
    RowSpec(
        "laplace-torch diag GGN, BackPACK", "laplace-torch", _laplace_diag("BackPackGGN", "ggn"), "l_ggn_bp"
    ),
    RowSpec("laplace-torch diag GGN, ASDL", "laplace-torch", _laplace_diag("AsdlGGN", "ggn"), "l_ggn_asdl"),
    RowSpec(
        "laplace-torch diag GGN, Curvlinops",
        "laplace-torch",
        _laplace_diag("CurvlinopsGGN", "ggn"),
        "l_ggn_cl",
    ),
    RowSpec(
        "laplace-torch kron GGN, BackPACK (KFLR)",
        "laplace-torch",
        _laplace_kron("BackPackGGN", ("cnn",)),
        "l_kron_bp",
    ),
    RowSpec(
        "laplace-torch kron GGN, ASDL", "laplace-torch", _laplace_kron("AsdlGGN", ("cnn",)), "l_kron_asdl"
    ),
    RowSpec(
        "laplace-torch kron GGN, Curvlinops",
        "laplace-torch",
        _laplace_kron("CurvlinopsGGN", ("cnn",)),
        "l_kron_cl",
    ),
    RowSpec("posteriors diag_fisher (EF)", "posteriors", _posteriors_diag_fisher, "p_ef"),
)


# ---------------------------------------------------------------------------------------------
# measurement (runs in the child processes)


def _status_mb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(m.group(1)) / 1024 if m else None
    except OSError:
        return None


try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:
    _LIBC = None


def _trim() -> None:
    gc.collect()
    if _LIBC is not None:
        try:
            _LIBC.malloc_trim(0)
        except AttributeError:
            pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_mb() -> float:
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_call(fn: Callable[[], Any]) -> tuple[Any, float, float, bool]:
    """Run ``fn`` once; return (result, seconds, extra peak resident MB, exact?)."""
    _trim()
    before = _status_mb("VmRSS")
    exact = before is not None and _reset_hwm()
    if not exact:
        before = _maxrss_mb()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    after = _status_mb("VmHWM") if exact else _maxrss_mb()
    return out, seconds, max((after or 0.0) - before, 0.0), exact


def rel_diff(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run_row(spec: RowSpec, ctx: Ctx, repeats: int, budget: float, refs: dict) -> dict:
    out: dict[str, Any] = {"key": spec.key, "name": spec.name, "group": spec.group}
    try:
        warm = spec.build(ctx.tiny())
        warm.call()
        prep = spec.build(ctx)
        base = _baseline(ctx)
        base.call()  # warm
        result, first, peak, exact = peak_call(prep.call)
    except NotInstalled as err:
        return {**out, "status": f"not installed: {err}"}
    except Exception as err:  # noqa: BLE001 -- a peer failing must not stop the benchmark
        return {
            **out,
            "status": f"error: {type(err).__name__}: {str(err).splitlines()[0][:90] if str(err) else ''}",
        }
    # The memory-measuring call above is the first timed call; further rounds time the row and
    # the baseline in a shuffled order, until `repeats` row timings or `budget` seconds of row time.
    times, base_times = [first], []
    order = random.Random(sum(map(ord, spec.key)))
    while len(times) < repeats and sum(times) < budget:
        pair = [(times, prep.call), (base_times, base.call)]
        order.shuffle(pair)
        for sink, fn in pair:
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    # A slow row gets few rounds, but its baseline (cheap) always gets at least 3 samples.
    while len(base_times) < min(3, repeats):
        start = time.perf_counter()
        base.call()
        base_times.append(time.perf_counter() - start)
    out.update(
        status="ok",
        seconds=min(times) * prep.scale,
        base_seconds=min(base_times),
        reps=len(times),
        peak_mb=peak,
        peak_exact=exact,
        note=prep.note,
        check=None,
    )
    if prep.check is not None and isinstance(result, Tensor):
        import funcbnn
        from funcbnn.laplace import diag_curvature

        data = prep.check_batches if prep.check_batches is not None else ctx.batches
        key = (prep.check, id(data))
        if key not in refs:
            model = ctx.fresh()
            apply_fn, params, _ = funcbnn.functionalize(model)
            diag, _ = diag_curvature(
                apply_fn, params, data, "categorical", kind=prep.check, method="structured"
            )
            refs[key] = flat(model, diag)
        out["check"] = rel_diff(result.reshape(-1).to(refs[key].dtype), refs[key])
    return out


def child(group: str, models: list[str], quick: bool, repeats: int, budget: float, only: str | None) -> None:
    warnings.filterwarnings("ignore")
    sizes = QUICK if quick else FULL
    for which in models:
        ctx = make_ctx(which, sizes)
        refs: dict = {}
        gc.collect()
        gc.freeze()  # the imports' objects: keeps the gc.collect() before each memory reading cheap
        for spec in ROWS:
            if spec.group != group or (only and only not in spec.name and spec.key != "baseline"):
                continue
            row = run_row(spec, ctx, repeats, budget, refs)
            row["model"] = which
            print("@@ROW " + json.dumps(row), flush=True)


# ---------------------------------------------------------------------------------------------
# the parent: spawn one child per library, print the table and the targets


def spawn(group: str, args: argparse.Namespace, repeats: int, budget: float) -> list[dict]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_child",
        group,
        "--models",
        args.models,
        "--repeats",
        str(repeats),
        "--budget",
        str(budget),
    ]
    if args.quick:
        cmd.append("--quick")
    if args.only:
        cmd += ["--only", args.only]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    rows = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("@@ROW ")]
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["?"]
        rows.append(
            {
                "key": f"crash-{group}",
                "name": f"{group} child",
                "group": group,
                "model": "?",
                "status": f"error: child exited {proc.returncode}: {tail[0][:100]}",
            }
        )
    return rows


def fmt_row(r: dict, name_w: int) -> str:
    name = r["name"]
    if r.get("status") != "ok":
        return f"| {name:<{name_w}} | {'-':>9} | {'-':>7} | {'-':>4} | {'-':>8} | {'-':>7} | {r['status']} |"
    ratio = r["seconds"] / r["base_seconds"]
    peak = f"{r['peak_mb']:.0f}" if r["peak_exact"] else f">={r['peak_mb']:.0f}"
    check = "-" if r.get("check") is None else f"{r['check']:.0e}" + (" !!" if r["check"] > CHECK_TOL else "")
    approx = "~" if r["note"].startswith("~") else " "
    return (
        f"| {name:<{name_w}} | {approx}{r['seconds'] * 1e3:8.1f} | {ratio:6.2f}x | {r['reps']:>4} | "
        f"{peak:>8} | {check:>7} | {r['note']} |"
    )


def print_targets(rows: list[dict], names: dict[str, str]) -> None:
    by = {(r["model"], r["key"]): r for r in rows}

    def ratio(model: str, key: str) -> float | None:
        r = by.get((model, key))
        return r["seconds"] / r["base_seconds"] if r and r.get("status") == "ok" else None

    print()
    for model, label in names.items():
        if not any(m == model for m, _ in by):
            continue
        ef = ratio(model, "f_ef")
        if ef is not None:
            print(
                f"[{'PASS' if ef <= TARGET_EF else 'MISS'}] {label}: funcbnn diag EF {ef:.2f}x baseline (target <= {TARGET_EF})"
            )
        ggn = ratio(model, "f_ggn")
        if ggn is not None:
            print(
                f"[{'PASS' if ggn <= TARGET_GGN else 'MISS'}] {label}: funcbnn exact diag GGN {ggn:.2f}x baseline "
                f"(target <= {TARGET_GGN})"
            )
        peers = {k: ratio(model, k) for k in ("l_ggn_bp", "l_ggn_asdl", "l_ggn_cl")}
        peers = {k: v for k, v in peers.items() if v is not None}
        if ggn is not None and peers:
            best_key = min(peers, key=peers.get)
            best = peers[best_key]
            print(
                f"[{'PASS' if ggn < best else 'MISS'}] {label}: funcbnn exact diag GGN {ggn:.2f}x baseline vs "
                f"laplace-torch's fastest GGN ({by[(model, best_key)]['name'].split(', ')[-1]}) {best:.2f}x"
                f" -> {best / ggn:.2f}x faster"
            )
        elif ggn is not None:
            print(f"[SKIP] {label}: laplace-torch GGN not available to compare against")
        kf = ratio(model, "f_kfac")
        if kf is not None:
            others = ", ".join(
                f"{k.split('_', 2)[-1].upper()} {v:.2f}x"
                for k in ("f_kfac_ef", "f_kfac_mc")
                if (v := ratio(model, k)) is not None
            )
            print(
                f"[{'PASS' if kf <= TARGET_KFAC else 'MISS'}] {label}: funcbnn KFAC (exact GGN) {kf:.2f}x baseline "
                f"(target <= {TARGET_KFAC})" + (f"; other kinds: {others}" if others else "")
            )
            kflr = {k: ratio(model, k) for k in ("l_kron_bp", "l_kron_asdl", "l_kron_cl")}
            kflr = {k: v for k, v in kflr.items() if v is not None}
            if kflr:
                best_key = min(kflr, key=kflr.get)
                best = kflr[best_key]
                print(
                    f"[{'PASS' if kf < best else 'MISS'}] {label}: funcbnn KFAC (exact GGN) {kf:.2f}x baseline vs "
                    f"laplace-torch's fastest Kronecker GGN ({by[(model, best_key)]['name'].split(', ')[-1]}) "
                    f"{best:.2f}x -> {best / kf:.2f}x faster"
                )
        else:
            status = by.get((model, "f_kfac"), {}).get("status", "not run")
            print(f"[SKIP] {label}: funcbnn KFAC target (<= {TARGET_KFAC}x): {status}")
    bad = [
        r for r in rows if r.get("status") == "ok" and r.get("check") is not None and r["check"] > CHECK_TOL
    ]
    for r in bad:
        print(
            f"[WARN] {names.get(r['model'], r['model'])}: {r['name']} differs from funcbnn's result by {r['check']:.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: a smoke run")
    parser.add_argument(
        "--repeats", type=int, default=None, help="max timed rounds per row (default 5; quick 1)"
    )
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds of row time after which repeats stop (default 4)"
    )
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated subset of mlp,cnn")
    parser.add_argument(
        "--only", default=None, help="only rows whose name contains this (baseline always runs)"
    )
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    budget = args.budget if args.budget is not None else (0.5 if args.quick else 4.0)
    models = [m for m in args.models.split(",") if m]
    if repeats < 1 or not models or any(m not in ("mlp", "cnn") for m in models):
        parser.error("--repeats must be >= 1 and --models a subset of mlp,cnn")
    if args._child:
        child(args._child, models, args.quick, repeats, budget, args.only)
        return

    import funcbnn

    sizes = QUICK if args.quick else FULL
    names = model_names(sizes)
    print(
        f"funcbnn {funcbnn.__version__} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
        f"N={sizes.num_data} in batches of {sizes.batch} | min of <= {repeats} rounds (budget {budget:g} s/row) | "
        f"x base = row / baseline timed alongside it"
    )
    load = LoadMeter()  # counts the child processes' CPU as this run's own
    rows: list[dict] = []
    for group in GROUPS:
        rows += spawn(group, args, repeats, budget)
    footer = load.footer()

    name_w = max(len(s.name) for s in ROWS)
    header = f"| {'method':<{name_w}} | {'time ms':>9} | {'x base':>7} | {'reps':>4} | {'peak MB':>8} | {'check':>7} | note |"
    for model, label in names.items():
        model_rows = [r for r in rows if r.get("model") == model]
        if not model_rows:
            continue
        print(f"\n### {label}\n")
        print(header)
        print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
        for r in model_rows:
            print(fmt_row(r, name_w))
    for r in rows:
        if r.get("model") == "?":
            print(f"\n[ERROR] {r['name']}: {r['status']}")
    print_targets(rows, names)
    if args.quick:
        print("(--quick: tiny models and 1 repeat; the PASS/MISS lines above say nothing about the targets)")
    print("\n" + footer)

if __name__ == "__main__":
    main()
