"""Priors over parameter trees.

A prior is a small pure object with ``log_prob(params) -> scalar`` and, where it
can, ``sample(like, num_samples, generator=...)``. Its ``closed_forms`` attribute
states which closed forms it offers to posterior families:

``"gaussian"``
    The prior is a diagonal Gaussian and provides ``moments(like) -> (mean, std)``
    as trees shaped like ``like``; Gaussian families then compute KL analytically.

Priors without a closed form (the scale mixture, user priors) get a Monte-Carlo
KL from the families, with an explicit sample count.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import optree
import torch
from torch import Tensor

from ._registry import Registry
from ._validation import check_positive_tree, positive_float, positive_int, positive_scalar
from .tree import Tree, leaf_names

__all__ = [
    "GaussianPrior",
    "ScaleMixturePrior",
    "LogProbPrior",
    "gaussian",
    "scale_mixture",
    "from_log_prob",
    "PRIORS",
]

PRIORS: Registry = Registry("prior")
"""Registry of prior factories by name (``PRIORS.build("gaussian", std=0.1)``)."""

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _broadcast_like(value: Any, like: Tree, name: str) -> Tree:
    """``value`` (a number or a tree matching ``like``) as a tree of tensors shaped like ``like``."""
    if isinstance(value, Tensor) and value.dim() == 0:  # keeps autograd to a learned scalar scale
        return optree.tree_map(lambda t: value.to(t).expand(t.shape), like)
    if isinstance(value, numbers.Real):
        return optree.tree_map(lambda t: torch.full_like(t, float(value)), like)
    if optree.tree_structure(value) != optree.tree_structure(like):
        raise ValueError(
            f"{name} must be a number or a tree with the parameters' structure "
            f"{optree.tree_structure(like)}, got {optree.tree_structure(value)}"
        )

    def expand(path: str, v: Any, t: Tensor) -> Tensor:
        v = torch.as_tensor(v, dtype=t.dtype, device=t.device)
        try:
            return v.expand(t.shape)
        except RuntimeError:
            raise ValueError(
                f"{name}: leaf '{path}' of shape {tuple(v.shape)} does not broadcast to {tuple(t.shape)}"
            ) from None

    leaves = [
        expand(p, v, t)
        for p, v, t in zip(leaf_names(like), optree.tree_leaves(value), optree.tree_leaves(like))
    ]
    return optree.tree_unflatten(optree.tree_structure(like), leaves)


def _normal_log_density(x: Tensor, mean: Tensor | float, std: Tensor | float) -> Tensor:
    """Elementwise log N(x; mean, std^2), computed via z = (x - mean) / std.

    Dividing before squaring keeps the value finite for tiny std, where
    ``std**2`` would underflow to 0 (``torch.distributions.Normal`` then returns
    NaN at x = mean).
    """
    z = (x - mean) / std
    log_std = torch.log(std) if isinstance(std, Tensor) else math.log(std)
    return -0.5 * z * z - log_std - _HALF_LOG_2PI


class _GaussianPriorFields(NamedTuple):
    std: Any
    mean: Any = 0.0


def _gaussian_fields(std: Any, mean: Any) -> tuple[Any, Any]:
    """``(std, mean)`` validated and normalised: positive std, one scalar or a tree; a scalar or tree mean."""
    if isinstance(std, (numbers.Real, Tensor)) and not (isinstance(std, Tensor) and std.numel() != 1):
        # a number, a 0-d or a shape-(1,) tensor: one std for every weight (tensors keep their gradient)
        try:
            std = positive_scalar(std, "std")
        except ValueError as err:
            raise ValueError(
                f"{err}. GaussianPrior's fields are (std, mean), std first: for mean m and std s write "
                "funcbnn.priors.gaussian(std=s, mean=m) (deepuq's and torchbayesian's priors take (mu, sigma))"
            ) from None
    else:
        check_positive_tree(std, "std")
    if isinstance(mean, numbers.Real):
        mean = float(mean)
        if not math.isfinite(mean):
            raise ValueError(f"mean must be finite, got {mean}")
    elif isinstance(mean, Tensor) and mean.numel() == 1 and mean.dim() <= 1:
        mean = mean.reshape(())
    return std, mean


class GaussianPrior(_GaussianPriorFields):
    """Diagonal Gaussian prior ``N(mean, diag(std^2))``; see :func:`gaussian`.

    The fields are ``(std, mean)``, std first, and are checked when the prior is
    built: ``GaussianPrior(0.0, 0.1)`` (read as deepuq's ``(mu, sigma)``) is a
    zero std and raises ``ValueError`` instead of failing later with a division
    by zero. Prefer the keywords, ``gaussian(std=0.1, mean=0.0)``.
    """

    __slots__ = ()

    closed_forms = frozenset({"gaussian"})

    def __new__(cls, std: Any = 1.0, mean: Any = 0.0) -> "GaussianPrior":
        return super().__new__(cls, *_gaussian_fields(std, mean))

    def moments(self, like: Tree) -> tuple[Tree, Tree]:
        """Mean and std as trees of tensors shaped like ``like``."""
        return _broadcast_like(self.mean, like, "prior mean"), _broadcast_like(self.std, like, "prior std")

    def log_prob(self, params: Tree) -> Tensor:
        """Log density of ``params`` (a scalar)."""
        mean, std = self.moments(params)
        terms = optree.tree_leaves(
            optree.tree_map(lambda x, m, s: _normal_log_density(x, m, s).sum(), params, mean, std)
        )
        return torch.stack(terms).sum()

    def sample(self, like: Tree, num_samples: int, *, generator: torch.Generator | None = None) -> Tree:
        """Draws shaped ``(num_samples, *leaf.shape)`` for each leaf of ``like``."""
        positive_int(num_samples, "num_samples")
        mean, std = self.moments(like)

        def draw(m: Tensor, s: Tensor) -> Tensor:
            eps = torch.empty((num_samples, *m.shape), dtype=m.dtype, device=m.device)
            return eps.normal_(generator=generator).mul_(s).add_(m)

        return optree.tree_map(draw, mean, std)


class _ScaleMixtureFields(NamedTuple):
    pi: float
    sigma1: float
    sigma2: float


class ScaleMixturePrior(_ScaleMixtureFields):
    """Zero-mean scale mixture ``pi N(0, sigma1^2) + (1 - pi) N(0, sigma2^2)``; see :func:`scale_mixture`.

    The fields are checked when the prior is built (``0 < pi < 1``, positive sigmas).
    """

    __slots__ = ()

    closed_forms = frozenset()

    def __new__(cls, pi: float = 0.5, sigma1: float = 1.0, sigma2: float = math.exp(-6)) -> "ScaleMixturePrior":
        try:
            pi = float(pi)
        except (TypeError, ValueError):
            raise TypeError(f"pi must be a number in (0, 1), got {pi!r}") from None
        if not 0.0 < pi < 1.0:
            raise ValueError(f"pi must lie strictly between 0 and 1, got {pi}")
        return super().__new__(cls, pi, positive_float(sigma1, "sigma1"), positive_float(sigma2, "sigma2"))

    def log_prob(self, params: Tree) -> Tensor:
        """Log density of ``params`` (a scalar), by log-sum-exp over the two components."""
        log_pi, log_1m_pi = math.log(self.pi), math.log1p(-self.pi)

        def leaf(x: Tensor) -> Tensor:
            a = _normal_log_density(x, 0.0, self.sigma1) + log_pi
            b = _normal_log_density(x, 0.0, self.sigma2) + log_1m_pi
            return torch.logaddexp(a, b).sum()

        return torch.stack(optree.tree_leaves(optree.tree_map(leaf, params))).sum()

    def sample(self, like: Tree, num_samples: int, *, generator: torch.Generator | None = None) -> Tree:
        """Draws shaped ``(num_samples, *leaf.shape)``: pick a component per element, then draw."""
        positive_int(num_samples, "num_samples")

        def draw(t: Tensor) -> Tensor:
            shape = (num_samples, *t.shape)
            first = torch.rand(shape, dtype=t.dtype, device=t.device, generator=generator) < self.pi
            s1, s2 = (torch.tensor(v, dtype=t.dtype, device=t.device) for v in (self.sigma1, self.sigma2))
            scale = torch.where(first, s1, s2)
            return torch.empty(shape, dtype=t.dtype, device=t.device).normal_(generator=generator) * scale

        return optree.tree_map(draw, like)


class LogProbPrior(NamedTuple):
    """A user prior given by its log density (and optionally a sampler); see :func:`from_log_prob`."""

    log_prob_fn: Callable[[Tree], Tensor]
    sample_fn: Callable[..., Tree] | None = None

    closed_forms = frozenset()

    def log_prob(self, params: Tree) -> Tensor:
        """Log density of ``params``, as the user's function returns it."""
        out = self.log_prob_fn(params)
        if not isinstance(out, Tensor) or out.dim() != 0:
            raise ValueError("the prior's log_prob function must return a scalar tensor")
        return out

    def sample(self, like: Tree, num_samples: int, *, generator: torch.Generator | None = None) -> Tree:
        """Calls the user's sampler; raises ``NotImplementedError`` if none was given."""
        if self.sample_fn is None:
            raise NotImplementedError("this prior was built without sample_fn, so it cannot be sampled")
        return self.sample_fn(like, positive_int(num_samples, "num_samples"), generator=generator)


@PRIORS.register("gaussian")
def gaussian(std: float | Tree = 1.0, mean: float | Tree = 0.0) -> GaussianPrior:
    """Diagonal Gaussian prior.

    Parameters
    ----------
    std : float or tree
        One std for every weight (isotropic), or a tree with the parameters'
        structure whose leaves (numbers or tensors broadcastable to the leaf)
        give per-leaf or per-element stds. Must be positive.
    mean : float or tree, default 0.0
        Centre of the prior; pass a parameter tree (e.g. pretrained weights) to
        centre it there.

    Examples
    --------
    >>> prior = gaussian(std=1.0)
    >>> prior.log_prob({"w": torch.zeros(2)})
    tensor(-1.8379)
    """
    return GaussianPrior(std=std, mean=mean)


@PRIORS.register("scale_mixture")
def scale_mixture(pi: float = 0.5, sigma1: float = 1.0, sigma2: float = math.exp(-6)) -> ScaleMixturePrior:
    """The scale-mixture prior of Blundell et al. (2015), "Weight Uncertainty in Neural Networks".

    ``p(w) = pi N(w; 0, sigma1^2) + (1 - pi) N(w; 0, sigma2^2)`` independently for
    every weight, typically with ``sigma1 > sigma2`` and ``sigma2 << 1``. It has
    no closed-form KL against a Gaussian: families use Monte Carlo.

    Parameters
    ----------
    pi : float in (0, 1)
        Weight of the first component.
    sigma1, sigma2 : float
        Positive component stds.
    """
    return ScaleMixturePrior(pi, sigma1, sigma2)


@PRIORS.register("log_prob")
def from_log_prob(log_prob: Callable[[Tree], Tensor], sample: Callable[..., Tree] | None = None) -> LogProbPrior:
    """Any prior given by ``log_prob(params) -> scalar`` (and optionally a sampler).

    ``sample(like, num_samples, generator=...)`` must return trees with a
    leading axis of ``num_samples``. KL against it is Monte-Carlo.
    """
    if not callable(log_prob):
        raise TypeError(f"log_prob must be callable, got {type(log_prob).__name__}")
    if sample is not None and not callable(sample):
        raise TypeError(f"sample must be callable or None, got {type(sample).__name__}")
    return LogProbPrior(log_prob, sample)
