"""Deep ensembles: the vmapped step equals member-by-member training; the empirical family; diversity."""

import pytest
import torch
from torch import nn

from conftest import gen, make_mlp
from funcbnn import ensemble, functionalize, sample_outputs, summarize
from funcbnn.families.empirical import EmpiricalState, empirical


def _data(n=96, seed=0):
    g = gen(seed)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()


@pytest.mark.parametrize("adversarial_eps", [0.0, 0.05])
def test_vmapped_training_equals_training_members_one_by_one(adversarial_eps):
    net = make_mlp((4, 8, 3))
    apply_fn, _, _ = functionalize(net)
    members = ensemble.init_members(net, 3, generator=gen(1))
    data = _data()
    opt = lambda leaves: torch.optim.Adam(leaves, lr=0.01)  # noqa: E731
    kw = dict(epochs=3, batch_size=32, optimizer=opt, adversarial_eps=adversarial_eps)
    res = ensemble.fit(apply_fn, members, data, **kw, generator=gen(2))
    loop = ensemble.fit(apply_fn, members, data, **kw, generator=gen(2), method="loop")
    # independent truth: each member alone, with its own Adam, on the batches the generator gives it
    g = gen(2)
    orders = [torch.stack([torch.randperm(96, generator=g) for _ in range(3)]) for _ in range(3)]
    for k in range(3):
        p = {n_: v[k].clone().requires_grad_(True) for n_, v in members.members.items()}
        adam = torch.optim.Adam(list(p.values()), lr=0.01)
        for epoch in range(3):
            for start in range(0, 96, 32):
                idx = orders[epoch][k, start : start + 32]
                adam.zero_grad()
                x, y = data[0][idx], data[1][idx]
                loss = nn.functional.cross_entropy(apply_fn(p, x), y)
                if adversarial_eps:
                    xr = x.clone().requires_grad_(True)
                    gx = torch.autograd.grad(nn.functional.cross_entropy(apply_fn({a: b.detach() for a, b in p.items()}, xr), y), xr)[0]
                    loss = loss + nn.functional.cross_entropy(apply_fn(p, x + adversarial_eps * gx.sign()), y)
                loss.backward()
                adam.step()
        for name in p:
            torch.testing.assert_close(res.state.members[name][k], p[name].detach(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(loop.state.members[name][k], p[name].detach(), rtol=1e-4, atol=1e-5)
    assert res.history.shape == (9, 3)
    assert (res.history[-1] < res.history[0]).all()


def test_members_are_independent_initialisations_and_the_module_is_untouched():
    net = make_mlp((4, 8, 3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    a = ensemble.init_members(net, 4, generator=gen(0))
    b = ensemble.init_members(net, 4, generator=gen(0))
    w = a.members["0.weight"]
    assert torch.equal(w, b.members["0.weight"])
    assert not torch.allclose(w[0], w[1])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_empirical_family_returns_the_members_for_prediction():
    net = make_mlp((4, 8, 3))
    apply_fn, _, _ = functionalize(net)
    state = ensemble.init_members(net, 5, generator=gen(0))
    post = empirical(num_members=5)
    x = torch.randn(7, 4)
    out = sample_outputs(apply_fn, post.sample(state, 5), x)
    want = torch.stack([apply_fn({k: v[i] for k, v in state.members.items()}, x) for i in range(5)])
    torch.testing.assert_close(out, want)
    s = summarize(out, "classification")
    assert s.probs.shape == (7, 3)
    with pytest.raises(ValueError, match="point masses"):
        post.kl(state, None)


def test_heteroscedastic_members_combine_as_a_moment_matched_mixture():
    out = torch.randn(5, 10, 2, dtype=torch.float64)  # 5 members: (mean, log_var) per input
    s = summarize(out, "heteroscedastic_regression")
    mean, var = out[..., 0], out[..., 1].exp()
    torch.testing.assert_close(s.mean[..., 0], mean.mean(0))
    torch.testing.assert_close(s.total_var[..., 0], (var + mean**2).mean(0) - mean.mean(0) ** 2)


def test_diversity_against_hand_computed_values():
    p = torch.tensor([[[0.9, 0.1], [0.6, 0.4]], [[0.3, 0.7], [0.8, 0.2]], [[0.4, 0.6], [0.1, 0.9]]], dtype=torch.float64)
    # top classes: m0 (0, 0), m1 (1, 0), m2 (1, 1): pairs differ on 1/2, 2/2, 1/2 inputs
    assert torch.isclose(ensemble.disagreement(p), torch.tensor((0.5 + 1.0 + 0.5) / 3, dtype=torch.float64))
    want = 0.0
    for i in range(3):
        for j in range(3):
            if i != j:
                want += torch.distributions.kl_divergence(
                    torch.distributions.Categorical(probs=p[i]), torch.distributions.Categorical(probs=p[j])
                ).mean()
    torch.testing.assert_close(ensemble.pairwise_kl(p), want / 6)


def test_bad_input_is_named():
    net = make_mlp((4, 8, 3))
    apply_fn, params, _ = functionalize(net)
    with pytest.raises(TypeError, match="EmpiricalState"):
        ensemble.fit(apply_fn, params, _data())
    bad = EmpiricalState({"0.weight": torch.zeros(3, 8, 4), "0.bias": torch.zeros(2, 8), "2.weight": torch.zeros(3, 3, 8), "2.bias": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="member axis"):
        ensemble.fit(apply_fn, bad, _data())
    with pytest.raises(ValueError, match="num_members"):
        ensemble.init_members(net, 0)
    with pytest.raises(ValueError, match="at least 2 members"):
        ensemble.disagreement(torch.ones(1, 3, 2) / 2)


def test_members_that_do_not_fit_the_model_and_tree_inputs_for_fgsm_are_named():
    net = nn.Linear(3, 2)
    apply_fn, _, _ = functionalize(net)
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    bad = EmpiricalState({"weight": torch.randn(3, 2, 4), "bias": torch.randn(3, 2)})
    with pytest.raises(ValueError, match="state.members"):
        ensemble.fit(apply_fn, bad, (x, y))
    members = ensemble.init_members(net, 2, generator=gen(0))
    with pytest.raises(TypeError, match="floating-point"):
        ensemble.fit(apply_fn, members, (x.long(), y), adversarial_eps=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_draws_data_orders_from_a_cuda_generator_and_resumes_bit_identically():
    """A CUDA generator used to fail in randperm (drawn on the CPU); found on an H200."""
    dev = torch.device("cuda")
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dev)
    apply_fn, _, _ = functionalize(net)
    members = ensemble.init_members(net, 2, generator=torch.Generator().manual_seed(0))
    x, y = torch.randn(24, 4, device=dev), torch.randint(0, 3, (24,), device=dev)
    cuda_gen = lambda: torch.Generator(device=dev).manual_seed(1)  # noqa: E731
    whole = ensemble.fit(apply_fn, members, (x, y), epochs=2, batch_size=8, generator=cuda_gen(), method="vmap")
    half = ensemble.fit(apply_fn, members, (x, y), epochs=1, batch_size=8, generator=cuda_gen(), method="vmap")
    rest = ensemble.fit(apply_fn, members, (x, y), epochs=1, batch_size=8, resume=half, method="vmap")
    assert all(torch.equal(a, b) for a, b in zip(rest.state.members.values(), whole.state.members.values()))
