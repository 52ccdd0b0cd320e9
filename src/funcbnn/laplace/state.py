"""A fitted Laplace approximation as data, and the posterior family state it stands for.

``q(theta) = N(theta_MAP, P^-1)`` with posterior precision
``P = s(sigma) / T * C + diag(prior_precision)``, where ``C`` is the per-example
curvature summed over all N examples (of the per-example NLL, never of a
batch-mean loss) at noise std 1, ``s = sigma^-2`` for the GGN and
``sigma^-4`` for the empirical Fisher (``s = 1`` without observation noise)
(Daxberger et al. 2021, "Laplace Redux"), and ``T`` the likelihood's
temperature (1: the Bayesian posterior; laplace-torch's ``temperature``). The
prior is ``N(prior_mean, diag(prior_precision)^-1)``; the prior precision is a
scalar, one value per leaf, or one per parameter, and the prior mean a scalar
or one value per parameter (laplace-torch's conventions).

A :class:`LaplaceState` keeps ``C`` and the hyperparameters apart, so the
prior precision and ``sigma`` can be tuned without touching data;
:func:`posterior` turns it into the state of the structure's family, which
owns sampling, KL, variances, log-determinants and the linearised output
covariance:

========= ================================================ =====================
structure family                                           precision as
========= ================================================ =====================
diag      :func:`funcbnn.families.diag_gaussian`           ``softplus(rho)^-2``
kron      :func:`funcbnn.families.kron_gaussian`           eigendecomposed KFAC
full      :func:`funcbnn.families.dense_gaussian`          Cholesky factor
========= ================================================ =====================
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from .._validation import positive_scalar
from ..families.dense_gaussian import DenseGaussianState, dense_gaussian
from ..families.diag_gaussian import DiagGaussianState, diag_gaussian, inverse_softplus
from ..families.kron_gaussian import KronGaussianState, kron_gaussian, kron_precision_dense
from ..tree import leaf_names

__all__ = [
    "STRUCTURES",
    "LaplaceState",
    "family_of",
    "hyperparameters",
    "leafwise",
    "prior_mean_of",
    "precision",
    "posterior",
    "logdet_precision",
]

STRUCTURES: tuple[str, ...] = ("diag", "kron", "full")
"""Posterior structures: diagonal, Kronecker-factored per layer (KFAC), dense over the subset."""


class LaplaceState(NamedTuple):
    """Everything a fitted Laplace approximation is, as data (tensors plus three plain fields).

    It saves with ``torch.save(state, path)`` and loads in a fresh process with
    plain ``torch.load(path)`` once :mod:`funcbnn` is imported;
    :func:`funcbnn.laplace.from_state` rebuilds the Laplace functions from it
    and the model, without data. The posterior's leaves are ``mean``'s keys;
    move or cast the tensors with :meth:`to` (``optree.tree_map`` would also
    visit the three plain fields).

    Attributes
    ----------
    mean : dict[str, Tensor]
        MAP values of the leaves under the posterior.
    curvature : dict[str, Tensor], Tensor or KronDecomposed
        Summed per-example curvature at noise std 1: a diagonal per leaf
        (``"diag"``), a ``P x P`` matrix over the leaves flattened in ``mean``'s
        order (``"full"``), or eigendecomposed Kronecker factors per layer
        (``"kron"``, see :mod:`funcbnn.laplace.kron`).
    prior_precision : Tensor
        0-d, or one value per leaf (in ``mean``'s order).
    sigma : Tensor
        0-d observation noise std (1 where the likelihood has none).
    loss : Tensor
        Summed NLL over the data at the MAP, at noise std 1.
    num_data, num_outputs : Tensor
        N and the number of scalar observations.
    structure : str
        ``"diag"``, ``"kron"`` or ``"full"``.
    likelihood : str
        The likelihood's registered name (``funcbnn.likelihoods.get_likelihood``).
    scale_power : int
        The curvature is scaled by ``sigma ** -scale_power``: 2 for a GGN or
        sampled GGN under Gaussian noise, 4 for an empirical Fisher under
        Gaussian noise, 0 without observation noise.
    prior_mean : Tensor or None
        0-d, or one value per parameter (the leaves flattened in ``mean``'s
        order); ``None`` (states saved before it existed) means 0.
    temperature : Tensor or None
        0-d likelihood temperature ``T``; ``None`` means 1.
    indices : dict[str, Tensor] or None
        For a subnetwork posterior (:mod:`funcbnn.laplace.subnetwork`): per
        model leaf, the flat indices of the entries under the posterior;
        ``mean[leaf]`` then holds just those entries, 1-D. ``None``: whole leaves.
    """

    mean: dict[str, Tensor]
    curvature: Any
    prior_precision: Tensor
    sigma: Tensor
    loss: Tensor
    num_data: Tensor
    num_outputs: Tensor
    structure: str
    likelihood: str
    scale_power: int
    prior_mean: Tensor | None = None
    temperature: Tensor | None = None
    indices: dict[str, Tensor] | None = None

    def to(self, *args: Any, **kwargs: Any) -> "LaplaceState":
        """The state with its tensors moved by ``Tensor.to(*args, **kwargs)``.

        Floating-point tensors take the device and dtype; the integer counts
        only the device.
        """
        device = self.sigma.to(*args, **kwargs).device

        def move(t: Tensor) -> Tensor:
            return t.to(*args, **kwargs) if t.is_floating_point() else t.to(device)

        fields = self._asdict()
        for name in ("structure", "likelihood", "scale_power"):
            fields.pop(name)
        return self._replace(**optree.tree_map(move, fields))


def family_of(structure: str) -> Any:
    """The posterior family of a structure (``"diag"``, ``"kron"``, ``"full"``)."""
    if structure == "diag":
        return diag_gaussian()
    if structure == "kron":
        return kron_gaussian()
    if structure == "full":
        return dense_gaussian()
    raise ValueError(f"structure must be one of {list(STRUCTURES)}, got {structure!r}")


def _sizes(mean: dict[str, Tensor]) -> list[int]:
    return [v.numel() for v in mean.values()]


def as_prior_precision(value: Any, mean: dict[str, Tensor], ref: Tensor) -> Tensor:
    """A prior precision as a 0-d tensor, one value per leaf ``(L,)`` or one per parameter ``(P,)``.

    A number, 0-d or shape-``(1,)`` tensor is a scalar; a dict ``{leaf: value}``
    (each value a scalar or leaf-shaped) becomes the per-parameter vector, in
    ``mean``'s order. Tensors keep their graph (only cast to ``ref``'s dtype and
    device), so a marginal likelihood or a predictive computed from them is
    differentiable.
    """
    names, sizes = list(mean), _sizes(mean)
    if isinstance(value, dict):
        if set(value) != set(names):
            raise ValueError(f"prior_precision as a dict needs exactly the leaves {names}, got {sorted(value)}")
        value = torch.cat(
            [torch.as_tensor(value[k], dtype=ref.dtype, device=ref.device).expand(mean[k].shape).reshape(-1) for k in names]
        )
    t = torch.as_tensor(value, dtype=ref.dtype, device=ref.device)
    if t.dim() > 1 or (t.dim() == 1 and t.numel() not in (1, len(names), sum(sizes))):
        raise ValueError(
            f"prior_precision must be a scalar, one value per leaf ({len(names)} leaves) or one per parameter "
            f"({sum(sizes)} parameters), got shape {tuple(t.shape)}"
        )
    if not bool((torch.isfinite(t) & (t > 0)).all()):
        bad = t[~(torch.isfinite(t) & (t > 0))]
        raise ValueError(f"prior_precision must be finite and positive, got {bad.reshape(-1)[:5].tolist()}")
    return t.reshape(()) if t.numel() == 1 else t


def as_prior_mean(value: Any, mean: dict[str, Tensor], ref: Tensor) -> Tensor:
    """A prior mean as a 0-d tensor or one value per parameter ``(P,)`` (a dict ``{leaf: value}`` is flattened)."""
    names, size = list(mean), sum(_sizes(mean))
    if isinstance(value, dict):
        if set(value) != set(names):
            raise ValueError(f"prior_mean as a dict needs exactly the leaves {names}, got {sorted(value)}")
        value = torch.cat(
            [torch.as_tensor(value[k], dtype=ref.dtype, device=ref.device).expand(mean[k].shape).reshape(-1) for k in names]
        )
    t = torch.as_tensor(value, dtype=ref.dtype, device=ref.device)
    if t.dim() > 1 or (t.dim() == 1 and t.numel() not in (1, size)):
        raise ValueError(
            f"prior_mean must be a scalar or one value per parameter ({size} parameters), got shape {tuple(t.shape)}"
        )
    if not bool(torch.isfinite(t).all()):
        raise ValueError("prior_mean must be finite")
    return t.reshape(()) if t.numel() == 1 else t


def as_sigma(value: Any, ref: Tensor) -> Tensor:
    """A noise std as a 0-d tensor: a number, 0-d or shape-``(1,)`` tensor (keeping its graph)."""
    return torch.as_tensor(positive_scalar(value, "sigma"), dtype=ref.dtype, device=ref.device)


def as_temperature(value: Any, ref: Tensor) -> Tensor:
    """A likelihood temperature as a positive 0-d tensor (keeping its graph)."""
    return torch.as_tensor(positive_scalar(value, "temperature"), dtype=ref.dtype, device=ref.device)


def hyperparameters(
    state: LaplaceState, prior_precision: Any = None, sigma: Any = None, temperature: Any = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(prior_precision, sigma, temperature)``: the state's, or the given values validated like :func:`~funcbnn.laplace.fit`'s."""
    ref = state.sigma
    pp = state.prior_precision if prior_precision is None else as_prior_precision(prior_precision, state.mean, ref)
    sd = state.sigma if sigma is None else as_sigma(sigma, ref)
    if temperature is not None:
        temp = as_temperature(temperature, ref)
    else:
        temp = torch.ones_like(ref) if state.temperature is None else state.temperature
    return pp, sd, temp


