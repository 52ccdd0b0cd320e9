"""Bad input to the training loops (vi, swag, ensemble, MC dropout): early errors that name the argument,
no NaN results, divergence caught with the last good state; and learning the observation noise with the ELBO."""

from __future__ import annotations

import math
import threading

import optree
import pytest
import torch
from torch import nn

import funcbnn
from funcbnn import checks, ensemble, likelihoods, mc_dropout, swag, vi
from funcbnn.checks import DivergedError, NonFiniteError
from funcbnn.families.empirical import EmpiricalState

from conftest import gen as _gen
from conftest import make_mlp

pytestmark = pytest.mark.usefixtures("one_thread")

POST = funcbnn.diag_gaussian(init_std=0.05)
PRIOR = funcbnn.priors.gaussian(1.0)


def _data(n=24, seed=5):
    g = _gen(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _model():
    apply_fn, params, _ = funcbnn.functionalize(make_mlp((4, 8, 3)))
    return apply_fn, params


def _vi(data, **kw):
    apply_fn, params = _model()
    return vi.fit(apply_fn, POST, PRIOR, POST.init(params), data, **kw)


def _swag(data, **kw):
    apply_fn, params = _model()
    return swag.fit(apply_fn, params, data, "classification", **{"epochs": 1, **kw})


def _ens(data, **kw):
    apply_fn, _ = _model()
    members = ensemble.init_members(make_mlp((4, 8, 3)), 2, generator=_gen(1))
    return ensemble.fit(apply_fn, members, data, **{"epochs": 1, "batch_size": 8, **kw})


def _finite(tree):
    return all(bool(torch.isfinite(t).all()) for t in optree.tree_leaves(tree))


# --- 1. inputs the model cannot take, targets that do not fit the likelihood -------------------

BAD_INPUTS = {
    "dtype": (lambda x: x.double(), r"dtype torch.float64 differs from the parameters' torch.float32"),
    "trailing shape": (lambda x: torch.randn(x.shape[0], 5), r"shape \(24, 5\)"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=list(BAD_INPUTS))
@pytest.mark.parametrize("num_samples", [1, 3])
def test_vi_fit_names_inputs_the_model_cannot_take(bad, num_samples):
    change, match = BAD_INPUTS[bad]
    x, y = _data()
    with pytest.raises(ValueError, match=match):
        _vi((change(x), y), num_samples=num_samples)


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_swag_and_ensemble_fit_name_inputs_the_model_cannot_take(bad):
    change, match = BAD_INPUTS[bad]
    x, y = _data()
    with pytest.raises(ValueError, match="could not run on the data inputs.*" + match):
        _swag([(change(x), y)])
    with pytest.raises(ValueError, match="could not run on the data inputs.*" + match):
        _ens((change(x), y))


BAD_TARGETS = {
    "float labels": (lambda y: y.float(), "integer class indices"),
    "extra axis": (lambda y: y[:, None], r"shape \(\d+,\) of class indices"),
    "out of range": (lambda y: y + 3, r"must lie in \[0, 2\]"),
}


@pytest.mark.parametrize("bad", BAD_TARGETS, ids=list(BAD_TARGETS))
def test_every_fit_checks_targets_against_the_likelihood(bad):
    change, match = BAD_TARGETS[bad]
    x, y = _data()
    for fit in (lambda d: _vi(d), lambda d: _vi(d, num_samples=3)):
        with pytest.raises(ValueError, match=match):
            fit((x, change(y)))
    with pytest.raises(ValueError, match="data targets .*do not fit the likelihood 'categorical'.*" + match):
        _swag([(x, change(y))])
    with pytest.raises(ValueError, match="data targets do not fit the likelihood 'categorical'.*" + match):
        _ens((x, change(y)))


# --- 2. an int as generator ---------------------------------------------------------------------


def test_an_int_generator_is_refused_with_the_fix_everywhere():
    x, y = _data()
    apply_fn, params = _model()
    state = vi.trainable(POST.init(params))
    opt = torch.optim.Adam(vi.leaves(state))
    match = r"generator must be a torch.Generator or None, got int 0 \(use torch.Generator\(\).manual_seed\(0\)\)"
    calls = [
        lambda: _vi((x, y), generator=0),
        lambda: vi.step(apply_fn, POST, PRIOR, state, opt, (x, y), 24, generator=0),
        lambda: vi.elbo(apply_fn, POST, state, PRIOR, (x, y), 24, generator=0),
        lambda: vi.expected_nll(apply_fn, POST, state, (x, y), generator=0),
        lambda: _ens((x, y), generator=0),
        lambda: mc_dropout.draw_seeds(3, 0),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=match):
            call()
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    drop_fn, drop_params, _ = mc_dropout.functionalize(net)
    with pytest.raises(TypeError, match=match):
        drop_fn.with_seeds(drop_params, 2, 0)


# --- 3. empty data ------------------------------------------------------------------------------


def test_empty_data_is_an_error_not_zero_silent_steps():
    x, y = _data()
    with pytest.raises(ValueError, match="data yielded no batches"):
        _vi([], num_data=10)
    with pytest.raises(ValueError, match="data yielded no batches"):
        _vi(iter([]), num_data=10)
    # a loader that is empty only when iterated (no __len__): caught after the first epoch
    with pytest.raises(ValueError, match="data yielded no batches in epoch 0"):
        _vi(type("Empty", (), {"__iter__": lambda self: iter(())})(), num_data=10)
    # drop_last with fewer examples than batch_size: the DataLoader has no batches at all
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:5], y[:5]), batch_size=8, drop_last=True)
    with pytest.raises(ValueError, match="data yielded no batches"):
        _vi(loader)
    with pytest.raises(ValueError, match="data holds no examples"):
        _vi((x[:0], y[:0]))
    with pytest.raises(ValueError, match="data batch 1 holds no examples"):
        _vi([(x, y), (x[:0], y[:0])])
    with pytest.raises(ValueError, match="data batch 1 of epoch 0 holds no examples"):
        _vi([(x, y), (x[:0], y[:0])], num_data=24)
    with pytest.raises(ValueError, match="data yielded no batches"):
        _swag(iter([]))
    with pytest.raises(ValueError, match="data holds no examples"):
        _ens((x[:0], y[:0]))


