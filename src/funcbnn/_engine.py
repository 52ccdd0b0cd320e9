"""The one engine that applies a function at every slice of a leading sample axis.

``apply_samples(apply_fn, samples, x)`` returns ``apply_fn(sample_s, x)`` for
every weight sample ``s``, stacked along a new leading axis. It is what
:func:`funcbnn.predict.sample_outputs`, the expected NLL of :mod:`funcbnn.vi`,
and every Monte-Carlo predictive built on them run; nothing else in the library
writes its own ``vmap``-or-loop code. It holds four things:

1. **vmap with less overhead** (:func:`vmap_leading`). ``torch.func.vmap``
   spends ~200 us per call on CPU in its Python wrapper (torch pytree
   flattening, argument checks) before any math runs; for a small model that is
   most of the cost of a 16-sample prediction. The functorch primitives it is
   built from (enter a vmap level, wrap inputs, unwrap outputs) are called here
   directly, with optree, which halves that overhead. If those private
   primitives are missing from a torch version, the public ``torch.func.vmap``
   is used: same results, more overhead.
2. **Two paths.** A chunked ``vmap`` (chunks sized so that no batched
   intermediate outgrows :data:`CHUNK_BUDGET_BYTES`) and a Python loop (which
   also replays one RNG state per sample for ``randomness="same"``). Under
   autograd, both hand gradients back in the samples' own (contiguous) layout;
   see :class:`_ContiguousGrad`.
3. **The fallback.** A forward that fails under ``vmap`` (``.item()``,
   data-dependent control flow, in-place updates of inputs) makes ``"auto"``
   warn exactly once with :class:`VmapFallbackWarning` per function and input
   signature, and loop from then on. If the loop fails too, the input is at
   fault, not vmap: the loop's error is raised, with no warning, and vmap
   stays the path for inputs that work.
4. **The path choice** for ``method="auto"``. Neither path wins everywhere
   (the batched path loses to a loop for some convolutions, and under autograd
   for wide layers), so the first call for a function, input signature, sample
   count and chunk size times the real work both ways and keeps the faster.
   The measurement is built to be right, not just cheap:

   - it times *the real unit*: the caller's own samples and inputs, the whole
     call (or its first chunk when there are several), and with
     ``backward_to`` the backward pass as well, down to the tensors the
     samples were drawn from (with ``redraw``, fresh draws every run, as a
     training step makes them). The batched path's gradient reaches the draw
     in another memory layout, so a timing that stops at the samples
     misjudged the ELBO of a 784-512-512-10 MLP by 25%;
   - each path gets a warm-up run, then at least :data:`MIN_ROUNDS` rounds
     that alternate which path goes first (a call right after a loop runs
     slower, and a fixed order would always hand that penalty to one path),
     compared by their median: the typical cost of a call. (A path that
     allocates large batched tensors is bimodal, fast when it follows itself
     and slow otherwise; its minimum is one lucky run, which picked vmap for an
     ELBO that was 8% slower that way);
   - while the two are within :data:`DECISIVE` of each other it measures
     again, up to :data:`MAX_ROUNDS` rounds, each started only if it fits in
     :data:`BUDGET_S` seconds at the pace measured so far (a slow unit gets
     fewer rounds, and warm-ups that alone outrun the budget decide);
   - the first decision is confirmed by a second measurement after
     :data:`RECHECK_AFTER` calls, when the process is warm (a first call also
     pays lazy initialisation, cold caches and whatever else the program was
     starting); a measurement taken while other processes kept the machine
     busy (at least :data:`CONTENDED_CORES` cores, read from ``/proc/stat`` on
     Linux) does not count as a confirmation, so it is repeated, up to
     :data:`MAX_RECHECKS` times, instead of a busy moment deciding for good,
     but only while the timing spent on that signature stays under
     ``max(BUDGET_S, TIMING_FRACTION * time in real calls)``: under load the
     re-measurements used to take 20-60 s on small models.

   **The choice never changes results beyond float rounding**: both paths
   compute the same function of the same samples. Timing runs consume no
   randomness: they run inside ``torch.random.fork_rng`` and touch no
   ``torch.Generator``; a forward with random ops (MC dropout, detected with
   ``vmap(randomness="error")``) is not timed at all and always takes the
   batched path, so its masks do not depend on a stopwatch.

**Inputs are never modified.** The probe runs on copies of the inputs; a
forward that writes into them there gets fresh copies on every later call
(per sample in the loop, per chunk under vmap), and any other forward is
watched through the inputs' version counters. **Outputs** are written into one
preallocated tree as the samples or chunks come (unless autograd needs the
parts), so peak memory is the outputs plus one chunk's intermediates.

Decisions are cached per ``apply_fn`` (weakly: they go when the function
goes) and per signature of the inputs and the samples' trailing shapes.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import types
import warnings
import weakref
from typing import Any, Callable, Iterator, Literal, Sequence

import optree
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .checks import model_input_error
from .model import _version, _written

try:  # private functorch API, present from torch 2.0 through at least 2.13
    from torch._C._functorch import (
        _add_batch_dim,
        _remove_batch_dim,
        _vmap_decrement_nesting,
        _vmap_increment_nesting,
    )
    from torch._functorch.vmap import lazy_load_decompositions

    HAVE_LOW_LEVEL_VMAP = True
except ImportError:  # pragma: no cover - depends on the torch build
    HAVE_LOW_LEVEL_VMAP = False

__all__ = [
    "CHUNK_BUDGET_BYTES",
    "VmapFallbackWarning",
    "Method",
    "Randomness",
    "apply_samples",
    "chosen_path",
    "vmap_leading",
]

Method = Literal["auto", "vmap", "loop"]
Randomness = Literal["different", "same", "error"]

CHUNK_BUDGET_BYTES = 16 * 2**20
"""Default cap on the largest batched intermediate (bytes) when picking a chunk size.

