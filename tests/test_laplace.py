"""Laplace curvature and posterior against references that share no code with them.

The references are a plain per-example loop of ``torch.autograd.grad`` on the
``nn.Module`` itself, ``torch.func.jacrev`` on the whole batch,
``torch.autograd.functional.hessian`` and closed-form Bayesian linear
regression. Everything numeric runs in float64.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_cnn, make_mlp
from funcbnn import functionalize
from funcbnn.laplace import dense_curvature, diag_curvature, fit

DT = torch.float64


# --- references ------------------------------------------------------------------------------


def _nll(lik: str, f: Tensor, y: Tensor, sigma: float = 1.0) -> Tensor:
    """One example's NLL, written out independently of funcbnn.likelihoods."""
    if lik == "categorical":
        return -torch.log_softmax(f, -1)[y]
    if lik == "gaussian":
        return (0.5 * ((f - y) / sigma) ** 2 + math.log(sigma) + 0.5 * math.log(2 * math.pi)).sum()
    if lik == "bernoulli":
        return (F.softplus(f) - y * f).sum()
    mean, log_var = f.chunk(2, -1)
    return (0.5 * (y - mean) ** 2 * torch.exp(-log_var) + 0.5 * log_var).sum()


def _output_curvature(lik: str, f: Tensor, y: Tensor, sigma: float = 1.0) -> Tensor:
    """``H_n``: the NLL's Hessian in the outputs (the Fisher for the heteroscedastic model,
    whose Hessian is not PSD), flattened to ``(O, O)``."""
    o = f.numel()
    if lik == "heteroscedastic_gaussian":
        _, log_var = f.chunk(2, -1)
        return torch.diag(torch.cat([torch.exp(-log_var), torch.full_like(log_var, 0.5)], -1).reshape(o))
    return torch.autograd.functional.hessian(lambda g: _nll(lik, g, y, sigma), f).reshape(o, o)


def brute_force(module: nn.Module, x: Tensor, y: Tensor, lik: str, kind: str, sigma: float = 1.0) -> Tensor:
    """Dense ``sum_n g_n g_n^T`` (ef) or ``sum_n J_n^T H_n J_n`` (ggn) over the module's trainable
    parameters, one example and one output at a time."""
    params = [p for p in module.parameters() if p.requires_grad]

    def flat_grad(out: Tensor) -> Tensor:
        gs = torch.autograd.grad(out, params, retain_graph=True, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, params)])

    total = 0
    for n in range(x.shape[0]):
        f = module(x[n : n + 1])[0]
        if kind == "ef":
            g = flat_grad(_nll(lik, f, y[n], sigma))
            total = total + torch.outer(g, g)
        else:
            jac = torch.stack([flat_grad(fo) for fo in f.reshape(-1)])
            total = total + jac.T @ _output_curvature(lik, f.detach(), y[n], sigma) @ jac
    return total


def _flat(tree: dict[str, Tensor]) -> Tensor:
    return torch.cat([v.reshape(-1) for v in tree.values()])


def _unflat(vec: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, start = {}, 0
    for k, v in like.items():
        out[k] = vec[start : start + v.numel()].reshape(v.shape)
        start += v.numel()
    return out


def assert_rel(got: Tensor, want: Tensor, tol: float = 1e-6) -> None:
    """Max error relative to the reference's largest entry (entries may be exactly 0)."""
    assert got.shape == want.shape
    scale = want.abs().max().clamp_min(1e-300)
    err = ((got - want).abs().max() / scale).item()
    assert err < tol, f"relative error {err:.3g}"


# --- models with known curvature -------------------------------------------------------------


class Case(NamedTuple):
    name: str
    build: Callable[[], nn.Module]
    x_shape: tuple[int, ...]
    out_shape: tuple[int, ...]  # per example, for regression targets; (C,) for classification
    lik: str
    structured: bool  # can method="structured" take every leaf?


def _seq(*mods: nn.Module) -> nn.Module:
    return nn.Sequential(*mods).double()


def _frozen_mlp() -> nn.Module:
    net = make_mlp((4, 6, 5, 3)).double()
    net[0].requires_grad_(False)
    return net


def _frozen_weight_only() -> nn.Module:
    # A Linear with a frozen weight but a trainable bias: the bias must take the generic engine.
    net = make_mlp((4, 6, 3)).double()
    net[2].weight.requires_grad_(False)
    return net


def _reused_layer() -> nn.Module:
    # The same Linear called twice: its weight has one name but two uses per forward.
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    return _seq(nn.Linear(3, 4), nn.Tanh(), shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(4, 2))


def _manual_seed(builder: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return builder()

    return build


CASES = [
    Case("mlp", lambda: make_mlp().double(), (4,), (3,), "categorical", True),
    Case("cnn", lambda: make_cnn().double(), (1, 6, 6), (3,), "categorical", True),
    Case(
        "strided_dilated_conv2d_multi_output",
        _manual_seed(
            lambda: _seq(
                nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, dilation=2),
                nn.Flatten(), nn.Linear(8, 2),
            )
        ),
        (2, 7, 7), (2,), "gaussian", True,
    ),
    Case(
        "conv1d",
        _manual_seed(
            lambda: _seq(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 3, 3, stride=2), nn.Flatten(),
                         nn.Linear(12, 3))
        ),
        (2, 9), (3,), "categorical", True,
    ),
    Case(
        "linear_on_sequence",
        _manual_seed(lambda: _seq(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))),
        (4, 3), (4, 2), "gaussian", True,
    ),
    Case(
        "heteroscedastic_sequence",
        _manual_seed(lambda: _seq(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))),
        (3, 3), (3, 2), "heteroscedastic_gaussian", True,
    ),
    Case(
        "layernorm",
        _manual_seed(lambda: _seq(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))),
        (4,), (3,), "categorical", False,
    ),
    Case("frozen_first_layer", _frozen_mlp, (4,), (3,), "categorical", True),
    Case("frozen_weight_only", _frozen_weight_only, (4,), (3,), "categorical", False),
    Case("bernoulli", _manual_seed(lambda: _seq(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))), (4,), (1,),
         "bernoulli", True),
    Case("reused_layer", _reused_layer, (3,), (2,), "categorical", True),
]
CASE_BY_NAME = {c.name: c for c in CASES}
N = 8


def _data(case: Case, n: int = N, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *case.x_shape, generator=g, dtype=DT)
    if case.lik == "categorical":
        y = torch.randint(0, case.out_shape[-1], (n,), generator=g)
    elif case.lik == "bernoulli":
        y = torch.randint(0, 2, (n, *case.out_shape), generator=g).to(DT)
    else:
        y = torch.randn(n, *case.out_shape, generator=g, dtype=DT)
    return x, y


@functools.cache
def _reference(name: str, kind: str) -> Tensor:
    case = CASE_BY_NAME[name]
    return brute_force(case.build(), *_data(case), case.lik, kind)


def _methods(case: Case) -> list[str]:
    # "auto" differs from "structured" only where some leaves fall back to the generic engine.
    if not case.structured:
        return ["generic", "auto"]
    return ["structured", "generic"] + (["auto"] if case.name == "frozen_first_layer" else [])