# --- 4. NaN / inf in the data, divergence ------------------------------------------------------


def test_non_finite_inputs_or_targets_are_named_with_their_batch():
    x, y = _data()
    bad_x = x.clone()
    bad_x[13, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"data inputs contains non-finite values \(1 NaN, 0 inf\)"):
        _vi((bad_x, y), batch_size=8, generator=_gen(0))
    batches = [(x[:8], y[:8]), (bad_x[8:16], y[8:16])]
    with pytest.raises(NonFiniteError, match=r"data inputs .*batch 1 of epoch 0"):
        _vi(batches)
    yr = x[:, :3].clone()
    yr[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"data targets contains non-finite values \(0 NaN, 1 inf\)"):
        _vi((x, yr), likelihood="regression")
    with pytest.raises(NonFiniteError, match=r"data inputs .*batch 1 of epoch 0"):
        _swag(batches)
    with pytest.raises(NonFiniteError, match="data inputs"):
        _ens((bad_x, y))
    apply_fn, params = _model()
    state = vi.trainable(POST.init(params))
    with pytest.raises(NonFiniteError, match="batch inputs"):
        vi.step(apply_fn, POST, PRIOR, state, torch.optim.Adam(vi.leaves(state)), (bad_x, y), 24)


def test_large_finite_data_whose_sum_overflows_is_not_called_non_finite():
    """The checks sum a tensor first (fast): an overflowing sum must fall back to the exact test."""
    x, y = _data()
    big = torch.full((24, 3), 3e38)
    assert torch.isinf(big.sum()) and torch.isfinite(big).all()
    apply_fn, params = _model()
    model = lambda p, xx: apply_fn(p, xx) * 0.0  # noqa: E731 - outputs independent of the huge targets' scale
    with pytest.raises(DivergedError):  # it gets past the data checks; the loss itself overflows
        vi.fit(model, POST, PRIOR, POST.init(params), (x, big), likelihood="regression")
    with pytest.raises(DivergedError):
        swag.fit(apply_fn, params, [(x, big)], "regression", epochs=1)


