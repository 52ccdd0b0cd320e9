"""torchbayesian's ``bnn`` API on funcbnn: ``import funcbnn.compat.torchbayesian as bnn``.

Replaces ``import torchbayesian.bnn as bnn``; ``bnn.utils`` holds
``PosteriorFactory`` / ``PriorFactory`` (``from funcbnn.compat.torchbayesian.utils
import PosteriorFactory``), and ``funcbnn.compat.torchbayesian.bnn`` is this
module too, for ``from funcbnn.compat.torchbayesian import bnn``::

    import funcbnn.compat.torchbayesian as bnn

    model = bnn.BayesianModule(net)                       # Gaussian posteriors, N(0, 1) prior
    loss = mse(y, model(x)) + model.kl_divergence() / len(dataset)

Numbers are torchbayesian 0.2's; see :class:`BayesianModule` for what differs
and ``docs/migration.md`` for the native equivalents.
"""

import sys as _sys

from . import utils
from .dropout import (
    BayesianAlphaDropout,
    BayesianDropout,
    BayesianDropout1d,
    BayesianDropout2d,
    BayesianDropout3d,
    BayesianFeatureAlphaDropout,
)
from .module import BayesianModule, FactoryPrior
from .posteriors import (
    GaussianPosterior,
    NormalPosterior,
    PretrainedGaussianPosterior,
    PretrainedNormalPosterior,
    VariationalPosterior,
)
from .priors import GaussianPrior, NormalPrior, Prior

# ``torchbayesian.bnn`` is where these names live upstream: make ``...torchbayesian.bnn`` this module.
bnn = _sys.modules[__name__]
_sys.modules[__name__ + ".bnn"] = bnn
_sys.modules[__name__ + ".bnn.utils"] = utils

__all__ = [
    "utils",
    "BayesianModule",
    "VariationalPosterior",
    "GaussianPosterior",
    "NormalPosterior",
    "PretrainedGaussianPosterior",
    "PretrainedNormalPosterior",
    "Prior",
    "GaussianPrior",
    "NormalPrior",
    "FactoryPrior",
    "BayesianDropout",
    "BayesianDropout1d",
    "BayesianDropout2d",
    "BayesianDropout3d",
    "BayesianAlphaDropout",
    "BayesianFeatureAlphaDropout",
]
