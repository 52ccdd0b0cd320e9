"""torchbayesian's variational posteriors, on :mod:`funcbnn.nn.posteriors`.

:class:`VariationalPosterior` *is* :class:`funcbnn.nn.VariationalPosterior`: a
subclass written to torchbayesian's pattern (a one-draw ``sample_parameters()``)
works in the native :class:`funcbnn.nn.BayesianModule` too. The Gaussian
posteriors subclass the native ones and keep torchbayesian's initialisation,
so their draws and KL are the functional core's.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ...nn.posteriors import DEFAULT_INIT_STD, VariationalPosterior
from ...nn.posteriors import GaussianPosterior as _NativeGaussianPosterior
from ...nn.posteriors import PretrainedGaussianPosterior as _NativePretrainedGaussianPosterior

__all__ = [
    "VariationalPosterior",
    "GaussianPosterior",
    "NormalPosterior",
    "PretrainedGaussianPosterior",
    "PretrainedNormalPosterior",
]

_RHO_INIT = -3.0  # torchbayesian's rho: sigma = softplus(-3) ~ 0.0486
_MU_INIT_STD = 0.1  # torchbayesian's mean initialisation N(0, 0.1^2)


class GaussianPosterior(_NativeGaussianPosterior):
    """Diagonal Gaussian ``N(mu, softplus(rho)^2)`` with torchbayesian's initialisation.

    ``mu ~ N(0, 0.1^2)`` from the global RNG and ``rho = -3``, as torchbayesian
    0.2 (the native :class:`funcbnn.nn.GaussianPosterior` starts from
    ``U(+-1/sqrt(fan_in))`` with an explicit generator). Draws are
    ``mu + softplus(rho) * eps`` (:func:`funcbnn.tree.diag_normal`, the same
    global-RNG stream as torchbayesian's ``torch.randn_like``).

    Parameters
    ----------
    shape : torch.Size or sequence of int
        The shape of the parameter replaced by the posterior.
    dtype, device : optional
        Those of the parameter (torch's defaults if not given).

    Attributes
    ----------
    mu, rho : nn.Parameter

    Examples
    --------
    >>> post = GaussianPosterior((3, 2))
    >>> post.sample_parameters().shape, round(post.sigma[0, 0].item(), 4)
    (torch.Size([3, 2]), 0.0486)
    """

    def __init__(
        self,
        shape: Sequence[int],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        VariationalPosterior.__init__(self, shape, dtype=dtype, device=device)
        self.init_std = DEFAULT_INIT_STD
        self.mu = nn.Parameter(torch.empty(self.shape, dtype=dtype, device=device))
        self.rho = nn.Parameter(torch.empty(self.shape, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``mu ~ N(0, 0.1^2)`` (global RNG), ``rho = -3``."""
        with torch.no_grad():
            nn.init.normal_(self.mu, mean=0.0, std=_MU_INIT_STD)
            nn.init.constant_(self.rho, _RHO_INIT)


class PretrainedGaussianPosterior(_NativePretrainedGaussianPosterior):
    """Diagonal Gaussian centred on a given (e.g. pretrained) tensor: ``mu = param``, ``rho = -3``.

    Parameters
    ----------
    param : Tensor
        The value the mean starts at (copied).

    Examples
    --------
    >>> w = torch.randn(4, 3)
    >>> post = PretrainedGaussianPosterior(w)
    >>> torch.equal(post.mu, w), post.rho[0, 0].item()
    (True, -3.0)
    """

    def __init__(self, param: Tensor) -> None:
        super().__init__(param)
        self.reset_parameters()

    @classmethod
    def from_param(cls, param: Tensor, **kwargs: Any) -> "PretrainedGaussianPosterior":
        """The posterior centred on ``param`` (``kwargs`` go to the constructor)."""
        return cls(param, **kwargs)

    def reset_parameters(self) -> None:
        """``rho = -3``; the mean keeps its value."""
        with torch.no_grad():
            nn.init.constant_(self.rho, _RHO_INIT)


NormalPosterior = GaussianPosterior
PretrainedNormalPosterior = PretrainedGaussianPosterior
