"""KL pieces shared by every family: reduction checks and the Monte-Carlo estimate."""

from __future__ import annotations

import torch
from torch import Tensor

from ..tree import Tree, unstack


def check_reduction(reduction: str) -> None:
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def prior_log_prob_batched(prior, draws: Tree) -> Tensor:
    """``prior.log_prob`` of each draw along the leading axis, as a 1-D tensor.

    One vmapped call where the prior's code allows it, else a loop.
    """
    try:
        return torch.func.vmap(prior.log_prob)(draws)
    except Exception:  # user priors may use ops vmap cannot batch; a loop gives the same numbers
        return torch.stack([prior.log_prob(d) for d in unstack(draws)])


def monte_carlo_kl(log_q: Tensor, prior, draws: Tree) -> Tensor:
    """``mean_s [log q(w_s) - log p(w_s)]`` for draws ``w_s ~ q``."""
    return (log_q - prior_log_prob_batched(prior, draws)).mean()
