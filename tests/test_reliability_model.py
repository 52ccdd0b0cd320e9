"""Issue 16: the model wrapper, the engine and prediction hold their promises on awkward models and bad input.

Each test fails on the code before its fix (noted per test).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import funcbnn
from funcbnn import checks, functionalize, sample_outputs
from funcbnn.families import diag_gaussian
from funcbnn.model import Inputs

X = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _draws(params, num=4, std=0.05, seed=0):
    post = diag_gaussian(init_std=std)
    return post.sample(post.init(params), num, generator=torch.Generator().manual_seed(seed))


def _per_sample(module_fn, samples, num):
    """Brute force: one functional call per sample."""
    return torch.stack([module_fn({k: v[s] for k, v in samples.items()}) for s in range(num)])


# ---------------------------------------------------------------------------------------------
# 1. buffers written in place in eval mode


class Counter(nn.Module):
    """Eval-mode forward that updates a registered buffer in place."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("buf", torch.zeros(3))

    def forward(self, x):
        self.buf.copy_(self.buf + 1)
        return self.lin(x) + self.buf


def test_a_forward_writing_a_buffer_touches_neither_the_callers_nor_the_default_buffers():
    # before: the defaults became [1, 1, 1], then [2, 2, 2], and the two outputs differed
    net = Counter().eval()
    apply_fn, params, buffers = functionalize(net)
    mine = {k: v.clone() for k, v in buffers.items()}
    first = apply_fn(params, X)
    second = apply_fn(params, X)
    third = apply_fn(params, X, buffers=buffers)
    assert torch.equal(first, second) and torch.equal(first, third)
    assert torch.equal(apply_fn.buffers["buf"], torch.zeros(3))
    assert torch.equal(buffers["buf"], mine["buf"])
    assert torch.equal(net.buf, torch.zeros(3))
    # the truth: one call of a fresh copy of the module
    torch.testing.assert_close(first, _fresh_counter(net)(X))


def _fresh_counter(net):
    twin = Counter().eval()
    twin.load_state_dict(net.state_dict())
    return twin


def test_buffers_written_in_place_under_sample_outputs_do_not_accumulate():
    net = Counter().eval()
    apply_fn, params, _ = functionalize(net)
    samples = _draws(params)
    a = sample_outputs(apply_fn, samples, X)
    b = sample_outputs(apply_fn, samples, X)
    assert torch.equal(a, b)
    want = _per_sample(lambda p: torch.func.functional_call(_fresh_counter(net), p, (X,)), samples, 4)
    torch.testing.assert_close(a, want)
    assert torch.equal(apply_fn.buffers["buf"], torch.zeros(3))


# ---------------------------------------------------------------------------------------------
# 2. inputs written in place


class AddsToInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        x.add_(1)
        return self.lin(x)


def test_a_forward_writing_its_input_leaves_the_callers_x_and_gives_the_right_outputs():
    # before: x grew by 1 per forward (probe, timing runs, the real run) and outputs were wrong
    torch.manual_seed(0)
    net = AddsToInput()
    apply_fn, params, _ = functionalize(net)
    x = X.clone()
    samples = _draws(params)
    for method in ("auto", "vmap", "loop"):
        out = sample_outputs(apply_fn, samples, x, method=method)
        assert torch.equal(x, X)
        want = _per_sample(lambda p: torch.func.functional_call(net, p, (X.clone(),)), samples, 4)
        torch.testing.assert_close(out, want)
    assert torch.equal(apply_fn(params, x), apply_fn(params, x)) and torch.equal(x, X)


def test_the_engine_protects_the_input_of_a_plain_callable():
    lin = nn.Linear(4, 3)

    def f(p, x):
        x.mul_(2)
        return torch.func.functional_call(lin, p, (x,))

    params = {k: v.detach() for k, v in lin.named_parameters()}
    samples = _draws(params)
    x = X.clone()
    for method in ("auto", "vmap", "loop"):
        out = sample_outputs(f, samples, x, method=method)
        assert torch.equal(x, X)
        want = _per_sample(lambda p: torch.func.functional_call(lin, p, (2 * X,)), samples, 4)
        torch.testing.assert_close(out, want)


# ---------------------------------------------------------------------------------------------
# 3. parametrizations


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch: no batching rule for _weight_norm
@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_parametrized_modules_functionalize_and_match_the_module(kind):
    # before: RuntimeError "Serialization of parametrized modules is only supported through state_dict()"
    net = _mlp()
    getattr(torch.nn.utils.parametrizations, kind)(net[0])
    getattr(torch.nn.utils.parametrizations, kind)(net[2])
    net.eval()
    apply_fn, params, buffers = functionalize(net)
    if kind == "weight_norm":
        assert {"0.parametrizations.weight.original0", "0.parametrizations.weight.original1"} <= set(params)
    else:
        assert "0.parametrizations.weight.original" in params
        assert "0.parametrizations.weight.0._u" in buffers
    before = {k: v.clone() for k, v in buffers.items()}
    torch.testing.assert_close(apply_fn(params, X), net(X), rtol=0, atol=0)
    # moving the posterior's tensors moves the output exactly as the module does
    shifted = {k: v * 1.5 for k, v in params.items()}
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.mul_(1.5)
    torch.testing.assert_close(apply_fn(shifted, X), net(X), rtol=1e-6, atol=1e-6)
    samples = _draws(params)
    out = sample_outputs(apply_fn, samples, X)
    want = _per_sample(lambda p: apply_fn(p, X), samples, 4)
    torch.testing.assert_close(out, want)
    # eval mode: the power iteration's vectors are not touched
    assert all(torch.equal(apply_fn.buffers[k], before[k]) and torch.equal(buffers[k], before[k]) for k in before)


