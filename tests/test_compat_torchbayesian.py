"""``funcbnn.compat.torchbayesian`` against torchbayesian 0.2's formulas, written out independently here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Laplace, Normal, StudentT, kl_divergence
from torch.utils.data import DataLoader, TensorDataset

import funcbnn
import funcbnn.compat.torchbayesian as bnn
from conftest import gen
from funcbnn.compat.torchbayesian import utils
from funcbnn.families.dropout import dropout as dropout_family

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def _posteriors(model: bnn.BayesianModule) -> list:
    return list(model.posteriors.values())


# ---------------------------------------------------------------------------------------------
# names


def test_every_bnn_name_and_the_utils_submodule_import_as_from_torchbayesian():
    from funcbnn.compat.torchbayesian.bnn import BayesianModule
    from funcbnn.compat.torchbayesian.bnn.utils import PosteriorFactory, PriorFactory

    from funcbnn.compat.torchbayesian import bnn as bnn_again

    assert bnn_again is bnn and BayesianModule is bnn.BayesianModule
    assert PosteriorFactory is bnn.utils.PosteriorFactory and PriorFactory is utils.PriorFactory
    assert PosteriorFactory.factories == ("GAUSSIAN", "NORMAL", "PRETRAINED_GAUSSIAN", "PRETRAINED_NORMAL")
    assert PriorFactory.factories == ("GAUSSIAN", "NORMAL")
    assert (
        bnn.NormalPosterior is bnn.GaussianPosterior
        and bnn.PretrainedNormalPosterior is bnn.PretrainedGaussianPosterior
    )
    assert bnn.NormalPrior is bnn.GaussianPrior and issubclass(bnn.GaussianPrior, bnn.Prior)
    assert bnn.VariationalPosterior is funcbnn.nn.VariationalPosterior  # one protocol for both APIs
    for name in (
        "BayesianDropout",
        "BayesianDropout1d",
        "BayesianDropout2d",
        "BayesianDropout3d",
        "BayesianAlphaDropout",
        "BayesianFeatureAlphaDropout",
    ):
        assert issubclass(getattr(bnn, name), nn.Module)
    assert (
        utils.get_variational_posterior is utils.get_posterior
        and utils.VariationalPosteriorFactory is PosteriorFactory
    )


def test_factory_is_case_insensitive_passes_arguments_and_rejects_unknown_and_duplicate_names():
    norms = utils.Factory()

    @norms.register_factory_function("batch")
    def batch_norm(dim):
        return (nn.BatchNorm1d, nn.BatchNorm2d)[dim - 1]

    assert norms["BaTcH", 2] is nn.BatchNorm2d and "batch" in norms
    with pytest.raises(KeyError, match="Unknown factory name 'layer'.*BATCH"):
        norms["layer"]
    with pytest.raises(ValueError, match="already a factory function"):
        norms.register_factory_function("BATCH")(batch_norm)


# ---------------------------------------------------------------------------------------------
# numbers: initialisation, draws, KL


def test_initialisation_is_torchbayesians_mu_from_n_0_01_in_parameter_order_and_rho_minus_3():
    net = _net()
    torch.manual_seed(7)
    model = bnn.BayesianModule(net)
    torch.manual_seed(7)  # torchbayesian: nn.init.normal_(mu, 0, 0.1) per parameter, named_parameters order
    expected = [torch.empty_like(p).normal_(0.0, 0.1) for p in net.parameters()]
    for post, mu in zip(_posteriors(model), expected):
        assert torch.equal(post.mu, mu)
        assert torch.equal(post.rho, torch.full_like(mu, -3.0))
    assert [n for n, _ in model.named_parameters()] == [
        f"posteriors.{k}.{v}" for k in ("0:weight", "0:bias", "2:weight", "2:bias") for v in ("mu", "rho")
    ]


def test_a_generator_seeds_the_initialisation_without_touching_the_global_rng():
    torch.manual_seed(0)
    a = bnn.BayesianModule(_net(), generator=gen(3))
    after = torch.rand(())
    torch.manual_seed(0)
    b = bnn.BayesianModule(_net(), generator=gen(3))
    assert torch.equal(torch.rand(()), after)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_forward_draws_torchbayesians_weights_for_the_same_seed():
    model = bnn.BayesianModule(_net())
    x = torch.randn(4, 3)
    torch.manual_seed(11)
    out = model(x)
    torch.manual_seed(
        11
    )  # torchbayesian: mu + softplus(rho) * randn_like(mu) as the forward reads each tensor
    weights = {
        n: p.mu + F.softplus(p.rho) * torch.randn_like(p.mu)
        for n, p in zip(("0.weight", "0.bias", "2.weight", "2.bias"), _posteriors(model))
    }
    torch.testing.assert_close(out, torch.func.functional_call(_net(), weights, (x,)), rtol=0, atol=0)


def test_forward_is_the_network_at_a_draw_of_mu_plus_softplus_rho_times_noise():
    model = bnn.BayesianModule(_net())
    x = torch.randn(4, 3)
    weights = model.sample_parameters(generator=gen(1))
    torch.testing.assert_close(model(x, generator=gen(1)), torch.func.functional_call(_net(), weights, (x,)))
    assert not torch.equal(model(x), model(x))  # the global RNG: a fresh draw per call, as torchbayesian
    draws = model.sample_parameters(4000, generator=gen(2))
    for name, post in zip(draws, _posteriors(model)):
        se = F.softplus(post.rho) / math.sqrt(4000)
        assert bool(((draws[name].mean(0) - post.mu).abs() < 5 * se).all())
        torch.testing.assert_close(draws[name].std(0), F.softplus(post.rho), rtol=0.1, atol=0)


def test_kl_is_the_sum_of_torch_normal_kls_and_mean_divides_by_the_weight_count():
    model = bnn.BayesianModule(_net(), prior=("normal", {"mu": 0.5, "sigma": 2.0}))
    terms = [kl_divergence(Normal(p.mu, F.softplus(p.rho)), Normal(0.5, 2.0)) for p in _posteriors(model)]
    total = sum(t.sum() for t in terms)
    numel = sum(t.numel() for t in terms)
    torch.testing.assert_close(model.kl_divergence(), total)
    torch.testing.assert_close(model.kl_divergence(reduction="MEAN"), total / numel)
    with pytest.raises(ValueError, match="Invalid reduction type: 'max'"):
        model.kl_divergence(reduction="max")
    # the default prior is N(0, 1)
    default = bnn.BayesianModule(_net())
    expected = sum(
        kl_divergence(Normal(p.mu, F.softplus(p.rho)), Normal(0.0, 1.0)).sum() for p in _posteriors(default)
    )
    torch.testing.assert_close(default.kl_divergence(), expected)


def test_monte_carlo_kl_warns_when_a_closed_form_exists_and_agrees_within_its_standard_error():
    model = bnn.BayesianModule(_net())
    exact = model.kl_divergence().item()
    with pytest.warns(UserWarning, match="analytical solution"):
        estimates = torch.stack(
            [model.kl_divergence(approx_num_samples=1, generator=gen(s)) for s in range(200)]
        )
    se = estimates.std().item() / math.sqrt(len(estimates))
    assert abs(estimates.mean().item() - exact) < 5 * se


def test_dtype_argument_sets_the_dtype_of_the_kl_as_torchbayesians_accumulator():
    model = bnn.BayesianModule(_net(), dtype=torch.float64)
    assert (
        model.kl_divergence().dtype == torch.float64 and model.posterior("0.weight").mu.dtype == torch.float32
    )


# ---------------------------------------------------------------------------------------------
# registered priors and posteriors


class _LaplacePrior(bnn.Prior):
    def __init__(self, shape=None, scale=1.0, *, dtype=None, device=None):
        self.loc = torch.zeros(shape, dtype=dtype, device=device)
        self.scale = torch.full(shape, scale, dtype=dtype, device=device)

    @property
    def distribution(self):
        return Laplace(self.loc, self.scale)


class _StudentTPrior(bnn.Prior):
    def __init__(self, shape=None, *, dtype=None, device=None):
        self.df = torch.full(shape, 3.0, dtype=dtype, device=device)

    @property
    def distribution(self):
        return StudentT(self.df)


@pytest.fixture
def registered_priors():
    utils.PriorFactory.register_factory_function("_test_laplace")(lambda: _LaplacePrior)
    utils.PriorFactory.register_factory_function("_test_student")(lambda: _StudentTPrior)
    yield
    utils.PriorFactory._factories.pop("_TEST_LAPLACE")
    utils.PriorFactory._factories.pop("_TEST_STUDENT")


def test_a_registered_prior_gets_torchbayesians_per_parameter_kl(registered_priors):
    model = bnn.BayesianModule(_net(), prior=("_test_laplace", {"scale": 0.5}))
    expected = sum(
        kl_divergence(Normal(p.mu, F.softplus(p.rho)), Laplace(0.0, 0.5)).sum() for p in _posteriors(model)
    )
    torch.testing.assert_close(model.kl_divergence(), expected)
    # no closed form for (Normal, StudentT): torchbayesian's error without samples, its estimator with them
    student = bnn.BayesianModule(_net(), prior="_test_student")
    with pytest.raises(ValueError, match="approx_num_samples"):
        student.kl_divergence()
    g = gen(0)
    estimate = student.kl_divergence(approx_num_samples=4, generator=g)
    g = gen(0)
    expected = 0.0
    for p in _posteriors(student):
        draws = p.sample_parameters(4, generator=g)
        q = Normal(p.mu, F.softplus(p.rho))
        expected = expected + (q.log_prob(draws) - StudentT(3.0).log_prob(draws)).mean(0).sum()
    torch.testing.assert_close(estimate, expected)
    x = torch.randn(4, 3)
    loss = ((student(x) - 1.0) ** 2).mean() + student.kl_divergence(approx_num_samples=2) / 100
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())


def test_bad_prior_and_posterior_specs_fail_at_construction():
    with pytest.raises(KeyError, match="Unknown factory name 'cauchy'"):
        bnn.BayesianModule(_net(), prior="cauchy")
    with pytest.raises(KeyError, match="Unknown factory name 'flow'"):
        bnn.BayesianModule(_net(), variational_posterior="flow")
    with pytest.raises(TypeError, match=r"\['std'\]"):
        bnn.BayesianModule(_net(), prior=("normal", {"std": 1.0}))
    with pytest.raises(ValueError, match="std"):
        bnn.BayesianModule(_net(), prior=("normal", {"sigma": 0.0}))


class _FixedStdPosterior(bnn.VariationalPosterior):
    """Seed 000's recommended pattern: empty parameters, ``reset_parameters()``, a one-draw ``sample_parameters()``."""

    def __init__(self, shape, *, std: float = 0.2, dtype=None, device=None):
        super().__init__(shape, dtype=dtype, device=device)
        self.std = std
        self.mu = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.mu)

    @property
    def distribution(self):
        return Normal(self.mu, torch.full_like(self.mu, self.std))

    def sample_parameters(self):
        return self.mu + self.std * torch.randn_like(self.mu)


