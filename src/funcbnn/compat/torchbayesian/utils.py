"""``torchbayesian.bnn.utils``: the posterior and prior factories and ``enable_mc_dropout``.

A name given to :class:`~funcbnn.compat.torchbayesian.BayesianModule` is looked
up here, case-insensitively, as in torchbayesian::

    @PosteriorFactory.register_factory_function("my_posterior")
    def my_posterior_factory():
        return MyPosterior                       # the class, not an instance

    bnn.BayesianModule(net, variational_posterior=("my_posterior", {"scale": 0.1}))
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from .posteriors import GaussianPosterior, PretrainedGaussianPosterior, VariationalPosterior
from .priors import GaussianPrior, Prior

__all__ = [
    "Factory",
    "PosteriorFactory",
    "VariationalPosteriorFactory",
    "PriorFactory",
    "get_posterior",
    "get_variational_posterior",
    "get_prior",
    "enable_mc_dropout",
]


class Factory:
    """A registry of factory functions, each returning a class (torchbayesian's ``Factory``).

    Names are case-insensitive. ``factory[name]`` calls the factory function
    registered under ``name``; ``factory[name, *args]`` passes ``args`` to it.

    Examples
    --------
    >>> norms = Factory()
    >>> @norms.register_factory_function("batch")
    ... def batch_norm_factory(dim):
    ...     return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dim - 1]
    >>> norms["batch", 2]
    <class 'torch.nn.modules.batchnorm.BatchNorm2d'>
    """

    def __init__(self) -> None:
        self._factories: dict[str, Callable[..., Any]] = {}

    def __getitem__(self, args: str | tuple) -> Any:
        if isinstance(args, str):
            name, rest = args, ()
        else:
            name, *rest = args
        try:
            function = self._factories[str(name).upper()]
        except KeyError:
            raise KeyError(
                f"Unknown factory name '{name}'. Valid factory names are: {', '.join(self.factories)}."
            ) from None
        return function(*rest)

    @property
    def factories(self) -> tuple[str, ...]:
        """The registered names (upper case)."""
        return tuple(self._factories)

    def register_factory_function(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering a factory function under ``name``.

        Raises
        ------
        ValueError
            If a function is already registered under that name.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")

        def register(function: Callable[..., Any]) -> Callable[..., Any]:
            key = name.upper()
            if key in self._factories:
                raise ValueError(f"There is already a factory function registered under the name {name}.")
            self._factories[key] = function
            return function

        return register

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.upper() in self._factories


PosteriorFactory = Factory()
"""Variational posteriors by name: ``GAUSSIAN`` / ``NORMAL`` and ``PRETRAINED_GAUSSIAN`` / ``PRETRAINED_NORMAL``."""

for _name in ("gaussian", "normal"):
    PosteriorFactory.register_factory_function(_name)(lambda: GaussianPosterior)
for _name in ("pretrained_gaussian", "pretrained_normal"):
    PosteriorFactory.register_factory_function(_name)(lambda: PretrainedGaussianPosterior)
VariationalPosteriorFactory = PosteriorFactory
"""torchbayesian's other name for :class:`PosteriorFactory`."""

PriorFactory = Factory()
"""Priors by name: ``GAUSSIAN`` / ``NORMAL``."""

for _name in ("gaussian", "normal"):
    PriorFactory.register_factory_function(_name)(lambda: GaussianPrior)


def _split_spec(spec: Any, what: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``(name, kwargs)`` as ``(name, kwargs)``; ``TypeError`` naming ``what`` otherwise."""
    if isinstance(spec, str):
        return spec, {}
    if (
        isinstance(spec, (tuple, list))
        and len(spec) == 2
        and isinstance(spec[0], str)
        and isinstance(spec[1], Mapping)
    ):
        return spec[0], dict(spec[1])
    raise TypeError(f"{what} must be a name or a (name, kwargs) pair, got {spec!r:.80}")


def get_posterior(param: Tensor, posterior: str | tuple[str, Mapping[str, Any]]) -> VariationalPosterior:
    """The variational posterior registered under ``posterior`` for ``param`` (``cls.from_param(param, **kwargs)``)."""
    name, kwargs = _split_spec(posterior, "posterior")
    cls = PosteriorFactory[name]
    return cls.from_param(param=param, **kwargs)


get_variational_posterior = get_posterior


def get_prior(
    shape,
    prior: str | tuple[str, Mapping[str, Any]],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Prior:
    """The prior registered under ``prior`` for a parameter of ``shape`` (``cls(shape=..., dtype, device, **kwargs)``)."""
    name, kwargs = _split_spec(prior, "prior")
    cls = PriorFactory[name]
    return cls(shape=shape, dtype=dtype, device=device, **kwargs)


def enable_mc_dropout(module: nn.Module) -> None:
    """Put every dropout layer of ``module`` in train mode, leaving the other layers as they are.

    For Monte Carlo dropout with the module itself (Gal & Ghahramani 2016). The
    batched, reproducible way is :mod:`funcbnn.mc_dropout` with
    :func:`funcbnn.families.dropout`.
    """
    for m in module.modules():
        if isinstance(m, _DropoutNd):
            m.train()
