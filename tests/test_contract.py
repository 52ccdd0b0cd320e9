"""One registry of every posterior family and prior; every entry passes the same contract.

A new family or prior gets the whole suite by adding one line below.
"""

from __future__ import annotations

import math

import optree
import pytest
import torch

from conftest import multi_leaf_tree
from funcbnn import families, priors

# name -> (family, how to build a state from params)
FAMILY_CASES = {
    "diag_gaussian/centred": lambda: (families.diag_gaussian(init_std=0.3), None),
    "diag_gaussian/fresh": lambda: (families.diag_gaussian(init_std=0.2, mean_init="fresh"), None),
    "diag_gaussian/per_leaf_std": lambda: (
        families.diag_gaussian(),
        lambda post, p: post.from_moments(p, {k: torch.full_like(v, 0.1 * (i + 1)) for i, (k, v) in enumerate(p.items())}),
    ),
}


def _custom_sample(like, n, generator=None):
    return optree.tree_map(lambda t: 0.5 * torch.randn((n, *t.shape), dtype=t.dtype, generator=generator), like)


# name -> prior builder taking the params tree (so a prior can be centred on it)
PRIOR_CASES = {
    "gaussian/isotropic": lambda p: priors.gaussian(std=1.0),
    "gaussian/per_leaf": lambda p: priors.gaussian(std={k: 0.5 + i for i, k in enumerate(p)}),
    "gaussian/centred": lambda p: priors.gaussian(std=0.7, mean=p),
    "scale_mixture": lambda p: priors.scale_mixture(pi=0.25, sigma1=1.5, sigma2=math.exp(-6)),
    "log_prob": lambda p: priors.from_log_prob(
        lambda q: sum(torch.distributions.Normal(0.0, 0.5).log_prob(v).sum() for v in q.values()),
        _custom_sample,
    ),
}

DTYPES = [torch.float32, torch.float64]


def _build(case, params):
    post, make_state = FAMILY_CASES[case]()
    state = post.init(params, generator=torch.Generator().manual_seed(0)) if make_state is None else make_state(post, params)
    return post, state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_family_sample_shapes_and_dtypes(case, dtype):
    params = multi_leaf_tree(dtype)
    post, state = _build(case, params)
    for draw in (post.sample, post.rsample):
        samples = draw(state, 7, generator=torch.Generator().manual_seed(0))
        assert optree.tree_structure(samples) == optree.tree_structure(params)
        for name in params:
            assert samples[name].shape == (7, *params[name].shape), name
            assert samples[name].dtype == dtype


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_family_same_generator_state_gives_same_samples(case):
    post, state = _build(case, multi_leaf_tree())
    a = post.sample(state, 5, generator=torch.Generator().manual_seed(42))
    b = post.sample(state, 5, generator=torch.Generator().manual_seed(42))
    c = post.sample(state, 5, generator=torch.Generator().manual_seed(43))
    r = post.rsample(state, 5, generator=torch.Generator().manual_seed(42))
    for name in a:
        assert torch.equal(a[name], b[name])
        assert torch.allclose(a[name], r[name])
        assert not torch.equal(a[name], c[name])


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_family_sample_moments_match_state(case):
    post, state = _build(case, multi_leaf_tree(torch.float64))
    n = 20_000
    samples = post.sample(state, n, generator=torch.Generator().manual_seed(0))
    mean, std = post.mean(state), post.std(state)
    for name in samples:
        # 5 standard errors: a false alarm has probability < 1e-5 per element.
        se_mean = std[name] / math.sqrt(n)
        assert ((samples[name].mean(0) - mean[name]).abs() <= 5 * se_mean).all(), name
        se_std = std[name] / math.sqrt(2 * n)
        assert ((samples[name].std(0) - std[name]).abs() <= 5 * se_std).all(), name


@pytest.mark.parametrize("prior_case", PRIOR_CASES)
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_family_kl_is_non_negative(case, prior_case):
    params = multi_leaf_tree(torch.float64)
    post, state = _build(case, params)
    prior = PRIOR_CASES[prior_case](params)
    kl = post.kl(state, prior, num_samples=4000, generator=torch.Generator().manual_seed(0))
    assert kl.dim() == 0 and torch.isfinite(kl)
    assert kl >= 0
    mean_kl = post.kl(state, prior, reduction="mean", num_samples=4000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(mean_kl * sum(v.numel() for v in params.values()), kl)


@pytest.mark.parametrize("prior_case", [c for c in PRIOR_CASES if c.startswith("gaussian")])
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_family_kl_is_zero_when_q_equals_prior(case, prior_case):
    params = multi_leaf_tree(torch.float64)
    post, _ = _build(case, params)
    prior = PRIOR_CASES[prior_case](params)
    state = post.from_moments(*prior.moments(params))
    assert post.kl(state, prior).abs() < 1e-10
    mc = post.kl(state, prior, method="mc", num_samples=64, generator=torch.Generator().manual_seed(0))
    assert mc.abs() < 1e-10  # log q = log p pointwise, so every draw contributes exactly 0


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_family_kl_and_rsample_are_differentiable_in_the_state(case):
    post, state = _build(case, multi_leaf_tree(torch.float64))
    state = optree.tree_map(lambda t: t.clone().requires_grad_(True), state)
    samples = post.rsample(state, 3, generator=torch.Generator().manual_seed(0))
    loss = post.kl(state, priors.gaussian(1.0)) + sum((s**2).sum() for s in samples.values())
    grads = torch.autograd.grad(loss, optree.tree_leaves(state))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prior_case", PRIOR_CASES)
def test_prior_log_prob_is_a_finite_scalar_of_the_params_dtype(prior_case, dtype):
    params = multi_leaf_tree(dtype)
    lp = PRIOR_CASES[prior_case](params).log_prob(params)
    assert lp.dim() == 0 and lp.dtype == dtype and torch.isfinite(lp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prior_case", PRIOR_CASES)
def test_prior_samples_have_shapes_dtypes_and_reproducibility(prior_case, dtype):
    params = multi_leaf_tree(dtype)
    prior = PRIOR_CASES[prior_case](params)
    a = prior.sample(params, 6, generator=torch.Generator().manual_seed(5))
    b = prior.sample(params, 6, generator=torch.Generator().manual_seed(5))
    for name in params:
        assert a[name].shape == (6, *params[name].shape) and a[name].dtype == dtype
        assert torch.equal(a[name], b[name])


def test_registries_list_every_tested_entry():
    assert set(families.FAMILIES.names()) == {c.split("/")[0] for c in FAMILY_CASES}
    assert set(priors.PRIORS.names()) == {c.split("/")[0] for c in PRIOR_CASES}
