"""Online marginal-likelihood training (funcbnn.laplace.marglik_training, Immer et al. 2021).

The reference is conjugate Bayesian linear regression: for ``y = Phi w + eps`` with
``w ~ N(0, diag(1/alpha))`` and ``eps ~ N(0, sigma^2)`` the evidence is
``N(y; 0, sigma^2 I + Phi diag(1/alpha) Phi^T)`` in closed form; its maximiser over
``(alpha, sigma)`` is found here by L-BFGS on that formula and must be what
marglik training (MAP by L-BFGS, hyperparameters by Adam on the Laplace
marginal likelihood, which is exact for a linear-Gaussian model at its MAP)
converges to.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from funcbnn import functionalize
from funcbnn.laplace import marglik_training

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(n: int = 60) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g, dtype=DT)
    y = (x @ torch.tensor([1.0, -2.0, 0.5], dtype=DT) + 1.5 + 0.4 * torch.randn(n, generator=g, dtype=DT))[:, None]
    return x, y, torch.cat([x, torch.ones(n, 1, dtype=DT)], 1)


def _evidence_maximiser(phi: Tensor, y: Tensor, layerwise: bool) -> tuple[Tensor, Tensor]:
    """``(alpha, sigma)`` maximising the closed-form BLR evidence (alpha: (2,) weight/bias if layerwise)."""
    n = phi.shape[0]
    log_alpha = torch.zeros(2 if layerwise else 1, dtype=DT, requires_grad=True)
    log_sigma = torch.zeros((), dtype=DT, requires_grad=True)
    opt = torch.optim.LBFGS([log_alpha, log_sigma], max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def neg_evidence() -> Tensor:
        opt.zero_grad()
        a = log_alpha.exp()
        prior_var = torch.cat([a[0].expand(3), a[-1:]]).reciprocal()
        cov = log_sigma.exp() ** 2 * torch.eye(n, dtype=DT) + (phi * prior_var) @ phi.T
        loss = -torch.distributions.MultivariateNormal(torch.zeros(n, dtype=DT), covariance_matrix=cov).log_prob(y[:, 0])
        loss.backward()
        return loss

    opt.step(neg_evidence)
    return log_alpha.detach().exp(), log_sigma.detach().exp()


def _lbfgs(leaves: list[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.LBFGS(leaves, max_iter=50, tolerance_grad=1e-12, tolerance_change=1e-14,
                             line_search_fn="strong_wolfe")


@pytest.mark.parametrize(
    "structure,prior_structure", [("full", "scalar"), ("full", "layerwise"), ("kron", "scalar")]
)
def test_marglik_training_recovers_the_conjugate_evidence_maximiser(structure, prior_structure):
    x, y, phi = _problem()
    alpha, sigma = _evidence_maximiser(phi, y, prior_structure == "layerwise")
    torch.manual_seed(0)
    apply_fn, params, _ = functionalize(nn.Linear(3, 1).double())
    params, la, state, info = marglik_training(
        apply_fn, params, [(x, y)], "regression", structure=structure, prior_structure=prior_structure,
        epochs=15, optimizer=_lbfgs, hyper_steps=20, lr_hyp=0.3,
    )
    torch.testing.assert_close(state.prior_precision, alpha.reshape(state.prior_precision.shape), rtol=1e-5, atol=0)
    torch.testing.assert_close(state.sigma, sigma, rtol=1e-5, atol=0)
    # The weights are the posterior mean of the conjugate model at those hyperparameters.
    prior = torch.cat([alpha[0].expand(3), alpha[-1:]])
    w = torch.linalg.solve(phi.T @ phi / sigma**2 + torch.diag(prior), phi.T @ y[:, 0] / sigma**2)
    torch.testing.assert_close(torch.cat([params["weight"].reshape(-1), params["bias"]]), w, rtol=1e-6, atol=1e-8)
    assert info.loss.shape == (15,) and info.log_marglik.shape == (15 * 20,) and 1 <= info.best_epoch <= 15
    assert info.prior_precision.shape[0] == info.sigma.shape[0] == 15


def test_classification_training_returns_a_fitted_laplace_and_calls_back():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 2, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    torch.manual_seed(0)
    apply_fn, params, _ = functionalize(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)))
    seen = []
    result = marglik_training(
        apply_fn, params, [(x[:20], y[:20]), (x[20:], y[20:])], "classification", structure="diag", epochs=6,
        lr=1e-2, marglik_frequency=2, burnin=2, callback=lambda epoch, p, s: seen.append((epoch, s is not None)),
    )
    assert seen == [(1, False), (2, True), (3, False), (4, True), (5, False), (6, True)]
    assert result.state.prior_precision.shape == (4,)  # layerwise: one per leaf
    assert result.info.best_epoch in (2, 4, 6)
    probs = result.laplace.predict(result.state, x)
    torch.testing.assert_close(probs.sum(-1), torch.ones(40))
    # The returned state is the Laplace fit at the returned weights with the returned hyperparameters.
    assert all(torch.equal(result.state.mean[k], result.params[k]) for k in params)


def test_bad_arguments_are_refused():
    x, y, _ = _problem(8)
    apply_fn, params, _ = functionalize(nn.Linear(3, 1).double())
    with pytest.raises(ValueError, match="weight_decay must be 0"):
        marglik_training(apply_fn, params, [(x, y)], "regression", epochs=1,
                         optimizer=lambda ps: torch.optim.AdamW(ps, weight_decay=0.01))
    with pytest.raises(ValueError, match="prior_structure='diag'.*kron"):
        marglik_training(apply_fn, params, [(x, y)], "regression", prior_structure="diag", epochs=1)
    with pytest.raises(ValueError, match="prior_structure must be one of"):
        marglik_training(apply_fn, params, [(x, y)], "regression", prior_structure="per_layer", epochs=1)
    with pytest.raises(ValueError, match="tune_sigma applies to the 'gaussian' likelihood only"):
        marglik_training(apply_fn, params, [(x, y[:, 0].long().clamp(0, 1))], "bernoulli", tune_sigma=True, epochs=1)
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        marglik_training(apply_fn, params, [(x, y)], "regression", epochs=0)
