"""Mean-field (diagonal) Gaussian over a parameter tree.

``q(w) = prod_i N(w_i; mu_i, sigma_i^2)`` with ``sigma = softplus(rho)``, the
parameterisation of Bayes-by-Backprop (Blundell et al. 2015): ``rho`` is
unconstrained, so any ``torch.optim`` optimiser can train the state.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Literal, NamedTuple

import optree
import torch
import torch.nn.functional as F
from torch import Tensor

from .._validation import check_positive_tree, positive_float, positive_int
from ..priors import GaussianPrior
from ..tree import Tree, check_same_structure, diag_normal, tree_size
from ..checks import check_finite, check_generator
from ._kl import check_reduction, monte_carlo_kl

__all__ = ["DiagGaussianState", "DiagGaussian", "diag_gaussian", "inverse_softplus", "moments_and_kl", "sample_and_kl"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class DiagGaussianState(NamedTuple):
    """State of a diagonal Gaussian: two trees with the parameters' structure."""

    mean: Tree
    rho: Tree


# A saved state loads with torch.load's default weights_only=True, no safe_globals from the user.
torch.serialization.add_safe_globals([DiagGaussianState])


def inverse_softplus(std: Tensor) -> Tensor:
    """``rho`` with ``softplus(rho) == std``, stable for small and large ``std``."""
    return std + torch.log(-torch.expm1(-std))


def _std(state: DiagGaussianState) -> Tree:
    return optree.tree_map(F.softplus, state.rho)


def _check_state(state: DiagGaussianState) -> None:
    if not isinstance(state, DiagGaussianState):
        raise TypeError(f"state must be a DiagGaussianState, got {type(state).__name__}")
    check_same_structure(state.mean, state.rho, "state.rho")


def sample(
    state: DiagGaussianState, num_samples: int, *, generator: torch.Generator | None = None
) -> Tree:
    """Draw ``num_samples`` weight trees, each leaf shaped ``(num_samples, *leaf.shape)``.

    Not differentiable (use :func:`rsample` for that): the noise is scaled in
    place, which is about 1.5x faster than ``mean + std * eps``.
    """
    _check_state(state)
    positive_int(num_samples, "num_samples")
    with torch.no_grad():
        return diag_normal(state.mean, _std(state), num_samples, generator=generator, differentiable=False)


def rsample(
    state: DiagGaussianState, num_samples: int, *, generator: torch.Generator | None = None
) -> Tree:
    """Reparameterised draws ``mean + softplus(rho) * eps``, differentiable w.r.t. ``state``.

    For the same generator state it returns the same values as :func:`sample`.
    """
    _check_state(state)
    return diag_normal(state.mean, _std(state), positive_int(num_samples, "num_samples"), generator=generator)


def log_prob(state: DiagGaussianState, params: Tree) -> Tensor:
    """``log q(params)``; leaves may carry leading batch dims, which the result keeps."""
    _check_state(state)

    def leaf(x: Tensor, m: Tensor, rho: Tensor) -> Tensor:
        lp = -0.5 * ((x - m) / F.softplus(rho)) ** 2 - torch.log(F.softplus(rho)) - _HALF_LOG_2PI
        return lp.sum(dim=tuple(range(x.dim() - m.dim(), x.dim()))) if m.dim() else lp

    first_x, first_m = optree.tree_leaves(params)[:1], optree.tree_leaves(state.mean)[:1]
    lead = first_x[0].dim() - first_m[0].dim() if first_x and first_m else 0
    check_same_structure(state.mean, params, "params", leading=max(lead, 0))
    terms = optree.tree_leaves(optree.tree_map(leaf, params, state.mean, state.rho))
    return torch.stack(terms).sum(0)


def entropy(state: DiagGaussianState) -> Tensor:
    """Differential entropy ``sum_i 0.5 log(2 pi e sigma_i^2)``."""
    _check_state(state)
    terms = optree.tree_leaves(
        optree.tree_map(lambda rho: (torch.log(F.softplus(rho)) + _HALF_LOG_2PI + 0.5).sum(), state.rho)
    )
    return torch.stack(terms).sum()


