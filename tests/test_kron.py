"""KFAC curvature (funcbnn.laplace.kron) and the Kronecker algebra of its family
(funcbnn.families.kron_gaussian), against dense brute force in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from funcbnn import functionalize
from funcbnn.families.kron_gaussian import (
    kron_covariance_diag,
    kron_functional_variance,
    kron_logdet,
    kron_precision_dense,
    kron_sample,
)
from funcbnn.laplace.curvature import diag_curvature
from funcbnn.laplace.kron import KronCurvature, kron_curvature, kron_decompose

DT = torch.float64


def _net(*layers: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*layers).to(DT)


def _nll(kind: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed NLL written out independently of funcbnn.likelihoods (Gaussian at sigma 1)."""
    if kind == "categorical":
        return F.cross_entropy(f, y, reduction="sum")
    return 0.5 * (f - y).square().sum()


def _block_jac(jac: dict, w: str, b: str | None, lead: int) -> torch.Tensor:
    jw = jac[w]
    if b is None:
        return jw.reshape(*jw.shape[:lead], -1)
    jw = jw.reshape(*jw.shape[: lead + 1], -1)
    return torch.cat([jw, jac[b][..., None]], -1).reshape(*jw.shape[:lead], -1)


def _dense_block(apply_fn, params, x, y, lik: str, kind: str, w: str, b: str | None) -> torch.Tensor:
    """Exact GGN (J^T H J) or EF (g g^T) of one block, summed over the examples of x, by autograd."""
    total = 0
    for n in range(x.shape[0]):
        xn, yn = x[n : n + 1], y[n : n + 1]
        if kind == "ef":
            g = torch.func.grad(lambda p: _nll(lik, apply_fn({**params, **p}, xn), yn))(params)
            v = _block_jac({k: t[None] for k, t in g.items()}, w, b, 1)[0]
            total = total + torch.outer(v, v)
            continue
        jac = torch.func.jacrev(lambda p: apply_fn({**params, **p}, xn)[0].reshape(-1))(params)
        J = _block_jac(jac, w, b, 1)  # (outputs, P_block)
        f = apply_fn(params, xn)
        H = torch.autograd.functional.hessian(lambda out: _nll(lik, out.reshape(f.shape), yn), f.reshape(-1))
        total = total + J.T @ H @ J
    return total


def _kfac(curv: KronCurvature, key: tuple[str, ...]) -> torch.Tensor:
    blk = curv.blocks[key]
    return torch.kron(blk.G, blk.A / blk.num_rows)


# --- KFAC factors -------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lik,kind", [("categorical", "ggn"), ("gaussian", "ggn"), ("categorical", "ef")])
def test_kfac_block_is_exact_on_one_example_for_linear(bias, lik, kind):
    net = _net(nn.Linear(3, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias))
    apply_fn, params, _ = functionalize(net)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, generator=g, dtype=DT)
    if lik == "categorical":
        y = torch.randint(0, 3, (1,), generator=g)
    else:
        y = torch.randn(1, 3, generator=g, dtype=DT)
    curv, stats = kron_curvature(apply_fn, params, (x, y), lik, kind=kind)
    for layer in ("0", "2"):
        w, b = f"{layer}.weight", (f"{layer}.bias" if bias else None)
        key = (w, b) if bias else (w,)
        exact = _dense_block(apply_fn, params, x, y, lik, kind, w, b)
        torch.testing.assert_close(_kfac(curv, key), exact)
    assert stats.num_data == 1 and not curv.diag


def test_kfac_block_is_exact_on_one_example_for_conv2d_with_one_output_position():
    net = _net(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Tanh(), nn.Linear(3, 4))
    apply_fn, params, _ = functionalize(net)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(1, 2, 3, 3, generator=g, dtype=DT), torch.tensor([2])
    curv, _ = kron_curvature(apply_fn, params, (x, y), "categorical")
    exact = _dense_block(apply_fn, params, x, y, "categorical", "ggn", "0.weight", "0.bias")
    torch.testing.assert_close(_kfac(curv, ("0.weight", "0.bias")), exact)
    assert curv.blocks["0.weight", "0.bias"].A.shape == (2 * 9 + 1, 2 * 9 + 1)


