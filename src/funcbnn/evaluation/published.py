"""Published UCI results under the protocol of Hernández-Lobato & Adams 2015 (20 random 90/10 splits).

Each entry is ``(mean, ±)`` exactly as the paper's table prints it, for test
RMSE and test NLL (negative log-likelihood per example, nats) in the targets'
original units.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Published", "PUBLISHED"]


class Published(NamedTuple):
    """One published row: method, source, and (mean, ±) of RMSE and NLL."""

    method: str
    source: str
    rmse: tuple[float, float]
    nll: tuple[float, float]


PUBLISHED: dict[str, list[Published]] = {
    "boston": [
        Published("ensemble", "Lakshminarayanan et al. 2017, Table 1", (3.28, 1.00), (2.41, 0.25)),
        Published("mc_dropout", "Gal & Ghahramani 2016, Table 1", (2.97, 0.85), (2.46, 0.25)),
    ],
    "concrete": [
        Published("ensemble", "Lakshminarayanan et al. 2017, Table 1", (6.03, 0.58), (3.06, 0.18)),
        Published("mc_dropout", "Gal & Ghahramani 2016, Table 1", (5.23, 0.53), (3.04, 0.09)),
    ],
}
"""Published rows per data set; ``method`` names the row of ours they are compared with."""
