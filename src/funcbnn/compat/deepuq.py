"""deepuq's variational-inference API (``deepuq.methods.vi``) on funcbnn's functional core.

``from deepuq.methods.vi import ...`` becomes ``from funcbnn.compat.deepuq import ...``,
and so do ``deepuq.types.UQResult`` and ``deepuq.methods.mc_dropout.MCDropoutWrapper``.
Names, signatures, defaults and numbers are deepuq's: mean-field Gaussian
posteriors ``N(mu, softplus(rho)^2)`` starting at ``mu = 0``, ``rho = -3``, an
isotropic Gaussian prior ``N(prior_mu, prior_sigma^2)`` (``prior_sigma = 0.1``),
and the ELBO step ``loss = nll + kl_weight * KL / num_batches``.

What funcbnn does underneath: weight draws through :func:`funcbnn.tree.diag_normal`
(the same global-RNG stream as deepuq's ``torch.randn_like`` in a forward), KL
terms by :func:`funcbnn.families.diag_gaussian`, and the Monte-Carlo samples of
:func:`vi_elbo_step` and :func:`predict_vi_uq` as one batched call instead of a
loop (``generator=`` makes them reproducible).

**Where deepuq departs from the theory**: :func:`vi_elbo_step` divides the KL by
the number of batches. With a batch-mean NLL the ELBO per example is
``mean NLL + KL / N`` (Blundell et al. 2015); ``KL / num_batches`` is ``B * KL / N``
for batches of B examples, a prior B times too strong (and a result that
changes with the batch size). The native step, :func:`funcbnn.nn.vi_elbo_step`
(or :meth:`funcbnn.nn.BayesianModule.elbo` with ``num_data=N``), divides by N.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import likelihoods as _likelihoods
from .. import priors as _priors
from .. import tree as _tree
from .._validation import positive_int
from ..checks import check_finite
from ..families.diag_gaussian import DiagGaussianState, diag_gaussian
from ..predict import summarize
from ._draws import drawing_disabled, dropout_outputs, outputs_at_draws

__all__ = [
    "UQResult",
    "GaussianPosterior",
    "GaussianPrior",
    "BayesianLinear",
    "kl",
    "BayesByBackpropMLP",
    "BayesByBackpropRegressor",
    "HeteroscedasticBayesByBackpropRegressor",
    "MultiOutputBayesByBackpropRegressor",
    "HeteroscedasticMultiOutputBayesByBackpropRegressor",
    "LastLayerVariationalInference",
    "vi_elbo_step",
    "predict_vi_uq",
    "MCDropoutWrapper",
]


@dataclass
class UQResult:
    """deepuq's uncertainty container; fields a method does not fill are ``None``.

    ``total_var = epistemic_var + aleatoric_var`` where both exist; for
    classification ``probs`` / ``probs_var`` are the mean softmax probabilities
    and their (population) variance over samples.
    """

    mean: Tensor
    epistemic_var: Tensor | None = None
    aleatoric_var: Tensor | None = None
    total_var: Tensor | None = None
    probs: Tensor | None = None
    probs_var: Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class GaussianPosterior(nn.Module):
    """Diagonal Gaussian posterior over one tensor: ``N(mu, softplus(rho)^2)``.

    Parameters
    ----------
    mu, rho : Tensor
        Initial mean and unconstrained scale (become ``nn.Parameter`` s).

    Notes
    -----
    deepuq writes ``sigma = log1p(exp(rho))``; funcbnn uses ``F.softplus``, the
    same function (equal to 2e-9 at ``rho = 20``, where torch switches to the
    identity; deepuq's form overflows to ``inf`` above ``rho ~ 88``).

    Examples
    --------
    >>> post = GaussianPosterior(torch.zeros(3), torch.full((3,), -3.0))
    >>> post.sample().shape, round(post.sigma[0].item(), 4)
    (torch.Size([3]), 0.0486)
    """

    def __init__(self, mu: Tensor, rho: Tensor) -> None:
        super().__init__()
        self.mu = nn.Parameter(mu)
        self.rho = nn.Parameter(rho)

    @property
    def sigma(self) -> Tensor:
        """``softplus(rho)``."""
        return F.softplus(self.rho)

    def sample(self, *, generator: torch.Generator | None = None) -> Tensor:
        """A reparameterised draw ``mu + sigma * eps``."""
        if drawing_disabled():  # batched prediction: ``mu`` holds the draw
            return self.mu
        return _tree.diag_normal(self.mu, self.sigma, generator=generator)

    def log_prob(self, w: Tensor) -> Tensor:
        """``log q(w)`` summed over the elements."""
        return diag_gaussian().log_prob(DiagGaussianState({"w": self.mu}, {"w": self.rho}), {"w": w})


class GaussianPrior:
    """Isotropic Gaussian prior ``N(mu, sigma^2)``, deepuq's argument order ``(mu, sigma)``.

    Parameters
    ----------
    mu : float, default 0.0
    sigma : float, default 0.1
        Must be positive (checked here; deepuq fails later).

    Examples
    --------
    >>> round(float(GaussianPrior(0.0, 1.0).log_prob(torch.zeros(2))), 4)
    -1.8379
    """

    def __init__(self, mu: float = 0.0, sigma: float = 0.1) -> None:
        self.mu = mu
        self.sigma = sigma
        self._native = _priors.gaussian(std=sigma, mean=mu)

    def log_prob(self, w: Tensor) -> Tensor:
        """``log p(w)`` summed over the elements."""
        return self._native.log_prob({"w": w})


class BayesianLinear(nn.Module):
    """deepuq's Bayesian linear layer: posteriors ``weight_posterior``, ``bias_posterior`` and a Gaussian prior.

    Starts at ``mu = 0``, ``rho = -3`` (``sigma ~ 0.0486``). ``forward(x,
    sample=True)`` draws the weight then the bias (deepuq's RNG order);
    ``sample=False`` uses the means.

    Parameters
    ----------
    in_features, out_features : int
    prior_sigma : float, default 0.1
    prior_mu : float, default 0.0

    Examples
    --------
    >>> layer = BayesianLinear(4, 3)
    >>> layer(torch.randn(2, 4)).shape, layer.kl().shape
    (torch.Size([2, 3]), torch.Size([]))
    """

    def __init__(
        self, in_features: int, out_features: int, prior_sigma: float = 0.1, prior_mu: float = 0.0
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_posterior = GaussianPosterior(
            torch.zeros(out_features, in_features), torch.full((out_features, in_features), -3.0)
        )
        self.bias_posterior = GaussianPosterior(torch.zeros(out_features), torch.full((out_features,), -3.0))
        self.prior = GaussianPrior(prior_mu, prior_sigma)

    def forward(self, x: Tensor, sample: bool = True) -> Tensor:
        """``x W^T + b`` at a weight draw (``sample=True``) or at the means."""
        w = self.weight_posterior.sample() if sample else self.weight_posterior.mu
        b = self.bias_posterior.sample() if sample else self.bias_posterior.mu
        return F.linear(x, w, b)

    def kl(self) -> Tensor:
        """Analytic ``KL(q || p)`` of the weight and bias (:func:`funcbnn.families.diag_gaussian`).

        Per element ``log(sigma_p / sigma_q) + (sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - 1/2``.
        """
        state = DiagGaussianState(
            {"weight": self.weight_posterior.mu, "bias": self.bias_posterior.mu},
            {"weight": self.weight_posterior.rho, "bias": self.bias_posterior.rho},
        )
        return diag_gaussian().kl(state, self.prior._native)


def kl(model: nn.Module) -> Tensor:
    """``KL(q || p)`` of a deepuq-style model: ``model.kl()``, or the sum over its :class:`BayesianLinear` layers.

    Examples
    --------
    >>> bool(kl(BayesianLinear(3, 2)) > 0)
    True
    """
    if callable(getattr(model, "kl", None)):
        return model.kl()
    terms = [m.kl() for m in model.modules() if isinstance(m, BayesianLinear)]
    if not terms:
        raise ValueError(f"{type(model).__name__} has no kl() method and no BayesianLinear layer")
    return torch.stack(terms).sum()


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "silu": F.silu,
}


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    try:
        return _ACTIVATIONS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"Unsupported activation {name!r}; choose from {sorted(_ACTIVATIONS)}") from None


def _variance_from_raw(raw_var: Tensor) -> Tensor:
    """deepuq's noise variance ``softplus(raw) + 1e-6``."""
    return F.softplus(raw_var) + 1e-6


class _BayesianMLP(nn.Module):
    """Hidden :class:`BayesianLinear` layers with an activation, then a Bayesian output layer."""

    task_type = "regression"
    heteroscedastic = False

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        raw_output_dim: int,
        *,
        output_dim: int,
        prior_mu: float = 0.0,
        prior_sigma: float = 0.1,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.hidden_dims = tuple(hidden_dims)
        self.raw_output_dim = raw_output_dim
        self.prior_mu = float(prior_mu)
        self.prior_sigma = float(prior_sigma)
        self.activation_name = activation
        self._activation = _activation(activation)
        dims = [input_dim, *hidden_dims]
        self.hidden_layers = nn.ModuleList(
            BayesianLinear(a, b, prior_sigma=prior_sigma, prior_mu=prior_mu)
            for a, b in zip(dims[:-1], dims[1:])
        )
        self.output_layer = BayesianLinear(
            dims[-1], raw_output_dim, prior_sigma=prior_sigma, prior_mu=prior_mu
        )

    def forward(self, x: Tensor, sample: bool = True) -> Tensor:
        """The raw output at a weight draw (``sample=True``) or at the means."""
        for layer in self.hidden_layers:
            x = self._activation(layer(x, sample=sample))
        return self.output_layer(x, sample=sample)

    def kl(self) -> Tensor:
        """Sum of the layers' KL terms."""
        total = self.output_layer.kl()
        for layer in self.hidden_layers:
            total = total + layer.kl()
        return total


class _Heteroscedastic:
    """Outputs ``[mean, raw variance]`` along the last axis; variance ``softplus(raw) + 1e-6``."""

    output_dim: int
    heteroscedastic: bool

    def split_prediction(self, prediction: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, raw_var)`` halves of the raw output."""
        if not self.heteroscedastic:
            raise RuntimeError("split_prediction is only valid for heteroscedastic regression.")
        mean, raw_var = prediction.split(self.output_dim, dim=-1)
        return mean, raw_var

    def predictive_variance(self, raw_var: Tensor) -> Tensor:
        """``softplus(raw_var) + 1e-6``."""
        return _variance_from_raw(raw_var)

    def nll(self, prediction: Tensor, target: Tensor) -> Tensor:
        """deepuq's heteroscedastic NLL: ``0.5 ((y - m)^2 / v + log v)`` summed over outputs, mean over examples.

        It leaves out the constant ``0.5 log(2 pi)`` per output (the native
        ``"heteroscedastic_regression"`` likelihood, on a log-variance, keeps it).
        """
        if not self.heteroscedastic:
            raise RuntimeError("nll() is only defined for heteroscedastic regression.")
        mean, raw_var = self.split_prediction(prediction)
        var = self.predictive_variance(raw_var)
        return (0.5 * ((target - mean) ** 2 / var + torch.log(var))).sum(dim=-1).mean()


class BayesByBackpropMLP(_BayesianMLP):
    """deepuq's Bayes-by-Backprop MLP ``input_dim -> hidden_dims -> output_dim`` (Blundell et al. 2015).

    For classification (cross-entropy in :func:`vi_elbo_step`) or regression
    with a ``criterion``.

    Parameters
    ----------
    input_dim : int
    hidden_dims : sequence of int
    output_dim : int
    prior_sigma : float, default 0.1
    prior_mu : float, default 0.0
    activation : {"relu", "gelu", "tanh", "silu"}, default "relu"

    Examples
    --------
    >>> model = BayesByBackpropMLP(8, [16], 3)
    >>> x, y = torch.randn(7, 8), torch.randint(0, 3, (7,))
    >>> loss, nll, kl_term = vi_elbo_step(model, x, y, num_batches=4)
    >>> loss.backward()
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        output_dim: int,
        prior_sigma: float = 0.1,
        prior_mu: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__(
            input_dim,
            hidden_dims,
            output_dim,
            output_dim=output_dim,
            prior_mu=prior_mu,
            prior_sigma=prior_sigma,
            activation=activation,
        )
        self.task_type = "generic"
        self.heteroscedastic = False


BayesByBackpropRegressor = BayesByBackpropMLP


class HeteroscedasticBayesByBackpropRegressor(_Heteroscedastic, _BayesianMLP):
    """Bayes-by-Backprop regressor predicting a mean and an input-dependent noise variance per output.

    Its :meth:`nll` is used by :func:`vi_elbo_step`; :func:`predict_vi_uq`
    reports the mean noise variance as the aleatoric part.
    """

    task_type = "regression"
    heteroscedastic = True

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        output_dim: int = 1,
        prior_mu: float = 0.0,
        prior_sigma: float = 0.1,
        activation: str = "tanh",
    ) -> None:
        super().__init__(
            input_dim,
            hidden_dims,
            2 * output_dim,
            output_dim=output_dim,
            prior_mu=prior_mu,
            prior_sigma=prior_sigma,
            activation=activation,
        )


class MultiOutputBayesByBackpropRegressor(_BayesianMLP):
    """Bayes-by-Backprop regressor for vector targets (MSE in :func:`vi_elbo_step`)."""

    task_type = "regression"
    heteroscedastic = False

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        prior_mu: float = 0.0,
        prior_sigma: float = 0.1,
        activation: str = "tanh",
    ) -> None:
        super().__init__(
            input_dim,
            hidden_dims,
            output_dim,
            output_dim=output_dim,
            prior_mu=prior_mu,
            prior_sigma=prior_sigma,
            activation=activation,
        )


class HeteroscedasticMultiOutputBayesByBackpropRegressor(_Heteroscedastic, _BayesianMLP):
    """Multi-output Bayes-by-Backprop regressor with a noise variance per output."""

    task_type = "regression"
    heteroscedastic = True

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        prior_mu: float = 0.0,
        prior_sigma: float = 0.1,
        activation: str = "tanh",
    ) -> None:
        super().__init__(
            input_dim,
            hidden_dims,
            2 * output_dim,
            output_dim=output_dim,
            prior_mu=prior_mu,
            prior_sigma=prior_sigma,
            activation=activation,
        )


