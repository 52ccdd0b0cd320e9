"""Object-style VI: ``BayesianModule`` and per-parameter variational posteriors, over the functional core.

For people who think in ``nn.Module`` s (the surface of torchbayesian and
deepuq), with the core's scaling, explicit randomness and batched samples::

    model = BayesianModule(net, posterior="pretrained_gaussian", prior=("gaussian", {"std": 0.1}))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)      # the variational parameters
    for x, y in loader:
        opt.zero_grad()
        loss, nll, kl = model.elbo(x, y, num_data=len(dataset))
        loss.backward()
        opt.step()
    summary = predict_vi_uq(model, x_test, n_samples=64, apply_softmax=True)

The wrapped module is never modified: its trainable parameters are copied into
one :class:`VariationalPosterior` each (looked up by name in :data:`POSTERIORS`),
its buffers into the adapter, and the forward runs the module's code as a pure
function of a weight draw (:func:`funcbnn.functionalize`). Priors come from
:data:`funcbnn.priors.PRIORS`. Both registries take new entries with a
decorator, like torchbayesian's ``PosteriorFactory`` / ``PriorFactory``.
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Mapping
from typing import Any, Callable, Literal, Sequence, TypeVar

import optree
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import vi as _vi
from ._registry import Registry
from ._validation import positive_float, positive_int
from .families._kl import check_reduction, prior_log_prob_batched
from .families.diag_gaussian import DiagGaussianState, diag_gaussian, inverse_softplus
from .likelihoods import Likelihood
from .local_reparam import LocalReparamModel, local_reparameterize
from .model import _STATS_LAYERS, functionalize
from .predict import PredictiveSummary, sample_outputs, summarize
from .priors import PRIORS
from .tree import Tree

__all__ = [
    "POSTERIORS",
    "VariationalPosterior",
    "GaussianPosterior",
    "PretrainedGaussianPosterior",
    "BayesianModule",
    "BayesianLinear",
    "BayesByBackpropMLP",
    "predict_vi_uq",
    "vi_elbo_step",
]

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

    Parameters
    ----------
    shape : torch.Size or tuple
        Shape of the parameter this posterior replaces.
    dtype, device : optional
        Those of the parameter.
    """

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
        lead = () if num_samples is None else (positive_int(num_samples, "num_samples"),)
        eps = torch.empty(lead + tuple(self.shape), dtype=self.mu.dtype, device=self.mu.device)
        return self.mu + self.sigma * eps.normal_(generator=generator)

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


_FROM_PARAM_ARGS = {"self", "cls", "shape", "param", "dtype", "device"}


def _accepted_kwargs(entry: Any) -> set[str] | None:
    """Keyword arguments a registered posterior entry takes from the user, or ``None`` if any."""
    is_class = isinstance(entry, type)
    fns = [entry.__init__, entry.from_param] if is_class else [entry]
    names: set[str] = set()
    for i, fn in enumerate(fns):
        params = list(inspect.signature(fn).parameters.values())
        if not is_class:
            params = params[1:]  # the parameter tensor
        for p in params:
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                if is_class and i == 1:
                    continue  # from_param forwarding its keywords to __init__
                return None
            if p.kind is not inspect.Parameter.VAR_POSITIONAL:
                names.add(p.name)
    return names - _FROM_PARAM_ARGS


def _parse_spec(spec: Any, what: str) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
        return spec[0], dict(spec[1])
    raise TypeError(f"{what} must be a registered name or a (name, kwargs) pair, got {spec!r:.80}")


def _posterior_builder(spec: Any, generator: torch.Generator | None) -> tuple[str, Callable[[Tensor], VariationalPosterior]]:
    name, kwargs = _parse_spec(spec, "posterior")
    entry = POSTERIORS.get(name)
    accepted = _accepted_kwargs(entry)
    if accepted is not None:
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise TypeError(
                f"variational posterior {name!r} got unexpected keyword argument(s) {unknown}; "
                f"it takes {sorted(accepted)}"
            )
    if generator is not None and (accepted is None or "generator" in accepted) and "generator" not in kwargs:
        kwargs["generator"] = generator
    if isinstance(entry, type):
        if not issubclass(entry, VariationalPosterior):
            raise TypeError(f"variational posterior {name!r} is registered as {entry.__name__}, not a VariationalPosterior")
        return name, lambda p: entry.from_param(p, **kwargs)
    return name, lambda p: entry(p, **kwargs)


