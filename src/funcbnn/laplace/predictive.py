"""The Laplace posterior predictive: linearised (GLM) with a closed-form or sampled link, or sampled networks.

``pred_type="glm"`` linearises the network at the MAP (Immer et al. 2021,
"Improving predictions of Bayesian neural nets via local linearization"; the
default of laplace-torch, Daxberger et al. 2021): ``f(x; theta) ~ f(x; theta_MAP)
+ J (theta - theta_MAP)``, so the outputs are Gaussian with covariance
``J P^-1 J^T``, which the posterior's family computes
(``functional_variance``). Classification then needs ``E[softmax(f)]``:

- ``"probit"``: ``softmax(mu / sqrt(1 + pi/8 diag(S)))`` (MacKay 1992);
- ``"bridge"``: the Laplace bridge to a Dirichlet (Hobbhahn et al. 2022), in
  the paper's form: the Gaussian is first conditioned on its logits summing to
  zero (softmax ignores that sum; the bridge's moment match assumes it), then
  ``alpha_k = (1 - 2/K + e^{mu_k} / K^2 sum_l e^{-mu_l}) / S_kk``, and the
  predictive is the Dirichlet mean ``alpha / sum(alpha)`` (:func:`laplace_bridge`);
- ``"bridge_norm"``: the same after the paper's variance normalisation
  (laplace-torch's ``"bridge_norm"``);
- ``"mc"``: Monte Carlo over the linearised logits.

Regression returns the mean and the variance including the noise ``sigma^2``.
``pred_type="nn"`` instead samples weights from the family and averages the
network's outputs through :func:`funcbnn.predict.sample_outputs`.

Repeated predictions on the same inputs under different hyperparameters (a
prior-precision grid search, a validation check inside marginal-likelihood
tuning) reuse one :class:`Linearization`: the per-example Jacobians (in the
pieces of :mod:`funcbnn.laplace.glm`; for ``"kron"`` rotated into the
curvature's eigenbasis, and kept as factors for Linear layers) depend on
neither the prior precision nor ``sigma``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, NamedTuple

import optree
import torch
from torch import Tensor

from .._validation import positive_int
from ..families.kron_gaussian import KronJacobian, kron_project_jacobian
from ..likelihoods import Likelihood
from ..checks import check_finite, check_generator
from ..model import Inputs
from ._guards import LOW_PRECISION, check_batched_inputs
from ._per_example import PerExample
from ._subset import Subset
from .glm import JacobianPieces, LayerPiece, jacobian_pieces, layer_jacobian, pieces_covariance
from .state import LaplaceState, _scale, family_of, hyperparameters, posterior, precision

__all__ = ["Linearization", "DenseJacobian", "linearize", "output_covariance", "predict", "laplace_bridge", "LINK_APPROXIMATIONS"]

LINK_APPROXIMATIONS: tuple[str, ...] = ("probit", "bridge", "bridge_norm", "mc")
"""The ``link_approx`` values :func:`predict` accepts for classification."""


class Linearization(NamedTuple):
    """The network linearised at a posterior's mean on inputs ``x``: what no hyperparameter changes.

    Attributes
    ----------
    inputs : Any
        The inputs.
    outputs : Tensor
        ``(N, *out)``: the network's outputs at the mean.
    jacobian : JacobianPieces, KronJacobian or dict
        ``"diag"``: the Jacobian's pieces (:func:`funcbnn.laplace.glm.jacobian_pieces`:
        each structured layer's inputs and output gradients, dense Jacobians of
        the other leaves), weighed by the variances on each use; ``"kron"``: the
        Jacobian rotated into the curvature's eigenbasis, as factors for Linear
        layers (:class:`funcbnn.families.KronJacobian`); ``"full"``: the
        Jacobian rotated into the curvature's eigenbasis (:class:`DenseJacobian`).
    structure : str
        The structure it was made for.
    """

    inputs: Any
    outputs: Tensor
    jacobian: Any
    structure: str


class DenseJacobian(NamedTuple):
    """A ``"full"`` posterior's Jacobian in the eigenbasis of its curvature ``C = V diag(lam) V^T``.

    With a scalar prior precision ``delta`` the posterior precision ``s C + delta I``
    shares that basis, so ``J P^-1 J^T = (J V) diag(1 / (s lam + delta)) (J V)^T``:
    each candidate hyperparameter costs one weighing of ``J V`` instead of a
    Cholesky factorisation and a triangular solve. Other prior precisions
    rebuild ``J = (J V) V^T``.
    """

    rotated: Tensor  # (N, O, P): J V, leaves flattened in the state's mean order
    evals: Tensor  # (P,)
    evecs: Tensor  # (P, P)


def _check_inputs(x: Any) -> None:
    if isinstance(x, Inputs):
        check_batched_inputs(x, "x")  # before len(x): a 0-d tensor is named, not "no batch axis"
        len(x)  # TypeError unless a tensor in it has a batch axis
    elif not isinstance(x, Tensor) or x.dim() == 0:
        what = "a 0-d tensor" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"x must be a tensor with a leading batch axis (several inputs: funcbnn.model.Inputs; or a Linearization), got {what}"
        )
    if len(x) == 0:
        raise ValueError("x has no examples (a leading batch axis of size 0)")
    check_finite(x, "x")


def _kron_jacobian(curvature: Any, pieces: JacobianPieces) -> KronJacobian:
    """Rotate one chunk's pieces into the eigenbasis; Linear layers on one row per example stay factored."""
    outer, dense = {}, dict(pieces.generic)
    for piece in pieces.layers:
        layer = piece.layer
        key = (layer.weight, layer.bias) if layer.bias else (layer.weight,)
        if key in curvature.blocks and piece.is_outer_product():
            a = piece.inputs
            if layer.bias:  # the block's last column is the bias: a ones column
                a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
            outer[key] = (piece.grads, a)
        else:
            dense.update(layer_jacobian(piece))
    return kron_project_jacobian(curvature, dense, outer)