def test_spectral_norm_in_train_mode_leaves_its_power_iteration_buffers_alone():
    net = _mlp()
    torch.nn.utils.parametrizations.spectral_norm(net[0])
    apply_fn, params, buffers = functionalize(net, train=True)
    before = {k: v.clone() for k, v in buffers.items()}
    a, b = apply_fn(params, X), apply_fn(params, X)
    assert torch.equal(a, b)
    assert all(torch.equal(apply_fn.buffers[k], before[k]) for k in before)


# ---------------------------------------------------------------------------------------------
# 4. torch.compile


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing torch._dynamo
def test_a_compiled_module_is_unwrapped_and_runs_eagerly():
    # before: KeyError '_orig_mod.0.weight'
    net = _mlp()
    compiled = torch.compile(net)
    apply_fn, params, _ = functionalize(compiled)
    assert set(params) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    torch.testing.assert_close(apply_fn(params, X), net(X), rtol=0, atol=0)
    outer = nn.Sequential(torch.compile(nn.Linear(4, 4)), nn.ReLU())
    apply_fn, params, _ = functionalize(outer)
    assert set(params) == {"0.weight", "0.bias"}


# ---------------------------------------------------------------------------------------------
# 5. several inputs, keyword inputs, buffers


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x, z, scale=1.0):
        return self.bn(self.lin(x)) * scale + z


def test_several_positional_and_keyword_inputs_reach_the_forward():
    # before: z was taken as the buffers (AttributeError) and keywords were refused
    torch.manual_seed(0)
    net = TwoInputs().eval()
    apply_fn, params, buffers = functionalize(net)
    z = torch.randn(32, 3)
    want = net(X, z, scale=2.0)
    torch.testing.assert_close(apply_fn(params, X, z, scale=2.0), want)
    torch.testing.assert_close(apply_fn(params, X, z, scale=2.0, buffers=buffers), want)
    torch.testing.assert_close(apply_fn(params, Inputs(X, z, scale=2.0)), want)
    torch.testing.assert_close(apply_fn(params, Inputs(X, z), scale=2.0), want)


def test_inputs_carry_several_inputs_through_sample_outputs():
    torch.manual_seed(0)
    net = TwoInputs().eval()
    apply_fn, params, _ = functionalize(net)
    z = torch.randn(32, 3)
    samples = _draws(params)
    want = _per_sample(lambda p: torch.func.functional_call(net, p, (X, z), {"scale": 2.0}), samples, 4)
    for method in ("auto", "vmap", "loop"):
        out = sample_outputs(apply_fn, samples, Inputs(X, z, scale=2.0), method=method)
        torch.testing.assert_close(out, want)
    # a plain callable gets the Inputs as its x
    f = lambda p, inp: torch.func.functional_call(net, p, inp.args, inp.kwargs)  # noqa: E731
    torch.testing.assert_close(sample_outputs(f, samples, Inputs(X, z, scale=2.0)), want)


def test_inputs_is_a_pytree_that_indexes_along_the_batch():
    import optree

    inp = Inputs(X, torch.arange(32), flag=True)
    leaves, spec = optree.tree_flatten(inp)
    assert len(leaves) == 3 and optree.tree_unflatten(spec, leaves) == inp
    head = inp[:5]
    assert head.args[0].shape == (5, 4) and head.args[1].shape == (5,) and head.kwargs == {"flag": True}
    assert len(inp) == 32
    moved = torch.utils._pytree.tree_map(lambda t: t, inp)
    assert isinstance(moved, Inputs)


def test_the_older_positional_buffers_still_work_and_bad_buffers_are_named():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    apply_fn, params, buffers = functionalize(net)
    other = {k: (v + 1 if v.is_floating_point() else v) for k, v in buffers.items()}
    torch.testing.assert_close(apply_fn(params, X, other), apply_fn(params, X, buffers=other))
    assert not torch.allclose(apply_fn(params, X, other), apply_fn(params, X))
    torch.testing.assert_close(apply_fn(params, X, None), apply_fn(params, X))
    with pytest.raises(ValueError, match=r"buffers do not fit the model: missing keys \['1.running_var'\]"):
        apply_fn(params, X, buffers={k: v for k, v in buffers.items() if k != "1.running_var"})
    with pytest.raises(TypeError, match="buffers must be a dict of tensors"):
        apply_fn(params, X, buffers=torch.zeros(3))