@pytest.mark.parametrize(
    "name,method",
    [(c.name, m) for c in CASES for m in _methods(c)],
)
@pytest.mark.parametrize("kind", ["ef", "ggn"])
def test_diag_curvature_equals_the_per_example_autograd_loop(name, method, kind):
    case = CASE_BY_NAME[name]
    apply_fn, params, _ = functionalize(case.build())
    x, y = _data(case)
    # Two unequal batches: the curvature is a sum over examples, whatever the batching.
    diag, stats = diag_curvature(
        apply_fn, params, [(x[:5], y[:5]), (x[5:], y[5:])], case.lik, kind=kind, method=method, chunk_size=4
    )
    assert list(diag) == list(params)
    assert_rel(_flat(diag), torch.diagonal(_reference(name, kind)))
    assert stats.num_data == N


def test_frozen_leaves_are_absent_and_the_module_is_untouched():
    net = _frozen_mlp()
    frozen_before = net[0].weight.detach().clone()
    apply_fn, params, _ = functionalize(net)
    diag, _ = diag_curvature(apply_fn, params, [_data(CASE_BY_NAME["frozen_first_layer"])], "categorical")
    assert "0.weight" not in diag and "0.bias" not in diag
    assert set(diag) == {"2.weight", "2.bias", "4.weight", "4.bias"}
    assert torch.equal(net[0].weight, frozen_before) and torch.equal(apply_fn.frozen["0.weight"], frozen_before)
    assert all(not hasattr(m, "_forward_hooks") or not m._forward_hooks for m in net.modules())


def test_structured_method_names_the_leaves_it_cannot_take():
    case = CASE_BY_NAME["layernorm"]
    apply_fn, params, _ = functionalize(case.build())
    with pytest.raises(ValueError, match=r"cannot handle leaves \['1.bias', '1.weight'\]"):
        diag_curvature(apply_fn, params, [_data(case)], case.lik, method="structured")


@pytest.mark.parametrize("name", ["mlp", "linear_on_sequence", "layernorm", "bernoulli", "heteroscedastic_sequence"])
@pytest.mark.parametrize("kind", ["ef", "ggn"])
def test_dense_curvature_equals_the_per_example_autograd_loop(name, kind):
    case = CASE_BY_NAME[name]
    apply_fn, params, _ = functionalize(case.build())
    x, y = _data(case)
    dense, stats = dense_curvature(apply_fn, params, [(x[:7], y[:7]), (x[7:], y[7:])], case.lik, kind=kind,
                                   chunk_size=3)
    assert_rel(dense, _reference(name, kind))
    assert stats.num_data == N


def test_dense_curvature_of_a_subset_is_that_block_in_subset_order():
    case = CASE_BY_NAME["mlp"]
    apply_fn, params, _ = functionalize(case.build())
    full = _reference("mlp", "ggn")
    names = ["2.bias", "0.weight"]  # given out of order: the result follows params' order
    block, _ = dense_curvature(apply_fn, params, [_data(case)], case.lik, subset=names)
    offsets, start = {}, 0
    for k, v in params.items():
        offsets[k] = torch.arange(start, start + v.numel())
        start += v.numel()
    idx = torch.cat([offsets["0.weight"], offsets["2.bias"]])
    assert_rel(block, full[idx][:, idx])


@pytest.mark.parametrize("lik", ["categorical", "gaussian"])
def test_exact_ggn_equals_jT_H_J_from_jacrev(lik):
    torch.manual_seed(2)
    apply_fn, params, _ = functionalize(_seq(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (10,), generator=g) if lik == "categorical" else torch.randn(10, 3, generator=g, dtype=DT)
    theta = _flat(params)
    jac = torch.func.jacrev(lambda v: apply_fn(_unflat(v, params), x))(theta)  # (N, O, P)
    if lik == "categorical":
        p = apply_fn(params, x).softmax(-1)
        h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        h = torch.eye(3, dtype=DT).expand(10, 3, 3)
    want = torch.einsum("nop,noq,nqr->pr", jac, h, jac)
    dense, _ = dense_curvature(apply_fn, params, [(x, y)], lik)
    assert_rel(dense, want)
    for method in ("structured", "generic"):
        diag, _ = diag_curvature(apply_fn, params, [(x, y)], lik, method=method)
        assert_rel(_flat(diag), torch.diagonal(want))


@pytest.mark.parametrize("lik", ["categorical", "gaussian"])
def test_sum_convention_ggn_of_a_linear_model_is_n_times_the_mean_loss_hessian(lik):
    # funcbnn has no loss-reduction argument: the curvature is always the per-example sum. For a
    # model linear in its weights the GGN is the exact Hessian, so it must equal the Hessian of
    # the summed NLL, which is N times the Hessian of the batch-mean NLL.
    torch.manual_seed(4)
    apply_fn, params, _ = functionalize(nn.Linear(3, 2).double())
    g = torch.Generator().manual_seed(0)
    n = 9
    x = torch.randn(n, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (n,), generator=g) if lik == "categorical" else torch.randn(n, 2, generator=g, dtype=DT)

    def loss(v: Tensor, reduction: str) -> Tensor:
        per_example = torch.stack([_nll(lik, f, yn) for f, yn in zip(apply_fn(_unflat(v, params), x), y)])
        return per_example.sum() if reduction == "sum" else per_example.mean()

    theta = _flat(params)
    h_sum = torch.autograd.functional.hessian(lambda v: loss(v, "sum"), theta)
    h_mean = torch.autograd.functional.hessian(lambda v: loss(v, "mean"), theta)
    dense, _ = dense_curvature(apply_fn, params, [(x[:4], y[:4]), (x[4:], y[4:])], lik)
    assert_rel(dense, h_sum)
    assert_rel(dense, n * h_mean)
    diag, _ = diag_curvature(apply_fn, params, [(x, y)], lik)
    assert_rel(_flat(diag), n * torch.diagonal(h_mean))


# --- sampled-label GGN -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "strided_dilated_conv2d_multi_output"])
def test_mc_ggn_averages_to_the_exact_ggn(name):
    case = CASE_BY_NAME[name]
    apply_fn, params, _ = functionalize(case.build())
    data = [_data(case)]
    exact = torch.diagonal(_reference(name, "ggn"))
    g = torch.Generator().manual_seed(0)
    runs = torch.stack([
        _flat(diag_curvature(apply_fn, params, data, case.lik, kind="mc_ggn", num_mc=8, generator=g)[0])
        for _ in range(16)
    ])
    mean, se = runs.mean(0), runs.std(0) / math.sqrt(runs.shape[0])
    z = (mean - exact).abs() / (se + 1e-12 * exact.abs().max())
    assert z.max() < 5, f"max z-score {z.max():.2f}"
    # The test can fail: a 10% error in the GGN would be far outside the standard error.
    assert ((1.1 * mean - exact).abs() / (se + 1e-12)).max() > 5


def test_mc_ggn_draws_the_same_labels_in_both_engines():
    # With one chunk per batch, both engines draw num_mc label sets per batch in the same order
    # (the docstring of diag_curvature states this), so the same seed gives the same numbers.
    case = CASE_BY_NAME["mlp"]
    apply_fn, params, _ = functionalize(case.build())
    data = [_data(case)]
    kw = dict(kind="mc_ggn", num_mc=3, chunk_size=N)
    structured, _ = diag_curvature(apply_fn, params, data, case.lik, method="structured",
                                   generator=torch.Generator().manual_seed(5), **kw)
    generic, _ = diag_curvature(apply_fn, params, data, case.lik, method="generic",
                                generator=torch.Generator().manual_seed(5), **kw)
    dense, _ = dense_curvature(apply_fn, params, data, case.lik, generator=torch.Generator().manual_seed(5), **kw)
    assert_rel(_flat(generic), _flat(structured), 1e-10)
    assert_rel(torch.diagonal(dense), _flat(structured), 1e-10)
    other, _ = diag_curvature(apply_fn, params, data, case.lik, method="structured",
                              generator=torch.Generator().manual_seed(6), **kw)
    assert not torch.allclose(_flat(other), _flat(structured))


@settings(max_examples=12)
@given(
    widths=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    n=st.integers(1, 7),
    lik=st.sampled_from(["categorical", "gaussian"]),
    seed=st.integers(0, 1000),
)
def test_structured_equals_generic_diag_ef_on_random_mlps(widths, n, lik, seed):
    apply_fn, params, _ = functionalize(make_mlp(tuple(widths), seed=seed).double())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, widths[0], generator=g, dtype=DT)
    y = (torch.randint(0, widths[-1], (n,), generator=g) if lik == "categorical"
         else torch.randn(n, widths[-1], generator=g, dtype=DT))
    a, _ = diag_curvature(apply_fn, params, [(x, y)], lik, kind="ef", method="structured")
    b, _ = diag_curvature(apply_fn, params, [(x, y)], lik, kind="ef", method="generic", chunk_size=3)
    torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-9, atol=1e-12)