glibc's malloc serves each allocation above its mmap threshold (at most 32 MiB)
with a fresh ``mmap`` and page-faults it in on every use; batched tensors past
that size made the vmapped path 2-4x slower than a loop on this project's
measurements. Keeping them at half the threshold leaves room for the other
live intermediates of the same size.
"""

MIN_ROUNDS = 3
"""Timed rounds (each path once per round, after one warm-up each) before ``"auto"`` may decide,
unless :data:`BUDGET_S` runs out first."""
MAX_ROUNDS = 9
"""Most timed rounds when the two paths stay close."""
DECISIVE = 1.10
"""A ratio of the two paths' best times at which ``"auto"`` stops measuring."""
BUDGET_S = 0.5
"""Seconds one measurement may spend in timed rounds: a round starts only if, at the pace of the
last one (or of the warm-ups), it ends within this budget, so slow units get fewer rounds (none, if
the warm-ups alone took longer: they then decide). Under load the rounds of a noisy pair used to
go on for 20-60 s."""
TIMING_FRACTION = 0.05
"""Re-measurements (confirmations) happen only while the timing spent on a signature stays under
``max(BUDGET_S, TIMING_FRACTION * seconds of real calls)``; past that the decision stands."""

CONTENDED_CORES = 0.25
"""Other processes using this many cores on average while ``"auto"`` measured make its decision provisional."""
RECHECK_AFTER = 8
"""Calls after which a decision is measured again, to confirm it (at most :data:`MAX_RECHECKS` times)."""
MAX_RECHECKS = 3
"""How often a decision is measured again before it stands (once, unless the machine was busy)."""

_GRAD_LAYOUT_MIN_NUMEL = 2**16
"""Leaves smaller than this skip :class:`_ContiguousGrad` (its Python cost would outweigh the copy it saves)."""


class VmapFallbackWarning(UserWarning):
    """The model's forward failed under ``vmap`` and a loop over samples is used instead."""


# ---------------------------------------------------------------------------------------------
# vmap over the leading axis, with the least Python overhead


