"""The leaves a Laplace posterior covers and the fixed rest of the parameters.

``torch.func`` transforms differentiate with respect to whole trees of tensors,
so the curvature, the Jacobians and the linearised predictive take the covered
leaves as a compact dict and put them back among the fixed ones inside the
transformed function: :func:`funcbnn.tree.partition` splits once, and
:meth:`Subset.merge` recombines with :func:`funcbnn.tree.combine`.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple

import optree
from torch import Tensor

from ..tree import Tree, combine, partition

__all__ = ["Subset", "split"]


class Subset(NamedTuple):
    """Where the covered leaves go in the full tree, and the fixed leaves (detached)."""

    spec: Any  # optree treespec of the covered part (None at the fixed leaves)
    rest: Tree  # the fixed leaves (None at the covered ones)

    def merge(self, sub: dict[str, Tensor]) -> Tree:
        """The full parameter tree with ``sub``'s leaves at their places."""
        return combine(optree.tree_unflatten(self.spec, optree.tree_leaves(sub)), self.rest)


def split(params: dict[str, Tensor], names: Iterable[str], *, clone: bool = False) -> tuple[dict[str, Tensor], Subset]:
    """``(sub, subset)``: the leaves named in ``names`` (detached, in ``params`` order) and the rest.

    ``clone=True`` snapshots both parts, so later in-place changes to ``params``
    do not reach a fitted posterior.
    """
    wanted = set(names)
    copy = (lambda t: t.detach().clone()) if clone else (lambda t: t.detach())
    covered, rest = partition(params, lambda name, _: name in wanted)
    sub = {k: copy(v) for k, v in params.items() if k in wanted}
    return sub, Subset(optree.tree_structure(covered), optree.tree_map(copy, rest))
