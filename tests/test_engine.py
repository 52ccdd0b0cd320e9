"""Tests of the engine that applies a function over a leading sample axis (funcbnn._engine)."""

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from conftest import make_cnn, make_mlp
from funcbnn import _engine, functionalize
from funcbnn._engine import HAVE_LOW_LEVEL_VMAP, VmapFallbackWarning, apply_samples, chosen_path, vmap_leading
from funcbnn.families import diag_gaussian

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(seed, num):
    apply_fn, params, _ = functionalize(make_mlp((3, 5, 2), seed=seed))
    post = diag_gaussian(init_std=0.2)
    return apply_fn, post.sample(post.init(params), num, generator=torch.Generator().manual_seed(seed))


@given(seed=st.integers(0, 100), num=st.integers(1, 5))
def test_low_level_vmap_equals_torch_func_vmap(seed, num):
    apply_fn, samples = _setup(seed, num)
    x = torch.randn(4, 3)
    fast = vmap_leading(apply_fn, samples, x, randomness="error")
    public = vmap_leading(apply_fn, samples, x, randomness="error", low_level=False)
    assert torch.equal(fast, public)


def test_gradients_flow_through_the_low_level_path_as_through_a_loop():
    apply_fn, samples = _setup(0, 3)
    samples = {k: v.clone().requires_grad_() for k, v in samples.items()}
    x = torch.randn(4, 3)
    out = vmap_leading(apply_fn, samples, x, randomness="error")
    got = torch.autograd.grad(out.square().sum(), list(samples.values()))
    loop = torch.stack([apply_fn({k: v[i] for k, v in samples.items()}, x) for i in range(3)])
    want = torch.autograd.grad(loop.square().sum(), list(samples.values()))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))


def test_low_level_vmap_nests_inside_torch_func_transforms():
    apply_fn, samples = _setup(1, 2)
    x = torch.randn(6, 3)
    per_example = torch.func.vmap(lambda xi: vmap_leading(apply_fn, samples, xi[None], randomness="error"))(x)
    assert torch.allclose(per_example[:, :, 0], vmap_leading(apply_fn, samples, x, randomness="error").transpose(0, 1))


def test_the_low_level_primitives_exist_in_this_torch():
    assert HAVE_LOW_LEVEL_VMAP  # a torch upgrade that drops them should be noticed, not silently slower


# ---------------------------------------------------------------------------------------------
# the paths give the same numbers


def _grad_setup(make=make_mlp, seed=0, num=5):
    """Samples drawn differentiably from a trainable diagonal state, as VI draws them."""
    apply_fn, params, _ = functionalize(make(seed=seed))
    post = diag_gaussian(init_std=0.2)
    state = post.init(params)
    state = type(state)(*({k: v.clone().requires_grad_() for k, v in part.items()} for part in state))
    samples = post.rsample(state, num, generator=torch.Generator().manual_seed(seed))
    return apply_fn, state, samples


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 5])
@pytest.mark.parametrize("make, x_shape", [(make_mlp, (6, 4)), (make_cnn, (3, 1, 6, 6))], ids=["mlp", "cnn"])
def test_vmap_loop_and_auto_agree_in_value_and_gradient(chunk_size, make, x_shape):
    apply_fn, state, samples = _grad_setup(make)
    leaves = [*state.mean.values(), *state.rho.values()]
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(1))
    results = {}
    for method in ("loop", "vmap", "auto"):
        out = apply_samples(apply_fn, samples, x, method=method, chunk_size=chunk_size, backward_to=leaves)
        grads = torch.autograd.grad(out.square().sum(), leaves, retain_graph=True)
        results[method] = (out, grads)
    for method in ("vmap", "auto"):
        torch.testing.assert_close(results[method][0], results["loop"][0], rtol=1e-4, atol=1e-5)
        for a, b in zip(results[method][1], results["loop"][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float32 rounding only


def test_gradients_reach_the_samples_in_their_own_layout():
    """The batched path's weight gradients come back contiguous, as the loop's do (see _ContiguousGrad)."""
    net = nn.Sequential(nn.Linear(300, 256), nn.ReLU(), nn.Linear(256, 3))
    apply_fn, params, _ = functionalize(net)
    samples = {k: v.expand(3, *v.shape).clone().requires_grad_() for k, v in params.items()}
    x = torch.randn(4, 300)
    for method in ("vmap", "loop"):
        out = apply_samples(apply_fn, samples, x, method=method)
        grad = torch.autograd.grad(out.sum(), samples["0.weight"])[0]
        assert grad.is_contiguous(), method


def test_extra_arguments_and_tree_outputs_on_every_path():
    def apply_fn(p, x, scale):
        return {"out": x @ p["w"].T * scale["s"], "aux": (p["w"].sum() + x.sum()).expand(1)}

    samples = {"w": torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0))}
    x = torch.randn(5, 3)
    want = [apply_fn({"w": samples["w"][i]}, x, {"s": 2.0}) for i in range(4)]
    for method in ("loop", "vmap", "auto"):
        got = apply_samples(apply_fn, samples, x, args=({"s": 2.0},), method=method)
        torch.testing.assert_close(got["out"], torch.stack([w["out"] for w in want]))
        torch.testing.assert_close(got["aux"], torch.stack([w["aux"] for w in want]))


