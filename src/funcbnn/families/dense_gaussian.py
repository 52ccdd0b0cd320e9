"""Dense (full-covariance) Gaussian over a parameter tree, for a last layer or a small subset.

``q(theta) = N(mean, P^-1)`` with the precision stored through its lower
Cholesky factor, ``P = L L^T``: the form a Laplace posterior arrives in
(Daxberger et al. 2021, "Laplace Redux", full Hessian over a subset), and the
one every operation wants. With ``theta`` flattened by
:func:`funcbnn.tree.ravel` (optree's leaf order; sorted keys for a dict):

- sampling is one triangular solve, ``theta = mean + L^-T eps``;
- ``log det P = 2 sum log diag L``;
- the linearised output covariance is ``(L^-1 J^T)^T (L^-1 J^T)``.

Memory is ``P^2`` numbers, so this is for a few thousand weights at most.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Literal, NamedTuple

import optree
import torch
from torch import Tensor

from .._validation import check_positive_tree, positive_float, positive_int
from ..tree import Tree, check_same_structure, ravel, tree_size
from ..checks import check_finite, check_generator
from ._kl import check_reduction, monte_carlo_kl

__all__ = ["DenseGaussianState", "DenseGaussian", "dense_gaussian", "from_precision"]

_LOG_2PI = math.log(2 * math.pi)


class DenseGaussianState(NamedTuple):
    """State of a dense Gaussian (a pytree of tensors).

    Attributes
    ----------
    mean : Tree
        The centre (for a Laplace posterior, the MAP of the subset).
    precision_tril : Tensor
        ``(P, P)`` lower-triangular ``L`` with precision ``L L^T``, rows and
        columns in the order of ``funcbnn.tree.ravel(mean)``.
    """

    mean: Tree
    precision_tril: Tensor


def _check_state(state: Any) -> int:
    if not isinstance(state, DenseGaussianState):
        raise TypeError(f"state must be a DenseGaussianState, got {type(state).__name__}")
    size = tree_size(state.mean)
    L = state.precision_tril
    if not isinstance(L, Tensor) or L.shape != (size, size):
        shape = tuple(L.shape) if isinstance(L, Tensor) else type(L).__name__
        raise ValueError(f"state.precision_tril must be ({size}, {size}) for a mean of {size} numbers, got {shape}")
    return size


def _flatten(tree: Tree, like: Tree, lead: int) -> Tensor:
    """Leaves with ``lead`` leading axes, flattened to ``(*lead_shape, P)`` in ``ravel(like)`` order."""
    leaves = optree.tree_leaves(tree)
    lead_shape = leaves[0].shape[:lead]
    batched = optree.tree_map(lambda t: t.reshape(-1, *t.shape[lead:]), tree)
    flat = torch.func.vmap(lambda t: ravel(t)[0])(batched) if lead else ravel(tree)[0][None]
    return flat.reshape(*lead_shape, -1)


def _unflatten(flat: Tensor, like: Tree) -> Tree:
    """``(S, P)`` rows back into a tree of ``(S, *leaf.shape)`` leaves."""
    return torch.func.vmap(ravel(like)[1])(flat)


def _inverse_tril(state: DenseGaussianState) -> Tensor:
    L = state.precision_tril
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    return torch.linalg.solve_triangular(L, eye, upper=False)


def rsample(state: DenseGaussianState, num_samples: int, *, generator: torch.Generator | None = None) -> Tree:
    """Draws ``mean + L^-T eps`` (covariance ``(L L^T)^-1``), each leaf ``(num_samples, *leaf.shape)``.

    Differentiable in the state; for the same generator state the same values as :func:`sample`.
    """
    size = _check_state(state)
    num_samples = positive_int(num_samples, "num_samples")
    check_generator(generator)
    L = state.precision_tril
    eps = torch.empty((size, num_samples), dtype=L.dtype, device=L.device).normal_(generator=generator)
    delta = torch.linalg.solve_triangular(L.T, eps, upper=True).T  # (S, P)
    return _unflatten(ravel(state.mean)[0] + delta, state.mean)


def sample(state: DenseGaussianState, num_samples: int, *, generator: torch.Generator | None = None) -> Tree:
    """Draws as :func:`rsample`, without a graph."""
    with torch.no_grad():
        return rsample(state, num_samples, generator=generator)


def logdet_precision(state: DenseGaussianState) -> Tensor:
    """``log det P = 2 sum log diag L``."""
    _check_state(state)
    return 2 * torch.diagonal(state.precision_tril).log().sum()


def _variance_flat(state: DenseGaussianState) -> Tensor:
    # diag(P^-1) = diag(L^-T L^-1): the squared column norms of L^-1.
    return _inverse_tril(state).square().sum(0)


def variance(state: DenseGaussianState) -> Tree:
    """Marginal variances ``diag(P^-1)``, shaped like the mean."""
    _check_state(state)
    return ravel(state.mean)[1](_variance_flat(state))


def functional_variance(state: DenseGaussianState, jac: Tree) -> Tensor:
    """``J P^-1 J^T``, ``(N, O, O)``, for per-leaf Jacobians ``(N, O, *leaf.shape)`` (a tree like the mean)."""
    _check_state(state)
    check_same_structure(state.mean, jac, "jac", leading=2)
    J = _flatten(jac, state.mean, 2)  # (N, O, P)
    n, o, p = J.shape
    # One solve for all N*O rows: a batched solve would broadcast L to (N, P, P).
    half = torch.linalg.solve_triangular(state.precision_tril, J.reshape(n * o, p).T, upper=False)  # L^-1 J^T
    half = half.T.reshape(n, o, p)
    return half @ half.transpose(1, 2)


def log_prob(state: DenseGaussianState, params: Tree) -> Tensor:
    """``log q(params)``; leaves may carry leading batch dims, which the result keeps."""
    size = _check_state(state)
    first_x, first_m = optree.tree_leaves(params)[:1], optree.tree_leaves(state.mean)[:1]
    lead = max(first_x[0].dim() - first_m[0].dim(), 0) if first_x and first_m else 0
    check_same_structure(state.mean, params, "params", leading=lead)
    delta = _flatten(params, state.mean, lead) - ravel(state.mean)[0]
    z = delta @ state.precision_tril  # (L^T delta)^T
    return -0.5 * z.square().sum(-1) + 0.5 * logdet_precision(state) - 0.5 * size * _LOG_2PI


def entropy(state: DenseGaussianState) -> Tensor:
    """Differential entropy ``P/2 (1 + log 2 pi) - 1/2 log det P``."""
    size = _check_state(state)
    return 0.5 * size * (1 + _LOG_2PI) - 0.5 * logdet_precision(state)


def kl(
    state: DenseGaussianState,
    prior: Any,
    *,
    reduction: Literal["sum", "mean"] = "sum",
    method: Literal["auto", "analytic", "mc"] = "auto",
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``KL(q || prior)``, differentiable in the state.

    Against a prior with the ``"gaussian"`` closed form (mean ``m0``, per-element
    variances ``v0``):
    ``1/2 (tr(V0^-1 Sigma) + (mu - m0)^T V0^-1 (mu - m0) - P + log det V0 + log det P)``;
    otherwise Monte Carlo with ``num_samples`` reparameterised draws. Arguments
    as in :func:`funcbnn.families.diag_gaussian.kl`.
    """
    size = _check_state(state)
    check_reduction(reduction)
    if method not in ("auto", "analytic", "mc"):
        raise ValueError(f"method must be 'auto', 'analytic' or 'mc', got {method!r}")
    analytic_ok = "gaussian" in getattr(prior, "closed_forms", ())
    if method == "analytic" and not analytic_ok:
        raise ValueError(f"KL(dense_gaussian || {type(prior).__name__}) has no closed form; use method='mc'")
    if method == "analytic" or (method == "auto" and analytic_ok):
        p_mean, p_std = prior.moments(state.mean)
        v0 = ravel(p_std)[0].square()
        diff = ravel(state.mean)[0] - ravel(p_mean)[0]
        quad = ((_variance_flat(state) + diff.square()) / v0).sum()
        total = 0.5 * (quad - size + v0.log().sum() + logdet_precision(state))
    else:
        if num_samples is None:
            raise ValueError(
                f"KL(dense_gaussian || {type(prior).__name__}) has no closed form; "
                "pass num_samples=... for a Monte-Carlo estimate"
            )
        draws = rsample(state, num_samples, generator=generator)
        total = monte_carlo_kl(log_prob(state, draws), prior, draws)
    return total / size if reduction == "mean" else total


