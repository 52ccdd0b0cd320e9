"""Observation models: everything code needs to know about ``p(y | f(x))``, in one object.

Each likelihood is a small ``NamedTuple`` of pure functions of model outputs,
so the rest of funcbnn never branches on a likelihood's name:

- ``nll(outputs, targets) -> (N,)`` per-example negative log-likelihood
  (summed over output dimensions; VI takes the batch mean, Laplace the sum);
- ``check(outputs, targets)`` validates shapes and labels with errors naming them;
- ``inverse_link(outputs)`` the predictive mean of one output (probabilities or means);
- ``hessian_sqrt(outputs) -> (K, *outputs.shape)`` columns ``V`` with
  ``sum_c V_c V_c^T`` the Hessian of the NLL in the outputs at unit noise
  (the GGN's middle factor, Martens 2020);
- ``sample_targets(outputs, generator)`` labels drawn from the model (MC-GGN, Fisher);
- ``summarize(outputs, **options)`` a :class:`~funcbnn.summary.PredictiveSummary`
  of ``(S, N, ...)`` Monte-Carlo outputs;
- ``link``: ``"softmax"``, ``"sigmoid"``, ``"identity"`` or ``"mean_log_var"``,
  what link-specific approximations (the probit approximation, the Laplace
  bridge) key on.

Names: the distribution names ``"categorical"``, ``"gaussian"``,
``"bernoulli"``, ``"heteroscedastic_gaussian"``, and the task names
``"classification"``, ``"regression"``, ``"binary"``,
``"heteroscedastic_regression"`` (also ``"heteroscedastic"``) as aliases,
accepted everywhere a likelihood is named.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._registry import Registry
from ._validation import positive_scalar
from .checks import NonFiniteError, all_finite
from .summary import PredictiveSummary, class_summary, gaussian_summary

__all__ = [
    "Likelihood",
    "categorical",
    "gaussian",
    "learnable_gaussian",
    "heteroscedastic_gaussian",
    "bernoulli",
    "LIKELIHOODS",
    "get_likelihood",
]

LIKELIHOODS: Registry = Registry("likelihood")
"""Registry of likelihood factories by name (aliases included)."""

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class Likelihood(NamedTuple):
    """A likelihood ``p(y | f(x))`` as pure functions of model outputs (see the module docstring).

    Attributes
    ----------
    name : str
        The canonical name (``"categorical"``, ``"gaussian"``, ...).
    nll, check, inverse_link, hessian_sqrt, sample_targets, summarize : callable
        See the module docstring.
    sigma : float, Tensor or None
        Observation noise std of a Gaussian with fixed noise (a tunable
        hyperparameter: curvature scales with ``sigma^-2``); ``None`` for
        likelihoods without one.
    link : str
        ``"softmax"``, ``"sigmoid"``, ``"identity"`` or ``"mean_log_var"``.
    """

    name: str
    nll: Callable[[Tensor, Tensor], Tensor]
    check: Callable[[Tensor, Tensor], None]
    sigma: float | Tensor | None
    link: str
    inverse_link: Callable[[Tensor], Tensor]
    hessian_sqrt: Callable[[Tensor], Tensor]
    sample_targets: Callable[..., Tensor]
    summarize: Callable[..., PredictiveSummary]

    @property
    def is_classification(self) -> bool:
        """Whether outputs are logits of class probabilities (softmax or sigmoid link)."""
        return self.link in ("softmax", "sigmoid")

    def num_outputs(self, targets: Tensor) -> int:
        """Scalar observations in ``targets``: one per example for class labels, else every entry."""
        return targets.shape[0] if self.link == "softmax" else targets.numel()


def _flat_sum(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(1) if t.dim() > 1 else t


def _diagonal_columns(scale: Tensor) -> Tensor:
    """Hessian square-root columns of a diagonal output Hessian ``diag(scale^2)``: ``(D, *scale.shape)``."""
    flat = scale.reshape(scale.shape[0], -1)
    d = flat.shape[1]
    return torch.diag_embed(flat).permute(2, 0, 1).reshape(d, *scale.shape)


def _reject_options(what: str, **options: Any) -> None:
    given = sorted(k for k, v in options.items() if v is not None)
    if given:
        raise ValueError(f"summary option(s) {given} do not apply to the {what} likelihood")


def _first(outputs: Any, what: str) -> Tensor:
    if not isinstance(outputs, Tensor):
        raise TypeError(f"outputs must be a Tensor with a leading sample axis, got {type(outputs).__name__}")
    if outputs.dim() < 1 or outputs.shape[0] < 1:
        raise ValueError(f"outputs must have a leading sample axis with at least one sample, got {tuple(outputs.shape)}")
    if not outputs.is_floating_point():
        raise TypeError(f"outputs must be floating point, got {outputs.dtype}")
    return outputs


def _outputs_are(value: Any) -> str:
    value = "logits" if value is None else value
    if value not in ("logits", "probs"):
        raise ValueError(f"outputs_are must be 'logits' or 'probs', got {value!r}")
    return value


# --- categorical --------------------------------------------------------------------------------


def _check_categorical(logits: Tensor, y: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"categorical likelihood needs outputs of shape (N, C), got {tuple(logits.shape)}")
    if y.shape != logits.shape[:1]:
        raise ValueError(f"targets must have shape ({logits.shape[0]},) of class indices, got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex():
        raise ValueError(f"categorical targets must be integer class indices, got dtype {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise ValueError(
            f"targets must lie in [0, {logits.shape[1] - 1}] for {logits.shape[1]} classes, "
            f"got range [{int(y.min())}, {int(y.max())}]"
        )


def _categorical_hessian_sqrt(logits: Tensor) -> Tensor:
    # H = diag(p) - p p^T; column c is sqrt(p_c) (e_c - p).
    p = logits.detach().softmax(-1)
    eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
    return p.T.sqrt()[:, :, None] * (eye[:, None, :] - p[None])


def _categorical_summary(outputs: Any, *, outputs_are: str | None = None, **options: Any) -> PredictiveSummary:
    _reject_options("categorical", **options)
    first = _first(outputs, "categorical")
    if first.dim() < 2:
        raise ValueError(f"categorical outputs must be (S, ..., C), got {tuple(first.shape)}")
    if _outputs_are(outputs_are) == "logits":
        return class_summary(torch.log_softmax(first, -1))
    if bool((first < 0).any()) or bool(((first.sum(-1) - 1).abs() > 1e-3).any()):
        raise ValueError("outputs_are='probs' needs non-negative rows that sum to 1 over the last axis")
    return class_summary(first.log())


@LIKELIHOODS.register("categorical")
def categorical() -> Likelihood:
    """Categorical over the last axis of ``(N, C)`` logits; targets are class indices."""
    return Likelihood(
        name="categorical",
        nll=lambda logits, y: F.cross_entropy(logits, y, reduction="none"),
        check=_check_categorical,
        sigma=None,
        link="softmax",
        inverse_link=lambda logits: logits.softmax(-1),
        hessian_sqrt=_categorical_hessian_sqrt,
        sample_targets=lambda logits, generator=None: torch.multinomial(
            logits.detach().softmax(-1), 1, generator=generator
        )[:, 0],
        summarize=_categorical_summary,
    )


# --- gaussian -----------------------------------------------------------------------------------


def _check_same_shape(outputs: Tensor, y: Tensor, what: str) -> None:
    if outputs.shape != y.shape:
        raise ValueError(f"targets must have the shape of the {what} {tuple(outputs.shape)}, got {tuple(y.shape)}")


def _noise_variance(noise_std: Any, like: Tensor) -> Tensor:
    sd = positive_scalar(noise_std, "noise_std") if not (isinstance(noise_std, Tensor) and noise_std.numel() > 1) else noise_std
    if isinstance(sd, Tensor) and sd.numel() > 1 and not bool((torch.isfinite(sd) & (sd > 0)).all()):
        raise ValueError("noise_std must be finite and positive")
    sd = torch.as_tensor(sd, dtype=like.dtype, device=like.device)
    try:
        return torch.broadcast_to(sd**2, like.shape)
    except RuntimeError:
        raise ValueError(
            f"noise_std must be a scalar or broadcast to one example's outputs {tuple(like.shape)}, "
            f"got shape {tuple(sd.shape)}"
        ) from None


@LIKELIHOODS.register("gaussian")
def gaussian(sigma: float | Tensor = 1.0) -> Likelihood:
    """Gaussian with fixed noise std ``sigma``; outputs are the means, targets the same shape.

    ``sigma`` may be a number, a 0-d or a shape-``(1,)`` tensor; a tensor keeps
    its gradient in :attr:`Likelihood.nll`.
    """
    sigma = positive_scalar(sigma, "sigma")

    def nll(mean: Tensor, y: Tensor) -> Tensor:
        log_sigma = torch.log(sigma) if isinstance(sigma, Tensor) else math.log(sigma)
        return _flat_sum(0.5 * ((y - mean) / sigma) ** 2 + log_sigma + _HALF_LOG_2PI)

    def summarize(outputs: Any, *, noise_std: Any = None, **options: Any) -> PredictiveSummary:
        _reject_options("gaussian", **options)
        first = _first(outputs, "gaussian")
        if noise_std is None:
            aleatoric = torch.zeros_like(first[0])
        else:
            aleatoric = _noise_variance(noise_std, first[0])
        return gaussian_summary(first, aleatoric)

    def sample_targets(mean: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mean = mean.detach()
        noise = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device, generator=generator)
        return mean + noise * (sigma.detach() if isinstance(sigma, Tensor) else sigma)

    return Likelihood(
        name="gaussian",
        nll=nll,
        check=lambda mean, y: _check_same_shape(mean, y, "outputs"),
        sigma=sigma,
        link="identity",
        inverse_link=lambda mean: mean,
        # at unit noise: H = I (the curvature is rescaled by sigma^-2 by its users)
        hessian_sqrt=lambda mean: _diagonal_columns(torch.ones_like(mean)),
        sample_targets=sample_targets,
        summarize=summarize,
    )


def learnable_gaussian(log_sigma: Tensor) -> Likelihood:
    """Gaussian whose noise std ``exp(log_sigma)`` is read at every call: a likelihood whose noise is trained.

    ``log_sigma`` is a 0-d floating tensor that requires grad (the optimiser
    holds it and updates it in place); :attr:`Likelihood.nll` differentiates to
    it on every call, so the noise is learned by the same loss as the weights
    (type-II maximum likelihood of ``sigma`` under the ELBO). The log keeps the
    std positive without a constraint. ``Likelihood.sigma`` is ``None``
    (the value changes as it trains): after training use
    ``gaussian(sigma=float(log_sigma.exp()))``. :func:`funcbnn.vi.fit` builds
    one with ``noise="learn"``.

    Examples
    --------
    >>> log_sigma = torch.zeros((), requires_grad=True)
    >>> lik = learnable_gaussian(log_sigma)
    >>> lik.nll(torch.zeros(4, 1), torch.ones(4, 1)).sum().backward()
    >>> log_sigma.grad   # d/dlog_sigma sum(0.5 r^2 e^{-2 log_sigma} + log_sigma) = 4 (1 - 1)
    tensor(0.)
    """
    if not (isinstance(log_sigma, Tensor) and log_sigma.is_floating_point() and log_sigma.numel() == 1):
        raise TypeError(f"log_sigma must be a one-element floating-point tensor, got {log_sigma!r}"[:200])
    if not log_sigma.requires_grad:
        raise ValueError(
            "log_sigma must require grad (it is what gets learned); use gaussian(sigma=...) for a fixed noise"
        )
    if not math.isfinite(float(log_sigma.detach())):
        raise ValueError(f"log_sigma must be finite, got {float(log_sigma.detach())}")
    base = gaussian(1.0)

    def nll(mean: Tensor, y: Tensor) -> Tensor:
        ls = log_sigma.reshape(())
        return _flat_sum(0.5 * ((y - mean) * torch.exp(-ls)) ** 2 + ls + _HALF_LOG_2PI)

    def sample_targets(mean: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mean = mean.detach()
        noise = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device, generator=generator)
        return mean + noise * log_sigma.detach().exp()

    return base._replace(nll=nll, sigma=None, sample_targets=sample_targets)


# --- heteroscedastic gaussian --------------------------------------------------------------------


def _check_heteroscedastic(outputs: Tensor, y: Tensor) -> None:
    if outputs.dim() < 2 or outputs.shape[-1] % 2:
        raise ValueError(
            "heteroscedastic outputs need an even last axis (means, then log-variances), "
            f"got {tuple(outputs.shape)}"
        )
    _check_same_shape(outputs[..., : outputs.shape[-1] // 2], y, "mean half of the outputs")


def _heteroscedastic_hessian_sqrt(outputs: Tensor) -> Tensor:
    # The Fisher in (mean, log-variance) is diag(exp(-log_var), 1/2). Means and log-variances are
    # halves of the *last* axis: split there, before flattening, or (N, T, 2D) outputs would interleave.
    _, log_var = outputs.detach().chunk(2, dim=-1)
    return _diagonal_columns(torch.cat([torch.exp(-0.5 * log_var), torch.full_like(log_var, math.sqrt(0.5))], -1))


def _heteroscedastic_summary(outputs: Any, *, log_variance: bool | None = None, **options: Any) -> PredictiveSummary:
    _reject_options("heteroscedastic_gaussian", **options)
    log_variance = True if log_variance is None else log_variance
    if isinstance(outputs, (tuple, list)):
        if len(outputs) != 2:
            raise ValueError(f"heteroscedastic outputs must be (mean, log_var), got {len(outputs)} tensors")
        mean_s, second = _first(outputs[0], "heteroscedastic"), _first(outputs[1], "heteroscedastic")
        if mean_s.shape != second.shape:
            raise ValueError(f"outputs: mean {tuple(mean_s.shape)} and variance {tuple(second.shape)} differ in shape")
    else:
        first = _first(outputs, "heteroscedastic")
        if first.shape[-1] % 2:
            raise ValueError(
                f"heteroscedastic outputs need an even last axis (means, then log-variances), got {tuple(first.shape)}"
            )
        mean_s, second = first.chunk(2, dim=-1)
    var_s = second.exp() if log_variance else second
    if not log_variance and bool((var_s < 0).any()):
        raise ValueError("heteroscedastic variances must be non-negative; pass log_variance=True for log-variances")
    aleatoric = var_s.mean(0)
    if not all_finite(aleatoric):  # exp of a log-variance above ~88 (float32) overflows: never a silent inf
        raise NonFiniteError(
            f"the predicted variances overflow to inf (log-variances up to {float(second.max()):.4g}); "
            "the model's log-variance output is out of range"
        )
    return gaussian_summary(mean_s, aleatoric)


def _heteroscedastic_sample(outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    mean, log_var = outputs.detach().chunk(2, dim=-1)
    noise = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device, generator=generator)
    return mean + (0.5 * log_var).exp() * noise


@LIKELIHOODS.register("heteroscedastic_gaussian")
def heteroscedastic_gaussian() -> Likelihood:
    """Gaussian whose mean and log-variance the model outputs: last axis = (means, log-variances)."""

    def nll(outputs: Tensor, y: Tensor) -> Tensor:
        mean, log_var = outputs.chunk(2, dim=-1)
        return _flat_sum(0.5 * (y - mean) ** 2 * torch.exp(-log_var) + 0.5 * log_var + _HALF_LOG_2PI)

    return Likelihood(
        name="heteroscedastic_gaussian",
        nll=nll,
        check=_check_heteroscedastic,
        sigma=None,
        link="mean_log_var",
        inverse_link=lambda outputs: outputs.chunk(2, dim=-1)[0],
        hessian_sqrt=_heteroscedastic_hessian_sqrt,
        sample_targets=_heteroscedastic_sample,
        summarize=_heteroscedastic_summary,
    )


# --- bernoulli ----------------------------------------------------------------------------------


def _check_bernoulli(logits: Tensor, y: Tensor) -> None:
    _check_same_shape(logits, y, "outputs")
    if y.numel() and not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("bernoulli targets must be 0 or 1")


def _bernoulli_summary(outputs: Any, *, outputs_are: str | None = None, **options: Any) -> PredictiveSummary:
    _reject_options("bernoulli", **options)
    first = _first(outputs, "bernoulli")
    z = first[..., 0] if first.dim() >= 3 and first.shape[-1] == 1 else first
    if _outputs_are(outputs_are) == "logits":
        log_probs = torch.stack([F.logsigmoid(-z), F.logsigmoid(z)], -1)
    else:
        low, high = (float(v) for v in torch.aminmax(z.detach())) if z.numel() else (0.0, 1.0)
        if low < -1e-6 or high > 1 + 1e-6:  # never clamp silently: these are logits, or a bug
            raise ValueError(
                f"outputs_are='probs' needs probabilities in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
                "pass outputs_are='logits' if these are logits"
            )
        p = z.clamp(0, 1)  # only float rounding past the ends remains to clip
        log_probs = torch.stack([torch.log1p(-p), p.log()], -1)
    return class_summary(log_probs)


@LIKELIHOODS.register("bernoulli")
def bernoulli() -> Likelihood:
    """Bernoulli with logits of shape ``(N,)`` or ``(N, 1)``; targets in {0, 1} of the same shape.

    Its summary's ``probs`` are ``(..., 2)`` over (negative, positive).
    """

    def hessian_sqrt(logits: Tensor) -> Tensor:
        p = torch.sigmoid(logits.detach())
        return (p * (1 - p)).sqrt()[None]

    return Likelihood(
        name="bernoulli",
        nll=lambda z, y: _flat_sum(F.binary_cross_entropy_with_logits(z, y.to(z.dtype), reduction="none")),
        check=_check_bernoulli,
        sigma=None,
        link="sigmoid",
        inverse_link=torch.sigmoid,
        hessian_sqrt=hessian_sqrt,
        sample_targets=lambda z, generator=None: torch.bernoulli(torch.sigmoid(z.detach()), generator=generator),
        summarize=_bernoulli_summary,
    )


for _alias, _name in (
    ("classification", "categorical"),
    ("regression", "gaussian"),
    ("binary", "bernoulli"),
    ("heteroscedastic_regression", "heteroscedastic_gaussian"),
    ("heteroscedastic", "heteroscedastic_gaussian"),
):
    LIKELIHOODS.alias(_alias, _name)


def get_likelihood(likelihood: str | Likelihood, **kwargs: Any) -> Likelihood:
    """A :class:`Likelihood` from itself, its registered name or an alias (with the factory's kwargs).

    Examples
    --------
    >>> get_likelihood("classification").name
    'categorical'
    >>> get_likelihood("regression", sigma=0.5).sigma
    0.5
    """
    if isinstance(likelihood, Likelihood):
        if kwargs:
            raise TypeError(f"keyword arguments {sorted(kwargs)} only apply to a likelihood given by name")
        return likelihood
    if not isinstance(likelihood, str):
        raise TypeError(
            f"likelihood must be a name ({', '.join(LIKELIHOODS.names())}) or a Likelihood, "
            f"got {type(likelihood).__name__}"
        )
    return LIKELIHOODS.build(likelihood, **kwargs)
