"""The structured engine's one trick, shared by the curvature, KFAC and GLM code.

Run the model once with a zero "tap" tensor added to the output of every call of
each known layer (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``) and keep the
call's input. A backward pass to the taps alone then gives, per example, the
gradient at each layer's output; weight gradients (or their squares, Kronecker
factors, Jacobian products) follow from those and the inputs without autograd
ever forming a per-example weight gradient.

The trick is only right when a layer's weight reaches the outputs through the
layer's own forward and nowhere else. Some modules break that silently:
``nn.MultiheadAttention`` reads ``out_proj.weight`` and ``out_proj.bias`` in
its own forward (``F.multi_head_attention_forward``) without ever calling
``out_proj``, and so does ``nn.TransformerEncoderLayer`` through it; a tied
decoder reads an embedding's weight; a custom module may compute
``x @ self.fc.weight.T``. :func:`tapped_forward` therefore *guards* every
tapped weight: the leaf handed to the model is a copy that requires grad,
swapped for a plain copy only while the layer's own forward runs. Any other
read of the weight that reaches the outputs leaves that copy in the outputs'
autograd graph, which is searched after the forward (a few dozen nodes), and
the layer is reported in :class:`OutsideForward`; callers then route its
leaves to the generic ``vmap`` engine, which differentiates the whole model.
The guard also turns off the fused "fast paths" of ``nn.MultiheadAttention``
and ``nn.TransformerEncoderLayer`` (they are skipped when a weight requires
grad), so the tapped forward runs the same Python code as the generic one.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, NamedTuple

import optree
import torch
from torch import Tensor, nn

from ..model import FunctionalModel

__all__ = ["Layer", "Call", "OutsideForward", "structured_layers", "tapped_forward", "math_attention"]

# Layer types with a structured path, and the forward each must run (a subclass that
# overrides forward may use its weight in other ways: it goes to the generic engine).
_FORWARDS = {nn.Linear: nn.Linear.forward, nn.Conv1d: nn.Conv1d.forward, nn.Conv2d: nn.Conv2d.forward}


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


class OutsideForward(Exception):
    """Raised by :func:`tapped_forward`: these layers' weights reach the outputs outside their own forward."""

    def __init__(self, layers: list[Layer]) -> None:
        super().__init__(", ".join(layer.weight for layer in layers))
        self.layers = layers


def _stock_forward(mod: nn.Module) -> bool:
    for cls, fwd in _FORWARDS.items():
        if isinstance(mod, cls):
            return type(mod).forward is fwd
    return False


def structured_layers(apply_fn: FunctionalModel, names: set[str]) -> list[Layer]:
    """Linear / Conv1d / Conv2d layers whose weight is in ``names`` (their bias counts if it is too).

    Convolutions with groups, non-zero padding modes or string padding,
    subclasses that override ``forward``, layers carrying their own forward
    hooks (which may change the output the tap sees), and weights tied to
    another leaf slot are left to the generic engine. Layers whose weights are
    read outside their forward are found later, by :func:`tapped_forward`.

    Runs under the shell's lock, like :func:`tapped_forward`, whose temporary
    hooks another thread's call would otherwise take for the user's own (and
    route the layer to the generic engine: other numbers, other cost).
    """
    with shell_lock(apply_fn):
        return _structured_layers(apply_fn, names)


def shell_lock(apply_fn: Any) -> Any:
    """The lock of a :class:`~funcbnn.model.FunctionalModel`'s shared module shell (a no-op context otherwise).

    Hooks registered on the shell are seen by every thread's call: whoever adds
    them holds this lock until they are removed.
    """
    lock = getattr(apply_fn, "_lock", None)
    return contextlib.nullcontext() if lock is None else lock


