"""Guards on what users pass in: non-finite values, generators, inputs a model cannot take.

Every public entry point checks what it is given before the arithmetic starts,
so a mistake surfaces as an error that names the argument, what was expected
and what came, instead of a NaN result or a traceback from inside torch.

The non-finite checks cost one sum per tensor and a single host sync per
check site (a finite sum proves every element finite); :func:`set_finite_checks` turns them off
for code that has to avoid even that, e.g. inside a CUDA graph, the same way
``torch.set_grad_enabled`` works: as a call or as a context manager.

Examples
--------
>>> import torch, funcbnn
>>> funcbnn.checks.finite_checks_enabled()
True
>>> with funcbnn.checks.set_finite_checks(False):
...     funcbnn.checks.finite_checks_enabled()
False
>>> funcbnn.checks.check_finite({"w": torch.tensor([1.0, float("nan")])}, "params")
Traceback (most recent call last):
    ...
funcbnn.checks.NonFiniteError: params contains non-finite values (1 NaN, 0 inf) in leaf 'w'
"""

from __future__ import annotations

import cmath
import contextlib
import math
import os
import threading
from collections.abc import Iterator
from typing import Any

import optree
import torch
from torch import Tensor

__all__ = [
    "NonFiniteError",
    "ModelInputError",
    "DivergedError",
    "set_finite_checks",
    "finite_checks_enabled",
    "check_finite",
    "all_finite",
    "check_generator",
    "describe",
    "model_input_error",
]


class NonFiniteError(ValueError):
    """An argument (inputs, targets, parameters, a state) holds NaN or inf."""


class ModelInputError(ValueError):
    """The model could not run on an input: wrong trailing shape, dtype, device or value range."""


class DivergedError(FloatingPointError):
    """A training loop's loss became non-finite.

    Attributes
    ----------
    step : int
        The 0-based step whose loss was not finite.
    state : pytree
        The last state whose loss was finite (the input to that step), so the
        run can be resumed with a smaller learning rate.
    """

    def __init__(self, message: str, step: int, state: Any) -> None:
        super().__init__(message)
        self.step = step
        self.state = state


_LOCAL = threading.local()


def finite_checks_enabled() -> bool:
    """Whether non-finite checks run in this thread (default ``True``)."""
    return getattr(_LOCAL, "finite", True)


class set_finite_checks(contextlib.ContextDecorator):
    """Turn the non-finite checks on or off: as a call, a context manager or a decorator.

    Like ``torch.set_grad_enabled``: ``set_finite_checks(False)`` switches at
    once (for this thread); ``with set_finite_checks(False):`` restores the old
    mode on exit; ``@set_finite_checks(False)`` switches only while the
    decorated function runs (defining it changes nothing).

    Parameters
    ----------
    enabled : bool
        ``False`` skips every ``isfinite`` check funcbnn makes (inputs,
        targets, parameters, outputs, losses). Shape, dtype and type checks
        always run: they cost nothing on the device.

    Examples
    --------
    >>> import funcbnn
    >>> with funcbnn.checks.set_finite_checks(False):
    ...     funcbnn.checks.finite_checks_enabled()
    False
    >>> funcbnn.checks.finite_checks_enabled()
    True
    >>> @funcbnn.checks.set_finite_checks(False)
    ... def unchecked():
    ...     return funcbnn.checks.finite_checks_enabled()
    >>> unchecked(), funcbnn.checks.finite_checks_enabled()
    (False, True)
    """

    def __init__(self, enabled: bool) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        self.enabled = enabled
        # The mode before the immediate switch: what a ``with`` block restores on exit.
        self._restore: list[bool] = [finite_checks_enabled()]
        self._fresh = True  # the first __enter__ of a `with` reuses the value saved above
        _LOCAL.finite = enabled

    def __call__(self, func: Any) -> Any:
        # Decorating is not calling: undo the immediate switch; each call switches on entry.
        _LOCAL.finite = self._restore.pop()
        self._fresh = False
        return super().__call__(func)

    def _recreate_cm(self) -> "set_finite_checks":
        # A fresh manager per decorated call, so nested or concurrent calls keep their own saved mode.
        manager = object.__new__(set_finite_checks)
        manager.enabled, manager._restore, manager._fresh = self.enabled, [], False
        return manager

    def __enter__(self) -> None:
        if self._fresh:
            self._fresh = False
        else:
            self._restore.append(finite_checks_enabled())
        _LOCAL.finite = self.enabled

    def __exit__(self, *exc: Any) -> None:
        _LOCAL.finite = self._restore.pop()


