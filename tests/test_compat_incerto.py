"""``funcbnn.compat.incerto`` against incerto's formulas, written out independently here."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import funcbnn
from conftest import gen
from funcbnn.compat import incerto
from funcbnn.compat.incerto import (
    SWAG,
    BaseBayesianMethod,
    DeepEnsemble,
    GaussianLinear,
    LaplaceApproximation,
    MCDropout,
    NotFittedError,
    VariationalBayesNN,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """The model of incerto's own tests."""

    def __init__(self, in_features: int = 6, num_classes: int = 3, p: float = 0.3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 12)
        self.dropout = nn.Dropout(p)
        self.fc2 = nn.Linear(12, num_classes)

    def forward(self, x):
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


def _net(seed: int = 0, **kwargs) -> Net:
    torch.manual_seed(seed)
    return Net(**kwargs)


def _data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_every_class_of_incerto_bayesian_is_here_with_its_base_and_error():
    for name in incerto.__all__:
        assert hasattr(incerto, name)
    for cls in (MCDropout, DeepEnsemble, SWAG, LaplaceApproximation, VariationalBayesNN):
        assert issubclass(cls, BaseBayesianMethod) and issubclass(cls, nn.Module)
    assert issubclass(NotFittedError, incerto.IncertoError)
    assert issubclass(NotFittedError, funcbnn.laplace.NotFittedError)  # native handlers catch it too
    with pytest.raises(TypeError):
        BaseBayesianMethod()


# ---------------------------------------------------------------------------------------------
# MC dropout


def test_mc_dropout_sets_incertos_rate_and_train_mode_and_keeps_rates_with_none():
    net = _net().eval()
    mc = MCDropout(net, num_samples=5)
    assert net.dropout.p == 0.1 and net.dropout.training and not net.training and mc.model is net
    keep = MCDropout(_net(p=0.3).eval(), dropout_rate=None)
    assert keep.model.dropout.p == 0.3
    with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\), got 1.0"):
        MCDropout(_net(), dropout_rate=1.0)
    with pytest.raises(NotImplementedError, match="alpha dropout"):
        MCDropout(nn.Sequential(nn.Linear(2, 2), nn.AlphaDropout(0.1)))


def test_mc_dropout_predict_is_the_mean_and_unbiased_variance_of_softmaxed_samples():
    x, _ = _data(8)
    mc = MCDropout(_net(), num_samples=16, dropout_rate=0.5)
    mean, var, samples = mc.predict(x, return_samples=True, generator=gen(0))
    assert samples.shape == (16, 8, 3)
    torch.testing.assert_close(samples.sum(-1), torch.ones(16, 8))
    torch.testing.assert_close(mean, samples.mean(0))
    torch.testing.assert_close(var, samples.var(0))
    assert not torch.equal(samples[0], samples[1])
    again = mc.predict(x, return_samples=True, generator=gen(0))[2]
    assert torch.equal(samples, again)
    raw = mc.predict(x, return_samples=True, normalize_output=False, generator=gen(0))[2]
    torch.testing.assert_close(F.softmax(raw, -1), samples)
    # with rate 0 every sample is the deterministic network
    exact = MCDropout(_net(), num_samples=3, dropout_rate=0.0)
    torch.testing.assert_close(exact.predict(x)[0], F.softmax(_net().eval()(x), -1))
    torch.testing.assert_close(exact.forward(x), _net().eval()(x))


def test_mc_dropout_entropy_and_mutual_information_follow_incertos_formulas():
    x, _ = _data(8)
    mc = MCDropout(_net(), num_samples=16, dropout_rate=0.5)
    _, _, samples = mc.predict(x, return_samples=True, generator=gen(1))
    mean = samples.mean(0)
    entropy = -(mean * torch.log(mean + 1e-10)).sum(-1)
    expected_entropy = -(samples * torch.log(samples + 1e-10)).sum(-1).mean(0)
    torch.testing.assert_close(mc.predict_entropy(x, generator=gen(1)), entropy, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        mc.predict_mutual_information(x, generator=gen(1)), entropy - expected_entropy, atol=1e-6, rtol=0
    )


