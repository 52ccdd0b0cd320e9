"""Validation-NLL tuning (funcbnn.laplace.validation): it picks what a plain loop over the grid would pick.

The reference recomputes every candidate's predictive from the raw inputs with ``la.predict`` (no shared
linearisation) and scores it with ``F.nll_loss`` or the Gaussian log density written out here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from funcbnn import functionalize
from funcbnn.laplace import fit
from test_laplace import CASE_BY_NAME, _data

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _classifier(structure: str):
    case = CASE_BY_NAME["mlp"]
    apply_fn, params, _ = functionalize(case.build())
    x, y = _data(case, n=24, seed=1)
    la, state = fit(apply_fn, params, [(x[:16], y[:16])], "categorical", structure=structure)
    return la, state, x[16:], y[16:]


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
@pytest.mark.parametrize("link", ["probit", "bridge"])
def test_the_grid_search_picks_the_grid_point_of_lowest_validation_nll(structure, link):
    la, state, xv, yv = _classifier(structure)
    grid = torch.logspace(-2, 2, 9, dtype=DT)
    want = torch.stack(
        [F.nll_loss(la.predict(state, xv, prior_precision=p, link_approx=link).log(), yv) for p in grid]
    )
    tuned, info = la.tune_validation(state, [(xv[:5], yv[:5]), (xv[5:], yv[5:])], grid=grid, link_approx=link)
    torch.testing.assert_close(info.table[:, 0], want, rtol=1e-10, atol=1e-12)
    assert tuned.prior_precision == grid[want.argmin()]
    torch.testing.assert_close(info.nll, want.min())
    same = la.tune(state, method="val_nll", val_data=(xv, yv), grid=grid, link_approx=link)
    assert same.prior_precision == tuned.prior_precision


def test_the_grid_over_temperatures_picks_the_lowest_pair():
    la, state, xv, yv = _classifier("diag")
    grid, temps = torch.logspace(-1, 1, 5, dtype=DT), torch.tensor([0.1, 1.0, 3.0], dtype=DT)
    want = torch.stack(
        [
            torch.stack([F.nll_loss(la.predict(state, xv, prior_precision=p, temperature=t).log(), yv) for t in temps])
            for p in grid
        ]
    )
    tuned, info = la.tune_validation(state, (xv, yv), grid=grid, temperatures=temps, tune_temperature=True)
    torch.testing.assert_close(info.table, want, rtol=1e-10, atol=1e-12)
    i, j = divmod(int(want.argmin()), 3)
    assert tuned.prior_precision == grid[i] and tuned.temperature == temps[j]


def test_regression_is_scored_by_the_gaussian_predictive_nll():
    case = CASE_BY_NAME["linear_on_sequence"]
    apply_fn, params, _ = functionalize(case.build())
    x, y = _data(case, n=12, seed=2)
    la, state = fit(apply_fn, params, [(x[:8], y[:8])], "gaussian", sigma=0.5)
    grid = torch.logspace(-2, 2, 7, dtype=DT)

    def nll(p):
        mean, var = la.predict(state, x[8:], prior_precision=p)
        return (0.5 * ((y[8:] - mean).square() / var + var.log() + math.log(2 * math.pi))).sum() / 4

    want = torch.stack([nll(p) for p in grid])
    tuned, info = la.tune_validation(state, (x[8:], y[8:]), grid=grid)
    torch.testing.assert_close(info.table[:, 0], want, rtol=1e-10, atol=1e-12)
    assert tuned.prior_precision == grid[want.argmin()]


@pytest.mark.parametrize("prior_structure", ["scalar", "layerwise"])
def test_the_gradient_search_lowers_the_validation_nll_and_keeps_its_best_step(prior_structure):
    la, state, xv, yv = _classifier("kron")
    tuned, info = la.tune_validation(
        state, (xv, yv), method="gradient", prior_structure=prior_structure, tune_temperature=True, steps=30
    )
    assert info.table.shape == (31,) and info.nll == info.table.min() and info.nll < info.table[0]
    achieved = F.nll_loss(la.predict(tuned, xv).log(), yv)
    torch.testing.assert_close(achieved, info.nll, rtol=1e-10, atol=1e-12)
    assert tuned.prior_precision.shape == (() if prior_structure == "scalar" else (len(state.mean),))


def test_bad_options_are_refused():
    la, state, xv, yv = _classifier("diag")
    with pytest.raises(ValueError, match="method must be 'grid' or 'gradient'"):
        la.tune_validation(state, (xv, yv), method="bayes")
    with pytest.raises(ValueError, match="grid must hold finite positive values"):
        la.tune_validation(state, (xv, yv), grid=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="needs val_data"):
        la.tune(state, method="val_nll")
    with pytest.raises(ValueError, match="method must be 'marglik' or 'val_nll'"):
        la.tune(state, method="gridsearch")
