"""Kronecker-factored Gaussian over a parameter dict: the KFAC Laplace posterior.

``q(theta) = N(mean, P^-1)`` with a block-diagonal precision

``P = s C + diag(delta)``,

where ``C`` holds one Kronecker block ``G (x) A/M`` per layer (KFAC, Martens &
Grosse 2015; as a Laplace posterior, Ritter et al. 2018 and Daxberger et al.
2021) and a diagonal for every other leaf, ``s`` is a curvature scale
(``sigma^-2`` for a regression GGN fitted at unit noise, else 1) and ``delta``
one prior precision per leaf.

Block conventions (shared with :mod:`funcbnn.laplace.kron`, which accumulates
the factors): a block keyed ``(weight, bias)`` covers the matrix
``[W.reshape(out, -1) | b]`` of shape ``(out, d + 1)`` flattened row-major;
``(weight,)`` covers ``W.reshape(out, -1)``; ``(bias,)`` covers ``b`` alone.

Eigendecomposing ``A/M = U diag(a) U^T`` and ``G = V diag(g) V^T`` once, a
block's precision is diagonal in the basis ``V (x) U`` with eigenvalues
``s g_i a_k + delta_W`` (laplace-torch's ``KronDecomposed``). When the weight
and bias of a joint block have different prior precisions, ``P`` gets an extra
``(delta_b - delta_W) I (x) e e^T`` (``e`` the bias column), a rank-one term per
eigenvector of ``G`` that the matrix determinant lemma and Sherman-Morrison
handle exactly. Every function here is differentiable in the prior precision,
the scale and the mean; none forms a block's ``(out d)^2`` precision except
:func:`kron_precision_dense`, which is for inspection.

The state is a :class:`KronGaussianState`, a pytree of tensors: it saves with
``torch.save`` and loads with ``torch.load(path)`` once :mod:`funcbnn` is
imported (the state types are registered as safe globals).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Callable, Literal, NamedTuple

import torch
from torch import Tensor

from .._validation import check_positive_tree, positive_float, positive_int
from ..tree import Tree, check_same_structure, tree_size
from ..checks import check_finite, check_generator
from ._kl import check_reduction, monte_carlo_kl

__all__ = [
    "KronEigen",
    "KronDecomposed",
    "KronJacobian",
    "KronGaussianState",
    "KronGaussian",
    "kron_gaussian",
    "kron_precision_dense",
    "kron_logdet",
    "kron_sample",
    "kron_covariance_diag",
    "kron_functional_variance",
    "kron_project_jacobian",
]

BlockKey = tuple[str, ...]
_LOG_2PI = math.log(2 * math.pi)


class KronEigen(NamedTuple):
    """Eigendecomposition of one block's factors: ``A/M = U diag(a) U^T``, ``G = V diag(g) V^T``."""

    a: Tensor
    U: Tensor
    g: Tensor
    V: Tensor


class KronDecomposed(NamedTuple):
    """Eigendecomposed KFAC curvature: Kronecker blocks plus a diagonal for the other leaves.

    ``blocks`` is keyed by the tuple of leaf names a block covers, ``diag`` by
    leaf name (each value shaped like its leaf). It comes from
    :func:`funcbnn.laplace.kron.kron_decompose`, or is built directly.
    """

    blocks: dict[BlockKey, KronEigen]
    diag: dict[str, Tensor]

    @property
    def names(self) -> tuple[str, ...]:
        """Every leaf covered, blocks first (in key order), then the diagonal leaves."""
        return tuple(n for key in self.blocks for n in key) + tuple(self.diag)


