"""Equal-weight mixture of states of one family: ``q(w) = (1/M) sum_m q_m(w)``.

MultiSWAG (Wilson & Izmailov 2020, "Bayesian Deep Learning and a Probabilistic
Perspective of Generalization") is a mixture of SWAG Gaussians, one per
independently trained run. Draws are *stratified*: of ``n`` draws, component
``m`` gives ``n // M`` (one more for the first ``n % M``), in component order,
so every component is represented in every prediction and the same generator
gives the same draws. Expectations under the equal-weight mixture are then
estimated without bias whenever ``M`` divides ``n``.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import optree
import torch
from torch import Tensor

from .._validation import positive_int
from ..tree import Tree, tree_size
from ..checks import check_generator
from ._kl import check_reduction, monte_carlo_kl
from .base import check_family, require

__all__ = ["MixtureState", "Mixture", "mixture"]


class MixtureState(NamedTuple):
    """The components' states, one per mixture component (equal weights)."""

    components: tuple


def _check(state: MixtureState) -> tuple:
    if not isinstance(state, MixtureState):
        raise TypeError(f"state must be a MixtureState, got {type(state).__name__}")
    if not state.components:
        raise ValueError("a mixture needs at least one component state")
    return tuple(state.components)


def _counts(n: int, m: int) -> list[int]:
    return [n // m + (i < n % m) for i in range(m)]


class Mixture(NamedTuple):
    """The equal-weight mixture family over states of ``component`` (see the module docstring)."""

    init: Callable[..., MixtureState]
    sample: Callable[..., Tree]
    kl: Callable[..., Tensor]
    log_prob: Callable[..., Tensor] | None
    mean: Callable[..., Tree] | None
    variance: Callable[..., Tree] | None
    component: Any


def mixture(component: Any, num_components: int = 1) -> Mixture:
    """Build the equal-weight mixture family of ``component`` (a posterior family).

    Parameters
    ----------
    component : posterior family
        The family of every component (e.g. :func:`funcbnn.families.lowrank_gaussian`).
        The mixture declares ``log_prob``, ``mean`` and ``variance`` where the
        component does; its KL is Monte-Carlo (mixtures have no closed form).
    num_components : int, default 1
        How many copies of ``component.init(params)`` :attr:`Mixture.init` makes.

    Examples
    --------
    >>> from funcbnn.families import diag_gaussian
    >>> post = mixture(diag_gaussian(init_std=0.1))
    >>> state = MixtureState((post.component.init({"w": torch.zeros(2)}), post.component.init({"w": torch.ones(2)})))
    >>> post.sample(state, 5, generator=torch.Generator().manual_seed(0))["w"].shape
    torch.Size([5, 2])
    """
    check_family(component, "component")
    num_components = positive_int(num_components, "num_components")

    def init(params: Tree, *, generator: torch.Generator | None = None) -> MixtureState:
        """``num_components`` copies of the component's init state (a degenerate mixture)."""
        return MixtureState(tuple(component.init(params, generator=generator) for _ in range(num_components)))

    def sample(state: MixtureState, num_samples: int, *, generator: torch.Generator | None = None) -> Tree:
        """Stratified draws: ``n // M`` per component (one more for the first ``n % M``), in order."""
        comps = _check(state)
        num_samples = positive_int(num_samples, "num_samples")
        check_generator(generator)
        parts = [
            component.sample(s, k, generator=generator) for s, k in zip(comps, _counts(num_samples, len(comps))) if k
        ]
        return optree.tree_map(lambda *leaves: torch.cat(leaves), *parts)

    def log_prob(state: MixtureState, params: Tree) -> Tensor:
        """``logsumexp_m log q_m(params) - log M``."""
        comps = _check(state)
        lp = torch.stack([component.log_prob(s, params) for s in comps])
        return torch.logsumexp(lp, 0) - torch.log(torch.tensor(float(len(comps)), dtype=lp.dtype))

    def mean(state: MixtureState) -> Tree:
        comps = _check(state)
        means = [component.mean(s) for s in comps]
        return optree.tree_map(lambda *m: torch.stack(m).mean(0), *means)

    def variance(state: MixtureState) -> Tree:
        """Law of total variance: ``mean_m (var_m + mean_m^2) - mean^2``."""
        comps = _check(state)
        means = [component.mean(s) for s in comps]
        second = [optree.tree_map(lambda v, m: v + m.square(), component.variance(s), m) for s, m in zip(comps, means)]
        return optree.tree_map(
            lambda mu, *parts: torch.stack(parts).mean(0) - mu.square(), mean(state), *second
        )

    def kl(
        state: MixtureState,
        prior: Any,
        *,
        reduction: Literal["sum", "mean"] = "sum",
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Monte-Carlo ``KL(q || prior)`` from ``num_samples`` stratified draws (no closed form exists)."""
        _check(state)
        check_reduction(reduction)
        require(component, "log_prob", "the KL of a mixture")
        if num_samples is None:
            raise ValueError("KL of a mixture has no closed form; pass num_samples=... for a Monte-Carlo estimate")
        draws = sample(state, positive_int(num_samples, "num_samples"), generator=generator)
        total = monte_carlo_kl(log_prob(state, draws), prior, draws)
        if reduction == "mean":
            return total / tree_size(optree.tree_map(lambda t: t[0], draws))
        return total

    has = lambda cap: getattr(component, cap, None) is not None  # noqa: E731
    return Mixture(
        init=init,
        sample=sample,
        kl=kl,
        log_prob=log_prob if has("log_prob") else None,
        mean=mean if has("mean") else None,
        variance=variance if has("variance") and has("mean") else None,
        component=component,
    )
