"""From an ``nn.Module`` to a pure function of a parameter tree.

:func:`functionalize` pulls the trainable parameters out of a module as a
``dict[str, Tensor]`` and returns a :class:`FunctionalModel` ``apply_fn`` with
``apply_fn(params, x) == module(x)`` evaluated at ``params``, the way
:func:`torch.func.functional_call` does it. The module the user passed is never
touched: ``apply_fn`` runs a private structural copy of it (new module
objects and tensor tables, shared code, hooks and plain attributes) whose
tensor slots hold shape-only ``meta`` placeholders between calls.

A forward with several inputs is called as ``apply_fn(params, x, z, mask=m)``;
the APIs that take one ``x`` (``sample_outputs``, ``vi``, ``laplace``) carry
them as one :class:`Inputs` (``Inputs(x, z, mask=m)``), a pytree whose tensor
leaves share the leading batch axis.
"""

from __future__ import annotations

import copy
import inspect
import threading
from typing import Any, Callable, Iterator, NamedTuple, Union

import optree
import torch
from torch import Tensor, nn

from .tree import Tree, check_same_structure

__all__ = ["FunctionalModel", "Functional", "Inputs", "functionalize", "TrainMode"]

TrainMode = Union[bool, Callable[[str, nn.Module], bool]]
"""Which submodules run in training mode: ``False`` (all eval), ``True`` (all
train) or a predicate ``(name, submodule) -> bool``."""

# Layers whose train-mode forward writes running statistics into their buffers.
_STATS_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


class Functional(NamedTuple):
    """What :func:`functionalize` returns: unpack as ``apply_fn, params, buffers = ...``."""

    apply_fn: "FunctionalModel"
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]


class Inputs:
    """Several model inputs carried as one ``x``: ``Inputs(x, z, mask=m)`` calls ``forward(x, z, mask=m)``.

    A pytree (registered with optree and ``torch.utils._pytree``) whose
    leaves are the positional and keyword inputs, so it goes wherever one
    ``x`` goes: ``sample_outputs(apply_fn, samples, Inputs(x, z))``. Its
    tensor leaves are expected to share a leading batch axis; indexing
    (``inputs[:8]``, ``inputs[idx]``) indexes every tensor leaf along it, and
    non-tensor leaves (flags, scales) are passed through unchanged.

    Examples
    --------
    >>> class Add(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = nn.Linear(3, 2)
    ...     def forward(self, x, z, scale=1.0):
    ...         return self.lin(x) * scale + z
    >>> apply_fn, params, _ = functionalize(Add())
    >>> x, z = torch.randn(5, 3), torch.randn(5, 2)
    >>> out = apply_fn(params, Inputs(x, z, scale=2.0))
    >>> torch.equal(out, apply_fn(params, x, z, scale=2.0))
    True
    >>> Inputs(x, z, scale=2.0)[:2]
    Inputs(tensor of shape (2, 3), tensor of shape (2, 2), scale=2.0)
    """

    __slots__ = ("args", "kwargs")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __getitem__(self, index: Any) -> "Inputs":
        pick = lambda t: t[index] if isinstance(t, Tensor) else t  # noqa: E731
        return Inputs(*map(pick, self.args), **{k: pick(v) for k, v in self.kwargs.items()})

    def __len__(self) -> int:
        for t in optree.tree_leaves((self.args, self.kwargs)):
            if isinstance(t, Tensor) and t.dim():
                return t.shape[0]
        raise TypeError("Inputs has no tensor with a batch axis, so no length")

    def __iter__(self) -> Iterator[Any]:
        raise TypeError("Inputs is not iterable; use .args and .kwargs")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Inputs):
            return False
        mine, theirs = (self.args, self.kwargs), (other.args, other.kwargs)
        if optree.tree_structure(mine) != optree.tree_structure(theirs):
            return False
        same = lambda a, b: (  # noqa: E731
            isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a, b)) if isinstance(a, Tensor) else a == b
        )
        return all(same(a, b) for a, b in zip(optree.tree_leaves(mine), optree.tree_leaves(theirs)))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        show = lambda v: f"tensor of shape {tuple(v.shape)}" if isinstance(v, Tensor) else repr(v)  # noqa: E731
        parts = [show(a) for a in self.args] + [f"{k}={show(v)}" for k, v in self.kwargs.items()]
        return f"Inputs({', '.join(parts)})"


def _flatten_inputs(inputs: Inputs) -> tuple:
    keys = tuple(inputs.kwargs)
    return (*inputs.args, *inputs.kwargs.values()), (len(inputs.args), keys)


