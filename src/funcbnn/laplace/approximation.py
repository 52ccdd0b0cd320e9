"""An object-style front end to :func:`funcbnn.laplace.fit` (incerto's ``LaplaceApproximation`` surface).

The functional API (``fit`` returning a :class:`~funcbnn.laplace.Laplace` of pure
functions and a :class:`~funcbnn.laplace.LaplaceState`) is the core; this class
only holds the pair between ``fit`` and ``predict`` for people who prefer
``model.fit(loader); model.predict(x)``. Its posterior is a family state
(:attr:`LaplaceApproximation.posterior`), sampled by the structure's family.

Differences from incerto worth knowing: incerto builds its diagonal from
squared *batch-mean* gradients and never multiplies by the number of examples,
so its posterior width depends on the batch size; here the curvature is the sum
of per-example terms over the whole data set (Daxberger et al. 2021), so the
same model and data give the same posterior for any batching.

The object pickles, fitted or not (the functions of the fit are closures:
what is saved is the fitted :class:`~funcbnn.laplace.LaplaceState`, the
functional model and the leaves outside the posterior, from which
:func:`~funcbnn.laplace.from_state` rebuilds the same functions on load).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal

import torch
from torch import Tensor, nn

from .._validation import positive_int
from ..likelihoods import Likelihood, get_likelihood
from ..model import functionalize
from ..predict import sample_outputs
from .curvature import Kind
from .fit import Laplace, fit, from_state
from .state import LaplaceState

__all__ = ["LaplaceApproximation", "NotFittedError"]


class NotFittedError(RuntimeError):
    """Raised when a :class:`LaplaceApproximation` is used before :meth:`~LaplaceApproximation.fit`."""


class LaplaceApproximation:
    """Laplace approximation around a trained model's current weights.

    Parameters
    ----------
    model : nn.Module
        A trained network; its current parameters are the MAP estimate. It is
        never modified (the approximation works on a functional copy).
    likelihood : str or Likelihood
        Any likelihood name or alias: ``"classification"`` (categorical over
        logits), ``"regression"`` (Gaussian with noise std ``sigma``),
        ``"binary"`` (Bernoulli), ``"heteroscedastic_regression"``, or the
        distribution names (``"categorical"``, ``"gaussian"``, ...).
    prior_precision : number or Tensor, default 1.0
        Precision of the zero-mean Gaussian prior (scalar or one per leaf);
        :meth:`tune` fits it by marginal likelihood.
    subset : {"all", "last_layer"}, names or predicate, default "all"
        Which parameters get a posterior.
    structure : {"diag", "kron", "full"}, default "diag"
        Shape of the posterior precision (diagonal, Kronecker-factored per layer, dense).
    curvature : {"ggn", "ef", "mc_ggn"}, default "ggn"
        Curvature estimate (exact GGN, empirical Fisher, sampled-label GGN).
    sigma : number or Tensor, optional
        Observation noise std for regression (a number, 0-d or shape-``(1,)``
        tensor); by default the likelihood's own (1 for ``"regression"``).
    prior_mean, temperature
        laplace-torch's options, as in :func:`funcbnn.laplace.fit`.
    subset_of_weights, hessian_structure
        laplace-torch's names for ``subset`` and ``structure`` (give one name of each pair).

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    >>> x, y = torch.randn(64, 2), torch.randint(0, 3, (64,))
    >>> la = LaplaceApproximation(net, "classification", prior_precision=1.0)
    >>> la.fit([(x, y)]).predict(x[:5], n_samples=20)[0].shape
    torch.Size([5, 3])
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood = "classification",
        prior_precision: float | Tensor = 1.0,
        *,
        subset: Literal["all", "last_layer"] | Iterable[str] | Callable[[str, Tensor], bool] = "all",
        structure: Literal["diag", "kron", "full"] = "diag",
        curvature: Kind = "ggn",
        sigma: float | Tensor | None = None,
        prior_mean: float | Tensor = 0.0,
        temperature: float | Tensor = 1.0,
        subset_of_weights: Literal["all", "last_layer"] | Iterable[str] | Callable[[str, Tensor], bool] | None = None,
        hessian_structure: Literal["diag", "kron", "full"] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if subset_of_weights is not None:
            if subset != "all":
                raise TypeError("give subset or its laplace-torch name subset_of_weights, not both")
            subset = subset_of_weights
        if hessian_structure is not None:
            if structure != "diag":
                raise TypeError("give structure or its laplace-torch name hessian_structure, not both")
            structure = hessian_structure
        self.likelihood: Likelihood = get_likelihood(likelihood)
        self.model = model
        self.prior_precision = prior_precision
        self.subset = subset
        self.structure = structure
        self.curvature = curvature
        self.sigma = sigma
        self.prior_mean = prior_mean
        self.temperature = temperature
        self._laplace: Laplace | None = None
        self._state: LaplaceState | None = None
        # What from_state needs to rebuild _laplace after unpickling (set by fit).
        self._apply_fn: Any = None
        self._fixed: dict[str, Tensor] | None = None
        self._order: list[str] | None = None

    # -- pickling --------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        # The Laplace functions and the likelihood are closures: keep the state and what rebuilds them.
        state = {k: v for k, v in self.__dict__.items() if k != "_laplace"}
        state["likelihood"] = _likelihood_spec(self.likelihood)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        name, sigma = state["likelihood"]
        self.likelihood = get_likelihood(name) if sigma is None else get_likelihood(name, sigma=sigma)
        self._laplace = None
        if self._state is not None:
            fitted = self._state
            params = {k: self._fixed[k] if k in self._fixed else fitted.mean[k] for k in self._order}
            self._laplace = from_state(self._apply_fn, params, fitted, likelihood=self.likelihood)

    # -- fitting ---------------------------------------------------------------------------

    def fit(self, loader: Iterable, *, generator: torch.Generator | None = None) -> "LaplaceApproximation":
        """Accumulate the curvature over every ``(x, y)`` batch of ``loader`` at the current weights.

        Returns ``self``. Raises ``ValueError`` on an empty loader or outputs that
        do not fit the likelihood.
        """
        apply_fn, params, _ = functionalize(self.model)
        laplace, state = fit(
            apply_fn,
            params,
            loader,
            self.likelihood,
            subset=self.subset,
            structure=self.structure,
            curvature=self.curvature,
            prior_precision=self.prior_precision,
            sigma=self.sigma,
            prior_mean=self.prior_mean,
            temperature=self.temperature,
            generator=generator,
        )
        self._laplace, self._state = laplace, state
        self._apply_fn, self._order = apply_fn, list(params)
        # Leaves outside the posterior, as fit saw them (the posterior's own are state.mean; a
        # subnetwork's mean holds single entries, so it keeps them all).
        self._fixed = {
            k: v.detach().clone() for k, v in params.items() if state.indices is not None or k not in state.mean
        }
        return self

    @property
    def is_fitted(self) -> bool:
        return self._state is not None

    def _fitted(self) -> tuple[Laplace, LaplaceState]:
        if self._laplace is None or self._state is None:
            raise NotFittedError("call LaplaceApproximation.fit(loader) before using the posterior")
        return self._laplace, self._state

    @property
    def laplace(self) -> Laplace:
        """The functional :class:`~funcbnn.laplace.Laplace` behind this object."""
        return self._fitted()[0]

    @property
    def family(self) -> Any:
        """The posterior family of the structure (diagonal, Kronecker-factored or dense Gaussian)."""
        return self._fitted()[0].family

    @property
    def posterior(self) -> Any:
        """The posterior as a family state (``self.family.sample(self.posterior, n)`` draws from it)."""
        la, state = self._fitted()
        return la.posterior(state)

    @property
    def state(self) -> LaplaceState:
        """The fitted :class:`~funcbnn.laplace.LaplaceState` (a pytree of tensors)."""
        return self._fitted()[1]

    def tune(self, *, per_leaf: bool = False, steps: int = 200, lr: float = 0.1) -> "LaplaceApproximation":
        """Fit the prior precision (and, for regression, sigma) by marginal likelihood; returns ``self``."""
        la, state = self._fitted()
        self._state = la.tune(state, per_leaf=per_leaf, steps=steps, lr=lr)
        self.prior_precision = self._state.prior_precision
        self.sigma = float(self._state.sigma)
        return self

    def log_marglik(self) -> Tensor:
        """Laplace log marginal likelihood at the current hyperparameters."""
        la, state = self._fitted()
        return la.log_marglik(state)

    def sample(self, n_samples: int, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Posterior draws of the approximated leaves, each ``(n_samples, *leaf.shape)``."""
        la, state = self._fitted()
        return la.sample(state, n_samples, generator=generator)

    # -- prediction ------------------------------------------------------------------------

    def predict(
        self,
        x: Any,
        n_samples: int = 100,
        *,
        return_samples: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """Monte-Carlo predictive over ``n_samples`` posterior weight draws (one batched forward).

        Returns
        -------
        mean, var : Tensor
            Classification: the mean and variance over draws of the class
            probabilities (softmax; sigmoid for Bernoulli). Regression: the mean
            output and the predictive variance, i.e. the variance over draws plus
            the noise ``sigma**2``.
        samples : Tensor, only if ``return_samples``
            The per-draw probabilities (classification) or outputs (regression),
            shaped ``(n_samples, N, ...)``.
        """
        la, state = self._fitted()
        n_samples = positive_int(n_samples, "n_samples")
        lik = self.likelihood
        if lik.link not in ("identity", "softmax", "sigmoid"):
            raise ValueError(
                f"predict supports classification, bernoulli and regression, not {lik.name!r} (link {lik.link!r})"
            )
        with torch.no_grad():
            outs = sample_outputs(la.apply_fn, la.sample(state, n_samples, generator=generator), x)
        samples = lik.inverse_link(outs)  # probabilities (classification) or the outputs themselves
        var = samples.var(0, correction=0)
        if not lik.is_classification:
            var = var + state.sigma**2
        mean = samples.mean(0)
        return (mean, var, samples) if return_samples else (mean, var)

    def __call__(self, x: Any, **kwargs: Any) -> Any:
        """The linearised (GLM) predictive, laplace-torch's ``la(x)``: :func:`funcbnn.laplace.predictive.predict`.

        Keywords ``pred_type``, ``link_approx``, ``num_samples``, ``generator``
        and the hyperparameter overrides pass through; classification gives
        probabilities ``(N, C)``, regression ``(mean, variance)``.
        """
        la, state = self._fitted()
        return la.predict(state, x, **kwargs)

    def __repr__(self) -> str:
        state = "fitted" if self.is_fitted else "not fitted"
        return (
            f"LaplaceApproximation(likelihood={self.likelihood.name!r}, structure={self.structure!r}, "
            f"subset={self.subset!r}, curvature={self.curvature!r}, {state})"
        )


def _likelihood_spec(lik: Likelihood) -> tuple[str, Any]:
    """``(name, sigma)`` that :func:`funcbnn.likelihoods.get_likelihood` rebuilds ``lik`` from."""
    try:
        rebuilt = get_likelihood(lik.name) if lik.sigma is None else get_likelihood(lik.name, sigma=lik.sigma)
    except (ValueError, TypeError):
        rebuilt = None
    if rebuilt is None or rebuilt.link != lik.link:
        raise TypeError(
            f"cannot pickle a LaplaceApproximation whose likelihood {lik.name!r} is not a registered one: "
            "save la.state with torch.save and rebuild with funcbnn.laplace.from_state(..., likelihood=...)"
        )
    return lik.name, lik.sigma
