"""Tests of the object-style adapter ``funcbnn.nn`` against closed forms and the functional core."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import gen as _gen
from conftest import make_mlp
from torch import nn

import funcbnn
from funcbnn import likelihoods, priors, vi
from funcbnn.families._kl import prior_log_prob_batched
from funcbnn.local_reparam import local_reparameterize
from funcbnn.nn import (
    DEFAULT_INIT_STD,
    POSTERIORS,
    BayesByBackpropMLP,
    BayesianLinear,
    BayesianModule,
    GaussianPosterior,
    PretrainedGaussianPosterior,
    VariationalPosterior,
    predict_vi_uq,
    vi_elbo_step,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(n_per: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.tensor([[0.0, 3.0], [-2.6, -1.5], [2.6, -1.5]])
    x = torch.cat([c + 0.8 * torch.randn(n_per, 2, generator=g) for c in centres])
    return x, torch.arange(3).repeat_interleave(n_per)


# ---------------------------------------------------------------------------------------------
# exactness: conjugate Bayesian linear regression


def test_vi_recovers_optimal_mean_field_gaussian_of_bayesian_linear_regression():
    """For y = w.x + b + N(0, sigma^2) and prior N(0, s0^2 I) on (w, b), the exact posterior is
    N(A^-1 X'y / sigma^2, A^-1) with A = X'X / sigma^2 + I / s0^2, and the best mean-field
    Gaussian (minimiser of KL(q || posterior)) has the same mean and variances 1 / diag(A).

    Tolerance: one step's Monte-Carlo noise, expressed as the Newton displacement of the mean,
    is about sd / sqrt(S) = 0.125 posterior sd with S = 64 draws; averaging the last 250 iterates
    (after a learning-rate drop) brings it to ~0.01 sd and ~1% in variance (measured <= 0.013 sd
    and <= 1.2% over 6 seeds). We allow 0.1 sd and 5%, which a wrong KL scaling (e.g. deepuq's
    KL * batch size: variances ~64x too small) or a wrong softplus/rho map fails by far.
    """
    torch.manual_seed(0)
    dtype = torch.float64
    g = _gen(0)
    n, d, sigma, s0 = 64, 2, 0.5, 1.0
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = (x @ torch.tensor([1.0, -0.5], dtype=dtype) + 0.3 + sigma * torch.randn(n, generator=g, dtype=dtype))[:, None]
    xa = torch.cat([x, torch.ones(n, 1, dtype=dtype)], 1)  # the bias is the last weight
    precision = xa.T @ xa / sigma**2 + torch.eye(d + 1, dtype=dtype) / s0**2
    exact_mean = torch.linalg.solve(precision, xa.T @ y[:, 0] / sigma**2)
    exact_var = 1.0 / torch.diagonal(precision)

    model = BayesianModule(
        nn.Linear(d, 1, dtype=dtype),
        posterior=("gaussian", {"init_std": 0.3}),
        prior=("gaussian", {"std": s0}),
        generator=g,
    )
    lik = likelihoods.gaussian(sigma)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    steps, keep = 600, 250
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [steps // 2], 0.2)
    mu_avg = torch.zeros(d + 1, dtype=dtype)
    rho_avg = torch.zeros(d + 1, dtype=dtype)
    w, b = model.posterior("weight"), model.posterior("bias")
    for t in range(steps):
        opt.zero_grad()
        model.elbo(x, y, n, likelihood=lik, num_samples=64, generator=g, method="vmap").loss.backward()
        opt.step()
        sched.step()
        if t >= steps - keep:
            mu_avg += torch.cat([w.mu.detach()[0], b.mu.detach()]) / keep
            rho_avg += torch.cat([w.rho.detach()[0], b.rho.detach()]) / keep
    mean_err = (mu_avg - exact_mean) / exact_var.sqrt()
    var_ratio = F.softplus(rho_avg) ** 2 / exact_var
    assert mean_err.abs().max() < 0.1, mean_err
    assert (var_ratio - 1).abs().max() < 0.05, var_ratio


# ---------------------------------------------------------------------------------------------
# the adapter is the functional core


@pytest.mark.parametrize("prior_spec", [("gaussian", {"std": 0.5}), ("scale_mixture", {"pi": 0.5, "sigma2": 0.1})])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_adapter_elbo_and_gradients_equal_functional_api(prior_spec, num_samples):
    net = make_mlp((4, 8, 3))
    x, y = torch.randn(10, 4, generator=_gen(1)), torch.randint(0, 3, (10,), generator=_gen(2))
    model = BayesianModule(net, posterior="pretrained_gaussian", prior=prior_spec)

    apply_fn, params, _ = funcbnn.functionalize(net)
    post = funcbnn.diag_gaussian(init_std=DEFAULT_INIT_STD)
    state = vi.trainable(post.init(params))
    prior = priors.PRIORS.build(prior_spec[0], **prior_spec[1])

    ours = model.elbo(x, y, 50, num_samples=num_samples, generator=_gen(7), method="loop")
    ref = vi.elbo(apply_fn, post, state, prior, (x, y), 50, num_samples=num_samples, generator=_gen(7), method="loop")
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    ours.loss.backward()
    ref.loss.backward()
    for name in params:
        torch.testing.assert_close(model.posterior(name).mu.grad, state.mean[name].grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(model.posterior(name).rho.grad, state.rho[name].grad, rtol=1e-5, atol=1e-7)


def test_adapter_state_is_the_variational_parameters_without_copy():
    model = BayesianModule(make_mlp())
    state = model.state()
    for name, mu in state.mean.items():
        assert mu is model.posterior(name).mu
        assert state.rho[name] is model.posterior(name).rho


def test_built_prior_objects_are_accepted():
    for prior in (priors.gaussian(0.3), priors.scale_mixture()):
        assert BayesianModule(make_mlp(), prior=prior).prior is prior


# ---------------------------------------------------------------------------------------------
# forward, parameters, the wrapped module


def test_forward_draws_fresh_weights_and_the_same_generator_seed_repeats_them():
    model = BayesianModule(make_mlp(), posterior=("pretrained_gaussian", {"init_std": 0.1}))
    x = torch.randn(5, 4, generator=_gen(1))
    assert not torch.equal(model(x), model(x))
    torch.testing.assert_close(model(x, generator=_gen(3)), model(x, generator=_gen(3)), rtol=0, atol=0)
    draws = model.sample_parameters(generator=_gen(3))
    torch.testing.assert_close(model(x, generator=_gen(3)), model.apply_fn(draws, x), rtol=0, atol=0)


def test_forward_without_sampling_uses_the_posterior_mean():
    net = make_mlp()
    x = torch.randn(5, 4, generator=_gen(1))
    model = BayesianModule(net, posterior="pretrained_gaussian")
    torch.testing.assert_close(model(x, sample=False), net(x))  # mean = the pretrained weights
    model = BayesianModule(net, generator=_gen(0))  # fresh means
    means = {n: model.posterior(n).mu for n, _ in net.named_parameters()}
    torch.testing.assert_close(model(x, sample=False), torch.func.functional_call(net, means, (x,)))
    assert model(x, sample=False).requires_grad  # trainable through the mean (a deterministic warm-up)


def test_parameters_are_exactly_the_variational_parameters_and_train_without_touching_the_module():
    net = make_mlp()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = BayesianModule(net, posterior="pretrained_gaussian")
    expected = {f"posteriors.{n.replace('.', ':')}.{v}" for n, _ in net.named_parameters() for v in ("mu", "rho")}
    assert {n for n, _ in model.named_parameters()} == expected
    assert sum(p.numel() for p in model.parameters()) == 2 * sum(p.numel() for p in net.parameters())

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    old = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 4, generator=_gen(1)), torch.randint(0, 3, (8,), generator=_gen(2))
    for _ in range(3):
        opt.zero_grad()
        model.elbo(x, y, 8, generator=_gen(0)).loss.backward()
        opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(old, model.parameters()))
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_frozen_parameters_stay_deterministic():
    net = make_mlp()
    net[0].bias.requires_grad_(False)
    model = BayesianModule(net, posterior="pretrained_gaussian")
    assert "0:bias" not in model.posteriors
    torch.testing.assert_close(model(torch.ones(2, 4), sample=False), net(torch.ones(2, 4)))


# ---------------------------------------------------------------------------------------------
# state_dict, dtype, local reparameterisation


def test_state_dict_round_trip_gives_identical_outputs():
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    net[1].running_mean.uniform_(-1, 1)  # a non-default buffer must round-trip too
    trained = BayesianModule(net, generator=_gen(0))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1)
    fresh = BayesianModule(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)))
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(5, 4, generator=_gen(1))
    torch.testing.assert_close(fresh(x, generator=_gen(4)), trained(x, generator=_gen(4)), rtol=0, atol=0)
    torch.testing.assert_close(fresh(x, sample=False), trained(x, sample=False), rtol=0, atol=0)


def test_to_float64_converts_posteriors_buffers_and_frozen_parameters():
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    net[2].bias.requires_grad_(False)
    model = BayesianModule(net).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(post.dtype == torch.float64 for post in model.posteriors.values())
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert model(x).dtype == torch.float64
    assert model.elbo(x, y, 5).loss.dtype == torch.float64
    assert predict_vi_uq(model, x, 4, apply_softmax=True).probs.dtype == torch.float64


def test_local_reparam_elbo_equals_the_functional_api():
    net = make_mlp()
    x, y = torch.randn(10, 4, generator=_gen(1)), torch.randint(0, 3, (10,), generator=_gen(2))
    model = BayesianModule(net, posterior="pretrained_gaussian", prior=("gaussian", {"std": 0.5}), local_reparam=True)
    apply_fn, params, _ = local_reparameterize(net)
    post = funcbnn.diag_gaussian(init_std=DEFAULT_INIT_STD)
    ours = model.elbo(x, y, 50, num_samples=2, generator=_gen(7))
    ref = vi.elbo(apply_fn, post, post.init(params), priors.gaussian(0.5), (x, y), 50, num_samples=2, generator=_gen(7))
    torch.testing.assert_close(ours.loss, ref.loss)
    assert model(x).shape == (10, 3)


# ---------------------------------------------------------------------------------------------
# traps of the seed libraries' signatures


def test_bayesian_linear_rejects_a_third_positional_argument_instead_of_reading_it_as_bias():
    with pytest.raises(TypeError, match=r"extra positional argument\(s\) \(0.5,\).*compat.deepuq"):
        BayesianLinear(4, 3, 0.5)
    with pytest.raises(TypeError, match="bias must be a bool"):
        BayesianLinear(4, 3, bias=0.5)
    layer = BayesianLinear(4, 3, bias=False, prior_sigma=0.5, generator=_gen(0))
    assert list(layer.posteriors) == ["weight"] and layer.prior.std == 0.5


class _SeedStylePosterior(VariationalPosterior):
    """torchbayesian's pattern: a one-draw ``sample_parameters()`` from the global RNG."""

    def __init__(self, shape, *, dtype=None, device=None):
        super().__init__(shape, dtype=dtype, device=device)
        self.mu = nn.Parameter(torch.zeros(self.shape, dtype=dtype, device=device))
        self.rho = nn.Parameter(torch.full(self.shape, -1.0, dtype=dtype, device=device))

    @property
    def distribution(self):
        return torch.distributions.Normal(self.mu, F.softplus(self.rho))

    def sample_parameters(self):
        return self.mu + F.softplus(self.rho) * torch.randn_like(self.mu)


def test_a_posterior_with_a_one_draw_sample_parameters_gets_batched_reproducible_draws():
    POSTERIORS.register("_test_seed_style")(_SeedStylePosterior)
    try:
        model = BayesianModule(make_mlp(), posterior="_test_seed_style")
        x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
        assert model(x).shape == (6, 3)
        draws = model.sample_parameters(5, generator=_gen(3))
        again = model.sample_parameters(5, generator=_gen(3))
        assert all(torch.equal(draws[k], again[k]) for k in draws)
        assert draws["0.weight"].shape == (5, 8, 4) and not torch.equal(draws["0.weight"][0], draws["0.weight"][1])
        # the global RNG is left where it was: a generator's draws do not consume it
        torch.manual_seed(0)
        model.sample_parameters(2, generator=_gen(3))
        after = torch.rand(())
        torch.manual_seed(0)
        assert torch.equal(after, torch.rand(()))
        assert model.sample_outputs(x, 4, generator=_gen(1)).shape == (4, 6, 3)
        info = model.elbo(x, y, 60, num_samples=2, generator=_gen(0))
        info.loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        sigma = F.softplus(torch.tensor(-1.0))
        per_weight = -torch.log(sigma) + sigma**2 / 2 - 0.5  # KL(N(0, s^2) || N(0, 1))
        numel = sum(p.numel() for p in model.parameters()) // 2
        torch.testing.assert_close(model.kl_divergence(), per_weight * numel)
    finally:
        POSTERIORS._factories.pop("_test_seed_style")


def test_a_posterior_whose_sample_parameters_fits_neither_pattern_fails_when_defined():
    with pytest.raises(TypeError, match="sample_parameters must take no argument.*num_samples=None"):

        class Bad(VariationalPosterior):
            def sample_parameters(self, n, k):
                return None


# ---------------------------------------------------------------------------------------------
# registries and errors


def test_a_posterior_registered_with_the_decorator_is_usable_by_name():
    @POSTERIORS.register("_test_fixed_std")
    class FixedStdGaussian(VariationalPosterior):
        """A Gaussian with a learned mean and a fixed std: a variational posterior of its own."""

        def __init__(self, shape, *, std: float = 0.1, dtype=None, device=None):
            super().__init__(shape, dtype=dtype, device=device)
            self.std = std
            self.mu = nn.Parameter(torch.zeros(self.shape, dtype=dtype, device=device))

        @property
        def distribution(self):
            return torch.distributions.Normal(self.mu, torch.full_like(self.mu, self.std))

        def sample_parameters(self, num_samples=None, *, generator=None):
            lead = () if num_samples is None else (num_samples,)
            eps = torch.empty(lead + tuple(self.shape), dtype=self.mu.dtype).normal_(generator=generator)
            return self.mu + self.std * eps

    try:
        spec = ("_test_fixed_std", {"std": 0.2})
        model = BayesianModule(make_mlp(), posterior=spec, prior=("gaussian", {"std": 1.0}))
        assert all(isinstance(p, FixedStdGaussian) and p.std == 0.2 for p in model.posteriors.values())
        assert [n for n, _ in model.named_parameters()] == [f"posteriors.{k}.mu" for k in model.posteriors]
        x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
        info = model.elbo(x, y, 6, num_samples=2, generator=_gen(0))
        info.loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        # analytic KL via torch.distributions: N(0, 0.2^2) vs N(0, 1) per weight
        per_weight = math.log(1 / 0.2) + 0.2**2 / 2 - 0.5
        numel = sum(p.numel() for p in model.parameters())
        torch.testing.assert_close(model.kl_divergence(), torch.tensor(per_weight * numel))
        torch.testing.assert_close(info.kl, model.kl_divergence())
        with pytest.raises(TypeError, match="'scale'"):
            BayesianModule(make_mlp(), posterior=("_test_fixed_std", {"scale": 0.2}))
        with pytest.raises(TypeError, match="state"):
            model.state()
        with pytest.raises(ValueError, match="local_reparam"):
            BayesianModule(make_mlp(), posterior="_test_fixed_std", local_reparam=True)
    finally:
        POSTERIORS._factories.pop("_test_fixed_std")


def test_a_function_registered_as_posterior_is_called_per_parameter():
    @POSTERIORS.register("_test_tight")
    def tight(param, *, std=1e-3):
        return PretrainedGaussianPosterior(param, init_std=std)

    try:
        model = BayesianModule(make_mlp(), posterior=("_test_tight", {"std": 0.01}))
        assert all(torch.allclose(p.sigma, torch.tensor(0.01)) for p in model.posteriors.values())
        with pytest.raises(TypeError, match="'init_std'"):
            BayesianModule(make_mlp(), posterior=("_test_tight", {"init_std": 0.01}))
    finally:
        POSTERIORS._factories.pop("_test_tight")


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(ValueError, match="unknown variational posterior 'nope'.*gaussian, pretrained_gaussian"):
        BayesianModule(make_mlp(), posterior="nope")
    with pytest.raises(ValueError, match="unknown prior 'nope'.*gaussian.*scale_mixture"):
        BayesianModule(make_mlp(), prior="nope")


def test_bad_keyword_arguments_name_the_key():
    with pytest.raises(TypeError, match=r"\['init_sd'\]"):
        BayesianModule(make_mlp(), posterior=("gaussian", {"init_sd": 0.1}))
    with pytest.raises(TypeError, match=r"\['sd'\]"):
        BayesianModule(make_mlp(), prior=("gaussian", {"sd": 0.1}))
    with pytest.raises(TypeError, match="name or a \\(name, kwargs\\) pair"):
        BayesianModule(make_mlp(), posterior=("gaussian", 0.1))
    with pytest.raises(ValueError, match="init_std"):
        BayesianModule(make_mlp(), posterior=("gaussian", {"init_std": -1.0}))


# ---------------------------------------------------------------------------------------------
# KL


def test_analytic_kl_equals_the_torch_distributions_sum_and_mean_divides_by_the_weight_count():
    model = BayesianModule(make_mlp(), prior=("gaussian", {"std": 0.3}), generator=_gen(0))
    with torch.no_grad():
        for post in model.posteriors.values():
            post.rho.uniform_(-4, 0, generator=_gen(5))
    ref = sum(
        torch.distributions.kl_divergence(p.distribution, torch.distributions.Normal(0.0, 0.3)).sum()
        for p in model.posteriors.values()
    )
    kl = model.kl_divergence()
    torch.testing.assert_close(kl, ref)
    numel = sum(p.shape.numel() for p in model.posteriors.values())
    torch.testing.assert_close(model.kl_divergence(reduction="mean"), kl / numel)
    torch.testing.assert_close(model.kl(), kl)
    with pytest.raises(ValueError, match="reduction"):
        model.kl_divergence(reduction="none")


def test_monte_carlo_kl_for_the_scale_mixture_is_within_its_standard_error_of_a_big_sample_estimate():
    model = BayesianModule(make_mlp(), prior=("scale_mixture", {"pi": 0.5, "sigma2": 0.05}), generator=_gen(0))
    with pytest.raises(ValueError, match="approx_num_samples"):
        model.kl_divergence()
    with torch.no_grad():  # the per-draw terms log q(w) - log p(w) of a big reference sample
        state = model.state()
        draws = model.sample_parameters(20000, generator=_gen(1))
        terms = funcbnn.diag_gaussian().log_prob(state, draws) - prior_log_prob_batched(model.prior, draws)
        reference, sd = terms.mean(), terms.std()
        num = 200
        estimate = model.kl_divergence(approx_num_samples=num, generator=_gen(2))
        se = sd * math.sqrt(1 / num + 1 / 20000)
        assert abs(estimate - reference) < 4 * se, (estimate, reference, se)
        mean_kl = model.kl_divergence(reduction="mean", approx_num_samples=num, generator=_gen(2))
        numel = sum(p.numel() for p in state.mean.values())
        torch.testing.assert_close(mean_kl, estimate / numel)
    # the gradient flows through the reparameterised draws
    model.kl_divergence(approx_num_samples=4, generator=_gen(3)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# per-parameter posterior objects


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 2), (3,), ()])
def test_posterior_objects_have_the_parameters_shape_dtype_and_device(shape, dtype):
    param = torch.randn(shape, dtype=dtype, generator=_gen(0))
    for cls in (GaussianPosterior, PretrainedGaussianPosterior):
        post = cls.from_param(param, init_std=0.2)
        assert post.shape == param.shape and post.dtype == dtype and post.device == param.device
        assert post.distribution.batch_shape == param.shape
        torch.testing.assert_close(post.sigma, torch.full(shape, 0.2, dtype=dtype))
        assert post.sample_parameters().shape == param.shape
        assert post.sample_parameters(5).shape == (5, *shape)
        assert post.sample_parameters(5).dtype == dtype
        assert post().shape == param.shape
        a, b = post.sample_parameters(4, generator=_gen(1)), post.sample_parameters(4, generator=_gen(1))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    pre = PretrainedGaussianPosterior.from_param(param)
    torch.testing.assert_close(pre.mu, param, rtol=0, atol=0)
    assert pre.mu.data_ptr() != param.data_ptr()  # a copy: training it never writes to the model
    torch.testing.assert_close(pre.distribution.mean, param, rtol=0, atol=0)
    post = GaussianPosterior(shape, dtype=dtype).to(torch.float16)
    assert post.dtype == torch.float16


