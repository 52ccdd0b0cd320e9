"""Predictive summaries of Monte-Carlo outputs: the numbers every likelihood reports.

Each :class:`~funcbnn.likelihoods.Likelihood` turns its per-sample outputs into
a :class:`PredictiveSummary` with the two functions here: one for class
probabilities, one for a mean with a noise variance.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["PredictiveSummary", "class_summary", "gaussian_summary"]


class PredictiveSummary(NamedTuple):
    """Summary of Monte-Carlo predictions; fields a likelihood does not define are ``None``.

    For every likelihood ``total_var == aleatoric_var + epistemic_var`` (law of
    total variance, with population variances over samples).

    Attributes
    ----------
    mean : Tensor
        Predictive mean: mean probabilities (classification, binary) or mean
        prediction (regression).
    epistemic_var, aleatoric_var, total_var : Tensor
        Variance split. For classification these are per class, of the one-hot
        label: epistemic = Var_s[p_s], aleatoric = E_s[p_s (1 - p_s)],
        total = p (1 - p).
    probs, probs_var : Tensor or None
        Mean probabilities and their variance over samples (classification).
    entropy : Tensor or None
        Predictive entropy ``H[E_s p_s]`` in nats (total uncertainty).
    expected_entropy : Tensor or None
        ``E_s H[p_s]``, the aleatoric part.
    mutual_info : Tensor or None
        ``entropy - expected_entropy`` (epistemic part, the BALD score), >= 0.
    num_samples : int
    """

    mean: Tensor
    epistemic_var: Tensor
    aleatoric_var: Tensor
    total_var: Tensor
    probs: Tensor | None = None
    probs_var: Tensor | None = None
    entropy: Tensor | None = None
    expected_entropy: Tensor | None = None
    mutual_info: Tensor | None = None
    num_samples: int = 0


def class_summary(log_probs: Tensor) -> PredictiveSummary:
    """Summary from per-sample class log-probabilities ``(S, ..., C)``."""
    num = log_probs.shape[0]
    probs_s = log_probs.exp()
    mean = probs_s.mean(0)
    log_mean = torch.logsumexp(log_probs, 0) - math.log(num)
    # xlogy-style products: 0 * log 0 is 0, never NaN, for saturated probabilities.
    entropy = -(mean * log_mean.clamp_min(torch.finfo(log_mean.dtype).min)).sum(-1)
    expected_entropy = -(probs_s * log_probs.clamp_min(torch.finfo(log_probs.dtype).min)).sum(-1).mean(0)
    probs_var = probs_s.var(0, correction=0)
    aleatoric = (probs_s * (1 - probs_s)).mean(0)
    return PredictiveSummary(
        mean=mean,
        epistemic_var=probs_var,
        aleatoric_var=aleatoric,
        total_var=aleatoric + probs_var,
        probs=mean,
        probs_var=probs_var,
        entropy=entropy,
        expected_entropy=expected_entropy,
        mutual_info=(entropy - expected_entropy).clamp_min(0.0),
        num_samples=num,
    )


def gaussian_summary(mean_s: Tensor, aleatoric: Tensor) -> PredictiveSummary:
    """Summary from per-sample means ``(S, ...)`` and the aleatoric variance (shaped like one sample)."""
    epistemic = mean_s.var(0, correction=0)
    return PredictiveSummary(
        mean=mean_s.mean(0),
        epistemic_var=epistemic,
        aleatoric_var=aleatoric,
        total_var=aleatoric + epistemic,
        num_samples=mean_s.shape[0],
    )