def _output_hessian(lik: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.autograd.functional.hessian(lambda out: _nll(lik, out[None], y[None]), f)


def test_factors_on_many_examples_equal_brute_force_sums_mlp():
    net = _net(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    apply_fn, params, _ = functionalize(net)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(7, 3, generator=g, dtype=DT), torch.randint(0, 4, (7,), generator=g)
    curv, stats = kron_curvature(apply_fn, params, [(x[:4], y[:4]), (x[4:], y[4:])], "categorical")
    W1, b1, W2, b2 = (params[k] for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
    z1 = x @ W1.T + b1
    h = torch.tanh(z1)
    ones = torch.ones(7, 1, dtype=DT)
    A1 = torch.cat([x, ones], 1)
    A2 = torch.cat([h, ones], 1)
    G1 = G2 = 0
    for n in range(7):
        f = torch.tanh(z1[n]) @ W2.T + b2
        H = _output_hessian("categorical", f, y[n])
        J1 = torch.func.jacrev(lambda z: torch.tanh(z) @ W2.T + b2)(z1[n])  # df/dz1
        G1 = G1 + J1.T @ H @ J1
        G2 = G2 + H  # the last layer's output is f itself
    b_1, b_2 = curv.blocks["0.weight", "0.bias"], curv.blocks["2.weight", "2.bias"]
    torch.testing.assert_close(b_1.A, A1.T @ A1)
    torch.testing.assert_close(b_2.A, A2.T @ A2)
    torch.testing.assert_close(b_1.G, G1)
    torch.testing.assert_close(b_2.G, G2)
    assert b_1.num_rows.item() == 7 and stats.num_data == 7
    torch.testing.assert_close(stats.loss, F.cross_entropy(apply_fn(params, x), y, reduction="sum"))


def test_conv_factors_sum_unfolded_patches_and_output_positions():
    net = _net(nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2))
    apply_fn, params, _ = functionalize(net)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(3, 2, 4, 4, generator=g, dtype=DT), torch.randint(0, 2, (3,), generator=g)
    curv, _ = kron_curvature(apply_fn, params, (x, y), "categorical")
    conv, rest = net[0], net[1:]
    A = G = 0
    for n in range(3):
        for i in range(3):
            for j in range(3):
                a = torch.cat([x[n, :, i : i + 2, j : j + 2].reshape(-1), torch.ones(1, dtype=DT)])
                A = A + torch.outer(a, a)
        z = conv(x[n : n + 1])[0]
        H = _output_hessian("categorical", rest(z[None])[0], y[n])
        J = torch.func.jacrev(lambda zz: rest(zz[None])[0])(z)  # (C, O, 3, 3)
        for i in range(3):
            for j in range(3):
                G = G + J[:, :, i, j].T @ H @ J[:, :, i, j]
    blk = curv.blocks["0.weight", "0.bias"]
    torch.testing.assert_close(blk.A, A)
    torch.testing.assert_close(blk.G, G)
    assert blk.num_rows.item() == 3 * 9


def test_linear_on_sequences_sums_over_positions():
    net = _net(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    apply_fn, params, _ = functionalize(net)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(2, 5, 3, generator=g, dtype=DT), torch.randn(2, 5, 2, generator=g, dtype=DT)
    curv, stats = kron_curvature(apply_fn, params, (x, y), "gaussian")
    rows = torch.cat([x.reshape(-1, 3), torch.ones(10, 1, dtype=DT)], 1)
    blk = curv.blocks["0.weight", "0.bias"]
    torch.testing.assert_close(blk.A, rows.T @ rows)
    # Gaussian at sigma 1: H = I, so G = sum over examples and output elements of J^T J.
    z = x @ params["0.weight"].T + params["0.bias"]
    G = 0
    for n in range(2):
        J = torch.func.jacrev(lambda zz: net[1:](zz))(z[n]).reshape(10, 5, 4)  # (outputs, T, hidden)
        G = G + torch.einsum("kti,ktj->ij", J, J)
    torch.testing.assert_close(blk.G, G)
    assert blk.num_rows.item() == 10 and stats.num_outputs == 20


def test_wide_layer_input_factor_is_the_full_gram():
    # d >= 256 takes the blocked symmetric gram.
    apply_fn, params, _ = functionalize(_net(nn.Linear(300, 2)))
    x, y = torch.randn(5, 300, dtype=DT), torch.randint(0, 2, (5,))
    curv, _ = kron_curvature(apply_fn, params, (x, y), "categorical", kind="ef")
    rows = torch.cat([x, torch.ones(5, 1, dtype=DT)], 1)
    torch.testing.assert_close(curv.blocks["0.weight", "0.bias"].A, rows.T @ rows)


class _Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_a_module_called_twice_counts_each_call_as_positions():
    torch.manual_seed(0)
    net = _Reused().to(DT)
    apply_fn, params, _ = functionalize(net)
    x, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,))
    curv, _ = kron_curvature(apply_fn, params, (x, y), "categorical")
    hidden = torch.tanh(net.shared(x)).detach()
    rows = torch.cat([torch.cat([x, hidden]), torch.ones(8, 1, dtype=DT)], 1)
    blk = curv.blocks["shared.weight", "shared.bias"]
    torch.testing.assert_close(blk.A, rows.T @ rows)
    assert blk.num_rows.item() == 8


def test_mc_ggn_factors_approach_exact_ggn():
    apply_fn, params, _ = functionalize(_net(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)))
    g = torch.Generator().manual_seed(5)
    data = (torch.randn(6, 3, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g))
    exact, _ = kron_curvature(apply_fn, params, data, "categorical")
    mc, _ = kron_curvature(apply_fn, params, data, "categorical", kind="mc_ggn", num_mc=800, generator=g)
    for key in exact.blocks:
        err = (mc.blocks[key].G - exact.blocks[key].G).norm() / exact.blocks[key].G.norm()
        assert err < 0.1, (key, err)
        torch.testing.assert_close(mc.blocks[key].A, exact.blocks[key].A)