def test_posterior_sample_moments_match_mean_and_softplus_rho():
    post = PretrainedGaussianPosterior(torch.tensor([0.5, -1.0]), init_std=0.3)
    s = post.sample_parameters(40000, generator=_gen(0)).detach()
    # SE of the mean is 0.3 / 200 = 1.5e-3; of the std about 0.3 / sqrt(2 * 40000) ~ 1.1e-3
    torch.testing.assert_close(s.mean(0), post.mu.detach(), rtol=0, atol=6e-3)
    torch.testing.assert_close(s.std(0), F.softplus(post.rho).detach(), rtol=0, atol=5e-3)


# ---------------------------------------------------------------------------------------------
# deepuq-style conveniences


@pytest.mark.parametrize(
    "make",
    [lambda g: BayesianLinear(2, 3, generator=g), lambda g: BayesByBackpropMLP(2, [16], 3, generator=g)],
    ids=["BayesianLinear", "BayesByBackpropMLP"],
)
def test_bayes_by_backprop_models_learn_blobs(make):
    g = _gen(0)
    x, y = _blobs(100, g)
    x_test, y_test = _blobs(100, g)
    model = make(g)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    num_batches = 3
    for _ in range(25):
        order = torch.randperm(len(y), generator=g)
        for idx in order.chunk(num_batches):
            opt.zero_grad()
            vi_elbo_step(model, x[idx], y[idx], num_batches, generator=g).loss.backward()
            opt.step()
    summary = predict_vi_uq(model, x_test, 32, apply_softmax=True, generator=g)
    assert (summary.probs.argmax(-1) == y_test).float().mean() > 0.9


