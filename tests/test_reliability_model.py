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


# ---------------------------------------------------------------------------------------------
# 6. non-finite values


def test_sample_outputs_names_a_non_finite_input_or_sample():
    # before: NaN outputs, no error
    apply_fn, params, _ = functionalize(_mlp())
    samples = _draws(params)
    bad_x = X.clone()
    bad_x[3, 1] = float("nan")
    with pytest.raises(checks.NonFiniteError, match=r"x contains non-finite values \(1 NaN, 0 inf\)"):
        sample_outputs(apply_fn, samples, bad_x)
    bad = dict(samples)
    bad["2.bias"] = samples["2.bias"].clone()
    bad["2.bias"][1, 0] = float("inf")
    with pytest.raises(checks.NonFiniteError, match=r"samples contains non-finite.*leaf '2.bias'"):
        sample_outputs(apply_fn, bad, X)
    with checks.set_finite_checks(False):
        assert sample_outputs(apply_fn, bad, X).isinf().any()


def test_sample_outputs_names_a_forward_that_overflows_on_finite_input():
    class Overflow(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return torch.exp(1e3 * self.lin(x))

    apply_fn, params, _ = functionalize(Overflow())
    with pytest.raises(checks.NonFiniteError, match="non-finite.*first at sample 0 of 4.*although x and the samples"):
        sample_outputs(apply_fn, _draws(params), X)


def test_summarize_rejects_non_finite_outputs():
    out = torch.randn(8, 5, 3)
    out[2, 1, 0] = float("nan")
    with pytest.raises(checks.NonFiniteError, match="outputs contains non-finite values"):
        funcbnn.summarize(out, "classification")
    with pytest.raises(checks.NonFiniteError, match="outputs"):
        funcbnn.summarize(out, "regression")


@pytest.mark.parametrize("name", ["diag_gaussian", "dense_gaussian", "kron_gaussian", "lowrank_gaussian", "empirical", "dropout"])
def test_every_family_init_rejects_non_finite_params(name):
    params = {"w": torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "b": torch.zeros(2)}
    post = funcbnn.families.FAMILIES.build(name)
    with pytest.raises(checks.NonFiniteError, match=r"params contains non-finite values \(1 NaN, 0 inf\) in leaf 'w'"):
        post.init(params)


def test_mixture_init_rejects_non_finite_params():
    post = funcbnn.families.mixture(diag_gaussian())
    with pytest.raises(checks.NonFiniteError, match="params"):
        post.init({"w": torch.tensor([float("inf")])})


# ---------------------------------------------------------------------------------------------
# 7. probabilities


def test_binary_probabilities_outside_the_unit_interval_are_refused():
    # before: clamped silently
    probs = torch.rand(6, 10)
    funcbnn.summarize(probs, "binary", outputs_are="probs")
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\], got values in \[.*1\.4"):
        funcbnn.summarize(probs + 0.5, "binary", outputs_are="probs")
    with pytest.raises(ValueError, match="probabilities"):
        funcbnn.summarize(probs - 0.5, "bernoulli", outputs_are="probs")


def test_class_probabilities_of_shape_s_n_c_are_summarized_and_bad_rows_refused():
    logits = torch.randn(6, 10, 4)
    probs = logits.softmax(-1)
    a = funcbnn.summarize(probs, "classification", outputs_are="probs")
    b = funcbnn.summarize(logits, "classification")
    torch.testing.assert_close(a.probs, b.probs)
    torch.testing.assert_close(a.probs, probs.mean(0))  # independent truth: the plain average
    with pytest.raises(ValueError, match="sum to 1"):
        funcbnn.summarize(probs * 1.1, "classification", outputs_are="probs")


# ---------------------------------------------------------------------------------------------
# 8. a state where samples belong


def test_a_posterior_state_passed_as_samples_says_to_draw_samples():
    # before: "every leaf needs the same leading sample axis; '0.0.bias' has 8 samples but ..."
    apply_fn, params, _ = functionalize(_mlp())
    post = diag_gaussian(init_std=0.1)
    with pytest.raises(TypeError, match=r"DiagGaussianState.*post.sample\(state, S\)"):
        sample_outputs(apply_fn, post.init(params), X)


# ---------------------------------------------------------------------------------------------
# 9. an int where a generator belongs


@pytest.mark.parametrize("name", ["diag_gaussian", "dense_gaussian", "kron_gaussian", "lowrank_gaussian", "empirical", "dropout", "mixture"])
def test_an_int_generator_is_refused_with_the_fix(name):
    # before: TypeError from inside torch ("normal_(): argument 'generator' must be torch.Generator, not int")
    params = {"w": torch.randn(3, 2), "b": torch.zeros(3)}
    if name == "mixture":
        post = funcbnn.families.mixture(diag_gaussian(init_std=0.1), 2)
    else:
        post = funcbnn.families.FAMILIES.build(name)
    state = post.init(params)
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got int 0 \(use torch.Generator\(\).manual_seed\(0\)\)"):
        post.sample(state, 3, generator=0)
    if hasattr(post, "rsample") and post.rsample is not None:
        with pytest.raises(TypeError, match="generator must be a torch.Generator"):
            post.rsample(state, 3, generator=0)


def test_tree_noise_functions_refuse_an_int_generator():
    tree = {"w": torch.zeros(2)}
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        funcbnn.tree.randn_like(tree, generator=1)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        funcbnn.tree.diag_normal(tree, {"w": torch.ones(2)}, 3, generator=1)


# ---------------------------------------------------------------------------------------------
# 10. an input the model cannot take, found on a later call


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, idx):
        return self.out(self.embed(idx)).mean(1)