def test_finite_checks_can_be_turned_off():
    x, y = _data()
    bad_x = x.clone()
    bad_x[0, 0] = float("nan")
    with checks.set_finite_checks(False):
        result = _vi((bad_x, y), epochs=2)  # the user asked for no checks: NaN history, no error
    assert torch.isnan(result.history.loss).all()


def test_a_diverging_vi_fit_raises_with_the_step_and_the_last_finite_state():
    x, y = _data()
    with pytest.raises(DivergedError, match=r"step \d+ \(batch 0 of epoch \d+\): the VI loss became") as info:
        _vi((x * 100, y), lr=1e8, epochs=20)
    err = info.value
    assert isinstance(err, FloatingPointError) and err.step >= 1
    assert isinstance(err.state, funcbnn.families.DiagGaussianState) and _finite(err.state)
    # the state is the input of the failing step: its loss is the non-finite one
    apply_fn, _ = _model()
    loss = vi.elbo(apply_fn, POST, err.state, PRIOR, (x * 100, y), 24, generator=_gen(0)).loss
    assert not torch.isfinite(loss)


def test_a_diverging_swag_or_ensemble_fit_raises_with_the_step_and_the_state_before_it():
    x, _ = _data()
    y = torch.randn(24, 3, generator=_gen(6))
    apply_fn, params = _model()
    with pytest.raises(DivergedError, match=r"step \d+ \(batch 0 of epoch \d+\): the SGD loss became inf") as info:
        swag.fit(apply_fn, params, [(x * 100, y)], "regression", epochs=30, lr=10.0, momentum=0.0)
    assert _finite(info.value.state) and info.value.step >= 1
    members = ensemble.init_members(make_mlp((4, 8, 3)), 2, generator=_gen(1))
    sgd = lambda leaves: torch.optim.SGD(leaves, lr=10.0)  # noqa: E731
    with pytest.raises(DivergedError, match=r"step \d+ \(epoch \d+\): the loss of member\(s\) \[[0-9, ]+\] became non-finite") as info:
        ensemble.fit(apply_fn, members, (x * 100, y), "regression", optimizer=sgd, epochs=30, batch_size=24)
    assert isinstance(info.value.state, EmpiricalState) and _finite(info.value.state)
    assert info.value.step >= 1


# --- 5. a model that does not return a tensor ---------------------------------------------------


@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("wrap", ["dict", "tuple"])
def test_a_model_returning_a_dict_or_tuple_is_told_how_to_wrap_it(num_samples, wrap):
    apply_fn, params = _model()
    model = (lambda p, x: {"logits": apply_fn(p, x)}) if wrap == "dict" else (lambda p, x: (apply_fn(p, x), 1))
    match = r"the model must return one Tensor .*got a (dict with keys \['logits'\]|tuple of 2); wrap it"
    with pytest.raises(TypeError, match=match):
        vi.fit(model, POST, PRIOR, POST.init(params), _data(), num_samples=num_samples)
    with pytest.raises(TypeError, match="the model must return one Tensor"):
        ensemble.fit(model, ensemble.init_members(make_mlp((4, 8, 3)), 2, generator=_gen(1)), _data())


def test_batches_must_be_pairs_and_a_dict_batch_says_what_to_yield():
    x, y = _data()
    with pytest.raises(TypeError, match=r"data batch 0 of epoch 0 must be a pair \(inputs, targets\), got a dict with keys \['x', 'y'\]"):
        _vi([{"x": x, "y": y}], num_data=24)
    with pytest.raises(TypeError, match="must be a pair .*got tuple of length 3"):
        _vi([(x, y, y)], num_data=24)
    with pytest.raises(TypeError, match="got a dict with keys"):
        _swag([{"x": x, "y": y}])
    with pytest.raises(TypeError, match="data must be an iterable of \\(x, y\\) batches, got a tuple of 2 tensors; pass \\[\\(x, y\\)\\]"):
        _swag((x, y))
    with pytest.raises(TypeError, match="got a tuple of 3 tensors"):
        _vi((x, y, y))
    apply_fn, params = _model()
    with pytest.raises(TypeError, match="the model must return one Tensor"):
        swag.fit(lambda p, xx: {"logits": apply_fn(p, xx)}, params, [(x, y)], epochs=1)
    # lists are pairs too (what a default DataLoader collate yields)
    assert _vi([[x, y]]).history.loss.shape == (1,)