def test_predict_vi_uq_classification_summary_shapes():
    model = BayesByBackpropMLP(4, [8], 3, generator=_gen(0))
    s = predict_vi_uq(model, torch.randn(7, 4), n_samples=16, apply_softmax=True, generator=_gen(1))
    assert isinstance(s, funcbnn.PredictiveSummary)
    assert s.probs.shape == s.mean.shape == s.total_var.shape == (7, 3)
    assert s.entropy.shape == s.mutual_info.shape == (7,)
    assert s.num_samples == 16
    torch.testing.assert_close(s.probs.sum(-1), torch.ones(7))
    again = predict_vi_uq(model, torch.randn(7, 4), n_samples=16, apply_softmax=True, generator=_gen(1))
    assert again.probs.shape == (7, 3)
    with pytest.raises(ValueError, match="aleatoric_var"):
        predict_vi_uq(model, torch.randn(7, 4), 4, apply_softmax=True, aleatoric_var=0.1)


def test_predict_vi_uq_regression_adds_aleatoric_variance():
    model = BayesByBackpropMLP(4, [8], 2, generator=_gen(0))
    x = torch.randn(7, 4)
    plain = predict_vi_uq(model, x, 16, generator=_gen(1))
    s = predict_vi_uq(model, x, 16, aleatoric_var=0.25, generator=_gen(1))
    assert s.mean.shape == s.epistemic_var.shape == s.aleatoric_var.shape == s.total_var.shape == (7, 2)
    assert s.probs is None
    torch.testing.assert_close(s.epistemic_var, plain.epistemic_var)
    torch.testing.assert_close(s.total_var, plain.epistemic_var + 0.25)
    # the epistemic variance is that of the sampled outputs
    outputs = model.sample_outputs(x, 16, generator=_gen(1)).detach()
    torch.testing.assert_close(s.epistemic_var, outputs.var(0, correction=0))
    per_output = torch.tensor([0.1, 0.2])
    per_output_summary = predict_vi_uq(model, x, 4, aleatoric_var=per_output)
    torch.testing.assert_close(per_output_summary.aleatoric_var, per_output.expand(7, 2))
    with pytest.raises(ValueError, match="non-negative"):
        predict_vi_uq(model, x, 4, aleatoric_var=-1.0)
    with pytest.raises(TypeError, match="BayesianModule"):
        predict_vi_uq(make_mlp(), x, 4)


