"""One registry of every posterior family and prior; every entry passes the same contract.

The family cases are every ``FAMILIES`` entry's contract example (so a new family
registered with ``example=`` gets this whole suite) plus a few extra states of
the diagonal Gaussian. Tests of an optional capability run on the families that
declare it (``funcbnn.families.capabilities``). Truths are independent of the
family code: sample moments within standard errors, Monte-Carlo identities
(``E_q[-log q] = H[q]``, ``E_q[log q - log p] = KL``), ``torch.distributions``.
"""

from __future__ import annotations

import io
import math

import optree
import pytest
import torch

from conftest import multi_leaf_tree
from funcbnn import families, priors
from funcbnn.families import FAMILIES, capabilities


def _extra_diag_cases():
    def per_leaf_std(params, generator):
        post = families.diag_gaussian()
        return post, post.from_moments(params, {k: torch.full_like(v, 0.1 * (i + 1)) for i, (k, v) in enumerate(params.items())})

    def centred(params, generator):
        post = families.diag_gaussian(init_std=0.3)
        return post, post.init(params)

    return {"diag_gaussian/per_leaf_std": per_leaf_std, "diag_gaussian/centred": centred}


# name -> (params, generator) -> (family, state)
FAMILY_CASES = {**FAMILIES.examples(), **_extra_diag_cases()}


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


def _build(case, dtype=torch.float64):
    params = multi_leaf_tree(dtype)
    post, state = FAMILY_CASES[case](params, torch.Generator().manual_seed(0))
    return params, post, state


def _cases_with(*caps):
    return [c for c in FAMILY_CASES if set(caps) <= capabilities(_build(c)[1])]


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


# --- required: init / sample / kl -----------------------------------------------------------------


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_family_has_the_required_functions(case):
    _, post, _ = _build(case)
    families.check_family(post)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_family_sample_shapes_and_dtypes(case, dtype):
    """Every leaf of a draw leads with the sample axis; where the family has a mean, draws live in
    its space (the parameters' structure, shapes and dtypes). Draws of other families (dropout
    masks) are whatever their model takes."""
    params, post, state = _build(case, dtype)
    draws = [post.sample] + ([post.rsample] if "rsample" in capabilities(post) else [])
    for draw in draws:
        samples = draw(state, 7, generator=_g())
        assert all(leaf.shape[0] == 7 for leaf in optree.tree_leaves(samples))
        assert all(leaf.dtype == dtype for leaf in optree.tree_leaves(samples) if leaf.is_floating_point())
        if "mean" in capabilities(post):
            assert optree.tree_structure(samples) == optree.tree_structure(params)
            for name in params:
                assert samples[name].shape == (7, *params[name].shape), name


@pytest.mark.parametrize("name", FAMILIES.names())
def test_family_init_with_defaults_centres_on_params(name):
    params = multi_leaf_tree(torch.float64)
    try:
        post = FAMILIES.build(name)
    except TypeError:
        pytest.skip(f"{name} has required factory arguments (e.g. a component family)")
    state = post.init(params)
    if "mean" in capabilities(post):
        for leaf, value in post.mean(state).items():
            assert torch.allclose(value, params[leaf]), leaf
    draws = post.sample(state, 3, generator=_g())
    assert all(leaf.shape[0] == 3 for leaf in optree.tree_leaves(draws))


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_family_same_generator_state_gives_same_samples(case):
    _, post, state = _build(case)
    a = post.sample(state, 5, generator=_g(42))
    b = post.sample(state, 5, generator=_g(42))
    c = post.sample(state, 5, generator=_g(43))
    assert all(torch.equal(x, y) for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b)))
    assert not all(torch.equal(x, y) for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(c)))
    if "rsample" in capabilities(post):
        r = post.rsample(state, 5, generator=_g(42))
        for name in a:
            assert torch.allclose(a[name], r[name]), name