def _dense_jacobian(pieces: JacobianPieces, names: list[str]) -> Tensor:
    """The Jacobian ``(N, O, P)`` with the leaves flattened in ``names`` order."""
    out = dict(pieces.generic)
    for piece in pieces.layers:
        out.update(layer_jacobian(piece))
    return torch.cat([out[k].reshape(*out[k].shape[:2], -1) for k in names], -1)


def _concat_pieces(chunks: list[JacobianPieces]) -> JacobianPieces:
    first = chunks[0]
    layers = [
        LayerPiece(p.layer, torch.cat([c.layers[i].inputs for c in chunks]), torch.cat([c.layers[i].grads for c in chunks], 1))
        for i, p in enumerate(first.layers)
    ]
    generic = {k: torch.cat([c.generic[k] for c in chunks]) for k in first.generic}
    return JacobianPieces(torch.cat([c.outputs for c in chunks]), layers, generic)


def linearize(
    apply_fn: Callable, subset: Subset, state: LaplaceState, x: Tensor, *, chunk_size: int = 64
) -> Linearization:
    """Outputs and per-example Jacobians at the state's mean, ``chunk_size`` inputs at a time.

    ``apply_fn`` is the full model ``apply_fn(params, x)`` and ``subset`` the
    leaves the posterior leaves fixed. Structured layers (Linear, Conv) take
    one forward and ``O`` backward passes per chunk (:mod:`funcbnn.laplace.glm`),
    other leaves ``vmap(jacrev)``. Memory: ``"diag"`` keeps each structured
    layer's inputs and ``O`` output gradients; ``"kron"`` keeps ``N x O x out``
    plus ``N x d`` numbers per Linear layer and ``N x O x |W|`` per other
    block; ``"full"`` keeps ``N x O x P``.
    """
    chunk_size = positive_int(chunk_size, "chunk_size")
    _check_inputs(x)
    mean = {k: v.detach() for k, v in state.mean.items()}
    params = subset.merge(mean)
    names = list(mean)
    if state.structure == "full":
        with torch.no_grad():
            evals, evecs = torch.linalg.eigh(state.curvature.detach())
    chunks = []
    per_example = PerExample()
    for start in range(0, len(x), chunk_size):
        pieces = jacobian_pieces(apply_fn, params, names, x[start : start + chunk_size], per_example)
        with torch.no_grad():
            if state.structure == "kron":  # rotate chunk by chunk: the unrotated Jacobian never exists whole
                chunks.append((pieces.outputs, _kron_jacobian(state.curvature, pieces)))
            elif state.structure == "full":
                chunks.append((pieces.outputs, _dense_jacobian(pieces, names) @ evecs))
            else:
                chunks.append((pieces.outputs, pieces))
    f = chunks[0][0] if len(chunks) == 1 else torch.cat([c[0] for c in chunks])
    if state.structure == "full":
        rotated = chunks[0][1] if len(chunks) == 1 else torch.cat([c[1] for c in chunks])
        return Linearization(x, f, DenseJacobian(rotated, evals, evecs), state.structure)
    if len(chunks) == 1:
        return Linearization(x, f, chunks[0][1], state.structure)
    if state.structure == "diag":
        jacobian = _concat_pieces([c[1] for c in chunks])
    else:
        jacobian = optree.tree_map(lambda *parts: torch.cat(parts), *(c[1] for c in chunks))
    return Linearization(x, f, jacobian, state.structure)


