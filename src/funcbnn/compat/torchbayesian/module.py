"""torchbayesian's ``BayesianModule`` on :class:`funcbnn.nn.BayesianModule`."""

from __future__ import annotations

import re
import warnings
from typing import Any, Literal, Mapping, NamedTuple

import optree
import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Normal
from torch.distributions.kl import kl_divergence as _torch_kl

from ... import priors as _priors
from ...checks import check_finite
from ...nn import BayesianModule as _NativeBayesianModule
from ...nn.posteriors import POSTERIORS, _global_rng_from
from ...tree import Tree
from .posteriors import VariationalPosterior
from .priors import GaussianPrior
from .utils import PosteriorFactory, PriorFactory, _split_spec, get_prior

__all__ = ["BayesianModule", "FactoryPrior"]


@POSTERIORS.register("torchbayesian")
def _from_posterior_factory(
    param: Tensor,
    *,
    name: str = "NORMAL",
    kwargs: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> VariationalPosterior:
    """A posterior from torchbayesian's ``PosteriorFactory``, for the native ``BayesianModule``.

    ``funcbnn.nn.BayesianModule(net, posterior=("torchbayesian", {"name": "normal"}))``
    uses torchbayesian's initialisation; ``generator`` seeds it instead of the global RNG.
    """
    cls = PosteriorFactory[name]
    with _global_rng_from(generator, param.device):
        return cls.from_param(param=param, **dict(kwargs or {}))


class FactoryPrior(NamedTuple):
    """A prior registered in ``PriorFactory`` (other than the Gaussian), as a prior over a parameter tree.

    Each leaf gets ``PriorFactory[name](shape=leaf.shape, dtype, device, **kwargs)``;
    ``log_prob`` sums their elementwise log densities. KL against it is per
    parameter, analytic where ``torch.distributions`` registers the pair, Monte
    Carlo otherwise (torchbayesian's rule).
    """

    name: str
    kwargs: dict

    closed_forms = frozenset()

    def distribution(self, like: Tensor) -> Distribution:
        """The elementwise distribution for a parameter shaped like ``like``."""
        return get_prior(
            like.shape, (self.name, self.kwargs), dtype=like.dtype, device=like.device
        ).distribution

    def log_prob(self, params: Tree) -> Tensor:
        """Sum of the log densities of every element of ``params``."""
        terms = [self.distribution(t).log_prob(t).sum() for t in optree.tree_leaves(params)]
        return torch.stack(terms).sum()


def _native_prior(spec: Any) -> Any:
    """torchbayesian's prior spec as a prior over the parameter tree."""
    name, kwargs = _split_spec(spec, "prior")
    cls = PriorFactory[name]
    if cls is GaussianPrior:
        unknown = sorted(set(kwargs) - {"mu", "sigma"})
        if unknown:
            raise TypeError(
                f"prior {name!r} got unexpected keyword argument(s) {unknown}; it takes ['mu', 'sigma']"
            )
        mu, sigma = kwargs.get("mu"), kwargs.get("sigma")
        return _priors.gaussian(std=1.0 if sigma is None else sigma, mean=0.0 if mu is None else mu)
    get_prior((1,), (name, kwargs))  # fail now on a bad spec, not at the first KL
    return FactoryPrior(name, kwargs)


def _has_closed_form(q: Distribution, p: Distribution) -> bool:
    try:
        _torch_kl(q, p)
    except NotImplementedError:
        return False
    return True


# torchbayesian's state-dict keys: the reparametrised module's posterior parameters and buffers.
_POSTERIOR_KEY = re.compile(r"module\.(?:(.+)\.)?reparametrizations\.([^.]+)\.variational_posterior\.(.+)")


class _ModuleView(nn.Module):
    """``BayesianModule.module``: the wrapped network as torchbayesian exposes it.

    Calling it runs the network at a fresh weight draw, and its parameters are
    the variational ones (as after torchbayesian's in-place reparametrisation).
    Other attributes (submodules, settings) come from the original module,
    which funcbnn leaves untouched: its own tensors keep their original values.
    """

    def __init__(self, owner: "BayesianModule", original: nn.Module) -> None:
        super().__init__()
        # Kept out of the module tree, so the view registers no parameters of its own.
        self.__dict__["_owner"] = owner
        self.__dict__["_original"] = original

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._owner(*args, **kwargs)

    def named_parameters(self, *args: Any, **kwargs: Any):
        return self._owner.named_parameters(*args, **kwargs)

    def parameters(self, recurse: bool = True):
        return self._owner.parameters(recurse)

    def train(self, mode: bool = True) -> "_ModuleView":
        self._owner.train(mode)
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)

    # Containers (``nn.Sequential``, ``nn.ModuleList``) index and iterate as the original does.
    def __getitem__(self, index: Any) -> Any:
        return self.__dict__["_original"][index]

    def __len__(self) -> int:
        return len(self.__dict__["_original"])

    def __iter__(self):
        return iter(self.__dict__["_original"])

    def __repr__(self) -> str:
        return f"Reparametrized({self.__dict__['_original']!r})"