# --- the posterior: noise scaling and Bayesian linear regression -----------------------------


@pytest.mark.parametrize("kind", ["ggn", "ef"])
@pytest.mark.parametrize("structure", ["diag", "full"])
def test_precision_at_noise_sigma_matches_the_reference_at_that_sigma(kind, structure):
    case = CASE_BY_NAME["linear_on_sequence"]
    net = case.build()
    apply_fn, params, _ = functionalize(net)
    x, y = _data(case)
    sigma, pp = 0.5, 3.0
    la, state = fit(apply_fn, params, [(x, y)], "gaussian", structure=structure, curvature=kind,
                    prior_precision=pp, sigma=sigma)
    want = brute_force(net, x, y, "gaussian", kind, sigma=sigma) + pp * torch.eye(_flat(params).numel(), dtype=DT)
    prec = la.precision(state)
    if structure == "diag":
        assert_rel(_flat(prec), torch.diagonal(want))
    else:
        assert_rel(prec, want)


def test_fit_takes_the_noise_std_of_a_gaussian_likelihood_object():
    from funcbnn.likelihoods import gaussian

    case = CASE_BY_NAME["linear_on_sequence"]
    apply_fn, params, _ = functionalize(case.build())
    la, state = fit(apply_fn, params, [_data(case)], gaussian(sigma=0.5))
    _, by_arg = fit(apply_fn, params, [_data(case)], "gaussian", sigma=0.5)
    assert state.sigma.item() == 0.5
    assert_rel(_flat(la.precision(state)), _flat(la.precision(by_arg)), 1e-12)


def _feature_net(frozen: bool) -> nn.Module:
    torch.manual_seed(3)
    net = _seq(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1))
    if frozen:
        net[0].requires_grad_(False)
    return net


def _blr_problem(frozen: bool, sigma: float = 0.3, pp: float = 2.0, n: int = 40):
    """Fixed tanh features, a trainable Linear head at its closed-form MAP."""
    net = _feature_net(frozen)
    apply_fn, params, _ = functionalize(net)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 2, generator=g, dtype=DT)
    y = torch.sin(2 * x[:, :1]) + sigma * torch.randn(n, 1, generator=g, dtype=DT)
    with torch.no_grad():
        phi = torch.cat([torch.tanh(net[0](x)), torch.ones(n, 1, dtype=DT)], 1)
    precision = phi.T @ phi / sigma**2 + pp * torch.eye(7, dtype=DT)
    theta = torch.linalg.solve(precision, phi.T @ y[:, 0] / sigma**2)
    params = {**params, "2.weight": theta[:6].reshape(1, 6), "2.bias": theta[6:]}
    return apply_fn, params, net, x, y, phi, precision, theta


@pytest.mark.parametrize("frozen", [False, True], ids=["subset_last_layer", "frozen_features"])
def test_last_layer_full_laplace_is_bayesian_linear_regression(frozen):
    sigma, pp = 0.3, 2.0
    apply_fn, params, net, x, y, phi, precision, theta = _blr_problem(frozen, sigma, pp)
    subset = "all" if frozen else "last_layer"
    la, state = fit(apply_fn, params, [(x, y)], "gaussian", subset=subset, structure="full", prior_precision=pp,
                    sigma=sigma)
    assert la.names == ("2.weight", "2.bias")
    assert_rel(la.precision(state), precision, 1e-10)
    assert_rel(torch.cat([state.mean["2.weight"].reshape(-1), state.mean["2.bias"]]), theta, 1e-12)
    # At the MAP of a linear-Gaussian model the Laplace evidence is exact.
    n = x.shape[0]
    evidence = torch.distributions.MultivariateNormal(
        torch.zeros(n, dtype=DT), covariance_matrix=sigma**2 * torch.eye(n, dtype=DT) + phi @ phi.T / pp
    ).log_prob(y[:, 0])
    assert_rel(la.log_marglik(state), evidence, 1e-10)
    # GLM predictive: phi^T theta and phi^T Sigma phi + sigma^2.
    x_new = torch.randn(5, 2, generator=torch.Generator().manual_seed(9), dtype=DT)
    with torch.no_grad():
        phi_new = torch.cat([torch.tanh(net[0](x_new)), torch.ones(5, 1, dtype=DT)], 1)
    mean, var = la.predict(state, x_new)
    assert mean.shape == var.shape == (5, 1)
    assert_rel(mean[:, 0], phi_new @ theta, 1e-10)
    cov = torch.linalg.inv(precision)
    assert_rel(var[:, 0], torch.einsum("np,pq,nq->n", phi_new, cov, phi_new) + sigma**2, 1e-10)


def test_last_layer_diag_laplace_keeps_the_blr_precision_diagonal():
    sigma, pp = 0.3, 2.0
    apply_fn, params, net, x, y, phi, precision, theta = _blr_problem(False, sigma, pp)
    la, state = fit(apply_fn, params, [(x, y)], "gaussian", subset="last_layer", prior_precision=pp, sigma=sigma)
    diag = torch.diagonal(precision)
    assert_rel(_flat(la.precision(state)), diag, 1e-10)
    x_new = torch.randn(5, 2, generator=torch.Generator().manual_seed(9), dtype=DT)
    with torch.no_grad():
        phi_new = torch.cat([torch.tanh(net[0](x_new)), torch.ones(5, 1, dtype=DT)], 1)
    _, var = la.predict(state, x_new)
    assert_rel(var[:, 0], (phi_new.square() / diag).sum(1) + sigma**2, 1e-10)


@pytest.mark.parametrize("structure", ["diag", "full"])
@pytest.mark.parametrize("per_leaf", [False, True])
def test_log_marglik_gradients_match_central_differences(structure, per_leaf):
    case = CASE_BY_NAME["linear_on_sequence"]
    apply_fn, params, _ = functionalize(case.build())
    la, state = fit(apply_fn, params, [_data(case)], "gaussian", structure=structure)
    pp0 = torch.tensor([0.7, 1.9, 3.1, 0.4], dtype=DT) if per_leaf else torch.tensor(1.3, dtype=DT)
    sd0 = torch.tensor(0.6, dtype=DT)
    pp, sd = pp0.clone().requires_grad_(True), sd0.clone().requires_grad_(True)
    grad_pp, grad_sd = torch.autograd.grad(la.log_marglik(state, pp, sd), (pp, sd))

    def central(f: Callable[[Tensor], Tensor], v: Tensor) -> Tensor:
        out = torch.empty_like(v).reshape(-1)
        for i in range(out.numel()):
            h = 1e-6 * v.reshape(-1)[i]
            step = torch.zeros_like(v).reshape(-1)
            step[i] = h
            out[i] = (f(v + step.reshape(v.shape)) - f(v - step.reshape(v.shape))) / (2 * h)
        return out.reshape(v.shape)

    with torch.no_grad():
        fd_pp = central(lambda v: la.log_marglik(state, v, sd0), pp0)
        fd_sd = central(lambda v: la.log_marglik(state, pp0, v), sd0)
    torch.testing.assert_close(grad_pp, fd_pp, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad_sd, fd_sd, rtol=1e-6, atol=1e-8)


