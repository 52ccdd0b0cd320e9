"""Families of distributions over parameter trees.

Every family is a ``NamedTuple`` of pure functions whose first three are the
posterior protocol ``(init, sample, kl)``; its state is a plain pytree.

Importing this package registers every state type with
``torch.serialization.add_safe_globals``, so a saved state loads with plain
``torch.load(path)`` (``weights_only=True``, torch's default).
"""

import torch

from .._registry import Registry
from .base import CAPABILITIES, REQUIRED, capabilities, check_family, require
from .dense_gaussian import DenseGaussian, DenseGaussianState, dense_gaussian
from .diag_gaussian import DiagGaussian, DiagGaussianState, diag_gaussian, inverse_softplus
from .dropout import Dropout, DropoutState, dropout
from .empirical import Empirical, EmpiricalState, empirical
from .lowrank_gaussian import LowRankGaussian, LowRankGaussianState, lowrank_gaussian
from .mixture import Mixture, MixtureState, mixture
from .kron_gaussian import KronDecomposed, KronEigen, KronGaussian, KronGaussianState, KronJacobian, kron_gaussian

FAMILIES: Registry = Registry("posterior family")
"""Registry of family factories by name (``FAMILIES.build("diag_gaussian", init_std=0.01)``)."""

torch.serialization.add_safe_globals(
    [DiagGaussianState, KronGaussianState, KronDecomposed, KronEigen, KronJacobian, DenseGaussianState, LowRankGaussianState, MixtureState, EmpiricalState, DropoutState]
)


def _diag_gaussian_example(params, generator):
    post = diag_gaussian(init_std=0.3, mean_init="fresh")
    return post, post.init(params, generator=generator)


def _random_spd(n: int, low: float, high: float, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A symmetric positive-definite ``(n, n)`` matrix with eigenvalues drawn in ``[low, high]``."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=like.dtype))
    eig = low + (high - low) * torch.rand(n, generator=generator, dtype=like.dtype)
    return ((q * eig) @ q.T).to(like.device)


def _kron_gaussian_example(params, generator):
    """A Kronecker block over the first (out, in) weight and its bias, every other leaf diagonal.

    The weight and the bias get different prior precisions, so the block's
    rank-one bias correction is exercised; precisions of about 0.7-6 give stds of 0.4-1.2.
    """
    post = kron_gaussian()
    names = list(params)
    weight = next(k for k in names if params[k].dim() == 2)
    prefix = weight[: -len("weight")] if weight.endswith("weight") else None
    bias = prefix + "bias" if prefix is not None and prefix + "bias" in params else None
    w = params[weight]
    key = (weight, bias) if bias is not None else (weight,)
    d = w.shape[1] + (bias is not None)
    A = _random_spd(d, 0.5, 2.0, w, generator)
    G = _random_spd(w.shape[0], 0.5, 3.0, w, generator)
    diag = {k: 0.5 + torch.rand(params[k].shape, generator=generator, dtype=w.dtype).to(w.device)
            for k in names if k not in key}
    curvature = KronDecomposed({key: KronEigen(*torch.linalg.eigh(A), *torch.linalg.eigh(G))}, diag)
    pp = {k: torch.tensor(0.5 + 0.5 * i, dtype=w.dtype, device=w.device) for i, k in enumerate(names)}
    state = KronGaussianState(
        mean={k: v.detach().clone() for k, v in params.items()}, curvature=curvature,
        prior_precision=pp, scale=torch.tensor(0.8, dtype=w.dtype, device=w.device),
    )
    return post, state


def _dense_gaussian_example(params, generator):
    """A dense precision with eigenvalues in [0.5, 4] (stds about 0.5-1.4) and all leaves correlated."""
    from .dense_gaussian import from_precision

    size = sum(v.numel() for v in params.values())
    like = next(iter(params.values()))
    return dense_gaussian(), from_precision(params, _random_spd(size, 0.5, 4.0, like, generator))


FAMILIES.register("diag_gaussian", example=_diag_gaussian_example)(diag_gaussian)
FAMILIES.register("kron_gaussian", example=_kron_gaussian_example)(kron_gaussian)
FAMILIES.register("dense_gaussian", example=_dense_gaussian_example)(dense_gaussian)


def _lowrank_gaussian_example(params, generator):
    """Diagonal variances 0.05-1.05 and a rank-3 factor: correlations across every leaf."""
    diag = {k: 0.05 + torch.rand(v.shape, generator=generator, dtype=v.dtype).to(v.device) for k, v in params.items()}
    factor = {k: 0.3 * torch.randn((3, *v.shape), generator=generator, dtype=v.dtype).to(v.device) for k, v in params.items()}
    return lowrank_gaussian(), LowRankGaussianState({k: v.detach().clone() for k, v in params.items()}, diag, factor)


def _mixture_example(params, generator):
    """Two diagonal Gaussians with different means and spreads."""
    component = diag_gaussian()
    shifted = {k: v + 1.0 for k, v in params.items()}
    states = (component.from_moments(params, 0.3), component.from_moments(shifted, 0.6))
    return mixture(component), MixtureState(states)


def _empirical_example(params, generator):
    post = empirical(num_members=4, init_std=0.5)
    return post, post.init(params, generator=generator)


def _dropout_example(params, generator):
    post = dropout()
    return post, post.init(params)


FAMILIES.register("lowrank_gaussian", example=_lowrank_gaussian_example)(lowrank_gaussian)
FAMILIES.register("mixture", example=_mixture_example)(mixture)
FAMILIES.register("empirical", example=_empirical_example)(empirical)
FAMILIES.register("dropout", example=_dropout_example)(dropout)

__all__ = [
    "FAMILIES",
    "LowRankGaussian",
    "LowRankGaussianState",
    "lowrank_gaussian",
    "Mixture",
    "MixtureState",
    "mixture",
    "Empirical",
    "EmpiricalState",
    "empirical",
    "Dropout",
    "DropoutState",
    "dropout",
    "CAPABILITIES",
    "REQUIRED",
    "capabilities",
    "check_family",
    "require",
    "DiagGaussian",
    "DiagGaussianState",
    "diag_gaussian",
    "inverse_softplus",
    "KronGaussian",
    "KronGaussianState",
    "KronDecomposed",
    "KronEigen",
    "KronJacobian",
    "kron_gaussian",
    "DenseGaussian",
    "DenseGaussianState",
    "dense_gaussian",
]
