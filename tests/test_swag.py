"""SWAG against the moments of recorded iterates, the dense covariance formula and torch's own update_bn."""

import copy
import math

import optree
import pytest
import torch
from torch import nn

from conftest import gen
from funcbnn import functionalize, sample_outputs, swag
from funcbnn.tree import ravel


def _trajectory(steps=12, lr=0.05, seed=0):
    """SGD on a linear regression, every iterate recorded."""
    g = gen(seed)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.3 * torch.randn(64, 1, generator=g, dtype=torch.float64)
    params = {"weight": torch.zeros(1, 3, dtype=torch.float64, requires_grad=True), "bias": torch.zeros(1, dtype=torch.float64, requires_grad=True)}
    opt = torch.optim.SGD(list(params.values()), lr=lr)
    iterates = []
    for i in range(steps):
        idx = torch.randint(0, 64, (8,), generator=g)
        opt.zero_grad()
        ((x[idx] @ params["weight"].T + params["bias"] - y[idx]) ** 2).mean().backward()
        opt.step()
        iterates.append({k: v.detach().clone() for k, v in params.items()})
    return iterates


@pytest.mark.parametrize("max_rank", [4, 20])
def test_moments_and_deviations_equal_those_of_the_recorded_iterates(max_rank):
    iterates = _trajectory()
    state = swag.init(iterates[0], max_rank=max_rank)
    for it in iterates:
        state = swag.update(state, it)
    flat = torch.stack([ravel(it)[0] for it in iterates])  # (n, P)
    torch.testing.assert_close(ravel(state.mean)[0], flat.mean(0))
    torch.testing.assert_close(ravel(state.sq_mean)[0], (flat**2).mean(0))
    # deviation i is theta_i minus the mean of the first i iterates; the last K are kept, oldest first
    running = torch.cumsum(flat, 0) / torch.arange(1, len(flat) + 1, dtype=flat.dtype)[:, None]
    want = (flat - running)[-max_rank:]
    devs = swag.deviations(state)
    got = torch.stack([ravel(optree.tree_map(lambda d: d[j], devs))[0] for j in range(want.shape[0])])
    torch.testing.assert_close(got, want)


def test_lowrank_posterior_has_the_swag_covariance():
    iterates = _trajectory(steps=10)
    state = swag.init(iterates[0], max_rank=5)
    for it in iterates:
        state = swag.update(state, it)
    post, q = swag.posterior(state, scale=0.5)
    flat = torch.stack([ravel(it)[0] for it in iterates])
    running = torch.cumsum(flat, 0) / torch.arange(1, 11, dtype=flat.dtype)[:, None]
    D = (flat - running)[-5:].T  # (P, K)
    var = (flat**2).mean(0) - flat.mean(0) ** 2
    cov = 0.5 * (torch.diag(var) + D @ D.T / (5 - 1))  # Maddox et al. 2019, eq. for Sigma_SWAG
    n = 60_000
    draws = post.sample(q, n, generator=gen(1))
    flat_draws = torch.cat([draws[k].reshape(n, -1) for k in sorted(draws)], 1)  # ravel's (sorted) leaf order
    emp = torch.cov(flat_draws.T, correction=0)
    se = torch.sqrt((torch.diagonal(cov)[:, None] * torch.diagonal(cov)[None] + cov**2) / n)
    assert ((emp - cov).abs() <= 6 * se).all()
    assert ((flat_draws.mean(0) - flat.mean(0)).abs() <= 6 * torch.diagonal(cov).sqrt() / math.sqrt(n)).all()
    # and the family's own marginal variances are the formula's diagonal
    torch.testing.assert_close(ravel(post.variance(q))[0], torch.diagonal(cov))


def test_diag_posterior_and_swa():
    iterates = _trajectory(steps=6)
    state = swag.init(iterates[0])
    for it in iterates:
        state = swag.update(state, it)
    post, q = swag.posterior(state, form="diag", scale=1.0)
    flat = torch.stack([ravel(it)[0] for it in iterates])
    torch.testing.assert_close(ravel(post.std(q))[0] ** 2, flat.var(0, correction=0))
    torch.testing.assert_close(ravel(swag.swa(state))[0], flat.mean(0))


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).eval()


def test_bn_update_equals_torch_update_bn_on_a_train_mode_copy():
    net = _bn_net()
    apply_fn, params, buffers = functionalize(net)
    g = gen(2)
    samples = optree.tree_map(lambda p: p + 0.3 * torch.randn((2, *p.shape), generator=g), params)
    data = [(torch.randn(16, 4, generator=g), torch.zeros(16)) for _ in range(3)]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    got = swag.bn_update(apply_fn, samples, data)
    for s in range(2):
        ref = copy.deepcopy(net)
        ref.load_state_dict({k: samples[k][s] for k in params}, strict=False)
        torch.optim.swa_utils.update_bn([x for x, _ in data], ref)
        for name, value in ref.named_buffers():
            if "running" in name:
                torch.testing.assert_close(got[name][s], value, msg=name)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the module is untouched
    out = sample_outputs(swag.with_buffers(apply_fn), {"params": samples, "buffers": got}, data[0][0])
    ref0 = copy.deepcopy(net)
    ref0.load_state_dict({k: samples[k][0] for k in params}, strict=False)
    torch.optim.swa_utils.update_bn([x for x, _ in data], ref0)
    torch.testing.assert_close(out[0], ref0.eval()(data[0][0]))


