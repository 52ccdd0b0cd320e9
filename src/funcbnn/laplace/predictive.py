"""The Laplace posterior predictive: linearised (GLM) with a closed-form or sampled link, or sampled networks.

``pred_type="glm"`` linearises the network at the MAP (Immer et al. 2021,
"Improving predictions of Bayesian neural nets via local linearization"; the
default of laplace-torch, Daxberger et al. 2021): ``f(x; theta) ~ f(x; theta_MAP)
+ J (theta - theta_MAP)``, so the outputs are Gaussian with covariance
``J P^-1 J^T``, which the posterior's family computes
(``functional_variance``). Classification then needs ``E[softmax(f)]``:

- ``"probit"``: ``softmax(mu / sqrt(1 + pi/8 diag(S)))`` (MacKay 1992);
- ``"bridge"``: the Laplace bridge to a Dirichlet (Hobbhahn et al. 2022);
- ``"mc"``: Monte Carlo over the linearised logits.

Regression returns the mean and the variance including the noise ``sigma^2``.
``pred_type="nn"`` instead samples weights from the family and averages the
network's outputs through :func:`funcbnn.predict.sample_outputs`.

Repeated predictions on the same inputs under different hyperparameters (a
prior-precision grid search, a validation check inside marginal-likelihood
tuning) reuse one :class:`Linearization`: the per-example Jacobians, for
``"kron"`` already rotated into the curvature's eigenbasis, depend on neither
the prior precision nor ``sigma``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, NamedTuple

import optree
import torch
from torch import Tensor

from .._validation import positive_int
from ..families.kron_gaussian import kron_project_jacobian
from ..likelihoods import Likelihood
from ._subset import Subset
from .glm import diag_output_covariance
from .state import LaplaceState, family_of, hyperparameters, posterior

__all__ = ["Linearization", "linearize", "output_covariance", "predict"]


class Linearization(NamedTuple):
    """The network linearised at a posterior's mean on inputs ``x``: what no hyperparameter changes.

    Attributes
    ----------
    inputs : Any
        The inputs.
    outputs : Tensor
        ``(N, *out)``: the network's outputs at the mean.
    jacobian : None, dict or KronJacobian
        ``"full"``: per-leaf Jacobians ``(N, O, *leaf.shape)``; ``"kron"``: the
        same rotated into the curvature's eigenbasis
        (:func:`funcbnn.families.kron_gaussian.kron_project_jacobian`);
        ``"diag"``: ``None``, the diagonal structure never forms a Jacobian
        (:mod:`funcbnn.laplace.glm`) and recomputes its covariance from
        ``inputs``.
    structure : str
        The structure it was made for.
    """

    inputs: Any
    outputs: Tensor
    jacobian: Any
    structure: str


def _check_inputs(x: Any) -> None:
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise ValueError("x must be a tensor with a leading batch axis")


def linearize(
    apply_fn: Callable, subset: Subset, state: LaplaceState, x: Tensor, *, chunk_size: int = 64
) -> Linearization:
    """Outputs and per-example Jacobians at the state's mean, ``chunk_size`` inputs at a time.

    ``apply_fn`` is the full model ``apply_fn(params, x)`` and ``subset`` the
    leaves the posterior leaves fixed. Memory: ``N x O x P`` numbers for
    ``"kron"`` and ``"full"`` (``P`` the posterior's weights), none for ``"diag"``.
    """
    chunk_size = positive_int(chunk_size, "chunk_size")
    _check_inputs(x)
    mean = {k: v.detach() for k, v in state.mean.items()}
    with torch.no_grad():
        f = apply_fn(subset.merge(mean), x)
    if state.structure == "diag":
        return Linearization(x, f, None, "diag")

    def f_one(sub: dict[str, Tensor], xi: Tensor) -> Tensor:
        return apply_fn(subset.merge(sub), xi[None])[0].reshape(-1)

    jacobian = torch.func.vmap(torch.func.jacrev(f_one), in_dims=(None, 0))
    parts = []
    for start in range(0, x.shape[0], chunk_size):
        jac = jacobian(mean, x[start : start + chunk_size])  # leaf: (n, O, *leaf.shape)
        with torch.no_grad():
            # Rotate chunk by chunk, so the unrotated Jacobian of all N inputs never exists at once.
            parts.append(kron_project_jacobian(state.curvature, jac) if state.structure == "kron" else jac)
    with torch.no_grad():
        joined = optree.tree_map(lambda *chunks: torch.cat(chunks), *parts)
    return Linearization(x, f, joined, state.structure)


def _as_linearization(
    apply_fn: Callable, subset: Subset, state: LaplaceState, x: Any, chunk_size: int
) -> Linearization:
    if isinstance(x, Linearization):
        if x.structure != state.structure:
            raise ValueError(f"x is a Linearization for structure {x.structure!r}, the state is {state.structure!r}")
        return x
    return linearize(apply_fn, subset, state, x, chunk_size=chunk_size)


def output_covariance(
    apply_fn: Callable,
    subset: Subset,
    state: LaplaceState,
    x: Any,
    *,
    prior_precision: Any = None,
    sigma: Any = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Outputs at the MAP ``(N, *out)`` and the linearised output covariance ``J P^-1 J^T`` ``(N, O, O)``.

    ``x`` is inputs or a :class:`Linearization` of them. The covariance is
    differentiable in tensor hyperparameters.
    """
    chunk_size = positive_int(chunk_size, "chunk_size")
    post = posterior(state, *hyperparameters(state, prior_precision, sigma))
    family = family_of(state.structure)
    if state.structure == "diag":
        inputs = x.inputs if isinstance(x, Linearization) else x
        _check_inputs(inputs)
        full = subset.merge({k: v.detach() for k, v in state.mean.items()})
        return diag_output_covariance(apply_fn, full, family.variance(post), inputs, chunk_size=chunk_size)
    lin = _as_linearization(apply_fn, subset, state, x, chunk_size)
    return lin.outputs, family.functional_variance(post, lin.jacobian)


def _class_probs(outputs: Tensor, lik: Likelihood) -> Tensor:
    """Mean class probabilities over the leading sample axis."""
    return lik.inverse_link(outputs).mean(0)


def predict(
    apply_fn: Callable,
    subset: Subset,
    lik: Likelihood,
    state: LaplaceState,
    x: Any,
    *,
    pred_type: Literal["glm", "nn"] = "glm",
    link_approx: Literal["probit", "bridge", "mc"] = "probit",
    num_samples: int = 100,
    generator: torch.Generator | None = None,
    prior_precision: Any = None,
    sigma: Any = None,
    chunk_size: int = 64,
) -> Any:
    """Posterior predictive (module docstring): probabilities, or ``(mean, variance)`` for regression.

    ``x`` is inputs or a :class:`Linearization` of them (``la.linearize``);
    ``prior_precision`` and ``sigma`` override the state's. The GLM predictive
    is differentiable in tensor hyperparameters; the sampled ones are not.
    """
    if pred_type not in ("glm", "nn"):
        raise ValueError(f"pred_type must be 'glm' or 'nn', got {pred_type!r}")
    if link_approx not in ("probit", "bridge", "mc"):
        raise ValueError(f"link_approx must be 'probit', 'bridge' or 'mc', got {link_approx!r}")
    if lik.link not in ("identity", "softmax", "sigmoid"):
        raise ValueError(
            f"predict covers likelihoods with a softmax, sigmoid or identity link (categorical, bernoulli, "
            f"gaussian), not {lik.name!r} (link {lik.link!r}); use output_covariance or sample for it"
        )
    if link_approx == "mc" or pred_type == "nn":
        positive_int(num_samples, "num_samples")
    pp, sd = hyperparameters(state, prior_precision, sigma)
    regression = not lik.is_classification
    if pred_type == "nn":
        from ..predict import sample_outputs

        inputs = x.inputs if isinstance(x, Linearization) else x
        draws = family_of(state.structure).sample(posterior(state, pp, sd), num_samples, generator=generator)
        outs = sample_outputs(lambda sub, xs: apply_fn(subset.merge(sub), xs), draws, inputs)
        if regression:
            return outs.mean(0), outs.var(0, correction=0) + sd**2
        return _class_probs(outs, lik)
    f, cov = output_covariance(apply_fn, subset, state, x, prior_precision=pp, sigma=sd, chunk_size=chunk_size)
    f_flat = f.reshape(f.shape[0], -1)
    var_f = torch.diagonal(cov, dim1=1, dim2=2)
    if regression:
        return f, var_f.reshape(f.shape) + sd**2
    if link_approx == "probit":
        kappa = 1 / torch.sqrt(1 + math.pi / 8 * var_f)
        return lik.inverse_link(f_flat * kappa).reshape(f.shape)
    if link_approx == "bridge":
        if lik.link != "softmax":
            raise ValueError(f"link_approx='bridge' is for the softmax (categorical) likelihood, not {lik.name!r}")
        k = f_flat.shape[-1]
        sum_exp = torch.exp(-f_flat).sum(-1, keepdim=True)
        alpha = (1 - 2 / k + f_flat.exp() / k**2 * sum_exp) / var_f
        return alpha / alpha.sum(-1, keepdim=True)
    # A square root through the eigendecomposition: the output covariance is often rank
    # deficient (fewer uncertain directions than classes), where Cholesky fails.
    evals, evecs = torch.linalg.eigh(cov)
    root = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)
    eps = torch.empty((num_samples, *f_flat.shape), dtype=f.dtype, device=f.device).normal_(generator=generator)
    logits = f_flat + torch.einsum("noq,snq->sno", root, eps)
    return _class_probs(logits, lik).reshape(f.shape)