def test_log_marglik_gradient_in_prior_precision_for_classification():
    case = CASE_BY_NAME["mlp"]
    apply_fn, params, _ = functionalize(case.build())
    la, state = fit(apply_fn, params, [_data(case)], "categorical", subset="last_layer", structure="full")
    pp = torch.tensor(0.8, dtype=DT, requires_grad=True)
    (grad,) = torch.autograd.grad(la.log_marglik(state, pp), pp)
    with torch.no_grad():
        h = 1e-6
        fd = (la.log_marglik(state, pp + h) - la.log_marglik(state, pp - h)) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)


def _noisy_linear_data(n: int = 64, noise: float = 0.2):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, 3, generator=g, dtype=DT)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=DT) + 0.3 + noise * torch.randn(n, 1, generator=g, dtype=DT)
    x1 = torch.cat([x, torch.ones(n, 1, dtype=DT)], 1)
    theta = torch.linalg.lstsq(x1, y).solution
    torch.manual_seed(0)
    apply_fn, _, _ = functionalize(nn.Linear(3, 1).double())
    return apply_fn, {"weight": theta[:3].T.contiguous(), "bias": theta[3]}, x, y


def test_tune_recovers_the_noise_std_and_maximises_the_marginal_likelihood():
    apply_fn, params, x, y = _noisy_linear_data()
    la, state = fit(apply_fn, params, [(x, y)], "gaussian", structure="full")
    tuned = la.tune(state)
    # The ML noise estimate from 64 points has a relative standard error of about 1/sqrt(128).
    assert abs(tuned.sigma.item() - 0.2) < 0.05
    assert tuned.prior_precision.dim() == 0
    assert math.isfinite(tuned.prior_precision.item()) and tuned.prior_precision.item() > 0
    # A second optimiser started elsewhere must not find a better point.
    log_h = torch.tensor([0.0, 0.0], dtype=DT, requires_grad=True)
    opt = torch.optim.LBFGS([log_h], max_iter=25, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -la.log_marglik(state, log_h[0].exp(), log_h[1].exp())
        loss.backward()
        return loss

    opt.step(closure)
    best = la.log_marglik(state, log_h[0].exp().detach(), log_h[1].exp().detach())
    assert la.log_marglik(tuned) > la.log_marglik(state)
    assert la.log_marglik(tuned) > best - 1e-3


def test_per_leaf_tuning_gives_one_positive_precision_per_leaf():
    apply_fn, params, x, y = _noisy_linear_data()
    la, state = fit(apply_fn, params, [(x, y)], "gaussian")
    tuned = la.tune(state, per_leaf=True, steps=100)
    assert tuned.prior_precision.shape == (2,)
    assert bool((torch.isfinite(tuned.prior_precision) & (tuned.prior_precision > 0)).all())
    # One precision per leaf can only do better than one shared by both leaves.
    assert la.log_marglik(tuned) >= la.log_marglik(la.tune(state, steps=100)) - 1e-3
    # Classification keeps sigma at 1.
    case = CASE_BY_NAME["mlp"]
    apply_fn, params, _ = functionalize(case.build())
    la, state = fit(apply_fn, params, [_data(case)], "categorical")
    tuned = la.tune(state, per_leaf=True, steps=20)
    assert tuned.prior_precision.shape == (4,) and tuned.sigma.item() == 1.0


# --- sampling, KL ----------------------------------------------------------------------------


def _classifier_state(structure: str, subset="last_layer"):
    case = CASE_BY_NAME["mlp"]
    apply_fn, params, _ = functionalize(case.build())
    return fit(apply_fn, params, [_data(case, n=32)], "categorical", subset=subset, structure=structure,
               prior_precision=0.5)


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_sample_moments_match_the_state(structure):
    la, state = _classifier_state(structure)
    s = 4000
    draws = la.sample(state, s, generator=torch.Generator().manual_seed(0))
    for k, v in state.mean.items():
        assert draws[k].shape == (s, *v.shape) and draws[k].dtype == DT
    flat = torch.cat([draws[k].reshape(s, -1) for k in la.names], 1)
    mu = torch.cat([state.mean[k].reshape(-1) for k in la.names])
    prec = la.precision(state)
    cov = torch.diag(1 / _flat(prec)) if structure == "diag" else torch.linalg.inv(prec)
    var = torch.diagonal(cov)
    z_mean = (flat.mean(0) - mu).abs() / (var / s).sqrt()
    assert z_mean.max() < 5
    centred = flat - mu
    emp = centred.T @ centred / s
    se = ((var[:, None] * var[None, :] + cov.square()) / s).sqrt()
    assert ((emp - cov).abs() / se).max() < 5


def test_same_generator_gives_the_same_draws():
    for structure in ("diag", "full"):
        la, state = _classifier_state(structure)
        a = la.sample(state, 3, generator=torch.Generator().manual_seed(1))
        b = la.sample(state, 3, generator=torch.Generator().manual_seed(1))
        c = la.sample(state, 3, generator=torch.Generator().manual_seed(2))
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not torch.equal(a["2.weight"], c["2.weight"])


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_kl_equals_torch_distributions(structure):
    la, state = _classifier_state(structure)
    mu = _flat(state.mean)
    prec = la.precision(state)
    prec = torch.diag(_flat(prec)) if structure == "diag" else prec
    q = torch.distributions.MultivariateNormal(mu, precision_matrix=prec)
    p = torch.distributions.MultivariateNormal(torch.zeros_like(mu), covariance_matrix=2.0 * torch.eye(mu.numel(), dtype=DT))
    assert_rel(la.kl(state), torch.distributions.kl_divergence(q, p), 1e-10)


# --- prediction ------------------------------------------------------------------------------


@pytest.mark.parametrize("structure,subset", [("diag", "all"), ("full", "last_layer")])
@pytest.mark.parametrize(
    "pred_type,link", [("glm", "probit"), ("glm", "bridge"), ("glm", "mc"), ("nn", "probit")]
)
def test_classification_predictive_is_a_distribution(structure, subset, pred_type, link):
    la, state = _classifier_state(structure, subset)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=DT)
    probs = la.predict(state, x, pred_type=pred_type, link_approx=link, num_samples=50,
                       generator=torch.Generator().manual_seed(0))
    assert probs.shape == (6, 3) and probs.dtype == DT
    assert bool((probs >= 0).all())
    torch.testing.assert_close(probs.sum(-1), torch.ones(6, dtype=DT))


@pytest.mark.parametrize("link", ["probit", "mc"])
def test_bernoulli_predictive_has_the_output_shape(link):
    torch.manual_seed(0)
    net = _seq(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0))  # logits of shape (N,)
    apply_fn, params, _ = functionalize(net)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 3, generator=g, dtype=DT), torch.randint(0, 2, (20,), generator=g).to(DT)
    la, state = fit(apply_fn, params, [(x, y)], "bernoulli")
    probs = la.predict(state, x[:5], link_approx=link, generator=g)
    assert probs.shape == (5,)
    assert bool(((probs > 0) & (probs < 1)).all())