class KronJacobian(NamedTuple):
    """Per-example Jacobians already rotated into a curvature's eigenbasis (:func:`kron_project_jacobian`).

    ``blocks[key]`` is ``V^T J U`` of shape ``(N, O, out, d)``; ``factors[key]``
    holds the same for a block whose Jacobian is an outer product
    ``J[n, o] = g[n, o] a[n]^T`` (a Linear layer on one input row per example)
    as the pair ``(V^T g, U^T a)``, shaped ``(N, O, out)`` and ``(N, d)``, never
    forming the block; ``diag[name]`` is a diagonal leaf's Jacobian flattened to
    ``(N, O, leaf.numel())``. It depends on the eigenbasis only, not on the prior
    precision or the scale, so repeated predictions under different
    hyperparameters reuse it.
    """

    blocks: dict[BlockKey, Tensor]
    factors: dict[BlockKey, tuple[Tensor, Tensor]]
    diag: dict[str, Tensor]


class KronGaussianState(NamedTuple):
    """State of a Kronecker-factored Gaussian (a pytree of tensors).

    Attributes
    ----------
    mean : dict[str, Tensor]
        The centre (for a Laplace posterior, the MAP).
    curvature : KronDecomposed
        ``C``: eigendecomposed Kronecker blocks and the diagonal of the other leaves.
    prior_precision : dict[str, Tensor]
        ``delta``: one positive 0-d tensor per leaf of ``mean``.
    scale : Tensor
        ``s``: a positive 0-d tensor multiplying the curvature.
    """

    mean: dict[str, Tensor]
    curvature: KronDecomposed
    prior_precision: dict[str, Tensor]
    scale: Tensor


# --- algebra on a decomposed curvature ------------------------------------------------------------


class _Terms(NamedTuple):
    """A block's precision in the eigenbasis: ``diag(L) + c I (x) u u^T``."""

    L: Tensor  # (out, d): s g_i a_k + delta_W
    c: Tensor | None  # delta_b - delta_W (None: no bias column)
    u: Tensor | None  # (d,): the bias unit vector in the U basis (last row of U)
    q: Tensor | None  # (out,): u^T diag(1/L_i) u
    r: Tensor | None  # (out,): 1 + c q_i, so det(P_i) = prod(L_i) r_i


def _scalar(value: Any, name: str, ref: Tensor) -> Tensor:
    t = value if isinstance(value, Tensor) else torch.as_tensor(value)
    if t.dim() == 1 and t.numel() == 1:  # laplace-torch's shape-(1,) hyperparameters
        t = t.reshape(())
    t = t.to(dtype=ref.dtype, device=ref.device)
    if t.dim() != 0:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t) & (t > 0)):
        raise ValueError(f"{name} must be finite and positive, got {t.item()}")
    return t


def _prior(prior_precision: Any, names: tuple[str, ...], ref: Tensor) -> dict[str, Tensor]:
    """Per-leaf prior precision from a scalar or a mapping ``{leaf: value}``."""
    if isinstance(prior_precision, Mapping):
        missing = [n for n in names if n not in prior_precision]
        if missing:
            raise ValueError(f"prior_precision has no value for leaves {missing}")
        return {n: _scalar(prior_precision[n], f"prior_precision[{n!r}]", ref) for n in names}
    t = _scalar(prior_precision, "prior_precision", ref)
    return {n: t for n in names}


def _ref(dec: KronDecomposed) -> Tensor:
    if not isinstance(dec, KronDecomposed):
        raise TypeError(f"expected a KronDecomposed (funcbnn.laplace.kron.kron_decompose), got {type(dec).__name__}")
    for e in dec.blocks.values():
        return e.a
    for d in dec.diag.values():
        return d
    raise ValueError("the curvature covers no leaves")


def _setup(dec: KronDecomposed, prior_precision: Any, scale: Any) -> tuple[dict[str, Tensor], Tensor]:
    ref = _ref(dec)
    return _prior(prior_precision, dec.names, ref), _scalar(scale, "scale", ref)


def _terms(key: BlockKey, e: KronEigen, pp: dict[str, Tensor], s: Tensor) -> _Terms:
    dw = pp[key[0]]
    L = s * e.g[:, None] * e.a[None, :] + dw
    if len(key) == 1:
        return _Terms(L, None, None, None, None)
    c = pp[key[1]] - dw
    u = e.U[-1]
    q = (u.square() / L).sum(-1)
    return _Terms(L, c, u, q, 1 + c * q)