def test_leaves_outside_linear_and_conv_get_the_diagonal_curvature():
    net = _net(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3))
    apply_fn, params, _ = functionalize(net)
    g = torch.Generator().manual_seed(6)
    data = (torch.randn(9, 3, generator=g, dtype=DT), torch.randint(0, 3, (9,), generator=g))
    curv, stats = kron_curvature(apply_fn, params, data, "categorical")
    assert set(curv.diag) == {"1.weight", "1.bias"}
    assert set(curv.blocks) == {("0.weight", "0.bias"), ("3.weight", "3.bias")}
    ref, _ = diag_curvature(apply_fn, params, data, "categorical", subset=["1.weight", "1.bias"])
    for k in ref:
        torch.testing.assert_close(curv.diag[k], ref[k])
    assert curv.names == ("0.weight", "0.bias", "3.weight", "3.bias", "1.weight", "1.bias")
    assert stats.num_data == 9


def test_separate_bias_blocks_match_the_joint_blocks_diagonal_parts():
    apply_fn, params, _ = functionalize(_net(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)))
    data = (torch.randn(5, 3, dtype=DT), torch.randint(0, 3, (5,)))
    joint, _ = kron_curvature(apply_fn, params, data, "categorical")
    split, _ = kron_curvature(apply_fn, params, data, "categorical", joint_bias=False)
    blk = joint.blocks["0.weight", "0.bias"]
    torch.testing.assert_close(split.blocks["0.weight",].A, blk.A[:-1, :-1])
    torch.testing.assert_close(_kfac(split, ("0.bias",)), blk.G)  # bias block is G exactly


def test_float32_params_give_float32_factors():
    apply_fn, params, _ = functionalize(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    curv, _ = kron_curvature(apply_fn, params, (torch.randn(4, 3), torch.randint(0, 2, (4,))), "categorical")
    assert all(b.A.dtype == b.G.dtype == torch.float32 for b in curv.blocks.values())


# --- posterior algebra --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted():
    """A small mixed model: two Kronecker blocks (one without bias) and two diagonal leaves."""
    net = _net(
        nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2, bias=False), nn.Tanh(), nn.Linear(2, 3)
    )
    apply_fn, params, _ = functionalize(net)
    g = torch.Generator().manual_seed(7)
    data = (torch.randn(12, 3, generator=g, dtype=DT), torch.randint(0, 3, (12,), generator=g))
    curv, _ = kron_curvature(apply_fn, params, data, "categorical")
    return params, curv, kron_decompose(curv)


