"""Early checks of user input, raising errors that name the argument."""

from __future__ import annotations

from typing import Any

import optree
import torch
from torch import Tensor


def positive_int(value: Any, name: str) -> int:
    """Return ``value`` if it is an int >= 1, else raise ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


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