def test_glm_monte_carlo_link_matches_weight_sampling_on_a_last_layer_model():
    # Logits are linear in the last layer, so glm/mc and sampled weights estimate the same mean.
    la, state = _classifier_state("full")
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=DT)
    s = 4000
    draws = la.sample(state, s, generator=torch.Generator().manual_seed(1))
    per_draw = torch.stack([la.apply_fn({k: v[i] for k, v in draws.items()}, x) for i in range(s)]).softmax(-1)
    se = per_draw.std(0) / math.sqrt(s)
    mc = la.predict(state, x, link_approx="mc", num_samples=s, generator=torch.Generator().manual_seed(2))
    assert ((mc - per_draw.mean(0)).abs() / (math.sqrt(2) * se)).max() < 5


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_regression_closed_form_predictive_equals_monte_carlo(structure):
    sigma = 0.3
    apply_fn, params, net, x, y, *_ = _blr_problem(False, sigma)
    la, state = fit(apply_fn, params, [(x, y)], "gaussian", subset="last_layer", structure=structure, sigma=sigma)
    x_new = torch.randn(5, 2, generator=torch.Generator().manual_seed(9), dtype=DT)
    mean, var = la.predict(state, x_new)
    s = 2000
    mc_mean, mc_var = la.predict(state, x_new, pred_type="nn", num_samples=s, generator=torch.Generator().manual_seed(0))
    assert mean.shape == var.shape == mc_mean.shape == mc_var.shape == (5, 1)
    assert bool((var > sigma**2).all())
    f_var = var - sigma**2  # the model-output part; the noise is added exactly in both
    assert ((mc_mean - mean).abs() / (f_var / s).sqrt()).max() < 5
    assert ((mc_var - var).abs() / (f_var * math.sqrt(2 / s))).max() < 5


# --- bad input -------------------------------------------------------------------------------


@pytest.fixture
def small():
    case = CASE_BY_NAME["mlp"]
    apply_fn, params, _ = functionalize(case.build())
    return apply_fn, params, _data(case)


def _all_entry_points(apply_fn, params, data, lik, **kw):
    return [
        lambda: diag_curvature(apply_fn, params, data, lik, method="structured", **kw),
        lambda: diag_curvature(apply_fn, params, data, lik, method="generic", **kw),
        lambda: dense_curvature(apply_fn, params, data, lik, **kw),
        lambda: fit(apply_fn, params, data, lik, **({"curvature": kw["kind"]} if "kind" in kw else {})),
        lambda: fit(apply_fn, params, data, lik, structure="full"),
    ]


def test_a_likelihood_that_does_not_fit_the_outputs_is_refused(small):
    apply_fn, params, (x, y) = small
    cases = [
        ("gaussian", torch.randn(N, 2, dtype=DT), rf"targets must have the shape of the outputs \({N}, 3\)"),
        ("categorical", y.to(DT), "integer class indices"),
        ("bernoulli", torch.ones(N, dtype=DT), r"targets must have the shape of the outputs"),
        ("heteroscedastic_gaussian", torch.randn(N, 3, dtype=DT), "even last axis"),
    ]
    for lik, targets, msg in cases:
        for call in _all_entry_points(apply_fn, params, [(x, targets)], lik):
            with pytest.raises(ValueError, match=msg):
                call()


def test_labels_out_of_range_are_refused(small):
    apply_fn, params, (x, y) = small
    for bad in (y + 3, y - 3):
        for call in _all_entry_points(apply_fn, params, [(x, bad)], "categorical"):
            with pytest.raises(ValueError, match=r"targets must lie in \[0, 2\] for 3 classes"):
                call()


def test_empty_data_is_refused(small):
    apply_fn, params, _ = small
    empty_loader = DataLoader(TensorDataset(torch.empty(0, 4, dtype=DT), torch.empty(0, dtype=torch.long)),
                              batch_size=4)
    for data in ([], empty_loader, iter([])):
        for call in _all_entry_points(apply_fn, params, data, "categorical"):
            with pytest.raises(ValueError, match="data is empty"):
                call()
    with pytest.raises(TypeError, match="iterable of \\(x, y\\) batches"):
        diag_curvature(apply_fn, params, 3, "categorical")


def test_a_loader_of_batches_gives_the_list_result(small):
    apply_fn, params, (x, y) = small
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    a, sa = diag_curvature(apply_fn, params, loader, "categorical")
    b, sb = diag_curvature(apply_fn, params, (x, y), "categorical")
    assert_rel(_flat(a), _flat(b), 1e-12)
    assert sa.num_data == sb.num_data == N and torch.allclose(sa.loss, sb.loss)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), [1.0, 1.0, -0.5, 1.0]])
def test_non_positive_prior_precision_is_refused(small, bad):
    apply_fn, params, data = small
    with pytest.raises(ValueError, match="prior_precision must be finite and positive"):
        fit(apply_fn, params, [data], "categorical", prior_precision=bad)


def test_prior_precision_of_the_wrong_length_is_refused(small):
    apply_fn, params, data = small
    with pytest.raises(ValueError, match=r"one value per leaf \(4 leaves\) or one per parameter \(67 parameters\), got shape \(3,\)"):
        fit(apply_fn, params, [data], "categorical", prior_precision=[1.0, 2.0, 3.0])


def test_unknown_names_are_refused(small):
    apply_fn, params, data = small
    d = [data]
    checks = [
        (lambda: diag_curvature(apply_fn, params, d, "categorical", kind="fisher"), "kind must be"),
        (lambda: dense_curvature(apply_fn, params, d, "categorical", kind="fisher"), "kind must be"),
        (lambda: fit(apply_fn, params, d, "categorical", curvature="fisher"), "curvature must be .*'fisher'"),
        (lambda: diag_curvature(apply_fn, params, d, "categorical", method="fast"), "method must be"),
        (lambda: fit(apply_fn, params, d, "categorical", structure="lowrank"), "structure must be .*'lowrank'"),
        (lambda: fit(apply_fn, params, d, "categorical", subset=["0.weight", "nope"]), r"\['nope'\] are not leaves"),
        (lambda: fit(apply_fn, params, d, "categorical", subset="last_layers"), "subset must be .*'last_layers'"),
        (lambda: fit(apply_fn, params, d, "categorical", subset=lambda k, v: False), "selects no leaves"),
        (lambda: diag_curvature(apply_fn, params, d, "categorical", subset=["nope"]), "not leaves of params"),
        (lambda: dense_curvature(apply_fn, params, d, "categorical", subset=["nope"]), "not leaves of params"),
        (lambda: fit(apply_fn, params, d, "poisson"), "poisson"),
    ]
    for call, msg in checks:
        with pytest.raises(ValueError, match=msg):
            call()


def test_bad_hyperparameters_and_prediction_options_are_refused(small):
    apply_fn, params, data = small
    with pytest.raises(ValueError, match="sigma must be (a )?finite (and )?positive"):
        fit(apply_fn, params, [(data[0], torch.randn(N, 3, dtype=DT))], "gaussian", sigma=-0.1)
    with pytest.raises(ValueError, match="sigma applies to the 'gaussian' likelihood only"):
        fit(apply_fn, params, [data], "categorical", sigma=0.5)
    la, state = fit(apply_fn, params, [data], "categorical")
    with pytest.raises(ValueError, match="tune_sigma applies to the 'gaussian' likelihood only"):
        la.tune(state, tune_sigma=True)
    with pytest.raises(ValueError, match="pred_type must be"):
        la.predict(state, data[0], pred_type="laplace")
    with pytest.raises(ValueError, match="link_approx must be"):
        la.predict(state, data[0], link_approx="softmax")
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        la.sample(state, 0)


