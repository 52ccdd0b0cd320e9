"""Metrics of predictive uncertainty: classification, regression, OOD detection, selective prediction.

Pure torch and batched: every function takes inputs with optional leading batch
axes (``(*B, N, C)`` probabilities, ``(*B, N)`` scores or means) and returns one
value per batch entry, so the metrics of several methods, shift strengths or
splits come from one call. Targets broadcast against the batch axes (one
``(N,)`` label vector serves a ``(M, N, C)`` stack of predictions).

Inputs are checked before anything is computed, with errors naming the
argument: shapes that do not match, probabilities outside ``[0, 1]`` or whose
rows do not sum to one, labels out of range, non-finite values.

Classification (``probs`` of shape ``(*B, N, C)``, integer ``labels``)
    :func:`accuracy`, :func:`nll`, :func:`brier`, :func:`ece` (equal-width
    bins, Guo et al. 2017) with :func:`reliability` (the per-bin data of a
    reliability diagram), :func:`adaptive_ece` (equal-mass bins, Nixon et al. 2019).
Ranking an uncertainty score (``scores`` of shape ``(*B, N)``)
    :func:`auroc`, :func:`average_precision` (AUPR), and for OOD detection
    :func:`ood_auroc` / :func:`ood_aupr` (out-of-distribution is the positive
    class, higher score = more uncertain); :func:`aurc`, the area under the
    risk-coverage curve of selective prediction (Geifman & El-Yaniv 2017), with
    :func:`risk_coverage`.
Regression (``mean``, ``std`` or ``var`` of shape ``(*B, N)``, targets ``(N,)``)
    :func:`rmse`, :func:`gaussian_nll`, :func:`gaussian_mixture_nll`,
    :func:`crps_gaussian` (closed form, Gneiting & Raftery 2007), :func:`picp` and
    :func:`interval_width` of central intervals, and :func:`regression_calibration_error`
    (Kuleshov et al. 2018).

Ties are handled as scikit-learn does: AUROC uses mid-ranks (tied scores count
one half), average precision and AURC step over distinct thresholds.

Examples
--------
>>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
>>> labels = torch.tensor([0, 1, 1])
>>> accuracy(probs, labels)
tensor(0.6667)
>>> ood_auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.15]))
tensor(0.7500)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "accuracy",
    "nll",
    "brier",
    "Reliability",
    "reliability",
    "ece",
    "adaptive_ece",
    "auroc",
    "average_precision",
    "ood_auroc",
    "ood_aupr",
    "RiskCoverage",
    "risk_coverage",
    "aurc",
    "rmse",
    "gaussian_nll",
    "gaussian_mixture_nll",
    "crps_gaussian",
    "picp",
    "interval_width",
    "regression_calibration_error",
]

_SUM_TOL = 1e-3
"""How far a row of probabilities may sum from one (float32 softmax outputs are within ~1e-6)."""

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# --- input checks -------------------------------------------------------------------------------


def _floating(x: object, name: str, *, min_dim: int) -> Tensor:
    """``x`` if it is a finite floating-point tensor of at least ``min_dim`` dimensions with examples."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    if min_dim and (x.shape[-1] == 0 or (min_dim >= 2 and x.shape[-2] == 0)):
        raise ValueError(f"{name} holds no examples (shape {tuple(x.shape)})")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} must be finite, got {bad} NaN/inf value(s)")
    return x


def _check_probs(probs: object, name: str = "probs") -> Tensor:
    probs = _floating(probs, name, min_dim=2)
    if probs.shape[-1] < 2:
        raise ValueError(
            f"{name} must have at least 2 classes on its last axis, got shape {tuple(probs.shape)}"
        )
    lo, hi = float(probs.min()), float(probs.max())
    if lo < 0 or hi > 1:
        raise ValueError(
            f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}] (pass probabilities, not logits)"
        )
    err = (probs.sum(-1) - 1).abs().max()
    if float(err) > _SUM_TOL:
        raise ValueError(
            f"{name} rows must sum to one over the last (class) axis, got a row off by {float(err):.3g}; "
            "apply softmax to logits first"
        )
    return probs


