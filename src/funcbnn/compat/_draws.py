"""Batched predictions for the front ends' object-style models, on the functional core.

The seed libraries predict with a Python loop of stochastic forwards. Here the
weight draws of every sample are made at once (:func:`funcbnn.tree.diag_normal`)
and the model runs as one batched call (:func:`funcbnn.sample_outputs`): the
module is evaluated as a pure function of a parameter tree in which each
variational mean holds a weight draw, with the layers told to use their mean
instead of sampling (:func:`means_as_draws`).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from .. import mc_dropout
from ..families.dropout import dropout as _dropout_family
from ..model import functionalize
from ..predict import sample_outputs
from ..tree import diag_normal

__all__ = ["means_as_draws", "drawing_disabled", "outputs_at_draws", "dropout_outputs"]


class _Mode(threading.local):
    def __init__(self) -> None:
        self.means_are_draws = False


_MODE = _Mode()


@contextlib.contextmanager
def means_as_draws() -> Iterator[None]:
    """Within the block, the front ends' Bayesian layers use their (substituted) means instead of sampling."""
    previous = _MODE.means_are_draws
    _MODE.means_are_draws = True
    try:
        yield
    finally:
        _MODE.means_are_draws = previous


def drawing_disabled() -> bool:
    """Whether a Bayesian layer must use its mean parameter as the weight (inside :func:`means_as_draws`)."""
    return _MODE.means_are_draws


class _Call(nn.Module):
    """``forward(x) = call(inner, x)``: a module whose forward takes only the input, for :func:`functionalize`."""

    def __init__(self, inner: nn.Module, call: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.inner = inner
        self.call = call

    def forward(self, x: Any) -> Any:
        return self.call(self.inner, x)


def outputs_at_draws(
    model: nn.Module,
    stds: Mapping[str, Tensor],
    x: Any,
    num_samples: int,
    *,
    call: Callable[[nn.Module, Any], Any] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Outputs ``(S, N, ...)`` of ``model`` at ``num_samples`` draws of its diagonal Gaussian weights.

    Differentiable with respect to the model's parameters when grad mode is on
    (reparameterised draws), so the same call serves a Monte-Carlo ELBO.

    Parameters
    ----------
    model : nn.Module
        Built from layers that honour :func:`drawing_disabled`.
    stds : mapping
        ``{name of a mean parameter: its posterior std}`` (names as in
        ``model.named_parameters()``); every other parameter stays at its value.
    x : Tensor
    num_samples : int
    call : callable, optional
        How to run the model, ``call(model, x)`` (default ``model(x)``).
    generator : torch.Generator, optional
    """
    apply_fn = functionalize(_Call(model, call or _plain_call)).apply_fn
    live = {"inner." + name: p for name, p in model.named_parameters() if p.requires_grad}
    means = {name: live["inner." + name] for name in stds}
    draws = diag_normal(means, dict(stds), num_samples, generator=generator)
    samples = {
        key: draws[key[6:]] if key[6:] in draws else value.expand(num_samples, *value.shape)
        for key, value in live.items()
    }
    with means_as_draws():
        return sample_outputs(apply_fn, samples, x)


def _plain_call(model: nn.Module, x: Any) -> Any:
    return model(x)


def dropout_outputs(model: nn.Module, x: Any, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Outputs ``(S, N, ...)`` of ``model`` under ``num_samples`` seeded dropout masks (:mod:`funcbnn.mc_dropout`).

    Other layers run in eval mode (BatchNorm uses its running statistics). A
    model without dropout layers gives ``num_samples`` copies of its output.
    """
    if not any(isinstance(m, mc_dropout.DROPOUT_LAYERS) for m in model.modules()):
        apply_fn, params, _ = functionalize(model)
        out = apply_fn(params, x)
        return out.expand(num_samples, *out.shape)
    apply_fn, params, _ = mc_dropout.functionalize(model)
    post = _dropout_family()
    draws = post.sample(post.init(params), num_samples, generator=generator)
    return sample_outputs(apply_fn, draws, x)
