"""Per-parameter variational posteriors (torchbayesian's protocol) and their registry.

Each :class:`VariationalPosterior` is an ``nn.Module`` holding the variational
parameters of one parameter tensor; :class:`~funcbnn.nn.BayesianModule` builds
one per parameter of the wrapped network, looked up by name in :data:`POSTERIORS`.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import inspect
import math
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._registry import Registry
from .._validation import positive_float, positive_int
from ..families.diag_gaussian import inverse_softplus
from ..tree import diag_normal

__all__ = ["POSTERIORS", "DEFAULT_INIT_STD", "VariationalPosterior", "GaussianPosterior", "PretrainedGaussianPosterior"]

POSTERIORS: Registry = Registry("variational posterior")
"""Registry of per-parameter variational posteriors by name.

An entry is a :class:`VariationalPosterior` subclass (built per parameter with
``cls.from_param(param, **kwargs)``) or a function ``(param, **kwargs) ->
VariationalPosterior``::

    @POSTERIORS.register("my_posterior")
    class MyPosterior(VariationalPosterior): ...

    BayesianModule(net, posterior=("my_posterior", {"scale": 0.1}))
"""

DEFAULT_INIT_STD = math.log1p(math.exp(-3.0))
"""``softplus(-3) ~ 0.0486``: the initial std of torchbayesian's and deepuq's Gaussian posteriors (``rho = -3``)."""

Spec = str | tuple[str, Mapping[str, Any]]
T = TypeVar("T", bound="VariationalPosterior")


# ---------------------------------------------------------------------------------------------
# per-parameter variational posteriors


class VariationalPosterior(nn.Module, abc.ABC):
    """Base class of the variational posterior over one parameter tensor (torchbayesian's protocol).

    Subclasses hold their variational parameters as ``nn.Parameter`` s and
    implement :attr:`distribution` and :meth:`sample_parameters`; the dtype and
    device follow ``.to(...)`` through a non-persistent buffer.

    :meth:`sample_parameters` may be written either way:

    - ``sample_parameters(self, num_samples=None, *, generator=None)``: batched
      draws from the caller's generator (what :class:`BayesianModule` calls);
    - ``sample_parameters(self)``: one draw from the global RNG, torchbayesian's
      pattern. The class then gets a batched version that stacks
      ``num_samples`` such draws, and a ``generator`` seeds the global RNG for
      the call (in a forked RNG state), so draws stay reproducible.

    Any other signature is rejected when the subclass is defined.

    Parameters
    ----------
    shape : torch.Size or tuple
        Shape of the parameter this posterior replaces.
    dtype, device : optional
        Those of the parameter.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fn = cls.__dict__.get("sample_parameters")
        if fn is None or getattr(fn, "__isabstractmethod__", False) or getattr(fn, "_single_draw", None):
            return
        if _binds(fn, None, 2, generator=None):
            return  # the batched signature
        if _binds(fn, None):
            cls.sample_parameters = _batched_from_single_draw(fn)
            return
        raise TypeError(
            f"{cls.__name__}.sample_parameters must take no argument (one draw, torchbayesian's pattern) or "
            f"(num_samples=None, *, generator=None); got {fn.__name__}{inspect.signature(fn)}"
        )

    def __init__(
        self, shape: Sequence[int], *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.shape = torch.Size(shape)
        self.register_buffer("_meta", torch.empty(0, dtype=dtype, device=device), persistent=False)

    @classmethod
    def from_param(cls: type[T], param: Tensor, **kwargs: Any) -> T:
        """Build the posterior for ``param``; the default uses only its shape, dtype and device."""
        return cls(param.shape, dtype=param.dtype, device=param.device, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the replaced parameter."""
        return self._meta.dtype

    @property
    def device(self) -> torch.device:
        """Device of the replaced parameter."""
        return self._meta.device

    @property
    @abc.abstractmethod
    def distribution(self) -> torch.distributions.Distribution:
        """Elementwise ``torch.distributions`` object with batch shape :attr:`shape` (used for the KL)."""

    @abc.abstractmethod
    def sample_parameters(self, num_samples: int | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        """A reparameterised draw shaped :attr:`shape` (``(num_samples, *shape)`` if ``num_samples`` is given)."""

    def forward(self) -> Tensor:
        """One draw (:meth:`sample_parameters`)."""
        return self.sample_parameters()


def _binds(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:
        return False
    return True


@contextlib.contextmanager
def _global_rng_from(generator: torch.Generator | None, device: torch.device) -> Iterator[None]:
    """Seed the global RNG from ``generator`` for the block, restoring its state afterwards."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield


def _batched_from_single_draw(fn: Callable[[Any], Tensor]) -> Callable[..., Tensor]:
    """``sample_parameters(num_samples=None, *, generator=None)`` from a one-draw ``sample_parameters(self)``."""

    @functools.wraps(fn)
    def sample_parameters(
        self: VariationalPosterior, num_samples: int | None = None, *, generator: torch.Generator | None = None
    ) -> Tensor:
        if num_samples is None and generator is None:
            return fn(self)
        num = 1 if num_samples is None else positive_int(num_samples, "num_samples")
        with _global_rng_from(generator, self.device):
            draws = [fn(self) for _ in range(num)]
        return draws[0] if num_samples is None else torch.stack(draws)

    sample_parameters._single_draw = fn  # type: ignore[attr-defined]
    return sample_parameters


def _fresh_mean(shape: torch.Size, dtype, device, generator: torch.Generator | None) -> Tensor:
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, the rule of ``diag_gaussian(mean_init="fresh")``."""
    fan_in = math.prod(shape[1:]) if len(shape) >= 2 else max(math.prod(shape), 1)
    bound = 1.0 / math.sqrt(fan_in)
    u = torch.empty(shape, dtype=dtype, device=device).uniform_(generator=generator)
    return (2 * u - 1) * bound


@POSTERIORS.register("gaussian")
class GaussianPosterior(VariationalPosterior):
    """Diagonal Gaussian ``N(mu, softplus(rho)^2)`` with a freshly initialised mean (Blundell et al. 2015).

    Parameters
    ----------
    shape, dtype, device
        Of the replaced parameter.
    init_std : float, default softplus(-3)
        Initial std (``rho = inverse_softplus(init_std)``).
    generator : torch.Generator, optional
        Randomness of the mean's initialisation ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

    Attributes
    ----------
    mu, rho : nn.Parameter
        The variational parameters; ``sigma = softplus(rho)``.
    """

    def __init__(
        self,
        shape: Sequence[int],
        *,
        init_std: float = DEFAULT_INIT_STD,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(shape, dtype=dtype, device=device)
        self.init_std = positive_float(init_std, "init_std")
        self.mu = nn.Parameter(torch.empty(self.shape, dtype=dtype, device=device))
        self.rho = nn.Parameter(torch.empty(self.shape, dtype=dtype, device=device))
        self.reset_parameters(generator=generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw a fresh mean and set the std to ``init_std``."""
        with torch.no_grad():
            self.mu.copy_(_fresh_mean(self.shape, self.mu.dtype, self.mu.device, generator))
            self._reset_rho()

    def _reset_rho(self) -> None:
        with torch.no_grad():
            self.rho.copy_(inverse_softplus(torch.full_like(self.rho, self.init_std)))

    @property
    def sigma(self) -> Tensor:
        """``softplus(rho)``."""
        return F.softplus(self.rho)

    @property
    def distribution(self) -> torch.distributions.Normal:
        """``Normal(mu, sigma)``."""
        return torch.distributions.Normal(self.mu, self.sigma)

    def sample_parameters(self, num_samples: int | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        """``mu + sigma * eps`` (reparameterised)."""
        num = None if num_samples is None else positive_int(num_samples, "num_samples")
        return diag_normal(self.mu, self.sigma, num, generator=generator)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, dtype={self.dtype}"


@POSTERIORS.register("pretrained_gaussian")
class PretrainedGaussianPosterior(GaussianPosterior):
    """Diagonal Gaussian centred on a given (e.g. pretrained) parameter: ``mu = param``, ``sigma = softplus(rho)``.

    Parameters
    ----------
    param : Tensor
        The value the mean starts at (copied; the tensor is not kept).
    init_std : float, default softplus(-3)
        Initial std.
    """

    def __init__(self, param: Tensor, *, init_std: float = DEFAULT_INIT_STD) -> None:
        if not isinstance(param, Tensor) or not param.is_floating_point():
            raise TypeError(f"param must be a floating-point Tensor, got {param!r:.60}")
        VariationalPosterior.__init__(self, param.shape, dtype=param.dtype, device=param.device)
        self.init_std = positive_float(init_std, "init_std")
        self.mu = nn.Parameter(param.detach().clone())
        self.rho = nn.Parameter(torch.empty_like(self.mu))
        self._reset_rho()

    @classmethod
    def from_param(cls, param: Tensor, **kwargs: Any) -> "PretrainedGaussianPosterior":
        """The posterior centred on ``param``."""
        return cls(param, **kwargs)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Reset the std to ``init_std``; the mean keeps its value (torchbayesian's behaviour)."""
        self._reset_rho()