def vmap_leading(
    fn: Callable[[Any, Any], Any], batched: Any, shared: Any, *, randomness: str, low_level: bool = True
) -> Any:
    """``fn(b, shared)`` for every slice ``b`` along the leading axis of ``batched``'s leaves.

    Equivalent to ``torch.func.vmap(fn, in_dims=(0, None), randomness=randomness)(batched, shared)``.
    Outputs must be a tree of tensors; each gets the batch axis first.

    Examples
    --------
    >>> w = torch.randn(4, 2, 3)
    >>> vmap_leading(lambda w, x: x @ w.T, w, torch.randn(5, 3), randomness="error").shape
    torch.Size([4, 5, 2])
    """
    if not (low_level and HAVE_LOW_LEVEL_VMAP):
        return torch.func.vmap(fn, in_dims=(0, None), randomness=randomness)(batched, shared)
    lazy_load_decompositions()  # returns at once after the first call
    leaves, spec = optree.tree_flatten(batched)
    size = leaves[0].shape[0]
    level = _vmap_increment_nesting(size, randomness)
    try:
        out = fn(optree.tree_unflatten(spec, [_add_batch_dim(t, 0, level) for t in leaves]), shared)
        out_leaves, out_spec = optree.tree_flatten(out)
        for o in out_leaves:
            if not isinstance(o, Tensor):
                raise TypeError(f"the model must return tensors (or a tree of them), got {type(o).__name__}")
        return optree.tree_unflatten(out_spec, [_remove_batch_dim(o, level, size, 0) for o in out_leaves])
    finally:
        _vmap_decrement_nesting()


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    Under ``vmap`` the gradient of a batched ``Linear`` weight comes back
    transposed (strides ``(o*i, 1, o)``); the sum over samples and the product
    with the noise in the draw's backward then run on a strided tensor, which
    made the ELBO's vmapped path ~25% slower than a loop on a 784-512-512-10
    MLP. One copy into the loop's layout is cheaper than that.
    """

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:  # noqa: D102
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # noqa: D102
        return grad.contiguous()


def _contiguous_grads(leaves: list[Tensor]) -> list[Tensor]:
    if not torch.is_grad_enabled():
        return leaves
    return [
        _ContiguousGrad.apply(t) if t.requires_grad and t.dim() >= 3 and t.numel() >= _GRAD_LAYOUT_MIN_NUMEL else t
        for t in leaves
    ]


def _check_tensors(leaves: list[Any]) -> None:
    for o in leaves:
        if not isinstance(o, Tensor):
            raise TypeError(f"the model must return tensors (or a tree of them), got {type(o).__name__}")


def _stack(outs: list[Any]) -> Any:
    _check_tensors(optree.tree_leaves(outs[0]))
    return optree.tree_map(lambda *o: torch.stack(o), *outs)


try:
    _is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
except AttributeError:  # pragma: no cover - depends on the torch build
    _is_wrapped = None


def _writable(t: Tensor) -> bool:
    """Whether an output can be copied into a preallocated tensor: a plain tensor with no graph to keep."""
    return type(t) is Tensor and not t.requires_grad and _is_wrapped is not None and not _is_wrapped(t)


class _Collector:
    """Gathers the outputs of consecutive samples (one at a time or a chunk) into one ``(S, ...)`` tree.

    Outputs that need no graph go straight into tensors allocated once, when the
    first part arrives: peak memory is the outputs plus one part, where a list and
    ``torch.stack``/``torch.cat`` held every part and the result at once (and the
    many retained parts fragmented the heap: 1.2 GiB of peak growth for 59 MiB of
    outputs). Outputs with a graph, or wrapped by an enclosing transform, are kept
    in a list and joined at the end, as autograd needs.
    """

    def __init__(self, num: int) -> None:
        self.num = num
        self.filled = 0
        self.spec: Any = None
        self.buffers: list[Tensor] | None = None
        self.parts: list[Any] = []

    def add(self, out: Any, batched: bool) -> None:
        """Add one sample's output (``batched=False``) or a chunk's (leading axis = its samples)."""
        leaves, spec = optree.tree_flatten(out)
        if self.spec is None:
            _check_tensors(leaves)
            self.spec = spec
            if all(_writable(t) for t in leaves):
                self.buffers = [
                    torch.empty((self.num, *(t.shape[1:] if batched else t.shape)), dtype=t.dtype, device=t.device)
                    for t in leaves
                ]
        elif spec != self.spec:
            raise ValueError(f"the model returned outputs of different structures for different samples: "
                             f"{self.spec} and {spec}")
        count = leaves[0].shape[0] if batched and leaves else 1
        if self.buffers is None:
            self.parts.append(out)
        else:
            for buf, t in zip(self.buffers, leaves):
                part = t if batched else t.unsqueeze(0)
                if part.shape[1:] != buf.shape[1:] or t.dtype != buf.dtype or not _writable(t):
                    raise ValueError(
                        f"the model's outputs differ between samples: shape {tuple(buf.shape[1:])} and dtype "
                        f"{buf.dtype} for the first, shape {tuple(part.shape[1:])} and dtype {t.dtype} later"
                    )
                buf[self.filled : self.filled + count].copy_(part)
        self.filled += count

    def result(self, batched: bool) -> Any:
        if self.buffers is not None:
            return optree.tree_unflatten(self.spec, self.buffers)
        if batched:
            return self.parts[0] if len(self.parts) == 1 else optree.tree_map(lambda *o: torch.cat(o), *self.parts)
        return optree.tree_map(lambda *o: torch.stack(o), *self.parts)


def _rng_devices(*trees: Any) -> list[torch.device]:
    """CUDA devices of the tensors in ``trees``: whose RNG ``fork_rng`` saves besides the CPU's."""
    found = {t.device for tree in trees for t in optree.tree_leaves(tree) if isinstance(t, Tensor)}
    return sorted((d for d in found if d.type == "cuda"), key=str)


_LOOP_BLOCK = 256
"""Samples whose per-sample views a loop without autograd makes at a time (a view is ~0.5 KiB of tensor
object; all of them at once grew peak memory by 40 MiB at S = 20000 on a 4-leaf model)."""


