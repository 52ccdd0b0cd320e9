"""Subnetwork Laplace (Daxberger et al. 2021): selection rules and the full posterior over the chosen weights.

References: sorting by hand for the selections; the dense GGN of the per-example loop
(``test_laplace.brute_force``) restricted to the chosen rows and columns for the precision;
``torch.autograd.functional.jacobian`` of the model in the chosen weights for the GLM predictive.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import Tensor

from funcbnn import functionalize, sample_outputs, swag
from funcbnn.laplace import Subnetwork, fit, from_state, subnetwork
from test_laplace import CASE_BY_NAME, _data, _flat, assert_rel, brute_force

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup():
    case = CASE_BY_NAME["cnn"]
    net = case.build()
    apply_fn, params, _ = functionalize(net)
    return net, apply_fn, params, _data(case, n=8)


def _global(params: dict[str, Tensor], sub: Subnetwork) -> Tensor:
    """Positions of the chosen weights in the flat parameter vector (leaves in params order)."""
    out, offset = [], 0
    for k, v in params.items():
        if k in sub.indices:
            out.append(sub.indices[k] + offset)
        offset += v.numel()
    return torch.cat(out)


def test_largest_magnitude_takes_the_largest_absolute_weights():
    _, _, params, _ = _setup()
    sub = subnetwork.largest_magnitude(params, 25)
    flat = _flat(params).abs()
    want = torch.sort(torch.argsort(flat, descending=True)[:25]).values
    assert torch.equal(_global(params, sub), want) and sub.size == 25


def _assert_top(values: Tensor, chosen: Tensor, k: int) -> None:
    """``chosen`` holds ``k`` positions whose values are the ``k`` largest (ties may be split either way)."""
    mask = torch.zeros_like(values, dtype=torch.bool)
    mask[chosen] = True
    assert chosen.numel() == k and values[mask].min() >= values[~mask].max()


def test_largest_variance_from_a_diagonal_laplace_and_from_swag():
    _, apply_fn, params, (x, y) = _setup()
    la, state = fit(apply_fn, params, [(x, y)], "categorical", prior_precision=2.0)
    var = la.family.variance(la.posterior(state))
    sub = subnetwork.largest_variance(var, 30)
    by_hand = 1 / _flat(la.precision(state))  # the diagonal posterior's variances
    _assert_top(by_hand, _global(params, sub), 30)
    # The same from the (family, state) pair; and from diagonal SWAG.
    assert torch.equal(_global(params, subnetwork.largest_variance((la.family, la.posterior(state)), 30)),
                       _global(params, sub))
    s = swag.init(params)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        s = swag.update(s, {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=DT) for k, v in params.items()})
    family, q = swag.posterior(s, form="diag")
    swag_var = _flat({k: (s.sq_mean[k] - s.mean[k].square()).clamp_min(1e-30) for k in params}) * 0.5
    _assert_top(swag_var, _global(params, subnetwork.largest_variance((family, q), 30)), 30)


def test_from_masks_and_top_k_agree():
    _, _, params, _ = _setup()
    masks = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in params.items()}
    masks["0.weight"].view(-1)[[3, 1, 7]] = True
    masks["5.bias"][2] = True
    sub = subnetwork.from_masks(masks)
    assert sub.indices["0.weight"].tolist() == [1, 3, 7] and sub.indices["5.bias"].tolist() == [2]


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_the_subnetwork_precision_is_the_chosen_block_of_the_full_ggn(structure):
    net, apply_fn, params, (x, y) = _setup()
    sub = subnetwork.largest_magnitude(params, 40)
    pp = 1.5
    la, state = fit(apply_fn, params, [(x[:5], y[:5]), (x[5:], y[5:])], "categorical", subset=sub,
                    structure=structure, prior_precision=pp)
    idx = _global(params, sub)
    block = brute_force(net, x, y, "categorical", "ggn")[idx[:, None], idx[None, :]] + pp * torch.eye(40, dtype=DT)
    got = la.precision(state)
    if structure == "full":
        assert_rel(got, block)
        theta = _flat(params)[idx]
        want = -state.loss - 0.5 * (torch.logdet(block) - 40 * math.log(pp) + pp * theta.square().sum())
        assert_rel(la.log_marglik(state), want, 1e-10)
    else:
        assert_rel(_flat(got), torch.diagonal(block))
    assert {k: v.shape for k, v in state.mean.items()} == {k: (i.numel(),) for k, i in sub.indices.items() if i.numel()}


def test_the_subnetwork_glm_predictive_and_samples_move_only_the_chosen_weights():
    net, apply_fn, params, (x, y) = _setup()
    sub = subnetwork.largest_magnitude(params, 30)
    la, state = fit(apply_fn, params, [(x, y)], "categorical", subset=sub, structure="full", prior_precision=3.0)
    idx = _global(params, sub)
    theta = _flat(params)
    shapes = {k: v.shape for k, v in params.items()}

    def f_of(chosen: Tensor, xi: Tensor) -> Tensor:
        full = theta.index_put((idx,), chosen)
        tree, start = {}, 0
        for k, shp in shapes.items():
            n = math.prod(shp)
            tree[k] = full[start : start + n].reshape(shp)
            start += n
        return apply_fn(tree, xi[None])[0]

    cov_w = torch.linalg.inv(la.precision(state))
    jac = torch.stack([torch.autograd.functional.jacobian(lambda c: f_of(c, xi), theta[idx]) for xi in x])
    _, cov = la.output_covariance(state, x)
    assert_rel(cov, jac @ cov_w @ jac.transpose(1, 2), 1e-10)
    draws = la.sample(state, 3, generator=torch.Generator().manual_seed(0))
    outs = sample_outputs(la.apply_fn, draws, x)
    for s in range(3):
        chosen = torch.cat([draws[k][s] for k in state.mean])
        assert_rel(outs[s], torch.stack([f_of(chosen, xi) for xi in x]), 1e-12)


def test_a_saved_subnetwork_state_rebuilds_the_same_predictive():
    _, apply_fn, params, (x, y) = _setup()
    sub = subnetwork.largest_magnitude(params, 20)
    la, state = fit(apply_fn, params, [(x, y)], "categorical", subset=sub, structure="full", prior_mean=0.1,
                    temperature=0.5)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)  # weights_only: indices, prior mean and temperature are plain tensors
    again = from_state(apply_fn, params, loaded)
    assert torch.equal(again.predict(loaded, x), la.predict(state, x))
    assert torch.equal(again.log_marglik(loaded), la.log_marglik(state))


def test_bad_subnetworks_are_refused():
    _, apply_fn, params, (x, y) = _setup()
    with pytest.raises(ValueError, match="Subnetwork takes structure='full'"):
        fit(apply_fn, params, [(x, y)], "categorical", subset=subnetwork.largest_magnitude(params, 5), structure="kron")
    with pytest.raises(ValueError, match="must be unique and lie in"):
        fit(apply_fn, params, [(x, y)], "categorical", subset=Subnetwork({"0.weight": torch.tensor([0, 999])}))
    with pytest.raises(ValueError, match="not leaves of params"):
        fit(apply_fn, params, [(x, y)], "categorical", subset=Subnetwork({"nope": torch.tensor([0])}))
    with pytest.raises(ValueError, match="exceeds the"):
        subnetwork.largest_magnitude(params, 10**6)
    with pytest.raises(ValueError, match="negative"):
        subnetwork.largest_variance({"w": torch.tensor([1.0, -1.0])}, 1)