# --- 6. learning the observation noise ----------------------------------------------------------


def _type2_ml_sigma(x, y, prior_var, grid):
    """argmax over sigma of log N(y | 0, prior_var X X^T + sigma^2 I): the exact type-II ML noise."""
    n = x.shape[0]
    scores = [
        torch.distributions.MultivariateNormal(
            torch.zeros(n, dtype=x.dtype), prior_var * x @ x.T + s**2 * torch.eye(n, dtype=x.dtype)
        ).log_prob(y[:, 0])
        for s in grid
    ]
    return float(grid[torch.stack(scores).argmax()])


def test_vi_learns_the_noise_of_bayesian_linear_regression_near_the_type_ii_ml_value():
    g = _gen(0)
    n, true_sigma = 400, 0.3
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.5], [-0.7]], dtype=torch.float64) + true_sigma * torch.randn(n, 1, generator=g, dtype=torch.float64)
    best = _type2_ml_sigma(x, y, 1.0, torch.linspace(0.2, 0.45, 251, dtype=torch.float64))
    apply_fn, params, _ = funcbnn.functionalize(nn.Linear(2, 1, bias=False).double())
    post = funcbnn.diag_gaussian(init_std=0.1)
    result = vi.fit(apply_fn, post, PRIOR, post.init(params), (x, y), epochs=500, lr=0.05, likelihood="regression",
                    noise="learn", num_samples=4, generator=_gen(1))
    assert result.sigma is not None and result.sigma.dim() == 0
    assert abs(float(result.sigma) - best) < 0.01, (float(result.sigma), best)
    assert abs(float(result.sigma) - true_sigma) < 0.05
    # from another start too (the likelihood's sigma is where it starts)
    other = vi.fit(apply_fn, post, PRIOR, post.init(params), (x, y), epochs=500, lr=0.05,
                   likelihood=likelihoods.gaussian(sigma=2.0), noise="learn", num_samples=4, generator=_gen(1))
    assert abs(float(other.sigma) - best) < 0.01
    # a fixed noise stays fixed and has no learned value
    assert vi.fit(apply_fn, post, PRIOR, post.init(params), (x, y), likelihood="regression").sigma is None


def test_learned_noise_is_an_optimiser_group_named_noise_and_refused_for_other_likelihoods():
    x, y = _data()
    apply_fn, params = _model()
    seen = {}

    def adam(groups):
        seen["names"] = [g["name"] for g in groups]
        return torch.optim.Adam(groups, lr=0.01)

    vi.fit(apply_fn, POST, PRIOR, POST.init(params), (x, x[:, :3]), likelihood="regression", noise="learn", optimizer=adam)
    assert seen["names"] == ["mean", "rho", "noise"]
    with pytest.raises(ValueError, match="noise='learn' learns the std of a Gaussian likelihood"):
        vi.fit(apply_fn, POST, PRIOR, POST.init(params), (x, y), noise="learn")
    with pytest.raises(ValueError, match="noise must be 'fixed' or 'learn'"):
        vi.fit(apply_fn, POST, PRIOR, POST.init(params), (x, y), noise="yes")
    # a sigma tensor that requires grad would pile up gradients nobody uses: say what to do
    sigma = torch.tensor(0.5, requires_grad=True)
    with pytest.raises(ValueError, match="pass noise='learn'"):
        vi.fit(apply_fn, POST, PRIOR, POST.init(params), (x, x[:, :3]), likelihood=likelihoods.gaussian(sigma=sigma))


def test_the_learned_noise_gradient_does_not_accumulate_over_steps():
    """vi.step zeroes every gradient the optimiser holds: the noise's gradient is this step's alone."""
    x, _ = _data()
    y = x[:, :3]
    apply_fn, params = _model()
    state = vi.trainable(POST.init(params))
    log_sigma = torch.zeros((), requires_grad=True)
    lik = likelihoods.learnable_gaussian(log_sigma)
    opt = torch.optim.SGD([*vi.leaves(state), log_sigma], lr=0.0)  # lr 0: the same point every step
    grads = []
    for _ in range(3):
        vi.step(apply_fn, POST, PRIOR, state, opt, (x, y), 24, likelihood=lik, generator=_gen(3))
        grads.append(log_sigma.grad.clone())
    torch.testing.assert_close(grads[2], grads[0])
    # and it is the gradient of the ELBO in log sigma, by autograd on the closed form
    ls = torch.zeros((), requires_grad=True)
    draws = POST.rsample(state, 1, generator=_gen(3))
    out = apply_fn({k: v[0] for k, v in draws.items()}, x).detach()
    nll = (0.5 * ((y - out) * torch.exp(-ls)) ** 2 + ls + 0.5 * math.log(2 * math.pi)).sum(-1).mean()
    torch.testing.assert_close(grads[0], torch.autograd.grad(nll, ls)[0])