def test_mc_dropout_without_dropout_layers_warns_and_gives_zero_variance():
    with pytest.warns(UserWarning, match="no nn.Dropout layers"):
        mc = MCDropout(nn.Linear(6, 3), num_samples=4)
    with pytest.warns(UserWarning, match="no nn.Dropout layers"):
        _, var = mc.predict(torch.randn(5, 6))
    assert torch.equal(var, torch.zeros(5, 3))


# ---------------------------------------------------------------------------------------------
# deep ensembles


def _loop_prediction(models, x):
    outs = torch.stack([F.softmax(m.eval()(x), -1) for m in models])
    return outs.mean(0), outs.var(0), outs


def test_ensemble_predict_equals_incertos_member_loop_and_sets_eval_mode():
    torch.manual_seed(0)
    ens = DeepEnsemble(Net, num_models=4)
    ens.train()
    x, _ = _data(7)
    mean, var, members = ens.predict(x, return_samples=True)
    assert all(not m.training for m in ens.models)
    for got, expected in zip((mean, var, members), _loop_prediction(ens.models, x)):
        torch.testing.assert_close(got, expected)
    assert torch.equal(ens.predict(x, return_all=True)[2], members)
    torch.testing.assert_close(ens.diversity(x), var.mean(-1))
    torch.testing.assert_close(ens(x), torch.stack([m(x) for m in ens.models]).mean(0))
    torch.testing.assert_close(ens(x, model_idx=2), ens.models[2](x))


def test_ensemble_members_with_their_own_batchnorm_statistics_and_mixed_architectures():
    def with_bn():
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    torch.manual_seed(0)
    ens = DeepEnsemble(with_bn, num_models=3)
    for i, m in enumerate(ens.models):
        m.train()
        m(torch.randn(16, 6) * (i + 1))  # different running statistics per member
    x, _ = _data(5)
    for got, expected in zip(ens.predict(x, return_samples=True), _loop_prediction(ens.models, x)):
        torch.testing.assert_close(got, expected)
    sizes = iter([4, 9])
    mixed = DeepEnsemble(lambda: nn.Sequential(nn.Linear(6, next(sizes)), nn.Tanh(), nn.LazyLinear(3)), 2)
    mixed(x)  # materialise the lazy layers
    for got, expected in zip(mixed.predict(x, return_samples=True), _loop_prediction(mixed.models, x)):
        torch.testing.assert_close(got, expected)


def test_ensemble_train_member_trains_only_that_member_and_bad_arguments_are_named():
    torch.manual_seed(0)
    ens = DeepEnsemble(Net, num_models=2)
    x, y = _data(32)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    before = [p.clone() for p in ens.models[1].parameters()]
    loss0 = F.cross_entropy(ens.models[0].eval()(x), y).item()
    opt = torch.optim.SGD(ens.models[0].parameters(), lr=0.1)
    ens.train_member(0, loader, opt, nn.CrossEntropyLoss(), num_epochs=5, device="cpu")
    assert F.cross_entropy(ens.models[0].eval()(x), y).item() < loss0
    assert all(torch.equal(a, b) for a, b in zip(before, ens.models[1].parameters()))
    with pytest.raises(TypeError, match="model_fn must be callable"):
        DeepEnsemble("Net", 2)
    with pytest.raises(ValueError, match="num_models must be >= 1, got 0"):
        DeepEnsemble(Net, 0)


# ---------------------------------------------------------------------------------------------
# SWAG


def _iterates(net: nn.Module, n: int) -> list[dict[str, torch.Tensor]]:
    g = gen(3)
    return [
        {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in net.state_dict().items()}
        for _ in range(n)
    ]


def test_swag_moments_follow_incertos_running_averages():
    net = _net()
    swag = SWAG(net, num_samples=5)
    assert swag.n_models == 0 and set(swag.mean) == {n for n, _ in net.named_parameters()}
    mean = {k: torch.zeros_like(v) for k, v in swag.mean.items()}
    sq = {k: torch.zeros_like(v) for k, v in swag.mean.items()}
    snapshot = _net(1)
    for n, it in enumerate(_iterates(net, 4), start=1):
        snapshot.load_state_dict(it)
        swag.collect_model(snapshot)
        for k, p in snapshot.named_parameters():  # incerto: (n - 1) / n * m + p / n
            mean[k] = (n - 1) / n * mean[k] + 1.0 / n * p.data
            sq[k] = (n - 1) / n * sq[k] + 1.0 / n * p.data**2
    assert swag.n_models == 4
    for k in mean:
        torch.testing.assert_close(swag.mean[k], mean[k])
        torch.testing.assert_close(swag.sq_mean[k], sq[k])
    draws = [swag.sample_parameters(generator=gen(s)) for s in range(600)]
    for k in mean:
        stacked = torch.stack([d[k] for d in draws])
        std = (sq[k] - mean[k] ** 2).clamp(min=swag.var_clamp).sqrt()
        assert bool(((stacked.mean(0) - mean[k]).abs() < 5 * std / math.sqrt(600) + 1e-6).all())
        torch.testing.assert_close(stacked.std(0), std, rtol=0.2, atol=1e-4)