def test_token_ids_out_of_range_on_a_later_call_name_the_input_without_a_fallback_warning():
    # before: a VmapFallbackWarning, then torch's "IndexError: index out of range in self"
    import warnings

    torch.manual_seed(0)
    apply_fn, params, _ = functionalize(Tokens())
    samples = _draws(params)
    good = torch.randint(0, 10, (8, 5))
    sample_outputs(apply_fn, samples, good)
    bad = good.clone()
    bad[4, 2] = 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no VmapFallbackWarning
        with pytest.raises(ValueError, match=r"sample_outputs: the model could not run on x .*values in \[0, 12\]") as info:
            sample_outputs(apply_fn, samples, bad)
    assert isinstance(info.value.__cause__, (IndexError, RuntimeError))
    # vmap was not given up for good: the good input still takes the batched path without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(sample_outputs(apply_fn, samples, good), sample_outputs(apply_fn, samples, good, method="loop"))


def test_the_engine_warns_about_the_fallback_only_when_the_loop_works():
    import warnings

    from funcbnn._engine import VmapFallbackWarning, apply_samples

    def f(p, x):
        if float(p.sum()) > 1e9:  # .item() of a batched tensor: vmap fails, the loop works
            return x
        return x @ p

    with pytest.warns(VmapFallbackWarning):
        apply_samples(f, torch.randn(3, 4, 2), torch.randn(5, 4))

    def g(p, x):
        float(p.sum())
        if x.shape[0] > 2:  # the probe (two examples) passes; the real call fails both ways
            raise IndexError("bad token")
        return x @ p

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(IndexError, match="bad token"):
            apply_samples(g, torch.randn(3, 4, 2), torch.randn(5, 4))


# ---------------------------------------------------------------------------------------------
# 11. peak memory of sample_outputs

_MEMORY_CHILD = r"""
import json, resource, sys, torch
from torch import nn
import funcbnn
S, method = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)  # a loaded 2-core machine makes intra-op threads spin
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 3))
apply_fn, params, _ = funcbnn.functionalize(net)
post = funcbnn.diag_gaussian(init_std=0.05)
x = torch.randn(256, 20)
with torch.no_grad():
    samples = post.sample(post.init(params), S, generator=torch.Generator().manual_seed(0))
    funcbnn.sample_outputs(apply_fn, post.sample(post.init(params), 2), x, method=method)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = funcbnn.sample_outputs(apply_fn, samples, x, method=method, memory_budget=4 * 2**20)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mib": (after - before) / 1024, "out_mib": out.numel() * out.element_size() / 2**20}))
"""


@pytest.mark.parametrize("method", ["loop", "vmap"])
def test_peak_memory_of_sample_outputs_is_the_outputs_plus_a_constant(method):
    """Before: the loop kept every output in a list and stacked them (and fragmented the heap):
    ~200 MiB of peak growth for 9 MiB of outputs at S = 3000; chunks joined by torch.cat likewise."""
    import json
    import os
    import resource
    import subprocess
    import sys

    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0  # Linux: ru_maxrss in KiB
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(src), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, "3000", method], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["growth_mib"] < result["out_mib"] + 64, result


