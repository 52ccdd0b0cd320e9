"""``funcbnn.compat.deepuq`` against deepuq's formulas, written out independently here, and the ELBO theory."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import funcbnn
from conftest import gen
from funcbnn.compat import deepuq
from funcbnn.compat.deepuq import (
    BayesByBackpropMLP,
    BayesianLinear,
    GaussianPosterior,
    GaussianPrior,
    HeteroscedasticBayesByBackpropRegressor,
    HeteroscedasticMultiOutputBayesByBackpropRegressor,
    LastLayerVariationalInference,
    MCDropoutWrapper,
    MultiOutputBayesByBackpropRegressor,
    UQResult,
    predict_vi_uq,
    vi_elbo_step,
)
from funcbnn.families.dropout import dropout as dropout_family

pytestmark = pytest.mark.usefixtures("one_thread")


def _deepuq_kl(mu, sigma, prior_mu, prior_sigma):
    """deepuq's per-element KL, summed."""
    return (
        math.log(prior_sigma)
        - torch.log(sigma)
        + (sigma**2 + (mu - prior_mu) ** 2) / (2 * prior_sigma**2)
        - 0.5
    ).sum()


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move the posteriors away from deepuq's all-zero start, so the formulas are exercised."""
    g = gen(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("rho"):
                p.copy_(-2.0 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("mu"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _collapse(model: nn.Module) -> nn.Module:
    """sigma = softplus(-60) ~ 1e-26: every draw is the mean network."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("rho"):
                p.fill_(-60.0)
    return model


def test_every_name_of_deepuq_vi_is_here():
    for name in (
        "BayesByBackpropMLP",
        "BayesianLinear",
        "kl",
        "GaussianPosterior",
        "GaussianPrior",
        "predict_vi_uq",
        "vi_elbo_step",
        "UQResult",
    ):
        assert name in deepuq.__all__ and hasattr(deepuq, name)
    assert deepuq.BayesByBackpropRegressor is BayesByBackpropMLP
    fields = [f.name for f in dataclasses.fields(UQResult)]
    assert fields == ["mean", "epistemic_var", "aleatoric_var", "total_var", "probs", "probs_var", "metadata"]
    assert UQResult(torch.zeros(1)).metadata == {}


# ---------------------------------------------------------------------------------------------
# posterior, prior, layer


def test_posterior_is_mu_rho_with_deepuqs_sigma_draw_and_log_density():
    post = GaussianPosterior(torch.tensor([0.5, -1.0]), torch.tensor([-3.0, 2.0]))
    torch.testing.assert_close(post.sigma, torch.log1p(torch.exp(post.rho)))  # deepuq's formula
    torch.manual_seed(0)
    draw = post.sample()
    torch.manual_seed(0)
    torch.testing.assert_close(draw, post.mu + post.sigma * torch.randn_like(post.mu))
    w = torch.tensor([0.1, 0.2])
    expected = (
        -0.5 * ((w - post.mu) / post.sigma) ** 2 - torch.log(post.sigma) - 0.5 * math.log(2 * math.pi)
    ).sum()
    torch.testing.assert_close(post.log_prob(w), expected)
    assert torch.equal(post.sample(generator=gen(1)), post.sample(generator=gen(1)))


def test_prior_takes_mu_then_sigma_and_checks_sigma():
    prior = GaussianPrior(0.5, 2.0)
    assert (prior.mu, prior.sigma) == (0.5, 2.0) and GaussianPrior().sigma == 0.1
    w = torch.tensor([0.0, 1.0, 3.0])
    expected = (-0.5 * ((w - 0.5) / 2.0) ** 2 - math.log(2.0) - 0.5 * math.log(2 * math.pi)).sum()
    torch.testing.assert_close(prior.log_prob(w), expected)
    with pytest.raises(ValueError, match="std"):
        GaussianPrior(0.0, 0.0)


def test_layer_starts_at_zero_mean_rho_minus_3_draws_weight_then_bias_and_has_deepuqs_kl():
    layer = BayesianLinear(4, 3, 0.5, 0.2)  # deepuq's positional order: prior_sigma, prior_mu
    assert (layer.prior.sigma, layer.prior.mu) == (0.5, 0.2)
    assert torch.equal(layer.weight_posterior.mu, torch.zeros(3, 4))
    assert torch.equal(layer.bias_posterior.rho, torch.full((3,), -3.0))
    _randomise(layer)
    x = torch.randn(5, 4)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    w = layer.weight_posterior.mu + layer.weight_posterior.sigma * torch.randn_like(layer.weight_posterior.mu)
    b = layer.bias_posterior.mu + layer.bias_posterior.sigma * torch.randn_like(layer.bias_posterior.mu)
    torch.testing.assert_close(out, F.linear(x, w, b))
    torch.testing.assert_close(
        layer(x, sample=False), F.linear(x, layer.weight_posterior.mu, layer.bias_posterior.mu)
    )
    expected = _deepuq_kl(layer.weight_posterior.mu, layer.weight_posterior.sigma, 0.2, 0.5) + _deepuq_kl(
        layer.bias_posterior.mu, layer.bias_posterior.sigma, 0.2, 0.5
    )
    torch.testing.assert_close(layer.kl(), expected)
    torch.testing.assert_close(deepuq.kl(layer), expected)


def test_mlp_stacks_layers_with_its_activation_and_sums_their_kl():
    model = _randomise(BayesByBackpropMLP(3, [5, 4], 2, 0.3, 0.0, "tanh"))
    assert model.task_type == "generic" and not model.heteroscedastic
    x = torch.randn(6, 3)
    h = x
    for layer in model.hidden_layers:
        h = torch.tanh(F.linear(h, layer.weight_posterior.mu, layer.bias_posterior.mu))
    out = F.linear(h, model.output_layer.weight_posterior.mu, model.output_layer.bias_posterior.mu)
    torch.testing.assert_close(model(x, sample=False), out)
    layers = [*model.hidden_layers, model.output_layer]
    torch.testing.assert_close(model.kl(), sum(layer.kl() for layer in layers))
    torch.testing.assert_close(
        deepuq.kl(nn.Sequential(BayesianLinear(2, 2), BayesianLinear(2, 1))).shape, torch.Size([])
    )
    with pytest.raises(ValueError, match="Unsupported activation 'swish'"):
        BayesByBackpropMLP(3, [4], 2, activation="swish")


# ---------------------------------------------------------------------------------------------
# vi_elbo_step


def test_elbo_step_is_mean_nll_plus_weighted_kl_over_num_batches():
    model = _collapse(_randomise(BayesByBackpropMLP(4, [6], 3)))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loss, nll, kl_term = vi_elbo_step(model, x, y, num_batches=5, kl_weight=0.3, mc_samples=3)
    torch.testing.assert_close(nll, F.cross_entropy(model(x, sample=False), y))
    torch.testing.assert_close(kl_term, model.kl().detach() / 5)
    torch.testing.assert_close(loss, nll + 0.3 * kl_term)
    assert loss.requires_grad and not nll.requires_grad and not kl_term.requires_grad


def test_a_one_sample_elbo_step_draws_deepuqs_weights_for_the_same_seed():
    model = _randomise(BayesByBackpropMLP(4, [6, 5], 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    torch.manual_seed(2)
    loss, nll, kl_term = vi_elbo_step(model, x, y, num_batches=5, kl_weight=0.5)
    torch.manual_seed(2)  # deepuq: each layer draws its weight, then its bias, as the forward reaches it
    h = x
    layers = [*model.hidden_layers, model.output_layer]
    for i, layer in enumerate(layers):
        wp, bp = layer.weight_posterior, layer.bias_posterior
        w = wp.mu + torch.log1p(torch.exp(wp.rho)) * torch.randn_like(wp.mu)
        b = bp.mu + torch.log1p(torch.exp(bp.rho)) * torch.randn_like(bp.mu)
        h = F.linear(h, w, b)
        h = F.relu(h) if i < len(layers) - 1 else h
    kl = sum(
        _deepuq_kl(post.mu, post.sigma, 0.0, 0.1)
        for layer in layers
        for post in (layer.weight_posterior, layer.bias_posterior)
    )
    torch.testing.assert_close(nll, F.cross_entropy(h, y))
    torch.testing.assert_close(kl_term, kl.detach() / 5)
    torch.testing.assert_close(loss, F.cross_entropy(h, y) + 0.5 * kl / 5)


def test_elbo_step_averages_the_criterion_over_its_draws():
    model = _randomise(BayesByBackpropMLP(4, [6], 1))
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    criterion = nn.MSELoss()
    _, nll, _ = vi_elbo_step(model, x, y, num_batches=2, criterion=criterion, mc_samples=4, generator=gen(0))
    outputs = funcbnn.compat._draws.outputs_at_draws(
        model, deepuq._posterior_stds(model), x, 4, call=deepuq._sampling_call, generator=gen(0)
    )
    torch.testing.assert_close(nll, torch.stack([criterion(o, y) for o in outputs]).mean())
    # without a generator the draws come from the global RNG, fresh each call
    assert not torch.equal(
        vi_elbo_step(model, x, y, 2, criterion=criterion)[1],
        vi_elbo_step(model, x, y, 2, criterion=criterion)[1],
    )


def test_elbo_step_picks_mse_for_regressors_and_the_models_own_nll_when_heteroscedastic():
    x = torch.randn(7, 3)
    multi = _collapse(_randomise(MultiOutputBayesByBackpropRegressor(3, 2, hidden_dims=(5,))))
    y = torch.randn(7, 2)
    _, nll, _ = vi_elbo_step(multi, x, y, num_batches=1)
    torch.testing.assert_close(nll, F.mse_loss(multi(x, sample=False), y))
    het = _collapse(_randomise(HeteroscedasticBayesByBackpropRegressor(3, hidden_dims=(5,))))
    y = torch.randn(7, 1)
    _, nll, _ = vi_elbo_step(het, x, y, num_batches=1)
    mean, raw = het(x, sample=False).split(1, dim=-1)
    var = F.softplus(raw) + 1e-6
    torch.testing.assert_close(nll, (0.5 * ((y - mean) ** 2 / var + torch.log(var))).sum(-1).mean())
    hmo = HeteroscedasticMultiOutputBayesByBackpropRegressor(3, 2, hidden_dims=(4,))
    mean, raw = hmo.split_prediction(hmo(x))
    assert mean.shape == raw.shape == (7, 2) and bool((hmo.predictive_variance(raw) > 0).all())


def test_elbo_step_arguments_follow_deepuq():
    model = BayesByBackpropMLP(4, [6], 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.warns(DeprecationWarning, match="'n_batches' is deprecated"):
        with_alias = vi_elbo_step(model, x, y, n_batches=4, generator=gen(0))
    torch.testing.assert_close(with_alias[2], vi_elbo_step(model, x, y, num_batches=4, generator=gen(0))[2])
    with pytest.raises(ValueError, match="num_batches must be provided"):
        vi_elbo_step(model, x, y)
    with pytest.raises(ValueError, match="Provide only one batch-count"):
        vi_elbo_step(model, x, y, num_batches=2, n_batches=3)
    with pytest.raises(ValueError, match="num_batches must be a positive integer, got 0"):
        vi_elbo_step(model, x, y, num_batches=0)
    with pytest.raises(ValueError, match="mc_samples must be a positive integer, got 0"):
        vi_elbo_step(model, x, y, num_batches=2, mc_samples=0)


def test_deepuqs_kl_term_is_the_batch_size_times_the_elbos_and_the_native_step_divides_by_n():
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    compat = _randomise(BayesByBackpropMLP(4, [6], 3))
    _, _, kl_term = vi_elbo_step(compat, x, y, num_batches=5)
    kl = compat.kl().detach()
    n = 5 * len(y)  # five batches of eight
    torch.testing.assert_close(kl_term, len(y) * kl / n)  # B * KL / N, not the ELBO's KL / N
    native = funcbnn.nn.BayesByBackpropMLP(4, [6], 3, generator=gen(0))
    info = funcbnn.nn.vi_elbo_step(native, x, y, num_batches=5, generator=gen(1))
    torch.testing.assert_close(info.loss.detach(), info.nll + native.kl_divergence().detach() / n)


def test_elbo_step_trains_a_last_layer_model_through_its_feature_extractor():
    torch.manual_seed(0)
    model = LastLayerVariationalInference(
        nn.Sequential(nn.Linear(4, 6), nn.Tanh()), 6, 3, task="classification"
    )
    x, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    loss, _, kl_term = vi_elbo_step(model, x, y, num_batches=3, mc_samples=2)
    torch.testing.assert_close(kl_term, model.head.kl().detach() / 3)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    spatial = LastLayerVariationalInference(nn.Conv2d(1, 4, 1), 4, 3)
    with pytest.raises(ValueError, match="feature_dim=4"):
        spatial(torch.randn(2, 1, 5, 5))
    with pytest.raises(ValueError, match="task must be"):
        LastLayerVariationalInference(nn.Identity(), 2, 1, task="ranking")


# ---------------------------------------------------------------------------------------------
# predict_vi_uq


def test_predict_classification_reports_softmax_moments_and_leaves_eval_mode():
    model = _randomise(BayesByBackpropMLP(4, [6], 3)).train()
    x = torch.randn(5, 4)
    uq = predict_vi_uq(model, x, n_samples=20, apply_softmax=True, generator=gen(0))
    assert not model.training
    stds = deepuq._posterior_stds(model)
    outputs = funcbnn.compat._draws.outputs_at_draws(
        model, stds, x, 20, call=deepuq._sampling_call, generator=gen(0)
    )
    probs = outputs.softmax(-1)
    torch.testing.assert_close(uq.probs, probs.mean(0))
    torch.testing.assert_close(uq.probs_var, probs.var(0, unbiased=False))
    assert uq.mean is uq.probs and uq.total_var is uq.epistemic_var and uq.aleatoric_var is None
    assert uq.metadata == {"method": "vi", "n_samples": 20, "task": "classification"}
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        predict_vi_uq(model, x, n_samples=0)


def test_predict_regression_epistemic_variance_matches_the_linear_gaussian_theory():
    layer = BayesianLinear(3, 1)
    with torch.no_grad():
        layer.weight_posterior.rho.fill_(-1.0)
        layer.bias_posterior.rho.fill_(-1.0)
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    uq = predict_vi_uq(layer, x, n_samples=4000, generator=gen(0))
    s2 = F.softplus(torch.tensor(-1.0)) ** 2
    theory = s2 * ((x**2).sum(-1, keepdim=True) + 1)  # Var[x.w + b] = s^2 (|x|^2 + 1)
    torch.testing.assert_close(uq.epistemic_var, theory, rtol=0.1, atol=0)
    assert uq.aleatoric_var is None and uq.total_var is uq.epistemic_var and uq.probs is None
    noisy = predict_vi_uq(layer, x, n_samples=10, aleatoric_var=torch.tensor([0.5]), generator=gen(0))
    torch.testing.assert_close(noisy.total_var, noisy.epistemic_var + 0.5)
    assert noisy.metadata == {"method": "vi", "n_samples": 10, "task": "regression", "heteroscedastic": False}


def test_predict_heteroscedastic_reports_the_mean_noise_variance_as_aleatoric():
    model = _collapse(_randomise(HeteroscedasticBayesByBackpropRegressor(2, hidden_dims=(4,))))
    x = torch.randn(6, 2)
    uq = predict_vi_uq(model, x, n_samples=3)
    mean, raw = model(x, sample=False).split(1, dim=-1)
    torch.testing.assert_close(uq.mean, mean)
    torch.testing.assert_close(uq.aleatoric_var, F.softplus(raw) + 1e-6)
    torch.testing.assert_close(uq.total_var, uq.epistemic_var + uq.aleatoric_var)
    assert uq.metadata["heteroscedastic"] is True


def test_predict_runs_any_model_with_a_sample_flag_and_is_reproducible_with_a_generator():
    class Custom(nn.Module):  # deepuq's protocol without deepuq's layers: run by a loop
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, sample=True):
            return self.lin(x) + (torch.randn(x.shape[0], 2) if sample else 0.0)

    uq = predict_vi_uq(Custom(), torch.randn(4, 3), n_samples=50)
    assert uq.mean.shape == (4, 2) and bool((uq.epistemic_var > 0.3).all())
    model = _randomise(BayesByBackpropMLP(3, [4], 2))
    a = predict_vi_uq(model, torch.ones(2, 3), n_samples=5, generator=gen(4))
    b = predict_vi_uq(model, torch.ones(2, 3), n_samples=5, generator=gen(4))
    assert torch.equal(a.mean, b.mean) and torch.equal(a.epistemic_var, b.epistemic_var)


# ---------------------------------------------------------------------------------------------
# MC dropout


def test_mc_dropout_wrapper_reports_population_moments_over_seeded_masks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    wrapper = MCDropoutWrapper(net, n_mc=12)
    x = torch.randn(5, 4)
    mean, var = wrapper.predict(x, generator=gen(0))
    assert not net.training
    apply_fn, params, _ = funcbnn.mc_dropout.functionalize(net)
    post = dropout_family()
    probs = funcbnn.sample_outputs(apply_fn, post.sample(post.init(params), 12, generator=gen(0)), x).softmax(
        -1
    )
    torch.testing.assert_close(mean, probs.mean(0))
    torch.testing.assert_close(var, probs.var(0, unbiased=False))
    uq = wrapper.predict_uq(x, generator=gen(0))
    assert torch.equal(uq.probs, mean) and torch.equal(uq.total_var, var)
    assert uq.metadata == {"method": "mc_dropout", "n_mc": 12, "apply_softmax": True}
    raw = MCDropoutWrapper(net, n_mc=4, apply_softmax=False).predict_uq(x)
    assert raw.probs is None and raw.mean.shape == (5, 3)
    assert MCDropoutWrapper(net).train(True) is not None and net.training


# guards: non-finite and ill-fitting targets, wrapped models


def test_elbo_step_refuses_non_finite_inputs_and_targets_unless_the_checks_are_off():
    model, x = BayesByBackpropMLP(3, [8], 2), torch.randn(20, 3)
    soft = torch.full((20, 2), float("nan"))
    with pytest.raises(funcbnn.checks.NonFiniteError, match=r"^y contains non-finite values \(40 NaN"):
        vi_elbo_step(model, x, soft, num_batches=1, generator=gen(0))
    bad_x = x.clone()
    bad_x[3, 1] = float("inf")
    with pytest.raises(funcbnn.checks.NonFiniteError, match=r"^x contains non-finite values \(0 NaN, 1 inf"):
        vi_elbo_step(model, bad_x, torch.randint(0, 2, (20,)), num_batches=1, generator=gen(0))
    with funcbnn.checks.set_finite_checks(False):  # the opt-out gives deepuq's NaN loss back
        assert vi_elbo_step(model, x, soft, num_batches=1, generator=gen(0))[0].isnan()


@pytest.mark.parametrize(
    ("make", "y", "match"),
    [
        (lambda: BayesByBackpropMLP(3, [8], 2), torch.randint(0, 2, (20, 3)), r"shape \(20,\) of class"),
        (lambda: BayesByBackpropMLP(3, [8], 2), torch.full((20,), 7), r"lie in \[0, 1\] for 2 classes"),
        (lambda: BayesByBackpropMLP(3, [8], 2), torch.rand(20), r"integer class indices, got dtype"),
        # nn.MSELoss would broadcast (20,) against (20, 1) into a 20 x 20 loss
        (lambda: MultiOutputBayesByBackpropRegressor(3, 1, hidden_dims=(5,)), torch.randn(20), r"outputs \(20, 1\)"),
        (lambda: HeteroscedasticBayesByBackpropRegressor(3, hidden_dims=(5,)), torch.randn(20, 2), r"mean half"),
    ],
    ids=["labels_20x3", "label_7_of_2", "float_labels", "mse_shape", "heteroscedastic_shape"],
)
def test_elbo_step_refuses_targets_that_do_not_fit_its_default_loss(make, y, match):
    with pytest.raises(ValueError, match=r"^vi_elbo_step: y does not fit the model's outputs .*" + match):
        vi_elbo_step(make(), torch.randn(20, 3), y, num_batches=1, generator=gen(0))


def test_elbo_step_still_takes_soft_targets_and_any_targets_of_a_callers_criterion():
    model = _collapse(_randomise(BayesByBackpropMLP(3, [8], 2)))
    x = torch.randn(20, 3)
    probs = torch.softmax(torch.randn(20, 2), dim=-1)
    _, nll, _ = vi_elbo_step(model, x, probs, num_batches=1)
    logits = model(x, sample=False)
    torch.testing.assert_close(nll, -(probs * torch.log_softmax(logits, -1)).sum(-1).mean())
    # a criterion of the caller's decides what its targets are: (20, 3) here, no check of ours
    criterion = lambda out, y: out.sum() * 0 + y.sum()  # noqa: E731
    _, nll, _ = vi_elbo_step(model, x, torch.ones(20, 3), num_batches=1, criterion=criterion)
    torch.testing.assert_close(nll, torch.tensor(60.0))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing torch._dynamo
def test_dropout_and_vi_predictions_on_a_compiled_model_equal_the_plain_ones():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2))
    x = torch.randn(9, 3)
    for a, b in zip(
        MCDropoutWrapper(torch.compile(net), n_mc=4).predict(x, generator=gen(1)),
        MCDropoutWrapper(net, n_mc=4).predict(x, generator=gen(1)),
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model = _randomise(BayesByBackpropMLP(3, [8], 2))
    wrapped = predict_vi_uq(torch.compile(model), x, n_samples=4, generator=gen(2))
    plain = predict_vi_uq(model, x, n_samples=4, generator=gen(2))
    torch.testing.assert_close(wrapped.mean, plain.mean, rtol=0, atol=0)
    torch.testing.assert_close(wrapped.epistemic_var, plain.epistemic_var, rtol=0, atol=0)


def test_mc_dropout_wrapper_called_like_a_module_is_predict():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    wrapper = MCDropoutWrapper(net, n_mc=6)
    x = torch.randn(5, 4)
    called = wrapper(x, generator=torch.Generator().manual_seed(2))
    predicted = wrapper.predict(x, generator=torch.Generator().manual_seed(2))
    for a, b in zip(called, predicted):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