@pytest.mark.parametrize("criterion", [None, "categorical", nn.CrossEntropyLoss()])
def test_vi_elbo_step_divides_the_kl_by_the_data_set_size(criterion):
    model = BayesByBackpropMLP(4, [8], 3, generator=_gen(0))
    x, y = torch.randn(10, 4, generator=_gen(1)), torch.randint(0, 3, (10,), generator=_gen(2))
    num_batches, kl_weight = 5, 0.7
    loss, nll, kl = vi_elbo_step(model, x, y, num_batches, criterion, kl_weight, mc_samples=3, generator=_gen(3))
    assert not nll.requires_grad and not kl.requires_grad and loss.requires_grad
    torch.testing.assert_close(loss, nll + kl_weight * kl / (num_batches * len(y)))
    torch.testing.assert_close(kl, model.kl_divergence().detach())  # the whole KL, not divided
    ref = model.elbo(x, y, num_batches * len(y), num_samples=3, kl_weight=kl_weight, generator=_gen(3))
    torch.testing.assert_close(loss, ref.loss)
    last = vi_elbo_step(model, x, y, num_batches, criterion, num_data=47, generator=_gen(3))
    torch.testing.assert_close(last.loss, last.nll + last.kl / 47)


def test_vi_elbo_step_with_mse_criterion_for_regression():
    model = BayesianLinear(3, 1, generator=_gen(0))
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    loss, nll, kl = vi_elbo_step(model, x, y, 2, nn.MSELoss(), mc_samples=2, generator=_gen(1))
    outputs = model.sample_outputs(x, 2, generator=_gen(1)).detach()
    torch.testing.assert_close(nll, ((outputs - y) ** 2).mean())
    torch.testing.assert_close(loss, nll + kl / 16)
    with pytest.raises(ValueError, match="num_batches"):
        vi_elbo_step(model, x, y, 0, nn.MSELoss())


