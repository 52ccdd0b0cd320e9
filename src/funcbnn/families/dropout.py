"""Dropout masks as a posterior family (Gal & Ghahramani 2016), drawn from the caller's generator.

The state is the trained parameter tree; a draw is ``{"params": params,
"seed": int64}``, one integer seed per sample from which
:class:`funcbnn.mc_dropout.DropoutModel` derives every dropout mask (so the
same generator gives the same predictions whatever the chunk size or path).
The rates are the model's own. Draws are not weight trees, and Bernoulli masks
have no density over the weights: the family declares no capability, and
``kl`` raises (Gal & Ghahramani's KL term reduces to L2 weight decay on the
parameters, which is how MC-dropout models are trained).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import optree
import torch
from torch import Tensor

from .._validation import positive_int
from ..mc_dropout import draw_seeds
from ..checks import check_finite, check_generator
from ..tree import Tree

__all__ = ["DropoutState", "Dropout", "dropout"]


class DropoutState(NamedTuple):
    """The parameters the masks are applied to."""

    params: Tree


def _check(state: DropoutState) -> None:
    if not isinstance(state, DropoutState):
        raise TypeError(f"state must be a DropoutState, got {type(state).__name__}")


def sample(state: DropoutState, num_samples: int, *, generator: torch.Generator | None = None) -> dict[str, Any]:
    """``{"params": params with a leading axis (a broadcast view), "seed": (num_samples,) int64}``."""
    _check(state)
    num_samples = positive_int(num_samples, "num_samples")
    check_generator(generator)
    ref = optree.tree_leaves(state.params)[0]
    return {
        "params": optree.tree_map(lambda t: t.expand(num_samples, *t.shape), state.params),
        "seed": draw_seeds(num_samples, generator, ref.device),
    }


def kl(state: DropoutState, prior: Any, **kwargs: Any) -> Tensor:
    """Undefined: raises ``ValueError`` (masked weights have no density; use weight decay as the prior)."""
    _check(state)
    raise ValueError(
        "KL(dropout || prior) is undefined: Bernoulli-masked weights have no density. MC-dropout models are "
        "trained with their ordinary loss plus weight decay (Gal & Ghahramani 2016)"
    )


class Dropout(NamedTuple):
    """The dropout-mask family; see the module docstring."""

    init: Callable[..., DropoutState]
    sample: Callable[..., dict[str, Any]] = sample
    kl: Callable[..., Tensor] = kl


def dropout() -> Dropout:
    """Build the dropout-mask family.

    Examples
    --------
    >>> post = dropout()
    >>> draws = post.sample(post.init({"w": torch.zeros(2)}), 4, generator=torch.Generator().manual_seed(0))
    >>> draws["params"]["w"].shape, draws["seed"].shape
    (torch.Size([4, 2]), torch.Size([4]))
    """

    def init(params: Tree, *, generator: torch.Generator | None = None) -> DropoutState:
        leaves = optree.tree_leaves(params)
        if not leaves or not all(isinstance(t, Tensor) and t.is_floating_point() for t in leaves):
            raise TypeError("params must be a non-empty tree of floating-point tensors")
        check_finite(params, "params", context="post.init needs finite parameters to centre the posterior on")
        return DropoutState(optree.tree_map(lambda t: t.detach().clone(), params))

    return Dropout(init=init)