def _split(key: BlockKey, theta: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Block matrices ``(..., out, d)`` back into leaf-shaped tensors ``(..., *leaf.shape)``."""
    lead = theta.shape[:-2]
    if len(key) == 1:
        return {key[0]: theta.reshape(*lead, *like[key[0]].shape)}
    w, b = key
    return {
        w: theta[..., :-1].reshape(*lead, *like[w].shape),
        b: theta[..., -1].reshape(*lead, *like[b].shape),
    }


def _join(key: BlockKey, tree: Mapping[str, Tensor], lead: int) -> Tensor:
    """Leaf tensors with ``lead`` leading axes as the block matrix ``(..., out, d)`` (inverse of :func:`_split`)."""
    w = tree[key[0]]
    if len(key) == 1 and w.dim() == lead + 1:  # a bias-only block: one column
        return w[..., None]
    mat = w.reshape(*w.shape[: lead + 1], -1)
    return torch.cat([mat, tree[key[1]][..., None]], -1) if len(key) == 2 else mat


def _check_like(dec: KronDecomposed, like: Mapping[str, Tensor], name: str) -> None:
    missing = [n for n in dec.names if n not in like]
    if missing:
        raise ValueError(f"{name} has no tensor for leaves {missing}")


def kron_precision_dense(
    dec: KronDecomposed, prior_precision: float | Tensor | Mapping[str, Any], scale: float | Tensor = 1.0
) -> tuple[dict[BlockKey, Tensor], dict[str, Tensor]]:
    """Posterior precision rebuilt from the eigenbasis: a dense matrix per block, a diagonal per other leaf.

    ``P = s G (x) A/M + delta`` in the block's ordering (module docstring). For
    inspection and small layers: a block needs ``(out * d)^2`` numbers.

    Parameters
    ----------
    dec : KronDecomposed
    prior_precision : float, Tensor or mapping
        A positive scalar, or ``{leaf name: scalar}`` for every leaf in ``dec``.
    scale : float or Tensor
        Curvature multiplier (``sigma^-2`` for a regression GGN at noise std 1).

    Returns
    -------
    (blocks, diag)
        ``blocks[key]`` is ``(out*d, out*d)``; ``diag[name]`` is shaped like the leaf.

    Examples
    --------
    >>> eye = torch.eye(2)
    >>> dec = KronDecomposed({("w",): KronEigen(torch.ones(2), eye, torch.ones(2), eye)}, {})
    >>> kron_precision_dense(dec, 0.5)[0][("w",)].diagonal()
    tensor([1.5000, 1.5000, 1.5000, 1.5000])
    """
    pp, s = _setup(dec, prior_precision, scale)
    blocks = {}
    for key, e in dec.blocks.items():
        t = _terms(key, e, pp, s)
        basis = torch.kron(e.V, e.U)
        P = (basis * t.L.reshape(-1)) @ basis.T
        if t.c is not None:
            d = e.a.shape[0]
            bias_mask = torch.zeros(d, dtype=P.dtype, device=P.device)
            bias_mask[-1] = 1
            P = P + torch.diag(t.c * bias_mask.repeat(e.g.shape[0]))
        blocks[key] = P
    return blocks, {k: s * v + pp[k] for k, v in dec.diag.items()}


def kron_logdet(
    dec: KronDecomposed, prior_precision: float | Tensor | Mapping[str, Any], scale: float | Tensor = 1.0
) -> Tensor:
    """``log det P`` of the whole precision (all blocks and diagonal leaves).

    Differentiable in ``prior_precision`` and ``scale``; the marginal likelihood
    (Immer et al. 2021) needs ``kron_logdet(...) - log det P0``.
    """
    pp, s = _setup(dec, prior_precision, scale)
    total = torch.zeros((), dtype=_ref(dec).dtype, device=_ref(dec).device)
    for key, e in dec.blocks.items():
        t = _terms(key, e, pp, s)
        total = total + t.L.log().sum()
        if t.r is not None:
            total = total + t.r.log().sum()  # matrix determinant lemma for the bias term
    for k, v in dec.diag.items():
        total = total + (s * v + pp[k]).log().sum()
    return total


def kron_sample(
    dec: KronDecomposed,
    mean: Mapping[str, Tensor],
    num_samples: int,
    prior_precision: float | Tensor | Mapping[str, Any],
    scale: float | Tensor = 1.0,
    *,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Draws from ``N(mean, P^-1)``, each leaf shaped ``(num_samples, *leaf.shape)``; differentiable.

    Per block, in the eigenbasis: ``theta = mean + V X U^T`` with
    ``X[i] = L_i^{-1/2} (eps_i - gamma_i u~_i u~_i^T eps_i)``, a symmetric square
    root of the block's covariance (``gamma = 0`` unless weight and bias have
    different prior precisions). Leaves come back in ``mean``'s order.

    Parameters
    ----------
    dec : KronDecomposed
    mean : mapping of str to Tensor
        The centre; its shapes place the draws.
    num_samples : int
    prior_precision, scale
        As in :func:`kron_precision_dense`.
    generator : torch.Generator, optional
        Same generator state, same draws.
    """
    positive_int(num_samples, "num_samples")
    _check_like(dec, mean, "mean")
    pp, s = _setup(dec, prior_precision, scale)
    out: dict[str, Tensor] = {}
    for key, e in dec.blocks.items():
        t = _terms(key, e, pp, s)
        eps = torch.randn((num_samples, *t.L.shape), dtype=t.L.dtype, device=t.L.device, generator=generator)
        if t.c is not None:
            u_t = t.L.rsqrt() * t.u  # (out, d): B_i^{-1/2} e in the U basis
            gamma = (1 - t.r.rsqrt()) / t.q
            eps = eps - gamma[:, None] * u_t * (u_t * eps).sum(-1, keepdim=True)
        X = eps * t.L.rsqrt()
        out.update(_split(key, e.V @ X @ e.U.T, mean))
    for k, v in dec.diag.items():
        eps = torch.randn((num_samples, *v.shape), dtype=v.dtype, device=v.device, generator=generator)
        out[k] = eps * (s * v + pp[k]).rsqrt()
    return {k: mean[k] + out[k] for k in mean if k in out}


def kron_covariance_diag(
    dec: KronDecomposed,
    like: Mapping[str, Tensor],
    prior_precision: float | Tensor | Mapping[str, Any],
    scale: float | Tensor = 1.0,
) -> dict[str, Tensor]:
    """The marginal variances ``diag(P^-1)``, shaped like the leaves of ``like`` (in its order).

    Per block ``sum_i V[o,i]^2 (sum_k U[j,k]^2 / L[i,k] - c/r_i (sum_k U[j,k] u_k / L[i,k])^2)``
    (Sherman-Morrison for the bias term), ``O(out^2 d + out d^2)``.
    """
    _check_like(dec, like, "like")
    pp, s = _setup(dec, prior_precision, scale)
    out: dict[str, Tensor] = {}
    for key, e in dec.blocks.items():
        t = _terms(key, e, pp, s)
        inner = t.L.reciprocal() @ e.U.square().T  # (out_i, d_j)
        if t.c is not None:
            inner = inner - (t.c / t.r)[:, None] * ((t.u / t.L) @ e.U.T).square()
        out.update(_split(key, e.V.square() @ inner, like))
    for k, v in dec.diag.items():
        out[k] = (s * v + pp[k]).reciprocal()
    return {k: out[k] for k in like if k in out}


def kron_project_jacobian(
    dec: KronDecomposed,
    jac: Mapping[str, Tensor],
    outer: Mapping[BlockKey, tuple[Tensor, Tensor]] | None = None,
) -> KronJacobian:
    """Per-example Jacobians rotated into the eigenbasis of ``dec`` (the expensive, hyperparameter-free half).

    Compute it once per set of inputs and pass the result to
    :func:`kron_functional_variance` for each prior precision or scale (a
    prior-precision grid search, a predictive check during tuning).

    Parameters
    ----------
    dec : KronDecomposed
    jac : mapping of str to Tensor
        ``(N, O, *leaf.shape)`` Jacobians of every leaf not covered by ``outer``.
    outer : mapping, optional
        ``{block key: (grads, inputs)}`` for blocks whose per-example Jacobian is
        the outer product ``grads[o, n] inputs[n]^T``: ``grads`` ``(O, N, out)``,
        ``inputs`` ``(N, d)`` in the block's column order (a ones column last
        for a joint bias). Kept as factors: ``O(N (O out + d))`` numbers instead
        of ``O(N O out d)``.
    """
    outer = dict(outer or {})
    unknown = set(outer) - set(dec.blocks)
    if unknown:
        raise ValueError(f"outer has keys that are not blocks of the curvature: {sorted(unknown)}")
    missing = [n for n in dec.names if n not in jac and not any(n in key for key in outer)]
    if missing:
        raise ValueError(f"jac has no tensor for leaves {missing}")
    blocks, factors = {}, {}
    for key, e in dec.blocks.items():
        if key in outer:
            grads, inputs = outer[key]
            factors[key] = (torch.einsum("oni,ia->noa", grads, e.V), inputs @ e.U)
            continue
        J = _join(key, {n: jac[n] for n in key}, 2)  # (N, O, out, d)
        blocks[key] = e.V.T @ J @ e.U
    diag = {k: jac[k].reshape(*jac[k].shape[:2], -1) for k in dec.diag}
    return KronJacobian(blocks, factors, diag)


def kron_functional_variance(
    dec: KronDecomposed,
    jac: Mapping[str, Tensor] | KronJacobian,
    prior_precision: float | Tensor | Mapping[str, Any],
    scale: float | Tensor = 1.0,
) -> Tensor:
    """Linearised output covariance ``J P^-1 J^T`` (the GLM predictive of Laplace Redux).

    Parameters
    ----------
    dec : KronDecomposed
    jac : mapping of str to Tensor, or KronJacobian
        ``jac[leaf]`` of shape ``(N, O, *leaf.shape)``: the Jacobian of the ``O``
        flattened outputs of each of ``N`` inputs, for every leaf in ``dec``; or
        the same already rotated by :func:`kron_project_jacobian`.
    prior_precision, scale
        As in :func:`kron_precision_dense`.

    Returns
    -------
    Tensor
        ``(N, O, O)``.
    """
    rotated = jac if isinstance(jac, KronJacobian) else kron_project_jacobian(dec, jac)
    pp, s = _setup(dec, prior_precision, scale)
    missing = [key for key in dec.blocks if key not in rotated.blocks and key not in rotated.factors]
    if missing:
        raise ValueError(f"jac has no rotated Jacobian for blocks {missing}")
    total = None
    for key, e in dec.blocks.items():
        t = _terms(key, e, pp, s)
        if key in rotated.factors:
            # J[n, o] = g a^T: sum_{a,k} gv_o[a] gv_p[a] au[k]^2 / L[a, k], one (N, out) weight per layer.
            gv, au = rotated.factors[key]
            cov = (gv * (au.square() @ t.L.reciprocal().T)[:, None, :]) @ gv.transpose(1, 2)
            z = gv * (au @ (t.u / t.L).T)[:, None, :] if t.c is not None else None
        else:
            Jr = rotated.blocks[key]
            flat = Jr.reshape(*Jr.shape[:2], -1)
            cov = (flat * t.L.reciprocal().reshape(-1)) @ flat.transpose(1, 2)
            z = torch.einsum("noak,ak->noa", Jr, t.u / t.L) if t.c is not None else None
        if z is not None:  # Sherman-Morrison for the bias term
            cov = cov - (z * (t.c / t.r)) @ z.transpose(1, 2)
        total = cov if total is None else total + cov
    for k, v in dec.diag.items():
        J = rotated.diag[k]
        cov = (J * (s * v + pp[k]).reciprocal().reshape(-1)) @ J.transpose(1, 2)
        total = cov if total is None else total + cov
    return total


def _quadratic(dec: KronDecomposed, delta: Mapping[str, Tensor], pp: dict[str, Tensor], s: Tensor, lead: int) -> Tensor:
    """``delta^T P delta`` for leaves with ``lead`` leading batch axes, computed in the eigenbasis."""
    total = 0
    for key, e in dec.blocks.items():
        t = _terms(key, e, pp, s)
        X = torch.einsum("ia,...id,dk->...ak", e.V, _join(key, delta, lead), e.U)
        quad = (t.L * X.square()).sum((-2, -1))
        if t.c is not None:
            quad = quad + t.c * (X @ t.u).square().sum(-1)
        total = total + quad
    for k, v in dec.diag.items():
        d = delta[k]
        total = total + ((s * v + pp[k]) * d.square()).reshape(*d.shape[:lead], -1).sum(-1)
    return total


# --- the family ------------------------------------------------------------------------------------


def _check_state(state: Any) -> None:
    if not isinstance(state, KronGaussianState):
        raise TypeError(f"state must be a KronGaussianState, got {type(state).__name__}")
    if not isinstance(state.mean, Mapping):
        raise TypeError(f"state.mean must be a dict of tensors, got {type(state.mean).__name__}")
    covered = state.curvature.names
    if sorted(covered) != sorted(state.mean) or len(set(covered)) != len(covered):
        raise ValueError(
            f"state.curvature must cover every leaf of state.mean exactly once; covers {sorted(covered)}, "
            f"mean has {sorted(state.mean)}"
        )
    missing = [k for k in state.mean if k not in state.prior_precision]
    if missing:
        raise ValueError(f"state.prior_precision has no value for leaves {missing}")


def sample(state: KronGaussianState, num_samples: int, *, generator: torch.Generator | None = None) -> Tree:
    """``num_samples`` draws, each leaf ``(num_samples, *leaf.shape)``; not differentiable (see :func:`rsample`)."""
    _check_state(state)
    with torch.no_grad():
        return rsample(state, num_samples, generator=generator)


def rsample(state: KronGaussianState, num_samples: int, *, generator: torch.Generator | None = None) -> Tree:
    """Reparameterised draws, differentiable in the state; for the same generator state, :func:`sample`'s values."""
    _check_state(state)
    check_generator(generator)
    return kron_sample(state.curvature, state.mean, num_samples, state.prior_precision, state.scale, generator=generator)


def variance(state: KronGaussianState) -> Tree:
    """Marginal variances ``diag(P^-1)``, shaped like the mean."""
    _check_state(state)
    return kron_covariance_diag(state.curvature, state.mean, state.prior_precision, state.scale)


def logdet_precision(state: KronGaussianState) -> Tensor:
    """``log det P``."""
    _check_state(state)
    return kron_logdet(state.curvature, state.prior_precision, state.scale)


def functional_variance(state: KronGaussianState, jac: Mapping[str, Tensor] | KronJacobian) -> Tensor:
    """``J P^-1 J^T``, ``(N, O, O)``, for per-leaf Jacobians ``(N, O, *leaf.shape)`` of every leaf.

    ``jac`` may also be a :class:`KronJacobian` from :func:`project_jacobian`
    on a state with the same curvature (then nothing but the hyperparameters'
    share is recomputed).
    """
    _check_state(state)
    return kron_functional_variance(state.curvature, jac, state.prior_precision, state.scale)


def project_jacobian(
    state: KronGaussianState, jac: Mapping[str, Tensor], outer: Mapping[BlockKey, tuple[Tensor, Tensor]] | None = None
) -> KronJacobian:
    """:func:`kron_project_jacobian` on the state's curvature (reusable across prior precisions and scales)."""
    _check_state(state)
    return kron_project_jacobian(state.curvature, jac, outer)


def log_prob(state: KronGaussianState, params: Tree) -> Tensor:
    """``log q(params)``; leaves may carry leading batch dims, which the result keeps."""
    _check_state(state)
    first = next(iter(state.mean))
    lead = params[first].dim() - state.mean[first].dim() if isinstance(params, Mapping) and first in params else 0
    check_same_structure(state.mean, params, "params", leading=max(lead, 0))
    pp, s = _setup(state.curvature, state.prior_precision, state.scale)
    delta = {k: params[k] - state.mean[k] for k in state.mean}
    quad = _quadratic(state.curvature, delta, pp, s, lead)
    size = tree_size(state.mean)
    return -0.5 * quad + 0.5 * kron_logdet(state.curvature, pp, s) - 0.5 * size * _LOG_2PI


def entropy(state: KronGaussianState) -> Tensor:
    """Differential entropy ``P/2 (1 + log 2 pi) - 1/2 log det P``."""
    _check_state(state)
    return 0.5 * tree_size(state.mean) * (1 + _LOG_2PI) - 0.5 * logdet_precision(state)


def kl(
    state: KronGaussianState,
    prior: Any,
    *,
    reduction: Literal["sum", "mean"] = "sum",
    method: Literal["auto", "analytic", "mc"] = "auto",
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``KL(q || prior)``, differentiable in the state.

    Against a prior with the ``"gaussian"`` closed form (mean ``m0``, per-element
    variances ``v0``) it is analytic:
    ``1/2 (tr(V0^-1 Sigma) + (mu - m0)^T V0^-1 (mu - m0) - P + log det V0 + log det P)``,
    with ``diag(Sigma)`` from :func:`kron_covariance_diag`; otherwise Monte Carlo
    with ``num_samples`` reparameterised draws. Arguments as in
    :func:`funcbnn.families.diag_gaussian.kl`.
    """
    _check_state(state)
    check_reduction(reduction)
    if method not in ("auto", "analytic", "mc"):
        raise ValueError(f"method must be 'auto', 'analytic' or 'mc', got {method!r}")
    analytic_ok = "gaussian" in getattr(prior, "closed_forms", ())
    if method == "analytic" and not analytic_ok:
        raise ValueError(f"KL(kron_gaussian || {type(prior).__name__}) has no closed form; use method='mc'")
    if method == "analytic" or (method == "auto" and analytic_ok):
        p_mean, p_std = prior.moments(state.mean)
        var = variance(state)
        terms = []
        for k, mu in state.mean.items():
            v0 = p_std[k].square()
            terms.append(((var[k] + (mu - p_mean[k]).square()) / v0 + v0.log()).sum())
        total = 0.5 * (torch.stack(terms).sum() - tree_size(state.mean) + logdet_precision(state))
    else:
        if num_samples is None:
            raise ValueError(
                f"KL(kron_gaussian || {type(prior).__name__}) has no closed form; "
                "pass num_samples=... for a Monte-Carlo estimate"
            )
        draws = rsample(state, num_samples, generator=generator)
        total = monte_carlo_kl(log_prob(state, draws), prior, draws)
    return total / tree_size(state.mean) if reduction == "mean" else total


def _flat_dict(params: Any, name: str) -> dict[str, Tensor]:
    if not isinstance(params, Mapping) or not params:
        raise TypeError(f"{name} must be a non-empty dict of tensors (leaf name -> Tensor), got {type(params).__name__}")
    for k, v in params.items():
        if not isinstance(v, Tensor) or not v.is_floating_point():
            raise TypeError(f"{name}[{k!r}] must be a floating-point tensor, got {v!r:.60}")
    return dict(params)


def from_moments(mean: Mapping[str, Tensor], std: float | Mapping[str, Any]) -> KronGaussianState:
    """A state with no curvature and per-leaf isotropic std: ``N(mean, diag(std^2))``.

    ``std`` is a positive number or ``{leaf: std}`` whose values are numbers or
    tensors constant over the leaf (the family's prior precision is one number
    per leaf); every leaf is diagonal.
    """
    mean = _flat_dict(mean, "mean")
    if isinstance(std, numbers.Real):
        std = {k: positive_float(std, "std") for k in mean}
    elif not isinstance(std, Mapping) or set(std) != set(mean):
        raise ValueError(f"std must be a positive number or a dict with the keys of mean {sorted(mean)}")
    check_positive_tree(dict(std), "std")
    pp = {}
    for k, m in mean.items():
        s = torch.as_tensor(std[k], dtype=m.dtype, device=m.device)
        if s.numel() > 1 and not bool((s == s.reshape(-1)[0]).all()):
            raise ValueError(f"std[{k!r}] must be constant over the leaf (kron_gaussian has one precision per leaf)")
        pp[k] = s.reshape(-1)[0].detach().square().reciprocal()
    ref = next(iter(mean.values()))
    return KronGaussianState(
        mean={k: m.detach().clone() for k, m in mean.items()},
        curvature=KronDecomposed({}, {k: torch.zeros_like(m).detach() for k, m in mean.items()}),
        prior_precision=pp,
        scale=torch.ones((), dtype=ref.dtype, device=ref.device),
    )


class KronGaussian(NamedTuple):
    """The Kronecker-factored Gaussian family: pure functions over a :class:`KronGaussianState`.

    ``init``, ``sample`` and ``kl`` form the posterior protocol; the rest are
    declared capabilities (:mod:`funcbnn.families.base`) and two extras,
    ``from_moments`` and ``project_jacobian``.
    """

    init: Callable[..., KronGaussianState]
    sample: Callable[..., Tree]
    kl: Callable[..., Tensor]
    rsample: Callable[..., Tree] = rsample
    log_prob: Callable[[KronGaussianState, Tree], Tensor] = log_prob
    entropy: Callable[[KronGaussianState], Tensor] = entropy
    mean: Callable[[KronGaussianState], Tree] = lambda state: state.mean
    variance: Callable[[KronGaussianState], Tree] = variance
    logdet_precision: Callable[[KronGaussianState], Tensor] = logdet_precision
    functional_variance: Callable[..., Tensor] = functional_variance
    from_moments: Callable[..., KronGaussianState] = from_moments
    project_jacobian: Callable[..., KronJacobian] = project_jacobian


def kron_gaussian(init_std: float = 1e-3) -> KronGaussian:
    """Build the Kronecker-factored Gaussian family.

    States normally come from :func:`funcbnn.laplace.fit` with
    ``structure="kron"`` (``la.posterior(state)``); ``init`` gives the data-free
    state ``N(params, init_std^2 I)``: no curvature, every leaf diagonal.

    Parameters
    ----------
    init_std : float, default 1e-3
        Std of the state that ``init`` returns (positive).

    Examples
    --------
    >>> post = kron_gaussian(init_std=0.1)
    >>> state = post.init({"w": torch.zeros(3, 2), "b": torch.zeros(3)})
    >>> post.sample(state, 8, generator=torch.Generator().manual_seed(0))["w"].shape
    torch.Size([8, 3, 2])
    """
    positive_float(init_std, "init_std")

    def init(params: Mapping[str, Tensor], *, generator: torch.Generator | None = None) -> KronGaussianState:
        """State ``N(params, init_std^2 I)`` (``generator`` is accepted for the protocol and unused)."""
        check_generator(generator)
        check_finite(params, "params", context="post.init needs finite parameters to centre the posterior on")
        return from_moments(params, init_std)

    return KronGaussian(init=init, sample=sample, kl=kl)