def prior_mean_of(state: LaplaceState) -> Tensor:
    """The state's prior mean: 0-d or ``(P,)`` (0 for states without one)."""
    return torch.zeros_like(state.sigma) if state.prior_mean is None else state.prior_mean


def leafwise(value: Tensor, mean: dict[str, Tensor]) -> dict[str, Tensor]:
    """A 0-d, per-leaf ``(L,)`` or per-parameter ``(P,)`` vector as one tensor per leaf, broadcastable to it.

    0-d and per-leaf values give 0-d tensors; per-parameter ones leaf-shaped
    slices (when ``L == P`` every leaf has one entry and the two agree).
    """
    names = list(mean)
    if value.dim() == 0:
        return {k: value for k in names}
    if value.numel() == len(names):
        return {k: value[i] for i, k in enumerate(names)}
    out, start = {}, 0
    for k in names:
        n = mean[k].numel()
        out[k] = value[start : start + n].reshape(mean[k].shape)
        start += n
    return out


def _scale(state: LaplaceState, sd: Tensor, temp: Tensor) -> Tensor:
    s = sd ** (-state.scale_power) if state.scale_power else torch.ones_like(sd)
    return s / temp


def _per_leaf_scalars(pp: Tensor, mean: dict[str, Tensor], structure: str) -> dict[str, Tensor]:
    leaves = leafwise(pp, mean)
    if any(v.dim() and v.numel() > 1 for v in leaves.values()):
        raise ValueError(
            f"structure={structure!r} takes a scalar prior precision or one per leaf, not one per parameter "
            "(the Kronecker eigenbasis needs an isotropic prior within each block); use structure='diag' or 'full'"
        )
    return {k: v.reshape(()) for k, v in leaves.items()}