def test_swag_predict_refuses_before_collection_and_leaves_the_model_alone():
    x, _ = _data(6)
    swag = SWAG(_net(), num_samples=5, var_clamp=1e-12)
    with pytest.raises(NotFittedError, match="No models collected"):
        swag.predict(x)
    before = [p.clone() for p in swag.model.parameters()]
    for _ in range(3):
        swag.collect_model(swag.model)  # no spread: every draw is the collected model
    mean, var, samples = swag.predict(x, return_samples=True)
    torch.testing.assert_close(mean, F.softmax(swag.model.eval()(x), -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, samples.var(0))
    assert samples.shape == (5, 6, 3) and bool((var < 1e-8).all())
    assert all(torch.equal(a, b) for a, b in zip(before, swag.model.parameters()))


def test_swag_state_dict_round_trips_through_a_weights_only_file(tmp_path):
    swag = SWAG(_net(), num_samples=5)
    snapshot = _net(1)
    for it in _iterates(swag.model, 3):
        snapshot.load_state_dict(it)
        swag.collect_model(snapshot)
    state = swag.state_dict()
    assert state["_swag_n_models"] == 3 and {"_swag_mean", "_swag_sq_mean", "model.fc1.weight"} <= set(state)
    torch.save(state, tmp_path / "swag.pt")
    other = SWAG(_net(5), num_samples=5)
    other.load_state_dict(torch.load(tmp_path / "swag.pt", weights_only=True))
    assert other.n_models == 3 and "_swag_mean" in state  # the caller's dict keeps its keys
    x, _ = _data(4)
    torch.testing.assert_close(other.predict(x, generator=gen(0))[0], swag.predict(x, generator=gen(0))[0])
    swag.double()
    assert swag.mean["fc1.weight"].dtype == torch.float64 and swag.n_models == 3


# ---------------------------------------------------------------------------------------------
# Laplace


def _incerto_hessian_diag(model: nn.Module, x, y, regression: bool) -> dict[str, torch.Tensor]:
    """incerto's loop: squared per-example gradients, averaged over the examples."""
    diag = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        out = model(x[i : i + 1])
        with (
            warnings.catch_warnings()
        ):  # incerto's squeeze() broadcasts against the target, and torch says so
            warnings.simplefilter("ignore", UserWarning)
            loss = (
                0.5 * F.mse_loss(out.squeeze(), y[i : i + 1].float())
                if regression
                else F.cross_entropy(out, y[i : i + 1])
            )
        loss.backward()
        for n, p in model.named_parameters():
            diag[n] += p.grad**2
    return {n: d / len(x) for n, d in diag.items()}


def test_laplace_precision_is_prior_plus_the_averaged_empirical_fisher_as_incerto():
    x, y = _data(30)
    model = _net().eval()
    la = LaplaceApproximation(model, likelihood="classification", prior_precision=2.0, num_samples=6)
    assert la.posterior_precision is None and la.mean is None
    la.fit(DataLoader(TensorDataset(x, y), batch_size=8), device="cpu")
    expected = _incerto_hessian_diag(_net().eval(), x, y, regression=False)
    for name, p in model.named_parameters():
        torch.testing.assert_close(la.posterior_precision[name], 2.0 + expected[name])
        assert torch.equal(la.mean[name], p)
    # the Laplace posterior of the theory sums the curvature over the N examples: N times incerto's data term
    apply_fn, params, _ = funcbnn.functionalize(model)
    summed, stats = funcbnn.laplace.diag_curvature(apply_fn, params, (x, y), "classification", kind="ef")
    torch.testing.assert_close(summed["fc1.weight"], stats.num_data * expected["fc1.weight"])


@pytest.mark.parametrize("outputs", [1, 2])
def test_laplace_regression_uses_incertos_half_mse_per_example(outputs):
    g = gen(4)
    x, y = torch.randn(12, 6, generator=g), torch.randn(12, outputs, generator=g)
    y_loader = y.squeeze(-1) if outputs == 1 else y
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, outputs))
    la = LaplaceApproximation(model, likelihood="regression")
    la.fit([(x[:5], y_loader[:5]), (x[5:], y_loader[5:])], device="cpu")
    expected = _incerto_hessian_diag(model, x, y_loader if outputs == 1 else y, regression=True)
    for name in expected:
        torch.testing.assert_close(la.posterior_precision[name], 1.0 + expected[name])


