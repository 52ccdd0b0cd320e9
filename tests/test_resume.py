"""Checkpoint and resume of the training loops: fit(4 epochs) == fit(2) -> torch.save -> torch.load -> fit(2, resume=...),
bit for bit, and every result type loads with torch.load's default weights_only=True in a fresh process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import optree
import pytest
import torch

import funcbnn
from funcbnn import ensemble, swag, vi

from conftest import gen as _gen
from conftest import make_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_trees_equal(a, b):
    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    assert sa == sb
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        assert torch.equal(x, y)


def _roundtrip(obj, tmp_path, name="ck.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return torch.load(path)  # weights_only=True, torch's default


def _vi_setup(n=24):
    apply_fn, params, _ = funcbnn.functionalize(make_mlp((4, 8, 3)))
    g = _gen(5)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return apply_fn, params, x, y


@pytest.mark.parametrize(
    "kw",
    [
        {},  # the default method ("auto") with one draw: no engine path choice involved
        {"num_samples": 3, "method": "loop"},
        {"num_samples": 3, "method": "vmap"},
        {"optimizer": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9)},
    ],
    ids=["default", "loop3", "vmap3", "sgd-momentum"],
)
def test_vi_fit_resumed_from_a_saved_checkpoint_equals_the_uninterrupted_run(kw, tmp_path):
    apply_fn, params, x, y = _vi_setup()
    post, prior = funcbnn.diag_gaussian(init_std=0.1), funcbnn.priors.gaussian(1.0)
    init = post.init(params)
    whole = vi.fit(apply_fn, post, prior, init, (x, y), epochs=4, batch_size=8, generator=_gen(0), **kw)
    half = vi.fit(apply_fn, post, prior, init, (x, y), epochs=2, batch_size=8, generator=_gen(0), **kw)
    loaded = _roundtrip(half, tmp_path)
    assert isinstance(loaded, vi.FitResult)
    # a fresh generator in another state: resume puts it where the first run left off
    rest = vi.fit(apply_fn, post, prior, init, (x, y), epochs=2, batch_size=8, generator=_gen(99), resume=loaded, **kw)
    _assert_trees_equal(rest.state, whole.state)
    _assert_trees_equal(tuple(rest.history), tuple(whole.history))
    assert rest.history.loss.shape == (12,)
    # the optimiser state continued too (a restarted Adam would differ after step 6)
    _assert_trees_equal(rest.checkpoint["optimizer"]["state"], whole.checkpoint["optimizer"]["state"])
    # resuming twice from the same checkpoint gives the same result: resume changed nothing in it
    again = vi.fit(apply_fn, post, prior, init, (x, y), epochs=2, batch_size=8, generator=_gen(7), resume=loaded, **kw)
    _assert_trees_equal(again.state, whole.state)


def test_vi_fit_resume_with_a_data_loader_and_a_learned_noise(tmp_path):
    apply_fn, params, x, _ = _vi_setup()
    y = x[:, :3] * 0.5
    post, prior = funcbnn.diag_gaussian(init_std=0.1), funcbnn.priors.gaussian(1.0)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]  # a fixed-order loader
    kw = dict(likelihood="regression", noise="learn")
    whole = vi.fit(apply_fn, post, prior, post.init(params), batches, epochs=4, generator=_gen(0), **kw)
    half = vi.fit(apply_fn, post, prior, post.init(params), batches, epochs=2, generator=_gen(0), **kw)
    rest = vi.fit(apply_fn, post, prior, post.init(params), batches, epochs=2, likelihood="regression",
                  noise="learn", resume=_roundtrip(half.checkpoint, tmp_path))
    _assert_trees_equal(rest.state, whole.state)
    assert torch.equal(rest.sigma, whole.sigma)
    _assert_trees_equal(tuple(rest.history), tuple(whole.history))


def test_vi_fit_resume_refuses_a_checkpoint_of_another_shape_or_kind():
    apply_fn, params, x, y = _vi_setup()
    post, prior = funcbnn.diag_gaussian(init_std=0.1), funcbnn.priors.gaussian(1.0)
    res = vi.fit(apply_fn, post, prior, post.init(params), (x, y), epochs=1)
    other_fn, other_params, _ = funcbnn.functionalize(make_mlp((4, 5, 3)))
    with pytest.raises(ValueError, match="resume: the checkpoint's state is not shaped like state"):
        vi.fit(other_fn, post, prior, post.init(other_params), (x, y), resume=res)
    with pytest.raises(TypeError, match="resume must be a FitResult"):
        vi.fit(apply_fn, post, prior, post.init(params), (x, y), resume={"state": res.state})
    with pytest.raises(ValueError, match="resume: this FitResult carries no checkpoint"):
        vi.fit(apply_fn, post, prior, post.init(params), (x, y), resume=res._replace(checkpoint=None))
    with pytest.raises(ValueError, match="noise='learn'"):
        learned = vi.fit(apply_fn, post, prior, post.init(params), (x, x[:, :3]), likelihood="regression", noise="learn")
        vi.fit(apply_fn, post, prior, post.init(params), (x, x[:, :3]), likelihood="regression", resume=learned)


_LOAD_IN_FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    import funcbnn  # registers the result types with torch.serialization
    obj = torch.load(sys.argv[1])  # weights_only=True
    print(type(obj).__name__)
    """
)