# --- Kronecker-factored (KFAC) Laplace ---------------------------------------------------------


def test_kron_laplace_on_a_single_output_linear_head_is_bayesian_linear_regression():
    # One output with unit Gaussian curvature makes G = N, so G (x) A / N is exactly phi^T phi.
    sigma, pp = 0.3, 2.0
    apply_fn, params, net, x, y, phi, precision, theta = _blr_problem(False, sigma, pp)
    kw = dict(subset="last_layer", prior_precision=pp, sigma=sigma)
    la, state = fit(apply_fn, params, [(x, y)], "gaussian", structure="kron", **kw)
    full, full_state = fit(apply_fn, params, [(x, y)], "gaussian", structure="full", **kw)
    blocks, diag = la.precision(state)
    assert not diag and list(blocks) == [("2.weight", "2.bias")]
    assert_rel(blocks[("2.weight", "2.bias")], precision, 1e-10)
    assert_rel(la.log_marglik(state), full.log_marglik(full_state), 1e-10)
    assert_rel(la.kl(state), full.kl(full_state), 1e-10)
    x_new = torch.randn(5, 2, generator=torch.Generator().manual_seed(9), dtype=DT)
    for got, want in zip(la.predict(state, x_new), full.predict(full_state, x_new)):
        assert_rel(got, want, 1e-10)
    tuned, full_tuned = la.tune(state, steps=30), full.tune(full_state, steps=30)
    assert_rel(tuned.prior_precision, full_tuned.prior_precision, 1e-8)
    assert_rel(tuned.sigma, full_tuned.sigma, 1e-8)


def _kron_dense(la, state) -> Tensor:
    """The kron posterior precision as one matrix over the leaves flattened in ``la.names`` order."""
    blocks, diag = la.precision(state)
    sizes = {k: state.mean[k].numel() for k in la.names}
    offset = dict(zip(la.names, torch.tensor([0, *sizes.values()]).cumsum(0).tolist()))
    total = sum(sizes.values())
    dense = torch.zeros(total, total, dtype=DT)
    for key, block in blocks.items():
        w = state.mean[key[0]]
        out, fan_in = w.shape[0], w[0].numel()
        idx = []  # joint block order: row o holds W[o] then b[o]
        for o in range(out):
            idx += [offset[key[0]] + o * fan_in + j for j in range(fan_in)]
            if len(key) == 2:
                idx.append(offset[key[1]] + o)
        idx = torch.tensor(idx)
        dense[idx[:, None], idx[None, :]] = block
    for k, d in diag.items():
        i = torch.arange(offset[k], offset[k] + sizes[k])
        dense[i, i] = d.reshape(-1)
    return dense


def _kron_classifier():
    torch.manual_seed(0)
    net = _seq(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))
    apply_fn, params, _ = functionalize(net)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(24, 3, generator=g, dtype=DT), torch.randint(0, 3, (24,), generator=g)
    pp = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.7, 1.5], dtype=DT)  # per leaf: weight and bias differ
    la, state = fit(apply_fn, params, [(x, y)], "categorical", structure="kron", prior_precision=pp)
    return la, state, net, x


def test_kron_marglik_kl_and_samples_agree_with_the_dense_kron_precision():
    la, state, _, _ = _kron_classifier()
    prec = _kron_dense(la, state)
    mu = _flat(state.mean)
    pp = torch.cat([state.prior_precision[i].expand(state.mean[k].numel()) for i, k in enumerate(la.names)])
    want = -state.loss - 0.5 * (torch.logdet(prec) - pp.log().sum() + (pp * mu.square()).sum())
    assert_rel(la.log_marglik(state), want, 1e-10)
    q = torch.distributions.MultivariateNormal(mu, precision_matrix=prec)
    p = torch.distributions.MultivariateNormal(torch.zeros_like(mu), precision_matrix=torch.diag(pp))
    assert_rel(la.kl(state), torch.distributions.kl_divergence(q, p), 1e-10)
    s = 4000
    draws = la.sample(state, s, generator=torch.Generator().manual_seed(0))
    flat = torch.cat([draws[k].reshape(s, -1) for k in la.names], 1)
    cov = torch.linalg.inv(prec)
    var = torch.diagonal(cov)
    assert ((flat.mean(0) - mu).abs() / (var / s).sqrt()).max() < 5
    centred = flat - mu
    se = ((var[:, None] * var[None, :] + cov.square()) / s).sqrt()
    assert ((centred.T @ centred / s - cov).abs() / se).max() < 5


def test_kron_log_marglik_gradient_matches_central_differences():
    la, state, _, _ = _kron_classifier()
    pp = state.prior_precision.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(la.log_marglik(state, pp), pp)
    h = 1e-6
    for i in range(pp.numel()):
        e = torch.zeros_like(pp)
        e[i] = h
        fd = (la.log_marglik(state, pp.detach() + e) - la.log_marglik(state, pp.detach() - e)) / (2 * h)
        assert abs(grad[i].item() - fd.item()) <= 1e-6 * max(1.0, abs(fd.item()))


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_glm_output_covariance_equals_J_P_inverse_J_transposed(structure):
    la, state, net, x = _kron_classifier()
    if structure != "kron":
        apply_fn, params, _ = functionalize(net)
        la, state = fit(apply_fn, params, [(x, torch.zeros(len(x), dtype=torch.long))], "categorical",
                        structure=structure, prior_precision=state.prior_precision)
    if structure == "kron":
        prec = _kron_dense(la, state)
    elif structure == "diag":
        prec = torch.diag(_flat(la.precision(state)))
    else:
        prec = la.precision(state)
    cov = torch.linalg.inv(prec)
    x_new = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=DT)
    f, got = la.output_covariance(state, x_new, chunk_size=3)
    for n in range(4):
        def out(*leaves):
            return la.apply_fn(dict(zip(la.names, leaves)), x_new[n : n + 1]).reshape(-1)

        jac = torch.autograd.functional.jacobian(out, tuple(state.mean[k] for k in la.names))
        J = torch.cat([j.reshape(j.shape[0], -1) for j in jac], 1)
        assert_rel(got[n], J @ cov @ J.T, 1e-9)
    assert_rel(f, net(x_new).detach(), 1e-12)


@given(
    k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dil=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    pad=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 2)),
)
def test_strided_patches_equal_torch_unfold(k, dil, pad, stride):
    from funcbnn.laplace.curvature import _patches

    x = torch.randn(2, 3, 7, 6, dtype=DT)
    want = torch.nn.functional.unfold(x, k, dilation=dil, padding=pad, stride=stride)
    assert torch.equal(_patches(x, k, dil, pad, stride), want)
    assert torch.equal(_patches(x, k, dil, pad, stride, positions_first=True), want.transpose(1, 2))


# --- review regressions --------------------------------------------------------------------------


