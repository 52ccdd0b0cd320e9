import math

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import multi_leaf_tree
from funcbnn import families, priors
from funcbnn.families import diag_gaussian, inverse_softplus

post = diag_gaussian()


def _random_state(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mean = optree.tree_map(lambda t: torch.randn(t.shape, generator=g, dtype=dtype), multi_leaf_tree(dtype))
    std = optree.tree_map(lambda t: 0.05 + torch.rand(t.shape, generator=g, dtype=dtype), mean)
    return post.from_moments(mean, std), mean, std


def _torch_kl(mean, std, p_mean, p_std):
    return sum(
        torch.distributions.kl_divergence(
            torch.distributions.Normal(mean[k], std[k]), torch.distributions.Normal(p_mean[k], p_std[k])
        ).sum()
        for k in mean
    )


@given(st.integers(0, 10_000), st.floats(0.05, 5.0))
def test_analytic_kl_equals_torch_distributions(seed, prior_std):
    state, mean, std = _random_state(seed)
    centre = optree.tree_map(lambda t: 0.3 * torch.ones_like(t), mean)
    prior = priors.gaussian(std=prior_std, mean=centre)
    want = _torch_kl(mean, std, centre, optree.tree_map(lambda t: torch.full_like(t, prior_std), mean))
    got = post.kl(state, prior)
    assert torch.allclose(got, want, rtol=1e-10)
    assert got >= 0


def test_monte_carlo_kl_converges_to_the_analytic_value():
    state, mean, std = _random_state(3)
    prior = priors.gaussian(std=0.8)
    exact = post.kl(state, prior)
    n = 40_000
    g = torch.Generator().manual_seed(0)
    draws = post.sample(state, n, generator=torch.Generator().manual_seed(0))
    per_draw = post.log_prob(state, draws) - torch.func.vmap(prior.log_prob)(draws)
    se = per_draw.std() / math.sqrt(n)
    mc = post.kl(state, prior, method="mc", num_samples=n, generator=g)
    assert torch.allclose(mc, per_draw.mean())  # same generator seed, same draws
    assert (mc - exact).abs() < 5 * se


def test_log_prob_and_entropy_match_torch_distributions():
    state, mean, std = _random_state(4)
    draws = post.sample(state, 5, generator=torch.Generator().manual_seed(1))
    want = sum(torch.distributions.Normal(mean[k], std[k]).log_prob(draws[k]).reshape(5, -1).sum(1) for k in mean)
    assert torch.allclose(post.log_prob(state, draws), want)
    single = {k: v[0] for k, v in draws.items()}
    assert torch.allclose(post.log_prob(state, single), want[0])
    want_h = sum(torch.distributions.Normal(mean[k], std[k]).entropy().sum() for k in mean)
    assert torch.allclose(post.entropy(state), want_h)


def test_init_centres_on_params_with_the_requested_std_and_does_not_alias_them(tree):
    state = diag_gaussian(init_std=0.02).init(tree)
    for k in tree:
        assert torch.equal(state.mean[k], tree[k])
        assert state.mean[k].data_ptr() != tree[k].data_ptr()
        assert torch.allclose(torch.nn.functional.softplus(state.rho[k]), torch.full_like(tree[k], 0.02))


def test_fresh_init_draws_reproducible_means_within_the_fan_in_bound(tree):
    fam = diag_gaussian(mean_init="fresh")
    a = fam.init(tree, generator=torch.Generator().manual_seed(0))
    b = fam.init(tree, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a.mean[k], b.mean[k]) for k in tree)
    assert a.mean["fc.weight"].abs().max() <= 1 / math.sqrt(2)
    assert not torch.equal(a.mean["fc.weight"], tree["fc.weight"])


def test_inverse_softplus_round_trips_over_many_scales():
    std = torch.logspace(-8, 3, 50, dtype=torch.float64)
    assert torch.allclose(torch.nn.functional.softplus(inverse_softplus(std)), std, rtol=1e-10)