def test_verbose_reports_the_bayesian_parameters_and_the_kl_rule(capsys):
    BayesianModule(make_mlp(), prior="scale_mixture", verbose=True)
    out = capsys.readouterr().out
    assert "4 parameter tensors (67 weights)" in out and "Monte Carlo" in out and "0.weight: (8, 4)" in out
    BayesianModule(make_mlp(), verbose=True)
    assert "KL analytic" in capsys.readouterr().out
    BayesianModule(make_mlp())
    assert capsys.readouterr().out == ""


def test_forced_monte_carlo_kl_agrees_with_the_analytic_kl_and_bad_methods_are_named():
    model = BayesianModule(make_mlp(), prior=("gaussian", {"std": 0.3}), generator=_gen(0))
    with pytest.raises(ValueError, match="approx_num_samples"):
        model.kl_divergence(method="mc")
    with pytest.raises(ValueError, match="method"):
        model.kl_divergence(method="exact")
    with torch.no_grad():
        estimates = torch.stack(
            [model.kl_divergence(method="mc", approx_num_samples=50, generator=_gen(s)) for s in range(8)]
        )
        se = estimates.std() / math.sqrt(len(estimates))
        assert abs(estimates.mean() - model.kl_divergence()) < 4 * se + 1e-4


def test_train_and_eval_reach_dropout_but_norm_layers_keep_their_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))
    net.eval()
    model = BayesianModule(net, posterior="pretrained_gaussian")
    assert not model.training  # mirrors the wrapped module
    x = torch.randn(8, 3)
    torch.testing.assert_close(model(x, sample=False), net(x))
    model.train()
    torch.manual_seed(1)
    a = model(x, sample=False)
    torch.manual_seed(2)
    b = model(x, sample=False)
    assert not torch.equal(a, b)  # dropout is active
    model.eval()
    torch.testing.assert_close(model(x, sample=False), net(x))  # running statistics, no dropout