def test_chunks_split_the_samples_as_asked():
    calls = []

    def apply_fn(p, x):
        calls.append(1)
        return x @ p.T

    samples = torch.randn(7, 2, 3)
    x = torch.randn(5, 3)
    want = torch.stack([x @ w.T for w in samples])
    apply_samples(apply_fn, samples, x, method="vmap")  # the probe: one more, unbatched call
    for chunk, expected_calls in [(2, 4), (3, 3), (7, 1), (100, 1)]:
        calls.clear()
        out = apply_samples(apply_fn, samples, x, method="vmap", chunk_size=chunk)
        torch.testing.assert_close(out, want)
        assert len(calls) == expected_calls, chunk


def test_default_chunk_size_follows_the_memory_budget():
    calls = []

    def apply_fn(p, x):
        calls.append(1)
        return torch.tanh(x * p)  # widest intermediate: 10 examples x 3 floats = 120 bytes per sample

    samples = torch.randn(6, 3)
    x = torch.randn(10, 3)
    apply_samples(apply_fn, samples, x, method="vmap")  # the probe: one unbatched call
    calls.clear()
    apply_samples(apply_fn, samples, x, method="vmap", memory_budget=2 * 120)
    assert len(calls) == 3  # two samples per chunk


# ---------------------------------------------------------------------------------------------
# fallback


