"""Laplace approximations on a fast per-example curvature engine (Daxberger et al. 2021)::

    la, state = funcbnn.laplace.fit(apply_fn, params_map, loader, "classification")
    state = la.tune(state)              # marginal-likelihood prior precision (Immer et al. 2021)
    state = la.tune(state, method="val_nll", val_data=(x_val, y_val))  # or by validation NLL
    probs = la.predict(state, x)        # linearised predictive, probit link
    lin = la.linearize(state, x_val)    # reused across hyperparameters: a prior-precision search
    nll = [loss(la.predict(state, lin, prior_precision=p), y_val) for p in grid]
    post = la.posterior(state)          # a family state: la.family.sample(post, 64), la.family.kl(...)
    torch.save(state, "la.pt")          # later, elsewhere, without the data:
    la = funcbnn.laplace.from_state(apply_fn, params_map, torch.load("la.pt"))

Online marginal-likelihood training (the MAP and the hyperparameters
together, Immer et al. 2021) is :func:`marglik_training`; subnetwork Laplace
(Daxberger et al. 2021) takes a :class:`Subnetwork` from
:mod:`~funcbnn.laplace.subnetwork` as ``fit``'s ``subset``.

The fitter only; one concept per module: :mod:`~funcbnn.laplace.curvature`
(diagonal and dense per-example curvature), :mod:`~funcbnn.laplace.kron` (KFAC
factors), :mod:`~funcbnn.laplace.state` (the fitted state and its family
state), :mod:`~funcbnn.laplace.fit` (``fit``, ``from_state``),
:mod:`~funcbnn.laplace.marglik` (marginal likelihood, tuning),
:mod:`~funcbnn.laplace.predictive` (GLM and sampled predictive),
:mod:`~funcbnn.laplace.glm` (the diagonal output covariance without Jacobians),
:mod:`~funcbnn.laplace.approximation` (an object-style front end). Sampling,
KL, variances and log-determinants belong to the posterior families
(:mod:`funcbnn.families`).

Importing this package registers :class:`LaplaceState` and the Kronecker
factor types with ``torch.serialization.add_safe_globals``, so plain
``torch.load(path)`` (``weights_only=True``) reads a saved state.
"""

import torch

from . import subnetwork
from .approximation import LaplaceApproximation, NotFittedError
from .curvature import CurvatureStats, dense_curvature, diag_curvature, output_hessian_sqrt
from .fit import Laplace, fit, from_state, last_layer_names
from .kron import KronBlock, KronCurvature
from .predictive import Linearization, laplace_bridge
from .state import LaplaceState
from .subnetwork import Subnetwork
from .training import MarglikInfo, MarglikResult, marglik_training
from .validation import ValidationInfo

torch.serialization.add_safe_globals([LaplaceState, KronBlock, KronCurvature])

__all__ = [
    "LaplaceApproximation",
    "NotFittedError",
    "CurvatureStats",
    "dense_curvature",
    "diag_curvature",
    "output_hessian_sqrt",
    "Laplace",
    "LaplaceState",
    "Linearization",
    "MarglikInfo",
    "MarglikResult",
    "Subnetwork",
    "ValidationInfo",
    "fit",
    "from_state",
    "laplace_bridge",
    "last_layer_names",
    "marglik_training",
    "subnetwork",
]