def precision(state: LaplaceState, prior_precision: Any = None, sigma: Any = None, temperature: Any = None) -> Any:
    """The posterior precision ``s(sigma) / T C + diag(prior_precision)`` in the structure's own form.

    A diagonal per leaf (``"diag"``); a ``P x P`` matrix over the leaves
    flattened in ``mean``'s order (``"full"``); or for ``"kron"`` a pair
    ``(dense block per layer, diagonal per other leaf)`` rebuilt from the
    factors (memory ``|W|^2`` per layer: for inspection of small layers).
    """
    pp, sd, temp = hyperparameters(state, prior_precision, sigma, temperature)
    s = _scale(state, sd, temp)
    names = list(state.mean)
    if state.structure == "kron":
        return kron_precision_dense(state.curvature, _per_leaf_scalars(pp, state.mean, "kron"), s)
    leaves = leafwise(pp, state.mean)
    if state.structure == "diag":
        return {k: state.curvature[k] * s + leaves[k] for k in names}
    diag = torch.cat([leaves[k].expand(state.mean[k].shape).reshape(-1) for k in names])
    return state.curvature * s + torch.diag(diag)


def _ravel_order(mean: dict[str, Tensor]) -> Tensor | None:
    """Indices taking vectors in ``mean``'s key order to ``funcbnn.tree.ravel(mean)``'s order (None: the same)."""
    names = list(mean)
    ravel_names = leaf_names(mean)
    if ravel_names == names:
        return None
    starts, offset = {}, 0
    for k in names:
        starts[k] = offset
        offset += mean[k].numel()
    ref = next(iter(mean.values()))
    return torch.cat([torch.arange(starts[k], starts[k] + mean[k].numel(), device=ref.device) for k in ravel_names])