def test_a_functional_model_of_a_parametrized_module_pickles():
    # before: pickling apply_fn raised torch's "Serialization of parametrized modules is only supported ..."
    import io
    import pickle

    net = _mlp()
    torch.nn.utils.parametrizations.weight_norm(net[0])
    torch.nn.utils.parametrizations.spectral_norm(net[2])
    net.eval()
    apply_fn, params, _ = functionalize(net)
    twin = pickle.loads(pickle.dumps(apply_fn))
    torch.testing.assert_close(twin(params, X), net(X), rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(apply_fn, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(params, X), net(X), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Serialization of parametrized modules"):
        pickle.dumps(net)  # the user's module is as torch made it


def test_inputs_followed_by_positional_buffers_or_none_reads_them_as_buffers():
    # the library's own call sites pass apply_fn(params, x, buffers) and apply_fn(params, x, None)
    torch.manual_seed(0)
    net = TwoInputs().eval()
    apply_fn, params, buffers = functionalize(net)
    z = torch.randn(32, 3)
    want = net(X, z)
    torch.testing.assert_close(apply_fn(params, Inputs(X, z), None), want)
    torch.testing.assert_close(apply_fn(params, Inputs(X, z), buffers), want)
    other = {k: (v + 1 if v.is_floating_point() else v) for k, v in buffers.items()}
    torch.testing.assert_close(apply_fn(params, Inputs(X, z), other), apply_fn(params, X, z, buffers=other))


def test_sample_outputs_from_many_threads_at_once_gives_the_loop_answers():
    import threading

    apply_fn, params, _ = functionalize(_mlp())
    samples = _draws(params, 8)
    xs = [torch.randn(6 + i % 2, 4) for i in range(4)]
    want = [sample_outputs(apply_fn, samples, x, method="loop") for x in xs]
    fresh, _, _ = functionalize(_mlp())  # no decision taken yet: the threads race to the first one
    barrier = threading.Barrier(6)
    errors = []

    def worker(i):
        barrier.wait()
        try:
            for _ in range(20):
                out = sample_outputs(fresh, samples, xs[i % 4])
                if not torch.allclose(out, want[i % 4], atol=1e-6):
                    errors.append("mismatch")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# ---------------------------------------------------------------------------------------------
# 13. awkward architectures through functionalize + sample_outputs, against a per-sample loop


def _against_loop(module, x, num=3):
    import optree

    module.eval()
    apply_fn, params, buffers = functionalize(module)
    samples = _draws(params, num, std=0.02)
    out = sample_outputs(apply_fn, samples, x)
    args, kwargs = (x.args, x.kwargs) if isinstance(x, Inputs) else ((x,), {})
    ref = [torch.func.functional_call(module, {**{k: v[s] for k, v in samples.items()}, **buffers}, args, kwargs)
           for s in range(num)]
    want = optree.tree_map(lambda *o: torch.stack(o), *ref)
    assert optree.tree_structure(out) == optree.tree_structure(want)
    for a, b in zip(optree.tree_leaves(out), optree.tree_leaves(want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return out


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x, key_padding_mask=None):
        return self.attn(x, x, x, key_padding_mask=key_padding_mask)  # (output, weights): a tuple


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch: ops without a batching rule
def test_attention_with_a_mask_and_tuple_outputs():
    torch.manual_seed(0)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[:, -1] = True
    out, weights = _against_loop(Attention(), Inputs(torch.randn(3, 5, 8), key_padding_mask=mask))
    assert out.shape == (3, 3, 5, 8) and weights.shape == (3, 3, 5, 5)
    assert torch.all(weights[..., -1] == 0)  # the padded key gets no weight


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_a_transformer_encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    _against_loop(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), torch.randn(3, 5, 8))


@pytest.mark.filterwarnings("ignore::funcbnn._engine.VmapFallbackWarning")  # no batching rule for the fused RNN ops
@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_recurrent_layers_with_their_tuple_outputs(rnn):
    torch.manual_seed(0)
    out = _against_loop(rnn(4, 6, batch_first=True), torch.randn(3, 5, 4))
    assert out[0].shape == (3, 3, 5, 6)


def test_a_batchnorm_cnn_and_dict_inputs_and_outputs():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2),
                        nn.Flatten(), nn.Linear(64, 2))
    cnn.train()
    for _ in range(2):
        cnn(torch.randn(8, 3, 8, 8))  # non-trivial running statistics
    _against_loop(cnn, torch.randn(2, 3, 8, 8))

    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 2), nn.Linear(3, 2)

        def forward(self, d):
            return {"sum": self.a(d["x"]) + self.b(d["z"]), "x": self.a(d["x"])}

    out = _against_loop(DictModel(), {"x": torch.randn(5, 4), "z": torch.randn(5, 3)})
    assert set(out) == {"sum", "x"}


def test_large_finite_outputs_whose_sum_overflows_pass_the_finite_check():
    # the check sums the outputs first; an overflowing sum of finite values must not be called non-finite
    class Huge(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x) * 0 + 3e38

    apply_fn, params, _ = functionalize(Huge())
    out = sample_outputs(apply_fn, _draws(params), X)
    assert torch.isfinite(out).all() and torch.isinf(out.sum())
    funcbnn.summarize(out, "regression")