class BayesianModule(_NativeBayesianModule):
    """torchbayesian's ``bnn.BayesianModule``: Bayes-by-Backprop over any ``nn.Module`` (Blundell et al. 2015).

    Same constructor, defaults and numbers as torchbayesian 0.2: a
    ``GaussianPosterior`` per trainable parameter (``mu ~ N(0, 0.1^2)`` from the
    global RNG, ``rho = -3``), a ``N(0, 1)`` prior, ``forward`` at a fresh draw,
    ``kl_divergence(reduction="sum"|"mean", approx_num_samples=...)``. It is the
    native :class:`funcbnn.nn.BayesianModule` underneath, so the draws, the KL,
    :meth:`elbo`, :meth:`sample_outputs` (batched) and an explicit ``generator=``
    are there too.

    For the same seed the initialisation and the forward draws are
    torchbayesian's. Differences from torchbayesian, all deliberate:

    - ``module`` is not modified in place: calling the original network still
      gives its deterministic output, and :attr:`module` is a view that runs the
      Bayesian forward (torchbayesian replaces the network's parameters).
    - Parameters with ``requires_grad=False`` stay deterministic (torchbayesian
      makes them Bayesian and trainable too).
    - ``kl_divergence(reduction="mean")`` divides by the number of weights, as
      torchbayesian's does; the ELBO needs ``"sum"``, divided by the data-set
      size: ``loss = nll + kl_divergence() / N`` (or :meth:`elbo`). torchbayesian's
      example, ``mse + 0.1 * kl_divergence(reduction="mean")``, weighs the KL
      ``0.1 * N / P`` times the ELBO's (P weights, N examples).
    - The Monte-Carlo KL draws from the posterior through
      :func:`funcbnn.tree.diag_normal` (the same estimator, other draws), and
      so do :meth:`sample_outputs` and :meth:`elbo` (batched).
    - A torchbayesian checkpoint (``module.<...>.reparametrizations.<...>`` keys)
      loads with :meth:`load_state_dict`.

    Parameters
    ----------
    module : nn.Module
        The network.
    variational_posterior : str or (str, dict), optional
        A name in ``PosteriorFactory`` (case-insensitive) and its keyword
        arguments. Default ``"NORMAL"`` (:class:`GaussianPosterior`).
    prior : str or (str, dict), optional
        A name in ``PriorFactory`` and its keyword arguments. Default
        ``("NORMAL", {"mu": 0., "sigma": 1.})``. Gaussian priors become
        :func:`funcbnn.priors.gaussian` (analytic KL in the core).
    dtype, device : optional
        Of the KL result (torchbayesian's accumulator); prefer ``.to(...)``.
    verbose : bool, default False
        Print the parameters that became Bayesian. ``debug=`` is an alias.
    generator : torch.Generator, optional
        Seeds the posteriors' initialisation instead of the global RNG.
    local_reparam : bool, default False
        Local reparameterisation in Linear/Conv layers (Kingma et al. 2015).

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(1, 20), nn.ReLU(), nn.Linear(20, 1))
    >>> model = BayesianModule(net)
    >>> x = torch.linspace(-1, 1, 8).unsqueeze(1)
    >>> loss = ((model(x) - x) ** 2).mean() + 0.1 * model.kl_divergence(reduction="mean")
    >>> loss.backward()
    """

    def __init__(
        self,
        module: nn.Module,
        variational_posterior: str | tuple[str, dict[str, Any]] | None = None,
        prior: str | tuple[str, dict[str, Any]] | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | int | None = None,
        verbose: bool = False,
        debug: bool = False,
        generator: torch.Generator | None = None,
        local_reparam: bool = False,
    ) -> None:
        if variational_posterior is None:
            variational_posterior = "NORMAL"
        if prior is None:
            prior = ("NORMAL", {"mu": 0.0, "sigma": 1.0})
        name, kwargs = _split_spec(variational_posterior, "variational_posterior")
        PosteriorFactory[name]  # an unknown name raises torchbayesian's KeyError listing the known ones
        original_training = module.training
        super().__init__(
            module,
            ("torchbayesian", {"name": name, "kwargs": kwargs}),
            _native_prior(prior),
            local_reparam=local_reparam,
            verbose=verbose or debug,
            generator=generator,
        )
        self.register_buffer("_kl_meta", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self.__dict__["_original"] = module
        self.train(original_training)

    @property
    def module(self) -> nn.Module:
        """The wrapped network as torchbayesian exposes it (see :class:`_ModuleView`)."""
        return _ModuleView(self, self.__dict__["_original"])

    def forward(self, input: Any, *, generator: torch.Generator | None = None) -> Any:
        """The network's output at a fresh weight draw (global RNG, or ``generator``).

        From the global RNG each parameter is drawn in turn, in the order of
        ``named_parameters()``: the order in which torchbayesian draws them for
        networks whose layers read their weight before their bias (Linear,
        Conv, ...), so a seed gives torchbayesian's numbers.

        Raises
        ------
        funcbnn.checks.NonFiniteError
            For NaN or infinite values in ``input`` (unless
            :func:`funcbnn.checks.set_finite_checks` is off): torchbayesian
            would return NaN outputs.
        ValueError
            For an input the wrapped network cannot take (torch's error chained).
        """
        check_finite(input, "input", context="BayesianModule")
        if generator is not None or self.local_reparam:
            return super().forward(input, generator=generator)
        weights = {key.replace(":", "."): post.sample_parameters() for key, post in self.posteriors.items()}
        with self._guarded(input, "BayesianModule"):
            return self.apply_fn(weights, input)

    def kl_divergence(
        self,
        *,
        reduction: Literal["sum", "mean"] = "sum",
        approx_num_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``KL(posterior || prior)`` over all Bayesian parameters, as torchbayesian computes it.

        Analytic where the (posterior, prior) pair has a closed form; with
        ``approx_num_samples`` it is a Monte-Carlo estimate (and a ``UserWarning``
        when a closed form exists, as in torchbayesian).

        Parameters
        ----------
        reduction : {"sum", "mean"}
            ``"sum"`` is the KL of the ELBO; ``"mean"`` divides it by the number of
            weights (case-insensitive, as torchbayesian).
        approx_num_samples : int, optional
            Draws of the Monte-Carlo estimate.
        generator : torch.Generator, optional
            Randomness of the Monte-Carlo estimate.

        Raises
        ------
        ValueError
            For a bad ``reduction``, or no closed form and no ``approx_num_samples``.
        """
        if not isinstance(reduction, str) or reduction.lower() not in ("sum", "mean"):
            raise ValueError(f"Invalid reduction type: '{reduction}'. Expected 'mean' or 'sum'.")
        reduction = reduction.lower()
        if isinstance(self.prior, FactoryPrior):
            kl = self._factory_prior_kl(reduction, approx_num_samples, generator)
        else:
            if approx_num_samples is not None and self._closed_form():
                warnings.warn(
                    "You are using a Monte Carlo approximation of the KL div, but an analytical solution is "
                    "implemented for this posterior and prior. It is recommended that you set 'approx_num_samples' "
                    "to None and use the default analytical solution instead.",
                    UserWarning,
                    stacklevel=2,
                )
            kl = super().kl_divergence(
                reduction=reduction,
                approx_num_samples=approx_num_samples,
                method="auto" if approx_num_samples is None else "mc",
                generator=generator,
            )
        return kl.to(dtype=self._kl_meta.dtype, device=self._kl_meta.device)

    def _closed_form(self) -> bool:
        if self._gaussian:
            return True
        post = next(iter(self.posteriors.values()))
        q = post.distribution
        return _has_closed_form(q, Normal(torch.zeros_like(q.mean), torch.ones_like(q.mean)))

    def _factory_prior_kl(
        self, reduction: str, num_samples: int | None, generator: torch.Generator | None
    ) -> Tensor:
        # torchbayesian's per-parameter rule for priors the core has no closed form for.
        terms, numel, warned = [], 0, False
        for post in self.posteriors.values():
            q = post.distribution
            p = self.prior.distribution(q.mean)
            if _has_closed_form(q, p):
                if num_samples is None:
                    terms.append(_torch_kl(q, p).sum())
                    numel += post.shape.numel()
                    continue
                if not warned:
                    warnings.warn(
                        "You are using a Monte Carlo approximation of the KL div, but an analytical solution is "
                        f"implemented for {type(q).__name__} and {type(p).__name__}.",
                        UserWarning,
                        stacklevel=3,
                    )
                    warned = True
            elif num_samples is None:
                raise ValueError(
                    f"No analytical solution implemented for distributions {type(q)} and {type(p)}. You can use a "
                    "Monte-Carlo approximation instead by specifying the 'approx_num_samples' argument."
                )
            draws = post.sample_parameters(num_samples, generator=generator)
            terms.append((q.log_prob(draws) - p.log_prob(draws)).mean(0).sum())
            numel += post.shape.numel()
        kl = torch.stack(terms).sum()
        return kl / numel if reduction == "mean" else kl

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # Read torchbayesian's keys (``module.<owner>.reparametrizations.<name>.variational_posterior.<p>``
        # and ``module.<buffer>``) as this module's (``posteriors.<owner:name>.<p>``, ``model_buffers.<...>``).
        buffers = {name.replace(".", ":") for name in self._functional.buffers}
        for key in [k for k in state_dict if k.startswith(prefix + "module.")]:
            rest = key[len(prefix) :]
            match = _POSTERIOR_KEY.fullmatch(rest)
            if match:
                owner, name, leaf = match.groups()
                dotted = f"{owner}.{name}" if owner else name
                state_dict[f"{prefix}posteriors.{dotted.replace('.', ':')}.{leaf}"] = state_dict.pop(key)
            elif rest[len("module.") :].replace(".", ":") in buffers:
                state_dict[f"{prefix}model_buffers.{rest[len('module.') :].replace('.', ':')}"] = (
                    state_dict.pop(key)
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