def _sample_views(leaves: list[Tensor], num: int) -> Iterator[list[Tensor]]:
    """Each sample's slice of every leaf, in order.

    Under autograd ``unbind`` rather than ``leaf[i]``: its backward stacks the
    per-sample gradients once, where ``S`` index backwards would each zero-fill
    and add a full ``(S, ...)`` tensor. Without a graph, in blocks, so the views
    alive at once stay bounded.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in leaves):
        columns = [t.unbind(0) for t in leaves]
        for i in range(num):
            yield [c[i] for c in columns]
        return
    for start in range(0, num, _LOOP_BLOCK):
        columns = [t[start : start + _LOOP_BLOCK].unbind(0) for t in leaves]
        for i in range(len(columns[0])):
            yield [c[i] for c in columns]


def _loop(
    apply_fn: Callable[..., Any], leaves: list[Tensor], spec: Any, x: Any, args: tuple, num: int, randomness: str
) -> Any:
    """One forward per sample, written into one output. ``randomness="same"`` replays one RNG state for every sample."""
    collect = _Collector(num)
    if randomness != "same":
        for views in _sample_views(leaves, num):
            collect.add(apply_fn(optree.tree_unflatten(spec, views), x, *args), batched=False)
        return collect.result(batched=False)
    devices = _rng_devices(leaves, x)
    with torch.random.fork_rng(devices=devices):
        start = torch.random.get_rng_state()
        cuda = [torch.cuda.get_rng_state(d) for d in devices]
        for views in _sample_views(leaves, num):
            torch.random.set_rng_state(start)
            for d, state in zip(devices, cuda):
                torch.cuda.set_rng_state(state, d)
            collect.add(apply_fn(optree.tree_unflatten(spec, views), x, *args), batched=False)
    return collect.result(batched=False)


def _vmapped(
    apply_fn: Callable[..., Any],
    leaves: list[Tensor],
    spec: Any,
    x: Any,
    args: tuple,
    num: int,
    chunk: int,
    randomness: str,
) -> Any:
    """``vmap`` over the samples, ``chunk`` at a time."""
    fn = (lambda p, shared: apply_fn(p, shared)) if not args else (lambda p, shared: apply_fn(p, shared[0], *shared[1]))
    shared = x if not args else (x, args)
    leaves = _contiguous_grads(leaves)
    if chunk >= num:
        return vmap_leading(fn, optree.tree_unflatten(spec, leaves), shared, randomness=randomness)
    collect = _Collector(num)
    for i in range(0, num, chunk):
        part = [t[i : i + chunk] for t in leaves]
        collect.add(vmap_leading(fn, optree.tree_unflatten(spec, part), shared, randomness=randomness), batched=True)
        del part  # the chunk's views go before the next chunk's intermediates are allocated
    return collect.result(batched=True)


# ---------------------------------------------------------------------------------------------
# what the engine remembers per function and input signature


class _Entry:
    """Per (function, signature): the probe's footprint and every decision taken."""

    __slots__ = ("bytes_per_example", "writes_inputs", "vmap_failed", "stochastic", "vmap_faster", "recheck",
                 "timing_s", "work_s")

    def __init__(self, bytes_per_example: int, writes_inputs: bool = False) -> None:
        self.bytes_per_example = bytes_per_example  # largest intermediate of one sample's forward, per example
        self.writes_inputs = writes_inputs  # the forward wrote into its inputs in the probe: it gets copies
        self.timing_s = 0.0  # seconds spent measuring the two paths (all decisions)
        self.work_s = 0.0  # seconds spent in the real calls of "auto" (what the timing is measured against)
        self.vmap_failed = False  # the forward failed under vmap once: "auto" loops (warned once)
        self.stochastic: bool | None = None  # the forward calls random ops (known after the first "auto" call)
        # (num_samples, chunk, timed with a backward?) -> True where the batched path measured faster
        self.vmap_faster: dict[tuple[int, int, bool], bool] = {}
        # Decisions not confirmed yet: calls until the next measurement, and measurements left.
        self.recheck: dict[tuple[int, int, bool], list[int]] = {}


_CACHE: "weakref.WeakKeyDictionary[Any, dict[tuple, _Entry]]" = weakref.WeakKeyDictionary()


def _cache_for(apply_fn: Any, owner: Any = None) -> tuple[dict[tuple, _Entry], Any]:
    """The decision table of ``apply_fn`` and an extra key part.

    A bound method is a new object at every attribute access, so its table
    hangs on the instance, keyed by the function too; likewise a closure built
    anew per call hangs on the long-lived ``owner`` its caller names, keyed by
    its code. A function that cannot be weakly referenced gets a fresh table
    (measured on every call).
    """
    holder, extra = apply_fn, None
    if owner is not None:
        holder, extra = owner, getattr(apply_fn, "__code__", type(apply_fn))
    elif isinstance(apply_fn, types.MethodType):
        holder, extra = apply_fn.__self__, apply_fn.__func__
    try:
        return _CACHE.setdefault(holder, {}), extra
    except TypeError:
        return {}, extra


def _hashable(value: Any) -> Any:
    try:
        hash(value)
        return value
    except TypeError:
        return ("unhashable", id(value))