# --- 8. adversarial models and data -------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # (N, T, 4)
        h = self.embed(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h.mean(1))


class _GRU(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.GRU(4, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _conv():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(4, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(5, 3))


@pytest.mark.parametrize("make", [_Attention, _GRU, _conv], ids=["attention", "gru", "conv1d"])
@pytest.mark.parametrize("num_samples", [1, 2])
def test_attention_recurrent_and_conv_models_train_and_resume_through_vi_fit(make, num_samples):
    g = _gen(2)
    x = torch.randn(12, 5, 4, generator=g)
    if make is _conv:
        x = x.transpose(1, 2)  # (N, C=4, L=5)
    y = torch.randint(0, 3, (12,), generator=g)
    apply_fn, params, _ = funcbnn.functionalize(make())
    post = funcbnn.diag_gaussian(init_std=0.01)
    kw = dict(batch_size=6, num_samples=num_samples, method="loop")
    whole = vi.fit(apply_fn, post, PRIOR, post.init(params), (x, y), epochs=2, generator=_gen(0), **kw)
    assert whole.history.loss.shape == (4,) and torch.isfinite(whole.history.loss).all()
    half = vi.fit(apply_fn, post, PRIOR, post.init(params), (x, y), epochs=1, generator=_gen(0), **kw)
    rest = vi.fit(apply_fn, post, PRIOR, post.init(params), (x, y), epochs=1, resume=half, **kw)
    for a, b in zip(optree.tree_leaves(rest.state), optree.tree_leaves(whole.state)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="could not run on the batch inputs"):
        bad = x[:, :3] if make is _conv else x[..., :3]  # 3 features (channels) where the model takes 4
        vi.fit(apply_fn, post, PRIOR, post.init(params), (bad, y), num_samples=num_samples)


def test_a_data_loader_with_drop_last_counts_the_examples_it_sees():
    x, y = _data(n=20)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, drop_last=True)
    result = _vi(loader, epochs=2)
    assert result.history.loss.shape == (4,)  # 2 batches of 8 per epoch, the last 4 examples dropped


def test_vi_fit_of_a_dropout_model_with_batchnorm_runs_with_running_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    net.eval()
    apply_fn, params, buffers = mc_dropout.functionalize(net)
    before = {k: v.clone() for k, v in buffers.items()}
    post = funcbnn.diag_gaussian(init_std=0.01)
    res = vi.fit(apply_fn, post, PRIOR, post.init(params), _data(), epochs=2, batch_size=8, num_samples=3,
                 generator=_gen(0), buffers=buffers)
    assert torch.isfinite(res.history.loss).all()
    assert all(torch.equal(before[k], buffers[k]) for k in buffers)  # running statistics untouched


def test_concurrent_vi_fits_in_threads_equal_sequential_ones():
    x, y = _data()
    apply_fn, params = _model()
    kw = dict(epochs=2, batch_size=8, num_samples=2, method="vmap")
    expected = [vi.fit(apply_fn, POST, PRIOR, POST.init(params), (x, y), generator=_gen(s), **kw) for s in range(3)]
    got = [None] * 3
    errors = []

    def run(s):
        try:
            got[s] = vi.fit(apply_fn, POST, PRIOR, POST.init(params), (x, y), generator=_gen(s), **kw)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for a, b in zip(got, expected):
        assert torch.equal(a.history.loss, b.history.loss)


def test_ensemble_of_a_train_mode_batchnorm_model_loops_under_auto_and_says_what_to_do_under_vmap():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    apply_fn, _, _ = funcbnn.functionalize(net, train=True)
    members = ensemble.init_members(net, 2, generator=_gen(0))
    x, y = _data()
    # (the input probe used to run one example, which a train-mode BatchNorm refuses)
    auto = ensemble.fit(apply_fn, members, (x, y), epochs=1, batch_size=8, generator=_gen(1))
    loop = ensemble.fit(apply_fn, members, (x, y), epochs=1, batch_size=8, generator=_gen(1), method="loop")
    assert auto.checkpoint["method"] == "loop"
    assert torch.equal(auto.history, loop.history)
    with pytest.raises(ValueError, match="method='vmap': the members' forward cannot run under torch.func.vmap.*method='loop'"):
        ensemble.fit(apply_fn, members, (x, y), epochs=1, batch_size=8, method="vmap")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the module's statistics untouched


def test_fit_leaves_the_gradients_of_the_callers_tensors_alone():
    """A kl_weight tensor that requires grad is used detached: fit's optimiser does not hold it."""
    x, y = _data()
    weight = torch.tensor(0.5, requires_grad=True)
    _vi((x, y), kl_weight=weight, epochs=2)
    assert weight.grad is None
    # data that requires grad: no fit writes the steps' input gradients into it
    xg = x.clone().requires_grad_(True)
    _vi((xg, y), epochs=2, batch_size=8)
    _vi([(xg, y)], epochs=2)
    _swag([(xg, y)], epochs=2)
    _ens((xg, y), epochs=2)
    assert xg.grad is None


def test_local_reparameterisation_names_bad_inputs_and_refuses_an_int_generator():
    from funcbnn.local_reparam import local_reparameterize

    apply_fn, params, _ = local_reparameterize(make_mlp((4, 8, 3)))
    state = POST.init(params)
    x, y = _data()
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        apply_fn.sample_outputs_local(state, x, 2, generator=3)
    with pytest.raises(ValueError, match=r"could not run on the inputs \(a tensor of shape \(24, 5\)"):
        apply_fn.sample_outputs_local(state, torch.randn(24, 5), 2)
    with pytest.raises(ValueError, match="its dtype torch.float64 differs from the parameters' torch.float32"):
        vi.fit(apply_fn, POST, PRIOR, state, (x.double(), y), num_samples=2)


def test_a_short_last_batch_under_a_train_mode_batchnorm_says_to_drop_it():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    apply_fn, params, _ = funcbnn.functionalize(net, train=True)
    x, y = _data(n=17)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)  # 8, 8, 1
    with pytest.raises(ValueError, match=r"data batch 2 of epoch 0: .*too few for a train-mode BatchNorm.*drop_last"):
        vi.fit(apply_fn, POST, PRIOR, POST.init(params), loader)
    with pytest.raises(ValueError, match=r"batch 2 of epoch 0.*too few for a train-mode BatchNorm.*drop_last=True"):
        swag.fit(apply_fn, params, loader, "classification", epochs=1)
    dropped = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, drop_last=True)
    assert vi.fit(apply_fn, POST, PRIOR, POST.init(params), dropped).history.loss.shape == (2,)


