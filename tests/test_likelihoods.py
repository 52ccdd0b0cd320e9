import pytest
import torch

from funcbnn import likelihoods as L

g = torch.Generator().manual_seed(0)


def test_categorical_nll_matches_torch_distributions():
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=g)
    want = -torch.distributions.Categorical(logits=logits).log_prob(y)
    assert torch.allclose(L.categorical().nll(logits, y), want)


def test_gaussian_nll_matches_torch_distributions():
    mean, y = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    want = -torch.distributions.Normal(mean, 0.3).log_prob(y).sum(1)
    assert torch.allclose(L.gaussian(sigma=0.3).nll(mean, y), want)


def test_heteroscedastic_nll_matches_torch_distributions():
    out = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.randn(5, 2, generator=g, dtype=torch.float64)
    want = -torch.distributions.Normal(out[:, :2], out[:, 2:].mul(0.5).exp()).log_prob(y).sum(1)
    assert torch.allclose(L.heteroscedastic_gaussian().nll(out, y), want)


def test_bernoulli_nll_matches_torch_distributions():
    z = torch.randn(7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (7,), generator=g).double()
    assert torch.allclose(L.bernoulli().nll(z, y), -torch.distributions.Bernoulli(logits=z).log_prob(y))


def test_checks_name_what_does_not_fit():
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 2\]"):
        L.categorical().check(torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"shape \(N, C\)"):
        L.categorical().check(torch.zeros(4), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="integer class indices"):
        L.categorical().check(torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        L.gaussian().check(torch.zeros(4, 1), torch.zeros(4))
    with pytest.raises(ValueError, match="even last axis"):
        L.heteroscedastic_gaussian().check(torch.zeros(4, 3), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="0 or 1"):
        L.bernoulli().check(torch.zeros(3), torch.tensor([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="sigma"):
        L.gaussian(sigma=0.0)
    with pytest.raises(ValueError, match="registered likelihood names"):
        L.get_likelihood("poisson")


def test_categorical_summary_of_probabilities_for_any_batch_and_class_count():
    logits = torch.randn(4, 7, 3, generator=g, dtype=torch.float64)  # 7 inputs, 3 classes
    from_probs = L.categorical().summarize(logits.softmax(-1), outputs_are="probs")
    from_logits = L.categorical().summarize(logits)
    torch.testing.assert_close(from_probs.probs, from_logits.probs)
    torch.testing.assert_close(from_probs.mutual_info, from_logits.mutual_info)
    with pytest.raises(ValueError, match="sum to 1"):
        L.categorical().summarize(logits.softmax(-1) * 2, outputs_are="probs")


@pytest.mark.parametrize("alias,name", [("classification", "categorical"), ("regression", "gaussian"),
                                        ("binary", "bernoulli"), ("heteroscedastic_regression", "heteroscedastic_gaussian")])
def test_task_names_alias_the_distribution_names(alias, name):
    assert L.get_likelihood(alias).name == name
    assert L.LIKELIHOODS.canonical(alias) == name


def test_hessian_square_roots_rebuild_the_nll_hessian():
    """sum_c V_c V_c^T equals the autograd Hessian of the per-example NLL in the outputs (at unit noise)."""
    for lik, out, y in [
        (L.categorical(), torch.randn(3, 4, generator=g, dtype=torch.float64), torch.tensor([0, 3, 1])),
        (L.gaussian(1.0), torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)),
        (L.bernoulli(), torch.randn(3, generator=g, dtype=torch.float64), torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)),
    ]:
        V = lik.hessian_sqrt(out)  # (K, N, *out)
        for n in range(out.shape[0]):
            v = V[:, n].reshape(V.shape[0], -1)
            want = torch.autograd.functional.hessian(lambda o: lik.nll(o[None], y[n : n + 1]).sum(), out[n])
            torch.testing.assert_close(v.T @ v, want.reshape(v.shape[1], v.shape[1]))


def test_gaussian_keeps_a_sigma_tensor_that_requires_grad_and_its_gradient_is_torchs():
    sigma = torch.tensor(0.7, requires_grad=True)
    lik = L.gaussian(sigma=sigma)
    assert isinstance(lik.sigma, torch.Tensor) and lik.sigma.requires_grad
    g = torch.Generator().manual_seed(0)
    mean, y = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    (grad,) = torch.autograd.grad(lik.nll(mean, y).sum(), sigma)
    ref = torch.tensor(0.7, requires_grad=True)
    (want,) = torch.autograd.grad(-torch.distributions.Normal(mean, ref).log_prob(y).sum(), ref)
    torch.testing.assert_close(grad, want)


def test_learnable_gaussian_reads_its_log_sigma_live_and_matches_torch_distributions():
    log_sigma = torch.tensor(-0.3, requires_grad=True)
    lik = L.learnable_gaussian(log_sigma)
    g = torch.Generator().manual_seed(1)
    mean, y = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    for value in (-0.3, 0.4):  # an optimiser updates the tensor in place: the likelihood follows
        with torch.no_grad():
            log_sigma.fill_(value)
        got = lik.nll(mean, y)
        want = -torch.distributions.Normal(mean, torch.tensor(value).exp()).log_prob(y).sum(-1)
        torch.testing.assert_close(got, want)
    (grad,) = torch.autograd.grad(lik.nll(mean, y).sum(), log_sigma)
    ref = torch.tensor(0.4, requires_grad=True)
    (want,) = torch.autograd.grad(-torch.distributions.Normal(mean, ref.exp()).log_prob(y).sum(), ref)
    torch.testing.assert_close(grad, want)
    with pytest.raises(ValueError, match="must require grad"):
        L.learnable_gaussian(torch.tensor(0.0))
    with pytest.raises(TypeError, match="one-element floating-point tensor"):
        L.learnable_gaussian(0.0)


def test_bernoulli_summary_of_probabilities_outside_the_unit_interval_raises_instead_of_clamping():
    lik = L.get_likelihood("binary")
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\], got values in \[-0.5, 1.5\]"):
        lik.summarize(torch.tensor([[-0.5, 0.2, 1.5]]), outputs_are="probs")
    ok = lik.summarize(torch.tensor([[0.0, 0.25, 1.0]]), outputs_are="probs")
    torch.testing.assert_close(ok.probs[:, 1], torch.tensor([0.0, 0.25, 1.0]))


def test_summary_noise_std_of_the_wrong_shape_and_overflowing_log_variances_are_named():
    from funcbnn import summarize
    from funcbnn.checks import NonFiniteError

    with pytest.raises(ValueError, match=r"noise_std must be a scalar or broadcast to one example's outputs \(10, 1\)"):
        summarize(torch.randn(5, 10, 1), "regression", noise_std=torch.ones(3))
    per_output = summarize(torch.randn(5, 10, 2), "regression", noise_std=torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(per_output.aleatoric_var[0], torch.tensor([0.25, 4.0]))
    outputs = torch.cat([torch.randn(5, 10, 1), torch.full((5, 10, 1), 100.0)], -1)
    with pytest.raises(NonFiniteError, match="overflow"):
        summarize(outputs, "heteroscedastic")