def _unflatten_inputs(meta: tuple, children: Any) -> Inputs:
    num_args, keys = meta
    children = list(children)
    return Inputs(*children[:num_args], **dict(zip(keys, children[num_args:])))


# Registered in optree's global namespace: the whole library calls optree without a namespace.
optree.register_pytree_node(
    Inputs, _flatten_inputs, _unflatten_inputs,
    namespace=getattr(optree.registry, "__GLOBAL_NAMESPACE"),
)
torch.utils._pytree.register_pytree_node(
    Inputs,
    lambda i: _flatten_inputs(i),
    lambda children, meta: _unflatten_inputs(meta, children),
    serialized_type_name="funcbnn.model.Inputs",
)


def _version(t: Tensor) -> int | None:
    """``t``'s version counter, or ``None`` for an inference tensor (made under ``torch.inference_mode``),
    which has none."""
    return None if t.is_inference() else t._version


def _written(pairs: list[tuple[Tensor, Tensor, int | None]]) -> bool:
    """Whether the forward wrote into any copy: ``(copy, original, copy's version before)``.

    By the version counter where there is one; an inference tensor has none, so
    its copy is compared with the original instead (once per model: this only
    runs on a first call). A comparison that cannot run counts as a write, the
    safe answer (copies from then on).
    """
    for copy_, original, before in pairs:
        if before is not None:
            if copy_._version != before:
                return True
            continue
        try:
            if not torch.equal(copy_, original):
                return True
        except RuntimeError:
            return True
    return False


def _train_flag(train: TrainMode, name: str, module: nn.Module) -> bool:
    return bool(train(name, module)) if callable(train) else bool(train)