def _structured_layers(apply_fn: FunctionalModel, names: set[str]) -> list[Layer]:
    layers = []
    for mod_name, mod in apply_fn.module.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if not _stock_forward(mod):
            continue
        ok = not (mod._forward_hooks or mod._forward_pre_hooks)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            ok = ok and mod.groups == 1 and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)
        w, b = prefix + "weight", prefix + "bias"
        tied = any(len(apply_fn._slots.get(n, [])) > 1 for n in (w, b))
        if not ok or tied or w not in names:
            continue
        # A bias outside ``names`` (frozen, or not in the subset) is a constant: the layer is
        # handled as bias-free, its weight still structured.
        layers.append(Layer(mod, w, b if mod.bias is not None and b in names else None))
    return layers


def _graph_leaves(root: Tensor, watched: dict[int, int]) -> set[int]:
    """Indices (values of ``watched``, keyed by ``id`` of a leaf tensor) of the watched leaves in ``root``'s graph."""
    found: set[int] = set()
    if root.grad_fn is None:
        return found
    seen: set[Any] = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if var is not None and id(var) in watched:
            found.add(watched[id(var)])
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


def tapped_forward(
    apply_fn: FunctionalModel, params: dict[str, Tensor], layers: list[Layer], x: Any
) -> tuple[Tensor, list[Call]]:
    """Outputs at detached ``params`` (differentiable in the taps only) and every tapped call, in call order.

    A module called twice gets two calls; a module never called gets none.
    Autograd is switched on inside, so callers may hold ``torch.no_grad()`` or
    ``torch.inference_mode()``.

    Raises
    ------
    OutsideForward
        If a layer's weight or bias reaches the outputs other than through the
        layer's own forward (module docstring); the caller drops those layers
        and calls again.
    """
    calls: list[Call] = []
    # Tensors made under inference_mode cannot take part in autograd: copy those.
    detached = {k: v.clone() if v.is_inference() else v.detach() for k, v in params.items()}
    # Guard copies (requiring grad) stand in the model's slots; plain ones only inside the layer's forward.
    guard: dict[str, Tensor] = {}
    plain: dict[str, Tensor] = {}
    watched: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for name in (layer.weight, layer.bias):
            if name:
                plain[name] = detached[name]
                guard[name] = detached[name].detach().requires_grad_(True)
                watched[id(guard[name])] = i

    def pre_hook(i: int):
        layer = layers[i]

        def fn(module: nn.Module, inputs: tuple) -> None:
            module._parameters["weight"] = plain[layer.weight]
            if layer.bias:
                module._parameters["bias"] = plain[layer.bias]

        return fn

    def hook(i: int):
        layer = layers[i]

        def fn(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            module._parameters["weight"] = guard[layer.weight]
            if layer.bias:
                module._parameters["bias"] = guard[layer.bias]
            tap = torch.zeros_like(output, requires_grad=True)
            calls.append(Call(i, inputs[0].detach(), tap))
            return output + tap

        return fn

    handles = []
    # The hooks live on the shell every thread shares: no other call may run (or look for user hooks)
    # until they are gone.
    with shell_lock(apply_fn):
        for i, layer in enumerate(layers):
            handles.append(layer.module.register_forward_pre_hook(pre_hook(i)))
            handles.append(layer.module.register_forward_hook(hook(i)))
        try:
            with torch.inference_mode(False), torch.enable_grad():
                x = optree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) and t.is_inference() else t, x)
                f = apply_fn({**detached, **guard}, x)
        finally:
            for h in handles:
                h.remove()
    if watched and isinstance(f, Tensor):
        outside = _graph_leaves(f, watched)
        if outside:
            raise OutsideForward([layers[i] for i in sorted(outside)])
    return f, calls


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Scaled-dot-product attention through its plain-math kernel (for ``vmap`` over examples).

    The fused CPU kernels have no ``vmap`` batching rule, so ``vmap(grad)`` over
    a model with attention would fall back to a slow per-example loop (and
    warn); the math kernel is ordinary matmuls and softmax.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield
