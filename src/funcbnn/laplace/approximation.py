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
from .fit import Laplace, fit
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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
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

    # -- fitting ---------------------------------------------------------------------------

    def fit(self, loader: Iterable, *, generator: torch.Generator | None = None) -> "LaplaceApproximation":
        """Accumulate the curvature over every ``(x, y)`` batch of ``loader`` at the current weights.

        Returns ``self``. Raises ``ValueError`` on an empty loader or outputs that
        do not fit the likelihood.
        """
        apply_fn, params, _ = functionalize(self.model)
        self._laplace, self._state = fit(
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

    def __repr__(self) -> str:
        state = "fitted" if self.is_fitted else "not fitted"
        return (
            f"LaplaceApproximation(likelihood={self.likelihood.name!r}, structure={self.structure!r}, "
            f"subset={self.subset!r}, curvature={self.curvature!r}, {state})"
        )