def _named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """``(dotted name, leaf)`` pairs; NamedTuple fields by name (``rho.0.weight``, not ``1.0.weight``)."""
    if hasattr(optree, "tree_flatten_with_accessor"):  # optree >= 0.12
        accessors, leaves, _ = optree.tree_flatten_with_accessor(tree)
        names = [".".join(str(getattr(e, "field", None) or e.entry) for e in a) for a in accessors]
    else:
        paths, leaves, _ = optree.tree_flatten_with_path(tree)
        names = [".".join(str(p) for p in path) for path in paths]
    return list(zip(names, leaves))


def check_finite(tree: Any, name: str, *, context: str = "") -> None:
    """Raise :class:`NonFiniteError` naming the first floating leaf of ``tree`` with NaN or inf.

    One sum per leaf and one host sync for the whole tree; integer and
    boolean leaves are skipped; an overflow of finite values is not reported. Does nothing while
    :func:`set_finite_checks` is off.

    Parameters
    ----------
    tree : Tensor or pytree of tensors
    name : str
        The argument's name, used in the message.
    context : str, optional
        Appended to the message (e.g. a hint on what to do).
    """
    if not finite_checks_enabled():
        return
    if not all_finite(tree):
        _raise_non_finite([("", tree)] if isinstance(tree, Tensor) else _named_leaves(tree), name, context)


def all_finite(tree: Any) -> bool:
    """Whether every floating element of ``tree`` is finite, at one sum per leaf and one host sync.

    A sum is finite only if every summand is (NaN and inf propagate), and a
    sum is one reduction, 10-40x cheaper than ``isfinite().all()``; the leaves'
    sums are added on the device, so the whole tree costs one host sync. Only a
    non-finite total (a bad value, or an overflow of finite values) pays for
    the exact element-wise check, so the answer is exact. Not affected by
    :func:`set_finite_checks`.

    Examples
    --------
    >>> all_finite({"a": torch.ones(2), "b": torch.tensor([3e38, 3e38])})  # the sum overflows, no element is inf
    True
    >>> all_finite([torch.ones(2), torch.tensor([float("nan")])])
    False
    """
    if isinstance(tree, Tensor):  # the common case, without the tree machinery (~3 us)
        if tree.is_meta:  # no values to check (shape-only tensors)
            return True
        if tree.is_floating_point():
            total = tree.detach()
            total = total.sum(dtype=torch.float32) if total.dtype in _HALF else total.sum()
            if math.isfinite(total.item()):
                return True
        elif not tree.is_complex() or cmath.isfinite(tree.detach().sum().item()):
            return True
        return bool(torch.isfinite(tree).all())
    leaves = [t for t in optree.tree_leaves(tree)
              if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()) and not t.is_meta]
    if not leaves:
        return True
    sums = [_abs_sum(t) for t in leaves]
    total = sums[0] if len(sums) == 1 else torch.stack([s.to(sums[0].device, torch.float64) for s in sums]).sum()
    if math.isfinite(total.item()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in leaves)


_HALF = (torch.float16, torch.bfloat16)


def _abs_sum(t: Tensor) -> Tensor:
    """``|sum(t)|`` (float32 accumulation for half types, whose own sums overflow early); real for complex."""
    return t.detach().sum(dtype=torch.float32 if t.dtype in _HALF else None).abs()


