"""Laplace posteriors: fit at a MAP point, sample, KL, marginal likelihood, prior tuning.

``q(theta) = N(theta_MAP, P^-1)`` with posterior precision
``P = s(sigma) * C + diag(prior_precision)``, where ``C`` is the per-example
curvature summed over all N examples (of the per-example NLL, never of a
batch-mean loss) at noise std 1, and ``s = sigma^-2`` for the GGN and
``sigma^-4`` for the empirical Fisher (``s = 1`` for classification)
(Daxberger et al. 2021, "Laplace Redux"). The log marginal likelihood follows
Immer et al. 2021 and laplace-torch:

``log p(D) ~ log p(D | theta) - 0.5 (log det P - log det P0 + theta^T P0 theta)``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, Literal, NamedTuple

import torch
from torch import Tensor, nn

from .._validation import positive_int
from ..likelihoods import Likelihood, get_likelihood
from ..model import FunctionalModel
from .curvature import Kind, check_data, dense_curvature, diag_curvature
from .glm import diag_output_covariance
from .kron import (
    kron_covariance_diag,
    kron_curvature,
    kron_decompose,
    kron_functional_variance,
    kron_logdet,
    kron_precision_dense,
    kron_sample,
)

__all__ = ["LaplaceState", "Laplace", "fit", "last_layer_names"]


class LaplaceState(NamedTuple):
    """Pytree state of a fitted Laplace approximation (tensors only).

    Attributes
    ----------
    mean : dict[str, Tensor]
        MAP values of the leaves under the posterior.
    curvature : dict[str, Tensor], Tensor or KronDecomposed
        Summed per-example curvature at noise std 1: a diagonal per leaf
        (``"diag"``), a ``P x P`` matrix over the flattened leaves (``"full"``),
        or eigendecomposed Kronecker factors per layer (``"kron"``, see
        :mod:`funcbnn.laplace.kron`).
    prior_precision : Tensor
        Scalar, or one value per leaf (in ``mean``'s order).
    sigma : Tensor
        Observation noise std (1 for classification).
    loss : Tensor
        Summed NLL over the data at the MAP, at noise std 1.
    num_data, num_outputs : Tensor
        N and the number of scalar outputs (N x D).
    """

    mean: dict[str, Tensor]
    curvature: Any
    prior_precision: Tensor
    sigma: Tensor
    loss: Tensor
    num_data: Tensor
    num_outputs: Tensor


def last_layer_names(apply_fn: FunctionalModel, params: dict[str, Tensor], x: Any = None) -> list[str]:
    """Leaf names of the last ``nn.Linear`` with a trainable weight.

    "Last" is in call order when example inputs ``x`` are given (one forward with
    hooks; ``fit`` passes its first batch), else in registration order (which
    differs when a model defines its head before its body).
    """
    if not isinstance(apply_fn, FunctionalModel):
        raise TypeError("subset='last_layer' needs apply_fn from funcbnn.functionalize")
    candidates: dict[nn.Module, list[str]] = {}
    for name, mod in apply_fn.module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, nn.Linear) and prefix + "weight" in params:
            candidates[mod] = [prefix + "weight"] + ([prefix + "bias"] if prefix + "bias" in params else [])
    if not candidates:
        raise ValueError("subset='last_layer': the model has no nn.Linear layer with trainable weights")
    if x is None:
        return list(candidates.values())[-1]
    called: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda m, i, o: called.append(m)) for m in candidates]
    try:
        with torch.no_grad():
            apply_fn({k: v.detach() for k, v in params.items()}, x)
    finally:
        for h in handles:
            h.remove()
    if not called:
        raise ValueError("subset='last_layer': no nn.Linear with trainable weights runs in the forward pass")
    return candidates[called[-1]]


def _as_prior_precision(value: Any, names: list[str], ref: Tensor) -> Tensor:
    t = torch.as_tensor(value, dtype=ref.dtype, device=ref.device)
    if t.dim() > 1 or (t.dim() == 1 and t.numel() not in (1, len(names))):
        raise ValueError(
            f"prior_precision must be a scalar or one value per leaf ({len(names)} leaves), got shape {tuple(t.shape)}"
        )
    if not bool((torch.isfinite(t) & (t > 0)).all()):
        raise ValueError(f"prior_precision must be finite and positive, got {t.tolist()}")
    return t.reshape(()) if t.numel() == 1 else t


class Laplace(NamedTuple):
    """A fitted Laplace family: pure functions over a :class:`LaplaceState`.

    ``init``/``sample``/``kl`` follow the posterior protocol. ``apply_fn``
    evaluates the model with the posterior's leaves given and every other
    leaf held at its MAP value, so ``predict.sample_outputs(la.apply_fn,
    la.sample(state, S), x)`` is the Monte-Carlo predictive.
    """

    init: Callable[..., LaplaceState]
    sample: Callable[..., dict[str, Tensor]]
    kl: Callable[..., Tensor]
    precision: Callable[..., Any]
    log_marglik: Callable[..., Tensor]
    tune: Callable[..., LaplaceState]
    predict: Callable[..., Any]
    output_covariance: Callable[..., tuple[Tensor, Tensor]]
    apply_fn: Callable[[dict[str, Tensor], Any], Any]
    structure: str
    names: tuple[str, ...]


def fit(
    apply_fn: Any,
    params: dict[str, Tensor],
    data: Iterable,
    likelihood: str | Likelihood,
    *,
    subset: Literal["all", "last_layer"] | Iterable[str] | Callable[[str, Tensor], bool] = "all",
    structure: Literal["diag", "kron", "full"] = "diag",
    curvature: Kind = "ggn",
    prior_precision: float | Tensor = 1.0,
    sigma: float | None = None,
    num_mc: int = 1,
    generator: torch.Generator | None = None,
    chunk_size: int = 32,
) -> tuple[Laplace, LaplaceState]:
    """Fit a Laplace approximation at ``params`` (a MAP estimate).

    Parameters
    ----------
    apply_fn, params
        From :func:`funcbnn.functionalize`, with ``params`` at the MAP.
    data : iterable of (x, y)
        The training data (all of it: curvature is summed over examples).
    likelihood : str or Likelihood
        ``"categorical"``, ``"gaussian"`` (sigma tunable), ``"bernoulli"``, ...
    subset : {"all", "last_layer"}, iterable of names, or predicate
        Leaves that get a posterior; the others stay at their MAP values.
    structure : {"diag", "kron", "full"}
        Diagonal precision; Kronecker-factored blocks per Linear/Conv layer
        (KFAC, Martens & Grosse 2015; other leaves diagonal); or a dense one over
        the subset (last layer, small nets).
    curvature : {"ggn", "ef", "mc_ggn"}
        Exact GGN (default, as laplace-torch), empirical Fisher, or sampled-label GGN.
    prior_precision : float or Tensor
        Initial prior precision (scalar or one per leaf); tune with ``la.tune``.
    sigma : float, optional
        Initial observation noise std for ``"gaussian"``; by default the
        likelihood's own (1 for ``"gaussian"`` given by name).

    Returns
    -------
    (Laplace, LaplaceState)

    Examples
    --------
    >>> from funcbnn import functionalize
    >>> net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> apply_fn, params, _ = functionalize(net)
    >>> x, y = torch.randn(32, 2), torch.randint(0, 3, (32,))
    >>> la, state = fit(apply_fn, params, [(x, y)], "categorical", subset="last_layer", structure="full")
    >>> la.predict(state, x[:4]).shape
    torch.Size([4, 3])
    """
    lik = get_likelihood(likelihood)
    if structure not in ("diag", "kron", "full"):
        raise ValueError(f"structure must be 'diag', 'kron' or 'full', got {structure!r}")
    if not isinstance(params, dict) or not params:
        raise TypeError("params must be a non-empty dict of tensors")
    if curvature not in ("ggn", "ef", "mc_ggn"):
        raise ValueError(f"curvature must be 'ggn', 'ef' or 'mc_ggn', got {curvature!r}")
    if isinstance(subset, str) and subset not in ("all", "last_layer"):
        raise ValueError(
            f"subset must be 'all', 'last_layer', an iterable of leaf names or a predicate, got {subset!r}"
        )
    if subset == "all":
        names = list(params)
    elif subset == "last_layer":
        data = check_data(data)  # materialised once: the first batch finds the layer called last
        names = last_layer_names(apply_fn, params, data[0][0])
    elif callable(subset):
        names = [k for k, v in params.items() if subset(k, v)]
    else:
        wanted = set(subset)
        unknown = wanted - set(params)
        if unknown:
            raise ValueError(f"subset names {sorted(unknown)} are not leaves of params")
        names = [k for k in params if k in wanted]
    if not names:
        raise ValueError("subset selects no leaves")
    if sigma is None:
        sigma = lik.sigma if lik.name == "gaussian" else 1.0
    if lik.name != "gaussian" and sigma != 1.0:
        raise ValueError(f"sigma applies to the 'gaussian' likelihood only, not {lik.name!r}")
    if not (isinstance(sigma, numbers.Real) and sigma > 0):
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    positive_int(num_mc, "num_mc")

    if structure == "diag":
        curv, stats = diag_curvature(
            apply_fn, params, data, lik, kind=curvature, num_mc=num_mc, generator=generator,
            chunk_size=chunk_size, subset=names,
        )
    elif structure == "kron":
        if not isinstance(apply_fn, FunctionalModel):
            raise TypeError("structure='kron' needs apply_fn from funcbnn.functionalize (it hooks the layers)")
        factors, stats = kron_curvature(
            apply_fn, params, data, lik, kind=curvature, num_mc=num_mc, generator=generator,
            chunk_size=chunk_size, subset=names,
        )
        curv = kron_decompose(factors)
    else:
        curv, stats = dense_curvature(
            apply_fn, params, data, lik, kind=curvature, num_mc=num_mc, generator=generator,
            chunk_size=chunk_size, subset=names,
        )
    ref = params[names[0]]
    mean = {k: params[k].detach().clone() for k in names}
    rest = {k: v.detach().clone() for k, v in params.items() if k not in mean}  # a snapshot, like mean
    scale_power = 0 if lik.name != "gaussian" else (4 if curvature == "ef" else 2)
    state = LaplaceState(
        mean=mean,
        curvature=curv,
        prior_precision=_as_prior_precision(prior_precision, names, ref),
        sigma=torch.tensor(float(sigma), dtype=ref.dtype, device=ref.device),
        loss=stats.loss,
        num_data=torch.tensor(stats.num_data),
        num_outputs=torch.tensor(stats.num_outputs),
    )
    return _build(apply_fn, rest, names, structure, lik, scale_power), state


def _build(
    base_apply: Any, rest: dict[str, Tensor], names: list[str], structure: str, lik: Likelihood, scale_power: int
) -> Laplace:
    def sub_apply(sub: dict[str, Tensor], x: Any) -> Any:
        return base_apply({**rest, **sub}, x)

    def _prior_vector(state: LaplaceState, sigma: Any = None, prior_precision: Any = None):
        ref = state.sigma
        pp = state.prior_precision if prior_precision is None else _as_prior_precision(prior_precision, names, ref)
        if sigma is None:
            sd = state.sigma
        else:
            sd = torch.as_tensor(sigma, dtype=ref.dtype, device=ref.device)
            if sd.dim() != 0 or not bool(torch.isfinite(sd) & (sd > 0)):
                raise ValueError(f"sigma must be a finite positive scalar, got {sigma!r}")
        return pp, sd

    def _per_leaf(pp: Tensor, i: int) -> Tensor:
        return pp if pp.dim() == 0 else pp[i]

    def _scale(sd: Tensor) -> Tensor | float:
        return sd ** (-scale_power) if scale_power else 1.0

    def _pp_dict(pp: Tensor) -> Tensor | dict[str, Tensor]:
        return pp if pp.dim() == 0 else dict(zip(names, pp.unbind()))

    def precision(state: LaplaceState, prior_precision: Tensor | None = None, sigma: Tensor | None = None) -> Any:
        """Posterior precision: a diagonal per leaf (``"diag"``), a dense matrix (``"full"``), or
        for ``"kron"`` a pair ``(dense block per layer, diagonal per other leaf)`` rebuilt from the
        factors (memory ``|W|^2`` per layer: for inspection of small layers)."""
        pp, sd = _prior_vector(state, sigma, prior_precision)
        s = _scale(sd)
        if structure == "kron":
            return kron_precision_dense(state.curvature, _pp_dict(pp), s)
        if structure == "diag":
            return {k: state.curvature[k] * s + _per_leaf(pp, i) for i, k in enumerate(names)}
        diag = torch.cat([_per_leaf(pp, i).expand(state.mean[k].numel()) for i, k in enumerate(names)])
        return state.curvature * s + torch.diag(diag)

    def init(params: dict[str, Tensor]) -> LaplaceState:
        raise TypeError("a Laplace state comes from funcbnn.laplace.fit, which needs data; there is no data-free init")

    def _flat_mean(state: LaplaceState) -> Tensor:
        return torch.cat([state.mean[k].reshape(-1) for k in names])

    def _unflat(vec: Tensor, state: LaplaceState) -> dict[str, Tensor]:
        out, start = {}, 0
        for k in names:
            n = state.mean[k].numel()
            out[k] = vec[..., start : start + n].reshape(*vec.shape[:-1], *state.mean[k].shape)
            start += n
        return out

    def sample(state: LaplaceState, num_samples: int, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Draws of the posterior's leaves, each shaped ``(num_samples, *leaf.shape)``."""
        positive_int(num_samples, "num_samples")
        if structure == "kron":
            with torch.no_grad():
                draws = kron_sample(
                    state.curvature, state.mean, num_samples, _pp_dict(state.prior_precision),
                    _scale(state.sigma), generator=generator,
                )
            return {k: draws[k] for k in names}
        prec = precision(state)
        with torch.no_grad():
            if structure == "diag":
                out = {}
                for k in names:
                    m = state.mean[k]
                    eps = torch.empty((num_samples, *m.shape), dtype=m.dtype, device=m.device).normal_(generator=generator)
                    out[k] = eps.mul_(prec[k].rsqrt()).add_(m)
                return out
            chol = torch.linalg.cholesky(prec)
            mean = _flat_mean(state)
            eps = torch.empty((mean.numel(), num_samples), dtype=mean.dtype, device=mean.device).normal_(generator=generator)
            # theta = mu + L^-T eps has covariance (L L^T)^-1 = P^-1.
            delta = torch.linalg.solve_triangular(chol.T, eps, upper=True).T
            return _unflat(mean + delta, state)

    def log_det_ratio(state: LaplaceState, pp: Tensor, sd: Tensor) -> Tensor:
        prior = sum(torch.log(_per_leaf(pp, i)) * state.mean[k].numel() for i, k in enumerate(names))
        if structure == "kron":
            return kron_logdet(state.curvature, _pp_dict(pp), _scale(sd)) - prior
        prec = precision(state, pp, sd)
        if structure == "diag":
            post = sum(torch.log(prec[k]).sum() for k in names)
        else:
            post = 2 * torch.log(torch.diagonal(torch.linalg.cholesky(prec))).sum()
        return post - prior

    def log_marglik(state: LaplaceState, prior_precision: Tensor | None = None, sigma: Tensor | None = None) -> Tensor:
        """Laplace log marginal likelihood (Immer et al. 2021), differentiable in both hyperparameters."""
        pp, sd = _prior_vector(state, sigma, prior_precision)
        if lik.name == "gaussian":
            k = state.num_outputs.to(sd.dtype)
            half_log_2pi = 0.5 * math.log(2 * math.pi)
            half_sse = state.loss - k * half_log_2pi
            log_lik = -half_sse / sd**2 - k * torch.log(sd) - k * half_log_2pi
        else:
            log_lik = -state.loss
        scatter = sum((_per_leaf(pp, i) * state.mean[k].square()).sum() for i, k in enumerate(names))
        return log_lik - 0.5 * (log_det_ratio(state, pp, sd) + scatter)

    def tune(
        state: LaplaceState,
        *,
        per_leaf: bool = False,
        tune_sigma: bool | None = None,
        steps: int = 200,
        lr: float = 0.1,
    ) -> LaplaceState:
        """Maximise :func:`log_marglik` over the prior precision (scalar or per leaf) and, for
        regression, the noise std, by Adam on their logarithms. Returns a new state."""
        positive_int(steps, "steps")
        tune_sigma = (lik.name == "gaussian") if tune_sigma is None else tune_sigma
        if tune_sigma and lik.name != "gaussian":
            raise ValueError("tune_sigma applies to the 'gaussian' likelihood only")
        init_pp = state.prior_precision
        if per_leaf and init_pp.dim() == 0:
            init_pp = init_pp.expand(len(names))
        log_pp = init_pp.detach().log().clone().requires_grad_(True)
        log_sd = state.sigma.detach().log().clone().requires_grad_(tune_sigma)
        opt = torch.optim.Adam([log_pp] + ([log_sd] if tune_sigma else []), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = -log_marglik(state, log_pp.exp(), log_sd.exp())
            loss.backward()
            opt.step()
        return state._replace(prior_precision=log_pp.detach().exp(), sigma=log_sd.detach().exp())

    def kl(state: LaplaceState, prior: Any = None, *, reduction: str = "sum") -> Tensor:
        """``KL(q || N(0, prior_precision^-1))``, the state's own Gaussian prior (or a given
        ``funcbnn.priors.gaussian``)."""
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        if prior is None:
            p_mean = {k: torch.zeros_like(state.mean[k]) for k in names}
            p_var = {k: (1 / _per_leaf(state.prior_precision, i)).expand(state.mean[k].shape) for i, k in enumerate(names)}
        else:
            if "gaussian" not in getattr(prior, "closed_forms", ()):
                raise ValueError(f"KL(Laplace || {type(prior).__name__}) needs a Gaussian prior")
            p_mean, p_std = prior.moments(state.mean)
            p_var = {k: v.square() for k, v in p_std.items()}
        mu = _flat_mean(state)
        m0 = torch.cat([p_mean[k].reshape(-1) for k in names])
        v0 = torch.cat([p_var[k].reshape(-1) for k in names])
        if structure == "kron":
            pp, s = _pp_dict(state.prior_precision), _scale(state.sigma)
            var_tree = kron_covariance_diag(state.curvature, state.mean, pp, s)
            trace = (torch.cat([var_tree[k].reshape(-1) for k in names]) / v0).sum()
            logdet_q = -kron_logdet(state.curvature, pp, s)
        elif structure == "diag":
            prec = precision(state)
            var = torch.cat([1 / prec[k].reshape(-1) for k in names])
            trace, logdet_q = (var / v0).sum(), torch.log(var).sum()
        else:
            chol = torch.linalg.cholesky(precision(state))
            cov = torch.cholesky_inverse(chol)
            trace = (torch.diagonal(cov) / v0).sum()
            logdet_q = -2 * torch.log(torch.diagonal(chol)).sum()
        total = 0.5 * (trace + ((mu - m0) ** 2 / v0).sum() - mu.numel() + torch.log(v0).sum() - logdet_q)
        return total / mu.numel() if reduction == "mean" else total

    def _jacobian(state: LaplaceState, x: Tensor) -> dict[str, Tensor]:
        """Per-leaf Jacobians of the flattened outputs, ``(N, O, *leaf.shape)``."""

        def f_one(sub: dict[str, Tensor], xi: Tensor) -> Tensor:
            return sub_apply(sub, xi[None])[0].reshape(-1)

        mean = {k: v.detach() for k, v in state.mean.items()}
        return torch.func.vmap(torch.func.jacrev(f_one), in_dims=(None, 0))(mean, x)

    def output_covariance(state: LaplaceState, x: Tensor, *, chunk_size: int = 64) -> tuple[Tensor, Tensor]:
        """Outputs at the MAP ``(N, *out)`` and the linearised output covariance ``J P^-1 J^T``
        ``(N, O, O)``. The diagonal structure never forms ``J`` (:mod:`funcbnn.laplace.glm`);
        the others form it ``chunk_size`` inputs at a time."""
        chunk_size = positive_int(chunk_size, "chunk_size")
        if not isinstance(x, Tensor) or x.dim() == 0:
            raise ValueError("x must be a tensor with a leading batch axis")
        with torch.no_grad():
            if structure == "diag":
                prec = precision(state)
                variances = {k: prec[k].reciprocal() for k in names}
                full = {**rest, **{k: v.detach() for k, v in state.mean.items()}}
                return diag_output_covariance(base_apply, full, variances, x, chunk_size=chunk_size)
            f = sub_apply({k: v.detach() for k, v in state.mean.items()}, x)
            if structure == "full":
                chol = torch.linalg.cholesky(precision(state))
        covs = []
        for start in range(0, x.shape[0], chunk_size):
            jac = _jacobian(state, x[start : start + chunk_size])
            with torch.no_grad():
                if structure == "kron":
                    covs.append(kron_functional_variance(
                        state.curvature, jac, _pp_dict(state.prior_precision), _scale(state.sigma)
                    ))
                else:
                    flat = torch.cat([jac[k].reshape(*jac[k].shape[:2], -1) for k in names], dim=-1)
                    half = torch.linalg.solve_triangular(chol, flat.transpose(1, 2), upper=False)  # L^-1 J^T
                    covs.append(half.transpose(1, 2) @ half)
        return f, torch.cat(covs)

    def predict(
        state: LaplaceState,
        x: Tensor,
        *,
        pred_type: Literal["glm", "nn"] = "glm",
        link_approx: Literal["probit", "bridge", "mc"] = "probit",
        num_samples: int = 100,
        generator: torch.Generator | None = None,
    ) -> Any:
        """Posterior predictive.

        ``pred_type="glm"`` linearises the network at the MAP (the default, as in
        laplace-torch): the output covariance is ``J P^-1 J^T``. Classification
        returns probabilities, through the probit approximation
        ``softmax(mu / sqrt(1 + pi/8 diag(S)))``, the Laplace bridge
        (Hobbhahn et al. 2022) or Monte Carlo over the linearised logits;
        regression returns ``(mean, variance)`` with the noise ``sigma^2`` added.
        ``pred_type="nn"`` samples weights and averages the network's outputs.
        """
        if pred_type not in ("glm", "nn"):
            raise ValueError(f"pred_type must be 'glm' or 'nn', got {pred_type!r}")
        if link_approx not in ("probit", "bridge", "mc"):
            raise ValueError(f"link_approx must be 'probit', 'bridge' or 'mc', got {link_approx!r}")
        from ..predict import sample_outputs

        if lik.name not in ("gaussian", "categorical", "bernoulli"):
            raise ValueError(
                f"predict covers the categorical, bernoulli and gaussian likelihoods, not {lik.name!r}; "
                "use output_covariance or sample for it"
            )
        if link_approx == "mc" or pred_type == "nn":
            positive_int(num_samples, "num_samples")
        regression = lik.name == "gaussian"
        if pred_type == "nn":
            outs = sample_outputs(sub_apply, sample(state, num_samples, generator=generator), x)
            if regression:
                return outs.mean(0), outs.var(0, correction=0) + state.sigma**2
            return _link(outs, lik)
        f, cov = output_covariance(state, x)
        f_flat = f.reshape(f.shape[0], -1)
        if regression:
            var_f = torch.diagonal(cov, dim1=1, dim2=2).reshape(f.shape)
            return f, var_f + state.sigma**2
        if link_approx == "probit":
            kappa = 1 / torch.sqrt(1 + math.pi / 8 * torch.diagonal(cov, dim1=1, dim2=2))
            return _probs(f_flat * kappa, lik).reshape(f.shape)
        if link_approx == "bridge":
            if lik.name != "categorical":
                raise ValueError("link_approx='bridge' is for the categorical likelihood")
            k = f_flat.shape[-1]
            var_d = torch.diagonal(cov, dim1=1, dim2=2)
            sum_exp = torch.exp(-f_flat).sum(-1, keepdim=True)
            alpha = (1 - 2 / k + f_flat.exp() / k**2 * sum_exp) / var_d
            return alpha / alpha.sum(-1, keepdim=True)
        # A square root through the eigendecomposition: the output covariance is often rank
        # deficient (fewer uncertain directions than classes), where Cholesky fails.
        evals, evecs = torch.linalg.eigh(cov)
        root = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)
        eps = torch.empty((num_samples, *f_flat.shape), dtype=f.dtype, device=f.device).normal_(generator=generator)
        logits = f_flat + torch.einsum("noq,snq->sno", root, eps)
        return _link(logits, lik).reshape(f.shape)

    return Laplace(
        init=init,
        sample=sample,
        kl=kl,
        precision=precision,
        log_marglik=log_marglik,
        tune=tune,
        predict=predict,
        output_covariance=output_covariance,
        apply_fn=sub_apply,
        structure=structure,
        names=tuple(names),
    )


def _probs(logits: Tensor, lik: Likelihood) -> Tensor:
    return torch.sigmoid(logits) if lik.name == "bernoulli" else logits.softmax(-1)


def _link(outputs: Tensor, lik: Likelihood) -> Tensor:
    """Mean probabilities over the leading sample axis."""
    return _probs(outputs, lik).mean(0)
