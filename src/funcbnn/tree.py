"""Pytree helpers on :mod:`optree` for parameter trees.

A *tree* here is any optree pytree whose leaves are tensors, most often the
``dict[str, Tensor]`` that :func:`funcbnn.model.functionalize` returns. ``None``
is an empty subtree (optree's default), which is what :func:`partition` uses to
mark the leaves that belong to the other part.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import optree
import torch
from torch import Tensor

from ._validation import positive_int
from .checks import check_generator

Tree = Any
"""A pytree with tensor leaves."""

__all__ = [
    "Tree",
    "leaf_names",
    "ravel",
    "stack",
    "unstack",
    "tree_add",
    "tree_sub",
    "tree_mul",
    "tree_scale",
    "tree_vdot",
    "tree_size",
    "randn_like",
    "diag_normal",
    "partition",
    "combine",
    "check_same_structure",
]


def _path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path) if path else "<root>"


def leaf_names(tree: Tree) -> list[str]:
    """Dotted names of the leaves of ``tree``, in optree's flattening order.

    >>> leaf_names({"fc": {"weight": torch.zeros(2)}, "bias": torch.zeros(1)})
    ['bias', 'fc.weight']
    """
    paths, _, _ = optree.tree_flatten_with_path(tree)
    return [_path_name(p) for p in paths]


def check_same_structure(reference: Tree, other: Tree, name: str, *, leading: int = 0) -> None:
    """Raise a ``ValueError`` unless ``other`` has the structure and leaf shapes of ``reference``.

    Parameters
    ----------
    reference, other : Tree
        The expected tree and the tree the user passed.
    name : str
        The argument name used in the error message.
    leading : int
        Number of extra leading dimensions ``other``'s leaves may carry (for
        batched samples); those dimensions are not compared.
    """
    ref_spec = optree.tree_structure(reference)
    spec = optree.tree_structure(other)
    if ref_spec != spec:
        raise ValueError(f"{name} must have the tree structure {ref_spec}, got {spec}")
    for path, ref, leaf in zip(
        leaf_names(reference), optree.tree_leaves(reference), optree.tree_leaves(other)
    ):
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{name}: leaf '{path}' must be a Tensor, got {type(leaf).__name__}")
        if tuple(leaf.shape[leading:]) != tuple(ref.shape) or leaf.dim() != ref.dim() + leading:
            raise ValueError(
                f"{name}: leaf '{path}' must have shape "
                f"{('S',) * leading + tuple(ref.shape)}, got {tuple(leaf.shape)}"
            )


def ravel(tree: Tree) -> tuple[Tensor, Callable[[Tensor], Tree]]:
    """Flatten a tree of tensors into one 1-D tensor.

    Returns the flat vector and the inverse function; the inverse restores
    the structure, shapes and dtypes (the flat vector takes the promoted dtype
    of all leaves).

    >>> flat, unravel = ravel({"w": torch.ones(2, 3), "b": torch.zeros(3)})
    >>> flat.shape
    torch.Size([9])
    >>> unravel(flat)["w"].shape
    torch.Size([2, 3])
    """
    leaves, spec = optree.tree_flatten(tree)
    shapes = [leaf.shape for leaf in leaves]
    dtypes = [leaf.dtype for leaf in leaves]
    sizes = [leaf.numel() for leaf in leaves]
    if leaves:
        flat = torch.cat([leaf.reshape(-1) for leaf in leaves])
    else:
        flat = torch.zeros(0)

    def unravel(vector: Tensor) -> Tree:
        if vector.dim() != 1 or vector.numel() != sum(sizes):
            raise ValueError(
                f"vector must be 1-D with {sum(sizes)} elements, got shape {tuple(vector.shape)}"
            )
        parts = torch.split(vector, sizes) if sizes else []
        out = [p.reshape(s).to(d) for p, s, d in zip(parts, shapes, dtypes)]
        return optree.tree_unflatten(spec, out)

    return flat, unravel


def stack(trees: Sequence[Tree]) -> Tree:
    """Stack trees of equal structure along a new leading axis.

    >>> s = stack([{"w": torch.zeros(3)}, {"w": torch.ones(3)}])
    >>> s["w"].shape
    torch.Size([2, 3])
    """
    if len(trees) == 0:
        raise ValueError("trees must be a non-empty sequence")
    for i, t in enumerate(trees[1:], start=1):
        check_same_structure(trees[0], t, f"trees[{i}]")
    return optree.tree_map(lambda *leaves: torch.stack(leaves), *trees)


def unstack(tree: Tree) -> list[Tree]:
    """Split a tree whose leaves share a leading axis into a list of trees.

    Inverse of :func:`stack`. Leaves are views, not copies.
    """
    leaves, spec = optree.tree_flatten(tree)
    if not leaves:
        raise ValueError("tree has no leaves to unstack")
    n = leaves[0].shape[0] if leaves[0].dim() > 0 else None
    for name, leaf in zip(leaf_names(tree), leaves):
        if leaf.dim() == 0 or leaf.shape[0] != n:
            raise ValueError(
                f"every leaf must have the same leading dimension {n}; "
                f"leaf '{name}' has shape {tuple(leaf.shape)}"
            )
    return [optree.tree_unflatten(spec, [leaf[i] for leaf in leaves]) for i in range(n)]


def tree_add(a: Tree, b: Tree) -> Tree:
    """Leafwise ``a + b``."""
    return optree.tree_map(torch.add, a, b)


def tree_sub(a: Tree, b: Tree) -> Tree:
    """Leafwise ``a - b``."""
    return optree.tree_map(torch.sub, a, b)


def tree_mul(a: Tree, b: Tree) -> Tree:
    """Leafwise ``a * b``."""
    return optree.tree_map(torch.mul, a, b)


def tree_scale(tree: Tree, scalar: float | Tensor) -> Tree:
    """Multiply every leaf by ``scalar``."""
    return optree.tree_map(lambda t: t * scalar, tree)


def tree_vdot(a: Tree, b: Tree) -> Tensor:
    """Inner product ``sum_i <a_i, b_i>`` over all leaves."""
    products = optree.tree_leaves(optree.tree_map(lambda x, y: (x * y).sum(), a, b))
    return torch.stack(products).sum() if products else torch.zeros(())


def tree_size(tree: Tree) -> int:
    """Total number of elements over all leaves."""
    return sum(leaf.numel() for leaf in optree.tree_leaves(tree))


def randn_like(
    tree: Tree, num_samples: int | None = None, *, generator: torch.Generator | None = None
) -> Tree:
    """Standard-normal noise shaped like ``tree``.

    Parameters
    ----------
    tree : Tree
        Template; the noise has each leaf's dtype and device.
    num_samples : int, optional
        If given, every leaf gets an extra leading axis of this size.
    generator : torch.Generator, optional
        Source of randomness; the same generator state gives the same noise.
    """
    lead = () if num_samples is None else (positive_int(num_samples, "num_samples"),)
    check_generator(generator)

    def draw(leaf: Tensor) -> Tensor:
        out = torch.empty(lead + tuple(leaf.shape), dtype=leaf.dtype, device=leaf.device)
        return out.normal_(generator=generator)

    return optree.tree_map(draw, tree)


def diag_normal(
    mean: Tree,
    std: Tree,
    num_samples: int | None = None,
    *,
    generator: torch.Generator | None = None,
    differentiable: bool = True,
) -> Tree:
    """Draws ``mean + std * eps`` of a diagonal Gaussian, ``eps`` standard normal, leaf by leaf.

    The one diagonal draw of the library: every family, fitter and adapter that
    draws from a diagonal Gaussian calls this, so the same generator state gives
    the same numbers everywhere.

    Parameters
    ----------
    mean, std : Tree
        Same structure; ``std`` leaves broadcast against ``mean`` leaves (a
        per-leaf 0-d std works).
    num_samples : int, optional
        If given, every leaf gets a leading axis of this size; if not, one draw
        without a sample axis (the same numbers as ``num_samples=1`` squeezed).
    generator : torch.Generator, optional
        Source of randomness.
    differentiable : bool, default True
        ``False`` scales the noise in place under ``no_grad`` (about 1.5x faster,
        no graph); the values are the same.

    Examples
    --------
    >>> m = {"w": torch.zeros(2, 3)}
    >>> diag_normal(m, {"w": torch.ones(2, 3)}, 4, generator=torch.Generator().manual_seed(0))["w"].shape
    torch.Size([4, 2, 3])
    """
    lead = () if num_samples is None else (positive_int(num_samples, "num_samples"),)
    check_generator(generator)

    def draw(m: Tensor, s: Tensor) -> Tensor:
        eps = torch.empty(lead + tuple(m.shape), dtype=m.dtype, device=m.device).normal_(generator=generator)
        if differentiable:
            return m + s * eps
        return eps.mul_(s).add_(m)

    if differentiable:
        return optree.tree_map(draw, mean, std)
    with torch.no_grad():
        return optree.tree_map(draw, mean, std)


def partition(tree: Tree, mask: Tree | Callable[[str, Tensor], bool]) -> tuple[Tree, Tree]:
    """Split ``tree`` into ``(selected, rest)`` by a boolean mask.

    Both parts keep the full structure; leaves that belong to the other part are
    ``None`` (an empty subtree for optree), so ``tree_map`` over a part only
    touches its own leaves. :func:`combine` merges the parts back.

    Parameters
    ----------
    tree : Tree
    mask : Tree or callable
        A tree of bools with ``tree``'s structure, or ``mask(name, leaf) -> bool``
        called with each leaf's dotted name.

    Examples
    --------
    >>> params = {"body.weight": torch.zeros(3, 2), "head.weight": torch.zeros(1, 3)}
    >>> head, body = partition(params, lambda name, _: name.startswith("head"))
    >>> head["body.weight"] is None, body["head.weight"] is None
    (True, True)
    """
    leaves, spec = optree.tree_flatten(tree)
    if callable(mask):
        flags = [bool(mask(name, leaf)) for name, leaf in zip(leaf_names(tree), leaves)]
    else:
        flags = optree.tree_leaves(mask)
        if optree.tree_structure(mask) != spec:
            raise ValueError(
                f"mask must have the tree structure {spec}, got {optree.tree_structure(mask)}"
            )
        if not all(isinstance(f, bool) for f in flags):
            raise TypeError("mask leaves must be Python bools")
    selected = optree.tree_unflatten(spec, [l if f else None for l, f in zip(leaves, flags)])
    rest = optree.tree_unflatten(spec, [None if f else l for l, f in zip(leaves, flags)])
    return selected, rest


def combine(*parts: Tree) -> Tree:
    """Merge trees produced by :func:`partition` (``None`` marks a missing leaf).

    Where more than one part holds a leaf, the first one wins.
    """
    if not parts:
        raise ValueError("combine needs at least one tree")

    def pick(*leaves: Any) -> Any:
        for leaf in leaves:
            if leaf is not None:
                return leaf
        return None

    return optree.tree_map(pick, *parts, none_is_leaf=True)
