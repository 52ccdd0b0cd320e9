"""The object-style LaplaceApproximation: the same numbers as the functional API, clear misuse errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from funcbnn import functionalize
from funcbnn.laplace import LaplaceApproximation, NotFittedError, fit


def _classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_methods_before_fit_raise_not_fitted_error():
    la = LaplaceApproximation(_classifier(), "classification")
    x, _ = _data()
    assert not la.is_fitted
    for call in (lambda: la.predict(x), la.tune, la.log_marglik, lambda: la.sample(2), lambda: la.state):
        with pytest.raises(NotFittedError, match="fit"):
            call()


def test_fit_leaves_the_model_untouched():
    net = _classifier()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = _data()
    la = LaplaceApproximation(net, "classification").fit([(x, y)])
    la.tune(steps=5)
    la.predict(x, n_samples=4)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_state_equals_the_functional_fit():
    net = _classifier()
    x, y = _data()
    la = LaplaceApproximation(net, "classification", prior_precision=2.0, curvature="ef").fit([(x, y)])
    apply_fn, params, _ = functionalize(net)
    _, state = fit(apply_fn, params, [(x, y)], "categorical", curvature="ef", prior_precision=2.0)
    for k in state.curvature:
        torch.testing.assert_close(la.state.curvature[k], state.curvature[k], rtol=1e-12, atol=0)
    torch.testing.assert_close(la.log_marglik(), la.laplace.log_marglik(state))


def test_curvature_does_not_depend_on_the_batching():
    # incerto squares batch-mean gradients, so its posterior changes with the batch size; ours sums
    # per-example terms.
    net = _classifier()
    x, y = _data(48)
    whole = LaplaceApproximation(net, "classification").fit([(x, y)]).state
    batches = [(x[i : i + 12], y[i : i + 12]) for i in range(0, 48, 12)]
    split = LaplaceApproximation(net, "classification").fit(batches).state
    for k in whole.curvature:
        torch.testing.assert_close(split.curvature[k], whole.curvature[k], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(split.loss, whole.loss)


def test_classification_predict_is_the_mean_and_variance_of_sampled_probabilities():
    net = _classifier()
    x, y = _data()
    la = LaplaceApproximation(net, "classification").fit([(x, y)])
    mean, var, samples = la.predict(x[:5], 32, return_samples=True, generator=torch.Generator().manual_seed(3))
    assert samples.shape == (32, 5, 3)
    torch.testing.assert_close(mean, samples.mean(0))
    torch.testing.assert_close(var, samples.var(0, correction=0))
    torch.testing.assert_close(mean.sum(-1), torch.ones(5, dtype=torch.float64))
    # The same draws by hand: the posterior's samples through the model.
    draws = la.sample(32, generator=torch.Generator().manual_seed(3))
    by_hand = torch.stack([la.laplace.apply_fn({k: v[s] for k, v in draws.items()}, x[:5]) for s in range(32)])
    torch.testing.assert_close(samples, by_hand.softmax(-1))


def test_regression_variance_adds_the_noise_and_matches_the_linearised_predictive():
    # A linear model: the weight-sampling predictive is exactly Gaussian, so its MC variance must
    # match the closed form x^T P^-1 x + sigma^2 within the sampling error of a variance.
    torch.manual_seed(0)
    net = nn.Linear(3, 1).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.3 * torch.randn(40, 1, generator=g, dtype=torch.float64)
    la = LaplaceApproximation(net, "regression", prior_precision=1.0, structure="full", sigma=0.3).fit([(x, y)])
    n = 4000
    mean, var = la.predict(x[:4], n, generator=torch.Generator().manual_seed(2))
    exact_mean, exact_var = la.laplace.predict(la.state, x[:4])
    noise = 0.3**2
    epistemic = exact_var - noise
    # sd of a sample variance of a Gaussian is var * sqrt(2 / n); of a sample mean sqrt(var / n).
    assert ((var - exact_var).abs() <= 5 * epistemic * (2 / n) ** 0.5 + 1e-12).all()
    assert ((mean - exact_mean).abs() <= 5 * (epistemic / n).sqrt()).all()


def test_tune_updates_the_hyperparameters_and_raises_the_marginal_likelihood():
    torch.manual_seed(0)
    net = nn.Linear(3, 1).double()
    x = torch.randn(60, 3, dtype=torch.float64)
    y = x.sum(1, keepdim=True) + 0.2 * torch.randn(60, 1, dtype=torch.float64)
    with torch.no_grad():  # put the weights at the least-squares fit so the Laplace mode is right
        sol = torch.linalg.lstsq(torch.cat([x, torch.ones(60, 1, dtype=torch.float64)], 1), y).solution
        net.weight.copy_(sol[:3].T)
        net.bias.copy_(sol[3])
    la = LaplaceApproximation(net, "regression", prior_precision=100.0, sigma=1.0).fit([(x, y)])
    before = la.log_marglik()
    la.tune(steps=300)
    assert la.log_marglik() > before
    assert 0.12 < la.sigma < 0.3
    assert float(la.prior_precision) != 100.0


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_predict_rejects_a_bad_sample_count(bad):
    x, y = _data()
    la = LaplaceApproximation(_classifier(), "classification").fit([(x, y)])
    with pytest.raises((ValueError, TypeError), match="n_samples"):
        la.predict(x, bad)


def test_bad_construction_and_data_raise_clear_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        LaplaceApproximation(lambda x: x, "classification")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="likelihood"):
        LaplaceApproximation(_classifier(), "ordinal")
    la = LaplaceApproximation(_classifier(), "classification")
    with pytest.raises(ValueError, match="empty"):
        la.fit([])
    with pytest.raises(ValueError, match="empty"):
        la.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 2), torch.zeros(0))))
    assert not la.is_fitted


def test_kron_structure_and_a_gaussian_likelihood_object_are_passed_through():
    from funcbnn.likelihoods import gaussian

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(30, 3, dtype=torch.float64)
    y = x[:, :1] + 0.1 * torch.randn(30, 1, dtype=torch.float64)
    la = LaplaceApproximation(net, gaussian(sigma=0.5), structure="kron").fit([(x, y)])
    assert la.state.sigma.item() == 0.5 and la.laplace.structure == "kron"
    mean, var = la.predict(x[:3], 8)
    assert mean.shape == var.shape == (3, 1) and bool((var > 0.25).all())