def test_laplace_predict_samples_the_gaussian_and_round_trips_its_state(tmp_path):
    x, y = _data(20)
    la = LaplaceApproximation(_net().eval(), num_samples=5)
    with pytest.raises(NotFittedError, match="Call fit"):
        la.predict(x)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=10), device="cpu")
    mean, var, samples = la.predict(x[:4], return_samples=True, generator=gen(0))
    assert (
        samples.shape == (5, 4, 3) and torch.equal(mean, samples.mean(0)) and torch.equal(var, samples.var(0))
    )
    tight = LaplaceApproximation(_net().eval(), prior_precision=1e12, num_samples=3)
    tight.fit([(x, y)], device="cpu")
    torch.testing.assert_close(
        tight.predict(x[:4])[0], F.softmax(_net().eval()(x[:4]), -1), atol=1e-4, rtol=0
    )
    state = la.state_dict()
    assert state["_laplace_likelihood"] == "classification" and state["_laplace_num_samples"] == 5
    torch.save(state, tmp_path / "la.pt")
    other = LaplaceApproximation(_net(9), num_samples=2)
    other.load_state_dict(torch.load(tmp_path / "la.pt", weights_only=True))
    assert other.num_samples == 5 and other.prior_precision == 1.0
    torch.testing.assert_close(
        other.predict(x[:4], generator=gen(1))[0], la.predict(x[:4], generator=gen(1))[0]
    )


# ---------------------------------------------------------------------------------------------
# variational Bayes


def test_gaussian_linear_initialises_draws_and_measures_kl_as_incerto():
    torch.manual_seed(0)
    layer = GaussianLinear(4, 3, prior_std=0.5)
    torch.manual_seed(0)
    assert torch.equal(layer.weight_mu, torch.randn(3, 4) * 0.5) and torch.equal(
        layer.bias_mu, torch.zeros(3)
    )
    torch.testing.assert_close(F.softplus(layer.weight_rho), torch.full((3, 4), 0.5))
    x = torch.randn(5, 4)
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)  # incerto: the weight's noise, then the bias's
    w = layer.weight_mu + F.softplus(layer.weight_rho) * torch.randn_like(layer.weight_rho)
    b = layer.bias_mu + F.softplus(layer.bias_rho) * torch.randn_like(layer.bias_rho)
    torch.testing.assert_close(out, F.linear(x, w, b))
    with torch.no_grad():
        layer.weight_rho.fill_(-1.0)
    std = F.softplus(layer.weight_rho)
    expected = (torch.log(0.5 / std) + (std**2 + layer.weight_mu**2) / (2 * 0.5**2) - 0.5).sum()
    bstd = F.softplus(layer.bias_rho)
    expected = expected + (torch.log(0.5 / bstd) + (bstd**2 + layer.bias_mu**2) / (2 * 0.5**2) - 0.5).sum()
    torch.testing.assert_close(layer.kl_divergence(), expected)


def test_variational_loss_is_mean_nll_plus_kl_over_the_batch_size_as_incerto():
    torch.manual_seed(0)
    model = VariationalBayesNN(6, [8, 8], 3, prior_std=1.0, num_samples=4)
    assert len(model.layers) == 3
    with torch.no_grad():
        for layer in model.layers:  # std ~ 1e-22: every draw is the mean network
            layer.weight_rho.fill_(-50.0)
            layer.bias_rho.fill_(-50.0)
    x, y = _data(10)
    h = x
    for i, layer in enumerate(model.layers):
        h = F.linear(h, layer.weight_mu, layer.bias_mu)
        h = F.relu(h) if i < 2 else h
    expected = F.cross_entropy(h, y) + 0.3 * model.kl_divergence() / len(x)
    torch.testing.assert_close(model.variational_loss(x, y, num_samples=3, kl_weight=0.3), expected)
    mean, var, samples = model.predict(x, return_samples=True)
    torch.testing.assert_close(mean, F.softmax(h, -1))
    assert samples.shape == (4, 10, 3) and torch.equal(var, samples.var(0))


