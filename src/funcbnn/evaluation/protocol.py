"""The three scales of the evaluation (``--quick``, default, ``--full``) and each task's network recipe."""

from __future__ import annotations

from typing import NamedTuple

from .methods import Recipe

__all__ = ["Scale", "SCALES", "recipe_for"]


class Scale(NamedTuple):
    """How much of each protocol a run does.

    Attributes
    ----------
    name : str
    uci_splits : int
        Random 90/10 splits per UCI set (the published protocol: 20).
    diabetes_splits : int
    epoch_factor : float
        Multiplies every recipe's epochs (1 = the published 40 on UCI).
    num_samples : int
        Weight samples (or masks) per Monte-Carlo predictive.
    digits_train : int
        Training images of classes 0-4.
    digits_splits, cancer_splits, gap_seeds : int
    shift_noise, shift_rotation : tuple of float
        Pixel-noise std and rotation angles (degrees) of the shifted digits.
    """

    name: str
    uci_splits: int
    diabetes_splits: int
    epoch_factor: float
    num_samples: int
    digits_train: int
    digits_splits: int
    cancer_splits: int
    gap_seeds: int
    shift_noise: tuple[float, ...]
    shift_rotation: tuple[float, ...]


SCALES = {
    "quick": Scale("quick", 1, 1, 0.25, 8, 200, 1, 1, 1, (0.3, 0.6), (30.0, 60.0)),
    "default": Scale("default", 5, 2, 1.0, 32, 300, 1, 2, 2, (0.2, 0.4, 0.6), (20.0, 40.0, 60.0)),
    "full": Scale(
        "full",
        20,
        20,
        1.0,
        100,
        300,
        5,
        10,
        5,
        (0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
        (15.0, 30.0, 45.0, 60.0, 75.0, 90.0),
    ),
}
"""The scales by name."""


_RECIPES = {
    # Hernández-Lobato & Adams 2015: one hidden layer of 50 ReLU units, 40 epochs
    "uci": Recipe(
        hidden=(50,),
        activation="relu",
        epochs=40,
        batch_size=32,
        lr=1e-2,
        weight_decay=1e-4,
        dropout=0.05,
        vi_epochs=80,
        swag_epochs=20,
        swag_lr=1e-2,
        ensemble_lr=1e-2,
    ),
    # a few hundred images so the MAP overfits, as real models do
    "digits": Recipe(
        hidden=(100, 100),
        activation="relu",
        epochs=60,
        batch_size=32,
        lr=3e-3,
        weight_decay=1e-4,
        dropout=0.1,
        vi_epochs=180,
        swag_epochs=20,
        swag_lr=2e-2,
        ensemble_lr=3e-3,
        adversarial=False,
    ),
    "cancer": Recipe(
        hidden=(50,),
        activation="relu",
        epochs=40,
        batch_size=32,
        lr=1e-2,
        weight_decay=1e-4,
        dropout=0.1,
        vi_epochs=120,
        swag_epochs=20,
        swag_lr=1e-2,
        ensemble_lr=1e-2,
        adversarial=False,
    ),
    "gap": Recipe(
        hidden=(50, 50),
        activation="tanh",
        epochs=300,
        batch_size=40,
        lr=1e-2,
        weight_decay=1e-4,
        dropout=0.1,
        vi_epochs=900,
        swag_epochs=100,
        swag_lr=1e-2,
        ensemble_lr=1e-2,
        adversarial=False,
    ),
}


def recipe_for(task: str, scale: Scale) -> Recipe:
    """The recipe of ``task`` (``"uci"``, ``"digits"``, ``"cancer"``, ``"gap"``) at ``scale``."""
    r = _RECIPES[task]

    def scaled(epochs: int) -> int:
        return max(2, round(epochs * scale.epoch_factor))

    return r._replace(
        epochs=scaled(r.epochs),
        vi_epochs=scaled(r.vi_epochs),
        swag_epochs=scaled(r.swag_epochs),
        num_samples=scale.num_samples,
    )
