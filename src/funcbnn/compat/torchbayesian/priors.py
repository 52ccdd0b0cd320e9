"""torchbayesian's priors: per-parameter ``torch.distributions`` objects built by ``PriorFactory``.

:class:`~funcbnn.compat.torchbayesian.BayesianModule` turns a Gaussian prior
spec into :func:`funcbnn.priors.gaussian` (analytic KL in the core); other
registered priors keep torchbayesian's per-parameter KL (analytic where
``torch.distributions`` has the pair, else Monte Carlo).
"""

from __future__ import annotations

import abc
import numbers

import torch
from torch import Tensor
from torch.distributions import Distribution, Normal

__all__ = ["Prior", "GaussianPrior", "NormalPrior"]


class Prior(abc.ABC):
    """Base class of torchbayesian's priors.

    Subclasses used by :class:`~funcbnn.compat.torchbayesian.BayesianModule`
    must accept ``shape``, ``dtype`` and ``device`` keyword arguments (plus their
    own) and provide :attr:`distribution`.
    """

    @property
    @abc.abstractmethod
    def distribution(self) -> Distribution:
        """An elementwise ``torch.distributions.Distribution`` of the parameter's shape."""

    def extra_repr(self) -> str:
        """Extra information for ``repr``; override in subclasses."""
        return ""

    def __repr__(self) -> str:
        lines = self.extra_repr().split("\n") if self.extra_repr() else []
        if len(lines) > 1:
            return f"{type(self).__name__}(\n  " + "\n  ".join(lines) + "\n)"
        return f"{type(self).__name__}({''.join(lines)})"


def _filled(value: float | Tensor, shape, dtype, device, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(dtype=dtype, device=device)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if shape is None:
            raise ValueError(
                "Must provide 'shape' argument or tensors 'mu' and 'sigma' with appropriate shape."
            )
        return torch.full(tuple(shape), float(value), dtype=dtype, device=device)
    raise TypeError(f"Argument '{name}' must be Optional[float | Tensor], {type(value)} was provided.")


class GaussianPrior(Prior):
    """Diagonal Gaussian prior ``N(mu, sigma^2)`` over one parameter tensor.

    Parameters
    ----------
    shape : torch.Size, optional
        The parameter's shape; needed unless ``mu`` and ``sigma`` are tensors.
    mu : float or Tensor, optional
        Mean (default 0).
    sigma : float or Tensor, optional
        Standard deviation (default 1).
    dtype, device : optional

    Examples
    --------
    >>> GaussianPrior((2, 3), mu=0.0, sigma=0.5).distribution.stddev.shape
    torch.Size([2, 3])
    """

    def __init__(
        self,
        shape=None,
        mu: float | Tensor | None = None,
        sigma: float | Tensor | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.mu = _filled(0.0 if mu is None else mu, shape, dtype, device, "mu")
        self.sigma = _filled(1.0 if sigma is None else sigma, shape, dtype, device, "sigma")

    @property
    def distribution(self) -> Normal:
        """``Normal(mu, sigma)``."""
        return Normal(self.mu, self.sigma)

    def extra_repr(self) -> str:
        return f"mu: {self.mu.size()}, sigma: {self.sigma.size()}"


NormalPrior = GaussianPrior