def test_a_posterior_written_to_torchbayesians_pattern_trains_samples_and_has_its_kl():
    utils.PosteriorFactory.register_factory_function("_test_fixed")(lambda: _FixedStdPosterior)
    try:
        model = bnn.BayesianModule(_net(), variational_posterior=("_test_fixed", {"std": 0.3}))
        assert all(isinstance(p, _FixedStdPosterior) and p.std == 0.3 for p in _posteriors(model))
        x = torch.randn(6, 3)
        per_weight = math.log(1 / 0.3) + 0.3**2 / 2 - 0.5  # KL(N(0, 0.3^2) || N(0, 1))
        numel = sum(p.numel() for p in model.parameters())
        torch.testing.assert_close(model.kl_divergence(), torch.tensor(per_weight * numel))
        loss = (model(x) ** 2).mean() + model.kl_divergence() / 60
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        a = model.sample_outputs(x, 3, generator=gen(2))
        assert torch.equal(a, model.sample_outputs(x, 3, generator=gen(2))) and a.shape == (3, 6, 2)
    finally:
        utils.PosteriorFactory._factories.pop("_TEST_FIXED")


def test_pretrained_posterior_is_centred_on_the_module_weights_with_rho_minus_3():
    net = _net()
    model = bnn.BayesianModule(net, variational_posterior="pretrained_normal")
    for post, p in zip(_posteriors(model), net.parameters()):
        assert torch.equal(post.mu, p) and torch.equal(post.rho, torch.full_like(p, -3.0))
    direct = bnn.PretrainedGaussianPosterior(torch.ones(2, 3))
    assert not torch.equal(direct.sample_parameters(), direct.sample_parameters())
    post = utils.get_posterior(torch.ones(4), "gaussian")
    assert isinstance(post, bnn.GaussianPosterior) and post.shape == (4,)
    prior = utils.get_prior((2, 2), ("normal", {"sigma": 3.0}), dtype=torch.float64)
    assert prior.distribution.stddev.dtype == torch.float64 and float(prior.distribution.stddev[0, 0]) == 3.0


