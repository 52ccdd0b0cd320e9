"""The Laplace log marginal likelihood and hyperparameter tuning by maximising it.

Following Immer et al. 2021 ("Scalable Marginal Likelihood Estimation for Model
Selection in Deep Learning") and laplace-torch (Daxberger et al. 2021):

``log p(D) ~ log p(D | theta) - 1/2 (log det P - log det P0 + theta^T P0 theta)``

at the MAP ``theta``, with ``P`` the posterior precision (its log-determinant
from :func:`funcbnn.laplace.state.logdet_precision`, i.e. the structure's
family) and ``P0`` the
diagonal prior precision. Under Gaussian noise the data term is rescaled from
the unit-noise loss the fit stored, so ``sigma`` is tunable too. The result is
differentiable in both hyperparameters, which :func:`tune` optimises.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._validation import positive_float, positive_int
from ..likelihoods import Likelihood
from .state import LaplaceState, hyperparameters, logdet_precision

__all__ = ["log_marglik", "tune"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _log_likelihood(state: LaplaceState, lik: Likelihood, sd: Tensor) -> Tensor:
    if lik.sigma is None:  # no observation noise: the stored loss is the NLL itself
        return -state.loss
    # The stored loss is at noise std 1: 0.5 SSE + K/2 log(2 pi); rescale the SSE by sigma^-2.
    k = state.num_outputs.to(sd.dtype)
    half_sse = state.loss - k * _HALF_LOG_2PI
    return -half_sse / sd**2 - k * torch.log(sd) - k * _HALF_LOG_2PI


def log_marglik(state: LaplaceState, lik: Likelihood, prior_precision: Any = None, sigma: Any = None) -> Tensor:
    """Laplace log marginal likelihood at the given (or the state's) hyperparameters.

    Parameters
    ----------
    state : LaplaceState
    lik : Likelihood
        The likelihood the state was fitted with.
    prior_precision : number or Tensor, optional
        A scalar (number, 0-d or shape-``(1,)`` tensor) or one value per leaf.
    sigma : number or Tensor, optional
        Observation noise std (number, 0-d or shape-``(1,)`` tensor).

    Returns
    -------
    Tensor
        0-d, differentiable in tensor hyperparameters.
    """
    pp, sd = hyperparameters(state, prior_precision, sigma)
    logdet_post = logdet_precision(state, pp, sd)
    logdet_prior, scatter = 0, 0
    for i, (k, m) in enumerate(state.mean.items()):
        p = pp if pp.dim() == 0 else pp[i]
        logdet_prior = logdet_prior + torch.log(p) * m.numel()
        scatter = scatter + (p * m.square()).sum()
    return _log_likelihood(state, lik, sd) - 0.5 * (logdet_post - logdet_prior + scatter)


def tune(
    state: LaplaceState,
    lik: Likelihood,
    *,
    per_leaf: bool = False,
    tune_sigma: bool | None = None,
    steps: int = 200,
    lr: float = 0.1,
) -> LaplaceState:
    """Maximise :func:`log_marglik` over the prior precision (scalar or per leaf) and, under Gaussian noise, ``sigma``.

    Adam on the hyperparameters' logarithms (so they stay positive), as
    laplace-torch's ``optimize_prior_precision(method="marglik")``.

    Parameters
    ----------
    state : LaplaceState
    lik : Likelihood
    per_leaf : bool
        One prior precision per leaf instead of one shared.
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
        If ``tune_sigma`` is asked of a likelihood without observation noise.
    """
    positive_int(steps, "steps")
    positive_float(lr, "lr")
    tune_sigma = (lik.sigma is not None) if tune_sigma is None else tune_sigma
    if tune_sigma and lik.sigma is None:
        raise ValueError(f"tune_sigma applies to the 'gaussian' likelihood only (a fixed noise std), not {lik.name!r}")
    init_pp = state.prior_precision
    if per_leaf and init_pp.dim() == 0:
        init_pp = init_pp.expand(len(state.mean))
    log_pp = init_pp.detach().log().clone().requires_grad_(True)
    log_sd = state.sigma.detach().log().clone().requires_grad_(tune_sigma)
    opt = torch.optim.Adam([log_pp] + ([log_sd] if tune_sigma else []), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = -log_marglik(state, lik, log_pp.exp(), log_sd.exp())
        loss.backward()
        opt.step()
    return state._replace(prior_precision=log_pp.detach().exp(), sigma=log_sd.detach().exp())