def _is_plain_gaussian(post: VariationalPosterior) -> bool:
    """A Gaussian whose draws and KL the functional diagonal-Gaussian core computes exactly."""
    kind = type(post)
    return (
        isinstance(post, GaussianPosterior)
        and kind.sample_parameters is GaussianPosterior.sample_parameters
        and kind.distribution is GaussianPosterior.distribution
        and kind.sigma is GaussianPosterior.sigma
    )


def _build_prior(prior: Any) -> Any:
    if hasattr(prior, "log_prob"):
        return prior  # an already built prior object (the built-in ones are NamedTuples, so test this first)
    name, kwargs = _parse_spec(prior, "prior")
    return PRIORS.build(name, **kwargs)


def _key(name: str) -> str:
    """A module-dict key for a dotted parameter name (``fc.weight`` -> ``fc:weight``)."""
    return name.replace(".", ":")


# ---------------------------------------------------------------------------------------------
# the adapter


class BayesianModule(nn.Module):
    """Turn any ``nn.Module`` into a Bayesian neural network trained by Bayes-by-Backprop (Blundell et al. 2015).

    Unlike torchbayesian's adapter of the same name, ``module`` itself is left
    untouched: its trainable parameters are copied into one variational
    posterior each, and the forward evaluates the module's code at a weight
    draw. Weight draws, the ELBO and the KL are those of the functional core
    (:mod:`funcbnn.vi`, :func:`funcbnn.families.diag_gaussian`), so the two APIs
    give the same numbers for the same generator state.

    ``train()`` / ``eval()`` reach the wrapped network's layers (dropout is active
    in train mode), except batch- and instance-norm layers: a Bayesian forward is
    a function of the weights alone, so they always normalise with the running
    statistics the module had when wrapped (wrap a network whose statistics were
    estimated). Frozen parameters (``requires_grad=False``) stay deterministic and
    are saved in ``state_dict`` with the buffers.

    Parameters
    ----------
    module : nn.Module
        The network. Parameters with ``requires_grad=False`` stay deterministic.
    posterior : str or (str, dict), default "gaussian"
        A name in :data:`POSTERIORS` with its keyword arguments:
        ``"gaussian"`` (fresh mean ``U(+-1/sqrt(fan_in))``, ``init_std``) or
        ``"pretrained_gaussian"`` (mean = the module's parameter, ``init_std``).
    prior : str or (str, dict) or prior object, default "gaussian"
        A name in :data:`funcbnn.priors.PRIORS` with its keyword arguments
        (``("gaussian", {"std": 0.1})``, ``("scale_mixture", {"pi": 0.5})``) or a
        built prior (:func:`funcbnn.priors.gaussian`).
    local_reparam : bool, default False
        Sample the pre-activations of Linear and Conv layers instead of their
        weights (Kingma et al. 2015) in :meth:`forward`, :meth:`elbo` and
        :meth:`sample_outputs`; needs Gaussian posteriors.
    verbose : bool, default False
        Print which parameters became Bayesian and how the KL is computed.
    generator : torch.Generator, optional
        Randomness of the posteriors' initialisation.

    Attributes
    ----------
    posteriors : nn.ModuleDict
        One :class:`VariationalPosterior` per parameter, keyed by its dotted
        name with ``.`` replaced by ``:``. ``parameters()`` are theirs.
    prior : prior object
    apply_fn : FunctionalModel or LocalReparamModel
        ``apply_fn(params, x)``: the module as a pure function of a weight tree.

    Raises
    ------
    TypeError, ValueError
        For a non-module, an unknown posterior or prior name (the error lists
        the registered names) or a keyword argument the entry does not take
        (the error names it).
    """

    def __init__(
        self,
        module: nn.Module,
        posterior: Spec = "gaussian",
        prior: Any = "gaussian",
        *,
        local_reparam: bool = False,
        verbose: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        posterior_name, build = _posterior_builder(posterior, generator)
        self.prior = _build_prior(prior)
        functional = local_reparameterize(module) if local_reparam else functionalize(module)
        self.apply_fn, params, _ = functional
        if not params:
            raise ValueError("module has no trainable parameters to put a posterior over")
        posteriors = {}
        for name, param in params.items():
            post = build(param)
            if not isinstance(post, VariationalPosterior):
                raise TypeError(
                    f"posterior {posterior_name!r} must build a VariationalPosterior, got {type(post).__name__}"
                )
            if post.shape != param.shape:
                raise ValueError(
                    f"posterior {posterior_name!r} for parameter '{name}' has shape {tuple(post.shape)}, "
                    f"expected {tuple(param.shape)}"
                )
            posteriors[_key(name)] = post
        self.posteriors = nn.ModuleDict(posteriors)
        self._names = list(params)
        self._gaussian = all(_is_plain_gaussian(p) for p in posteriors.values())
        if local_reparam and not self._gaussian:
            raise ValueError("local_reparam=True needs Gaussian posteriors ('gaussian' or 'pretrained_gaussian')")
        self.local_reparam = bool(local_reparam)
        self.model_buffers = nn.Module()
        for name, buf in self._functional.buffers.items():
            self.model_buffers.register_buffer(_key(name), buf)
        self.model_frozen = nn.Module()
        for name, value in self._functional.frozen.items():
            self.model_frozen.register_buffer(_key(name), value)
        self.train(module.training)  # start in the wrapped module's mode
        self._posterior_name = posterior_name
        self._module_name = type(module).__name__
        if verbose:
            numel = sum(p.numel() for p in params.values())
            if not self._gaussian:
                how = "analytic where torch.distributions has the pair's KL, else Monte Carlo"
            elif "gaussian" in getattr(self.prior, "closed_forms", ()):
                how = "analytic"
            else:
                how = "Monte Carlo (pass approx_num_samples)"
            print(
                f"BayesianModule({self._module_name}): {len(params)} parameter tensors ({numel} weights) "
                f"under posterior {posterior_name!r}, prior {type(self.prior).__name__}; KL {how}"
                + (f"; local reparameterisation in layers {self.apply_fn.local_layers}" if local_reparam else "")
            )
            for name in params:
                print(f"  {name}: {tuple(params[name].shape)}")

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def _family(self):
        # Built on use rather than stored: the family's functions are closures, which would make
        # the module unpicklable.
        return diag_gaussian()

    @property
    def _functional(self):
        fn = self.apply_fn
        return fn.functional if isinstance(fn, LocalReparamModel) else fn

    def _sync(self) -> None:
        """Point the functional model at the registered frozen parameters and buffers."""
        functional = self._functional
        functional.frozen = {name: getattr(self.model_frozen, _key(name)) for name in functional.frozen}
        functional.buffers = {name: getattr(self.model_buffers, _key(name)) for name in functional.buffers}

    def _apply(self, fn, recurse=True):  # keeps the frozen parameters and buffers on the module's device/dtype
        super()._apply(fn, recurse)
        self._sync()
        return self

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._sync()  # ``assign=True`` replaces the registered tensors
        return result

    def train(self, mode: bool = True) -> "BayesianModule":
        super().train(mode)
        for sub in self._functional.module.modules():
            if not isinstance(sub, _STATS_LAYERS):
                sub.training = mode
        return self

    def posterior(self, name: str) -> VariationalPosterior:
        """The variational posterior of the parameter with dotted name ``name``."""
        try:
            return self.posteriors[_key(name)]
        except KeyError:
            raise ValueError(f"unknown parameter {name!r}; parameters: {', '.join(self._names)}") from None

    def state(self) -> DiagGaussianState:
        """The posterior as a functional :class:`~funcbnn.families.DiagGaussianState`.

        Its leaves *are* the ``mu`` and ``rho`` parameters (no copy), so gradients
        of anything computed from it reach this module's parameters.
        """
        if not self._gaussian:
            raise TypeError("state() needs Gaussian posteriors; this module uses " + repr(self._posterior_name))
        posts = [self.posteriors[_key(n)] for n in self._names]
        return DiagGaussianState(
            {n: p.mu for n, p in zip(self._names, posts)}, {n: p.rho for n, p in zip(self._names, posts)}
        )

    # -- sampling and forward -------------------------------------------------------------------

    def sample_parameters(self, num_samples: int | None = None, *, generator: torch.Generator | None = None) -> Tree:
        """A weight tree ``{name: tensor}`` drawn from the posterior (leading axis ``num_samples`` if given).

        Differentiable (reparameterised). Gaussian posteriors draw exactly what
        ``diag_gaussian().rsample(self.state(), ...)`` draws for the same generator state.
        """
        if self._gaussian:
            num = 1 if num_samples is None else positive_int(num_samples, "num_samples")
            draws = self._family.rsample(self.state(), num, generator=generator)
            return draws if num_samples is not None else optree.tree_map(lambda t: t[0], draws)
        return {n: self.posteriors[_key(n)].sample_parameters(num_samples, generator=generator) for n in self._names}

    def mean_parameters(self) -> Tree:
        """The posterior means ``{name: tensor}`` (the distributions' ``mean``)."""
        return {n: self.posteriors[_key(n)].distribution.mean for n in self._names}

    def sample_outputs(
        self,
        x: Any,
        num_samples: int = 1,
        *,
        generator: torch.Generator | None = None,
        method: Literal["auto", "vmap", "loop"] = "auto",
    ) -> Tensor:
        """Outputs ``(S, N, ...)`` at ``num_samples`` fresh draws, differentiable (for custom losses).

        Weight draws run as one vmapped forward or a loop, whichever is faster
        (see :func:`funcbnn.vi.elbo`); with ``local_reparam`` the pre-activations are sampled.
        """
        num = positive_int(num_samples, "num_samples")
        if self.local_reparam:
            return self.apply_fn.sample_outputs_local(self.state(), x, num, generator=generator)
        samples = self.sample_parameters(num, generator=generator)
        return _vi._sampled_outputs(self.apply_fn, samples, x, None, num, method)

    def forward(self, x: Any, sample: bool = True, *, generator: torch.Generator | None = None) -> Any:
        """The module's output at a fresh weight draw (at the posterior mean if ``sample=False``)."""
        if not sample:
            return self.apply_fn(self.mean_parameters(), x)
        if self.local_reparam:
            return self.apply_fn.sample_outputs_local(self.state(), x, 1, generator=generator)[0]
        return self.apply_fn(self.sample_parameters(generator=generator), x)

    # -- KL and ELBO ----------------------------------------------------------------------------

    def kl_divergence(
        self,
        *,
        reduction: Literal["sum", "mean"] = "sum",
        approx_num_samples: int | None = None,
        method: Literal["auto", "analytic", "mc"] = "auto",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``KL(q || prior)`` over all Bayesian parameters.

        Analytic where the (posterior, prior) pair has a closed form (Gaussian
        posterior and Gaussian prior), Monte Carlo with ``approx_num_samples``
        reparameterised draws otherwise (the scale-mixture prior of Blundell et
        al. 2015 has none); as in the core, ``approx_num_samples`` is used only
        where Monte Carlo is needed, unless ``method="mc"``.

        Parameters
        ----------
        reduction : {"sum", "mean"}
            ``"mean"`` divides by the number of weights (torchbayesian's option;
            the ELBO needs ``"sum"``).
        approx_num_samples : int, optional
            Draws for a Monte-Carlo estimate.
        method : {"auto", "analytic", "mc"}
        generator : torch.Generator, optional

        Raises
        ------
        ValueError
            For a bad ``reduction``, or a pair without closed form and no ``approx_num_samples``.
        """
        check_reduction(reduction)
        if method not in ("auto", "analytic", "mc"):
            raise ValueError(f"method must be 'auto', 'analytic' or 'mc', got {method!r}")
        if approx_num_samples is not None:
            approx_num_samples = positive_int(approx_num_samples, "approx_num_samples")
        if self._gaussian:
            closed = method != "mc" and "gaussian" in getattr(self.prior, "closed_forms", ())
            if not closed and approx_num_samples is None and method != "analytic":
                raise ValueError(
                    f"KL(posterior || {type(self.prior).__name__}) is computed by Monte Carlo; "
                    "pass approx_num_samples=..."
                )
            return self._family.kl(
                self.state(),
                self.prior,
                reduction=reduction,
                method=method,
                num_samples=approx_num_samples,
                generator=generator,
            )
        return self._generic_kl(reduction, approx_num_samples, method, generator)

    def kl(self) -> Tensor:
        """``kl_divergence()`` (deepuq's name)."""
        return self.kl_divergence()

    def _generic_kl(self, reduction, num_samples, method, generator) -> Tensor:
        posts = {n: self.posteriors[_key(n)] for n in self._names}
        dists = {n: p.distribution for n, p in posts.items()}
        numel = sum(p.shape.numel() for p in posts.values())
        total = None
        if method != "mc" and "gaussian" in getattr(self.prior, "closed_forms", ()):
            like = {n: d.mean for n, d in dists.items()}
            p_mean, p_std = self.prior.moments(like)
            try:
                terms = [
                    torch.distributions.kl_divergence(d, torch.distributions.Normal(p_mean[n], p_std[n])).sum()
                    for n, d in dists.items()
                ]
                total = torch.stack(terms).sum()
            except NotImplementedError:
                total = None
        if total is None:
            if method == "analytic":
                raise ValueError(f"KL(posterior || {type(self.prior).__name__}) has no closed form; use method='mc'")
            if num_samples is None:
                raise ValueError(
                    f"KL(posterior || {type(self.prior).__name__}) has no closed form; "
                    "pass approx_num_samples=... for a Monte-Carlo estimate"
                )
            draws = {n: p.sample_parameters(num_samples, generator=generator) for n, p in posts.items()}
            log_q = sum(
                dists[n].log_prob(draws[n]).reshape(num_samples, -1).sum(1) for n in self._names
            )
            total = (log_q - prior_log_prob_batched(self.prior, draws)).mean()
        return total / numel if reduction == "mean" else total

    def elbo(
        self,
        x: Any,
        y: Tensor,
        num_data: int,
        *,
        likelihood: str | Likelihood = "categorical",
        num_samples: int = 1,
        kl_weight: float = 1.0,
        generator: torch.Generator | None = None,
        method: Literal["auto", "vmap", "loop"] = "auto",
        kl_samples: int | None = None,
    ) -> _vi.ELBOInfo:
        """The minibatch loss ``mean NLL + kl_weight * KL / num_data`` and its terms; see :func:`funcbnn.vi.elbo`.

        For Gaussian posteriors this *is* ``vi.elbo(model.apply_fn, diag_gaussian(),
        model.state(), model.prior, (x, y), num_data, ...)``: the same loss for the
        same generator state.
        """
        if self._gaussian:
            return _vi.elbo(
                self.apply_fn,
                self._family,
                self.state(),
                self.prior,
                (x, y),
                num_data,
                likelihood=likelihood,
                num_samples=num_samples,
                kl_weight=kl_weight,
                generator=generator,
                method=method,
                kl_samples=kl_samples,
            )
        x, y = _vi._check_batch((x, y))
        num_data = _vi._check_num_data(num_data, y.shape[0])
        weight = _vi._check_kl_weight(kl_weight)
        num = positive_int(num_samples, "num_samples")
        lik = _vi.get_likelihood(likelihood)
        nll = _vi._mean_nll(lik, self.sample_outputs(x, num, generator=generator, method=method), y, True)
        kl = self.kl_divergence(approx_num_samples=kl_samples or num, generator=generator)
        return _vi.ELBOInfo(nll + (weight / num_data) * kl, nll, kl)

    def extra_repr(self) -> str:
        return (
            f"module={self._module_name}, posterior={self._posterior_name!r}, "
            f"prior={type(self.prior).__name__}, local_reparam={self.local_reparam}"
        )


# ---------------------------------------------------------------------------------------------
# deepuq-style conveniences


class BayesianLinear(BayesianModule):
    """A Bayes-by-Backprop linear layer: ``BayesianModule(nn.Linear(in_features, out_features))``.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    prior_sigma : float, default 0.1
        Std of the zero-mean Gaussian prior on every weight (deepuq's default).
    posterior : str or (str, dict), default "gaussian"
    local_reparam : bool, default False
        Sample pre-activations (Kingma et al. 2015).
    dtype, device : optional
    generator : torch.Generator, optional
        Randomness of the initialisation.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        prior_sigma: float = 0.1,
        posterior: Spec = "gaussian",
        local_reparam: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        in_features = positive_int(in_features, "in_features")
        out_features = positive_int(out_features, "out_features")
        layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
        super().__init__(
            layer,
            posterior,
            ("gaussian", {"std": positive_float(prior_sigma, "prior_sigma")}),
            local_reparam=local_reparam,
            generator=generator,
        )
        self.in_features, self.out_features = in_features, out_features


class BayesByBackpropMLP(BayesianModule):
    """A Bayes-by-Backprop MLP ``input_dim -> hidden_dims... -> output_dim`` (Blundell et al. 2015).

    One :class:`BayesianModule` over an ``nn.Sequential`` of Linear layers and
    activations, so all layers are drawn and evaluated together.

    Parameters
    ----------
    input_dim : int
    hidden_dims : sequence of int
    output_dim : int
    prior_sigma : float, default 0.1
        Std of the zero-mean Gaussian prior (deepuq's default).
    activation : callable, default nn.ReLU
        Builds the activation module between layers.
    posterior : str or (str, dict), default "gaussian"
    local_reparam : bool, default False
    generator : torch.Generator, optional
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        output_dim: int,
        prior_sigma: float = 0.1,
        *,
        activation: Callable[[], nn.Module] = nn.ReLU,
        posterior: Spec = "gaussian",
        local_reparam: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        dims = [positive_int(input_dim, "input_dim")]
        dims += [positive_int(h, f"hidden_dims[{i}]") for i, h in enumerate(hidden_dims)]
        dims.append(positive_int(output_dim, "output_dim"))
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(activation())
        super().__init__(
            nn.Sequential(*layers),
            posterior,
            ("gaussian", {"std": positive_float(prior_sigma, "prior_sigma")}),
            local_reparam=local_reparam,
            generator=generator,
        )
        self.dims = tuple(dims)


def _check_model(model: Any) -> BayesianModule:
    if not isinstance(model, BayesianModule):
        raise TypeError(f"model must be a funcbnn BayesianModule, got {type(model).__name__}")
    return model


def predict_vi_uq(
    model: BayesianModule,
    x: Any,
    n_samples: int = 50,
    apply_softmax: bool = False,
    aleatoric_var: Tensor | float | None = None,
    *,
    generator: torch.Generator | None = None,
) -> PredictiveSummary:
    """Monte-Carlo predictive summary of a Bayes-by-Backprop model (deepuq's ``predict_vi_uq``).

    Draws ``n_samples`` weight trees and evaluates them in one batched call
    (:func:`funcbnn.sample_outputs`), then summarises with :func:`funcbnn.summarize`.

    Parameters
    ----------
    model : BayesianModule
    x : Tensor
        Inputs.
    n_samples : int, default 50
    apply_softmax : bool, default False
        Outputs are class logits: summarise mean probabilities, their variance,
        entropy and mutual information (``likelihood="classification"``).
        Otherwise they are regression means.
    aleatoric_var : Tensor or float, optional
        Regression only: observation-noise variance added to the epistemic
        variance (``total_var = epistemic_var + aleatoric_var``).
    generator : torch.Generator, optional

    Returns
    -------
    PredictiveSummary
    """
    model = _check_model(model)
    n_samples = positive_int(n_samples, "n_samples")
    if apply_softmax and aleatoric_var is not None:
        raise ValueError("aleatoric_var applies to regression; with apply_softmax=True it comes from the probabilities")
    with torch.no_grad():
        samples = model.sample_parameters(n_samples, generator=generator)
        outputs = sample_outputs(model.apply_fn, samples, x)
    if apply_softmax:
        return summarize(outputs, "classification")
    summary = summarize(outputs, "regression")
    if aleatoric_var is None:
        return summary
    av = torch.as_tensor(aleatoric_var, dtype=summary.mean.dtype, device=summary.mean.device)
    if bool((av < 0).any()) or not bool(torch.isfinite(av).all()):
        raise ValueError("aleatoric_var must be finite and non-negative")
    try:
        av = torch.broadcast_to(av, summary.mean.shape)
    except RuntimeError:
        raise ValueError(
            f"aleatoric_var of shape {tuple(av.shape)} does not broadcast to the outputs {tuple(summary.mean.shape)}"
        ) from None
    return summary._replace(aleatoric_var=av, total_var=summary.epistemic_var + av)


def vi_elbo_step(
    model: BayesianModule,
    x: Any,
    y: Tensor,
    num_batches: int,
    criterion: Callable[[Tensor, Tensor], Tensor] | str | Likelihood | None = None,
    kl_weight: float = 1.0,
    mc_samples: int = 1,
    *,
    num_data: int | None = None,
    generator: torch.Generator | None = None,
) -> _vi.ELBOInfo:
    """deepuq's ``vi_elbo_step`` with the ELBO scaled correctly: ``(loss, nll, kl)`` of one minibatch.

    ``loss = nll + kl_weight * KL / num_data`` with ``num_data = num_batches *
    len(y)`` (pass ``num_data`` when the last batch is smaller): summed over an
    epoch this is the negative ELBO / N (Blundell et al. 2015). deepuq returns
    ``nll + kl_weight * KL / num_batches``, whose KL term is ``len(y)`` times
    too strong relative to the batch-mean NLL (a prior that weighs like the
    data set multiplied by the batch size), and its ``kl`` output is that
    scaled ``KL / num_batches``; here ``kl`` is the whole ``KL(q || p)``.

    Parameters
    ----------
    model : BayesianModule
    x, y : minibatch
    num_batches : int
        Minibatches per epoch (``len(train_loader)``).
    criterion : callable or likelihood, optional
        A batch-mean loss ``criterion(outputs, targets)`` such as
        ``nn.CrossEntropyLoss()`` or ``nn.MSELoss()``, or a funcbnn likelihood
        (name or object). Default: the categorical likelihood (cross-entropy).
    kl_weight : float, default 1.0
    mc_samples : int, default 1
        Weight draws averaged in the NLL (one batched forward).
    num_data : int, optional
        The data-set size, overriding ``num_batches * len(y)``.
    generator : torch.Generator, optional

    Returns
    -------
    ELBOInfo
        ``loss`` keeps its graph for ``backward()``; ``nll`` and ``kl`` are detached.
    """
    model = _check_model(model)
    num_batches = positive_int(num_batches, "num_batches")
    if not isinstance(y, Tensor) or y.dim() == 0:
        raise TypeError("y must be a Tensor with a leading batch axis")
    n = positive_int(num_batches * y.shape[0], "num_batches * len(y)") if num_data is None else num_data
    mc_samples = positive_int(mc_samples, "mc_samples")
    if criterion is None or isinstance(criterion, (str, Likelihood)):
        info = model.elbo(
            x,
            y,
            n,
            likelihood="categorical" if criterion is None else criterion,
            num_samples=mc_samples,
            kl_weight=kl_weight,
            generator=generator,
        )
    else:
        if not callable(criterion):
            raise TypeError(f"criterion must be callable or a likelihood, got {type(criterion).__name__}")
        n = _vi._check_num_data(n, y.shape[0])
        weight = _vi._check_kl_weight(kl_weight)
        outputs = model.sample_outputs(x, mc_samples, generator=generator)
        flat = outputs.reshape(mc_samples * outputs.shape[1], *outputs.shape[2:])
        targets = y.expand(mc_samples, *y.shape).reshape(mc_samples * y.shape[0], *y.shape[1:])
        nll = criterion(flat, targets)
        if not isinstance(nll, Tensor) or nll.dim() != 0:
            raise ValueError("criterion must return a scalar (a batch-mean loss such as nn.CrossEntropyLoss())")
        kl = model.kl_divergence(approx_num_samples=mc_samples, generator=generator)
        info = _vi.ELBOInfo(nll + (weight / n) * kl, nll, kl)
    return _vi.ELBOInfo(info.loss, info.nll.detach(), info.kl.detach())