PRIORS = {
    "scalar": 0.7,
    "per_leaf": {
        "0.weight": 0.5, "0.bias": 3.0, "3.weight": 1.5, "5.weight": 2.0, "5.bias": 0.2,
        "1.weight": 1.1, "1.bias": 0.9,
    },
}


def _explicit(curv: KronCurvature, params, prior, scale: float) -> list[torch.Tensor]:
    """Dense precisions built directly from kron(G, A/M): one per block, then one per diagonal leaf."""
    pp = prior if isinstance(prior, dict) else {k: prior for k in curv.names}
    mats = []
    for key in curv.blocks:
        out = params[key[0]].shape[0]
        d = params[key[0]][0].numel()
        delta = torch.full((out, d), pp[key[0]], dtype=DT)
        if len(key) == 2:
            delta = torch.cat([delta, torch.full((out, 1), pp[key[1]], dtype=DT)], 1)
        mats.append(scale * _kfac(curv, key) + torch.diag(delta.reshape(-1)))
    for k, v in curv.diag.items():
        mats.append(torch.diag(scale * v.reshape(-1) + pp[k]))
    return mats


def _flat(curv: KronCurvature, tree: dict, lead: int = 0) -> torch.Tensor:
    """Leaf tensors (lead axes first) flattened in the block order of each block, then the diagonal leaves."""
    parts = [_block_jac(tree, key[0], key[1] if len(key) == 2 else None, lead) for key in curv.blocks]
    parts += [tree[k].reshape(*tree[k].shape[:lead], -1) for k in curv.diag]
    return torch.cat(parts, -1)


@pytest.mark.parametrize("prior", PRIORS.values(), ids=PRIORS.keys())
def test_decomposed_precision_equals_explicit_kron_plus_prior(fitted, prior):
    params, curv, dec = fitted
    blocks, diag = kron_precision_dense(dec, prior, scale=1.7)
    mats = _explicit(curv, params, prior, 1.7)
    for got, want in zip(list(blocks.values()) + [torch.diag(v.reshape(-1)) for v in diag.values()], mats):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("prior", PRIORS.values(), ids=PRIORS.keys())
def test_logdet_equals_torch_logdet_of_explicit_precision(fitted, prior):
    params, curv, dec = fitted
    want = sum(torch.logdet(m) for m in _explicit(curv, params, prior, 0.6))
    torch.testing.assert_close(kron_logdet(dec, prior, scale=0.6), want)


@pytest.mark.parametrize("prior", PRIORS.values(), ids=PRIORS.keys())
def test_covariance_diag_equals_diag_of_inverse(fitted, prior):
    params, curv, dec = fitted
    want = torch.cat([torch.diagonal(torch.linalg.inv(m)) for m in _explicit(curv, params, prior, 2.0)])
    got = kron_covariance_diag(dec, params, prior, scale=2.0)
    assert list(got) == list(params)  # the order of `like`
    torch.testing.assert_close(_flat(curv, got), want)


@pytest.mark.parametrize("prior", PRIORS.values(), ids=PRIORS.keys())
def test_functional_variance_equals_j_sigma_jt(fitted, prior):
    params, curv, dec = fitted
    g = torch.Generator().manual_seed(8)
    jac = {k: torch.randn(4, 3, *v.shape, generator=g, dtype=DT) for k, v in params.items()}
    cov = torch.block_diag(*[torch.linalg.inv(m) for m in _explicit(curv, params, prior, 1.0)])
    J = _flat(curv, jac, lead=2)
    torch.testing.assert_close(kron_functional_variance(dec, jac, prior), J @ cov @ J.transpose(1, 2))


@pytest.mark.parametrize("prior", PRIORS.values(), ids=PRIORS.keys())
def test_samples_have_the_inverse_precision_as_covariance(fitted, prior):
    params, curv, dec = fitted
    S = 20_000
    draws = kron_sample(dec, params, S, prior, scale=1.3, generator=torch.Generator().manual_seed(9))
    assert {k: v.shape[1:] for k, v in draws.items()} == {k: v.shape for k, v in params.items()}
    centred = _flat(curv, {k: draws[k] - params[k] for k in params}, lead=1)
    cov = torch.block_diag(*[torch.linalg.inv(m) for m in _explicit(curv, params, prior, 1.3)])
    emp = centred.T @ centred / S
    var = torch.diagonal(cov)
    se = ((var[:, None] * var[None, :] + cov.square()) / S).sqrt()  # std error of a Gaussian covariance entry
    assert ((emp - cov).abs() <= 5 * se).all(), ((emp - cov).abs() / se).max()
    assert (centred.mean(0).abs() <= 5 * (var / S).sqrt()).all()


