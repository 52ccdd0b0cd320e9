"""Low-rank-plus-diagonal Gaussian over a parameter tree.

``q(w) = N(mean, diag(d) + U U^T)`` with ``d >= 0`` shaped like the parameters
and ``U`` a tree whose leaves carry a leading *rank* axis ``R`` (column ``r`` of
``U`` is the tree ``factor[r]``). This is the posterior of SWAG (Maddox et al.
2019, "A Simple Baseline for Bayesian Uncertainty in Deep Learning"), whose
fitter (:mod:`funcbnn.swag`) fills ``d`` and ``U`` from an SGD trajectory; the
family itself knows nothing about SWAG's scalings.

No ``P x P`` matrix is ever built: draws are ``mean + sqrt(d) z1 + U z2``
(``z1`` standard normal like the parameters, ``z2`` of size ``R``); densities,
KL and entropy go through the ``R x R`` capacitance matrix
``I + U^T diag(d)^-1 U`` (Woodbury identity and matrix determinant lemma), so
those need ``d > 0``.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Literal, NamedTuple

import optree
import torch
from torch import Tensor

from .._validation import check_positive_tree, positive_float, positive_int
from ..tree import Tree, check_same_structure, diag_normal, leaf_names, tree_size
from ..checks import check_finite, check_generator
from ._kl import check_reduction, monte_carlo_kl

__all__ = ["LowRankGaussianState", "LowRankGaussian", "lowrank_gaussian"]

_LOG_2PI = math.log(2 * math.pi)


class LowRankGaussianState(NamedTuple):
    """State of a low-rank-plus-diagonal Gaussian.

    Attributes
    ----------
    mean : Tree
    diag : Tree
        Diagonal variances ``d`` (non-negative), shaped like ``mean``.
    factor : Tree
        ``U``: every leaf shaped ``(R, *mean_leaf.shape)``; ``R`` may be 0.
    """

    mean: Tree
    diag: Tree
    factor: Tree


def _check_state(state: LowRankGaussianState) -> int:
    """Validate the structure; return the rank ``R``."""
    if not isinstance(state, LowRankGaussianState):
        raise TypeError(f"state must be a LowRankGaussianState, got {type(state).__name__}")
    check_same_structure(state.mean, state.diag, "state.diag")
    check_same_structure(state.mean, state.factor, "state.factor", leading=1)
    ranks = {f.shape[0] for f in optree.tree_leaves(state.factor)}
    if len(ranks) > 1:
        raise ValueError(f"state.factor leaves must share one leading rank axis, got sizes {sorted(ranks)}")
    return ranks.pop() if ranks else 0


def _flat(tree: Tree, lead: int = 0) -> Tensor:
    """Leaves flattened (after ``lead`` leading axes) and concatenated on the last axis."""
    leaves = optree.tree_leaves(tree)
    return torch.cat([t.reshape(*t.shape[:lead], -1) for t in leaves], dim=-1)


def _project(factor: Tree, tree: Tree, lead: int) -> Tensor:
    """``U^T x`` for ``x = tree`` (with ``lead`` batch axes): shape ``(*batch, R)``."""
    terms = [
        torch.einsum("r...,b...->br", f, t.reshape(-1, *f.shape[1:])).reshape(*t.shape[:lead], f.shape[0])
        for f, t in zip(optree.tree_leaves(factor), optree.tree_leaves(tree))
    ]
    return torch.stack(terms).sum(0)


def _draw(state: LowRankGaussianState, num_samples: int, generator: torch.Generator | None, differentiable: bool) -> Tree:
    rank = _check_state(state)
    positive_int(num_samples, "num_samples")
    check_generator(generator)
    for name, d in zip(leaf_names(state.diag), optree.tree_leaves(state.diag)):
        if d.numel() and not bool((d.detach() >= 0).all() and torch.isfinite(d.detach()).all()):
            raise ValueError(f"state.diag must be finite and >= 0 (variances), got min {d.min().item()} in leaf '{name}'")
    std = optree.tree_map(torch.sqrt, state.diag)
    draws = diag_normal(state.mean, std, num_samples, generator=generator, differentiable=differentiable)
    if rank == 0:
        return draws
    ref = optree.tree_leaves(state.mean)[0]
    z = torch.empty((num_samples, rank), dtype=ref.dtype, device=ref.device).normal_(generator=generator)

    def add_lowrank(x: Tensor, f: Tensor) -> Tensor:
        return x + torch.tensordot(z, f, dims=1)

    if differentiable:
        return optree.tree_map(add_lowrank, draws, state.factor)
    with torch.no_grad():
        return optree.tree_map(add_lowrank, draws, state.factor)


def sample(state: LowRankGaussianState, num_samples: int, *, generator: torch.Generator | None = None) -> Tree:
    """``num_samples`` draws ``mean + sqrt(d) z1 + U z2``; leaves shaped ``(num_samples, *leaf.shape)``.

    The diagonal noise is drawn first (leaf by leaf, as :func:`funcbnn.tree.diag_normal`),
    then the ``(num_samples, R)`` low-rank noise. Not differentiable: see :func:`rsample`.
    """
    return _draw(state, num_samples, generator, differentiable=False)


def rsample(state: LowRankGaussianState, num_samples: int, *, generator: torch.Generator | None = None) -> Tree:
    """Reparameterised draws, differentiable in ``state``; the same values as :func:`sample`."""
    return _draw(state, num_samples, generator, differentiable=True)


def variance(state: LowRankGaussianState) -> Tree:
    """Marginal variances ``d + sum_r U_r^2``, shaped like the mean."""
    _check_state(state)
    return optree.tree_map(lambda d, f: d + f.square().sum(0), state.diag, state.factor)


def _capacitance(state: LowRankGaussianState) -> tuple[Tree, Tensor]:
    """``(1/d tree, C = I + U^T D^-1 U)``; raises if any ``d <= 0``."""
    check_positive_tree(state.diag, "state.diag (log_prob, entropy and KL need a positive diagonal)")
    inv_d = optree.tree_map(torch.reciprocal, state.diag)
    scaled = optree.tree_map(lambda f, i: f * i, state.factor, inv_d)
    leaves = optree.tree_leaves(state.factor)
    rank = leaves[0].shape[0]
    ref = optree.tree_leaves(state.mean)[0]
    cap = torch.eye(rank, dtype=ref.dtype, device=ref.device)
    if rank:
        cap = cap + _flat(state.factor, 1) @ _flat(scaled, 1).T
    return inv_d, cap


def logdet_covariance(state: LowRankGaussianState) -> Tensor:
    """``log det(diag(d) + U U^T) = sum log d + log det C`` (matrix determinant lemma)."""
    _check_state(state)
    _, cap = _capacitance(state)
    return _flat(state.diag).log().sum() + torch.linalg.slogdet(cap)[1]


def logdet_precision(state: LowRankGaussianState) -> Tensor:
    """``log det Sigma^-1``."""
    return -logdet_covariance(state)


def log_prob(state: LowRankGaussianState, params: Tree) -> Tensor:
    """``log q(params)`` by Woodbury; leading batch dims of ``params`` are kept."""
    _check_state(state)
    first_x, first_m = optree.tree_leaves(params)[0], optree.tree_leaves(state.mean)[0]
    lead = first_x.dim() - first_m.dim()
    check_same_structure(state.mean, params, "params", leading=max(lead, 0))
    inv_d, cap = _capacitance(state)
    diff = optree.tree_map(lambda x, m: x - m, params, state.mean)
    quad = sum(
        (dx.square() * i).reshape(*dx.shape[:lead], -1).sum(-1)
        for dx, i in zip(optree.tree_leaves(diff), optree.tree_leaves(inv_d))
    )
    if cap.shape[0]:
        v = _project(optree.tree_map(lambda f, i: f * i, state.factor, inv_d), diff, lead)  # U^T D^-1 x
        quad = quad - (v * torch.linalg.solve(cap, v.unsqueeze(-1)).squeeze(-1)).sum(-1)
    logdet = _flat(state.diag).log().sum() + torch.linalg.slogdet(cap)[1]
    return -0.5 * (quad + logdet + tree_size(state.mean) * _LOG_2PI)


def entropy(state: LowRankGaussianState) -> Tensor:
    """``P/2 log(2 pi e) + 1/2 log det Sigma``."""
    return 0.5 * tree_size(state.mean) * (_LOG_2PI + 1) + 0.5 * logdet_covariance(state)


def functional_variance(state: LowRankGaussianState, jac: Tree) -> Tensor:
    """``J (diag(d) + U U^T) J^T``, ``(N, O, O)``, for Jacobians ``jac[leaf]`` of shape ``(N, O, *leaf.shape)``."""
    _check_state(state)
    if not isinstance(jac, dict) or not jac:
        raise ValueError("jac must be a non-empty dict {leaf name: (N, O, *leaf.shape) Jacobian}")
    total = None
    for name, J in jac.items():
        Jf = J.reshape(*J.shape[:2], -1)
        cov = torch.einsum("nop,p,nqp->noq", Jf, state.diag[name].reshape(-1), Jf)
        f = state.factor[name].reshape(state.factor[name].shape[0], -1)
        ju = torch.einsum("nop,rp->nor", Jf, f)  # accumulate J U over leaves before the outer product
        total = (cov, ju) if total is None else (total[0] + cov, total[1] + ju)
    cov, ju = total
    return cov + ju @ ju.transpose(1, 2)


def kl(
    state: LowRankGaussianState,
    prior,
    *,
    reduction: Literal["sum", "mean"] = "sum",
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``KL(q || prior)``: analytic for a diagonal Gaussian prior, else Monte-Carlo with ``num_samples`` draws.

    Analytic: ``1/2 [tr(S0^-1 Sigma) + (mu - m0)^T S0^-1 (mu - m0) - P + log det S0 - log det Sigma]``
    with ``tr(S0^-1 Sigma) = sum d/s0^2 + sum_r sum U_r^2/s0^2``.
    """
    _check_state(state)
    check_reduction(reduction)
    if "gaussian" in getattr(prior, "closed_forms", ()):
        p_mean, p_std = prior.moments(state.mean)
        p_var = optree.tree_map(torch.square, p_std)
        var = variance(state)
        terms = [
            ((v + (m - pm).square()) / pv + pv.log()).sum()
            for v, m, pm, pv in zip(*(optree.tree_leaves(t) for t in (var, state.mean, p_mean, p_var)))
        ]
        total = 0.5 * (torch.stack(terms).sum() - tree_size(state.mean) - logdet_covariance(state))
    else:
        if num_samples is None:
            raise ValueError(
                f"KL(lowrank_gaussian || {type(prior).__name__}) has no closed form; "
                "pass num_samples=... for a Monte-Carlo estimate"
            )
        draws = rsample(state, positive_int(num_samples, "num_samples"), generator=generator)
        total = monte_carlo_kl(log_prob(state, draws), prior, draws)
    return total / tree_size(state.mean) if reduction == "mean" else total