def _check_mean(mean: Tree) -> None:
    leaves = optree.tree_leaves(mean)
    if not leaves:
        raise ValueError("mean must contain at least one tensor leaf")
    for leaf in leaves:
        if not isinstance(leaf, Tensor) or not leaf.is_floating_point():
            raise TypeError(f"mean leaves must be floating-point tensors, got {leaf!r:.60}")


def from_precision(mean: Tree, precision: Tensor) -> DenseGaussianState:
    """State ``N(mean, precision^-1)`` from a dense symmetric positive-definite precision.

    ``precision`` is ``(P, P)`` in ``funcbnn.tree.ravel(mean)`` order. Its
    Cholesky factor keeps the graph, so a state built from a differentiable
    precision is differentiable too.

    Raises
    ------
    ValueError
        If ``precision`` has the wrong shape or is not positive definite.

    Examples
    --------
    >>> state = from_precision({"w": torch.zeros(2)}, torch.tensor([[2.0, 0.5], [0.5, 1.0]]))
    >>> state.precision_tril @ state.precision_tril.T
    tensor([[2.0000, 0.5000],
            [0.5000, 1.0000]])
    """
    _check_mean(mean)
    size = tree_size(mean)
    if not isinstance(precision, Tensor) or precision.shape != (size, size):
        shape = tuple(precision.shape) if isinstance(precision, Tensor) else type(precision).__name__
        raise ValueError(f"precision must be ({size}, {size}) for a mean of {size} numbers, got {shape}")
    L, info = torch.linalg.cholesky_ex(precision)
    if int(info) != 0:
        raise ValueError(f"precision must be symmetric positive definite; its Cholesky failed at column {int(info) - 1}")
    return DenseGaussianState(mean=optree.tree_map(lambda m: m.detach().clone(), mean), precision_tril=L)


