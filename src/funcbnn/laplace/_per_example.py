"""Per-example transforms over a chunk of examples: ``vmap``, or a plain loop where the forward cannot run under it.

The generic curvature engine and the GLM Jacobians map ``grad`` / ``jacrev`` of
one example's output over a chunk with ``torch.func.vmap``. Some forwards do
not run under ``vmap``: Python control flow on a tensor's value
(``if x.sum() > 0``), recurrent layers whose kernels have no batching rule
(``nn.GRU`` fails with a broadcast error from an in-place update; ``nn.LSTM``
runs through torch's own per-op loop, which warns, and under warnings-as-errors
raises). For those the same function runs once per example in a Python loop:
the same numbers (each example is differentiated on its own either way).

The loop runs with cuDNN off: its recurrent kernels read raw data pointers,
which the ``torch.func`` transforms' wrapped tensors do not have ("Cannot
access data pointer of Tensor that doesn't have storage" for an ``nn.GRU`` on
CUDA), while PyTorch's own recurrent implementation works under them. Callers
pass a ``loop_fn`` for ``jacrev`` built with ``chunk_size=1``, which loops over
output directions instead of vmapping over them (the recurrent cells' CUDA
backward has no batching rule either).

Nothing here touches the process-wide warning filters (``catch_warnings`` is
not thread-safe): concurrent fits and predictions stay independent.
:class:`PerExample` remembers the choice, so one fit or prediction tries
``vmap`` once and loops for every later chunk when it did not work.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

import optree
import torch

__all__ = ["PerExample"]


class PerExample:
    """``vmap(fn, in_dims)(*args)`` with a fallback to a loop over examples (module docstring).

    Attributes
    ----------
    loop : bool
        ``True`` once ``vmap`` failed on this object's function: every later
        call loops without trying again.
    """

    def __init__(self) -> None:
        self.loop = False

    def __call__(self, fn: Callable[..., Any], in_dims: tuple, *args: Any, loop_fn: Callable[..., Any] | None = None) -> Any:
        """``vmap(fn)`` over the ``in_dims == 0`` arguments; in the loop, ``loop_fn`` (default ``fn``) per example."""
        if not self.loop:
            try:
                return torch.func.vmap(fn, in_dims=in_dims)(*args)
            except (RuntimeError, ValueError, UserWarning):
                # UserWarning: torch's per-op fallback warning under a warnings-as-errors filter.
                # If the loop fails too, the input is at fault, not vmap: its error (raised from
                # here) names no vmap internals.
                out = _loop(loop_fn or fn, in_dims, args)
                self.loop = True
                return out
        return _loop(loop_fn or fn, in_dims, args)


# cuDNN is one process-wide flag: threads that loop at the same time share one "off" period
# (a snapshot-and-restore per thread could restore "off" for good when two interleave).
_CUDNN_LOCK = threading.Lock()
_CUDNN_USERS = 0
_CUDNN_SAVED = True


@contextlib.contextmanager
def _cudnn_off() -> Iterator[None]:
    global _CUDNN_USERS, _CUDNN_SAVED
    with _CUDNN_LOCK:
        if _CUDNN_USERS == 0:
            _CUDNN_SAVED = torch.backends.cudnn.enabled
            torch.backends.cudnn.enabled = False
        _CUDNN_USERS += 1
    try:
        yield
    finally:
        with _CUDNN_LOCK:
            _CUDNN_USERS -= 1
            if _CUDNN_USERS == 0:
                torch.backends.cudnn.enabled = _CUDNN_SAVED


def _loop(fn: Callable[..., Any], in_dims: tuple, args: tuple) -> Any:
    """``fn`` on each example in turn, results stacked on a new leading axis."""
    n = next(
        t.shape[0] for a, d in zip(args, in_dims) if d == 0 for t in optree.tree_leaves(a) if isinstance(t, torch.Tensor)
    )
    results = []
    with _cudnn_off():
        for i in range(n):
            # Non-tensor leaves (an Inputs' flags and scales) are the same for every example.
            one = [
                a if d is None else optree.tree_map(lambda t: t[i] if isinstance(t, torch.Tensor) else t, a)
                for a, d in zip(args, in_dims)
            ]
            results.append(fn(*one))
    return optree.tree_map(lambda *parts: torch.stack(parts), *results)