class LastLayerVariationalInference(_Heteroscedastic, nn.Module):
    """A deterministic feature extractor with a Bayesian linear head (last-layer VI).

    Only the head is variational; its KL is the model's KL. The head applies to
    the last axis of the features, keeping their leading axes (e.g. per-pixel
    features ``(N, H, W, feature_dim)``).

    Parameters
    ----------
    feature_extractor : nn.Module
        Returns features whose last axis has size ``feature_dim``.
    feature_dim, output_dim : int
    task : {"regression", "classification"}, default "regression"
    heteroscedastic : bool, default False
        Regression only: the head also predicts a noise variance per output.
    prior_mu, prior_sigma : float

    Examples
    --------
    >>> model = LastLayerVariationalInference(nn.Linear(4, 6), feature_dim=6, output_dim=3, task="classification")
    >>> predict_vi_uq(model, torch.randn(5, 4), n_samples=4).probs.shape
    torch.Size([5, 3])
    """

    def __init__(
        self,
        feature_extractor: nn.Module,
        feature_dim: int,
        output_dim: int,
        task: str = "regression",
        heteroscedastic: bool = False,
        prior_mu: float = 0.0,
        prior_sigma: float = 0.1,
    ) -> None:
        super().__init__()
        if task not in {"regression", "classification"}:
            raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")
        self.feature_extractor = feature_extractor
        self.feature_dim = int(feature_dim)
        self.output_dim = int(output_dim)
        self.task_type = task
        self.heteroscedastic = bool(heteroscedastic) and task == "regression"
        self.prior_mu = float(prior_mu)
        self.prior_sigma = float(prior_sigma)
        raw_output_dim = 2 * self.output_dim if self.heteroscedastic else self.output_dim
        self.head = BayesianLinear(
            self.feature_dim, raw_output_dim, prior_sigma=prior_sigma, prior_mu=prior_mu
        )

    def forward(self, x: Tensor, sample: bool = True) -> Tensor:
        """The head's output at a weight draw (``sample=True``) or at its means."""
        features = self.feature_extractor(x)
        if features.shape[-1] != self.feature_dim:
            raise ValueError(
                "feature_extractor must return a tensor whose trailing dimension "
                f"matches feature_dim={self.feature_dim}; got shape {tuple(features.shape)}."
            )
        return self.head(features, sample=sample)

    def kl(self) -> Tensor:
        """The head's KL term."""
        return self.head.kl()