class _ItemNet(nn.Module):
    """A forward vmap cannot batch: it reads a tensor value with .item()."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x) * (1.0 + 0.0 * self.fc.weight.sum().item())


@pytest.mark.parametrize("with_grad", [False, True])
def test_a_forward_that_fails_under_vmap_warns_exactly_once_and_loops(with_grad):
    torch.manual_seed(0)
    apply_fn, params, _ = functionalize(_ItemNet())
    samples = {k: v.expand(3, *v.shape).clone().requires_grad_(with_grad) for k, v in params.items()}
    x = torch.randn(4, 3)
    want = apply_samples(apply_fn, samples, x, method="loop")
    backward_to = list(samples.values()) if with_grad else None
    with pytest.warns(VmapFallbackWarning, match="failed under torch.func.vmap") as record:
        got = apply_samples(apply_fn, samples, x, backward_to=backward_to)
    assert len([w for w in record if issubclass(w.category, VmapFallbackWarning)]) == 1
    assert record[0].filename == __file__  # points at the caller, not into the library
    torch.testing.assert_close(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):  # remembered: no second warning
            torch.testing.assert_close(apply_samples(apply_fn, samples, x, backward_to=backward_to), want)
    with pytest.raises(RuntimeError):
        apply_samples(apply_fn, samples, x, method="vmap")


def test_randomness_error_never_falls_back():
    def apply_fn(p, x):
        return torch.nn.functional.dropout(x @ p.T, 0.5)

    with pytest.raises(RuntimeError, match="randomness"):
        apply_samples(apply_fn, torch.randn(3, 2, 4), torch.randn(5, 4), randomness="error")


# ---------------------------------------------------------------------------------------------
# the path choice: never changes results, consumes no randomness, remembered


def test_the_timing_runs_consume_no_global_randomness():
    apply_fn, params, _ = functionalize(make_mlp())
    samples = {k: v.expand(4, *v.shape).clone() for k, v in params.items()}
    x = torch.randn(5, 4)
    torch.manual_seed(123)
    expected = torch.randn(3)
    torch.manual_seed(123)
    apply_samples(apply_fn, samples, x)  # probe and timing happen here
    assert chosen_path(apply_fn)  # a decision was measured
    assert torch.equal(torch.randn(3), expected)  # the numbers drawn next are those without the call


def _dropout_fn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Linear(16, 2))
    return functionalize(net, train=lambda name, m: isinstance(m, nn.Dropout))


def test_a_random_forward_is_not_timed_and_takes_the_batched_path():
    """Under "different" the two paths draw different masks: auto must not let a stopwatch pick them."""
    apply_fn, params, _ = _dropout_fn()
    samples = {k: v.expand(4, *v.shape).clone() for k, v in params.items()}
    x = torch.randn(5, 3)
    torch.manual_seed(7)
    auto = apply_samples(apply_fn, samples, x)
    torch.manual_seed(7)
    vmap = apply_samples(apply_fn, samples, x, method="vmap")
    assert torch.equal(auto, vmap)
    assert set(chosen_path(apply_fn).values()) == {"vmap"}


def test_auto_measures_once_per_signature_and_sample_count(monkeypatch):
    monkeypatch.setattr(_engine._LoadWindow, "others", lambda self: 0.0)  # a busy machine adds re-measurements
    apply_fn, params, _ = functionalize(make_mlp())
    timings = []
    real = _engine._vmap_is_faster
    monkeypatch.setattr(_engine, "_vmap_is_faster", lambda *a: timings.append(1) or real(*a))
    samples = {k: v.expand(6, *v.shape).clone() for k, v in params.items()}
    x = torch.randn(5, 4)
    for _ in range(3):
        apply_samples(apply_fn, samples, x)
    assert len(timings) == 1
    apply_samples(apply_fn, {k: v[:3] for k, v in samples.items()}, x)  # another sample count
    apply_samples(apply_fn, samples, torch.randn(7, 4))  # another batch size
    assert len(timings) == 3
    assert len(chosen_path(apply_fn)) == 3
    # the first decision is confirmed once, when the process is warm, and then stands
    for _ in range(10 * _engine.RECHECK_AFTER):
        apply_samples(apply_fn, samples, x)
    assert len(timings) == 4


def test_a_bound_method_keeps_its_decisions():
    class Model:
        def forward(self, p, x):
            return x @ p.T

    model = Model()
    samples, x = torch.randn(4, 2, 3), torch.randn(5, 3)
    apply_samples(model.forward, samples, x)
    apply_samples(model.forward, samples, x)
    assert len(chosen_path(model.forward)) == 1


def test_a_closure_built_per_call_keeps_its_decisions_on_its_owner(monkeypatch):
    timings = []
    real = _engine._vmap_is_faster
    monkeypatch.setattr(_engine, "_vmap_is_faster", lambda *a: timings.append(1) or real(*a))
    apply_fn, params, _ = functionalize(make_mlp())
    samples = {k: v.expand(4, *v.shape).clone() for k, v in params.items()}
    x = torch.randn(5, 4)
    for scale in (1.0, 2.0, 3.0):
        out = apply_samples(lambda p, xs: scale * apply_fn(p, xs), samples, x, owner=apply_fn)
        torch.testing.assert_close(out, scale * apply_samples(apply_fn, samples, x, method="loop"))
    assert len(timings) == 1


def test_a_decision_measured_on_a_busy_machine_is_measured_again_later(monkeypatch):
    timings = []
    real = _engine._vmap_is_faster
    monkeypatch.setattr(_engine, "_vmap_is_faster", lambda *a: timings.append(1) or real(*a))
    busy = {"cores": 1.0}
    monkeypatch.setattr(_engine._LoadWindow, "others", lambda self: busy["cores"])
    monkeypatch.setattr(_engine, "RECHECK_AFTER", 4)
    apply_fn, params, _ = functionalize(make_mlp())
    samples = {k: v.expand(3, *v.shape).clone() for k, v in params.items()}
    x = torch.randn(5, 4)
    for _ in range(1 + 4 * (_engine.MAX_RECHECKS + 2)):
        apply_samples(apply_fn, samples, x)
    assert len(timings) == 1 + _engine.MAX_RECHECKS  # busy every time: re-measured, then kept as it is
    # once a measurement finds the machine quiet, the decision stands
    timings.clear()
    apply_fn2, params2, _ = functionalize(make_mlp(seed=1))
    samples2 = {k: v.expand(3, *v.shape).clone() for k, v in params2.items()}
    apply_samples(apply_fn2, samples2, x)  # busy: provisional
    busy["cores"] = 0.0
    for _ in range(4 * 8):
        apply_samples(apply_fn2, samples2, x)
    assert len(timings) == 2  # the quiet re-measurement confirmed it


class _FakeClock:
    """A perf_counter that advances only when a fake path 'runs'."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def path(self, costs):
        runs = iter(costs)

        def run():
            self.now += next(runs)

        return run