class _AuxHead(nn.Module):
    """A Linear whose output never reaches the returned tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.aux = nn.Linear(4, 2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.body(x))
        self.aux(h)
        return self.head(h)


@pytest.mark.parametrize("kind", ["ef", "ggn", "mc_ggn"])
def test_a_layer_that_does_not_reach_the_output_gets_zero_curvature(kind):
    torch.manual_seed(0)
    apply_fn, params, _ = functionalize(_AuxHead().double())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, generator=g, dtype=DT), torch.randint(0, 3, (10,), generator=g)
    la, state = fit(apply_fn, params, [(x, y)], "categorical", curvature=kind, generator=g)
    assert float(state.curvature["aux.weight"].abs().sum()) == 0.0
    assert float(state.curvature["head.weight"].abs().sum()) > 0.0
    _, cov = la.output_covariance(state, x[:2])
    assert bool(torch.isfinite(cov).all())


def test_fit_snapshots_the_fixed_leaves_too():
    case = CASE_BY_NAME["mlp"]
    apply_fn, params, _ = functionalize(case.build())
    x, y = _data(case, n=16)
    la, state = fit(apply_fn, params, [(x, y)], "categorical", subset="last_layer")
    before = la.predict(state, x)
    with torch.no_grad():
        for v in params.values():
            v.add_(0.5)
    torch.testing.assert_close(la.predict(state, x), before)


def test_hyperparameter_arguments_are_validated_like_fit():
    la, state = _classifier_state("diag")
    for bad in (-1.0, 0.0, float("nan"), torch.ones(5, dtype=DT)):
        with pytest.raises(ValueError, match="prior_precision"):
            la.log_marglik(state, prior_precision=bad)
    with pytest.raises(ValueError, match="sigma"):
        la.log_marglik(state, sigma=-0.5)
    torch.testing.assert_close(la.log_marglik(state, prior_precision=0.5), la.log_marglik(state))


def test_predict_refuses_a_likelihood_it_does_not_cover_and_a_bad_sample_count():
    torch.manual_seed(0)
    apply_fn, params, _ = functionalize(_seq(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 2, generator=g, dtype=DT), torch.randn(12, 1, generator=g, dtype=DT)
    la, state = fit(apply_fn, params, [(x, y)], "heteroscedastic_gaussian")
    with pytest.raises(ValueError, match="heteroscedastic_gaussian"):
        la.predict(state, x)
    la, state = _classifier_state("full")
    with pytest.raises(ValueError, match="num_samples"):
        la.predict(state, torch.randn(2, 4, dtype=DT), link_approx="mc", num_samples=0)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_predict_runs_under_inference_mode_and_matches(structure):
    la, state = _classifier_state(structure, subset="all")
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=DT)
    want = la.predict(state, x)
    with torch.inference_mode():
        x_inf = x.clone()
        got = la.predict(state, x_inf)
    torch.testing.assert_close(got, want)


def test_mc_link_survives_a_rank_deficient_output_covariance():
    # Uncertainty only before a width-2 bottleneck: the 6-class output covariance has rank <= 2.
    torch.manual_seed(0)
    net = _seq(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 6)).float()
    apply_fn, params, _ = functionalize(net)
    x, y = torch.randn(20, 3), torch.randint(0, 6, (20,))
    la, state = fit(apply_fn, params, [(x, y)], "categorical", subset=["0.weight", "0.bias"])
    probs = la.predict(state, x[:3], link_approx="mc", num_samples=64, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(probs).all())
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_last_layer_means_the_linear_called_last_not_the_one_registered_last():
    class HeadFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 3)
            self.body = nn.Linear(2, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.tanh(self.body(x)))

    torch.manual_seed(0)
    apply_fn, params, _ = functionalize(HeadFirst().double())
    x, y = torch.randn(8, 2, dtype=DT), torch.randint(0, 3, (8,))
    la, _ = fit(apply_fn, params, [(x, y)], "categorical", subset="last_layer")
    assert la.names == ("head.weight", "head.bias")


@pytest.mark.parametrize("kind", ["ef", "ggn"])
def test_a_frozen_bias_leaves_the_weight_on_the_structured_path_with_the_same_numbers(kind):
    torch.manual_seed(0)
    net = _seq(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3))
    net[0].bias.requires_grad_(False)
    net[3].bias.requires_grad_(False)
    apply_fn, params, _ = functionalize(net)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 1, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)
    fast, _ = diag_curvature(apply_fn, params, [(x, y)], "categorical", kind=kind, method="structured")
    slow, _ = diag_curvature(apply_fn, params, [(x, y)], "categorical", kind=kind, method="generic")
    assert set(fast) == {"0.weight", "3.weight"}
    for k in fast:
        assert_rel(fast[k], slow[k])


# --- the posterior is a family state ---------------------------------------------------------------


def test_the_diagonal_laplace_posterior_is_a_diag_gaussian_state():
    from funcbnn.families import DiagGaussianState, diag_gaussian
    from funcbnn.priors import gaussian

    la, state = _classifier_state("diag", subset="all")
    post = la.posterior(state)
    assert isinstance(post, DiagGaussianState) and la.family.sample is diag_gaussian().sample
    ref = diag_gaussian()
    a = la.sample(state, 7, generator=torch.Generator().manual_seed(4))
    b = ref.sample(post, 7, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    prior = gaussian(std=0.9)
    assert torch.equal(la.kl(state, prior), ref.kl(post, prior))
    own = gaussian(std={k: state.prior_precision.rsqrt() for k in state.mean})
    assert torch.equal(la.kl(state), ref.kl(post, own))
    # the fitter's log-determinant shortcut is the family's
    from funcbnn.laplace.state import logdet_precision

    assert_rel(logdet_precision(state), ref.logdet_precision(post), 1e-12)
    # its variances are the inverse diagonal precision
    for k, v in ref.variance(post).items():
        assert_rel(v, la.precision(state)[k].reciprocal(), 1e-12)


@pytest.mark.parametrize("structure,family", [("kron", "KronGaussianState"), ("full", "DenseGaussianState")])
def test_kron_and_full_posteriors_are_family_states_with_the_laplace_numbers(structure, family):
    la, state = _classifier_state(structure, subset="all" if structure == "kron" else "last_layer")
    post = la.posterior(state)
    assert type(post).__name__ == family
    a = la.sample(state, 5, generator=torch.Generator().manual_seed(1))
    b = la.family.sample(post, 5, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    if structure == "full":
        mu = _flat(state.mean)
        q = torch.distributions.MultivariateNormal(mu, precision_matrix=la.precision(state))
        var = torch.diagonal(q.covariance_matrix)
        assert_rel(_flat({k: la.family.variance(post)[k] for k in state.mean}), var, 1e-10)
        assert_rel(la.family.logdet_precision(post), torch.logdet(la.precision(state)), 1e-10)


# --- one linearisation, many hyperparameters (a prior-precision search) --------------------------


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_predictions_from_one_linearization_equal_fresh_predictions(structure):
    la, state = _classifier_state(structure, subset="last_layer" if structure == "full" else "all")
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(3), dtype=DT)
    lin = la.linearize(state, x, chunk_size=3)
    for pp in (0.01, 0.5, 30.0):
        fresh = state._replace(prior_precision=torch.tensor(pp, dtype=DT))
        for link in ("probit", "bridge"):
            assert_rel(la.predict(state, lin, prior_precision=pp, link_approx=link),
                       la.predict(fresh, x, link_approx=link), 1e-10)
        f, cov = la.output_covariance(state, lin, prior_precision=pp)
        f2, cov2 = la.output_covariance(fresh, x)
        assert_rel(f, f2, 1e-14)  # chunks of 3 vs one of 7: the same outputs up to round-off
        assert_rel(cov, cov2, 1e-10)
    probs = la.predict(state, lin, pred_type="nn", num_samples=5, generator=torch.Generator().manual_seed(0))
    assert probs.shape == (7, 3)


def test_a_linearization_for_another_structure_is_refused():
    la, state = _classifier_state("full")
    kron, kron_state = _classifier_state("kron")
    x = torch.randn(2, 4, dtype=DT)
    with pytest.raises(ValueError, match="Linearization for structure 'kron'"):
        la.predict(state, kron.linearize(kron_state, x))


# --- likelihood names and hyperparameter forms ----------------------------------------------------


@pytest.mark.parametrize(
    "alias,name", [("classification", "categorical"), ("regression", "gaussian"), ("binary", "bernoulli"),
                   ("heteroscedastic_regression", "heteroscedastic_gaussian")],
)
def test_every_likelihood_alias_is_accepted_by_fit_and_the_approximation(alias, name):
    from funcbnn.laplace import LaplaceApproximation

    torch.manual_seed(0)
    out = {"categorical": 3, "gaussian": 2, "bernoulli": 1, "heteroscedastic_gaussian": 4}[name]
    net = _seq(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, out))
    apply_fn, params, _ = functionalize(net)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, generator=g, dtype=DT)
    y = {"categorical": torch.randint(0, 3, (10,), generator=g),
         "gaussian": torch.randn(10, 2, generator=g, dtype=DT),
         "bernoulli": torch.randint(0, 2, (10, 1), generator=g).to(DT),
         "heteroscedastic_gaussian": torch.randn(10, 2, generator=g, dtype=DT)}[name]
    la, state = fit(apply_fn, params, [(x, y)], alias)
    _, canonical = fit(apply_fn, params, [(x, y)], name)
    assert state.likelihood == name and la.likelihood.name == name
    assert_rel(la.log_marglik(state), la.log_marglik(canonical), 1e-14)
    approx = LaplaceApproximation(net, alias).fit([(x, y)])
    assert approx.likelihood.name == name
    assert_rel(approx.log_marglik(), la.log_marglik(state), 1e-12)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_hyperparameters_as_numbers_0d_and_shape_1_tensors_give_the_same_numbers(structure):
    case = CASE_BY_NAME["linear_on_sequence"]
    apply_fn, params, _ = functionalize(case.build())
    data = [_data(case)]
    forms = [(0.7, 0.5), (torch.tensor(0.7, dtype=DT), torch.tensor(0.5, dtype=DT)),
             (torch.full((1,), 0.7, dtype=DT), torch.full((1,), 0.5, dtype=DT))]
    results = []
    for pp, sd in forms:
        la, state = fit(apply_fn, params, data, "gaussian", structure=structure, prior_precision=pp, sigma=sd)
        assert state.prior_precision.dim() == 0 and state.sigma.dim() == 0
        x = data[0][0][:3]
        results.append((la.log_marglik(state), la.log_marglik(state, pp, sd), *la.predict(state, x),
                        la.predict(state, x, prior_precision=pp, sigma=sd)[1]))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            assert_rel(got, want, 1e-14)
    # laplace-torch's README loop: shape-(1,) hyperparameters straight into the marginal likelihood
    ones = la.log_marglik(state, torch.ones(1, dtype=DT), torch.ones(1, dtype=DT))
    assert_rel(ones, la.log_marglik(state, 1.0, 1.0), 1e-14)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_gradients_flow_to_tensor_hyperparameters(structure):
    case = CASE_BY_NAME["linear_on_sequence"]
    apply_fn, params, _ = functionalize(case.build())
    data = [_data(case)]
    log_pp = torch.zeros(1, dtype=DT, requires_grad=True)
    log_sd = torch.zeros(1, dtype=DT, requires_grad=True)
    la, state = fit(apply_fn, params, data, "regression", structure=structure, prior_precision=log_pp.exp(),
                    sigma=log_sd.exp())
    grads = torch.autograd.grad(la.log_marglik(state), (log_pp, log_sd))
    assert all(bool(torch.isfinite(g).all() and (g != 0).all()) for g in grads)
    # the linearised predictive too, through a reused linearisation
    pp = torch.tensor(2.0, dtype=DT, requires_grad=True)
    lin = la.linearize(state, data[0][0][:3])
    _, var = la.predict(state, lin, prior_precision=pp)
    (grad,) = torch.autograd.grad(var.sum(), pp)
    assert grad < 0  # a stronger prior shrinks the predictive variance


@pytest.mark.parametrize("name", ["cnn", "reused_layer", "linear_on_sequence", "conv1d"])
def test_kron_output_covariance_equals_J_P_inverse_J_transposed_on_every_layer_kind(name):
    # Conv and sequence blocks take the dense rotated path, a layer called twice the vmap(jacrev) path.
    case = CASE_BY_NAME[name]
    apply_fn, params, _ = functionalize(case.build())
    x, y = _data(case)
    pp = torch.linspace(0.5, 2.0, len(params), dtype=DT)  # weights and biases differ: the bias correction runs
    la, state = fit(apply_fn, params, [(x, y)], case.lik, structure="kron", prior_precision=pp)
    cov = torch.linalg.inv(_kron_dense(la, state))
    x_new = x[:3]
    f, got = la.output_covariance(state, la.linearize(state, x_new, chunk_size=2))
    for n in range(3):
        def out(*leaves):
            return la.apply_fn(dict(zip(la.names, leaves)), x_new[n : n + 1]).reshape(-1)

        jac = torch.autograd.functional.jacobian(out, tuple(state.mean[k] for k in la.names))
        J = torch.cat([j.reshape(j.shape[0], -1) for j in jac], 1)
        assert_rel(got[n], J @ cov @ J.T, 1e-9)


def test_laplace_torch_readme_tuning_loop_runs_on_shape_1_tensors():
    # laplace-torch's README: Adam on shape-(1,) log hyperparameters through the marginal likelihood.
    apply_fn, params, x, y = _noisy_linear_data()
    la, state = fit(apply_fn, params, [(x, y)], "regression", structure="kron")
    log_prior, log_sigma = torch.ones(1, dtype=DT, requires_grad=True), torch.ones(1, dtype=DT, requires_grad=True)
    opt = torch.optim.Adam([log_prior, log_sigma], lr=1e-1)
    first = None
    for _ in range(20):
        opt.zero_grad()
        neg_marglik = -la.log_marglik(state, log_prior.exp(), log_sigma.exp())
        neg_marglik.backward()
        opt.step()
        first = neg_marglik.item() if first is None else first
    assert neg_marglik.item() < first and log_prior.grad.shape == (1,)


@pytest.mark.parametrize("lik,shape", [("categorical", (6, 5)), ("gaussian", (6, 3)), ("bernoulli", (6, 1))])
def test_ggn_columns_keep_the_output_hessian_and_drop_only_null_directions(lik, shape):
    from funcbnn.laplace.curvature import ggn_columns, output_hessian_sqrt, unit_likelihood

    likelihood = unit_likelihood(lik)
    f = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=DT)
    full, reduced = output_hessian_sqrt(likelihood, f), ggn_columns(likelihood, f)
    # The softmax Hessian diag(p) - p p^T has rank C - 1: one column fewer; full-rank Hessians keep theirs.
    assert reduced.shape[0] == {"categorical": shape[1] - 1, "gaussian": shape[1], "bernoulli": 1}[lik]
    for n in range(shape[0]):
        h_full = torch.einsum("ko,kq->oq", full[:, n].reshape(full.shape[0], -1), full[:, n].reshape(full.shape[0], -1))
        h_red = torch.einsum("ko,kq->oq", reduced[:, n].reshape(reduced.shape[0], -1), reduced[:, n].reshape(reduced.shape[0], -1))
        assert_rel(h_red, h_full, 1e-12)
        if lik == "categorical":
            p = f[n].softmax(-1)
            assert_rel(h_red, torch.diag(p) - torch.outer(p, p), 1e-12)