def test_a_non_finite_starting_state_is_named_not_reported_as_divergence():
    x, y = _data()
    apply_fn, params = _model()
    bad = {**params, "0.weight": params["0.weight"].clone().fill_(float("nan"))}
    state = POST.init(params)
    state.rho["0.weight"][0, 0] = float("nan")  # e.g. a state saved from a run that went wrong
    with pytest.raises(NonFiniteError, match=r"state contains non-finite values \(1 NaN, 0 inf\) in leaf 'rho.0.weight'"):
        vi.fit(apply_fn, POST, PRIOR, state, (x, y))
    with pytest.raises(NonFiniteError, match="params contains non-finite values .*'0.weight'"):
        swag.fit(apply_fn, bad, [(x, y)], epochs=1)
    members = ensemble.init_members(make_mlp((4, 8, 3)), 2, generator=_gen(1))
    members.members["0.weight"][1, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="state.members contains non-finite values"):
        ensemble.fit(apply_fn, members, (x, y))


def test_swapped_state_and_prior_and_params_for_the_state_are_named():
    apply_fn, params = _model()[:2]
    state = POST.init(params)
    x, y = _data()
    with pytest.raises(TypeError, match=r"state and prior look swapped .*elbo\(apply_fn, post, state, prior"):
        vi.elbo(apply_fn, POST, PRIOR, state, (x, y), 24)
    with pytest.raises(TypeError, match=r"state is the model's parameter tree.*post.init\(params\)"):
        vi.fit(apply_fn, POST, PRIOR, params, (x, y))
    with pytest.raises(TypeError, match="look swapped"):
        vi.fit(apply_fn, POST, state, PRIOR, (x, y))


