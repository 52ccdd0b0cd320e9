"""The structured engine's one trick, shared by the curvature, KFAC and GLM code.

Run the model once with a zero "tap" tensor added to the output of every call of
each known layer (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``) and keep the
call's input. A backward pass to the taps alone then gives, per example, the
gradient at each layer's output; weight gradients (or their squares, Kronecker
factors, Jacobian products) follow from those and the inputs without autograd
ever forming a per-example weight gradient.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor, nn

from ..model import FunctionalModel

__all__ = ["Layer", "Call", "structured_layers", "tapped_forward"]


class Layer(NamedTuple):
    """A layer the taps handle, with the leaf names of its weight and bias."""

    module: nn.Module
    weight: str
    bias: str | None


class Call(NamedTuple):
    """One call of a tapped layer during the forward pass."""

    layer: int  # index into the layer list
    input: Tensor  # detached
    tap: Tensor  # zeros shaped like the call's output, requires grad


def structured_layers(apply_fn: FunctionalModel, names: set[str]) -> list[Layer]:
    """Linear / Conv1d / Conv2d layers whose weight is in ``names`` (their bias counts if it is too).

    Convolutions with groups, non-zero padding modes or string padding, and
    weights tied to another leaf slot, are left to the generic engine.
    """
    layers = []
    for mod_name, mod in apply_fn.module.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, nn.Linear):
            ok = True
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            ok = mod.groups == 1 and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)
        else:
            continue
        w, b = prefix + "weight", prefix + "bias"
        tied = any(len(apply_fn._slots.get(n, [])) > 1 for n in (w, b))
        if not ok or tied or w not in names:
            continue
        # A bias outside ``names`` (frozen, or not in the subset) is a constant: the layer is
        # handled as bias-free, its weight still structured.
        layers.append(Layer(mod, w, b if mod.bias is not None and b in names else None))
    return layers


def tapped_forward(
    apply_fn: FunctionalModel, params: dict[str, Tensor], layers: list[Layer], x: Any
) -> tuple[Tensor, list[Call]]:
    """Outputs at detached ``params`` (differentiable in the taps only) and every tapped call, in call order.

    A module called twice gets two calls; a module never called gets none.
    Autograd is switched on inside, so callers may hold ``torch.no_grad()`` or
    ``torch.inference_mode()``.
    """
    calls: list[Call] = []

    def hook(i: int):
        def fn(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            tap = torch.zeros_like(output, requires_grad=True)
            calls.append(Call(i, inputs[0].detach(), tap))
            return output + tap

        return fn

    handles = [layer.module.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        # Tensors made under inference_mode cannot take part in autograd: copy those.
        detached = {k: v.clone() if v.is_inference() else v.detach() for k, v in params.items()}
        with torch.inference_mode(False), torch.enable_grad():
            x = optree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) and t.is_inference() else t, x)
            f = apply_fn(detached, x)
    finally:
        for h in handles:
            h.remove()
    return f, calls