@pytest.mark.parametrize("case", [c for c in FAMILY_CASES if c not in _cases_with("log_prob")])
def test_family_without_a_density_refuses_kl_clearly(case):
    params, post, state = _build(case)
    with pytest.raises(ValueError, match="KL"):
        post.kl(state, priors.gaussian(1.0), num_samples=8)


@pytest.mark.parametrize("prior_case", PRIOR_CASES)
@pytest.mark.parametrize("case", _cases_with("log_prob"))
def test_family_kl_is_non_negative_and_reduces(case, prior_case):
    params, post, state = _build(case)
    prior = PRIOR_CASES[prior_case](params)
    kl = post.kl(state, prior, num_samples=4000, generator=_g())
    assert kl.dim() == 0 and torch.isfinite(kl)
    assert kl >= 0
    mean_kl = post.kl(state, prior, reduction="mean", num_samples=4000, generator=_g())
    assert torch.allclose(mean_kl * sum(v.numel() for v in params.values()), kl)


@pytest.mark.parametrize("case", _cases_with("mean", "variance", "log_prob"))
def test_family_kl_is_zero_against_its_own_init_distribution(case):
    """``init`` gives a diagonal Gaussian centred on the params: KL to that prior is 0."""
    params, post, _ = _build(case)
    state = post.init(params)
    std = optree.tree_map(torch.sqrt, post.variance(state))
    # a Monte-Carlo KL (mixtures) is exactly 0 too: log q = log p at every draw
    kl = post.kl(state, priors.gaussian(std=std, mean=post.mean(state)), num_samples=64, generator=_g())
    assert kl.abs() < 1e-9


@pytest.mark.parametrize("case", _cases_with("log_prob"))
def test_family_kl_needs_num_samples_without_a_closed_form(case):
    params, post, state = _build(case)
    with pytest.raises((ValueError, TypeError), match="num_samples|closed form|Gaussian prior"):
        post.kl(state, PRIOR_CASES["scale_mixture"](params))


@pytest.mark.parametrize("case", _cases_with("log_prob", "rsample"))
def test_family_analytic_kl_matches_its_monte_carlo_estimate(case):
    params, post, state = _build(case)
    prior = priors.gaussian(std=0.8)
    n = 20_000
    draws = post.rsample(state, n, generator=_g(3))
    terms = post.log_prob(state, draws) - torch.func.vmap(prior.log_prob)(draws)
    se = terms.std() / math.sqrt(n)
    assert (terms.mean() - post.kl(state, prior)).abs() <= 5 * se + 1e-9


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_family_state_saves_and_loads_with_weights_only(case):
    _, post, state = _build(case)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf)  # torch's default weights_only=True: no safe_globals from the user
    assert type(loaded) is type(state)
    a, b = post.sample(state, 4, generator=_g(1)), post.sample(loaded, 4, generator=_g(1))
    assert all(torch.equal(x, y) for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b)))


# --- capabilities -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _cases_with("mean", "variance"))
def test_family_sample_moments_match_state(case):
    _, post, state = _build(case)
    n = 20_000
    samples = post.sample(state, n, generator=_g())
    mean, var = post.mean(state), post.variance(state)
    for name in samples:
        std = var[name].sqrt()
        # 5 standard errors: a false alarm has probability < 1e-5 per element.
        assert ((samples[name].mean(0) - mean[name]).abs() <= 5 * std / math.sqrt(n)).all(), name
        assert ((samples[name].std(0) - std).abs() <= 5 * std / math.sqrt(2 * n)).all(), name


@pytest.mark.parametrize("case", _cases_with("log_prob", "entropy"))
def test_family_entropy_is_the_expected_negative_log_prob(case):
    _, post, state = _build(case)
    n = 20_000
    nlp = -post.log_prob(state, post.sample(state, n, generator=_g(2)))
    assert nlp.shape == (n,)
    assert (nlp.mean() - post.entropy(state)).abs() <= 5 * nlp.std() / math.sqrt(n)