def kl(
    state: DiagGaussianState,
    prior,
    *,
    reduction: Literal["sum", "mean"] = "sum",
    method: Literal["auto", "analytic", "mc"] = "auto",
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``KL(q || prior)``, differentiable w.r.t. ``state``.

    Parameters
    ----------
    state : DiagGaussianState
    prior
        Any prior with ``log_prob``; one offering the ``"gaussian"`` closed form
        (``funcbnn.priors.gaussian``) gets the analytic KL.
    reduction : {"sum", "mean"}
        ``"mean"`` divides the total by the number of weights (torchbayesian's
        convention).
    method : {"auto", "analytic", "mc"}
        ``"auto"`` is analytic where the pair has a closed form and Monte-Carlo
        otherwise; ``"mc"`` forces Monte-Carlo.
    num_samples : int, optional
        Draws for the Monte-Carlo estimate ``mean_s [log q(w_s) - log p(w_s)]``
        (reparameterised). Required whenever Monte Carlo is used.
    generator : torch.Generator, optional
        Randomness of the Monte-Carlo draws.

    Raises
    ------
    ValueError
        If no closed form exists and ``num_samples`` is not given, or the
        analytic form is requested for a prior without one.
    """
    _check_state(state)
    check_reduction(reduction)
    analytic_ok = "gaussian" in getattr(prior, "closed_forms", ())
    if method not in ("auto", "analytic", "mc"):
        raise ValueError(f"method must be 'auto', 'analytic' or 'mc', got {method!r}")
    if method == "analytic" and not analytic_ok:
        raise ValueError(f"KL(diag_gaussian || {type(prior).__name__}) has no closed form; use method='mc'")
    if method == "analytic" or (method == "auto" and analytic_ok):
        mean = optree.tree_leaves(state.mean)
        std = [F.softplus(r) for r in optree.tree_leaves(state.rho)]
        total = _analytic_kl(mean, std, prior, state.mean)
    else:
        if num_samples is None:
            raise ValueError(
                f"KL(diag_gaussian || {type(prior).__name__}) has no closed form; "
                "pass num_samples=... for a Monte-Carlo estimate"
            )
        draws = rsample(state, num_samples, generator=generator)
        total = monte_carlo_kl(log_prob(state, draws), prior, draws)
    return total / tree_size(state.mean) if reduction == "mean" else total


def sample_and_kl(
    state: DiagGaussianState,
    prior,
    num_samples: int | None,
    *,
    generator: torch.Generator | None = None,
    kl_samples: int | None = None,
) -> tuple[Tree, Tensor]:
    """``rsample(state, num_samples)`` and ``kl(state, prior)`` in one pass: one softplus per leaf for both.

    The fused capability that :mod:`funcbnn.vi` asks for first (``sample_and_kl``
    in :data:`funcbnn.families.base.CAPABILITIES`). The numbers are those of the
    two calls in that order from the same generator: the draws, then, where the
    (family, prior) pair has no closed form, a Monte-Carlo KL over
    ``kl_samples`` further draws, exactly as :func:`kl` computes it.

    Parameters
    ----------
    state : DiagGaussianState
    prior
        As in :func:`kl`.
    num_samples : int or None
        Draws, every leaf shaped ``(num_samples, *leaf.shape)``; ``None`` gives
        one draw without the sample axis (the numbers of ``num_samples=1``,
        squeezed), which spares the backward pass a reduction over a size-1 axis.
    generator : torch.Generator, optional
        Source of the draws and of any Monte-Carlo KL draws.
    kl_samples : int, optional
        Draws for the Monte-Carlo KL; required only when there is no closed form.

    Returns
    -------
    (Tree, Tensor)
        The reparameterised draws (differentiable in ``state``) and the summed KL.

    Examples
    --------
    >>> import funcbnn
    >>> post = diag_gaussian(init_std=0.1)
    >>> state = post.init({"w": torch.zeros(3, 2)})
    >>> draws, kl_value = sample_and_kl(state, funcbnn.priors.gaussian(1.0), 4)
    >>> draws["w"].shape, kl_value.shape
    (torch.Size([4, 3, 2]), torch.Size([]))
    """
    mean, spec = optree.tree_flatten(state.mean)
    rho, rho_spec = optree.tree_flatten(state.rho)
    # The cheap structure check of the training hot path; the detailed one explains a failure.
    if not isinstance(state, DiagGaussianState) or rho_spec != spec or any(
        not isinstance(m, Tensor) or not isinstance(r, Tensor) or m.shape != r.shape for m, r in zip(mean, rho)
    ):
        _check_state(state)
    if num_samples is not None:
        positive_int(num_samples, "num_samples")
    std = [F.softplus(r) for r in rho]
    draws = diag_normal(state.mean, optree.tree_unflatten(spec, std), num_samples, generator=generator)
    if "gaussian" in getattr(prior, "closed_forms", ()):
        return draws, _analytic_kl(mean, std, prior, state.mean)
    if kl_samples is None:
        raise ValueError(
            f"KL(diag_gaussian || {type(prior).__name__}) has no closed form; "
            "pass kl_samples=... for a Monte-Carlo estimate"
        )
    return draws, kl(state, prior, num_samples=kl_samples, generator=generator)


def moments_and_kl(state: DiagGaussianState, prior) -> tuple[Tree, Tree, Tensor | None]:
    """The mean and std trees and, where it has a closed form, ``kl(state, prior)``: one softplus per leaf.

    What local reparameterisation (:mod:`funcbnn.local_reparam`) needs from a
    diagonal family, in one pass: the std feeds both the sampled
    pre-activations and the analytic KL. Where the (family, prior) pair has no
    closed form the KL is ``None``: call :func:`kl` after the forward, so its
    Monte-Carlo draws come after the forward's noise, as in every other VI path.

    Examples
    --------
    >>> import funcbnn
    >>> state = diag_gaussian(init_std=0.1).init({"w": torch.zeros(3, 2)})
    >>> mean, std, kl_value = moments_and_kl(state, funcbnn.priors.gaussian(1.0))
    >>> round(std["w"][0, 0].item(), 6), kl_value.shape
    (0.1, torch.Size([]))
    """
    mean, spec = optree.tree_flatten(state.mean)
    rho, rho_spec = optree.tree_flatten(state.rho)
    if not isinstance(state, DiagGaussianState) or rho_spec != spec or any(
        not isinstance(m, Tensor) or not isinstance(r, Tensor) or m.shape != r.shape for m, r in zip(mean, rho)
    ):
        _check_state(state)
    std = [F.softplus(r) for r in rho]
    closed = "gaussian" in getattr(prior, "closed_forms", ())
    kl_value = _analytic_kl(mean, std, prior, state.mean) if closed else None
    return state.mean, optree.tree_unflatten(spec, std), kl_value


def _analytic_kl(mean: list[Tensor], std: list[Tensor], prior, like: Tree) -> Tensor:
    """``KL(N(mean, std^2) || prior)`` summed over the flattened leaves, for a prior with the
    Gaussian closed form.

    A scalar prior ``N(m0, s0^2)`` (the common case) never builds prior-sized tensors:
    ``sum(std^2 + (mean - m0)^2) / (2 s0^2) - sum(log std) + P (log s0 - 1/2)`` with
    the sums of squares as dot products; other Gaussian priors go leaf by leaf.
    """
    if isinstance(prior, GaussianPrior) and isinstance(prior.std, numbers.Real) and isinstance(prior.mean, numbers.Real):
        s0, m0 = float(prior.std), float(prior.mean)
        squares, logs, count = [], [], 0
        for m, s in zip(mean, std):
            s_flat = s.reshape(-1)
            d_flat = (m if m0 == 0.0 else m - m0).reshape(-1)
            squares.append(torch.dot(s_flat, s_flat) + torch.dot(d_flat, d_flat))
            logs.append(torch.log(s).sum())
            count += m.numel()
        total_sq = squares[0] if len(squares) == 1 else torch.stack(squares).sum()
        total_log = logs[0] if len(logs) == 1 else torch.stack(logs).sum()
        return total_sq * (0.5 / (s0 * s0)) - total_log + count * (math.log(s0) - 0.5)
    p_mean, p_std = prior.moments(like)
    terms = []
    for m, s, pm, ps in zip(mean, std, optree.tree_leaves(p_mean), optree.tree_leaves(p_std)):
        ratio = s / ps
        terms.append((0.5 * (ratio * ratio + ((m - pm) / ps) ** 2) - 0.5 - torch.log(ratio)).sum())
    return torch.stack(terms).sum()


def variance(state: DiagGaussianState) -> Tree:
    """Marginal variances ``softplus(rho)^2``, shaped like the mean."""
    _check_state(state)
    return optree.tree_map(lambda rho: F.softplus(rho).square(), state.rho)


def logdet_precision(state: DiagGaussianState) -> Tensor:
    """``log det Sigma^-1 = -2 sum_i log sigma_i``."""
    _check_state(state)
    return -2 * torch.stack([torch.log(F.softplus(r)).sum() for r in optree.tree_leaves(state.rho)]).sum()


def functional_variance(state: DiagGaussianState, jac: Tree) -> Tensor:
    """``J diag(sigma^2) J^T``, ``(N, O, O)``, for per-leaf Jacobians ``(N, O, *leaf.shape)``.

    ``jac`` may cover a subset of the state's leaves only where the others are
    held fixed by the caller; every leaf of ``jac`` must be in the state.
    """
    _check_state(state)
    var = variance(state)
    total = None
    for name, J in (jac.items() if isinstance(jac, dict) else []):
        Jf = J.reshape(*J.shape[:2], -1)
        cov = torch.einsum("nop,p,nqp->noq", Jf, var[name].reshape(-1), Jf)
        total = cov if total is None else total + cov
    if total is None:
        raise ValueError("jac must be a non-empty dict {leaf name: (N, O, *leaf.shape) Jacobian}")
    return total


class DiagGaussian(NamedTuple):
    """The diagonal-Gaussian posterior: pure functions over a :class:`DiagGaussianState`.

    ``init``, ``sample`` and ``kl`` form the posterior protocol; the rest are the
    capabilities this family declares (:mod:`funcbnn.families.base`), among
    them the fused ``sample_and_kl`` that VI uses, and extras of its own:
    ``std``, ``from_moments`` and ``moments_and_kl`` (the moments and KL that
    local reparameterisation needs, sharing one softplus).
    """

    init: Callable[..., DiagGaussianState]
    sample: Callable[..., Tree]
    kl: Callable[..., Tensor]
    rsample: Callable[..., Tree]
    log_prob: Callable[[DiagGaussianState, Tree], Tensor]
    entropy: Callable[[DiagGaussianState], Tensor]
    mean: Callable[[DiagGaussianState], Tree]
    std: Callable[[DiagGaussianState], Tree]
    from_moments: Callable[[Tree, Tree], DiagGaussianState]
    variance: Callable[[DiagGaussianState], Tree] = variance
    logdet_precision: Callable[[DiagGaussianState], Tensor] = logdet_precision
    functional_variance: Callable[..., Tensor] = functional_variance
    sample_and_kl: Callable[..., tuple[Tree, Tensor]] = sample_and_kl
    moments_and_kl: Callable[..., tuple[Tree, Tree, Tensor | None]] = moments_and_kl


def from_moments(mean: Tree, std: Tree | float) -> DiagGaussianState:
    """State with the given mean tree and std (a positive number or a tree like ``mean``)."""
    if isinstance(std, numbers.Real):
        std = optree.tree_map(lambda m: torch.full_like(m, positive_float(std, "std")), mean)
    check_same_structure(mean, std, "std")
    check_positive_tree(std, "std")
    return DiagGaussianState(
        mean=optree.tree_map(lambda m: m.detach().clone(), mean),
        rho=optree.tree_map(lambda s: inverse_softplus(s.detach()), std),
    )


def diag_gaussian(
    init_std: float | Tree = 1e-3, mean_init: Literal["params", "fresh"] = "params"
) -> DiagGaussian:
    """Build the diagonal-Gaussian posterior family.

    Parameters
    ----------
    init_std : float or tree, default 1e-3
        Std of the state that ``init`` returns (positive).
    mean_init : {"params", "fresh"}
        ``"params"`` centres the mean on the parameters passed to ``init``
        (pretrained-centred posterior); ``"fresh"`` draws a new mean
        ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` per leaf, with ``fan_in`` the
        product of the leaf's trailing dims (its size for 0-d and 1-d leaves).

    Examples
    --------
    >>> post = diag_gaussian(init_std=0.1)
    >>> state = post.init({"w": torch.zeros(3, 2), "b": torch.zeros(3)})
    >>> post.sample(state, 8, generator=torch.Generator().manual_seed(0))["w"].shape
    torch.Size([8, 3, 2])
    """
    if isinstance(init_std, numbers.Real):
        positive_float(init_std, "init_std")
    else:
        check_positive_tree(init_std, "init_std")
    if mean_init not in ("params", "fresh"):
        raise ValueError(f"mean_init must be 'params' or 'fresh', got {mean_init!r}")

    def init(params: Tree, *, generator: torch.Generator | None = None) -> DiagGaussianState:
        """State centred on ``params`` (or freshly drawn) with std ``init_std``."""
        leaves = optree.tree_leaves(params)
        if not leaves:
            raise ValueError("params must contain at least one tensor leaf")
        for leaf in leaves:
            if not isinstance(leaf, Tensor) or not leaf.is_floating_point():
                raise TypeError(f"params leaves must be floating-point tensors, got {leaf!r:.60}")
        check_generator(generator)
        check_finite(params, "params", context="post.init needs finite parameters to centre the posterior on")
        if mean_init == "fresh":

            def fresh(t: Tensor) -> Tensor:
                fan_in = math.prod(t.shape[1:]) if t.dim() >= 2 else max(t.numel(), 1)
                bound = 1.0 / math.sqrt(fan_in)
                u = torch.empty_like(t).uniform_(generator=generator)
                return (2 * u - 1) * bound

            mean = optree.tree_map(fresh, params)
        else:
            mean = params
        return from_moments(mean, init_std)

    return DiagGaussian(
        init=init,
        sample=sample,
        kl=kl,
        rsample=rsample,
        log_prob=log_prob,
        entropy=entropy,
        mean=lambda state: state.mean,
        std=_std,
        from_moments=from_moments,
    )