def _leaf_signature(t: Any) -> Any:
    return (tuple(t.shape), t.dtype, t.device) if isinstance(t, Tensor) else _hashable(t)


def _signature(x: Any, args: tuple, spec: Any, leaves: list[Tensor], randomness: str, extra: Any) -> tuple:
    """What a cached entry depends on: the inputs' structure, shapes and non-tensor leaves,
    the samples' structure and trailing shapes, and the vmap randomness mode."""
    x_leaves, x_spec = optree.tree_flatten((x, args))
    return (
        x_spec,
        tuple(map(_leaf_signature, x_leaves)),
        spec,
        tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in leaves),
        randomness,
        extra,
    )


class _LargestTensor(TorchFunctionMode):
    """Records the size of the largest tensor any torch function returns."""

    def __init__(self) -> None:
        super().__init__()
        self.max_bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        out = func(*args, **(kwargs or {}))
        for t in optree.tree_leaves(out) if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.max_bytes = max(self.max_bytes, t.numel() * t.element_size())
        return out


def _batch_size(x: Any) -> int | None:
    """The common leading size of ``x``'s tensor leaves, or ``None`` (no tensors, a 0-d one, or sizes differ)."""
    leaves = [t for t in optree.tree_leaves(x) if isinstance(t, Tensor)]
    if not leaves or any(t.dim() == 0 for t in leaves):
        return None
    n = leaves[0].shape[0]
    return n if all(t.shape[0] == n for t in leaves) else None


def _head(x: Any, n: int) -> Any:
    return optree.tree_map(lambda t: t[:n] if isinstance(t, Tensor) else t, x)


