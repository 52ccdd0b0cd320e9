"""What the training loops (vi, swag, ensemble) share to checkpoint and resume bit-identically.

A checkpoint is a plain dict (tensors, numbers, strings, lists) with a ``format`` tag naming the
loop that wrote it, so ``torch.load(weights_only=True)`` reads it and a checkpoint of one loop
is never taken for another's.
"""

from __future__ import annotations

import copy
from typing import Any

import optree
import torch
from torch import Tensor

from .checks import describe


def checkpoint_of(resume: Any, result_type: type, fmt: str, fit_name: str) -> dict | None:
    """The checkpoint dict of ``resume`` (a ``result_type`` or its ``.checkpoint``), checked; None for None."""
    if resume is None:
        return None
    name = result_type.__name__
    if isinstance(resume, result_type) and resume.checkpoint is None:
        raise ValueError(
            f"resume: this {name} carries no checkpoint (saved with checkpoint=None?); resume from one that has it"
        )
    ck = resume.checkpoint if isinstance(resume, result_type) else resume
    if not (isinstance(ck, dict) and ck.get("format") == fmt):
        article = "an" if name[0] in "AEIOU" else "a"
        raise TypeError(
            f"resume must be {article} {name} of {fit_name} or its .checkpoint (a dict with format {fmt!r}), "
            f"got {describe(resume)}"
        )
    return ck


def same_layout(a: Any, b: Any) -> bool:
    """Whether two trees have the same structure and every leaf the same shape and dtype."""
    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    return sa == sb and all(
        isinstance(x, Tensor) and isinstance(y, Tensor) and x.shape == y.shape and x.dtype == y.dtype
        for x, y in zip(la, lb)
    )


def generator_state(generator: torch.Generator | None) -> dict[str, Any]:
    """The checkpoint entries that restore ``generator`` (its state and device)."""
    if generator is None:
        return {"generator": None, "generator_device": None}
    return {"generator": generator.get_state(), "generator_device": str(generator.device)}


def resumed_generator(ck: dict, generator: torch.Generator | None) -> torch.Generator | None:
    """``generator`` put in the checkpoint's state (a new one on the saved device if the caller passed none)."""
    saved = ck.get("generator")
    if saved is None:
        return generator
    if generator is None:
        generator = torch.Generator(device=ck.get("generator_device") or "cpu")
    try:
        generator.set_state(saved)
    except RuntimeError as e:
        raise ValueError(
            f"resume: the checkpoint's generator state does not fit generator (device {generator.device}): {e}"
        ) from e
    return generator


def load_optimizer(opt: torch.optim.Optimizer, saved: dict, what: str) -> None:
    """``opt.load_state_dict`` of a deep copy, with an error that says the checkpoint does not fit."""
    # A deep copy: load_state_dict shares the saved tensors, and the optimiser then updates them in
    # place, which would change the caller's checkpoint (and a second resume from it).
    try:
        opt.load_state_dict(copy.deepcopy(saved))
    except (ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"resume: the checkpoint's optimiser state does not fit {what}: {e}") from e