def _posterior_stds(model: nn.Module) -> dict[str, Tensor]:
    """``{name of each GaussianPosterior's mu: its sigma}`` over the model."""
    return {
        f"{name}.mu" if name else "mu": m.sigma
        for name, m in model.named_modules()
        if isinstance(m, GaussianPosterior)
    }


def _sampling_call(model: nn.Module, x: Tensor) -> Tensor:
    return model(x, sample=True)


def _sampled_outputs(
    model: nn.Module, x: Tensor, num_samples: int, generator: torch.Generator | None
) -> Tensor:
    """Raw outputs ``(S, N, ...)`` at ``num_samples`` posterior draws: one batched call, or deepuq's loop.

    Models built from this module's posteriors run batched; any other model
    with ``forward(x, sample=True)`` is called ``num_samples`` times. One
    sample from the global RNG is one ordinary forward: deepuq's own draws.
    """
    stds = _posterior_stds(model)
    if stds and (num_samples > 1 or generator is not None):
        return outputs_at_draws(model, stds, x, num_samples, call=_sampling_call, generator=generator)
    if generator is not None:
        raise ValueError(
            f"generator= needs a model built from funcbnn.compat.deepuq layers, got {type(model).__name__}"
        )
    return torch.stack([_sampling_call(model, x) for _ in range(num_samples)])