def _probe(apply_fn: Callable[..., Any], first: Any, x: Any, args: tuple) -> _Entry:
    """Run one sample on the first two examples: validates ``x`` and measures the footprint per example.

    Two, not one: train-mode batch statistics need more than one value per channel.
    If the head of ``x`` fails, ``x`` may be a single unbatched input: try it whole.
    Runs inside ``fork_rng``, so a forward with random ops consumes no randomness here.
    """
    n = _batch_size(x)
    attempts = [(_head(x, min(n, 2)), min(n, 2))] if n is not None and n > 2 else []
    attempts.append((x, n or 1))
    with torch.random.fork_rng(devices=_rng_devices(first, x)):
        for i, (inputs, seen) in enumerate(attempts):
            recorder = _LargestTensor()
            # On copies (of two examples, mostly): a forward that writes into its inputs
            # must not change the caller's, and is found here.
            copied = _copy_tensors((inputs, args))
            originals = [t for t in optree.tree_leaves((inputs, args)) if isinstance(t, Tensor)]
            copies = [t for t in optree.tree_leaves(copied) if isinstance(t, Tensor)]
            learn = [(c, o, _version(c)) for c, o in zip(copies, originals)]
            try:
                with torch.no_grad(), recorder:
                    apply_fn(first, copied[0], *copied[1])
            except Exception as err:
                if i + 1 < len(attempts):
                    continue
                # The library's one wording for this (funcbnn.checks): names x, its shape, dtype,
                # value range, a dtype mismatch with the weights, and keeps torch's error chained.
                raise model_input_error(err, x, first, "x") from err
            return _Entry(max(recorder.max_bytes // seen, 1), writes_inputs=_written(learn))
    raise AssertionError("unreachable")


def _copy_tensors(tree: Any) -> Any:
    return optree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, tree)


def _on_copies(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``apply_fn`` given fresh copies of its shared inputs on every call (for a forward that writes into them)."""

    def call(p: Any, x: Any, *args: Any) -> Any:
        x, args = _copy_tensors((x, args))
        return apply_fn(p, x, *args)

    return call


def _input_versions(x: Any, args: tuple) -> list[int | None]:
    """Version counters of the inputs (``None`` for inference tensors, which have none)."""
    if isinstance(x, Tensor) and not args:
        return [_version(x)]
    return [_version(t) for t in optree.tree_leaves((x, args)) if isinstance(t, Tensor)]


# ---------------------------------------------------------------------------------------------
# the measured choice


class _LoadWindow:
    """How many cores other processes kept busy since construction (Linux ``/proc/stat``; 0 elsewhere).

    A decision measured while a neighbour was busy may reflect the neighbour, not
    the two paths (a 2-thread batched op suffers more from a taken core than a
    loop of small ones), so it is measured again later rather than kept forever.
    """

    def __init__(self) -> None:
        self.busy0, self.own0, self.wall0 = _machine_busy_seconds(), time.process_time(), time.perf_counter()

    def others(self) -> float:
        busy1 = _machine_busy_seconds()
        wall = time.perf_counter() - self.wall0
        if self.busy0 is None or busy1 is None or wall <= 0:
            return 0.0
        own = time.process_time() - self.own0
        return max(busy1 - self.busy0 - own, 0.0) / wall


def _machine_busy_seconds() -> float | None:
    """CPU seconds (all cores) the machine has spent busy, or ``None`` where ``/proc/stat`` is missing."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _is_randomness_error(err: Exception) -> bool:
    return isinstance(err, RuntimeError) and "randomness error mode" in str(err)


def _with_backward(run: Callable[[], Any], backward_to: Sequence[Tensor] | None) -> Callable[[], None]:
    """``run()`` and, when its outputs carry a graph to ``backward_to``, the backward pass a training step pays.

    ``retain_graph``: the samples' own graph (the draw) is backpropagated again by
    the caller's real loss. ``allow_unused``: a parameter the output ignores is no
    reason to leave vmap. Dense ones as the cotangent, like a real loss's gradient
    (a ``.sum()`` would hand back an expanded, stride-0 tensor).
    """
    if not backward_to:
        return run  # the outputs are dropped

    def timed() -> None:
        out = [o for o in optree.tree_leaves(run()) if isinstance(o, Tensor) and o.requires_grad]
        if out:
            torch.autograd.grad(
                out, list(backward_to), [torch.ones_like(o) for o in out], retain_graph=True, allow_unused=True
            )

    return timed


def _vmap_is_faster(
    run_vmap: Callable[[], None], run_loop: Callable[[], None], warm: tuple[float, float] = (0.0, 0.0)
) -> bool:
    """Whether the batched path measured no slower than the loop. Both have run once (warm-up, ``warm`` seconds).

    Alternating rounds, each path's median; more rounds while the two stay within
    :data:`DECISIVE` of each other, as long as the next round fits in
    :data:`BUDGET_S` (see the module docstring).
    """
    t_vmap: list[float] = []
    t_loop: list[float] = []
    start = time.perf_counter()
    pace = warm[0] + warm[1]  # what a round is expected to cost
    for r in range(MAX_ROUNDS):
        if time.perf_counter() - start + pace > BUDGET_S and (r > 0 or pace > BUDGET_S):
            break
        order = ((run_vmap, t_vmap), (run_loop, t_loop))
        round_start = time.perf_counter()
        for run, times in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        pace = time.perf_counter() - round_start
        if r + 1 >= MIN_ROUNDS:
            typical_v, typical_l = statistics.median(t_vmap), statistics.median(t_loop)
            if max(typical_v, typical_l) >= DECISIVE * min(typical_v, typical_l):
                break
    if not t_vmap:  # the warm-ups alone outran the budget: they decide
        return warm[0] <= warm[1]
    return statistics.median(t_vmap) <= statistics.median(t_loop)


def _user_stacklevel() -> int:
    """``stacklevel`` for a warning raised here that points at the first frame outside funcbnn."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _warn_fallback(err: Exception) -> None:
    warnings.warn(
        f"the model's forward failed under torch.func.vmap ({type(err).__name__}: {err}); "
        "evaluating the weight samples in a Python loop instead. Pass method='loop' to "
        "silence this warning, or make the forward vmap-compatible (no in-place updates of "
        "inputs or buffers, no .item() or data-dependent control flow) for the batched path.",
        VmapFallbackWarning,
        stacklevel=_user_stacklevel(),
    )


def _decide(
    entry: _Entry,
    apply_fn: Callable[..., Any],
    leaves: list[Tensor],
    spec: Any,
    x: Any,
    args: tuple,
    num: int,
    chunk: int,
    backward_to: Sequence[Tensor] | None,
    redraw: Callable[[], Any] | None = None,
) -> tuple[bool | None, bool, Exception | None]:
    """Measure the first chunk both ways (with fresh samples from ``redraw`` each run, if given).

    Returns ``(faster, contended, error)``: ``faster`` is True for vmap, False for
    the loop, None if vmap failed with ``error`` (the caller tries the loop and
    warns only if that works); ``contended`` says other processes kept at least
    :data:`CONTENDED_CORES` busy meanwhile. The seconds spent go to ``entry.timing_s``.
    """
    size = min(chunk, num)

    def unit() -> list[Tensor]:
        fresh = leaves if redraw is None else optree.tree_leaves(redraw())
        return fresh if chunk >= num else [t[:chunk] for t in fresh]

    load = _LoadWindow()
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=_rng_devices(leaves, x)):
            # Warm-up of the batched path, and two tests: does the forward run under vmap at
            # all, and does it call random ops ("error" mode raises on the first one)?
            run_vmap = _with_backward(
                lambda: _vmapped(apply_fn, unit(), spec, x, args, size, size, "error"), backward_to
            )
            try:
                run_vmap()
            except Exception as err:
                if _is_randomness_error(err):
                    # Random ops: under "different" the two paths draw different masks, so a
                    # timed choice would make results depend on a stopwatch. The batched path
                    # is the documented one (the real run still falls back if it fails).
                    entry.stochastic = True
                    return True, False, None
                return None, False, err
            warm_vmap = time.perf_counter() - start
            entry.stochastic = False
            run_loop = _with_backward(lambda: _loop(apply_fn, unit(), spec, x, args, size, "different"), backward_to)
            t0 = time.perf_counter()
            run_loop()  # warm-up
            faster = _vmap_is_faster(run_vmap, run_loop, (warm_vmap, time.perf_counter() - t0))
        return faster, load.others() >= CONTENDED_CORES, None
    finally:
        entry.timing_s += time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# the entry point


def apply_samples(
    apply_fn: Callable[..., Any],
    samples: Any,
    x: Any,
    *,
    args: tuple[Any, ...] = (),
    method: Method = "auto",
    chunk_size: int | None = None,
    memory_budget: int = CHUNK_BUDGET_BYTES,
    randomness: Randomness = "different",
    backward_to: Sequence[Tensor] | None = None,
    validate: Callable[[], Any] | None = None,
    owner: Any = None,
    redraw: Callable[[], Any] | None = None,
) -> Any:
    """``apply_fn(sample_s, x, *args)`` for every slice ``s`` of ``samples``' leading axis, stacked.

    The library's one implementation of this; callers validate their own
    arguments (this checks only what it needs) and pick the semantics of
    ``randomness``.

    Parameters
    ----------
    apply_fn : callable
        ``apply_fn(params, x, *args) -> tensor or tree of tensors``.
    samples : Tree
        Parameter tree whose leaves share a leading sample axis ``S >= 1``.
    x : Any
        The input shared by all samples (its leading axis, if any, is the
        batch whose size enters the default chunk size).
    args : tuple
        Further shared arguments (e.g. ``(buffers,)``), passed after ``x``.
    method : {"auto", "vmap", "loop"}
        ``"auto"`` measures once per function, input signature, ``S`` and
        chunk size and keeps the faster path (see the module docstring);
        ``"vmap"`` and ``"loop"`` force a path.
    chunk_size : int, optional
        Samples per vmapped call; by default the most that keep the largest
        batched intermediate under ``memory_budget`` bytes (measured once per
        signature by tracing one sample on two examples).
    memory_budget : int
        See ``chunk_size``.
    randomness : {"different", "same", "error"}
        For random ops in the forward, as in ``torch.func.vmap``; the loop
        replays one RNG state per sample for ``"same"``. Only ``"different"``
        can reach the loop by timing, and only for a forward without random
        ops; ``"same"`` falls back to the loop only if vmap fails; ``"error"``
        never loops.
    backward_to : sequence of Tensor, optional
        For callers that will backpropagate through the outputs: the tensors
        the gradient will reach (e.g. the posterior state the samples were
        drawn from). ``"auto"``'s timing then includes that backward pass.
    validate : callable, optional
        The caller's full check of ``samples``; called once per new signature
        (structure, trailing shapes, dtypes), before anything runs, so that
        repeated calls skip it.
    owner : object, optional
        A long-lived (weakly referenceable) object to remember the decisions
        on, for a caller whose ``apply_fn`` is a closure built anew per call
        (which would otherwise be measured on every call); the decisions are
        keyed by the closure's code as well.
    redraw : callable, optional
        ``redraw() -> samples`` like ``samples``, drawn the way the caller drew
        them but from a private generator: ``"auto"`` then times the draw's
        effect too (fresh samples each run, and with ``backward_to`` the draw's
        backward pass), as a training step pays it. It must not consume the
        caller's randomness.

    Returns
    -------
    Tensor or tree
        Outputs with a leading axis ``S``.

    Raises
    ------
    ValueError
        If ``x`` does not fit the model (the first sample on the first two
        examples fails); anything ``apply_fn`` raises on a forced path.

    Examples
    --------
    >>> net = torch.nn.Linear(3, 2)
    >>> w = {"weight": torch.randn(8, 2, 3), "bias": torch.randn(8, 2)}
    >>> f = lambda p, x: torch.func.functional_call(net, p, (x,))
    >>> apply_samples(f, w, torch.randn(5, 3)).shape
    torch.Size([8, 5, 2])
    """
    leaves, spec = optree.tree_flatten(samples)
    if not leaves:
        raise ValueError("samples must be a tree with at least one tensor leaf")
    num = leaves[0].shape[0]
    cache, extra = _cache_for(apply_fn, owner)
    key = _signature(x, args, spec, leaves, randomness, extra)
    entry = cache.get(key)
    if entry is None:
        if validate is not None:
            validate()
        entry = cache[key] = _probe(apply_fn, optree.tree_unflatten(spec, [t[0] for t in leaves]), x, args)

    # A forward that wrote into its inputs in the probe gets copies on every call; any
    # other is watched through the inputs' version counters (a data-dependent write).
    fn = _on_copies(apply_fn) if entry.writes_inputs else apply_fn
    versions = None if entry.writes_inputs else _input_versions(x, args)
    out = _dispatch(entry, fn, leaves, spec, x, args, num, method, chunk_size, memory_budget, randomness,
                    backward_to, redraw)
    if versions is not None and _input_versions(x, args) != versions:
        entry.writes_inputs = True
        raise RuntimeError(
            "the model's forward wrote into its input x in place on this call (not on the first call, which "
            "ran on a copy), so the tensor you passed has changed; from now on it gets copies. Recompute x "
            "and call again."
        )
    return out


def _fallback(entry: _Entry, fn: Callable[..., Any], leaves: list[Tensor], spec: Any, x: Any, args: tuple,
              num: int, randomness: str, err: Exception) -> Any:
    """The loop after vmap failed with ``err``; warns (once per signature) only if the loop works.

    A loop that fails too means the input is at fault, not vmap: its error is
    raised, without a misleading fallback warning, and vmap stays the path for
    inputs that work.
    """
    out = _loop(fn, leaves, spec, x, args, num, randomness)
    entry.vmap_failed = True
    _warn_fallback(err)
    return out


def _dispatch(
    entry: _Entry,
    fn: Callable[..., Any],
    leaves: list[Tensor],
    spec: Any,
    x: Any,
    args: tuple,
    num: int,
    method: str,
    chunk_size: int | None,
    memory_budget: int,
    randomness: str,
    backward_to: Sequence[Tensor] | None,
    redraw: Callable[[], Any] | None,
) -> Any:
    if method == "loop" or (method == "auto" and entry.vmap_failed):
        return _loop(fn, leaves, spec, x, args, num, randomness)
    if chunk_size is None:
        per_sample = entry.bytes_per_example * (_batch_size(x) or 1)
        chunk_size = max(1, memory_budget // per_sample)
    chunk = min(chunk_size, num)
    if method == "vmap" or randomness == "error":
        return _vmapped(fn, leaves, spec, x, args, num, chunk, randomness)
    if randomness == "different" and not entry.stochastic:
        decision = (num, chunk, bool(backward_to) and torch.is_grad_enabled())
        faster = entry.vmap_faster.get(decision)
        # .get/.pop, not [] and del: threads sharing one apply_fn may reach this at once.
        countdown = entry.recheck.get(decision) if faster is not None and entry.recheck else None
        if countdown is not None:
            countdown[0] -= 1
            if countdown[0] <= 0:
                if entry.timing_s < max(BUDGET_S, TIMING_FRACTION * entry.work_s):
                    faster = None  # not confirmed yet: measure again now
                else:
                    entry.recheck.pop(decision, None)  # timing has had its share of the run: the decision stands
        if faster is None:
            faster, contended, err = _decide(
                entry, fn, leaves, spec, x, args, num, chunk, backward_to if decision[2] else None, redraw
            )
            if err is not None:
                return _fallback(entry, fn, leaves, spec, x, args, num, randomness, err)
            if not entry.stochastic:
                first = decision not in entry.vmap_faster
                entry.vmap_faster[decision] = faster
                left = entry.recheck.pop(decision, [0, MAX_RECHECKS])[1]
                if (first or contended) and left > 0:
                    entry.recheck[decision] = [RECHECK_AFTER, left - 1]
        start = time.perf_counter()
        try:
            if not faster:
                return _loop(fn, leaves, spec, x, args, num, randomness)
            return _vmapped(fn, leaves, spec, x, args, num, chunk, randomness)
        finally:
            entry.work_s += time.perf_counter() - start
    try:
        return _vmapped(fn, leaves, spec, x, args, num, chunk, randomness)
    except Exception as err:
        # A stochastic or "same" forward, never timed: its first vmap run is here.
        return _fallback(entry, fn, leaves, spec, x, args, num, randomness, err)


def chosen_path(apply_fn: Callable[..., Any], owner: Any = None) -> dict[tuple, str]:
    """What ``"auto"`` decided for ``apply_fn``: ``{(signature..., S, chunk, with_backward): "vmap" | "loop"}``.

    For benchmarks and tests (a forward that failed under vmap reads ``"loop"``,
    a stochastic one ``"vmap"``).

    Examples
    --------
    >>> f = lambda p, x: x * p
    >>> _ = apply_samples(f, torch.ones(3, 2), torch.ones(2))
    >>> list(chosen_path(f).values())[0] in ("vmap", "loop")
    True
    """
    cache, _ = _cache_for(apply_fn, owner)
    out: dict[tuple, str] = {}
    for key, entry in cache.items():
        if entry.vmap_failed:
            out[key] = "loop"
        elif entry.stochastic:
            out[key] = "vmap"
        for decision, faster in entry.vmap_faster.items():
            out[(*key, *decision)] = "vmap" if faster else "loop"
    return out