def _covariance(state: LaplaceState, hyper: tuple[Tensor, Tensor, Tensor], lin: Linearization) -> Tensor:
    if state.structure == "full":
        jac: DenseJacobian = lin.jacobian
        pp, sd, temp = hyper
        s = _scale(state, sd, temp)
        if pp.dim() == 0:  # the precision shares the curvature's eigenbasis
            weight = (s * jac.evals.clamp_min(0) + pp).reciprocal()
            return (jac.rotated * weight) @ jac.rotated.transpose(1, 2)
        J = jac.rotated @ jac.evecs.T
        L, info = torch.linalg.cholesky_ex(precision(state, *hyper))
        if int(info) != 0:
            raise ValueError("the posterior precision is not positive definite; raise prior_precision")
        n, o, p = J.shape
        half = torch.linalg.solve_triangular(L, J.reshape(n * o, p).T, upper=False).T.reshape(n, o, p)
        return half @ half.transpose(1, 2)
    post = posterior(state, *hyper)
    variance_of = family_of(state.structure)
    if state.structure == "diag":  # weigh the pieces: the diagonal never forms the Jacobian
        return pieces_covariance(lin.jacobian, variance_of.variance(post))
    return variance_of.functional_variance(post, lin.jacobian)


def output_covariance(
    apply_fn: Callable,
    subset: Subset,
    state: LaplaceState,
    x: Any,
    *,
    prior_precision: Any = None,
    sigma: Any = None,
    temperature: Any = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Outputs at the MAP ``(N, *out)`` and the linearised output covariance ``J P^-1 J^T`` ``(N, O, O)``.

    ``x`` is inputs (linearised ``chunk_size`` at a time and let go, so memory
    stays bounded) or a :class:`Linearization` of them (reused as it is). The
    covariance is differentiable in tensor hyperparameters.
    """
    chunk_size = positive_int(chunk_size, "chunk_size")
    hyper = hyperparameters(state, prior_precision, sigma, temperature)
    if isinstance(x, Linearization):
        if x.structure != state.structure:
            raise ValueError(f"x is a Linearization for structure {x.structure!r}, the state is {state.structure!r}")
        return x.outputs, _covariance(state, hyper, x)
    _check_inputs(x)
    fs, covs = [], []
    for start in range(0, len(x), chunk_size):
        lin = linearize(apply_fn, subset, state, x[start : start + chunk_size], chunk_size=chunk_size)
        fs.append(lin.outputs)
        covs.append(_covariance(state, hyper, lin))
    return torch.cat(fs), torch.cat(covs)


def _class_probs(outputs: Tensor, lik: Likelihood) -> Tensor:
    """Mean class probabilities over the leading sample axis."""
    return lik.inverse_link(outputs).mean(0)


def laplace_bridge(mean: Tensor, cov: Tensor, *, normalize: bool = False) -> Tensor:
    """The Laplace bridge: class probabilities from Gaussian logits ``N(mean, cov)`` (Hobbhahn et al. 2022).

    "Fast Predictive Uncertainty for Classification with Bayesian Deep
    Networks": softmax is invariant to adding a constant to every logit, while
    the bridge's moment match assumes the logits sum to zero. The Gaussian is
    first conditioned on ``1^T f = 0`` (the zero-mean correction)::

        mu' = mu - S 1 (1^T mu) / (1^T S 1),     S' = S - S 1 1^T S / (1^T S 1),

    then mapped to the Dirichlet with

        alpha_k = (1 - 2/K + e^{mu'_k} / K^2 sum_l e^{-mu'_l}) / S'_kk,

    and the predictive is its mean ``alpha / sum_k alpha_k``. ``normalize``
    first rescales as laplace-torch's ``"bridge_norm"``: with
    ``c = mean_k S'_kk / sqrt(K / 2)``, ``mu' / sqrt(c)`` and ``S'_kk / c``.

    Parameters
    ----------
    mean : Tensor
        ``(N, K)`` logit means.
    cov : Tensor
        ``(N, K, K)`` logit covariances.
    normalize : bool
        Apply the variance normalisation.

    Returns
    -------
    Tensor
        ``(N, K)`` probabilities. A row whose corrected variances vanish (no
        uncertainty) gets ``softmax(mean)``, the limit of the bridge.

    Examples
    --------
    >>> mu, cov = torch.tensor([[2.0, 0.0, -1.0]]), 0.5 * torch.eye(3)[None]
    >>> probs = laplace_bridge(mu, cov)
    >>> probs.argmax(-1).item(), round(probs.sum().item(), 6)
    (0, 1.0)
    """
    if mean.dim() != 2 or cov.shape != (*mean.shape, mean.shape[-1]):
        raise ValueError(f"mean must be (N, K) and cov (N, K, K), got {tuple(mean.shape)} and {tuple(cov.shape)}")
    k = mean.shape[-1]
    row = cov.sum(-1)  # S 1, (N, K)
    total = row.sum(-1, keepdim=True)  # 1^T S 1, (N, 1)
    safe = total.clamp_min(torch.finfo(total.dtype).tiny)
    mu = mean - row * mean.sum(-1, keepdim=True) / safe
    var = torch.diagonal(cov, dim1=-2, dim2=-1) - row.square() / safe
    if normalize:
        c = var.mean(-1, keepdim=True) / math.sqrt(k / 2)
        mu = mu / c.sqrt()
        var = var / c
    sum_exp = torch.exp(-mu).sum(-1, keepdim=True)
    alpha = (1 - 2 / k + mu.exp() / k**2 * sum_exp) / var
    probs = alpha / alpha.sum(-1, keepdim=True)
    degenerate = ~torch.isfinite(probs).all(-1, keepdim=True) | (var <= 0).any(-1, keepdim=True)
    return torch.where(degenerate, mean.softmax(-1), probs)


def predict(
    apply_fn: Callable,
    subset: Subset,
    lik: Likelihood,
    state: LaplaceState,
    x: Any,
    *,
    pred_type: Literal["glm", "nn"] = "glm",
    link_approx: Literal["probit", "bridge", "bridge_norm", "mc"] = "probit",
    num_samples: int = 100,
    generator: torch.Generator | None = None,
    prior_precision: Any = None,
    sigma: Any = None,
    temperature: Any = None,
    chunk_size: int = 64,
) -> Any:
    """Posterior predictive (module docstring): probabilities, or ``(mean, variance)`` for regression.

    ``x`` is inputs or a :class:`Linearization` of them (``la.linearize``);
    ``prior_precision``, ``sigma`` and ``temperature`` override the state's. The
    GLM predictive is differentiable in tensor hyperparameters; the sampled
    ones are not.

    Raises ``ValueError`` for inputs the model cannot run on (named ``x``, torch's
    error chained) or with no examples, ``NonFiniteError`` for NaN or inf in ``x``
    (off under ``funcbnn.checks.set_finite_checks(False)``), ``TypeError`` for an
    integer ``generator`` or a model whose output is not one tensor.
    """
    if pred_type not in ("glm", "nn"):
        raise ValueError(f"pred_type must be 'glm' or 'nn', got {pred_type!r}")
    if link_approx not in LINK_APPROXIMATIONS:
        raise ValueError(f"link_approx must be one of {list(LINK_APPROXIMATIONS)}, got {link_approx!r}")
    if lik.link not in ("identity", "softmax", "sigmoid"):
        raise ValueError(
            f"predict covers likelihoods with a softmax, sigmoid or identity link (categorical, bernoulli, "
            f"gaussian), not {lik.name!r} (link {lik.link!r}); use output_covariance or sample for it"
        )
    if link_approx == "mc" or pred_type == "nn":
        positive_int(num_samples, "num_samples")
        check_generator(generator)
    pp, sd, temp = hyperparameters(state, prior_precision, sigma, temperature)
    regression = not lik.is_classification
    if pred_type == "nn":
        from ..predict import sample_outputs

        inputs = x.inputs if isinstance(x, Linearization) else x
        if not isinstance(x, Linearization):
            _check_inputs(inputs)
        draws = family_of(state.structure).sample(posterior(state, pp, sd, temp), num_samples, generator=generator)
        outs = sample_outputs(lambda sub, xs: apply_fn(subset.merge(sub), xs), draws, inputs)
        if regression:
            return outs.mean(0), outs.var(0, correction=0) + sd**2
        return _class_probs(outs, lik)
    f, cov = output_covariance(
        apply_fn, subset, state, x, prior_precision=pp, sigma=sd, temperature=temp, chunk_size=chunk_size
    )
    f_flat = f.reshape(f.shape[0], -1)
    var_f = torch.diagonal(cov, dim1=1, dim2=2)
    if regression:
        return f, var_f.reshape(f.shape) + sd**2
    if link_approx == "probit":
        kappa = 1 / torch.sqrt(1 + math.pi / 8 * var_f)
        return lik.inverse_link(f_flat * kappa).reshape(f.shape)
    if link_approx in ("bridge", "bridge_norm"):
        if lik.link != "softmax":
            raise ValueError(f"link_approx={link_approx!r} is for the softmax (categorical) likelihood, not {lik.name!r}")
        return laplace_bridge(f_flat, cov, normalize=link_approx == "bridge_norm")
    # A square root through the eigendecomposition: the output covariance is often rank
    # deficient (fewer uncertain directions than classes), where Cholesky fails.
    if cov.dtype in LOW_PRECISION:  # no float16/bfloat16 eigh: decompose in float32, cast back
        evals, evecs = (t.to(cov.dtype) for t in torch.linalg.eigh(cov.float()))
    else:
        evals, evecs = torch.linalg.eigh(cov)
    root = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)
    eps = torch.empty((num_samples, *f_flat.shape), dtype=f.dtype, device=f.device).normal_(generator=generator)
    logits = f_flat + torch.einsum("noq,snq->sno", root, eps)
    return _class_probs(logits, lik).reshape(f.shape)
