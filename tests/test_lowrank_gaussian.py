"""The low-rank-plus-diagonal Gaussian against the dense ``torch.distributions.MultivariateNormal``."""

import math

import optree
import pytest
import torch

from conftest import gen, multi_leaf_tree
from funcbnn import priors
from funcbnn.families.lowrank_gaussian import LowRankGaussianState, lowrank_gaussian
from funcbnn.tree import ravel


def _state(rank=3, dtype=torch.float64):
    params = multi_leaf_tree(dtype)
    g = gen(4)
    return LowRankGaussianState(
        mean=params,
        diag=optree.tree_map(lambda t: 0.05 + torch.rand(t.shape, generator=g, dtype=dtype), params),
        factor=optree.tree_map(lambda t: 0.3 * torch.randn((rank, *t.shape), generator=g, dtype=dtype), params),
    )


def _dense(state):
    mean, _ = ravel(state.mean)
    d, _ = ravel(state.diag)
    rank = optree.tree_leaves(state.factor)[0].shape[0]
    cols = [ravel(optree.tree_map(lambda f: f[r], state.factor))[0] for r in range(rank)]
    U = torch.stack(cols, 1) if cols else mean.new_zeros(mean.numel(), 0)
    return mean, torch.diag(d) + U @ U.T


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_log_prob_entropy_and_kl_match_the_dense_gaussian(rank):
    post, state = lowrank_gaussian(), _state(rank)
    mean, cov = _dense(state)
    mvn = torch.distributions.MultivariateNormal(mean, cov)
    x = post.sample(state, 6, generator=gen(1))
    flat = torch.stack([ravel(optree.tree_map(lambda t: t[i], x))[0] for i in range(6)])
    torch.testing.assert_close(post.log_prob(state, x), mvn.log_prob(flat))
    torch.testing.assert_close(post.entropy(state), mvn.entropy())
    prior = priors.gaussian(std=0.7)
    p = torch.distributions.MultivariateNormal(torch.zeros_like(mean), 0.49 * torch.eye(mean.numel(), dtype=mean.dtype))
    torch.testing.assert_close(post.kl(state, prior), torch.distributions.kl_divergence(mvn, p))
    var, _ = ravel(post.variance(state))
    torch.testing.assert_close(var, torch.diagonal(cov))


def test_samples_have_the_dense_covariance():
    post, state = lowrank_gaussian(), _state(2)
    mean, cov = _dense(state)
    n = 50_000
    x = post.sample(state, n, generator=gen(2))
    flat = torch.cat([t.reshape(n, -1) for t in optree.tree_leaves(x)], 1)
    emp = torch.cov(flat.T, correction=0)
    se = torch.sqrt((torch.diagonal(cov)[:, None] * torch.diagonal(cov)[None] + cov**2) / n)
    assert ((emp - cov).abs() <= 6 * se).all()
    assert ((flat.mean(0) - mean).abs() <= 6 * torch.diagonal(cov).sqrt() / math.sqrt(n)).all()


def test_functional_variance_matches_dense_algebra():
    post, state = lowrank_gaussian(), _state(3)
    _, cov = _dense(state)
    jac = {k: torch.randn(4, 2, *v.shape, generator=gen(3), dtype=v.dtype) for k, v in state.mean.items()}
    J = torch.cat([j.reshape(4, 2, -1) for j in optree.tree_leaves(jac)], -1)  # ravel's leaf order
    torch.testing.assert_close(post.functional_variance(state, jac), J @ cov @ J.transpose(1, 2))


def test_bad_state_is_named():
    post, state = lowrank_gaussian(), _state(2)
    bad = state._replace(factor={**state.factor, "fc.bias": torch.zeros(3, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="rank"):
        post.sample(bad, 2)
    with pytest.raises(ValueError, match="rank must be"):
        lowrank_gaussian(rank=-1)


def test_negative_diagonal_is_refused_before_sampling():
    bad = LowRankGaussianState({"w": torch.zeros(2)}, {"w": torch.tensor([1.0, -1.0])}, {"w": torch.zeros(0, 2)})
    with pytest.raises(ValueError, match="state.diag"):
        lowrank_gaussian().sample(bad, 1)
