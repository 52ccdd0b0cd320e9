"""torchbayesian's Bayesian dropout layers: torch's dropout layers that stay active in eval mode.

They subclass the torch layers, so :func:`funcbnn.mc_dropout.functionalize`
recognises them (``BayesianDropout`` to ``BayesianDropout3d``) and replaces their
masks by seeded ones for batched, reproducible MC dropout.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BayesianDropout",
    "BayesianDropout1d",
    "BayesianDropout2d",
    "BayesianDropout3d",
    "BayesianAlphaDropout",
    "BayesianFeatureAlphaDropout",
]


class BayesianDropout(nn.Dropout):
    """``nn.Dropout`` that also drops in eval mode (MC dropout, Gal & Ghahramani 2016)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout(input, self.p, True, self.inplace)


class BayesianDropout1d(nn.Dropout1d):
    """``nn.Dropout1d`` that also drops in eval mode."""

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout1d(input, self.p, True, self.inplace)


class BayesianDropout2d(nn.Dropout2d):
    """``nn.Dropout2d`` that also drops in eval mode."""

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout2d(input, self.p, True, self.inplace)


class BayesianDropout3d(nn.Dropout3d):
    """``nn.Dropout3d`` that also drops in eval mode."""

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout3d(input, self.p, True, self.inplace)


class BayesianAlphaDropout(nn.AlphaDropout):
    """``nn.AlphaDropout`` that also drops in eval mode."""

    def forward(self, input: Tensor) -> Tensor:
        return F.alpha_dropout(input, self.p, True)


class BayesianFeatureAlphaDropout(nn.FeatureAlphaDropout):
    """``nn.FeatureAlphaDropout`` that also drops in eval mode."""

    def forward(self, input: Tensor) -> Tensor:
        return F.feature_alpha_dropout(input, self.p, True)