class ClipsItsWeight(nn.Module):
    """Weight clipping inside forward, a pattern from Lipschitz-constrained critics."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.full((3,), 2.0), requires_grad=False)  # frozen

    def forward(self, x):
        with torch.no_grad():
            self.lin.weight.clamp_(-0.1, 0.1)
            self.scale.mul_(2.0)
        return self.lin(x) * self.scale


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch: no batching rule for clamp_
def test_a_forward_writing_its_parameters_leaves_the_callers_params_samples_and_frozen_alone():
    # before: the caller's params were clamped, the samples too, and apply_fn.frozen doubled on every call
    torch.manual_seed(0)
    net = ClipsItsWeight()
    apply_fn, params, _ = functionalize(net)
    params = {k: v * 10 for k, v in params.items()}  # weights well outside [-0.1, 0.1]
    mine = {k: v.clone() for k, v in params.items()}
    first, second = apply_fn(params, X), apply_fn(params, X)
    assert torch.equal(first, second)
    assert all(torch.equal(params[k], mine[k]) for k in mine)
    assert torch.equal(apply_fn.frozen["scale"], torch.full((3,), 2.0))
    want = (X @ mine["lin.weight"].clamp(-0.1, 0.1).T + mine["lin.bias"]) * 4.0
    torch.testing.assert_close(first, want)
    samples = _draws(params, std=0.5)
    kept = {k: v.clone() for k, v in samples.items()}
    sample_outputs(apply_fn, samples, X)
    assert all(torch.equal(samples[k], kept[k]) for k in kept)


def test_the_finite_check_of_outputs_with_a_graph_warns_nothing():
    # float() of a tensor that requires grad warns (an error under this suite's filters)
    apply_fn, params, _ = functionalize(_mlp())
    post = diag_gaussian(init_std=0.1)
    import optree

    state = optree.tree_map(lambda t: t.requires_grad_(), post.init(params))
    out = sample_outputs(apply_fn, post.rsample(state, 3, generator=torch.Generator().manual_seed(0)), X)
    assert out.requires_grad
    funcbnn.summarize(out, "classification")


@pytest.mark.filterwarnings("ignore::UserWarning")  # DataParallel without GPUs
def test_a_data_parallel_wrapper_is_unwrapped():
    # before: parameter names kept "module." and on GPUs the wrapper replicated the shell per call
    net = _mlp()
    apply_fn, params, _ = functionalize(nn.DataParallel(net))
    assert set(params) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    torch.testing.assert_close(apply_fn(params, X), net(X), rtol=0, atol=0)


def test_a_non_finite_scalar_output_per_sample_is_named():
    # outputs of shape (S,): the culprit search must not assume a trailing axis
    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x):
            return torch.log(self.lin(x).sum() * 0 - 1)

    apply_fn, params, _ = functionalize(Scalar())
    with pytest.raises(checks.NonFiniteError, match=r"3 NaN, 0 inf; first at sample 0 of 3"):
        sample_outputs(apply_fn, _draws(params, 3), X)


def test_one_parameter_tree_passed_as_samples_says_it_has_no_sample_axis():
    # before: "every leaf needs the same leading sample axis; '0.bias' has 8 samples but '2.bias' has 3"
    apply_fn, params, _ = functionalize(_mlp())
    with pytest.raises(ValueError, match=r"without a leading sample axis.*post.sample\(state, S\)"):
        sample_outputs(apply_fn, params, X)
    square = nn.Linear(4, 4)  # every leaf leads with 4: looks like 4 samples at a glance
    apply_fn, params, _ = functionalize(square)
    with pytest.raises(ValueError, match="without a leading sample axis"):
        sample_outputs(apply_fn, params, X)


def test_inference_mode_inputs_and_calls_work_and_stay_protected():
    # inference tensors have no version counter: reading one raised "Inference tensors do not track version counter"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    apply_fn, params, _ = functionalize(net)
    samples = _draws(params)
    with torch.inference_mode():
        x = torch.randn(5, 4)
        torch.testing.assert_close(apply_fn(params, x), net(x))
        assert sample_outputs(apply_fn, samples, x).shape == (4, 5, 3)
    with torch.no_grad():  # (torch refuses inference tensors in autograd: the module itself needs no_grad here)
        torch.testing.assert_close(apply_fn(params, x), net(x))  # an inference tensor outside inference mode
    writer, params, _ = functionalize(AddsToInput())
    with torch.inference_mode():
        x = X.clone()
        out = sample_outputs(writer, _draws(params), x)
        assert torch.equal(x, X)
        assert torch.equal(writer(params, x), writer(params, x)) and torch.equal(x, X)
    assert out.shape == (4, 32, 3)