def test_same_generator_gives_same_draws(fitted):
    params, _, dec = fitted
    a = kron_sample(dec, params, 3, PRIORS["per_leaf"], generator=torch.Generator().manual_seed(3))
    b = kron_sample(dec, params, 3, PRIORS["per_leaf"], generator=torch.Generator().manual_seed(3))
    c = kron_sample(dec, params, 3, PRIORS["per_leaf"], generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])


def test_logdet_gradients_in_prior_precision_and_scale_match_finite_differences(fitted):
    params, curv, dec = fitted
    names = curv.names

    def per_leaf(*values):
        *pp, scale = values
        return kron_logdet(dec, dict(zip(names, pp)), scale)

    inputs = [torch.tensor(float(v), dtype=DT, requires_grad=True) for v in PRIORS["per_leaf"].values()]
    by_name = dict(zip(PRIORS["per_leaf"], inputs))
    ordered = [by_name[n] for n in names] + [torch.tensor(0.8, dtype=DT, requires_grad=True)]
    assert torch.autograd.gradcheck(per_leaf, ordered)
    scalar = [torch.tensor(v, dtype=DT, requires_grad=True) for v in (0.4, 1.2)]
    assert torch.autograd.gradcheck(lambda d, s: kron_logdet(dec, d, s), scalar)


def test_covariance_diag_is_differentiable_in_prior_precision(fitted):
    params, _, dec = fitted
    delta = torch.tensor(0.9, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d: kron_covariance_diag(dec, params, d)["0.bias"], [delta])


# --- errors ---------------------------------------------------------------------------------------


def test_non_positive_prior_precision_is_rejected(fitted):
    params, _, dec = fitted
    with pytest.raises(ValueError, match="prior_precision must be finite and positive, got -1"):
        kron_logdet(dec, -1.0)
    bad = {**PRIORS["per_leaf"], "0.bias": 0.0}
    with pytest.raises(ValueError, match=r"prior_precision\['0.bias'\] must be finite and positive"):
        kron_sample(dec, params, 2, bad)
    with pytest.raises(ValueError, match="no value for leaves"):
        kron_covariance_diag(dec, params, {"0.weight": 1.0})
    with pytest.raises(ValueError, match="scale must be finite and positive"):
        kron_logdet(dec, 1.0, scale=0.0)


def test_bad_curvature_inputs_are_rejected():
    apply_fn, params, _ = functionalize(nn.Linear(3, 2))
    data = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    with pytest.raises(ValueError, match="data is empty"):
        kron_curvature(apply_fn, params, [], "categorical")
    with pytest.raises(ValueError, match="kind must be 'ggn', 'ef' or 'mc_ggn', got 'hessian'"):
        kron_curvature(apply_fn, params, data, "categorical", kind="hessian")
    with pytest.raises(TypeError, match="FunctionalModel"):
        kron_curvature(lambda p, x: x, params, data, "categorical")
    with pytest.raises(ValueError, match="not leaves of params"):
        kron_curvature(apply_fn, params, data, "categorical", subset=["nope"])
    with pytest.raises(ValueError, match="Conv2d inputs must be"):
        conv_fn, conv_params, _ = functionalize(nn.Sequential(nn.Conv2d(1, 2, 2), nn.Flatten(0)))
        kron_curvature(conv_fn, conv_params, (torch.randn(1, 3, 3), torch.randn(8)), "gaussian")


def test_a_layer_with_a_frozen_bias_keeps_a_weight_only_kronecker_block():
    from funcbnn.laplace import fit

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    net[2].bias.requires_grad_(False)
    apply_fn, params, _ = functionalize(net)
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 2, (12,))
    la, state = fit(apply_fn, params, [(x, y)], "categorical", structure="kron")
    assert ("2.weight",) in state.curvature.blocks and not state.curvature.diag