def posterior(state: LaplaceState, prior_precision: Any = None, sigma: Any = None, temperature: Any = None) -> Any:
    """The state of the structure's family (:func:`family_of`) for ``state`` and these hyperparameters.

    ``diag`` gives a :class:`~funcbnn.families.DiagGaussianState` (the diagonal
    Laplace posterior *is* a diagonal Gaussian: same draws for the same
    generator, same KL), ``kron`` a :class:`~funcbnn.families.KronGaussianState`
    sharing the eigendecomposed factors, ``full`` a
    :class:`~funcbnn.families.DenseGaussianState` holding the Cholesky factor of
    the precision. Differentiable in tensor hyperparameters; the mean is shared,
    not copied.

    Raises
    ------
    ValueError
        For a ``"full"`` precision that is not positive definite, or a
        per-parameter prior precision with ``"kron"``.
    """
    pp, sd, temp = hyperparameters(state, prior_precision, sigma, temperature)
    names = list(state.mean)
    if state.structure == "diag":
        prec = precision(state, pp, sd, temp)
        return DiagGaussianState(state.mean, {k: inverse_softplus(prec[k].rsqrt()) for k in names})
    if state.structure == "kron":
        return KronGaussianState(state.mean, state.curvature, _per_leaf_scalars(pp, state.mean, "kron"), _scale(state, sd, temp))
    prec = precision(state, pp, sd, temp)
    order = _ravel_order(state.mean)
    if order is not None:  # the family flattens leaves in optree's (sorted-key) order
        prec = prec[order][:, order]
    L, info = torch.linalg.cholesky_ex(prec)
    if int(info) != 0:
        raise ValueError(
            "the posterior precision is not positive definite (the curvature has negative eigenvalues "
            "beyond the prior precision); raise prior_precision"
        )
    return DenseGaussianState(state.mean, L)


def logdet_precision(state: LaplaceState, prior_precision: Any = None, sigma: Any = None, temperature: Any = None) -> Tensor:
    """``log det P``: the family's ``logdet_precision`` of :func:`posterior`, differentiable in the hyperparameters.

    The diagonal structure sums ``log P`` directly instead of going through the
    family's softplus parameterisation (the same number up to round-off, about
    3x faster): marginal-likelihood tuning evaluates it hundreds of times.
    """
    pp, sd, temp = hyperparameters(state, prior_precision, sigma, temperature)
    if state.structure == "diag":
        return torch.stack([p.log().sum() for p in precision(state, pp, sd, temp).values()]).sum()
    return family_of(state.structure).logdet_precision(posterior(state, pp, sd, temp))