def from_moments(mean: Tree, std: float | Tree) -> DenseGaussianState:
    """State with the given mean and independent stds (a positive number or a tree like ``mean``)."""
    _check_mean(mean)
    if isinstance(std, numbers.Real):
        std = optree.tree_map(lambda m: torch.full_like(m, positive_float(std, "std")), mean)
    check_same_structure(mean, std, "std")
    check_positive_tree(std, "std")
    return DenseGaussianState(
        mean=optree.tree_map(lambda m: m.detach().clone(), mean),
        precision_tril=torch.diag(ravel(std)[0].detach().reciprocal()),
    )


class DenseGaussian(NamedTuple):
    """The dense Gaussian family: pure functions over a :class:`DenseGaussianState`.

    ``init``, ``sample`` and ``kl`` form the posterior protocol; the rest are
    declared capabilities (:mod:`funcbnn.families.base`) and two constructors,
    ``from_precision`` and ``from_moments``.
    """

    init: Callable[..., DenseGaussianState]
    sample: Callable[..., Tree]
    kl: Callable[..., Tensor]
    rsample: Callable[..., Tree] = rsample
    log_prob: Callable[[DenseGaussianState, Tree], Tensor] = log_prob
    entropy: Callable[[DenseGaussianState], Tensor] = entropy
    mean: Callable[[DenseGaussianState], Tree] = lambda state: state.mean
    variance: Callable[[DenseGaussianState], Tree] = variance
    logdet_precision: Callable[[DenseGaussianState], Tensor] = logdet_precision
    functional_variance: Callable[..., Tensor] = functional_variance
    from_precision: Callable[..., DenseGaussianState] = from_precision
    from_moments: Callable[..., DenseGaussianState] = from_moments


def dense_gaussian(init_std: float = 1e-3) -> DenseGaussian:
    """Build the dense Gaussian family.

    States normally come from :func:`funcbnn.laplace.fit` with
    ``structure="full"`` (``la.posterior(state)``) or from :func:`from_precision`;
    ``init`` gives the data-free state ``N(params, init_std^2 I)``.

    Parameters
    ----------
    init_std : float, default 1e-3
        Std of the state that ``init`` returns (positive).

    Examples
    --------
    >>> post = dense_gaussian(init_std=0.1)
    >>> state = post.init({"w": torch.zeros(3, 2), "b": torch.zeros(3)})
    >>> state.precision_tril.shape
    torch.Size([9, 9])
    >>> post.sample(state, 8, generator=torch.Generator().manual_seed(0))["w"].shape
    torch.Size([8, 3, 2])
    """
    positive_float(init_std, "init_std")

    def init(params: Tree, *, generator: torch.Generator | None = None) -> DenseGaussianState:
        """State ``N(params, init_std^2 I)`` (``generator`` is accepted for the protocol and unused)."""
        check_generator(generator)
        check_finite(params, "params", context="post.init needs finite parameters to centre the posterior on")
        return from_moments(params, init_std)

    return DenseGaussian(init=init, sample=sample, kl=kl)
