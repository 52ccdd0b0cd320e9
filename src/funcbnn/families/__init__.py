"""Families of distributions over parameter trees.

Every family is a ``NamedTuple`` of pure functions whose first three are the
posterior protocol ``(init, sample, kl)``; its state is a plain pytree.
"""

from .._registry import Registry
from .base import CAPABILITIES, REQUIRED, capabilities, check_family, require
from .diag_gaussian import DiagGaussian, DiagGaussianState, diag_gaussian, inverse_softplus

FAMILIES: Registry = Registry("posterior family")
"""Registry of family factories by name (``FAMILIES.build("diag_gaussian", init_std=0.01)``)."""

def _diag_gaussian_example(params, generator):
    post = diag_gaussian(init_std=0.3, mean_init="fresh")
    return post, post.init(params, generator=generator)


FAMILIES.register("diag_gaussian", example=_diag_gaussian_example)(diag_gaussian)

__all__ = ["FAMILIES", "CAPABILITIES", "REQUIRED", "capabilities", "check_family", "require", "DiagGaussian", "DiagGaussianState", "diag_gaussian", "inverse_softplus"]
