"""Empirical distribution of stacked members: a deep ensemble as a posterior family.

``q(w) = (1/K) sum_k delta(w - w_k)``. The state holds the members as one
parameter tree with a leading member axis (what :mod:`funcbnn.ensemble` trains
under ``vmap``), so ``sample(state, K)`` *is* the ensemble and
:func:`funcbnn.sample_outputs`, summaries and metrics apply unchanged.

``sample(state, n)`` returns the members in order when ``n == K``; otherwise it
draws ``n`` members uniformly with replacement from the generator. A set of
point masses has no density: ``kl`` raises (an ensemble is not trained by a
KL), and ``log_prob`` / ``entropy`` are not declared.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import optree
import torch
from torch import Tensor

from .._validation import positive_int
from ..checks import check_finite, check_generator
from ..tree import Tree

__all__ = ["EmpiricalState", "Empirical", "empirical"]


class EmpiricalState(NamedTuple):
    """The members: a parameter tree whose leaves carry a leading member axis ``K``."""

    members: Tree


def _num_members(state: EmpiricalState) -> int:
    if not isinstance(state, EmpiricalState):
        raise TypeError(f"state must be an EmpiricalState, got {type(state).__name__}")
    leaves = optree.tree_leaves(state.members)
    if not leaves:
        raise ValueError("state.members must hold at least one tensor leaf")
    sizes = {t.shape[0] if t.dim() else None for t in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"every leaf of state.members needs the same leading member axis, got sizes {sorted(map(str, sizes))}")
    return sizes.pop()


def sample(state: EmpiricalState, num_samples: int, *, generator: torch.Generator | None = None) -> Tree:
    """The members (``num_samples == K``, in order) or ``num_samples`` uniform draws with replacement."""
    k = _num_members(state)
    num_samples = positive_int(num_samples, "num_samples")
    check_generator(generator)
    if num_samples == k:
        return optree.tree_map(torch.clone, state.members)
    ref = optree.tree_leaves(state.members)[0]
    device = generator.device if generator is not None else torch.device("cpu")  # draw where the generator lives
    idx = torch.randint(0, k, (num_samples,), generator=generator, device=device).to(ref.device)
    return optree.tree_map(lambda t: t.index_select(0, idx), state.members)


def kl(state: EmpiricalState, prior: Any, **kwargs: Any) -> Tensor:
    """Undefined: raises ``ValueError`` (point masses have no density, so KL to a continuous prior is infinite)."""
    _num_members(state)
    raise ValueError(
        "KL(empirical || prior) is infinite: an ensemble is a set of point masses without a density; "
        "train members by their own loss (funcbnn.ensemble.fit) instead of an ELBO"
    )


def mean(state: EmpiricalState) -> Tree:
    """The members' average."""
    _num_members(state)
    return optree.tree_map(lambda t: t.mean(0), state.members)


def variance(state: EmpiricalState) -> Tree:
    """The members' population variance (of the equal-weight empirical distribution)."""
    _num_members(state)
    return optree.tree_map(lambda t: t.var(0, correction=0), state.members)


class Empirical(NamedTuple):
    """The empirical (ensemble) family; see the module docstring."""

    init: Callable[..., EmpiricalState]
    sample: Callable[..., Tree] = sample
    kl: Callable[..., Tensor] = kl
    mean: Callable[..., Tree] = mean
    variance: Callable[..., Tree] = variance


def empirical(num_members: int = 5, init_std: float = 0.0) -> Empirical:
    """Build the empirical family.

    Parameters
    ----------
    num_members : int, default 5
        ``K`` for :attr:`Empirical.init`.
    init_std : float, default 0.0
        ``init(params, generator=g)`` stacks ``K`` copies of ``params`` plus
        ``init_std`` times standard-normal noise (0: identical copies). For
        independently initialised networks use :func:`funcbnn.ensemble.init_members`.

    Examples
    --------
    >>> post = empirical(num_members=3, init_std=0.1)
    >>> state = post.init({"w": torch.zeros(2)}, generator=torch.Generator().manual_seed(0))
    >>> post.sample(state, 3)["w"].shape
    torch.Size([3, 2])
    """
    num_members = positive_int(num_members, "num_members")
    try:
        init_std = float(init_std)
    except (TypeError, ValueError):
        raise TypeError(f"init_std must be a number >= 0, got {init_std!r}") from None
    if not (init_std >= 0 and init_std != float("inf")):
        raise ValueError(f"init_std must be finite and >= 0, got {init_std}")

    def init(params: Tree, *, generator: torch.Generator | None = None) -> EmpiricalState:
        leaves = optree.tree_leaves(params)
        if not leaves or not all(isinstance(t, Tensor) and t.is_floating_point() for t in leaves):
            raise TypeError("params must be a non-empty tree of floating-point tensors")
        check_generator(generator)
        check_finite(params, "params", context="post.init needs finite parameters to centre the posterior on")

        def stack(t: Tensor) -> Tensor:
            out = t.detach().expand(num_members, *t.shape).clone()
            if init_std:
                device = generator.device if generator is not None else torch.device("cpu")
                out += init_std * torch.randn(out.shape, dtype=t.dtype, generator=generator, device=device).to(t.device)
            return out

        return EmpiricalState(optree.tree_map(stack, params))

    return Empirical(init=init)
