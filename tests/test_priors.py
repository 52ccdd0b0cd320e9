import math

import pytest
import torch

from funcbnn import priors


def test_gaussian_log_prob_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, generator=g, dtype=torch.float64), "b": torch.randn(4, generator=g, dtype=torch.float64)}
    centre = {"w": torch.randn(4, 3, generator=g, dtype=torch.float64), "b": torch.zeros(4, dtype=torch.float64)}
    std = {"w": 0.3, "b": torch.linspace(0.5, 2.0, 4, dtype=torch.float64)}
    got = priors.gaussian(std=std, mean=centre).log_prob(params)
    want = sum(
        torch.distributions.Normal(centre[k], torch.as_tensor(std[k], dtype=torch.float64)).log_prob(params[k]).sum()
        for k in params
    )
    assert torch.allclose(got, want, rtol=1e-12)


def _mixture_direct(w: torch.Tensor, pi: float, s1: float, s2: float) -> torch.Tensor:
    """Float64 density sum, then log: the textbook formula, valid where it does not underflow."""
    w = w.double()
    n1 = torch.exp(-0.5 * (w / s1) ** 2) / (s1 * math.sqrt(2 * math.pi))
    n2 = torch.exp(-0.5 * (w / s2) ** 2) / (s2 * math.sqrt(2 * math.pi))
    return torch.log(pi * n1 + (1 - pi) * n2).sum()


def test_scale_mixture_log_prob_matches_direct_computation():
    w = torch.linspace(-3, 3, 41, dtype=torch.float64)
    prior = priors.scale_mixture(pi=0.3, sigma1=1.0, sigma2=0.1)
    assert torch.allclose(prior.log_prob({"w": w}), _mixture_direct(w, 0.3, 1.0, 0.1), rtol=1e-12)


def test_scale_mixture_stays_finite_for_tiny_sigma2():
    w = torch.tensor([0.0, 1e-12, 0.05, 2.0], requires_grad=True)  # float32, includes w == 0
    prior = priors.scale_mixture(pi=0.5, sigma1=1.0, sigma2=1e-30)
    lp = prior.log_prob({"w": w})
    assert torch.isfinite(lp)
    (grad,) = torch.autograd.grad(lp, w)
    assert torch.isfinite(grad).all()
    # Away from zero the narrow component vanishes and the wide one alone remains.
    far = torch.tensor([0.05, 2.0], dtype=torch.float64)
    want = (torch.distributions.Normal(0.0, 1.0).log_prob(far) + math.log(0.5)).sum()
    assert torch.allclose(prior.log_prob({"w": far}), want)


def test_scale_mixture_samples_have_the_mixture_variance():
    prior = priors.scale_mixture(pi=0.25, sigma1=2.0, sigma2=0.1)
    draws = prior.sample({"w": torch.zeros(10, dtype=torch.float64)}, 20_000, generator=torch.Generator().manual_seed(0))["w"]
    var = 0.25 * 4.0 + 0.75 * 0.01
    # Var of the sample variance of a mixture: (E w^4 - var^2) / n.
    fourth = 3 * (0.25 * 16.0 + 0.75 * 1e-4)
    se = math.sqrt((fourth - var**2) / draws.numel())
    assert abs(draws.pow(2).mean().item() - var) < 5 * se


def test_bad_prior_arguments_are_rejected():
    with pytest.raises(ValueError, match="std"):
        priors.gaussian(std=0.0)
    with pytest.raises(ValueError, match="std.*'b'"):
        priors.gaussian(std={"w": 1.0, "b": -0.3})
    with pytest.raises(ValueError, match="pi"):
        priors.scale_mixture(pi=1.0)
    with pytest.raises(ValueError, match="sigma2"):
        priors.scale_mixture(sigma2=-1.0)
    with pytest.raises(TypeError, match="log_prob"):
        priors.from_log_prob("not callable")
    with pytest.raises(ValueError, match="does not broadcast"):
        priors.gaussian(std={"w": torch.ones(5)}).log_prob({"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="structure"):
        priors.gaussian(std={"v": 1.0}).log_prob({"w": torch.zeros(3)})


def test_prior_registry_builds_by_name_and_rejects_unknown_names_and_keys():
    assert isinstance(priors.PRIORS.build("gaussian", std=0.5), priors.GaussianPrior)
    with pytest.raises(ValueError, match="registered prior names: gaussian, log_prob, scale_mixture"):
        priors.PRIORS.build("laplace")
    with pytest.raises(TypeError, match="'sigma'"):
        priors.PRIORS.build("gaussian", sigma=1.0)


def test_user_prior_without_sampler_says_so():
    prior = priors.from_log_prob(lambda p: -sum((v**2).sum() for v in p.values()))
    with pytest.raises(NotImplementedError, match="sample_fn"):
        prior.sample({"w": torch.zeros(2)}, 3)


def test_a_learned_scalar_prior_scale_receives_gradients():
    log_std = torch.tensor(0.3, requires_grad=True)
    w = torch.tensor([2.0, -1.0, 0.5])
    (grad,) = torch.autograd.grad(priors.gaussian(std=log_std.exp()).log_prob({"w": w}), log_std)
    # d/d(log s) of sum(-0.5 w^2 / s^2 - log s) = sum(w^2) / s^2 - n
    s = math.exp(0.3)
    assert torch.allclose(grad, torch.tensor((w**2).sum().item() / s**2 - 3))


def test_scale_mixture_samples_keep_float64_scales():
    prior = priors.scale_mixture(pi=0.5, sigma1=0.1, sigma2=0.1)
    g = torch.Generator().manual_seed(0)
    draws = prior.sample({"w": torch.zeros(4, dtype=torch.float64)}, 3, generator=g)["w"]
    g = torch.Generator().manual_seed(0)
    torch.rand((3, 4), dtype=torch.float64, generator=g)
    want = torch.empty((3, 4), dtype=torch.float64).normal_(generator=g) * 0.1
    assert torch.equal(draws, want)


def test_prior_tuples_validate_their_fields_when_built_directly():
    # deepuq's GaussianPrior(mu, sigma) read as (std, mean): a zero std, caught at construction
    with pytest.raises(ValueError, match=r"std.*\(std, mean\), std first.*gaussian\(std=s, mean=m\)"):
        priors.GaussianPrior(0.0, 0.1)
    with pytest.raises(ValueError, match="std"):
        priors.GaussianPrior(std=-1.0)
    with pytest.raises(ValueError, match="mean must be finite"):
        priors.GaussianPrior(1.0, float("nan"))
    with pytest.raises(ValueError, match="pi"):
        priors.ScaleMixturePrior(1.5, 1.0, 0.1)
    with pytest.raises(ValueError, match="sigma2"):
        priors.ScaleMixturePrior(0.5, 1.0, 0.0)
    assert priors.GaussianPrior(0.1, 0.5) == priors.gaussian(std=0.1, mean=0.5)


def test_validated_priors_still_copy_pickle_and_map_as_tuples():
    import copy
    import pickle

    import optree

    prior = priors.gaussian(std=0.2, mean=0.1)
    assert copy.deepcopy(prior) == prior
    assert pickle.loads(pickle.dumps(prior)) == prior
    assert optree.tree_map(lambda v: 2 * v, prior) == priors.gaussian(std=0.4, mean=0.2)
    mixture = priors.scale_mixture(0.3, 2.0, 0.5)
    assert pickle.loads(pickle.dumps(mixture)) == mixture