def _check_labels(
    labels: object, batch_shape: torch.Size, num_classes: int | None, name: str = "labels"
) -> Tensor:
    """Integer labels broadcastable to ``batch_shape`` (``(*B, N)``), in ``[0, num_classes)``."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool:
        labels = labels.long()
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must be an integer (or bool) tensor, got dtype {labels.dtype}")
    if labels.dim() < 1 or labels.shape[-1] != batch_shape[-1]:
        raise ValueError(
            f"{name} must have {batch_shape[-1]} examples on its last axis, got shape {tuple(labels.shape)}"
        )
    try:
        torch.broadcast_shapes(labels.shape, batch_shape)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(labels.shape)} does not broadcast against the predictions' batch shape "
            f"{tuple(batch_shape)}"
        ) from None
    if num_classes is not None and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{name} must lie in [0, {num_classes}) for {num_classes} classes, got values in [{lo}, {hi}]"
            )
    return labels.expand(batch_shape).long()


def _check_binary(targets: object, shape: torch.Size, name: str) -> Tensor:
    targets = _check_labels(targets, shape, 2, name)
    positives = targets.sum(-1)
    n = shape[-1]
    if bool((positives == 0).any()) or bool((positives == n).any()):
        raise ValueError(
            f"{name} must hold both classes (0 and 1) in every row; a ranking metric is undefined otherwise"
        )
    return targets


def _check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(
            f"{name_a} of shape {tuple(a.shape)} and {name_b} of shape {tuple(b.shape)} do not broadcast"
        ) from None
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{name_a} and {name_b} need the same number of examples on the last axis, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )


def _check_positive(x: Tensor, name: str, *, allow_zero: bool = False) -> None:
    bad = (x < 0) if allow_zero else (x <= 0)
    if bool(bad.any()):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got min {float(x.min()):.4g}")


def _check_level(level: float, name: str = "level") -> float:
    level = float(level)
    if not 0 < level < 1:
        raise ValueError(f"{name} must lie in (0, 1), got {level}")
    return level


def _check_bins(num_bins: int) -> int:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    return num_bins


def _regression_inputs(mean: object, y: object, scale: object | None = None, scale_name: str = "std"):
    mean = _floating(mean, "mean", min_dim=1)
    y = _floating(y, "y", min_dim=1)
    _check_same_shape(mean, y, "mean", "y")
    if scale is None:
        return mean, y, None
    scale = _floating(scale, scale_name, min_dim=0)
    if scale.dim():
        _check_same_shape(mean, scale, "mean", scale_name)
    _check_positive(scale, scale_name)
    return mean, y, scale


# --- classification -----------------------------------------------------------------------------


def accuracy(probs: Tensor, labels: Tensor) -> Tensor:
    """Fraction of examples whose most probable class is the label.

    Parameters
    ----------
    probs : Tensor
        ``(*B, N, C)`` predictive probabilities.
    labels : Tensor
        ``(N,)`` or ``(*B, N)`` integer labels in ``[0, C)``.

    Returns
    -------
    Tensor
        ``(*B)`` accuracies in ``[0, 1]``.

    Examples
    --------
    >>> accuracy(torch.tensor([[0.7, 0.3], [0.4, 0.6]]), torch.tensor([0, 0]))
    tensor(0.5000)
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs.shape[:-1], probs.shape[-1])
    return (probs.argmax(-1) == labels).to(probs.dtype).mean(-1)


def nll(probs: Tensor, labels: Tensor, *, eps: float | None = None) -> Tensor:
    """Mean negative log predictive probability of the labels (nats), ``-mean log p(y_n)``.

    Parameters
    ----------
    probs, labels
        As in :func:`accuracy`.
    eps : float, optional
        Floor of the probabilities before the log; default the dtype's
        smallest normal number (as scikit-learn's ``log_loss``), so a zero
        probability of the label costs about 87 nats in float32 instead of inf.

    Returns
    -------
    Tensor
        ``(*B)``.

    Examples
    --------
    >>> nll(torch.tensor([[0.5, 0.5], [0.25, 0.75]]), torch.tensor([0, 1]))
    tensor(0.4904)
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs.shape[:-1], probs.shape[-1])
    floor = torch.finfo(probs.dtype).tiny if eps is None else float(eps)
    p = probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return -p.clamp_min(floor).log().mean(-1)


def brier(probs: Tensor, labels: Tensor) -> Tensor:
    """Multi-class Brier score ``mean_n sum_c (p_nc - 1[y_n = c])^2``, in ``[0, 2]``.

    For two classes this is twice scikit-learn's binary ``brier_score_loss``
    (which scores the positive class only); it equals ``brier_score_loss(...,
    scale_by_half=False)``.

    Examples
    --------
    >>> brier(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([0, 1]))
    tensor(0.2500)
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs.shape[:-1], probs.shape[-1])
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).to(probs.dtype)
    return (probs - onehot).square().sum(-1).mean(-1)