def test_kl_without_closed_form_needs_a_sample_count(tree):
    state = post.init(tree)
    with pytest.raises(ValueError, match="num_samples"):
        post.kl(state, priors.scale_mixture())
    with pytest.raises(ValueError, match="no closed form"):
        post.kl(state, priors.scale_mixture(), method="analytic")
    with pytest.raises(ValueError, match="reduction"):
        post.kl(state, priors.gaussian(1.0), reduction="none")


def test_bad_arguments_are_rejected_early(tree):
    with pytest.raises(ValueError, match="init_std"):
        diag_gaussian(init_std=-0.1)
    with pytest.raises(ValueError, match="mean_init"):
        diag_gaussian(mean_init="zeros")
    state = post.init(tree)
    with pytest.raises(ValueError, match="num_samples"):
        post.sample(state, 0)
    with pytest.raises(ValueError, match="num_samples"):
        post.sample(state, 2.5)
    with pytest.raises(ValueError, match="std must be finite and positive.*fc.bias"):
        post.from_moments(tree, dict(tree, **{"fc.bias": -torch.ones(3)}))
    with pytest.raises(ValueError, match="state.rho"):
        post.sample(families.DiagGaussianState(tree, {"fc.weight": tree["fc.weight"]}), 2)
    with pytest.raises(ValueError, match="at least one"):
        post.init({})
    with pytest.raises(TypeError, match="floating-point"):
        post.init({"w": torch.zeros(2, dtype=torch.long)})


def test_family_registry_names_unknown_families():
    with pytest.raises(ValueError, match="unknown posterior family .gaussian_process.; registered posterior family names: .*diag_gaussian"):
        families.FAMILIES.build("gaussian_process")


# --- the fused sample_and_kl capability ------------------------------------------------------


@pytest.mark.parametrize("prior", [priors.gaussian(0.7), priors.gaussian(0.5, mean=0.2), priors.scale_mixture()],
                         ids=["scalar-gaussian", "shifted-gaussian", "scale-mixture (Monte Carlo)"])
@pytest.mark.parametrize("num", [1, 3])
def test_sample_and_kl_equals_rsample_then_kl_from_the_same_generator(prior, num):
    state, _, _ = _random_state(5)
    state = families.DiagGaussianState(*({k: v.requires_grad_() for k, v in part.items()} for part in state))
    assert "sample_and_kl" in families.capabilities(post)
    draws, kl_value = post.sample_and_kl(state, prior, num, generator=torch.Generator().manual_seed(2), kl_samples=4)
    g = torch.Generator().manual_seed(2)
    want_draws = post.rsample(state, num, generator=g)
    want_kl = post.kl(state, prior, num_samples=4, generator=g)
    assert all(torch.equal(draws[k], want_draws[k]) for k in draws)
    torch.testing.assert_close(kl_value, want_kl, rtol=1e-12, atol=0)
    # and the same gradients
    leaves = [*state.mean.values(), *state.rho.values()]
    loss = lambda d, k: sum(v.square().sum() for v in d.values()) + k  # noqa: E731
    got = torch.autograd.grad(loss(draws, kl_value), leaves)
    want = torch.autograd.grad(loss(want_draws, want_kl), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_sample_and_kl_with_no_sample_axis_is_one_squeezed_draw():
    state, _, _ = _random_state(6)
    draws, kl_value = post.sample_and_kl(state, priors.gaussian(1.0), None, generator=torch.Generator().manual_seed(0))
    want = post.rsample(state, 1, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(draws[k], want[k][0]) for k in draws)
    torch.testing.assert_close(kl_value, post.kl(state, priors.gaussian(1.0)))


def test_sample_and_kl_checks_its_arguments(tree):
    state = post.init(tree)
    with pytest.raises(ValueError, match="kl_samples"):
        post.sample_and_kl(state, priors.scale_mixture(), 2)
    with pytest.raises(ValueError, match="num_samples"):
        post.sample_and_kl(state, priors.gaussian(1.0), 0)
    with pytest.raises(ValueError, match="state.rho"):
        post.sample_and_kl(families.DiagGaussianState(tree, {"fc.weight": tree["fc.weight"]}), priors.gaussian(1.0), 2)
