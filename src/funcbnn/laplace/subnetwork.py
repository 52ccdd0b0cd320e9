"""Subnetwork selection for subnetwork Laplace (Daxberger et al. 2021).

"Bayesian Deep Learning via Subnetwork Inference" (Daxberger, Nalisnick,
Allingham, Antorán, Hernández-Lobato, ICML 2021): keep a full-covariance
Laplace posterior over a small, well-chosen subset of the weights and hold the
others at their MAP values. The paper chooses the weights of largest marginal
variance under a diagonal approximation (the choice that best preserves the
full-network posterior in Wasserstein distance); laplace-torch offers that
variance from a diagonal Laplace or from diagonal SWAG, and the largest
magnitude as a cheap baseline. All three are here, as :class:`Subnetwork`
values that :func:`funcbnn.laplace.fit` takes as ``subset``::

    la_diag, s_diag = funcbnn.laplace.fit(apply_fn, params, data, "classification")
    s_diag = la_diag.tune(s_diag)
    sub = largest_variance(la_diag.family.variance(la_diag.posterior(s_diag)), 500)
    la, state = funcbnn.laplace.fit(apply_fn, params, data, "classification", subset=sub, structure="full")

The posterior's leaves are then the chosen entries of each model leaf, 1-D and
in ascending flat-index order (``state.mean[leaf]``, ``state.indices[leaf]``);
``la.apply_fn`` puts them back into the MAP weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._validation import positive_int
from ..families.base import require

__all__ = ["Subnetwork", "top_k", "largest_magnitude", "largest_variance", "from_masks", "scatter_into"]


class Subnetwork(NamedTuple):
    """The weights a subnetwork posterior covers: per leaf, flat indices into it (sorted, unique, int64).

    Leaves without an entry, or with an empty index tensor, stay at their MAP values.
    """

    indices: dict[str, Tensor]

    @property
    def size(self) -> int:
        """The number of weights covered."""
        return sum(int(i.numel()) for i in self.indices.values())


def _check_scores(scores: Any, name: str) -> dict[str, Tensor]:
    if not isinstance(scores, Mapping) or not scores:
        raise TypeError(f"{name} must be a non-empty dict of tensors (leaf name -> Tensor), got {type(scores).__name__}")
    for k, v in scores.items():
        if not isinstance(v, Tensor) or not v.is_floating_point():
            raise TypeError(f"{name}[{k!r}] must be a floating-point tensor, got {type(v).__name__}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name}[{k!r}] has non-finite entries")
    return dict(scores)


def top_k(scores: Mapping[str, Tensor], num_weights: int) -> Subnetwork:
    """The ``num_weights`` entries of largest score across all leaves (ties broken by position).

    Parameters
    ----------
    scores : dict[str, Tensor]
        One score tensor per leaf (any shape).
    num_weights : int
        How many weights to keep; at most the total number of entries.

    Examples
    --------
    >>> sub = top_k({"w": torch.tensor([[0.1, 3.0], [2.0, 0.0]]), "b": torch.tensor([1.0])}, 2)
    >>> {k: v.tolist() for k, v in sub.indices.items()}
    {'w': [1, 2], 'b': []}
    """
    scores = _check_scores(scores, "scores")
    num_weights = positive_int(num_weights, "num_weights")
    names = list(scores)
    flat = torch.cat([scores[k].detach().reshape(-1) for k in names])
    if num_weights > flat.numel():
        raise ValueError(f"num_weights={num_weights} exceeds the {flat.numel()} weights in the tree")
    # A stable descending sort: equal scores keep their order, so the choice is reproducible.
    chosen = torch.sort(torch.argsort(flat, descending=True, stable=True)[:num_weights]).values
    out, start = {}, 0
    for k in names:
        n = scores[k].numel()
        sel = chosen[(chosen >= start) & (chosen < start + n)] - start
        out[k] = sel.to(torch.int64)
        start += n
    return Subnetwork(out)


def largest_magnitude(params: Mapping[str, Tensor], num_weights: int) -> Subnetwork:
    """The ``num_weights`` weights of largest ``|theta|`` (laplace-torch's ``LargestMagnitudeSubnetMask``)."""
    params = _check_scores(params, "params")
    return top_k({k: v.detach().abs() for k, v in params.items()}, num_weights)


def largest_variance(variances: Any, num_weights: int) -> Subnetwork:
    """The ``num_weights`` weights of largest marginal variance (Daxberger et al. 2021).

    Parameters
    ----------
    variances : dict[str, Tensor] or (family, state)
        Marginal variances per leaf, e.g. of a diagonal Laplace
        (``la.family.variance(la.posterior(state))``) or of diagonal SWAG
        (``family.variance(state)`` for ``family, state = funcbnn.swag.posterior(s, form="diag")``);
        or a ``(family, state)`` pair whose family has the ``variance`` capability.
    num_weights : int

    Raises
    ------
    ValueError
        For negative variances.
    """
    if isinstance(variances, tuple) and len(variances) == 2 and not isinstance(variances[0], Tensor):
        family, state = variances
        variances = require(family, "variance", "largest_variance")(state)
    variances = _check_scores(variances, "variances")
    for k, v in variances.items():
        if bool((v < 0).any()):
            raise ValueError(f"variances[{k!r}] has negative entries")
    return top_k(variances, num_weights)


def from_masks(masks: Mapping[str, Tensor]) -> Subnetwork:
    """A subnetwork from boolean masks shaped like the leaves (``True``: under the posterior)."""
    if not isinstance(masks, Mapping) or not masks:
        raise TypeError("masks must be a non-empty dict of boolean tensors")
    out = {}
    for k, m in masks.items():
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            raise TypeError(f"masks[{k!r}] must be a boolean tensor, got {getattr(m, 'dtype', type(m).__name__)}")
        out[k] = torch.nonzero(m.reshape(-1)).reshape(-1)
    if not any(i.numel() for i in out.values()):
        raise ValueError("masks select no weights")
    return Subnetwork(out)


def check_subnetwork(sub: Subnetwork, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The non-empty index tensors of ``sub``, validated against ``params`` (in ``params`` order)."""
    if not isinstance(sub.indices, Mapping):
        raise TypeError("Subnetwork.indices must be a dict of index tensors")
    unknown = sorted(set(sub.indices) - set(params))
    if unknown:
        raise ValueError(f"subnetwork leaves {unknown} are not leaves of params")
    out = {}
    for k in params:
        idx = sub.indices.get(k)
        if idx is None or idx.numel() == 0:
            continue
        if idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 1:
            raise TypeError(f"subnetwork indices of {k!r} must be a 1-D integer tensor, got {idx.dtype} {tuple(idx.shape)}")
        n = params[k].numel()
        if int(idx.min()) < 0 or int(idx.max()) >= n or torch.unique(idx).numel() != idx.numel():
            raise ValueError(f"subnetwork indices of {k!r} must be unique and lie in [0, {n - 1}]")
        out[k] = torch.sort(idx.to(torch.int64)).values.to(params[k].device)
    if not out:
        raise ValueError("the subnetwork selects no weights")
    return out


def scatter_into(full: Mapping[str, Tensor], indices: Mapping[str, Tensor], sub: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``full`` with ``sub[leaf]`` written at ``indices[leaf]`` (out of place; works under ``vmap``)."""
    out = dict(full)
    for k, idx in indices.items():
        base = full[k]
        out[k] = base.reshape(-1).scatter(0, idx, sub[k]).reshape(base.shape)
    return out
