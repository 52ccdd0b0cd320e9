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
import weakref
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from .. import mc_dropout
from ..families.dropout import dropout as _dropout_family
# Private in model.py: the one unwrapping rule functionalize applies, reused so that the front ends
# name parameters exactly as the functional forms they build do.
from ..model import _unwrap_compiled, functionalize
from ..predict import sample_outputs
from ..swag import with_buffers
from ..tree import diag_normal

__all__ = [
    "functional_form_with_buffers",
    "means_as_draws",
    "drawing_disabled",
    "functional_form",
    "plain_call",
    "outputs_at_draws",
    "dropout_outputs",
    "unwrapped",
]


def unwrapped(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """The module :func:`funcbnn.functionalize` runs, and ``{its parameter name: the name in model}``.

    ``torch.compile``, ``DataParallel`` and ``DistributedDataParallel`` wrap a
    module and prefix its parameter names (``_orig_mod.``, ``module.``);
    :func:`funcbnn.functionalize` evaluates the module inside, under its own
    names. The map pairs the two by identity (an unwrapped model maps each name
    to itself), so statistics kept under the user's names reach the right
    parameters of the functional form.
    """
    inner = _unwrap_compiled(model)
    outer = {id(p): name for name, p in model.named_parameters()}
    return inner, {name: outer[id(p)] for name, p in inner.named_parameters()}


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


def plain_call(model: nn.Module, x: Any) -> Any:
    """``model(x)``."""
    return model(x)


# One functional form per (model, way of calling it), so that the batched engine's path decision,
# measured on the first call, is reused rather than re-measured on every prediction.
_FUNCTIONAL: "weakref.WeakKeyDictionary[nn.Module, dict[Any, tuple[Any, str]]]" = weakref.WeakKeyDictionary()


def _fits(apply_fn: Any, prefix: str, model: nn.Module) -> bool:
    base = apply_fn.base if isinstance(apply_fn, mc_dropout.DropoutModel) else apply_fn
    template = base.params_template
    live = [(prefix + n, p) for n, p in model.named_parameters() if p.requires_grad]
    if len(live) != len(template) or any(n not in template or template[n].shape != p.shape for n, p in live):
        return False
    if isinstance(apply_fn, mc_dropout.DropoutModel):  # its masks use the rates read when it was built
        rates = {n: float(m.p) for n, m in model.named_modules() if isinstance(m, mc_dropout.DROPOUT_LAYERS)}
        return rates == apply_fn.rates
    return True


def functional_form(
    model: nn.Module, call: Callable[[nn.Module, Any], Any] | None = None, *, dropout: bool = False
):
    """``apply_fn(params, x)`` running ``call(model, x)`` in eval mode, cached per model, with its current buffers.

    Parameter names are ``model.named_parameters()``'s, prefixed by ``"inner."``
    when ``call`` is given. ``dropout=True`` gives :func:`funcbnn.mc_dropout.functionalize`'s
    seeded-mask model. Frozen parameters and buffers are refreshed from ``model``
    on every call (e.g. BatchNorm statistics that changed since).
    """
    model = _unwrap_compiled(model)  # names below are those of the module functionalize runs
    key = ("dropout" if dropout else "plain", call)
    per_model = _FUNCTIONAL.setdefault(model, {})
    cached = per_model.get(key)
    if cached is None or not _fits(cached[0], cached[1], model):
        target, prefix = (model, "") if call is None else (_Call(model, call), "inner.")
        build = mc_dropout.functionalize if dropout else functionalize
        cached = per_model[key] = (build(target).apply_fn, prefix)
    apply_fn, prefix = cached
    base = apply_fn.base if dropout else apply_fn
    base.frozen = {prefix + n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    base.buffers = {prefix + n: b for n, b in model.named_buffers()}
    return apply_fn


def functional_form_with_buffers(model: nn.Module) -> Callable[[dict[str, Any], Any], Any]:
    """``f({"params": p, "buffers": b}, x)`` over :func:`functional_form`, for per-sample buffers; cached too."""
    model = _unwrap_compiled(model)
    apply_fn = functional_form(model)
    per_model = _FUNCTIONAL[model]
    cached = per_model.get("with_buffers")
    if cached is None or cached[1] is not apply_fn:
        cached = per_model["with_buffers"] = (with_buffers(apply_fn), apply_fn)
    return cached[0]


def outputs_at_draws(
    model: nn.Module,
    stds: Mapping[str, Tensor],
    x: Any,
    num_samples: int,
    *,
    call: Callable[[nn.Module, Any], Any] = plain_call,
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
    call : callable
        How to run the model, ``call(model, x)``; a module-level function, so
        that the functional form is reused across calls.
    generator : torch.Generator, optional
    """
    model, names = unwrapped(model)
    inner_name = {outer: inner for inner, outer in names.items()}
    stds = {inner_name.get(name, name): s for name, s in stds.items()}
    apply_fn = functional_form(model, call)
    live = {"inner." + name: p for name, p in model.named_parameters() if p.requires_grad}
    means = {name: live["inner." + name] for name in stds}
    draws = diag_normal(means, dict(stds), num_samples, generator=generator)
    samples = {
        key: draws[key[6:]] if key[6:] in draws else value.expand(num_samples, *value.shape)
        for key, value in live.items()
    }
    with means_as_draws():
        return sample_outputs(apply_fn, samples, x)


def dropout_outputs(
    model: nn.Module, x: Any, num_samples: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """Outputs ``(S, N, ...)`` of ``model`` under ``num_samples`` seeded dropout masks (:mod:`funcbnn.mc_dropout`).

    Other layers run in eval mode (BatchNorm uses its running statistics). A
    model without dropout layers gives ``num_samples`` copies of its output.
    """
    model = _unwrap_compiled(model)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not any(isinstance(m, mc_dropout.DROPOUT_LAYERS) for m in model.modules()):
        out = functional_form(model)(params, x)
        return out.expand(num_samples, *out.shape)
    post = _dropout_family()
    draws = post.sample(post.init(params), num_samples, generator=generator)
    return sample_outputs(functional_form(model, dropout=True), draws, x)