def _check_targets(outputs: Tensor, y: Tensor, loss: str) -> None:
    """``y`` against one draw's outputs, for the default losses, with the likelihoods' own checks.

    ``loss`` is ``"cross_entropy"`` (class indices, or soft targets of the
    outputs' shape as ``nn.CrossEntropyLoss`` takes them), ``"mse"`` (the
    outputs' shape: ``nn.MSELoss`` would broadcast ``(N,)`` against ``(N, 1)``
    into an ``(N, N)`` loss) or ``"heteroscedastic"`` (the mean half's shape).
    """
    if loss == "cross_entropy" and y.is_floating_point() and y.shape == outputs.shape:
        return  # class probabilities; their finiteness is checked with y's
    lik = {
        "cross_entropy": _likelihoods.categorical,
        "mse": _likelihoods.gaussian,
        "heteroscedastic": _likelihoods.heteroscedastic_gaussian,
    }[loss]()
    try:
        lik.check(outputs, y)
    except ValueError as e:
        raise ValueError(f"vi_elbo_step: y does not fit the model's outputs ({loss} loss): {e}") from None


def vi_elbo_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    num_batches: int | None = None,
    n_batches: int | None = None,
    criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
    kl_weight: float = 1.0,
    mc_samples: int = 1,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """deepuq's Bayes-by-Backprop minibatch loss ``(loss, nll, kl)``.

    ``nll`` is the criterion averaged over ``mc_samples`` weight draws (drawn
    and evaluated in one batched call), ``kl = KL(q || p) / num_batches`` and
    ``loss = nll + kl_weight * kl``; ``nll`` and ``kl`` are detached.

    **Scaling departs from the ELBO**: with a batch-mean NLL the ELBO's KL term
    is ``KL / N`` (N examples); ``KL / num_batches`` is B times that for batches
    of B (Blundell et al. 2015). For the ELBO use the native
    ``funcbnn.nn.vi_elbo_step(model, x, y, num_batches)`` on a
    :class:`funcbnn.nn.BayesianModule`, or here ``kl_weight=1 / len(y)``.

    Parameters
    ----------
    model : nn.Module
        ``forward(x, sample=True)`` and ``kl()``; heteroscedastic models' own
        ``nll`` is used.
    x, y : Tensor
        The minibatch.
    num_batches : int
        Minibatches per epoch (``len(train_loader)``).
    n_batches : int, optional
        Deprecated alias of ``num_batches`` (``DeprecationWarning``).
    criterion : callable, optional
        Batch-mean loss; default cross-entropy, MSE for ``task_type ==
        "regression"`` models.
    kl_weight : float, default 1.0
    mc_samples : int, default 1
    generator : torch.Generator, optional
        Seeds the weight draws.

    Raises
    ------
    ValueError
        For a missing or non-positive ``num_batches``, conflicting
        ``n_batches``, a non-positive ``mc_samples``, or targets that do not
        fit the default loss (class indices out of range or of the wrong
        shape; regression targets not of the outputs' shape).
    funcbnn.checks.NonFiniteError
        For NaN or infinite ``x`` or ``y`` (unless
        :func:`funcbnn.checks.set_finite_checks` is off).
    """
    if num_batches is None:
        if n_batches is None:
            raise ValueError("num_batches must be provided and > 0.")
        warnings.warn(
            "Argument 'n_batches' is deprecated; use 'num_batches' instead.", DeprecationWarning, stacklevel=2
        )
        num_batches = n_batches
    elif n_batches is not None and n_batches != num_batches:
        raise ValueError("Provide only one batch-count value or make them equal.")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches <= 0:
        raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}.")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples <= 0:
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}.")
    use_model_nll = callable(getattr(model, "nll", None)) and bool(getattr(model, "heteroscedastic", False))
    default_loss = None
    if criterion is None and not use_model_nll:
        regression = getattr(model, "task_type", "classification") == "regression"
        criterion = nn.MSELoss(reduction="mean") if regression else nn.CrossEntropyLoss(reduction="mean")
        default_loss = "mse" if regression else "cross_entropy"
    loss_fn = model.nll if use_model_nll else criterion
    check_finite(x, "x", context="vi_elbo_step")
    check_finite(y, "y", context="vi_elbo_step")
    outputs = _sampled_outputs(model, x, mc_samples, generator)
    if use_model_nll:
        _check_targets(outputs[0], y, "heteroscedastic")
    elif default_loss is not None:  # a caller's criterion decides itself what targets it takes
        _check_targets(outputs[0], y, default_loss)
    nll = torch.stack([loss_fn(out, y) for out in outputs]).mean()
    kl_term = kl(model) / float(num_batches)
    loss = nll + kl_weight * kl_term
    return loss, nll.detach(), kl_term.detach()


