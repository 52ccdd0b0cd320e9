"""Families of distributions over parameter trees.

Every family is a ``NamedTuple`` of pure functions whose first three are the
posterior protocol ``(init, sample, kl)``; its state is a plain pytree.
"""

from .._registry import Registry
from .diag_gaussian import DiagGaussian, DiagGaussianState, diag_gaussian, inverse_softplus

FAMILIES: Registry = Registry("posterior family")
"""Registry of family factories by name (``FAMILIES.build("diag_gaussian", init_std=0.01)``)."""

FAMILIES.register("diag_gaussian")(diag_gaussian)

__all__ = ["FAMILIES", "DiagGaussian", "DiagGaussianState", "diag_gaussian", "inverse_softplus"]
