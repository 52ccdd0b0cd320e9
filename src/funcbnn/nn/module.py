"""``BayesianModule``: object-style Bayes-by-Backprop over any ``nn.Module``, on the functional core."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Literal

import optree
import torch
from torch import Tensor, nn

from .. import vi as _vi
from ..checks import check_finite, guarded_call
from .._validation import positive_int
from ..families._kl import check_reduction, prior_log_prob_batched
from ..families.diag_gaussian import DiagGaussianState, diag_gaussian
from ..likelihoods import Likelihood
from ..local_reparam import LocalReparamModel, local_reparameterize
from ..model import _STATS_LAYERS, functionalize
from ..priors import PRIORS
from ..tree import Tree
from .posteriors import POSTERIORS, GaussianPosterior, VariationalPosterior

__all__ = ["BayesianModule", "Spec"]

Spec = str | tuple[str, Mapping[str, Any]]
"""A posterior or prior by registry name, or ``(name, kwargs)``."""

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
        with self._guarded(x, "BayesianModule.sample_outputs"):
            if self.local_reparam:
                return self.apply_fn.sample_outputs_local(self.state(), x, num, generator=generator)
            samples = self.sample_parameters(num, generator=generator)
            return _vi._sampled_outputs(self.apply_fn, samples, x, None, num, method)

    @contextlib.contextmanager
    def _guarded(self, x: Any, where: str) -> Iterator[None]:
        """:func:`funcbnn.checks.guarded_call`, building the parameter tree only on an error."""
        try:
            yield
        except (RuntimeError, IndexError) as e:
            with guarded_call(x, self.mean_parameters(), "x", where):
                raise e

    def forward(self, x: Any, sample: bool = True, *, generator: torch.Generator | None = None) -> Any:
        """The module's output at a fresh weight draw (at the posterior mean if ``sample=False``).

        Inputs the wrapped module cannot take raise a ``ValueError`` naming ``x``
        (its shape and dtype against the parameters'), with torch's error chained;
        NaN or inf in ``x`` raise :class:`~funcbnn.checks.NonFiniteError`.
        """
        check_finite(x, "x", context="BayesianModule.forward")
        with self._guarded(x, "BayesianModule"):
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
        same generator state. NaN or inf in ``x`` or ``y`` raise
        :class:`~funcbnn.checks.NonFiniteError` (off with
        :func:`funcbnn.checks.set_finite_checks`), inputs the module cannot take a
        ``ValueError`` naming them.
        """
        check_finite(x, "x")
        check_finite(y, "y")
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
