"""From an ``nn.Module`` to a pure function of a parameter tree.

:func:`functionalize` pulls the trainable parameters out of a module as a
``dict[str, Tensor]`` and returns a :class:`FunctionalModel` ``apply_fn`` with
``apply_fn(params, x) == module(x)`` evaluated at ``params`` through
:func:`torch.func.functional_call`. The module the user passed is never
touched: ``apply_fn`` runs a structural copy of it whose tensors are the
user's own (shared, not duplicated) and are always substituted at call time.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, NamedTuple, Union

import torch
from torch import Tensor, nn

from .tree import Tree, check_same_structure

__all__ = ["FunctionalModel", "Functional", "functionalize", "TrainMode"]

TrainMode = Union[bool, Callable[[str, nn.Module], bool]]
"""Which submodules run in training mode: ``False`` (all eval), ``True`` (all
train) or a predicate ``(name, submodule) -> bool``."""


class Functional(NamedTuple):
    """What :func:`functionalize` returns: unpack as ``apply_fn, params, buffers = ...``."""

    apply_fn: "FunctionalModel"
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]


def _train_flag(train: TrainMode, name: str, module: nn.Module) -> bool:
    return bool(train(name, module)) if callable(train) else bool(train)


class FunctionalModel:
    """A stateless view of a module: ``apply_fn(params, x, buffers=None)``.

    Built by :func:`functionalize`; holds the frozen parameters
    (``requires_grad=False``) and the buffers captured at build time. Calling it
    never mutates anything passed in.

    Attributes
    ----------
    module : nn.Module
        The private structural copy that is evaluated (its train/eval flags are
        set as requested; its own tensors are never read at call time).
    params_template : dict[str, Tensor]
        The parameter tree the model expects (structure and shapes).
    frozen : dict[str, Tensor]
        Parameters that stay out of the posterior.
    buffers : dict[str, Tensor]
        Default buffers (e.g. BatchNorm running statistics).
    """

    def __init__(
        self,
        module: nn.Module,
        params_template: dict[str, Tensor],
        frozen: dict[str, Tensor],
        buffers: dict[str, Tensor],
    ) -> None:
        self.module = module
        self.params_template = params_template
        self.frozen = frozen
        self.buffers = buffers
        self._slots, self._originals = _tensor_slots(module)
        self._param_keys = params_template.keys()
        self._train_batchnorm = [
            name
            for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
        ]

    @property
    def batchnorm_in_train_mode(self) -> list[str]:
        """Names of BatchNorm layers that would update running statistics in place."""
        return list(self._train_batchnorm)

    def __call__(self, params: dict[str, Tensor], x: Any, buffers: dict[str, Tensor] | None = None) -> Any:
        buffers = self.buffers if buffers is None else buffers
        if self._train_batchnorm:
            # Train-mode BatchNorm writes running stats in place; work on copies so
            # the caller's buffer tree stays as it was.
            buffers = {k: v.clone() for k, v in buffers.items()}
        if not isinstance(params, dict) or params.keys() != self._param_keys:
            self._raise_bad_keys(params)
        if buffers.keys() != self.buffers.keys():
            raise ValueError(f"buffers must have the keys {sorted(self.buffers)}, got {sorted(buffers)}")
        # The shell is private, so its tensor slots can be assigned directly: this
        # is what functional_call does, minus its per-call name resolution and checks
        # (3x less overhead per call on small models), and it restores them after.
        slots = self._slots
        try:
            for source in (params, self.frozen, buffers):
                for name, value in source.items():
                    for table, attr in slots[name]:
                        table[attr] = value
            return self.module(x)
        finally:
            # Put the shared originals back so no sample (or vmap wrapper) stays referenced.
            for table, attr, tensor in self._originals:
                table[attr] = tensor

    def _raise_bad_keys(self, params: Any) -> None:
        if not isinstance(params, dict):
            raise TypeError(f"params must be a dict of tensors, got {type(params).__name__}")
        missing = sorted(set(self._param_keys) - set(params))
        extra = sorted(set(params) - set(self._param_keys))
        raise ValueError(f"params do not fit the model: missing keys {missing}, unexpected keys {extra}")

    def check_params(self, params: Tree, name: str = "params", *, leading: int = 0) -> None:
        """Raise a ``ValueError`` unless ``params`` fits this model (``leading`` extra batch dims)."""
        check_same_structure(self.params_template, params, name, leading=leading)

    def __repr__(self) -> str:
        return f"FunctionalModel({type(self.module).__name__}, {len(self.params_template)} parameter tensors)"


def _tensor_slots(module: nn.Module) -> tuple[dict[str, list[tuple[dict, str]]], list[tuple[dict, str, Tensor]]]:
    """Where every parameter and buffer lives: ``{name: [(table, attr), ...]}`` and the originals.

    ``table`` is a submodule's ``_parameters`` or ``_buffers`` dict. Tied tensors
    (one tensor under several names) list every slot under the first name,
    which is the one ``named_parameters()`` reports.
    """
    first_name: dict[int, str] = {}
    slots: dict[str, list[tuple[dict, str]]] = {}
    originals: list[tuple[dict, str, Tensor]] = []
    seen: set[tuple[int, str]] = set()
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for table in (mod._parameters, mod._buffers):
            for attr, tensor in table.items():
                if tensor is None or (id(table), attr) in seen:
                    continue
                seen.add((id(table), attr))
                full = f"{mod_name}.{attr}" if mod_name else attr
                owner = first_name.setdefault(id(tensor), full)
                slots.setdefault(owner, []).append((table, attr))
                originals.append((table, attr, tensor))
    return slots, originals


def functionalize(module: nn.Module, *, train: TrainMode = False) -> Functional:
    """Turn ``module`` into ``(apply_fn, params, buffers)``.

    Parameters
    ----------
    module : nn.Module
        Any module. It is not modified: not its parameters, not its train/eval
        flags.
    train : bool or callable, default False
        Which submodules run in training mode inside ``apply_fn``. The default
        evaluates everything in eval mode (BatchNorm uses running statistics,
        dropout is off). ``lambda name, m: isinstance(m, nn.Dropout)`` gives MC
        dropout with BatchNorm still in eval mode.

    Returns
    -------
    Functional
        ``apply_fn`` (a :class:`FunctionalModel`), ``params`` (copies of the
        trainable parameters, ``dict[str, Tensor]``; tied parameters appear
        once) and ``buffers`` (copies of the buffers). Parameters with
        ``requires_grad=False`` are frozen into ``apply_fn``.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> apply_fn, params, buffers = functionalize(net)
    >>> apply_fn(params, torch.zeros(5, 3)).shape
    torch.Size([5, 2])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    params: dict[str, Tensor] = {}
    frozen: dict[str, Tensor] = {}
    for name, p in module.named_parameters():
        (params if p.requires_grad else frozen)[name] = p.detach().clone()
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}

    # Copy the module's structure but share its tensors: the copy's own tensors
    # are always replaced by functional_call, so duplicating them would waste memory.
    memo: dict[int, Any] = {id(t): t for t in module.parameters()}
    memo.update({id(t): t for t in module.buffers()})
    shell = copy.deepcopy(module, memo)
    for name, sub in shell.named_modules():
        sub.training = _train_flag(train, name, sub)
    # The template records structure and shapes only, so it holds no memory.
    template = {k: torch.empty_like(v, device="meta") for k, v in params.items()}
    apply_fn = FunctionalModel(shell, template, frozen, buffers)
    return Functional(apply_fn, params, {k: v.clone() for k, v in buffers.items()})