# ---------------------------------------------------------------------------------------------
# module behaviour


def test_module_attribute_runs_the_bayesian_forward_and_holds_the_variational_parameters():
    net = _net()
    model = bnn.BayesianModule(net)
    x = torch.randn(4, 3)
    assert model.module(x, generator=gen(0)).shape == (4, 2)
    torch.testing.assert_close(model.module(x, generator=gen(0)), model(x, generator=gen(0)))
    assert [id(p) for p in model.module.parameters()] == [id(p) for p in model.parameters()]
    assert model.module[0] is net[0] and len(model.module) == 3
    # unlike torchbayesian, the user's network is left as it was
    assert torch.equal(net(x), _net()(x))


def test_a_torchbayesian_checkpoint_loads_under_its_own_keys():
    source = bnn.BayesianModule(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval())
    state = source.state_dict()
    # torchbayesian 0.2 saves the reparametrised module: module.<owner>.reparametrizations.<name>.variational_posterior.<p>
    legacy = {}
    for key, value in state.items():
        if key.startswith("posteriors."):
            dotted, leaf = key[len("posteriors.") :].rsplit(".", 1)
            owner, name = dotted.replace(":", ".").rsplit(".", 1)
            legacy[f"module.{owner}.reparametrizations.{name}.variational_posterior.{leaf}"] = value
        elif key.startswith("model_buffers."):
            legacy["module." + key[len("model_buffers.") :].replace(":", ".")] = value
    assert len(legacy) == len(state)
    target = bnn.BayesianModule(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval())
    target.load_state_dict(legacy)
    x = torch.randn(5, 3)
    torch.testing.assert_close(target(x, generator=gen(0)), source(x, generator=gen(0)))


