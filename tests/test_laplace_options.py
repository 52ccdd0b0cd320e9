"""laplace-torch's options, checked against its formulas written out here (laplace-torch is not a dependency).

- ``prior_mean``: the scatter term is ``(theta - m0)^T P0 (theta - m0)``; the default KL prior is ``N(m0, P0^-1)``.
- ``temperature``: ``P = C / (sigma^2 T) + P0``; the log likelihood is ``-loss / (sigma^2 T)`` minus the
  untempered Gaussian normaliser ``N D log(sigma sqrt(2 pi))`` (``BaseLaplace.log_likelihood``).
- one prior precision per parameter (``prior_structure="diag"``).
- separate weight and bias Kronecker blocks: weight ``G (x) A_w / M``, bias ``G`` (A = [[M]] / M).
- an ``nn.Module`` passed as ``apply_fn`` is refused with a message that says what to do.
- the Laplace bridge of Hobbhahn et al. 2022, with its zero-mean correction.

References are dense: the per-example loop of ``test_laplace.brute_force`` for the curvature, ``torch.logdet``
and ``torch.distributions`` for the rest, all in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from funcbnn import functionalize
from funcbnn.laplace import fit, from_state, laplace_bridge, marglik_training
from test_laplace import CASE_BY_NAME, _data, _flat, assert_rel, brute_force

DT = torch.float64


def _classifier():
    case = CASE_BY_NAME["mlp"]
    net = case.build()
    apply_fn, params, _ = functionalize(net)
    return net, apply_fn, params, _data(case, n=10)


def _regressor():
    case = CASE_BY_NAME["linear_on_sequence"]
    net = case.build()
    apply_fn, params, _ = functionalize(net)
    return net, apply_fn, params, _data(case, n=6)


def _random_like(params: dict[str, Tensor], seed: int, low: float = 0.2) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + torch.rand(_flat(params).numel(), generator=g, dtype=DT)


# --- prior mean -------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_prior_mean_enters_the_scatter_term_and_the_default_kl_prior(structure):
    net, apply_fn, params, (x, y) = _classifier()
    m0 = 0.3 * _random_like(params, 1, low=-0.5)
    pp = 2.0
    la, state = fit(apply_fn, params, [(x, y)], "categorical", structure=structure, prior_precision=pp, prior_mean=m0)
    _, centred = fit(apply_fn, params, [(x, y)], "categorical", structure=structure, prior_precision=pp)
    theta = _flat(params)
    # Only the scatter term changes: log Z(m0) - log Z(0) = -pp/2 (|theta - m0|^2 - |theta|^2).
    want = la.log_marglik(centred) - 0.5 * pp * ((theta - m0).square().sum() - theta.square().sum())
    assert_rel(la.log_marglik(state), want, 1e-10)
    if structure == "full":  # the whole formula, with the dense GGN of the per-example loop
        prec = brute_force(net, x, y, "categorical", "ggn") + pp * torch.eye(theta.numel(), dtype=DT)
        full = -state.loss - 0.5 * (torch.logdet(prec) - theta.numel() * math.log(pp) + pp * (theta - m0).square().sum())
        assert_rel(la.log_marglik(state), full, 1e-10)
        q = torch.distributions.MultivariateNormal(theta, precision_matrix=prec)
        p = torch.distributions.MultivariateNormal(m0, precision_matrix=pp * torch.eye(theta.numel(), dtype=DT))
        assert_rel(la.kl(state), torch.distributions.kl_divergence(q, p), 1e-10)


def test_prior_mean_as_a_dict_of_leaves_equals_the_flat_vector():
    _, apply_fn, params, (x, y) = _classifier()
    m0 = {k: torch.full_like(v, 0.1 * i) for i, (k, v) in enumerate(params.items())}
    la, by_dict = fit(apply_fn, params, [(x, y)], "categorical", prior_mean=m0)
    _, by_vector = fit(apply_fn, params, [(x, y)], "categorical", prior_mean=_flat(m0))
    torch.testing.assert_close(by_dict.prior_mean, _flat(m0), rtol=0, atol=0)
    assert_rel(la.log_marglik(by_dict), la.log_marglik(by_vector), 1e-14)
    with pytest.raises(ValueError, match="prior_mean must be a scalar or one value per parameter"):
        fit(apply_fn, params, [(x, y)], "categorical", prior_mean=torch.zeros(3))


# --- temperature ------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_temperature_divides_the_curvature_and_the_classification_data_term(structure):
    net, apply_fn, params, (x, y) = _classifier()
    temp, pp = 0.25, 1.5
    la, state = fit(apply_fn, params, [(x, y)], "categorical", structure=structure, prior_precision=pp, temperature=temp)
    ggn = brute_force(net, x, y, "categorical", "ggn")
    prec = ggn / temp + pp * torch.eye(ggn.shape[0], dtype=DT)
    got = la.precision(state)
    if structure == "diag":
        assert_rel(_flat(got), torch.diagonal(prec))
        logdet = torch.diagonal(prec).log().sum()
    else:
        assert_rel(got, prec)
        logdet = torch.logdet(prec)
    theta = _flat(params)
    want = -state.loss / temp - 0.5 * (logdet - theta.numel() * math.log(pp) + pp * theta.square().sum())
    assert_rel(la.log_marglik(state), want, 1e-10)


def test_temperature_in_regression_tempers_the_squared_error_not_the_normaliser():
    net, apply_fn, params, (x, y) = _regressor()
    temp, pp, sigma = 2.0, 0.7, 0.4
    la, state = fit(apply_fn, params, [(x, y)], "gaussian", structure="full", prior_precision=pp, sigma=sigma,
                    temperature=temp)
    ggn = brute_force(net, x, y, "gaussian", "ggn")  # at sigma 1
    prec = ggn / (sigma**2 * temp) + pp * torch.eye(ggn.shape[0], dtype=DT)
    assert_rel(la.precision(state), prec)
    with torch.no_grad():
        sse = (net(x) - y).square().sum()
    k = y.numel()
    log_lik = -0.5 * sse / (sigma**2 * temp) - k * math.log(sigma * math.sqrt(2 * math.pi))
    theta = _flat(params)
    want = log_lik - 0.5 * (torch.logdet(prec) - theta.numel() * math.log(pp) + pp * theta.square().sum())
    assert_rel(la.log_marglik(state), want, 1e-10)
    # The GLM predictive uses the tempered covariance and the untempered noise.
    _, var = la.predict(state, x[:2])
    _, var_t1 = la.predict(state, x[:2], temperature=1.0)
    assert bool((var > var_t1).all())


def test_temperature_must_be_positive():
    _, apply_fn, params, (x, y) = _classifier()
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            fit(apply_fn, params, [(x, y)], "categorical", temperature=bad)


# --- one prior precision per parameter --------------------------------------------------------


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_a_per_parameter_prior_precision_is_the_diagonal_it_says(structure):
    net, apply_fn, params, (x, y) = _classifier()
    delta = _random_like(params, 2)
    la, state = fit(apply_fn, params, [(x, y)], "categorical", structure=structure, prior_precision=delta)
    ggn = brute_force(net, x, y, "categorical", "ggn")
    prec = ggn + torch.diag(delta)
    theta = _flat(params)
    if structure == "diag":
        assert_rel(_flat(la.precision(state)), torch.diagonal(prec))
        logdet = torch.diagonal(prec).log().sum()
    else:
        assert_rel(la.precision(state), prec)
        logdet = torch.logdet(prec)
        q = torch.distributions.MultivariateNormal(theta, precision_matrix=prec)
        p = torch.distributions.MultivariateNormal(torch.zeros_like(theta), precision_matrix=torch.diag(delta))
        assert_rel(la.kl(state), torch.distributions.kl_divergence(q, p), 1e-10)
    want = -state.loss - 0.5 * (logdet - delta.log().sum() + (delta * theta.square()).sum())
    assert_rel(la.log_marglik(state), want, 1e-10)


def test_a_dict_of_per_leaf_prior_precisions_gives_the_per_parameter_vector():
    _, apply_fn, params, (x, y) = _classifier()
    per_leaf = {k: 1.0 + i for i, k in enumerate(params)}
    la, state = fit(apply_fn, params, [(x, y)], "categorical", prior_precision=per_leaf)
    want = torch.cat([torch.full((v.numel(),), 1.0 + i, dtype=DT) for i, v in enumerate(params.values())])
    torch.testing.assert_close(state.prior_precision, want, rtol=0, atol=0)
    _, by_leaf = fit(apply_fn, params, [(x, y)], "categorical", prior_precision=torch.tensor(list(per_leaf.values())))
    assert_rel(la.log_marglik(state), la.log_marglik(by_leaf), 1e-13)


def test_tuning_one_prior_precision_per_parameter_raises_the_marginal_likelihood():
    _, apply_fn, params, (x, y) = _classifier()
    la, state = fit(apply_fn, params, [(x, y)], "categorical", prior_precision=1.0)
    scalar = la.tune(state, steps=100)
    diag = la.tune(scalar, prior_structure="diag", steps=100)
    assert diag.prior_precision.shape == (_flat(params).numel(),)
    assert la.log_marglik(diag) > la.log_marglik(scalar) > la.log_marglik(state)


def test_kron_refuses_a_per_parameter_prior_precision():
    _, apply_fn, params, (x, y) = _classifier()
    with pytest.raises(ValueError, match="structure='kron' takes a scalar prior precision or one per leaf"):
        fit(apply_fn, params, [(x, y)], "categorical", structure="kron", prior_precision=_random_like(params, 0))


# --- separate weight and bias Kronecker blocks -------------------------------------------------


def test_separate_bias_blocks_are_laplace_torchs_kron_layout():
    net = CASE_BY_NAME["mlp"].build()  # Linear(4, 8) - Tanh - Linear(8, 3)
    apply_fn, params, _ = functionalize(net)
    x, y = _data(CASE_BY_NAME["mlp"], n=10)
    pp = 0.8
    la, state = fit(apply_fn, params, [(x, y)], "categorical", structure="kron", joint_bias=False, prior_precision=pp)
    blocks, diag = la.precision(state)
    assert not diag and set(blocks) == {("0.weight",), ("0.bias",), ("2.weight",), ("2.bias",)}
    # Factors by hand: A = sum a a^T (inputs of the layer), G = sum_n J_n^T H_n J_n at its output.
    w1, b1, w2, b2 = params["0.weight"], params["0.bias"], params["2.weight"], params["2.bias"]
    z1 = x @ w1.T + b1
    h = torch.tanh(z1)
    G1 = G2 = 0
    for n in range(x.shape[0]):
        f = torch.tanh(z1[n]) @ w2.T + b2
        p = f.softmax(-1)
        H = torch.diag(p) - torch.outer(p, p)
        J1 = torch.func.jacrev(lambda z: torch.tanh(z) @ w2.T + b2)(z1[n])
        G1, G2 = G1 + J1.T @ H @ J1, G2 + H
    n = x.shape[0]
    for name, A, G in (("0", x.T @ x, G1), ("2", h.T @ h, G2)):
        eye_w = torch.eye(G.shape[0] * A.shape[0], dtype=DT)
        assert_rel(blocks[(f"{name}.weight",)], torch.kron(G, A / n) + pp * eye_w, 1e-10)
        assert_rel(blocks[(f"{name}.bias",)], G + pp * torch.eye(G.shape[0], dtype=DT), 1e-10)
    # The marginal likelihood is over the block-diagonal precision.
    logdet = sum(torch.logdet(b) for b in blocks.values())
    theta = _flat(params)
    want = -state.loss - 0.5 * (logdet - theta.numel() * math.log(pp) + pp * theta.square().sum())
    assert_rel(la.log_marglik(state), want, 1e-10)


def test_joint_bias_must_be_a_bool():
    _, apply_fn, params, (x, y) = _classifier()
    with pytest.raises(TypeError, match="joint_bias must be a bool"):
        fit(apply_fn, params, [(x, y)], "categorical", structure="kron", joint_bias="no")


# --- an nn.Module where apply_fn belongs --------------------------------------------------------


def test_an_nn_module_passed_as_apply_fn_is_refused_with_what_to_do():
    net, apply_fn, params, (x, y) = _classifier()
    msg = r"apply_fn must be a function of \(params, x\), got the nn.Module Sequential itself; call `apply_fn, params"
    with pytest.raises(TypeError, match=msg):
        fit(net, params, [(x, y)], "categorical")
    _, state = fit(apply_fn, params, [(x, y)], "categorical")
    with pytest.raises(TypeError, match=msg):
        from_state(net, params, state)
    with pytest.raises(TypeError, match=msg):
        marglik_training(net, params, [(x, y)], "categorical", epochs=1)


# --- the Laplace bridge (Hobbhahn et al. 2022) ------------------------------------------------


def _inverse_bridge(alpha: Tensor) -> tuple[Tensor, Tensor]:
    """The Gaussian in the softmax basis that the bridge maps to Dir(alpha) (Hennig et al. 2012, eq. 6-7):
    ``mu_k = log a_k - mean_l log a_l``, ``S_kl = delta_kl / a_k - (1/a_k + 1/a_l) / K + sum_j (1/a_j) / K^2``."""
    k = alpha.shape[-1]
    inv = 1 / alpha
    mu = alpha.log() - alpha.log().mean(-1, keepdim=True)
    cov = torch.diag_embed(inv) - (inv[..., :, None] + inv[..., None, :]) / k + inv.sum(-1)[..., None, None] / k**2
    return mu, cov


def _bridge_by_the_formulas(mu: Tensor, cov: Tensor, normalize: bool = False) -> Tensor:
    """One example at a time: condition on sum(f) = 0, then alpha_k = (1 - 2/K + e^mu_k / K^2 sum e^-mu_l) / S_kk."""
    out = []
    for m, s in zip(mu, cov):
        k = m.numel()
        one = torch.ones(k, dtype=m.dtype)
        s1 = s @ one
        m = m - s1 * (one @ m) / (one @ s1)
        s = s - torch.outer(s1, s1) / (one @ s1)
        v = torch.diagonal(s)
        if normalize:
            c = v.mean() / math.sqrt(k / 2)
            m, v = m / math.sqrt(c), v / c
        alpha = torch.stack([(1 - 2 / k + torch.exp(m[i]) / k**2 * torch.exp(-m).sum()) / v[i] for i in range(k)])
        out.append(alpha / alpha.sum())
    return torch.stack(out)


def test_the_bridge_inverts_the_inverse_bridge_whatever_the_logit_sum_does():
    # Dir(alpha) -> Gaussian (sum-zero mean, S 1 = 0) -> bridge gives back alpha / sum(alpha) exactly. Shifting the
    # mean along 1 and adding variance along 1 1^T change nothing softmax sees; the zero-mean correction removes both.
    g = torch.Generator().manual_seed(0)
    alpha = 0.5 + 5 * torch.rand(6, 4, generator=g, dtype=DT)
    mu, cov = _inverse_bridge(alpha)
    shift = 3 * torch.randn(6, 1, generator=g, dtype=DT)
    spread = (0.5 + torch.rand(6, 1, 1, generator=g, dtype=DT)) * torch.ones(4, 4, dtype=DT)
    got = laplace_bridge(mu + shift, cov + spread)
    assert_rel(got, alpha / alpha.sum(-1, keepdim=True), 1e-12)
    # Without the correction (the bridge applied to the raw diagonal) the answer is different.
    k, var = 4, torch.diagonal(cov + spread, dim1=1, dim2=2)
    m = mu + shift
    raw = (1 - 2 / k + m.exp() / k**2 * torch.exp(-m).sum(-1, keepdim=True)) / var
    assert (raw / raw.sum(-1, keepdim=True) - got).abs().max() > 1e-2


@pytest.mark.parametrize("normalize", [False, True])
def test_the_bridge_equals_the_papers_formulas_on_random_gaussians(normalize):
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(5, 3, generator=g, dtype=DT)
    root = torch.randn(5, 3, 3, generator=g, dtype=DT)
    cov = root @ root.transpose(1, 2) + 0.1 * torch.eye(3, dtype=DT)
    assert_rel(laplace_bridge(mu, cov, normalize=normalize), _bridge_by_the_formulas(mu, cov, normalize), 1e-12)


@pytest.mark.parametrize("link", ["bridge", "bridge_norm"])
def test_predict_with_the_bridge_applies_it_to_the_glm_output_distribution(link):
    _, apply_fn, params, (x, y) = _classifier()
    la, state = fit(apply_fn, params, [(x, y)], "categorical", structure="full", prior_precision=0.5)
    f, cov = la.output_covariance(state, x)
    assert_rel(la.predict(state, x, link_approx=link), _bridge_by_the_formulas(f, cov, link == "bridge_norm"), 1e-12)


def test_the_bridge_without_uncertainty_falls_back_to_the_softmax():
    mu = torch.tensor([[1.0, -1.0, 0.5]], dtype=DT)
    got = laplace_bridge(mu, torch.zeros(1, 3, 3, dtype=DT))
    assert_rel(got, mu.softmax(-1), 1e-15)


def test_the_object_front_end_passes_prior_mean_and_temperature_through():
    from funcbnn.laplace import LaplaceApproximation

    net, apply_fn, params, (x, y) = _classifier()
    obj = LaplaceApproximation(net, "classification", prior_precision=2.0, prior_mean=0.1, temperature=0.5).fit([(x, y)])
    la, state = fit(apply_fn, params, [(x, y)], "categorical", prior_precision=2.0, prior_mean=0.1, temperature=0.5)
    assert_rel(obj.log_marglik(), la.log_marglik(state), 1e-14)
    assert float(obj.state.temperature) == 0.5 and float(obj.state.prior_mean) == 0.1
