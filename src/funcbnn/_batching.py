"""``vmap`` over the leading axis of a parameter tree, with the least Python overhead.

``torch.func.vmap`` spends ~200 us per call on CPU in its Python wrapper (torch
pytree flattening, argument checks) before any math runs; for a small model
that is most of the cost of a 16-sample prediction. The functorch primitives
it is built from (enter a vmap level, wrap inputs, unwrap outputs) are called
here directly, with optree, which halves that overhead. If those private
primitives are missing from a torch version, the public ``torch.func.vmap``
is used: same results, more overhead.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import optree
import torch
from torch import Tensor

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


def vmap_leading(
    fn: Callable[[Any, Any], Any], batched: Any, shared: Any, *, randomness: str, low_level: bool = True
) -> Any:
    """``fn(b, shared)`` for every slice ``b`` along the leading axis of ``batched``'s leaves.

    Equivalent to ``torch.func.vmap(fn, in_dims=(0, None), randomness=randomness)(batched, shared)``.
    Outputs must be a tree of tensors; each gets the batch axis first.
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


def vmap_is_faster(run_vmap: Callable[[], Any], run_loop: Callable[[], Any], rounds: int = 2) -> bool:
    """Whether ``run_vmap`` took no longer than ``run_loop``, best of ``rounds`` alternating timings.

    Both should already have run once (warm-up). Alternating and taking each path's
    best keeps one noisy measurement from fixing a bad choice.
    """
    t_vmap = t_loop = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        run_vmap()
        t_vmap = min(t_vmap, time.perf_counter() - start)
        start = time.perf_counter()
        run_loop()
        t_loop = min(t_loop, time.perf_counter() - start)
    return t_vmap <= t_loop