def test_frozen_parameters_are_saved_and_loaded():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    net[0].requires_grad_(False)
    model = BayesianModule(net, posterior="pretrained_gaussian")
    assert {"model_frozen.0:weight", "model_frozen.0:bias"} <= set(model.state_dict())
    torch.manual_seed(5)
    other = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    other[0].requires_grad_(False)
    twin = BayesianModule(other, posterior="pretrained_gaussian")
    twin.load_state_dict(model.state_dict())
    x = torch.randn(5, 3)
    torch.testing.assert_close(twin(x, sample=False), model(x, sample=False))
    twin.load_state_dict(model.state_dict(), assign=True)
    torch.testing.assert_close(twin(x, sample=False), model(x, sample=False))


@pytest.mark.parametrize("local", [False, True])
def test_deep_copies_and_whole_module_saves_are_independent_equal_models(local):
    import copy
    import io

    torch.manual_seed(0)
    model = BayesianModule(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), local_reparam=local)
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
        torch.testing.assert_close(twin.elbo(x, y, 60, generator=g()).loss, model.elbo(x, y, 60, generator=g()).loss)
        with torch.no_grad():
            for p in twin.parameters():
                p.add_(1.0)
        assert not torch.equal(twin.elbo(x, y, 60, generator=g()).loss, model.elbo(x, y, 60, generator=g()).loss)
        with torch.no_grad():
            for p in twin.parameters():
                p.sub_(1.0)


