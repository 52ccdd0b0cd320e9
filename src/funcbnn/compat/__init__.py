"""Drop-in front ends with the APIs of the libraries funcbnn was seeded from.

Change one import and keep your code and your numbers; move to the functional
API at your own pace (the docs' migration pages put the calls side by side):

- ``import torchbayesian.bnn as bnn`` becomes ``import funcbnn.compat.torchbayesian as bnn``;
- ``from incerto.bayesian import ...`` and ``from incerto.exceptions import ...``
  become ``from funcbnn.compat.incerto import ...``;
- ``from deepuq.methods.vi import ...`` becomes ``from funcbnn.compat.deepuq import ...``,
  and ``from deepuq.types import UQResult`` becomes ``from funcbnn.compat.deepuq import UQResult``.

Each class keeps its library's names, signatures, defaults and numbers, while
the work is done by the functional core: weight draws by
:func:`funcbnn.tree.diag_normal`, KL terms by :mod:`funcbnn.families`, curvature
by :mod:`funcbnn.laplace`, SWAG moments by :mod:`funcbnn.swag`, MC dropout masks
by :mod:`funcbnn.mc_dropout`, and predictions as one batched call
(:func:`funcbnn.sample_outputs`). Where a library's numbers depart from the
theory it cites, the docstring says so and names the native call that is right.
Randomness comes from the global RNG as in the libraries, or from an explicit
``generator=`` keyword that every sampling method accepts in addition.
"""

from . import deepuq, incerto, torchbayesian

__all__ = ["torchbayesian", "incerto", "deepuq"]
