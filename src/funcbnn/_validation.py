"""Early checks of user input, raising errors that name the argument."""

from __future__ import annotations

import math
import operator
from typing import Any

import optree
import torch
from torch import Tensor


def positive_int(value: Any, name: str) -> int:
    """Return ``value`` if it is an integer >= 1 (NumPy integers too), else raise ``ValueError``."""
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if isinstance(value, bool) or number is None or number < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return number


def positive_float(value: Any, name: str) -> float:
    """Return ``value`` as a float if it is a finite number > 0, else raise ``ValueError``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive number, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return number


def check_positive_tree(tree: Any, name: str) -> None:
    """Raise ``ValueError`` naming the first leaf of ``tree`` that is not finite and > 0."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree)
    for path, leaf in zip(paths, leaves):
        leaf_name = ".".join(str(p) for p in path) or "<root>"
        value = leaf if isinstance(leaf, Tensor) else torch.as_tensor(leaf)
        if value.numel() == 0:
            continue
        bad = ~(torch.isfinite(value) & (value > 0))
        if bool(bad.any()):
            worst = value[bad].reshape(-1)[0].item()
            raise ValueError(f"{name} must be finite and positive, got {worst} in leaf '{leaf_name}'")


def positive_scalar(value: Any, name: str) -> float | Tensor:
    """A positive finite hyperparameter as a Python float or a 0-d tensor.

    Accepts Python numbers, 0-d tensors and shape-``(1,)`` tensors (laplace-torch's
    habit), so ``sigma=0.5``, ``sigma=torch.tensor(0.5)`` and ``sigma=torch.ones(1)``
    mean the same. A tensor stays a tensor (reshaped to 0-d, a view), so
    gradients flow through it; a number is returned as a float.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"{name} must be a scalar (a number, a 0-d or a shape-(1,) tensor), got shape {tuple(value.shape)}")
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)) or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a tensor of dtype {value.dtype}")
        number = float(value.detach())
        if not (number > 0 and math.isfinite(number)):
            raise ValueError(f"{name} must be finite and positive, got {number}")
        return value.reshape(())
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    return positive_float(value, name)
