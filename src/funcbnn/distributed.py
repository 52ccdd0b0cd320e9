"""Collective helpers for ``process_group=``: funcbnn on ``torch.distributed``, nothing of its own.

Every fitter and :func:`funcbnn.sample_outputs` take ``process_group=None``.
``None`` means one process and no collective call at all; a
``torch.distributed`` group (the one the user already launched with
``torchrun``, ``init_process_group``, DDP or FSDP) makes them shard work over
the group's ranks and combine the results, so that every rank ends with what
one process computes on the whole problem:

- curvature and data statistics: summed with one ``all_reduce``;
- Monte-Carlo samples and ensemble members: split in contiguous blocks and
  gathered back in order, drawn from the same generator stream as one process;
- gradients of trained states: averaged like DDP.

Before any large collective the ranks exchange a small *signature* (shapes,
counts and a fingerprint of the values that must agree) and raise the same
``ValueError`` on every rank when they disagree, rather than hanging in a
collective some ranks never reach. ``torch.distributed`` itself bounds every
collective by the group's ``timeout``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import optree
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "world",
    "shard_range",
    "all_reduce_tree",
    "all_gather_blocks",
    "agree",
    "fingerprint",
    "average_gradients",
]


def world(process_group: Any) -> tuple[int, int]:
    """``(rank, world_size)`` in ``process_group``; ``(0, 1)`` for ``None``.

    Raises ``RuntimeError`` naming ``process_group`` if one is given but
    ``torch.distributed`` is not initialised.
    """
    if process_group is None:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first (or pass process_group=None for one process)"
        )
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def shard_range(n: int, rank: int, world_size: int) -> range:
    """The contiguous block of ``range(n)`` that ``rank`` owns: the first ``n % world_size`` ranks get one more.

    Examples
    --------
    >>> [list(shard_range(5, r, 2)) for r in range(2)]
    [[0, 1, 2], [3, 4]]
    >>> list(shard_range(1, 1, 2))
    []
    """
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def _device(process_group: Any) -> torch.device:
    """Where collective buffers must live: CUDA for NCCL, CPU otherwise."""
    backend = dist.get_backend(process_group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_tree(tree: Any, process_group: Any) -> Any:
    """The sum over ranks of every tensor leaf of ``tree`` (new tensors; ``tree`` is not changed).

    One flat ``all_reduce`` per dtype, not one per leaf. Identity for ``process_group=None``.
    """
    if process_group is None:
        return tree
    leaves, spec = optree.tree_flatten(tree)
    out: list[Any] = list(leaves)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(leaves):
        if isinstance(t, Tensor):
            by_dtype.setdefault(t.dtype, []).append(i)
    device = _device(process_group)
    for dtype, idx in by_dtype.items():
        flat = torch.cat([leaves[i].detach().reshape(-1).to(device) for i in idx]) if idx else None
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
        start = 0
        for i in idx:
            t = leaves[i]
            out[i] = flat[start : start + t.numel()].reshape(t.shape).to(t.device)
            start += t.numel()
    return optree.tree_unflatten(spec, out)


def all_gather_blocks(tree: Any, counts: Sequence[int], process_group: Any) -> Any:
    """Concatenate, in rank order, every rank's block of ``tree`` along the leading axis.

    ``counts[r]`` is rank ``r``'s number of rows (0 allowed); every leaf of
    ``tree`` has ``counts[rank]`` rows here. Identity for ``process_group=None``.
    """
    if process_group is None:
        return tree
    rank, size = world(process_group)
    device = _device(process_group)
    most = max(counts)

    def gather(t: Tensor) -> Tensor:
        # all_gather needs equal shapes: pad to the largest block, then cut each rank's rows
        padded = t.new_zeros((most, *t.shape[1:]), device=device)
        padded[: t.shape[0]] = t.to(device)
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded, group=process_group)
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)

    return optree.tree_map(gather, tree)


def fingerprint(tree: Any) -> str:
    """A short hash of a tree's structure, shapes, dtypes and values (to check ranks hold the same tensors)."""
    h = hashlib.sha256()
    leaves, spec = optree.tree_flatten(tree)
    h.update(str(spec).encode())
    for t in leaves:
        if isinstance(t, Tensor):
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(_bytes(t))
        else:
            h.update(repr(t).encode())
    return h.hexdigest()[:16]


def _bytes(t: Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return bytes(flat.view(torch.uint8).tolist()) if flat.numel() < 4096 else _sampled_bytes(flat)


def _sampled_bytes(flat: Tensor) -> bytes:
    # Large tensors: the sum, the sum of squares and an evenly spaced subset are enough to catch a rank
    # whose parameters differ, at a cost independent of the size.
    idx = torch.linspace(0, flat.numel() - 1, 1024).long()
    pick = flat[idx].double()
    stats = torch.stack([flat.double().sum(), flat.double().square().sum()])
    return bytes(torch.cat([stats, pick]).view(torch.uint8).tolist())


def agree(what: dict[str, Any], process_group: Any) -> None:
    """Raise the same ``ValueError`` on every rank unless all ranks pass equal ``what`` values.

    ``what`` maps argument names to small picklable values (shapes, counts,
    fingerprints). One ``all_gather_object``, which every rank reaches, so a
    disagreement is an error on all ranks instead of a hang in a later collective.
    """
    if process_group is None:
        return
    rank, size = world(process_group)
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, what, group=process_group)
    for key in what:
        values = [g.get(key) if isinstance(g, dict) else None for g in gathered]
        if any(v != values[0] for v in values[1:]):
            detail = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            raise ValueError(f"process_group ranks disagree on {key}: {detail}; every rank must pass the same {key}")


def average_gradients(leaves: Sequence[Tensor], process_group: Any) -> None:
    """Average ``.grad`` of ``leaves`` over the ranks in place, as DDP does (one flat all_reduce)."""
    if process_group is None:
        return
    _, size = world(process_group)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in leaves]
    summed = all_reduce_tree(grads, process_group)
    for p, g in zip(leaves, summed):
        p.grad = g / size