def test_fit_collects_on_schedule_and_leaves_params_alone():
    apply_fn, params, _ = functionalize(nn.Linear(3, 1))
    before = {k: v.clone() for k, v in params.items()}
    g = gen(3)
    x = torch.randn(40, 3, generator=g)
    y = x.sum(1, keepdim=True)
    data = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]
    res = swag.fit(apply_fn, params, data, "regression", epochs=3, burn_in=2, lr=0.05, schedule="cyclical", collect_every=2)
    assert int(res.state.num_models) == 3 * 4 // 2
    assert res.history.shape == (5 * 4,)
    assert all(torch.equal(before[k], params[k]) for k in params)
    assert res.history[-1] < res.history[0]


def test_multiswag_is_the_equal_mixture_of_its_components():
    states = []
    for seed in range(3):
        its = _trajectory(steps=5, seed=seed)
        st = swag.init(its[0], max_rank=3)
        for it in its:
            st = swag.update(st, it)
        states.append(st)
    post, q = swag.multiswag(states)
    draws = post.sample(q, 7, generator=gen(0))
    assert draws["weight"].shape == (7, 1, 3)
    want_mean = torch.stack([s.mean["weight"] for s in states]).mean(0)
    torch.testing.assert_close(post.mean(q)["weight"], want_mean)


def test_bad_input_is_named():
    state = swag.init({"w": torch.zeros(3)}, max_rank=2)
    with pytest.raises(ValueError, match="no iterates"):
        swag.posterior(state)
    with pytest.raises(ValueError, match="params"):
        swag.update(state, {"v": torch.zeros(3)})
    with pytest.raises(ValueError, match="max_rank"):
        swag.init({"w": torch.zeros(3)}, max_rank=0)
    with pytest.raises(ValueError, match="form"):
        swag.posterior(swag.update(state, {"w": torch.ones(3)}), form="full")


def test_bn_update_instance_norm_records_the_mean_of_per_instance_variances():
    net = nn.Sequential(nn.InstanceNorm1d(2, track_running_stats=True), nn.Flatten(), nn.Linear(16, 1)).eval()
    apply_fn, params, _ = functionalize(net)
    x = torch.randn(4, 2, 8, generator=gen(0)) + 10 * torch.arange(4.0)[:, None, None]
    got = swag.bn_update(apply_fn, {k: v[None] for k, v in params.items()}, [x])
    ref = nn.InstanceNorm1d(2, track_running_stats=True, momentum=1.0).train()
    ref(x)
    torch.testing.assert_close(got["0.running_var"][0], ref.running_var)
    torch.testing.assert_close(got["0.running_mean"][0], ref.running_mean)


def test_degenerate_and_mismatched_input_is_refused_by_name():
    one = swag.update(swag.init({"w": torch.zeros(3)}, max_rank=4), {"w": torch.ones(3)})
    with pytest.raises(ValueError, match="at least 2"):
        swag.posterior(one)
    rank1 = swag.init({"w": torch.zeros(3)}, max_rank=1)
    for v in (torch.ones(3), torch.zeros(3)):
        rank1 = swag.update(rank1, {"w": v})
    with pytest.raises(ValueError, match="max_rank=1"):
        swag.posterior(rank1)
    assert swag.posterior(rank1, form="diag")[1].mean["w"].shape == (3,)
    with pytest.raises(TypeError, match="dtype"):
        swag.update(one, {"w": torch.ones(3, dtype=torch.float64)})
    other = swag.update(swag.update(swag.init({"w": torch.zeros(4)}), {"w": torch.ones(4)}), {"w": torch.zeros(4)})
    two = swag.update(one, {"w": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"states\[1\]"):
        swag.multiswag([two, other])
    apply_fn, params, _ = functionalize(nn.Linear(3, 1))
    data = [(torch.randn(8, 3), torch.randn(8, 1))]
    with pytest.raises(ValueError, match="no iterate was collected"):
        swag.fit(apply_fn, params, data, "regression", epochs=1, collect_every=5)
    net = _bn_net()
    apply_fn, params, _ = functionalize(net)
    with pytest.raises(ValueError, match="at least 2"):
        swag.bn_update(apply_fn, {k: v[None] for k, v in params.items()}, [torch.randn(4, 4), torch.randn(1, 4)])
