"""Per-example transforms over a chunk of examples: ``vmap``, or a plain loop where the forward cannot run under it.

The generic curvature engine and the GLM Jacobians map ``grad`` / ``jacrev`` of
one example's output over a chunk with ``torch.func.vmap``. Some forwards do
not run under ``vmap``: Python control flow on a tensor's value
(``if x.sum() > 0``), recurrent layers whose kernels have no batching rule
(``nn.LSTM`` makes torch warn that it falls back to a slow loop, ``nn.GRU``
fails with a broadcast error from an in-place update). For those the same
function runs once per example in a Python loop: the same numbers (each example
is differentiated on its own either way), without the warning. The loop runs
with cuDNN off: its recurrent kernels read raw data pointers, which the
``torch.func`` transforms' wrapped tensors do not have ("Cannot access data
pointer of Tensor that doesn't have storage" for an ``nn.GRU`` on CUDA), while
PyTorch's own recurrent implementation works under them.

:class:`PerExample` remembers the choice, so one fit or prediction tries
``vmap`` once and loops for every later chunk when it did not work.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import optree
import torch

__all__ = ["PerExample"]

# Torch's own message when an op has no batching rule and vmap loops over the examples inside.
_FALLBACK_WARNING = r"(?s).*performance drop because we have not yet implemented the batching rule"


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

    def __call__(self, fn: Callable[..., Any], in_dims: tuple, *args: Any) -> Any:
        if not self.loop:
            try:
                with warnings.catch_warnings():
                    # The warning fires mid-transform; as an error it aborts the vmap, and the loop
                    # below gives the same numbers without it.
                    warnings.filterwarnings("error", message=_FALLBACK_WARNING, category=UserWarning)
                    return torch.func.vmap(fn, in_dims=in_dims)(*args)
            except (RuntimeError, ValueError, UserWarning):
                # If the loop fails too, the input is at fault, not vmap: its error (raised from here)
                # names no vmap internals.
                out = _loop(fn, in_dims, args)
                self.loop = True
                return out
        return _loop(fn, in_dims, args)


def _loop(fn: Callable[..., Any], in_dims: tuple, args: tuple) -> Any:
    """``fn`` on each example in turn, results stacked on a new leading axis."""
    n = next(
        t.shape[0] for a, d in zip(args, in_dims) if d == 0 for t in optree.tree_leaves(a) if isinstance(t, torch.Tensor)
    )
    results = []
    # cuDNN off (module docstring); the flag is process-wide, so other threads' CUDA calls meanwhile skip it too.
    # jacrev vmaps over output directions inside, where the recurrent cells' backward (CUDA's
    # _thnn_differentiable_*_cell_backward) has no batching rule either: torch loops there, correctly,
    # and its warning is noise on a path that is already the loop.
    with torch.backends.cudnn.flags(enabled=False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_FALLBACK_WARNING, category=UserWarning)
        for i in range(n):
            # Non-tensor leaves (an Inputs' flags and scales) are the same for every example.
            one = [
                a if d is None else optree.tree_map(lambda t: t[i] if isinstance(t, torch.Tensor) else t, a)
                for a, d in zip(args, in_dims)
            ]
            results.append(fn(*one))
    return optree.tree_map(lambda *parts: torch.stack(parts), *results)