@torch.no_grad()
def predict_vi_uq(
    model: nn.Module,
    x: Tensor,
    n_samples: int = 50,
    apply_softmax: bool = False,
    aleatoric_var: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> UQResult:
    """Monte-Carlo predictive summary of a Bayes-by-Backprop model, deepuq's.

    ``n_samples`` weight draws run as one batched call. Variances are
    population variances over the samples. Classification (``apply_softmax``
    or ``model.task_type == "classification"``) summarises the softmax
    probabilities; heteroscedastic models report their mean noise variance as
    ``aleatoric_var``; otherwise ``aleatoric_var`` is added to the epistemic
    variance when given. Like deepuq, it puts the model in eval mode (and
    leaves it there).

    Parameters
    ----------
    model : nn.Module
    x : Tensor
    n_samples : int, default 50
    apply_softmax : bool, default False
    aleatoric_var : Tensor, optional
    generator : torch.Generator, optional

    Returns
    -------
    UQResult
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples <= 0:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
    model.eval()
    classification = apply_softmax or getattr(model, "task_type", "regression") == "classification"
    heteroscedastic = bool(getattr(model, "heteroscedastic", False))
    outputs = _sampled_outputs(model, x, n_samples, generator)
    metadata: dict[str, Any] = {"method": "vi", "n_samples": int(n_samples)}
    if classification:
        s = summarize(outputs, "classification")
        metadata["task"] = "classification"
        return UQResult(s.probs, s.probs_var, None, s.probs_var, s.probs, s.probs_var, metadata)
    noise = None
    if heteroscedastic:
        if not (hasattr(model, "split_prediction") and hasattr(model, "predictive_variance")):
            raise ValueError(
                "Heteroscedastic VI models must define split_prediction(...) and predictive_variance(...)."
            )
        outputs, raw_var = model.split_prediction(outputs)
        noise = model.predictive_variance(raw_var).mean(dim=0)
    elif aleatoric_var is not None:
        noise = torch.as_tensor(aleatoric_var).to(outputs.device, outputs.dtype)
    s = summarize(outputs, "regression")
    total = s.epistemic_var if noise is None else (s.epistemic_var + noise).clamp_min(0.0)
    metadata.update(task="regression", heteroscedastic=heteroscedastic)
    return UQResult(s.mean, s.epistemic_var, noise, total, None, None, metadata)


class MCDropoutWrapper(nn.Module):
    """deepuq's MC-dropout wrapper (Gal & Ghahramani 2016): ``predict`` / ``predict_uq`` over dropout masks.

    The ``n_mc`` masks are seeded (:mod:`funcbnn.mc_dropout`) and run as one
    batched call, so ``generator=`` reproduces them. Other layers run in eval
    mode; deepuq puts the whole model in train mode for the passes, so its
    BatchNorm layers normalise with batch statistics (and update their running
    statistics). Like deepuq, ``predict`` leaves the model in eval mode.

    Parameters
    ----------
    model : nn.Module
        With ``nn.Dropout`` layers.
    n_mc : int, default 20
    apply_softmax : bool, default True

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    >>> MCDropoutWrapper(net, n_mc=8).predict_uq(torch.randn(5, 4)).probs.shape
    torch.Size([5, 3])
    """

    def __init__(self, model: nn.Module, n_mc: int = 20, apply_softmax: bool = True) -> None:
        super().__init__()
        self.model = model
        self.n_mc = n_mc
        self.apply_softmax = apply_softmax

    def train(self, mode: bool = True) -> "MCDropoutWrapper":
        self.model.train(mode)
        return super().train(mode)

    def forward(self, x: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``wrapper(x)`` is :meth:`predict` (a module called like one; torch's own error said "no forward")."""
        return self.predict(x, generator=generator)

    @torch.no_grad()
    def predict(self, x: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Mean and population variance over ``n_mc`` dropout passes (softmax first if ``apply_softmax``)."""
        outputs = dropout_outputs(self.model, x, positive_int(self.n_mc, "n_mc"), generator=generator)
        if self.apply_softmax:
            outputs = torch.softmax(outputs, dim=-1)
        self.model.eval()
        return outputs.mean(dim=0), outputs.var(dim=0, correction=0)

    @torch.no_grad()
    def predict_uq(self, x: Tensor, *, generator: torch.Generator | None = None) -> UQResult:
        """:meth:`predict` as a :class:`UQResult`."""
        mean, var = self.predict(x, generator=generator)
        probs = mean if self.apply_softmax else None
        probs_var = var if self.apply_softmax else None
        return UQResult(
            mean=mean,
            epistemic_var=var,
            aleatoric_var=None,
            total_var=var,
            probs=probs,
            probs_var=probs_var,
            metadata={
                "method": "mc_dropout",
                "n_mc": int(self.n_mc),
                "apply_softmax": bool(self.apply_softmax),
            },
        )