def _raise_non_finite(named: list[tuple[str, Any]], name: str, context: str) -> None:
    for path, leaf in named:
        if isinstance(leaf, Tensor) and (leaf.is_floating_point() or leaf.is_complex()) and not bool(torch.isfinite(leaf).all()):
            nans = int(torch.isnan(leaf).sum())
            infs = int(torch.isinf(leaf).sum())
            where = f" in leaf '{path}'" if path else ""
            tail = f"; {context}" if context else ""
            raise NonFiniteError(f"{name} contains non-finite values ({nans} NaN, {infs} inf){where}{tail}")


def check_generator(generator: Any, name: str = "generator") -> torch.Generator | None:
    """Return ``generator`` if it is ``None`` or a ``torch.Generator``, else raise ``TypeError``.

    Examples
    --------
    >>> check_generator(0)
    Traceback (most recent call last):
        ...
    TypeError: generator must be a torch.Generator or None, got int 0 (use torch.Generator().manual_seed(0))
    """
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    hint = f" (use torch.Generator().manual_seed({generator}))" if isinstance(generator, int) else ""
    raise TypeError(f"{name} must be a torch.Generator or None, got {type(generator).__name__} {generator!r}{hint}")


def describe(x: Any) -> str:
    """A short description of an input for error messages: shape and dtype, per leaf for containers."""
    if isinstance(x, Tensor):
        text = f"a tensor of shape {tuple(x.shape)}, dtype {x.dtype}"
        if x.device.type != "cpu":
            text += f", on {x.device}"
        if not (x.is_floating_point() or x.is_complex()) and x.numel() and x.dtype != torch.bool and not x.is_meta:
            text += f", values in [{int(x.min())}, {int(x.max())}]"
        return text
    leaves, spec = optree.tree_flatten(x)
    if not leaves or leaves == [x]:
        return f"{type(x).__name__} {x!r}"[:120]
    parts = [describe(leaf) if isinstance(leaf, Tensor) else type(leaf).__name__ for leaf in leaves[:4]]
    more = f", ... ({len(leaves)} leaves)" if len(leaves) > 4 else ""
    return f"{type(x).__name__} of [{'; '.join(parts)}{more}]"


def _param_dtypes(params: Any) -> list[torch.dtype]:
    return sorted({t.dtype for t in optree.tree_leaves(params) if isinstance(t, Tensor) and t.is_floating_point()}, key=str)


def model_input_error(error: BaseException, x: Any, params: Any, name: str = "x", where: str = "") -> ModelInputError:
    """A :class:`ModelInputError` (a ``ValueError``) saying the model could not run on ``name``, with what came and what the parameters are.

    Used as ``raise model_input_error(e, x, params) from e`` around a model
    call, so the torch message stays in the chain while the first line tells
    the user which argument to look at.
    """
    dtypes = _param_dtypes(params)
    hint = ""
    if isinstance(x, Tensor) and x.is_floating_point() and dtypes and x.dtype not in dtypes:
        hint = f"; its dtype {x.dtype} differs from the parameters' {', '.join(map(str, dtypes))}"
    prefix = f"{where}: " if where else ""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelInputError(
        f"{prefix}the model could not run on {name} ({describe(x)}){hint}. "
        f"Check its trailing shape, dtype, device and value range against the model. Torch said: {first}"
    )


@contextlib.contextmanager
def guarded_call(x: Any, params: Any, name: str = "x", where: str = "") -> Iterator[None]:
    """Re-raise errors from a model call as :func:`model_input_error` (``ValueError``)."""
    try:
        yield
    except (RuntimeError, IndexError, TypeError) as e:  # TypeError: x of the wrong type (a list, a NumPy array)
        if type(e).__module__.startswith("funcbnn") or (isinstance(e, TypeError) and _raised_by_funcbnn(e)):
            # Already ours and precise (bad params or buffers). Only a TypeError is judged by where
            # it was raised: torch's RuntimeErrors come out of C++ with funcbnn's frame innermost
            # when funcbnn does the layer's arithmetic (local reparameterisation).
            raise
        raise model_input_error(e, x, params, name, where) from e


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _raised_by_funcbnn(error: BaseException) -> bool:
    """Whether ``error`` was raised by funcbnn's own code (its innermost frame is in this package)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep)
