"""Observation models: per-example negative log-likelihoods of model outputs.

Each likelihood is a small ``NamedTuple`` with pure functions of ``(outputs,
targets)``. ``nll`` returns one value per example (summed over output
dimensions), so callers choose the reduction: VI takes the batch mean, Laplace
sums over the whole data set. ``check`` validates shapes and label ranges
early with errors that name the argument.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._registry import Registry
from ._validation import positive_float

__all__ = [
    "Likelihood",
    "categorical",
    "gaussian",
    "heteroscedastic_gaussian",
    "bernoulli",
    "LIKELIHOODS",
    "get_likelihood",
]

LIKELIHOODS: Registry = Registry("likelihood")
"""Registry of likelihood factories by name."""

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class Likelihood(NamedTuple):
    """A likelihood ``p(y | f(x))`` as pure functions of model outputs and targets.

    Attributes
    ----------
    name : str
        ``"categorical"``, ``"gaussian"``, ``"heteroscedastic_gaussian"`` or ``"bernoulli"``.
    nll : callable
        ``nll(outputs, targets) -> (N,)`` per-example negative log-likelihood.
    check : callable
        ``check(outputs, targets)`` raises ``ValueError`` on shapes or labels that do not fit.
    sigma : float or None
        Observation noise std for ``"gaussian"``.
    """

    name: str
    nll: Callable[[Tensor, Tensor], Tensor]
    check: Callable[[Tensor, Tensor], None]
    sigma: float | None = None


def _flat_sum(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(1) if t.dim() > 1 else t


def _check_categorical(logits: Tensor, y: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"categorical likelihood needs outputs of shape (N, C), got {tuple(logits.shape)}")
    if y.shape != logits.shape[:1]:
        raise ValueError(f"targets must have shape ({logits.shape[0]},) of class indices, got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex():
        raise ValueError(f"categorical targets must be integer class indices, got dtype {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise ValueError(
            f"targets must lie in [0, {logits.shape[1] - 1}] for {logits.shape[1]} classes, "
            f"got range [{int(y.min())}, {int(y.max())}]"
        )


@LIKELIHOODS.register("categorical")
def categorical() -> Likelihood:
    """Categorical over the last axis of ``(N, C)`` logits; targets are class indices."""
    return Likelihood(
        "categorical",
        lambda logits, y: F.cross_entropy(logits, y, reduction="none"),
        _check_categorical,
    )


def _check_same_shape(outputs: Tensor, y: Tensor, what: str) -> None:
    if outputs.shape != y.shape:
        raise ValueError(f"targets must have the shape of the {what} {tuple(outputs.shape)}, got {tuple(y.shape)}")


@LIKELIHOODS.register("gaussian")
def gaussian(sigma: float = 1.0) -> Likelihood:
    """Gaussian with fixed noise std ``sigma``; outputs are the means, targets the same shape."""
    sigma = positive_float(sigma, "sigma")
    log_sigma = math.log(sigma)

    def nll(mean: Tensor, y: Tensor) -> Tensor:
        return _flat_sum(0.5 * ((y - mean) / sigma) ** 2 + log_sigma + _HALF_LOG_2PI)

    return Likelihood("gaussian", nll, lambda mean, y: _check_same_shape(mean, y, "outputs"), sigma)


@LIKELIHOODS.register("heteroscedastic_gaussian")
def heteroscedastic_gaussian() -> Likelihood:
    """Gaussian whose mean and log-variance the model outputs: last axis = (means, log-variances)."""

    def check(outputs: Tensor, y: Tensor) -> None:
        if outputs.dim() < 2 or outputs.shape[-1] % 2:
            raise ValueError(
                "heteroscedastic outputs need an even last axis (means, then log-variances), "
                f"got {tuple(outputs.shape)}"
            )
        _check_same_shape(outputs[..., : outputs.shape[-1] // 2], y, "mean half of the outputs")

    def nll(outputs: Tensor, y: Tensor) -> Tensor:
        mean, log_var = outputs.chunk(2, dim=-1)
        return _flat_sum(0.5 * (y - mean) ** 2 * torch.exp(-log_var) + 0.5 * log_var + _HALF_LOG_2PI)

    return Likelihood("heteroscedastic_gaussian", nll, check)


@LIKELIHOODS.register("bernoulli")
def bernoulli() -> Likelihood:
    """Bernoulli with logits of shape ``(N,)`` or ``(N, 1)``; targets in {0, 1} of the same shape."""

    def check(logits: Tensor, y: Tensor) -> None:
        _check_same_shape(logits, y, "outputs")
        if y.numel() and not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("bernoulli targets must be 0 or 1")

    def nll(logits: Tensor, y: Tensor) -> Tensor:
        return _flat_sum(F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), reduction="none"))

    return Likelihood("bernoulli", nll, check)


def get_likelihood(likelihood: str | Likelihood, **kwargs) -> Likelihood:
    """A :class:`Likelihood` from itself or its registered name (with the factory's kwargs)."""
    if isinstance(likelihood, Likelihood):
        if kwargs:
            raise TypeError(f"keyword arguments {sorted(kwargs)} only apply to a likelihood given by name")
        return likelihood
    return LIKELIHOODS.build(likelihood, **kwargs)
