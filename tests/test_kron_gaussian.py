"""The Kronecker-factored Gaussian family against brute-force dense algebra in float64.

The reference precision is built from the factors with ``torch.kron`` and a
dense diagonal, independently of the eigenbasis algebra, then everything is
compared with ``torch.linalg`` and ``torch.distributions.MultivariateNormal``.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import multi_leaf_tree
from funcbnn import priors
from funcbnn.families import KronDecomposed, KronEigen, KronGaussianState, KronJacobian, kron_gaussian
from funcbnn.tree import ravel

DT = torch.float64
post = kron_gaussian()


def _spd(n: int, g: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, generator=g, dtype=DT)
    return m @ m.T / n + 0.3 * torch.eye(n, dtype=DT)


def _state(bias_precision: float = 0.4, joint: bool = True) -> KronGaussianState:
    """A joint (weight, bias) block with different prior precisions, a diagonal 0-d leaf.

    ``joint=False`` gives separate ``(weight,)`` and ``(bias,)`` blocks instead.
    """
    g = torch.Generator().manual_seed(3)
    mean = multi_leaf_tree(DT)
    A, G = _spd(3 if joint else 2, g), _spd(3, g)
    eig = lambda a, b: KronEigen(*torch.linalg.eigh(a), *torch.linalg.eigh(b))  # noqa: E731
    if joint:
        blocks = {("fc.weight", "fc.bias"): eig(A, G)}
    else:
        blocks = {("fc.weight",): eig(A, G), ("fc.bias",): eig(torch.full((1, 1), 1.7, dtype=DT), _spd(3, g))}
    curvature = KronDecomposed(blocks, {"log_scale": torch.tensor(2.5, dtype=DT)})
    pp = {"fc.weight": torch.tensor(1.2, dtype=DT), "fc.bias": torch.tensor(bias_precision, dtype=DT),
          "log_scale": torch.tensor(0.7, dtype=DT)}
    return KronGaussianState(mean, curvature, pp, torch.tensor(0.6, dtype=DT))


def _dense_precision(state: KronGaussianState) -> torch.Tensor:
    """``s G (x) A + diag(delta)`` per block, placed in ``ravel(mean)`` order."""
    mean, s = state.mean, state.scale
    _, unravel = ravel(mean)
    index = unravel(torch.arange(sum(v.numel() for v in mean.values()), dtype=DT))
    size = sum(v.numel() for v in mean.values())
    P = torch.zeros(size, size, dtype=DT)
    for key, e in state.curvature.blocks.items():
        A = (e.U * e.a) @ e.U.T
        G = (e.V * e.g) @ e.V.T
        w = index[key[0]].reshape(index[key[0]].shape[0], -1)
        cols = torch.cat([w, index[key[1]][:, None]], 1) if len(key) == 2 else w  # row o: W[o] then b[o]
        idx = cols.reshape(-1).long()
        delta = torch.cat([torch.full_like(w, float(state.prior_precision[key[0]]))]
                          + ([torch.full_like(index[key[1]][:, None], float(state.prior_precision[key[1]]))]
                             if len(key) == 2 else []), 1).reshape(-1)
        P[idx[:, None], idx[None, :]] = s * torch.kron(G, A) + torch.diag(delta)
    for k, v in state.curvature.diag.items():
        i = index[k].reshape(-1).long()
        P[i, i] = (s * v + state.prior_precision[k]).reshape(-1)
    return P


@pytest.fixture(params=["joint_bias", "separate_blocks", "equal_priors"])
def state(request) -> KronGaussianState:
    if request.param == "separate_blocks":
        return _state(joint=False)
    return _state(bias_precision=1.2 if request.param == "equal_priors" else 0.4)


def _mvn(state: KronGaussianState) -> torch.distributions.MultivariateNormal:
    return torch.distributions.MultivariateNormal(ravel(state.mean)[0], precision_matrix=_dense_precision(state))


def test_variance_is_the_diagonal_of_the_inverse_dense_precision(state):
    want = torch.diagonal(torch.linalg.inv(_dense_precision(state)))
    torch.testing.assert_close(ravel(post.variance(state))[0], want)


def test_logdet_entropy_and_log_prob_equal_the_dense_gaussian(state):
    mvn = _mvn(state)
    torch.testing.assert_close(post.logdet_precision(state), torch.logdet(_dense_precision(state)))
    torch.testing.assert_close(post.entropy(state), mvn.entropy())
    draws = post.sample(state, 5, generator=torch.Generator().manual_seed(0))
    flat = torch.stack([ravel({k: v[i] for k, v in draws.items()})[0] for i in range(5)])
    torch.testing.assert_close(post.log_prob(state, draws), mvn.log_prob(flat))
    torch.testing.assert_close(post.log_prob(state, state.mean), mvn.log_prob(ravel(state.mean)[0]))


@pytest.mark.parametrize("prior_std", [1.0, "per_leaf", "centred"])
def test_kl_equals_torch_distributions(state, prior_std):
    if prior_std == "per_leaf":
        prior = priors.gaussian(std={"fc.weight": 0.5, "fc.bias": 2.0, "log_scale": 1.5})
    elif prior_std == "centred":
        prior = priors.gaussian(std=0.8, mean={k: v + 0.3 for k, v in state.mean.items()})
    else:
        prior = priors.gaussian(std=prior_std)
    p_mean, p_std = prior.moments(state.mean)
    p = torch.distributions.MultivariateNormal(ravel(p_mean)[0], covariance_matrix=torch.diag(ravel(p_std)[0] ** 2))
    torch.testing.assert_close(post.kl(state, prior), torch.distributions.kl_divergence(_mvn(state), p))


def test_functional_variance_equals_j_inverse_precision_jt(state):
    g = torch.Generator().manual_seed(5)
    jac = {k: torch.randn(4, 3, *v.shape, generator=g, dtype=DT) for k, v in state.mean.items()}
    J = torch.stack([torch.stack([ravel({k: v[n, o] for k, v in jac.items()})[0] for o in range(3)]) for n in range(4)])
    want = J @ torch.linalg.inv(_dense_precision(state)) @ J.transpose(1, 2)
    torch.testing.assert_close(post.functional_variance(state, jac), want)
    # The rotated Jacobian is reusable under other hyperparameters and gives the same numbers.
    rotated = post.project_jacobian(state, jac)
    assert isinstance(rotated, KronJacobian)
    other = state._replace(prior_precision={k: v * 3 for k, v in state.prior_precision.items()}, scale=state.scale / 2)
    torch.testing.assert_close(post.functional_variance(other, rotated), post.functional_variance(other, jac))


def test_sample_covariance_matches_the_inverse_precision_within_standard_errors(state):
    s = 20_000
    draws = post.sample(state, s, generator=torch.Generator().manual_seed(1))
    flat = torch.func.vmap(lambda t: ravel(t)[0])(draws)
    mu = ravel(state.mean)[0]
    cov = torch.linalg.inv(_dense_precision(state))
    var = torch.diagonal(cov)
    assert ((flat.mean(0) - mu).abs() <= 5 * (var / s).sqrt()).all()
    centred = flat - mu
    se = ((var[:, None] * var[None, :] + cov.square()) / s).sqrt()  # std error of a Gaussian covariance entry
    assert ((centred.T @ centred / s - cov).abs() <= 5 * se).all()


def test_rsample_equals_sample_and_carries_gradients_to_the_hyperparameters():
    state = _state()
    state = state._replace(prior_precision={k: v.clone().requires_grad_(True) for k, v in state.prior_precision.items()})
    a = post.sample(state, 3, generator=torch.Generator().manual_seed(2))
    b = post.rsample(state, 3, generator=torch.Generator().manual_seed(2))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        assert not a[k].requires_grad
    grads = torch.autograd.grad(sum(v.square().sum() for v in b.values()), list(state.prior_precision.values()))
    assert all(torch.isfinite(g) and g != 0 for g in grads)


def test_init_is_data_free_and_kl_to_the_matching_prior_is_zero():
    params = multi_leaf_tree(DT)
    state = kron_gaussian(init_std=0.3).init(params)
    assert not state.curvature.blocks and set(state.curvature.diag) == set(params)
    for k, v in post.variance(state).items():
        torch.testing.assert_close(v, torch.full_like(params[k], 0.09))
    assert post.kl(state, priors.gaussian(std=0.3, mean=params)).abs() < 1e-12
    assert post.kl(state, priors.gaussian(std=0.3, mean=params), method="mc", num_samples=8,
                   generator=torch.Generator().manual_seed(0)).abs() < 1e-10


def test_bad_states_and_arguments_are_refused():
    state = _state()
    with pytest.raises(TypeError, match="KronGaussianState"):
        post.sample(tuple(state), 2)
    with pytest.raises(ValueError, match="cover every leaf"):
        post.variance(state._replace(mean={**state.mean, "extra": torch.zeros(2, dtype=DT)}))
    with pytest.raises(ValueError, match="prior_precision has no value"):
        post.variance(state._replace(prior_precision={"fc.weight": torch.tensor(1.0, dtype=DT)}))
    with pytest.raises(ValueError, match=r"prior_precision\['fc.bias'\] must be finite and positive"):
        post.logdet_precision(state._replace(prior_precision={**state.prior_precision, "fc.bias": torch.tensor(-1.0)}))
    with pytest.raises(ValueError, match="num_samples"):
        post.kl(state, priors.scale_mixture())
    with pytest.raises(ValueError, match="constant over the leaf"):
        post.from_moments(state.mean, {k: torch.rand(v.shape, dtype=DT) + 0.5 for k, v in state.mean.items()})
    with pytest.raises(ValueError, match="init_std"):
        kron_gaussian(init_std=0.0)
    with pytest.raises(TypeError, match="dict of tensors"):
        kron_gaussian().init([torch.zeros(2)])


def test_float32_states_keep_their_dtype():
    params = multi_leaf_tree(torch.float32)
    state = kron_gaussian(init_std=0.5).init(params)
    draws = post.sample(state, 4, generator=torch.Generator().manual_seed(0))
    assert all(v.dtype == torch.float32 for v in draws.values())
    assert post.kl(state, priors.gaussian(1.0)).dtype == torch.float32
    assert math.isfinite(float(post.entropy(state)))


def test_outer_product_factors_give_the_dense_functional_variance():
    # A joint (weight, bias) block whose Jacobian is g a^T: the factored path never forms it.
    state = _state()
    g = torch.Generator().manual_seed(6)
    grads = torch.randn(3, 4, 3, generator=g, dtype=DT)  # (O, N, out)
    inputs = torch.cat([torch.randn(4, 2, generator=g, dtype=DT), torch.ones(4, 1, dtype=DT)], 1)  # [a | 1]
    dense = torch.einsum("oni,nd->noid", grads, inputs)  # (N, O, out, d)
    jac = {"fc.weight": dense[..., :-1], "fc.bias": dense[..., -1],
           "log_scale": torch.randn(4, 3, generator=g, dtype=DT)}
    factored = post.project_jacobian(state, {"log_scale": jac["log_scale"]}, {("fc.weight", "fc.bias"): (grads, inputs)})
    assert not factored.blocks and set(factored.factors) == {("fc.weight", "fc.bias")}
    torch.testing.assert_close(post.functional_variance(state, factored), post.functional_variance(state, jac))