@pytest.mark.parametrize("case", _cases_with("entropy", "logdet_precision"))
def test_gaussian_entropy_and_logdet_agree(case):
    """For a Gaussian over P numbers, H = P/2 log(2 pi e) - 1/2 log det(precision)."""
    params, post, state = _build(case)
    size = sum(v.numel() for v in params.values())
    want = 0.5 * size * math.log(2 * math.pi * math.e) - 0.5 * post.logdet_precision(state)
    assert torch.allclose(post.entropy(state), want)


@pytest.mark.parametrize("case", _cases_with("functional_variance"))
def test_family_functional_variance_is_the_covariance_of_linearised_outputs(case):
    params, post, state = _build(case)
    g = _g(7)
    jac = {k: torch.randn(2, 3, *v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
    cov = post.functional_variance(state, jac)
    assert cov.shape == (2, 3, 3)
    n = 40_000
    draws = post.sample(state, n, generator=_g(8))
    # f_s = sum_leaf J_leaf theta_s; its sample covariance estimates J Cov J^T
    f = sum(torch.einsum("nop,sp->sno", jac[k].reshape(2, 3, -1), draws[k].reshape(n, -1)) for k in params)
    emp = torch.einsum("sno,snq->noq", f - f.mean(0), f - f.mean(0)) / n
    diag = torch.diagonal(cov, dim1=1, dim2=2)
    se = torch.sqrt((diag[:, :, None] * diag[:, None, :] + cov**2) / n)
    assert ((emp - cov).abs() <= 6 * se).all()


@pytest.mark.parametrize("case", _cases_with("rsample"))
def test_family_rsample_is_differentiable_in_the_state(case):
    _, post, state = _build(case)
    state = optree.tree_map(lambda t: t.clone().requires_grad_(True) if t.is_floating_point() else t, state)
    samples = post.rsample(state, 3, generator=_g())
    loss = sum((s**2).sum() for s in samples.values())
    mean_leaves = optree.tree_leaves(post.mean(state))
    grads = torch.autograd.grad(loss, mean_leaves)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("case", _cases_with("sample_and_kl"))
def test_family_fused_sample_and_kl_equals_the_two_calls(case):
    params, post, state = _build(case)
    for prior in (priors.gaussian(0.9), PRIOR_CASES["scale_mixture"](params)):
        draws, kl = post.sample_and_kl(state, prior, 4, generator=_g(5), kl_samples=16)
        g = _g(5)
        want = post.rsample(state, 4, generator=g)
        want_kl = post.kl(state, prior, num_samples=16, generator=g)
        for k in want:
            assert torch.allclose(draws[k], want[k]), k
        assert torch.allclose(kl, want_kl)


@pytest.mark.parametrize("case", [c for c in FAMILY_CASES if c.startswith("diag_gaussian")])
def test_diag_family_kl_and_log_prob_match_torch_distributions(case):
    params, post, state = _build(case)
    mean, std = post.mean(state), optree.tree_map(torch.sqrt, post.variance(state))
    prior = priors.gaussian(std={k: 0.5 + i for i, k in enumerate(params)})
    _, p_std = prior.moments(params)
    want = sum(
        torch.distributions.kl_divergence(
            torch.distributions.Normal(mean[k], std[k]), torch.distributions.Normal(0.0, p_std[k])
        ).sum()
        for k in params
    )
    assert torch.allclose(post.kl(state, prior), want)
    x = post.sample(state, 3, generator=_g())
    lp = sum(torch.distributions.Normal(mean[k], std[k]).log_prob(x[k]).reshape(3, -1).sum(1) for k in params)
    assert torch.allclose(post.log_prob(state, x), lp)


# --- priors -------------------------------------------------------------------------------------


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
    a = prior.sample(params, 6, generator=_g(5))
    b = prior.sample(params, 6, generator=_g(5))
    for name in params:
        assert a[name].shape == (6, *params[name].shape) and a[name].dtype == dtype
        assert torch.equal(a[name], b[name])


def test_registries_list_every_tested_entry():
    assert set(FAMILIES.names()) == set(FAMILIES.examples()), "every family needs a contract example"
    assert set(priors.PRIORS.names()) == {c.split("/")[0] for c in PRIOR_CASES}