def _load_elsewhere(obj, tmp_path, name):
    path = tmp_path / name
    torch.save(obj, path)
    out = subprocess.run([sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_every_training_result_loads_with_weights_only_in_a_fresh_process(tmp_path):
    apply_fn, params, x, y = _vi_setup()
    post, prior = funcbnn.diag_gaussian(init_std=0.1), funcbnn.priors.gaussian(1.0)
    res = vi.fit(apply_fn, post, prior, post.init(params), (x, y), epochs=1, generator=_gen(0))
    sw = swag.fit(apply_fn, params, [(x, y)], "classification", epochs=3, collect_every=1)
    members = ensemble.init_members(make_mlp((4, 8, 3)), 2, generator=_gen(1))
    ens = ensemble.fit(apply_fn, members, (x, y), epochs=1, batch_size=8, generator=_gen(2))
    names = [
        _load_elsewhere(res, tmp_path, "vi.pt"),
        _load_elsewhere(res.history, tmp_path, "info.pt"),
        _load_elsewhere(sw, tmp_path, "swag.pt"),
        _load_elsewhere(sw.state, tmp_path, "swag_state.pt"),
        _load_elsewhere(ens, tmp_path, "ens.pt"),
        _load_elsewhere(ens.state, tmp_path, "ens_state.pt"),
    ]
    assert names == ["FitResult", "ELBOInfo", "SWAGResult", "SWAGState", "EnsembleResult", "EmpiricalState"]


@pytest.mark.parametrize("schedule", ["constant", "cyclical"])
def test_swag_fit_resumed_from_a_saved_checkpoint_equals_the_uninterrupted_run(schedule, tmp_path):
    apply_fn, params, x, y = _vi_setup()
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]
    kw = dict(lr=0.05, schedule=schedule, collect_every=2, max_rank=3, momentum=0.9)
    whole = swag.fit(apply_fn, params, batches, "classification", epochs=4, burn_in=1, **kw)
    half = swag.fit(apply_fn, params, batches, "classification", epochs=2, burn_in=1, **kw)
    loaded = _roundtrip(half, tmp_path)
    assert isinstance(loaded, swag.SWAGResult)
    rest = swag.fit(apply_fn, params, batches, "classification", epochs=2, burn_in=1, resume=loaded, **kw)
    # moments, the ring buffer (6 iterates in 3 slots: it wrapped), the iterate, the history
    assert int(whole.state.num_models) == 6
    _assert_trees_equal(tuple(rest.state), tuple(whole.state))
    _assert_trees_equal(rest.params, whole.params)
    assert torch.equal(rest.history, whole.history)
    _assert_trees_equal(rest.checkpoint["optimizer"]["state"], whole.checkpoint["optimizer"]["state"])
    again = swag.fit(apply_fn, params, batches, "classification", epochs=2, resume=loaded, **kw)
    _assert_trees_equal(tuple(again.state), tuple(whole.state))  # the checkpoint's momentum was not updated in place


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_ensemble_fit_resumed_from_a_saved_checkpoint_equals_the_uninterrupted_run(method, tmp_path):
    apply_fn, _, x, y = _vi_setup()
    members = ensemble.init_members(make_mlp((4, 8, 3)), 3, generator=_gen(1))
    kw = dict(epochs=2, batch_size=10, method=method)  # 24 examples: a short last batch of 4 each epoch
    whole = ensemble.fit(apply_fn, members, (x, y), **{**kw, "epochs": 4}, generator=_gen(2))
    half = ensemble.fit(apply_fn, members, (x, y), **kw, generator=_gen(2))
    loaded = _roundtrip(half, tmp_path)
    rest = ensemble.fit(apply_fn, members, (x, y), **kw, resume=loaded)
    _assert_trees_equal(rest.state.members, whole.state.members)
    assert torch.equal(rest.history, whole.history) and rest.history.shape == (12, 3)
    _assert_trees_equal(rest.checkpoint["optimizer"]["state"], whole.checkpoint["optimizer"]["state"])
    again = ensemble.fit(apply_fn, members, (x, y), **kw, resume=loaded, generator=_gen(50))
    _assert_trees_equal(again.state.members, whole.state.members)  # resume changed nothing in the checkpoint


def test_ensemble_fit_resumed_under_auto_keeps_the_path_of_the_run_it_continues():
    apply_fn, _, x, y = _vi_setup()
    members = ensemble.init_members(make_mlp((4, 8, 3)), 2, generator=_gen(1))
    half = ensemble.fit(apply_fn, members, (x, y), epochs=1, batch_size=12, method="loop", generator=_gen(2))
    ck = dict(half.checkpoint)
    assert ck["method"] == "loop"
    rest = ensemble.fit(apply_fn, members, (x, y), epochs=1, batch_size=12, resume=ck)  # method="auto"
    assert rest.checkpoint["method"] == "loop"


def test_vi_resume_with_other_settings_is_refused_naming_them():
    import funcbnn
    from funcbnn import vi

    apply_fn, params, _ = funcbnn.functionalize(torch.nn.Linear(3, 2))
    post, prior = funcbnn.diag_gaussian(init_std=0.1), funcbnn.priors.gaussian(1.0)
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    first = vi.fit(apply_fn, post, prior, post.init(params), (x, y), batch_size=16,
                   generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"batch_size 16 -> 8, lr 0.01 -> 0.5"):
        vi.fit(apply_fn, post, prior, post.init(params), (x, y), batch_size=8, lr=0.5, resume=first)
    again = vi.fit(apply_fn, post, prior, post.init(params), (x, y), batch_size=16, resume=first)  # same: fine
    assert again.history.loss.shape[0] == 2 * first.history.loss.shape[0]