def test_training_hyperparameters_are_checked_before_training():
    apply_fn, params = _model()[:2]
    x, y = _data()
    for lr in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="lr must be a finite positive number"):
            vi.fit(apply_fn, POST, PRIOR, POST.init(params), (x, y), lr=lr)
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\)"):
        swag.fit(apply_fn, params, [(x, y)], epochs=1, momentum=2.0)
    with pytest.raises(ValueError, match="lr_min must not exceed lr"):
        swag.fit(apply_fn, params, [(x, y)], epochs=1, schedule="cyclical", lr=0.01, lr_min=0.1)


def test_swag_names_an_empty_batch_instead_of_calling_it_divergence():
    apply_fn, params = _model()[:2]
    x, y = _data()
    with pytest.raises(ValueError, match=r"data batch 1 of epoch 0 is empty"):
        swag.fit(apply_fn, params, [(x[:8], y[:8]), (x[:0], y[:0]), (x[8:], y[8:])], epochs=1)


def test_swag_resume_refuses_another_rank():
    apply_fn, params = _model()[:2]
    x, y = _data()
    first = swag.fit(apply_fn, params, [(x, y)], epochs=2, max_rank=3)
    with pytest.raises(ValueError, match="collects 3 deviation columns but max_rank=5"):
        swag.fit(apply_fn, params, [(x, y)], epochs=2, max_rank=5, resume=first)


def test_a_sigma_computed_once_from_a_tensor_is_refused_by_step_with_the_fix():
    apply_fn, params, _ = funcbnn.functionalize(nn.Linear(3, 1))
    x, y = torch.randn(30, 3), torch.randn(30, 1)
    log_s = torch.tensor(0.0, requires_grad=True)
    state = vi.trainable(POST.init(params))
    opt = torch.optim.Adam(vi.leaves(state) + [log_s], lr=1e-2)
    once = likelihoods.gaussian(sigma=log_s.exp())
    state, _ = vi.step(apply_fn, POST, PRIOR, state, opt, (x, y), 30, likelihood=once)  # the first use is fine
    with pytest.raises(ValueError, match="learnable_gaussian"):
        vi.step(apply_fn, POST, PRIOR, state, opt, (x, y), 30, likelihood=once)
    lik = likelihoods.learnable_gaussian(log_s)  # the supported way: two steps run and log_s moves
    for _ in range(2):
        state, _ = vi.step(apply_fn, POST, PRIOR, state, opt, (x, y), 30, likelihood=lik)
    assert log_s.item() != 0.0


def test_inputs_with_a_non_tensor_keyword_train_as_tensor_data_like_the_fixed_model():
    from funcbnn import Inputs

    class Two(nn.Module):
        def __init__(self, fixed=None):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b, self.fixed = nn.Linear(3, 2), nn.Linear(2, 2), fixed

        def forward(self, x, z, scale=1.0):
            return self.a(x) * (self.fixed or scale) + self.b(z)

    g = _gen(3)
    x, z, y = torch.randn(32, 3, generator=g), torch.randn(32, 2, generator=g), torch.randint(0, 2, (32,), generator=g)
    results = []
    for net, inputs in ((Two(), Inputs(x, z, scale=2.0)), (Two(fixed=2.0), Inputs(x, z))):
        apply_fn, params, _ = funcbnn.functionalize(net)
        fitted = vi.fit(apply_fn, POST, PRIOR, POST.init(params), (inputs, y), batch_size=8, generator=_gen(0))
        members = ensemble.init_members(net, 2, generator=_gen(1))
        trained = ensemble.fit(apply_fn, members, (inputs, y), batch_size=8, epochs=2, generator=_gen(2))
        results.append((fitted.state, trained.state))
    for a, b in zip(optree.tree_leaves(results[0]), optree.tree_leaves(results[1])):
        torch.testing.assert_close(a, b)