@pytest.mark.parametrize(
    "vmap_costs, loop_costs, expected, rounds",
    [
        # decisive after the minimum rounds
        ([1.0] * 9, [2.0] * 9, True, _engine.MIN_ROUNDS),
        ([2.0] * 9, [1.0] * 9, False, _engine.MIN_ROUNDS),
        # one slow outlier (another process) cannot flip the choice: each path's median counts
        ([5.0, 1.0, 1.0] + [1.0] * 6, [1.5] * 9, True, _engine.MIN_ROUNDS),
        # nor can one lucky run: a path that is mostly slower loses
        ([0.70, 1.05, 1.05, 1.05, 1.05, 1.05, 1.05, 1.05, 1.05], [1.00] * 9, False, _engine.MAX_ROUNDS),
        # close: keeps measuring to the most rounds, then takes the smaller median
        ([1.02] * 9, [1.04] * 9, True, _engine.MAX_ROUNDS),
        ([1.04] * 9, [1.05, 1.05, 1.05, 1.05, 1.00, 1.00, 1.00, 1.00, 1.00], False, _engine.MAX_ROUNDS),
    ],
)
def test_the_decision_rule(monkeypatch, vmap_costs, loop_costs, expected, rounds):
    clock = _FakeClock()
    monkeypatch.setattr(_engine.time, "perf_counter", clock)
    monkeypatch.setattr(_engine, "BUDGET_S", 1e9)
    counted = {"vmap": 0, "loop": 0}
    run_vmap, run_loop = clock.path(vmap_costs), clock.path(loop_costs)

    def count(name, run):
        def wrapped():
            counted[name] += 1
            run()

        return wrapped

    assert _engine._vmap_is_faster(count("vmap", run_vmap), count("loop", run_loop)) is expected
    assert counted == {"vmap": rounds, "loop": rounds}


def test_the_timing_budget_stops_a_close_call(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(_engine.time, "perf_counter", clock)
    monkeypatch.setattr(_engine, "BUDGET_S", 5.0)
    calls = []

    def run():
        calls.append(1)
        clock.now += 1.0

    _engine._vmap_is_faster(run, run)
    assert len(calls) == 4  # a third round would end at 6 s, past the 5 s budget: it never starts


def test_warm_ups_slower_than_the_budget_decide_without_timed_rounds(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(_engine.time, "perf_counter", clock)
    calls = []

    def run():
        calls.append(1)
        clock.now += 1.0

    assert _engine._vmap_is_faster(run, run, (0.4, 0.6)) is True  # warm-ups: vmap 0.4 s, loop 0.6 s
    assert calls == []


def test_a_noisy_clock_cannot_make_auto_time_past_its_cap(monkeypatch):
    """Issue 16: under load, "time until decisive" spent 20-60 s re-timing small models.

    A pathological clock: every reading advances by a random 0.05-0.3 s, so both
    paths look equally slow and never decisive. One measurement must stay within
    BUDGET_S plus one round, and all re-measurements within max(BUDGET_S,
    TIMING_FRACTION * real work) plus one measurement.
    """
    import random

    rng = random.Random(0)

    class Noisy:
        now = 0.0

        def __call__(self):
            self.now += rng.uniform(0.05, 0.3)
            return self.now

    clock = Noisy()
    monkeypatch.setattr(_engine.time, "perf_counter", clock)
    monkeypatch.setattr(_engine._LoadWindow, "others", lambda self: 1.0)  # "busy": every decision provisional
    apply_fn, params, _ = functionalize(make_mlp())
    samples = {k: v.expand(4, *v.shape).clone() for k, v in params.items()}
    x = torch.randn(5, 4)
    timed = []
    real = _engine._decide

    def counted(entry, *a, **k):
        before = entry.timing_s
        out = real(entry, *a, **k)
        timed.append(entry.timing_s - before)
        return out

    monkeypatch.setattr(_engine, "_decide", counted)
    for _ in range(20 * _engine.RECHECK_AFTER):
        apply_samples(apply_fn, samples, x)
    # each reading costs at most 0.3 s, a round reads the clock 7 times, the warm-ups 4 times
    one_round, warm = 7 * 0.3, 4 * 0.3
    assert timed and max(timed) <= _engine.BUDGET_S + one_round + warm
    entry = next(iter(_engine._CACHE[apply_fn].values()))
    cap = max(_engine.BUDGET_S, _engine.TIMING_FRACTION * entry.work_s)
    assert sum(timed) <= cap + max(timed)  # a re-measurement starts only while under the cap
    assert len(timed) < 1 + _engine.MAX_RECHECKS  # the cap, not the recheck count, stopped them