class Reliability(NamedTuple):
    """The per-bin data of a reliability diagram (confidence = the top class's probability).

    Attributes
    ----------
    edges : Tensor
        ``(num_bins + 1,)`` bin edges (equal width on ``[0, 1]``).
    confidence : Tensor
        ``(*B, num_bins)`` mean confidence in each bin (0 where a bin is empty).
    accuracy : Tensor
        ``(*B, num_bins)`` accuracy in each bin (0 where a bin is empty).
    counts : Tensor
        ``(*B, num_bins)`` examples in each bin.
    ece : Tensor
        ``(*B)`` expected calibration error, ``sum_b (n_b / N) |acc_b - conf_b|``.
    """

    edges: Tensor
    confidence: Tensor
    accuracy: Tensor
    counts: Tensor
    ece: Tensor


def _binned(conf: Tensor, correct: Tensor, bins: Tensor, num_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin counts, summed confidence and summed correctness; ``bins`` holds each example's bin."""
    batch = conf.shape[:-1]
    flat_conf = conf.reshape(-1, conf.shape[-1])
    flat_bins = bins.reshape(-1, conf.shape[-1])
    flat_correct = correct.reshape(-1, conf.shape[-1])
    rows = flat_conf.shape[0]
    index = flat_bins + num_bins * torch.arange(rows, device=conf.device).unsqueeze(-1)
    size = rows * num_bins
    counts = torch.zeros(size, dtype=conf.dtype, device=conf.device).index_add_(
        0, index.reshape(-1), torch.ones_like(flat_conf).reshape(-1)
    )
    conf_sum = torch.zeros(size, dtype=conf.dtype, device=conf.device).index_add_(
        0, index.reshape(-1), flat_conf.reshape(-1)
    )
    corr_sum = torch.zeros(size, dtype=conf.dtype, device=conf.device).index_add_(
        0, index.reshape(-1), flat_correct.reshape(-1)
    )
    shape = (*batch, num_bins)
    return counts.reshape(shape), conf_sum.reshape(shape), corr_sum.reshape(shape)


def _calibration_gap(counts: Tensor, conf_sum: Tensor, corr_sum: Tensor, n: int) -> Tensor:
    return (conf_sum - corr_sum).abs().sum(-1) / n


def reliability(probs: Tensor, labels: Tensor, *, num_bins: int = 15) -> Reliability:
    """Reliability-diagram data and the ECE over ``num_bins`` equal-width confidence bins (Guo et al. 2017).

    Bins are right-closed, ``(b/B, (b+1)/B]``, with a confidence of exactly 0
    in the first bin, as in Guo et al.'s reference code.

    Parameters
    ----------
    probs, labels
        As in :func:`accuracy`.
    num_bins : int, default 15

    Returns
    -------
    Reliability

    Examples
    --------
    >>> r = reliability(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([0, 0]), num_bins=5)
    >>> r.counts, r.ece
    (tensor([0., 0., 0., 1., 1.]), tensor(0.4000))
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs.shape[:-1], probs.shape[-1])
    num_bins = _check_bins(num_bins)
    conf, pred = probs.max(-1)
    correct = (pred == labels).to(probs.dtype)
    edges = torch.linspace(0, 1, num_bins + 1, dtype=probs.dtype, device=probs.device)
    bins = (torch.bucketize(conf, edges[1:-1].contiguous(), right=False)).clamp_(0, num_bins - 1)
    counts, conf_sum, corr_sum = _binned(conf, correct, bins, num_bins)
    safe = counts.clamp_min(1)
    return Reliability(
        edges=edges,
        confidence=conf_sum / safe,
        accuracy=corr_sum / safe,
        counts=counts,
        ece=_calibration_gap(counts, conf_sum, corr_sum, conf.shape[-1]),
    )


def ece(probs: Tensor, labels: Tensor, *, num_bins: int = 15) -> Tensor:
    """Expected calibration error with ``num_bins`` equal-width bins: ``reliability(...).ece``.

    Examples
    --------
    >>> ece(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([0, 0]), num_bins=5)
    tensor(0.4000)
    """
    return reliability(probs, labels, num_bins=num_bins).ece


def adaptive_ece(probs: Tensor, labels: Tensor, *, num_bins: int = 15) -> Tensor:
    """ECE over ``num_bins`` equal-mass bins of the sorted confidences (Nixon et al. 2019).

    With ``N`` examples, the ``k``-th smallest confidence (from 0) goes to bin
    ``floor(k * num_bins / N)``, so bins hold ``N / num_bins`` examples each
    (up to one); with fewer examples than bins, every example is its own bin.

    Examples
    --------
    >>> adaptive_ece(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([0, 0]), num_bins=2)
    tensor(0.4000)
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs.shape[:-1], probs.shape[-1])
    num_bins = _check_bins(num_bins)
    conf, pred = probs.max(-1)
    correct = (pred == labels).to(probs.dtype)
    n = conf.shape[-1]
    order = conf.argsort(dim=-1, stable=True)
    conf_sorted = conf.gather(-1, order)
    correct_sorted = correct.gather(-1, order)
    nb = min(num_bins, n)
    bins = (torch.arange(n, device=conf.device) * nb // n).expand_as(conf_sorted)
    counts, conf_sum, corr_sum = _binned(conf_sorted, correct_sorted, bins, nb)
    return _calibration_gap(counts, conf_sum, corr_sum, n)


# --- ranking an uncertainty score ---------------------------------------------------------------


def _tie_groups_desc(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Sort descending; for each sorted position, the last position of its group of tied scores."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    s = scores.gather(-1, order)
    ascending = (-s).contiguous()
    last = torch.searchsorted(ascending, ascending, right=True) - 1
    return order, last


def auroc(scores: Tensor, targets: Tensor) -> Tensor:
    """Area under the ROC curve of ``scores`` ranking positive ``targets`` above negative ones.

    The Mann-Whitney statistic with mid-ranks: the probability that a random
    positive scores higher than a random negative, ties counting one half
    (equal to scikit-learn's ``roc_auc_score``).

    Parameters
    ----------
    scores : Tensor
        ``(*B, N)`` real scores, higher = more likely positive.
    targets : Tensor
        ``(N,)`` or ``(*B, N)`` 0/1 (or bool) labels, both classes present.

    Returns
    -------
    Tensor
        ``(*B)`` in ``[0, 1]``.

    Examples
    --------
    >>> auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    tensor(0.7500)
    """
    scores = _floating(scores, "scores", min_dim=1)
    targets = _check_binary(targets, scores.shape, "targets").to(scores.dtype)
    s = scores.sort(-1).values.contiguous()
    # 1-based mid-rank of every score among all scores: (#less + #less-or-equal + 1) / 2
    ranks = (
        torch.searchsorted(s, scores.contiguous(), right=False)
        + torch.searchsorted(s, scores.contiguous(), right=True)
        + 1
    ) / 2
    pos = targets.sum(-1)
    neg = scores.shape[-1] - pos
    rank_sum = (ranks.to(scores.dtype) * targets).sum(-1)
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Average precision (area under the precision-recall curve, step-wise), as scikit-learn's.

    ``AP = sum_t (R_t - R_{t-1}) P_t`` over distinct score thresholds ``t``
    in decreasing order, with ``P_t``, ``R_t`` the precision and recall of
    calling every example with score ``>= t`` positive.

    Parameters
    ----------
    scores, targets
        As in :func:`auroc`.

    Returns
    -------
    Tensor
        ``(*B)`` in ``[0, 1]``.

    Examples
    --------
    >>> average_precision(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    tensor(0.8333)
    """
    scores = _floating(scores, "scores", min_dim=1)
    targets = _check_binary(targets, scores.shape, "targets").to(scores.dtype)
    order, last = _tie_groups_desc(scores)
    t = targets.gather(-1, order)
    tp = t.cumsum(-1).gather(-1, last)  # true positives at the threshold of each position's group
    precision = tp / (last + 1).to(scores.dtype)
    return (t * precision).sum(-1) / t.sum(-1)


def _ood_pair(score_in: Tensor, score_out: Tensor) -> tuple[Tensor, Tensor]:
    score_in = _floating(score_in, "score_in", min_dim=1)
    score_out = _floating(score_out, "score_out", min_dim=1)
    if score_in.shape[:-1] != score_out.shape[:-1]:
        raise ValueError(
            f"score_in {tuple(score_in.shape)} and score_out {tuple(score_out.shape)} need the same batch axes "
            "(all but the last)"
        )
    scores = torch.cat([score_in, score_out], -1)
    targets = torch.cat(
        [
            torch.zeros(score_in.shape[-1], dtype=torch.long, device=scores.device),
            torch.ones(score_out.shape[-1], dtype=torch.long, device=scores.device),
        ]
    )
    return scores, targets


def ood_auroc(score_in: Tensor, score_out: Tensor) -> Tensor:
    """AUROC of telling out-of-distribution inputs (positive) from in-distribution ones by an uncertainty score.

    Parameters
    ----------
    score_in, score_out : Tensor
        ``(*B, N_in)`` and ``(*B, N_out)`` scores (predictive entropy, mutual
        information, 1 - max probability, ...), higher = more uncertain.

    Examples
    --------
    >>> ood_auroc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.25, 0.9]))
    tensor(0.8333)
    """
    return auroc(*_ood_pair(score_in, score_out))


def ood_aupr(score_in: Tensor, score_out: Tensor) -> Tensor:
    """Average precision of detecting out-of-distribution inputs (positive) by an uncertainty score.

    Examples
    --------
    >>> ood_aupr(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.25, 0.9]))
    tensor(0.8333)
    """
    return average_precision(*_ood_pair(score_in, score_out))


class RiskCoverage(NamedTuple):
    """A risk-coverage curve: keep the most confident fraction ``coverage``, and err at rate ``risk`` on it.

    Attributes
    ----------
    coverage, risk : Tensor
        ``(*B, N)`` one point per example in decreasing order of confidence;
        tied confidences share the point of their whole group (every member
        reports the coverage and risk of keeping all of them).
    aurc : Tensor
        ``(*B)`` area under the curve, ``mean_n risk_n`` (lower is better).
    """

    coverage: Tensor
    risk: Tensor
    aurc: Tensor


def risk_coverage(confidence: Tensor, errors: Tensor) -> RiskCoverage:
    """The risk-coverage curve of selective prediction and its area (Geifman & El-Yaniv 2017).

    Parameters
    ----------
    confidence : Tensor
        ``(*B, N)`` confidence (higher = keep first), e.g. the top probability
        or minus the predictive entropy.
    errors : Tensor
        ``(N,)`` or ``(*B, N)`` per-example loss: 0/1 mistakes (bool or
        integer) or any real non-negative loss (squared error, NLL).

    Returns
    -------
    RiskCoverage

    Examples
    --------
    >>> rc = risk_coverage(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0, 1, 0, 1]))
    >>> rc.risk, rc.aurc
    (tensor([0.0000, 0.5000, 0.3333, 0.5000]), tensor(0.3333))
    """
    confidence = _floating(confidence, "confidence", min_dim=1)
    if not isinstance(errors, Tensor):
        raise TypeError(f"errors must be a torch.Tensor, got {type(errors).__name__}")
    errors = errors.to(confidence.dtype) if not errors.is_floating_point() else errors
    errors = _floating(errors, "errors", min_dim=1)
    _check_same_shape(confidence, errors, "confidence", "errors")
    _check_positive(errors, "errors", allow_zero=True)
    shape = torch.broadcast_shapes(confidence.shape, errors.shape)
    confidence, errors = confidence.expand(shape), errors.expand(shape)
    order, last = _tie_groups_desc(confidence)
    e = errors.gather(-1, order)
    kept = (last + 1).to(confidence.dtype)
    risk = e.cumsum(-1).gather(-1, last) / kept
    n = confidence.shape[-1]
    return RiskCoverage(coverage=kept / n, risk=risk, aurc=risk.mean(-1))


def aurc(confidence: Tensor, errors: Tensor) -> Tensor:
    """Area under the risk-coverage curve, ``risk_coverage(confidence, errors).aurc`` (lower is better).

    Examples
    --------
    >>> aurc(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([False, True, False, True]))
    tensor(0.3333)
    """
    return risk_coverage(confidence, errors).aurc


# --- regression ---------------------------------------------------------------------------------


def rmse(mean: Tensor, y: Tensor) -> Tensor:
    """Root mean squared error over the last (example) axis.

    Examples
    --------
    >>> rmse(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
    tensor(1.4142)
    """
    mean, y, _ = _regression_inputs(mean, y)
    return (mean - y).square().mean(-1).sqrt()


def gaussian_nll(mean: Tensor, var: Tensor, y: Tensor) -> Tensor:
    """Mean negative log density of ``y`` under ``N(mean, var)``: ``mean_n [log(2 pi var)/2 + (y - mean)^2 / (2 var)]``.

    Parameters
    ----------
    mean : Tensor
        ``(*B, N)`` predictive means.
    var : Tensor
        ``(*B, N)`` (or broadcastable, e.g. a scalar) predictive variances, > 0.
    y : Tensor
        ``(N,)`` or ``(*B, N)`` targets.

    Examples
    --------
    >>> gaussian_nll(torch.zeros(2), torch.ones(2), torch.tensor([0.0, 2.0]))
    tensor(1.9189)
    """
    mean, y, var = _regression_inputs(mean, y, var, "var")
    return (0.5 * var.log() + _HALF_LOG_2PI + 0.5 * (y - mean).square() / var).mean(-1)


def gaussian_mixture_nll(means: Tensor, var: Tensor, y: Tensor, *, weights: Tensor | None = None) -> Tensor:
    """Mean negative log density of ``y`` under a mixture of Gaussians over the leading axis of ``means``.

    ``-mean_n log sum_s w_s N(y_n; means_sn, var_sn)``, computed with
    ``logsumexp``; the Monte-Carlo predictive of MC dropout, SWAG, VI or an
    ensemble of heteroscedastic networks (``S`` equal weights by default).

    Parameters
    ----------
    means : Tensor
        ``(S, *B, N)`` component means.
    var : Tensor
        Component variances broadcastable to ``means`` (``(S, *B, N)``, or a
        scalar for a shared noise variance), > 0.
    y : Tensor
        ``(N,)`` or ``(*B, N)`` targets.
    weights : Tensor, optional
        ``(S,)`` non-negative mixture weights summing to one.

    Returns
    -------
    Tensor
        ``(*B)``.

    Examples
    --------
    >>> m = torch.tensor([[0.0, 0.0], [2.0, 2.0]])  # two components, two examples
    >>> gaussian_mixture_nll(m, torch.tensor(1.0), torch.tensor([1.0, 1.0]))
    tensor(1.4189)
    """
    means = _floating(means, "means", min_dim=2)
    y = _floating(y, "y", min_dim=1)
    var = _floating(var, "var", min_dim=0)
    _check_same_shape(means[0], y, "means[0]", "y")
    try:
        torch.broadcast_shapes(var.shape, means.shape)
    except RuntimeError:
        raise ValueError(
            f"var of shape {tuple(var.shape)} does not broadcast against means {tuple(means.shape)}"
        ) from None
    _check_positive(var, "var")
    num = means.shape[0]
    if weights is None:
        log_w = torch.full((num,), -math.log(num), dtype=means.dtype, device=means.device)
    else:
        weights = _floating(weights, "weights", min_dim=1)
        if weights.shape != (num,):
            raise ValueError(
                f"weights must have shape ({num},) (one per component), got {tuple(weights.shape)}"
            )
        _check_positive(weights, "weights", allow_zero=True)
        if abs(float(weights.sum()) - 1) > _SUM_TOL:
            raise ValueError(f"weights must sum to one, got {float(weights.sum()):.6g}")
        log_w = weights.log()
    log_w = log_w.reshape(num, *([1] * (means.dim() - 1)))
    log_dens = -0.5 * var.log() - _HALF_LOG_2PI - 0.5 * (y - means).square() / var
    return -torch.logsumexp(log_w + log_dens, 0).mean(-1)


def _normal_cdf(z: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-z / math.sqrt(2))


def crps_gaussian(mean: Tensor, std: Tensor, y: Tensor) -> Tensor:
    """Mean continuous ranked probability score of ``N(mean, std^2)`` at ``y`` (closed form; lower is better).

    ``CRPS = std [z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi)]`` with
    ``z = (y - mean) / std`` (Gneiting & Raftery 2007, eq. 21), the integral
    ``int (F(t) - 1[t >= y])^2 dt``. It has the units of ``y`` and reduces to
    the absolute error as ``std -> 0``. (deepuq's formula misses the factor 2 on
    ``phi`` and the ``1/sqrt(pi)`` term.)

    Examples
    --------
    >>> crps_gaussian(torch.zeros(1), torch.ones(1), torch.zeros(1))  # (sqrt(2) - 1) / sqrt(pi)
    tensor(0.2337)
    """
    mean, y, std = _regression_inputs(mean, y, std, "std")
    z = (y - mean) / std
    pdf = torch.exp(-0.5 * z.square()) / math.sqrt(2 * math.pi)
    crps = std * (z * (2 * _normal_cdf(z) - 1) + 2 * pdf - 1 / math.sqrt(math.pi))
    return crps.mean(-1)


def _z_of(level: float) -> float:
    """The standard normal quantile ``Phi^-1((1 + level) / 2)`` of a central interval."""
    return float(torch.special.ndtri(torch.tensor((1 + level) / 2, dtype=torch.float64)))


def picp(mean: Tensor, std: Tensor, y: Tensor, *, level: float = 0.95) -> Tensor:
    """Prediction-interval coverage probability: the fraction of ``y`` inside the central ``level`` interval of ``N(mean, std^2)``.

    A calibrated predictive covers ``level`` of the targets.

    Examples
    --------
    >>> picp(torch.zeros(4), torch.ones(4), torch.tensor([0.0, 1.0, -1.5, 3.0]))
    tensor(0.7500)
    """
    mean, y, std = _regression_inputs(mean, y, std, "std")
    z = _z_of(_check_level(level))
    return ((y - mean).abs() <= z * std).to(mean.dtype).mean(-1)


def interval_width(std: Tensor, *, level: float = 0.95) -> Tensor:
    """Mean width ``2 z std`` of the central ``level`` intervals of ``N(mean, std^2)`` (units of ``y``).

    Examples
    --------
    >>> interval_width(torch.ones(3))
    tensor(3.9199)
    """
    std = _floating(std, "std", min_dim=1)
    _check_positive(std, "std")
    return 2 * _z_of(_check_level(level)) * std.mean(-1)


def regression_calibration_error(mean: Tensor, std: Tensor, y: Tensor, *, num_levels: int = 20) -> Tensor:
    """Calibration error of Gaussian predictive quantiles (Kuleshov et al. 2018), in ``[0, 1]``.

    For levels ``p_j = j / (num_levels + 1)``, ``j = 1..num_levels``, the
    observed frequency ``q_j`` of ``F_n(y_n) <= p_j`` (``F_n`` the predictive
    CDF) should equal ``p_j``; the error is ``sqrt(mean_j (q_j - p_j)^2)``,
    the root mean squared miscalibration of the quantiles (0 when calibrated,
    about 0.5 for a predictive whose quantiles are all wrong).

    Examples
    --------
    >>> y = torch.special.ndtri(torch.linspace(0.0005, 0.9995, 1000))  # the quantiles of N(0, 1)
    >>> regression_calibration_error(torch.zeros(1000), torch.ones(1000), y) < 0.01
    tensor(True)
    >>> regression_calibration_error(torch.zeros(1000), torch.full((1000,), 0.2), y) > 0.2  # overconfident
    tensor(True)
    """
    mean, y, std = _regression_inputs(mean, y, std, "std")
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
        raise ValueError(f"num_levels must be a positive int, got {num_levels!r}")
    cdf = _normal_cdf((y - mean) / std)  # (*B, N)
    levels = torch.arange(1, num_levels + 1, dtype=mean.dtype, device=mean.device) / (num_levels + 1)
    observed = (cdf.unsqueeze(-1) <= levels).to(mean.dtype).mean(-2)  # (*B, L)
    return (observed - levels).square().mean(-1).sqrt()
