"""Laplace approximations on a fast per-example curvature engine.

>>> la, state = funcbnn.laplace.fit(apply_fn, params_map, loader, "categorical")  # doctest: +SKIP
>>> state = la.tune(state)                                   # marginal-likelihood prior precision
>>> probs = la.predict(state, x)                             # linearised predictive, probit link
"""

from .approximation import LaplaceApproximation, NotFittedError
from .curvature import CurvatureStats, dense_curvature, diag_curvature, output_hessian_sqrt
from .posterior import Laplace, LaplaceState, fit, last_layer_names

__all__ = [
    "LaplaceApproximation",
    "NotFittedError",
    "CurvatureStats",
    "dense_curvature",
    "diag_curvature",
    "output_hessian_sqrt",
    "Laplace",
    "LaplaceState",
    "fit",
    "last_layer_names",
]
