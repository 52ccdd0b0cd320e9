"""The Laplace log marginal likelihood and hyperparameter tuning by maximising it.

Following Immer et al. 2021 ("Scalable Marginal Likelihood Estimation for Model
Selection in Deep Learning") and laplace-torch (Daxberger et al. 2021):

``log p(D) ~ log p(D | theta) / T - 1/2 (log det P - log det P0 + (theta - m0)^T P0 (theta - m0))``

at the MAP ``theta``, with ``P`` the posterior precision (its log-determinant
from :func:`funcbnn.laplace.state.logdet_precision`, i.e. the structure's
family), ``P0`` the diagonal prior precision, ``m0`` the prior mean and ``T``
the likelihood temperature (laplace-torch tempers the data term, not the
Gaussian normaliser). Under Gaussian noise the data term is rescaled from the
unit-noise loss the fit stored, so ``sigma`` is tunable too. The result is
differentiable in every hyperparameter, which :func:`tune` optimises.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._validation import positive_float, positive_int
from ..likelihoods import Likelihood
from .state import LaplaceState, hyperparameters, leafwise, logdet_precision, prior_mean_of

__all__ = ["log_marglik", "tune", "PRIOR_STRUCTURES", "initial_prior_precision"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _log_likelihood(state: LaplaceState, lik: Likelihood, sd: Tensor, temp: Tensor) -> Tensor:
    if lik.sigma is None:  # no observation noise: the stored loss is the NLL itself
        return -state.loss / temp
    # The stored loss is at noise std 1: 0.5 SSE + K/2 log(2 pi); rescale the SSE by sigma^-2.
    k = state.num_outputs.to(sd.dtype)
    half_sse = state.loss - k * _HALF_LOG_2PI
    return -half_sse / (sd**2 * temp) - k * torch.log(sd) - k * _HALF_LOG_2PI


def log_marglik(
    state: LaplaceState, lik: Likelihood, prior_precision: Any = None, sigma: Any = None, temperature: Any = None
) -> Tensor:
    """Laplace log marginal likelihood at the given (or the state's) hyperparameters.

    Parameters
    ----------
    state : LaplaceState
    lik : Likelihood
        The likelihood the state was fitted with.
    prior_precision : number or Tensor, optional
        A scalar (number, 0-d or shape-``(1,)`` tensor), one value per leaf or one per parameter.
    sigma : number or Tensor, optional
        Observation noise std (number, 0-d or shape-``(1,)`` tensor).
    temperature : number or Tensor, optional
        Likelihood temperature (default: the state's).

    Returns
    -------
    Tensor
        0-d, differentiable in tensor hyperparameters.
    """
    pp, sd, temp = hyperparameters(state, prior_precision, sigma, temperature)
    logdet_post = logdet_precision(state, pp, sd, temp)
    prior = leafwise(pp, state.mean)
    centre = leafwise(prior_mean_of(state), state.mean)
    logdet_prior, scatter = 0, 0
    for k, m in state.mean.items():
        p = prior[k]
        logdet_prior = logdet_prior + (torch.log(p) * m.numel() if p.numel() == 1 else torch.log(p).sum())
        scatter = scatter + (p * (m - centre[k]).square()).sum()
    return _log_likelihood(state, lik, sd, temp) - 0.5 * (logdet_post - logdet_prior + scatter)


PRIOR_STRUCTURES: tuple[str, ...] = ("scalar", "layerwise", "diag")
"""laplace-torch's prior structures: one prior precision, one per leaf ("layer"), one per parameter."""


def initial_prior_precision(value: Tensor, mean: dict[str, Tensor], prior_structure: str) -> Tensor:
    """``value`` (0-d, per leaf or per parameter) expanded to ``prior_structure``'s shape.

    A scalar becomes ``(L,)`` for ``"layerwise"`` and ``(P,)`` for ``"diag"``; a
    per-leaf value becomes ``(P,)`` for ``"diag"``. Asking for fewer values than
    ``value`` holds (e.g. ``"scalar"`` from a per-leaf vector) is an error.
    """
    if prior_structure not in PRIOR_STRUCTURES:
        raise ValueError(f"prior_structure must be one of {list(PRIOR_STRUCTURES)}, got {prior_structure!r}")
    names = list(mean)
    value = value.detach()
    if prior_structure == "scalar":
        if value.dim() != 0:
            raise ValueError(f"prior_structure='scalar' needs a scalar initial prior precision, got shape {tuple(value.shape)}")
        return value
    if prior_structure == "layerwise":
        if value.dim() == 0:
            return value.expand(len(names)).clone()
        if value.numel() == len(names):
            return value.clone()
        raise ValueError("prior_structure='layerwise' cannot start from a per-parameter prior precision")
    leaves = leafwise(value, mean)
    return torch.cat([leaves[k].expand(mean[k].shape).reshape(-1) for k in names])


def tune(
    state: LaplaceState,
    lik: Likelihood,
    *,
    per_leaf: bool = False,
    prior_structure: str | None = None,
    tune_sigma: bool | None = None,
    steps: int = 200,
    lr: float = 0.1,
) -> LaplaceState:
    """Maximise :func:`log_marglik` over the prior precision and, under Gaussian noise, ``sigma``.

    Adam on the hyperparameters' logarithms (so they stay positive), as
    laplace-torch's ``optimize_prior_precision(method="marglik")``. The
    temperature and the prior mean stay as the state has them.

    Parameters
    ----------
    state : LaplaceState
    lik : Likelihood
    per_leaf : bool
        One prior precision per leaf instead of one shared (``prior_structure="layerwise"``).
    prior_structure : {"scalar", "layerwise", "diag"}, optional
        laplace-torch's names: one shared value, one per leaf, one per
        parameter (not with ``"kron"``). By default ``"layerwise"`` if
        ``per_leaf``, else the state's own shape.
    tune_sigma : bool, optional
        Tune the noise std too; by default whenever the likelihood has one.
    steps : int
        Adam steps.
    lr : float
        Adam learning rate.

    Returns
    -------
    LaplaceState
        A new state with the tuned (detached) hyperparameters.

    Raises
    ------
    ValueError
        If ``tune_sigma`` is asked of a likelihood without observation noise, or
        for an unknown ``prior_structure``.
    """
    positive_int(steps, "steps")
    positive_float(lr, "lr")
    tune_sigma = (lik.sigma is not None) if tune_sigma is None else tune_sigma
    if tune_sigma and lik.sigma is None:
        raise ValueError(f"tune_sigma applies to the 'gaussian' likelihood only (a fixed noise std), not {lik.name!r}")
    if prior_structure is None and per_leaf:
        prior_structure = "layerwise"
    init_pp = state.prior_precision
    if prior_structure is not None:
        init_pp = initial_prior_precision(init_pp, state.mean, prior_structure)
    log_pp = init_pp.detach().log().clone().requires_grad_(True)
    log_sd = state.sigma.detach().log().clone().requires_grad_(tune_sigma)
    opt = torch.optim.Adam([log_pp] + ([log_sd] if tune_sigma else []), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = -log_marglik(state, lik, log_pp.exp(), log_sd.exp())
        loss.backward()
        opt.step()
    return state._replace(prior_precision=log_pp.detach().exp(), sigma=log_sd.detach().exp())