def test_bayesian_module_names_bad_inputs_and_refuses_non_finite_batches():
    from funcbnn.checks import NonFiniteError

    model = BayesianModule(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    for call in (lambda xx: model(xx), lambda xx: model(xx, sample=False), lambda xx: model.sample_outputs(xx, 3),
                 lambda xx: model.elbo(xx, y, num_data=6)):
        with pytest.raises(ValueError, match=r"could not run on (x|the batch inputs) \(a tensor of shape \(6, 5\)"):
            call(torch.randn(6, 5))
        with pytest.raises(ValueError, match="its dtype torch.float64 differs from the parameters' torch.float32"):
            call(x.double())
    bad = x.clone()
    bad[2, 1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"x contains non-finite values \(0 NaN, 1 inf\)"):
        model.elbo(bad, y, num_data=6)
    with pytest.raises(NonFiniteError, match="y contains non-finite values"):
        model.elbo(x, torch.full((6, 3), float("nan")), num_data=6, likelihood="regression")
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        model.elbo(x, y, num_data=6, generator=3)


def test_bayesian_module_forward_refuses_non_finite_inputs():
    import funcbnn
    from funcbnn.checks import NonFiniteError, set_finite_checks

    bm = funcbnn.BayesianModule(torch.nn.Linear(3, 2))
    x = torch.randn(4, 3)
    x[1, 2] = float("inf")
    with pytest.raises(NonFiniteError, match="x contains non-finite values"):
        bm(x)
    with set_finite_checks(False):
        assert not torch.isfinite(bm(x)).all()