def test_bayesian_dropout_stays_on_in_eval_and_enable_mc_dropout_touches_only_dropout():
    layer = bnn.BayesianDropout(0.5).eval()
    x = torch.ones(1000)
    assert (layer(x) == 0).any()
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.2)).eval()
    utils.enable_mc_dropout(net)
    assert net[2].training and not net[1].training and not net[0].training
    # native MC dropout recognises them: seeded, reproducible masks
    mc = nn.Sequential(nn.Linear(3, 8), bnn.BayesianDropout(0.5), nn.Linear(8, 2))
    apply_fn, params, _ = funcbnn.mc_dropout.functionalize(mc)
    post = dropout_family()
    x = torch.randn(5, 3)
    out = funcbnn.sample_outputs(apply_fn, post.sample(post.init(params), 4, generator=gen(0)), x)
    again = funcbnn.sample_outputs(apply_fn, post.sample(post.init(params), 4, generator=gen(0)), x)
    assert out.shape == (4, 5, 2) and not torch.equal(out[0], out[1]) and torch.equal(out, again)


# ---------------------------------------------------------------------------------------------
# torchbayesian's own example, unchanged but for the import (numpy's statistics done in torch)


def test_torchbayesians_example_runs_unchanged_but_for_the_import():
    torch.manual_seed(0)
    device = torch.device("cpu")

    x_data = torch.linspace(-5, 5, 250).unsqueeze(1)
    y_data = torch.sin(1.5 * x_data) + 0.1 * torch.randn_like(x_data)
    dataset = TensorDataset(x_data, y_data)
    loader = DataLoader(dataset=dataset, batch_size=64, shuffle=True)

    model = nn.Sequential(
        nn.Linear(1, 20),
        nn.ReLU(),
        nn.Linear(20, 20),
        nn.ReLU(),
        nn.Linear(20, 20),
        nn.ReLU(),
        nn.Linear(20, 20),
        nn.ReLU(),
        nn.Linear(20, 1),
    )
    model = bnn.BayesianModule(model)
    model.to(device)

    def mse(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
        return ((y_true - y_pred) ** 2).mean()

    optimizer = torch.optim.Adam(params=model.parameters(), lr=1e-2)
    num_epochs = 60  # the example runs 500
    first = None
    for epoch in range(num_epochs):
        model.train()
        for batch in loader:
            x = batch[0].to(device)
            y = batch[1].to(device)
            optimizer.zero_grad()
            y_pred = model(x)
            loss = mse(y, y_pred) + 1e-1 * model.kl_divergence(reduction="mean")
            loss.backward()
            optimizer.step()
            first = loss.item() if first is None else first

    test_domain = torch.linspace(-8.5, 8.5, 500).unsqueeze(1)
    bnn_samples = []
    for _ in range(50):
        model.eval()
        with torch.no_grad():
            y_pred = model(test_domain.to(device))
            bnn_samples.append(y_pred.squeeze().cpu())
    samples = torch.stack(bnn_samples)
    y_mean, y_std = samples.mean(0), samples.std(0, correction=0)
    inside = test_domain.squeeze(1).abs() < 5
    fit = ((y_mean - torch.sin(1.5 * test_domain.squeeze(1)))[inside] ** 2).mean()
    assert loss.item() < first and fit < 0.3
    assert y_std[~inside].mean() > y_std[inside].mean()  # wider away from the data
    assert bool((y_std > 0).all())


def test_forward_refuses_non_finite_and_unfit_inputs_unless_the_checks_are_off():
    x = torch.randn(4, 3)
    x[2, 0] = float("nan")
    model = bnn.BayesianModule(_net())
    for generator in (None, gen(0)):  # torchbayesian's global-RNG path and the native one
        with pytest.raises(funcbnn.checks.NonFiniteError, match=r"^input contains non-finite values \(1 NaN"):
            model(x, generator=generator)
    with funcbnn.checks.set_finite_checks(False):
        assert model(x)[2].isnan().all()
    with pytest.raises(ValueError, match=r"could not run on x \(a tensor of shape \(4, 5\)"):
        model(torch.randn(4, 5))