class LowRankGaussian(NamedTuple):
    """The low-rank-plus-diagonal Gaussian family (see the module docstring)."""

    init: Callable[..., LowRankGaussianState]
    sample: Callable[..., Tree]
    kl: Callable[..., Tensor]
    rsample: Callable[..., Tree] = rsample
    log_prob: Callable[..., Tensor] = log_prob
    entropy: Callable[..., Tensor] = entropy
    mean: Callable[..., Tree] = lambda state: state.mean
    variance: Callable[..., Tree] = variance
    logdet_precision: Callable[..., Tensor] = logdet_precision
    functional_variance: Callable[..., Tensor] = functional_variance


def lowrank_gaussian(init_std: float = 1e-3, rank: int = 0) -> LowRankGaussian:
    """Build the low-rank-plus-diagonal Gaussian family.

    Parameters
    ----------
    init_std : float, default 1e-3
        ``init`` gives ``d = init_std^2`` everywhere.
    rank : int, default 0
        Columns of ``U`` that ``init`` allocates (zeros, so the init state is
        isotropic); SWAG states come from :func:`funcbnn.swag.posterior` instead.

    Examples
    --------
    >>> post = lowrank_gaussian(init_std=0.1, rank=2)
    >>> state = post.init({"w": torch.zeros(3, 2)})
    >>> post.sample(state, 5, generator=torch.Generator().manual_seed(0))["w"].shape
    torch.Size([5, 3, 2])
    """
    std = positive_float(init_std, "init_std")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got {rank!r}")

    def init(params: Tree, *, generator: torch.Generator | None = None) -> LowRankGaussianState:
        """Isotropic state centred on ``params`` (``d = init_std^2``, ``U = 0``)."""
        leaves = optree.tree_leaves(params)
        if not leaves or not all(isinstance(t, Tensor) and t.is_floating_point() for t in leaves):
            raise TypeError("params must be a non-empty tree of floating-point tensors")
        check_generator(generator)
        check_finite(params, "params", context="post.init needs finite parameters to centre the posterior on")
        return LowRankGaussianState(
            mean=optree.tree_map(lambda t: t.detach().clone(), params),
            diag=optree.tree_map(lambda t: torch.full_like(t, std * std), params),
            factor=optree.tree_map(lambda t: t.new_zeros((rank, *t.shape)), params),
        )

    return LowRankGaussian(init=init, sample=sample, kl=kl)