def test_variational_loss_trains_mu_and_rho_through_batched_draws():
    torch.manual_seed(0)
    model = VariationalBayesNN(6, [8], 3)
    x, y = _data(16)
    loss = model.variational_loss(x, y, num_samples=5, generator=gen(0))
    torch.testing.assert_close(loss, model.variational_loss(x, y, num_samples=5, generator=gen(0)))
    loss.backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    torch.manual_seed(2)
    a = model(x)
    torch.manual_seed(2)
    assert torch.equal(a, model(x)) and a.shape == (16, 3)


# --- wrapped models (torch.compile, DataParallel) --------------------------------------------------

_WRAPPERS = pytest.mark.parametrize(
    "wrap",
    # importing torch._dynamo (on the first torch.compile) raises DeprecationWarnings of torch's own
    [
        pytest.param(torch.compile, marks=pytest.mark.filterwarnings("ignore::DeprecationWarning")),
        nn.DataParallel,
    ],
    ids=["compiled", "data_parallel"],
)


@_WRAPPERS
def test_mc_dropout_on_a_wrapped_model_predicts_as_on_the_plain_one(wrap):
    torch.manual_seed(0)
    net, x = Net(), torch.randn(9, 6)
    plain = MCDropout(net, num_samples=5, dropout_rate=None).predict(x, return_samples=True, generator=gen(1))
    wrapped = MCDropout(wrap(net), num_samples=5, dropout_rate=None)
    wrapped = wrapped.predict(x, return_samples=True, generator=gen(1))
    for a, b in zip(wrapped, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@_WRAPPERS
def test_laplace_on_a_wrapped_model_fits_and_predicts_as_on_the_plain_one(wrap):
    torch.manual_seed(0)
    net, x, y = Net(), torch.randn(16, 6), torch.randint(0, 3, (16,))
    model = wrap(net)
    outer = {id(p): name for name, p in model.named_parameters()}
    plain, wrapped = LaplaceApproximation(net, num_samples=4), LaplaceApproximation(model, num_samples=4)
    plain.fit(DataLoader(TensorDataset(x, y), batch_size=8), device="cpu")
    wrapped.fit(DataLoader(TensorDataset(x, y), batch_size=8), device="cpu")
    # incerto's names (the wrapped model's own) and the curvature of the plain model, not zeros
    assert set(wrapped.posterior_precision) == set(outer.values())
    for name, p in net.named_parameters():
        torch.testing.assert_close(wrapped.posterior_precision[outer[id(p)]], plain.posterior_precision[name])
        assert (plain.posterior_precision[name] > plain.prior_precision).any()
    for a, b in zip(wrapped.predict(x, generator=gen(2)), plain.predict(x, generator=gen(2))):
        torch.testing.assert_close(a, b)


@_WRAPPERS
def test_swag_on_a_wrapped_model_predicts_as_on_the_plain_one(wrap):
    torch.manual_seed(0)
    net, x = Net(), torch.randn(9, 6)
    model = wrap(net)
    plain, wrapped = SWAG(net, num_samples=4, var_clamp=1e-3), SWAG(model, num_samples=4, var_clamp=1e-3)
    for step in range(3):
        plain.collect_model(net)
        wrapped.collect_model(model)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
    for a, b in zip(wrapped.predict(x, generator=gen(3)), plain.predict(x, generator=gen(3))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@_WRAPPERS
def test_deep_ensemble_of_wrapped_members_predicts_as_the_plain_one(wrap):
    x = torch.randn(9, 6)
    torch.manual_seed(0)
    plain = DeepEnsemble(lambda: Net(), num_models=3)
    torch.manual_seed(0)
    wrapped = DeepEnsemble(lambda: wrap(Net()), num_models=3)
    for a, b in zip(wrapped.predict(x, return_samples=True), plain.predict(x, return_samples=True)):
        torch.testing.assert_close(a, b)
