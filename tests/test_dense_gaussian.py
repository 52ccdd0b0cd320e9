"""The dense Gaussian family against torch.distributions.MultivariateNormal and dense linear algebra (float64)."""

from __future__ import annotations

import pytest
import torch

from conftest import multi_leaf_tree
from funcbnn import priors
from funcbnn.families import DenseGaussianState, dense_gaussian
from funcbnn.families.dense_gaussian import from_precision
from funcbnn.tree import ravel

DT = torch.float64
post = dense_gaussian()


def _precision(n: int = 10, seed: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=DT)
    return m @ m.T / n + 0.5 * torch.eye(n, dtype=DT)


@pytest.fixture
def state() -> DenseGaussianState:
    return from_precision(multi_leaf_tree(DT), _precision())


def _mvn(state: DenseGaussianState) -> torch.distributions.MultivariateNormal:
    P = state.precision_tril @ state.precision_tril.T
    return torch.distributions.MultivariateNormal(ravel(state.mean)[0], precision_matrix=P)


def test_from_precision_keeps_the_precision_in_ravel_order(state):
    torch.testing.assert_close(state.precision_tril @ state.precision_tril.T, _precision())


def test_variance_logdet_entropy_and_log_prob_equal_the_dense_gaussian(state):
    mvn = _mvn(state)
    torch.testing.assert_close(ravel(post.variance(state))[0], torch.diagonal(torch.linalg.inv(_precision())))
    torch.testing.assert_close(post.logdet_precision(state), torch.logdet(_precision()))
    torch.testing.assert_close(post.entropy(state), mvn.entropy())
    draws = post.sample(state, 6, generator=torch.Generator().manual_seed(0))
    flat = torch.func.vmap(lambda t: ravel(t)[0])(draws)
    torch.testing.assert_close(post.log_prob(state, draws), mvn.log_prob(flat))
    torch.testing.assert_close(post.log_prob(state, state.mean), mvn.log_prob(ravel(state.mean)[0]))


@pytest.mark.parametrize("which", ["isotropic", "per_leaf", "centred"])
def test_kl_equals_torch_distributions(state, which):
    prior = {
        "isotropic": priors.gaussian(std=1.0),
        "per_leaf": priors.gaussian(std={"fc.weight": 0.5, "fc.bias": 2.0, "log_scale": 1.5}),
        "centred": priors.gaussian(std=0.8, mean={k: v + 0.3 for k, v in state.mean.items()}),
    }[which]
    p_mean, p_std = prior.moments(state.mean)
    p = torch.distributions.MultivariateNormal(ravel(p_mean)[0], covariance_matrix=torch.diag(ravel(p_std)[0] ** 2))
    torch.testing.assert_close(post.kl(state, prior), torch.distributions.kl_divergence(_mvn(state), p))


def test_functional_variance_equals_j_inverse_precision_jt(state):
    g = torch.Generator().manual_seed(5)
    jac = {k: torch.randn(4, 3, *v.shape, generator=g, dtype=DT) for k, v in state.mean.items()}
    J = torch.func.vmap(torch.func.vmap(lambda t: ravel(t)[0]))(jac)  # (N, O, P)
    want = J @ torch.linalg.inv(_precision()) @ J.transpose(1, 2)
    torch.testing.assert_close(post.functional_variance(state, jac), want)


def test_sample_covariance_matches_the_inverse_precision_within_standard_errors(state):
    s = 20_000
    draws = post.sample(state, s, generator=torch.Generator().manual_seed(1))
    for k, v in state.mean.items():
        assert draws[k].shape == (s, *v.shape)
    flat = torch.func.vmap(lambda t: ravel(t)[0])(draws)
    mu = ravel(state.mean)[0]
    cov = torch.linalg.inv(_precision())
    var = torch.diagonal(cov)
    assert ((flat.mean(0) - mu).abs() <= 5 * (var / s).sqrt()).all()
    centred = flat - mu
    se = ((var[:, None] * var[None, :] + cov.square()) / s).sqrt()
    assert ((centred.T @ centred / s - cov).abs() <= 5 * se).all()


def test_rsample_equals_sample_and_is_differentiable_in_the_cholesky_factor(state):
    state = state._replace(precision_tril=state.precision_tril.clone().requires_grad_(True))
    a = post.sample(state, 3, generator=torch.Generator().manual_seed(2))
    b = post.rsample(state, 3, generator=torch.Generator().manual_seed(2))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    (grad,) = torch.autograd.grad(sum(v.square().sum() for v in b.values()), state.precision_tril)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_init_and_from_moments_are_diagonal_and_match_their_prior():
    params = multi_leaf_tree(DT)
    state = dense_gaussian(init_std=0.2).init(params)
    torch.testing.assert_close(state.precision_tril, torch.eye(10, dtype=DT) * 5)
    assert post.kl(state, priors.gaussian(std=0.2, mean=params)).abs() < 1e-12
    per_leaf = post.from_moments(params, {k: torch.full_like(v, 0.1 * (i + 1)) for i, (k, v) in enumerate(params.items())})
    torch.testing.assert_close(post.variance(per_leaf)["fc.bias"], torch.full((3,), 0.04, dtype=DT))


def test_bad_states_and_arguments_are_refused(state):
    with pytest.raises(TypeError, match="DenseGaussianState"):
        post.sample(tuple(state), 2)
    with pytest.raises(ValueError, match=r"precision_tril must be \(10, 10\)"):
        post.variance(state._replace(precision_tril=torch.eye(3, dtype=DT)))
    with pytest.raises(ValueError, match="positive definite"):
        from_precision(state.mean, -torch.eye(10, dtype=DT))
    with pytest.raises(ValueError, match=r"precision must be \(10, 10\)"):
        from_precision(state.mean, torch.eye(4, dtype=DT))
    with pytest.raises(ValueError, match="num_samples"):
        post.kl(state, priors.scale_mixture())
    with pytest.raises(ValueError, match="jac"):
        post.functional_variance(state, {"fc.weight": torch.zeros(2, 1, 3, 2, dtype=DT)})
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        post.sample(state, 0)