_PARALLEL = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def _unwrap_compiled(module: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``'s ``OptimizedModule`` or a (Distributed)DataParallel, else ``module``.

    The wrappers replicate or synchronise the module per call, which a shell
    evaluated at given weights (and batched over samples by vmap) must not do.
    """
    while True:
        if type(module).__name__ == "OptimizedModule" and isinstance(module._modules.get("_orig_mod"), nn.Module):
            module = module._modules["_orig_mod"]
        elif isinstance(module, _PARALLEL) and isinstance(module._modules.get("module"), nn.Module):
            module = module._modules["module"]
        else:
            return module


def _positional_capacity(module: nn.Module) -> float:
    """How many positional inputs ``module.forward`` accepts (``inf`` with ``*args`` or if unknown)."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return float("inf")
    kinds = [p.kind for p in sig.parameters.values()]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return float("inf")
    return sum(k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds)


_PICKLABLE: dict[type, type] = {}
_STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks")


def _picklable_parametrized(cls: type) -> type:
    """A subclass of torch's per-module ``Parametrized<Base>`` class that pickles.

    torch's class is made on the fly (no importable name) and its
    ``__getstate__`` raises, so a shell holding one could not be saved with the
    ``apply_fn`` (``LaplaceApproximation`` pickles it). This subclass reduces
    to the base class and the attribute table, and :func:`_rebuild_parametrized`
    lets torch set the parametrization up again on load.
    """
    if cls in _PICKLABLE.values():
        return cls
    if cls not in _PICKLABLE:
        def reduce(self: nn.Module, protocol: Any = None) -> tuple:
            state = dict(vars(self))
            # weight_norm's state-dict hooks are local closures that cannot be pickled; the
            # shell never saves or loads a state dict, so they are left behind.
            for attr in _STATE_DICT_HOOKS:
                if attr in state:
                    state[attr] = type(state[attr])()
            return _rebuild_parametrized, (cls.__bases__[0], state)

        _PICKLABLE[cls] = type(cls.__name__, (cls,), {"__reduce_ex__": reduce, "__module__": cls.__module__})
    return _PICKLABLE[cls]


def _rebuild_parametrized(base: type, state: dict[str, Any]) -> nn.Module:
    """Unpickle a parametrized shell module: the base module, then torch's parametrized class and properties."""
    parametrize = torch.nn.utils.parametrize
    if not (hasattr(parametrize, "_inject_new_class") and hasattr(parametrize, "_inject_property")):
        raise RuntimeError("this torch version cannot restore a pickled parametrized module (torch.nn.utils."
                           "parametrize._inject_new_class is missing); functionalize the module again instead")
    mod = base.__new__(base)
    mod.__dict__.update(state)
    parametrize._inject_new_class(mod)
    for name in mod.parametrizations:
        parametrize._inject_property(mod, name)
    mod.__class__ = _picklable_parametrized(type(mod))
    return mod


def _structural_copy(module: nn.Module) -> nn.Module:
    """New module objects with their own parameter/buffer/submodule tables; all else shared.

    Unlike ``copy.deepcopy`` this never copies tensors and works for modules that
    hold non-leaf tensors (pruning, legacy weight norm, cached activations).
    """
    copies: dict[int, nn.Module] = {}

    def visit(mod: nn.Module) -> nn.Module:
        mod = _unwrap_compiled(mod)
        if id(mod) in copies:  # a submodule used twice stays one object
            return copies[id(mod)]
        if torch.nn.utils.parametrize.is_parametrized(mod):
            # torch refuses copy.copy of a parametrized module (its __getstate__ raises, to
            # stop pickling); a shell only needs the attribute table, so build it directly,
            # in a class that pickles (see _picklable_parametrized).
            new = type(mod).__new__(type(mod))
            new.__dict__.update(vars(mod))
            new.__class__ = _picklable_parametrized(type(mod))
        else:
            new = copy.copy(mod)
        copies[id(mod)] = new
        new._parameters = dict(mod._parameters)
        new._buffers = dict(mod._buffers)
        # Own hook tables: hooks added to the shell (curvature taps) never reach the user's module.
        for attr, value in vars(mod).items():
            if "hook" in attr and isinstance(value, dict):
                setattr(new, attr, type(value)(value))
        new._modules = {k: (None if m is None else visit(m)) for k, m in mod._modules.items()}
        return new

    return visit(module)


def _tensor_slots(module: nn.Module) -> dict[str, list[tuple[dict, str]]]:
    """Where every parameter and buffer lives: ``{name: [(table, attr), ...]}``.

    ``table`` is a submodule's ``_parameters`` or ``_buffers`` dict. A tensor
    reachable under several names (tied weights) lists all its slots under the
    first name, the one ``named_parameters()`` / ``named_buffers()`` report.
    """
    slots: dict[str, list[tuple[dict, str]]] = {}
    seen: set[tuple[int, str]] = set()
    for kind in ("_parameters", "_buffers"):
        first_name: dict[int, str] = {}
        for mod_name, mod in module.named_modules(remove_duplicate=False):
            table = getattr(mod, kind)
            for attr, tensor in table.items():
                if tensor is None or (id(table), attr) in seen:
                    continue
                seen.add((id(table), attr))
                owner = first_name.setdefault(id(tensor), f"{mod_name}.{attr}" if mod_name else attr)
                slots.setdefault(owner, []).append((table, attr))
    return slots


class FunctionalModel:
    """A stateless view of a module: ``apply_fn(params, *inputs, buffers=None, **kwargs)``.

    Built by :func:`functionalize`; holds the frozen parameters
    (``requires_grad=False``) and the buffers captured at build time.

    ``apply_fn(params, x)`` is ``module(x)`` at ``params``; several inputs go
    positionally or by keyword as to ``forward`` (``apply_fn(params, x, z,
    mask=m)``), or as one :class:`Inputs` (``apply_fn(params, Inputs(x, z))``),
    the form the single-``x`` APIs carry. ``buffers`` replaces the default
    buffers; it is keyword-only, except that a third positional argument that
    is a dict with exactly the buffer keys is read as the buffers when the
    forward takes one input or ``x`` is an :class:`Inputs` (the older
    ``apply_fn(params, x, buffers)``, which ``vi`` and ``swag`` use; a third
    positional ``None`` then means the default buffers).

    Calling it never mutates anything passed in, nor its own defaults:

    - the module gets fresh copies of the buffers on every call, so a forward
      that updates a buffer in place (running statistics, a counter, spectral
      norm's power iteration in train mode) changes neither the caller's tree
      nor ``apply_fn.buffers``, and no call depends on an earlier one;
    - a forward that writes into its inputs in place (``x.add_(1)``) is found
      on the first call, which runs on copies of the inputs; from then on it
      gets copies on every call. (Inputs are not copied otherwise: they can
      be large. A later write, which only a data-dependent forward could make,
      is caught by the tensors' version counters and raises.)
    - parameters likewise: the first call runs on copies, and a forward that
      wrote into them (weight clipping under ``no_grad``) gets copies from
      then on, so neither the caller's tree nor ``apply_fn.frozen`` changes.
      (Version counters do not see writes through ``.data``; buffers are
      copied every call, so those are safe there.)

    Calls are serialised by a lock, because they share one private module
    copy; ``vmap`` over samples is one call.

    Attributes
    ----------
    module : nn.Module
        The private structural copy that is evaluated, with train/eval flags as
        requested. Its tensor slots hold ``meta`` placeholders between calls.
    params_template : dict[str, Tensor]
        The parameter tree the model expects (``meta`` tensors: structure and
        shapes only).
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
        self._slots = _tensor_slots(module)
        self._param_keys = params_template.keys()
        self._lock = threading.RLock()
        self._capacity = _positional_capacity(module)
        self._stats_layers = [(name, m) for name, m in module.named_modules() if isinstance(m, _STATS_LAYERS)]
        # None until the first call has run on copies of the inputs: then whether the
        # forward wrote into them (and so gets copies from then on).
        self._writes_inputs: bool | None = None
        self._writes_params: bool | None = None  # likewise for the parameters (and frozen ones)
        # Between calls every slot holds a meta placeholder: the shell keeps none of
        # the user's tensors alive, and a slot that was somehow not substituted
        # fails loudly instead of silently using stale weights.
        self._placeholders = [
            (table, attr, torch.empty_like(table[attr], device="meta"))
            for slots in self._slots.values()
            for table, attr in slots
        ]
        self._restore()

    def __getstate__(self) -> dict[str, Any]:
        # The slot tables point into ``module`` and the lock cannot be pickled; both are rebuilt.
        return {"module": self.module, "params_template": self.params_template, "frozen": self.frozen,
                "buffers": self.buffers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["module"], state["params_template"], state["frozen"], state["buffers"])

    def _restore(self) -> None:
        for table, attr, placeholder in self._placeholders:
            table[attr] = placeholder

    @property
    def stats_layers_in_train_mode(self) -> list[str]:
        """Names of BatchNorm/InstanceNorm layers that would update running statistics in place.

        The layers are found once; only their flags are read per call (``sample_outputs``
        asks on every call, and walking all modules cost ~10 us of a 0.2 ms prediction).
        """
        return [name for name, m in self._stats_layers if m.training and m.track_running_stats]

    def _read_buffers(self, inputs: tuple, buffers: Any) -> tuple[tuple, dict[str, Tensor]]:
        """Split the call's positional arguments into inputs and buffers, and check the buffers."""
        if buffers is None and len(inputs) == 2:
            third = inputs[1]
            # After an Inputs (which carries every model input) only buffers can follow.
            only_one = self._capacity < 2 or isinstance(inputs[0], Inputs)
            if (third is None and only_one) or (
                isinstance(third, dict) and third.keys() == self.buffers.keys() and (self.buffers or only_one)
            ):
                inputs, buffers = inputs[:1], third  # the older apply_fn(params, x, buffers)
        if buffers is None:
            return inputs, self.buffers
        if not isinstance(buffers, dict):
            raise TypeError(
                f"buffers must be a dict of tensors with the keys of apply_fn.buffers {sorted(self.buffers)}, "
                f"got {type(buffers).__name__}; pass further model inputs positionally and buffers as buffers=..."
            )
        if buffers.keys() != self.buffers.keys():
            missing = sorted(set(self.buffers) - set(buffers))
            extra = sorted(set(buffers) - set(self.buffers))
            raise ValueError(f"buffers do not fit the model: missing keys {missing}, unexpected keys {extra}")
        for k, v in buffers.items():
            if not isinstance(v, Tensor):
                raise TypeError(f"buffers: '{k}' must be a Tensor, got {type(v).__name__}")
        return inputs, buffers

    def __call__(self, params: dict[str, Tensor], *inputs: Any, buffers: dict[str, Tensor] | None = None,
                 **kwargs: Any) -> Any:
        if not isinstance(params, dict) or params.keys() != self._param_keys:
            self._raise_bad_keys(params)
        inputs, buffers = self._read_buffers(inputs, buffers)
        if buffers:
            # Fresh copies every call (~1 us per buffer): an in-place write by the forward
            # (running statistics, counters, power iterations) never reaches the caller's
            # tree or the defaults, and no call sees what an earlier one wrote.
            buffers = {k: v.clone() for k, v in buffers.items()}
        frozen, learn = self.frozen, None
        if self._writes_params is not False:
            # The first call (or every call of a forward known to write its parameters in
            # place, e.g. weight clipping under no_grad) runs on copies of the parameters;
            # their version counters tell which case this is.
            originals = (*params.values(), *frozen.values())
            params = {k: v.clone() for k, v in params.items()}
            frozen = {k: v.clone() for k, v in frozen.items()}
            if self._writes_params is None:
                copies = (*params.values(), *frozen.values())
                learn = [(c, o, _version(c)) for c, o in zip(copies, originals)]
        out = self._call_with_inputs(params, frozen, buffers, inputs, kwargs)
        if learn is not None:
            self._writes_params = _written(learn)
        return out

    def _call_with_inputs(self, params: dict[str, Tensor], frozen: dict[str, Tensor], buffers: dict[str, Tensor],
                          inputs: tuple, kwargs: dict[str, Any]) -> Any:
        """The call, with the inputs protected: copies where the forward writes them, else version checks."""
        if len(inputs) == 1 and not kwargs:
            x = inputs[0]
            if type(x) is Tensor and self._writes_inputs is False:
                # The common case, kept to a version-counter read on each side.
                version = _version(x)
                out = self._run(params, frozen, buffers, inputs, kwargs)
                if version is not None and x._version != version:
                    self._raise_late_write()
                return out
            if isinstance(x, Inputs):
                inputs, kwargs = x.args, x.kwargs
        elif len(inputs) == 1 and isinstance(inputs[0], Inputs):
            kwargs = {**inputs[0].kwargs, **kwargs}
            inputs = inputs[0].args
        watched = [t for t in optree.tree_leaves((inputs, kwargs)) if isinstance(t, Tensor)]
        if watched and self._writes_inputs is not False:
            # First call (or a forward known to write its inputs): run it on copies.
            copies = {id(t): t.clone() for t in watched}
            swap = lambda t: copies.get(id(t), t) if isinstance(t, Tensor) else t  # noqa: E731
            inputs, kwargs = optree.tree_map(swap, (inputs, kwargs))
            learn = [(copies[id(t)], t, _version(copies[id(t)])) for t in watched]
            out = self._run(params, frozen, buffers, inputs, kwargs)
            if self._writes_inputs is None:
                self._writes_inputs = _written(learn)
            return out
        versions = [_version(t) for t in watched]
        out = self._run(params, frozen, buffers, inputs, kwargs)
        if any(v is not None and t._version != v for t, v in zip(watched, versions)):
            self._raise_late_write()
        return out

    def _raise_late_write(self) -> None:
        self._writes_inputs = True
        raise RuntimeError(
            "the model's forward wrote into its input in place on this call (but not on the first call, "
            "whose inputs were copies), so the tensor you passed has changed. From now on apply_fn hands "
            "it copies; recompute the input and call again."
        )

    def _run(self, params: dict[str, Tensor], frozen: dict[str, Tensor], buffers: dict[str, Tensor],
             inputs: tuple, kwargs: dict[str, Any]) -> Any:
        slots = self._slots
        with self._lock:
            try:
                # Direct slot assignment is what functional_call does, minus its per-call
                # name resolution and checks: 2x less overhead on small models.
                for source in (params, frozen, buffers):
                    for name, value in source.items():
                        for table, attr in slots[name]:
                            table[attr] = value
                return self.module(*inputs, **kwargs)
            finally:
                self._restore()

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


def functionalize(module: nn.Module, *, train: TrainMode = False) -> Functional:
    """Turn ``module`` into ``(apply_fn, params, buffers)``.

    Parameters
    ----------
    module : nn.Module
        Any module. It is not modified (not its tensors, not its train/eval
        flags) and not kept alive by ``apply_fn``. Parametrized layers
        (``torch.nn.utils.parametrizations.weight_norm``, ``spectral_norm``)
        work: their parameters are the parametrization's own tensors
        (``"0.parametrizations.weight.original0"``, ...), and the weight is
        computed from them on every call. A ``torch.compile``d module is
        unwrapped: ``apply_fn`` runs the original module eagerly, and the
        parameter names lose the ``"_orig_mod."`` prefix; likewise
        ``nn.DataParallel`` and ``DistributedDataParallel`` (names lose
        ``"module."``; spread the work with ``sample_outputs``'s
        ``process_group`` instead).
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
        ``requires_grad=False`` are copied into ``apply_fn.frozen``.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> apply_fn, params, buffers = functionalize(net)
    >>> apply_fn(params, torch.zeros(5, 3)).shape
    torch.Size([5, 2])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    shell = _structural_copy(module)
    # Names come from the shell: the same tensors, minus torch.compile's "_orig_mod." level.
    params: dict[str, Tensor] = {}
    frozen: dict[str, Tensor] = {}
    for name, p in shell.named_parameters():
        (params if p.requires_grad else frozen)[name] = p.detach().clone()
    buffers = {name: b.detach().clone() for name, b in shell.named_buffers()}

    for name, sub in shell.named_modules():
        sub.training = _train_flag(train, name, sub)
    template = {k: torch.empty_like(v, device="meta") for k, v in params.items()}
    apply_fn = FunctionalModel(shell, template, frozen, buffers)
    return Functional(apply_fn, params, {k: v.clone() for k, v in buffers.items()})
