"""Laplace on bad input and awkward models (issue 16): early errors that name the argument, and models that run.

Each test failed on the code before the fix it covers: torch-internals errors,
silent NaN predictions, ``linalg.eigh`` failures on NaN curvature, vmap errors
on recurrent layers and data-dependent control flow.
"""

from __future__ import annotations

import copy
import io
import pickle
import threading

import optree

import pytest
import torch
from torch import nn

import funcbnn
from funcbnn import laplace
from funcbnn.checks import NonFiniteError, set_finite_checks
from funcbnn.laplace import LaplaceApproximation

STRUCTURES = ("diag", "kron", "full")


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)


@pytest.fixture
def fitted(data):
    apply_fn, params, _ = funcbnn.functionalize(_mlp())
    la, state = laplace.fit(apply_fn, params, data, "classification", structure="diag")
    return apply_fn, params, la, state


# --- item 1: wrong dtype / trailing shape of x, bad targets -------------------------------------


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("bad_x", ["trailing_shape", "dtype"])
def test_fit_names_x_when_the_model_cannot_run_on_it(structure, bad_x, data):
    x, y = data
    x = torch.randn(24, 5) if bad_x == "trailing_shape" else x.double()
    apply_fn, params, _ = funcbnn.functionalize(_mlp())
    with pytest.raises(ValueError, match=r"could not run on x of data batch 0 \(a tensor of shape \(24, \d\)") as err:
        laplace.fit(apply_fn, params, (x, y), "classification", structure=structure)
    assert isinstance(err.value.__cause__, RuntimeError)  # torch's message stays in the chain
    if bad_x == "dtype":
        assert "differs from the parameters' torch.float32" in str(err.value)


def test_fit_names_the_batch_that_the_model_cannot_run_on(data):
    x, y = data
    apply_fn, params, _ = funcbnn.functionalize(_mlp())
    with pytest.raises(ValueError, match="x of data batch 1"):
        laplace.fit(apply_fn, params, [(x, y), (torch.randn(4, 7), y[:4])], "classification")


@pytest.mark.parametrize("bad", [torch.randn(5, 7), torch.randn(5, 4, dtype=torch.float64)])
def test_predict_names_x_when_the_model_cannot_run_on_it(fitted, bad):
    _, _, la, state = fitted
    with pytest.raises(ValueError, match=r"the model could not run on x \(a tensor of shape \(5,"):
        la.predict(state, bad)


def test_targets_that_are_not_a_tensor_are_named(data):
    x, y = data
    apply_fn, params, _ = funcbnn.functionalize(_mlp())
    with pytest.raises(ValueError, match="data batch 0: targets y must be a tensor"):
        laplace.fit(apply_fn, params, [(x, y.tolist())], "classification")


@pytest.mark.parametrize(
    "likelihood, y, message",
    [
        ("classification", torch.full((24,), 3), r"targets must lie in \[0, 2\]"),
        ("classification", torch.zeros(24, 1, dtype=torch.long), r"targets must have shape \(24,\)"),
        ("regression", torch.zeros(24), r"targets must have the shape of the outputs \(24, 3\)"),
    ],
)
def test_targets_of_the_wrong_range_or_shape_get_the_likelihoods_error(likelihood, y, message, data):
    apply_fn, params, _ = funcbnn.functionalize(_mlp())
    with pytest.raises(ValueError, match=message):
        laplace.fit(apply_fn, params, (data[0], y), likelihood)


# --- item 2: non-finite inputs, targets, parameters, curvature ----------------------------------


@pytest.mark.parametrize("structure", STRUCTURES)
def test_fit_names_nan_inputs_targets_and_params(structure, data):
    x, y = data
    apply_fn, params, _ = funcbnn.functionalize(_mlp())
    x_nan = x.clone()
    x_nan[3, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"data batch 1 inputs x contains non-finite values \(1 NaN, 0 inf\)"):
        laplace.fit(apply_fn, params, [(x, y), (x_nan, y)], "classification", structure=structure)
    y_inf = torch.randn(24, 3)
    y_inf[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"data batch 0 targets y contains non-finite values \(0 NaN, 1 inf\)"):
        laplace.fit(apply_fn, params, (x, y_inf), "regression", structure=structure)
    bad = {k: v.clone() for k, v in params.items()}
    bad["2.weight"][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="params contains non-finite values .* in leaf '2.weight'"):
        laplace.fit(apply_fn, bad, (x, y), "classification", structure=structure)


class _Overflow(nn.Module):
    """Finite outputs whose Jacobian squares overflow float32: the curvature, not the input, is non-finite."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) * 1e25


@pytest.mark.parametrize("structure", STRUCTURES)
def test_non_finite_curvature_is_named_before_any_decomposition(structure, data):
    apply_fn, params, _ = funcbnn.functionalize(_Overflow())
    with pytest.raises(NonFiniteError, match="the accumulated curvature contains non-finite values"):
        laplace.fit(apply_fn, params, (data[0], torch.randn(24, 3) * 1e25), "regression", structure=structure)


@pytest.mark.parametrize("pred_type", ["glm", "nn"])
def test_predict_refuses_nan_inputs(fitted, pred_type):
    _, _, la, state = fitted
    x = torch.randn(5, 4)
    x[2, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"^x contains non-finite values \(1 NaN, 0 inf\)"):
        la.predict(state, x, pred_type=pred_type, num_samples=3)


def test_finite_checks_can_be_turned_off(fitted):
    _, _, la, state = fitted
    x = torch.randn(5, 4)
    x[2, 2] = float("nan")
    with set_finite_checks(False):
        probs = la.predict(state, x)
    assert probs[2].isnan().all() and probs[[0, 1, 3, 4]].isfinite().all()


# --- item 3: batch statistics -----------------------------------------------------------------


@pytest.mark.parametrize("make", ["train", "no_running_stats"])
def test_batchnorm_with_batch_statistics_is_refused_naming_the_layer(make, data):
    if make == "train":
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
        apply_fn, params, _ = funcbnn.functionalize(model, train=True)
    else:
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 3))
        apply_fn, params, _ = funcbnn.functionalize(model)
    for structure in STRUCTURES:
        with pytest.raises(ValueError, match=r"eval-mode normalisation, but the BatchNorm layer\(s\) \['1'\]"):
            laplace.fit(apply_fn, params, data, "classification", structure=structure, subset="last_layer")


def test_eval_mode_batchnorm_fits(data):
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).eval()
    apply_fn, params, _ = funcbnn.functionalize(model)
    la, state = laplace.fit(apply_fn, params, data, "classification", structure="kron")
    assert la.predict(state, data[0]).isfinite().all()


# --- item 4: non-tensor outputs ------------------------------------------------------------------


class _TupleOut(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.kind = kind

    def forward(self, x):
        f = self.fc(x)
        return (f, f.detach()) if self.kind == "tuple" else {"logits": f}


@pytest.mark.parametrize("kind", ["tuple", "dict"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_tuple_or_dict_outputs_get_a_type_error_saying_how_to_wrap(kind, structure, data):
    apply_fn, params, _ = funcbnn.functionalize(_TupleOut(kind))
    with pytest.raises(TypeError, match=f"output is one tensor .*got a {kind}.*Wrap the model"):
        laplace.fit(apply_fn, params, data, "classification", structure=structure)


def test_predict_with_a_tuple_output_model_says_so(data):
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

    apply_fn, params, _ = funcbnn.functionalize(Plain())
    _, state = laplace.fit(apply_fn, params, data, "classification")
    tuple_fn, tuple_params, _ = funcbnn.functionalize(_TupleOut("tuple"))
    la = laplace.from_state(tuple_fn, tuple_params, state)
    with pytest.raises(TypeError, match="output is one tensor"):
        la.predict(state, torch.randn(3, 4))


# --- item 5: float16 / bfloat16 ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_low_precision_models_fit_and_match_the_float32_fit(dtype, structure, data):
    x, y = data
    model = _mlp().to(dtype)
    apply_fn, params, _ = funcbnn.functionalize(model)
    la, state = laplace.fit(apply_fn, params, (x.to(dtype), y), "classification", structure=structure)
    # The reference: the same (rounded) weights and inputs in float32.
    apply32, params32, _ = funcbnn.functionalize(copy.deepcopy(model).float())
    la32, state32 = laplace.fit(apply32, params32, (x.to(dtype).float(), y), "classification", structure=structure)
    probs, probs32 = la.predict(state, x.to(dtype)), la32.predict(state32, x.to(dtype).float())
    assert probs.dtype == dtype
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(probs.float(), probs32, atol=tol, rtol=0)
    mc = la.predict(state, x.to(dtype), link_approx="mc", num_samples=4, generator=torch.Generator().manual_seed(0))
    assert mc.dtype == dtype and mc.isfinite().all()
    lml, lml32 = la.log_marglik(state).float(), la32.log_marglik(state32)
    torch.testing.assert_close(lml, lml32, rtol=2e-2, atol=0)
    draws = la.sample(state, 3, generator=torch.Generator().manual_seed(0))
    assert all(d.dtype == dtype and d.isfinite().all() for d in draws.values())


def test_low_precision_curvature_is_summed_in_float32():
    """Past 2048, float16 steps by 2: 2048 + 1 rounds back to 2048, so 32 single examples after a batch
    of 2048 add nothing in float16; summed in float32 they give 2080 (exact in float16 too)."""
    model = nn.Linear(1, 1, bias=False).half()
    apply_fn, params, _ = funcbnn.functionalize(model)
    ones = torch.ones(2048, 1, dtype=torch.float16)
    batches = [(ones, ones)] + [(ones[:1], ones[:1])] * 32
    for structure in ("diag", "kron"):
        _, state = laplace.fit(apply_fn, params, batches, "regression", structure=structure)
        if structure == "diag":
            assert float(state.curvature["weight"]) == 2080.0
        else:  # G sums the unit output gradients, A averages x^2 = 1
            assert float(state.curvature.blocks["weight",].g[0]) == 2080.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_full_structure_names_the_dtype(dtype, data):
    apply_fn, params, _ = funcbnn.functionalize(_mlp().to(dtype))
    with pytest.raises(TypeError, match=f"structure='full' does not support {dtype}"):
        laplace.fit(apply_fn, params, (data[0].to(dtype), data[1]), "classification", structure="full")


# --- item 6: forwards that do not run under vmap -----------------------------------------------


class _Recurrent(nn.Module):
    def __init__(self, cell: type) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = cell(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class _Branching(nn.Module):
    """Python control flow on the input's value; ``scale`` is a bare leaf, so the generic engine runs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.rand(3) + 0.5)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x) * self.scale
        return self.b(x)


def _loop_curvature(apply_fn, params, names, batches, kind):
    """The per-example GGN (or EF) over ``names``, by a plain loop of ``torch.autograd.functional.jacobian``."""
    sizes = [params[k].numel() for k in names]
    theta0 = torch.cat([params[k].reshape(-1) for k in names]).double()

    def unflat(theta):
        out = dict(params)
        for k, piece in zip(names, theta.split(sizes)):
            out[k] = piece.reshape(params[k].shape).to(params[k].dtype)
        return out

    total = torch.zeros(theta0.numel(), theta0.numel(), dtype=torch.float64)
    for x, y in batches:
        for n in range(x.shape[0]):
            def f(theta):
                return apply_fn(unflat(theta), x[n : n + 1])[0].double()

            J = torch.autograd.functional.jacobian(f, theta0)  # (C, P)
            p = f(theta0).softmax(-1)
            if kind == "ggn":
                total += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
            else:
                g = J.T @ (p - nn.functional.one_hot(y[n], p.numel()).double())
                total += torch.outer(g, g)
    return total


def _awkward_cases():
    g = torch.Generator().manual_seed(3)
    seqs = torch.randn(6, 5, 3, generator=g)
    labels = torch.randint(0, 3, (6,), generator=g)
    # Both batches keep every example on the same branch as its batch, so the batched forward and
    # the per-example loop take the same branches.
    pos, neg = torch.rand(4, 3, generator=g) + 0.1, -torch.rand(4, 3, generator=g) - 0.1
    return {
        "lstm": (_Recurrent(nn.LSTM), [(seqs, labels)]),
        "gru": (_Recurrent(nn.GRU), [(seqs, labels)]),
        "branching": (_Branching(), [(pos, labels[:4]), (neg, labels[2:])]),
    }


@pytest.mark.parametrize("case", ["lstm", "gru", "branching"])
@pytest.mark.parametrize("kind", ["ggn", "ef"])
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_forwards_that_break_vmap_fit_and_match_a_per_example_loop(case, kind, structure, subset):
    model, batches = _awkward_cases()[case]
    apply_fn, params, _ = funcbnn.functionalize(model)
    la, state = laplace.fit(apply_fn, params, batches, "classification", structure=structure, curvature=kind, subset=subset)
    names = list(state.mean)
    truth = _loop_curvature(apply_fn, params, names, batches, kind)
    if structure == "full":
        torch.testing.assert_close(state.curvature.double(), truth, atol=1e-5, rtol=1e-4)
    elif structure == "diag":
        got = torch.cat([state.curvature[k].reshape(-1) for k in names]).double()
        torch.testing.assert_close(got, truth.diagonal(), atol=1e-5, rtol=1e-4)
    else:  # the leaves off the Kronecker blocks (recurrent weights, the bare scale) are diagonal
        offsets = dict(zip(names, torch.tensor([0] + [params[k].numel() for k in names]).cumsum(0).tolist()))
        assert state.curvature.diag or subset == "last_layer"
        for k, v in state.curvature.diag.items():
            want = truth.diagonal()[offsets[k] : offsets[k] + v.numel()]
            torch.testing.assert_close(v.reshape(-1).double(), want, atol=1e-5, rtol=1e-4)
    x = batches[0][0]
    probs = la.predict(state, x)
    assert probs.shape == (x.shape[0], 3) and probs.isfinite().all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(x.shape[0]))


# --- item 7: pickling and saving ---------------------------------------------------------------


def _same_predictions(a: LaplaceApproximation, b: LaplaceApproximation, x: torch.Tensor) -> None:
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    for left, right in zip(a.predict(x, 7, generator=gen()), b.predict(x, 7, generator=gen())):
        assert torch.equal(left, right)
    glm_a, glm_b = a(x), b(x)  # probabilities, or (mean, variance) for regression
    for left, right in zip(optree.tree_leaves(glm_a), optree.tree_leaves(glm_b)):
        assert torch.equal(left, right)
    assert torch.equal(a.log_marglik(), b.log_marglik())


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_laplace_approximation_pickles_fitted_and_not_and_predicts_identically(structure, subset, likelihood, data):
    x, y = data
    y = y if likelihood == "classification" else torch.randn(24, 3)
    la = LaplaceApproximation(_mlp(), likelihood, subset_of_weights=subset, hessian_structure=structure, sigma=None)
    fresh = pickle.loads(pickle.dumps(la))
    assert not fresh.is_fitted and fresh.structure == structure and fresh.subset == subset
    la.fit([(x, y)])
    fresh.fit([(x, y)])
    _same_predictions(la, fresh, x)
    again = pickle.loads(pickle.dumps(la))
    _same_predictions(la, again, x)
    la.tune(steps=5)
    _same_predictions(la, pickle.loads(pickle.dumps(la)), x)


def test_unpickled_approximation_keeps_the_weights_it_was_fitted_at(data):
    model = _mlp()
    la = LaplaceApproximation(model, "classification", subset="last_layer").fit([data])
    before = la(data[0])
    with torch.no_grad():
        model[0].weight.add_(1.0)  # training goes on after the fit: the fit's snapshot does not move
    assert torch.equal(pickle.loads(pickle.dumps(la))(data[0]), before)


def test_laplace_approximation_refuses_both_names_of_one_option():
    with pytest.raises(TypeError, match="not both"):
        LaplaceApproximation(_mlp(), structure="kron", hessian_structure="full")


@pytest.mark.parametrize("structure", STRUCTURES)
def test_the_state_saves_and_loads_with_weights_only(structure, data):
    la_obj = LaplaceApproximation(_mlp(), "classification", structure=structure, subset="last_layer").fit([data])
    buffer = io.BytesIO()
    torch.save(la_obj.state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)  # torch's default weights_only=True
    apply_fn, params, _ = funcbnn.functionalize(la_obj.model)
    again = laplace.from_state(apply_fn, params, loaded)
    assert torch.equal(again.predict(loaded, data[0]), la_obj(data[0]))


def test_incerto_laplace_pickles_and_its_state_dict_loads_with_weights_only(data):
    from funcbnn.compat.incerto import LaplaceApproximation as IncertoLaplace

    la = IncertoLaplace(_mlp(), "classification", num_samples=6)
    fresh = pickle.loads(pickle.dumps(la))
    la.fit([data])
    fresh.fit([data])
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    assert torch.equal(la.predict(data[0], generator=gen())[0], fresh.predict(data[0], generator=gen())[0])
    again = pickle.loads(pickle.dumps(la))
    assert torch.equal(la.predict(data[0], generator=gen())[1], again.predict(data[0], generator=gen())[1])
    buffer = io.BytesIO()
    torch.save(la.state_dict(), buffer)
    buffer.seek(0)
    other = IncertoLaplace(_mlp(seed=1), "classification")
    other.load_state_dict(torch.load(buffer))
    assert torch.equal(la.predict(data[0], generator=gen())[0], other.predict(data[0], generator=gen())[0])


# --- item 8: marglik_training iterates a re-iterable loader every epoch ---------------------------


class _ReshufflingLoader:
    """Re-iterable, no ``.dataset``: a new batch order on every pass (as a sampler with a per-epoch seed)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
        self.batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, x.shape[0], batch)]
        self.orders: list[list[int]] = []

    def __iter__(self):
        order = torch.randperm(len(self.batches), generator=torch.Generator().manual_seed(len(self.orders))).tolist()
        self.orders.append(order)
        return iter([self.batches[i] for i in order])


def test_marglik_training_reshuffles_a_reiterable_loader_every_epoch(data):
    x, y = data
    loader = _ReshufflingLoader(x, y, batch=4)
    apply_fn, params, _ = funcbnn.functionalize(_mlp())
    seen: list[float] = []

    def recording(p, xs):
        # A training step: a whole batch with autograd on (the fits' batch forwards run without it,
        # their per-example transforms on one example at a time).
        if torch.is_grad_enabled() and xs.shape[0] == 4:
            seen.append(float(xs[0, 0]))
        return apply_fn(p, xs)

    firsts = [float(b[0][0, 0]) for b in loader.batches]
    laplace.marglik_training(recording, params, loader, "classification", structure="diag", epochs=3, hyper_steps=1)
    epochs = [seen[i : i + 6] for i in range(0, 18, 6)]
    assert len(seen) == 18
    orders = [[firsts.index(v) for v in epoch] for epoch in epochs]
    assert all(order in loader.orders for order in orders)  # each epoch is one pass of the loader
    assert len({tuple(o) for o in orders}) > 1  # and the passes differ: the loader was re-iterated


def test_marglik_training_reads_an_iterator_once_and_refuses_an_empty_loader(data):
    apply_fn, params, _ = funcbnn.functionalize(_mlp())
    batches = iter([data])
    result = laplace.marglik_training(apply_fn, params, batches, "classification", structure="diag", epochs=2, hyper_steps=1)
    assert result.info.loss.shape[0] == 2 and result.info.loss.isfinite().all()
    with pytest.raises(ValueError, match="empty"):
        laplace.marglik_training(apply_fn, params, _ReshufflingLoader(data[0][:0], data[1][:0], 4), "classification",
                                 structure="diag", epochs=1)


# --- item 9: attention, embeddings, convolutions, regression shapes, subsets, foreign states, threads --


class _Attention(nn.Module):
    def __init__(self, encoder: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 8)
        self.encoder = encoder
        self.body = (
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            if encoder
            else nn.MultiheadAttention(8, 2, batch_first=True)
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        h = self.body(h) if self.encoder else self.body(h, h, h)[0]
        return self.head(h.mean(1))


@pytest.mark.parametrize("encoder", [False, True])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_attention_models_fit_and_predict(encoder, structure):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 5, 4, generator=g), torch.randint(0, 3, (10,), generator=g)
    apply_fn, params, _ = funcbnn.functionalize(_Attention(encoder).eval())
    subset = "last_layer" if structure == "full" else "all"
    la, state = laplace.fit(apply_fn, params, (x, y), "classification", structure=structure, subset=subset)
    probs = la.predict(state, x)
    assert probs.isfinite().all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(10))
    with pytest.raises(ValueError, match=r"could not run on x \(a tensor of shape \(2, 5, 6\)"):
        la.predict(state, torch.randn(2, 5, 6))


class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("ids", [12, -1])
def test_token_ids_out_of_the_embeddings_range_are_named_on_fit_and_predict(structure, ids):
    apply_fn, params, _ = funcbnn.functionalize(_Bag())
    good = torch.randint(0, 10, (8, 5), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (8,))
    la, state = laplace.fit(apply_fn, params, (good, y), "classification", structure=structure)
    bad = torch.full((3, 5), ids)
    with pytest.raises(ValueError, match=rf"could not run on x \(.*dtype torch.int64, values in \[{ids}, {ids}\]\)"):
        la.predict(state, bad)
    with pytest.raises(ValueError, match=rf"x of data batch 1 \(.*values in \[{ids}, {ids}\]\)"):
        laplace.fit(apply_fn, params, [(good, y), (bad, y[:3])], "classification", structure=structure)


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_convolutions_name_inputs_of_the_wrong_channels_or_rank(structure):
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    apply_fn, params, _ = funcbnn.functionalize(cnn)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    la, state = laplace.fit(apply_fn, params, (x, y), "classification", structure=structure)
    for bad in (torch.randn(8, 3, 6, 6), torch.randn(8, 6, 6)):
        with pytest.raises(ValueError, match=r"x of data batch 0 \(a tensor of shape"):
            laplace.fit(apply_fn, params, (bad, y), "classification", structure=structure)
    with pytest.raises(ValueError, match=r"could not run on x \(a tensor of shape \(2, 1, 7, 7\)"):
        la.predict(state, torch.randn(2, 1, 7, 7))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_regression_with_one_output_takes_n_by_1_targets_and_names_n_targets(structure):
    torch.manual_seed(0)
    apply_fn, params, _ = funcbnn.functionalize(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    la, state = laplace.fit(apply_fn, params, (x, y), "regression", structure=structure)
    mean, var = la.predict(state, x)
    assert mean.shape == var.shape == (16, 1) and bool((var >= 1.0).all())  # the noise sigma^2 = 1 is included
    with pytest.raises(ValueError, match=r"targets must have the shape of the outputs \(16, 1\), got \(16,\)"):
        laplace.fit(apply_fn, params, (x, y[:, 0]), "regression", structure=structure)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_heteroscedastic_models_fit_give_an_output_covariance_and_predict_says_what_to_use(structure):
    torch.manual_seed(0)
    apply_fn, params, _ = funcbnn.functionalize(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    la, state = laplace.fit(apply_fn, params, (x, y), "heteroscedastic_gaussian", structure=structure)
    f, cov = la.output_covariance(state, x)
    assert f.shape == (16, 2) and cov.shape == (16, 2, 2)
    assert bool((torch.linalg.eigvalsh(cov) > -1e-6).all())
    with pytest.raises(ValueError, match="use output_covariance or sample"):
        la.predict(state, x)
    with pytest.raises(ValueError, match=r"the mean half of the outputs \(16, 1\), got \(16, 2\)"):
        laplace.fit(apply_fn, params, (x, torch.randn(16, 2)), "heteroscedastic_gaussian", structure=structure)


def test_subset_errors_say_what_to_write(data):
    apply_fn, params, _ = funcbnn.functionalize(_mlp())
    with pytest.raises(ValueError, match=r"\['3.weight'\] are not leaves of params; the leaves are \['0.weight'"):
        laplace.fit(apply_fn, params, data, "classification", subset=["3.weight"])
    with pytest.raises(ValueError, match=r"'2' is a module: name its leaves, e.g. \['2.weight', '2.bias'\]"):
        laplace.fit(apply_fn, params, data, "classification", subset=["2"])
    with pytest.raises(ValueError, match=r"a single leaf goes in a list: subset=\['2.weight'\]"):
        laplace.fit(apply_fn, params, data, "classification", subset="2.weight")


def test_a_state_of_another_model_or_structure_is_refused_by_every_function(data):
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    apply_fn, params, _ = funcbnn.functionalize(_mlp())
    la, state = laplace.fit(apply_fn, params, data, "classification")
    other_fn, other_params, _ = funcbnn.functionalize(small)
    _, other = laplace.fit(other_fn, other_params, data, "classification")
    _, kron_state = laplace.fit(apply_fn, params, data, "classification", structure="kron")
    _, last = laplace.fit(apply_fn, params, data, "classification", subset="last_layer")
    calls = {
        "predict": lambda s: la.predict(s, data[0]),
        "sample": lambda s: la.sample(s, 2),
        "log_marglik": lambda s: la.log_marglik(s),
        "posterior": lambda s: la.posterior(s),
        "linearize": lambda s: la.linearize(s, data[0]),
        "tune": lambda s: la.tune(s, steps=1),
        "kl": lambda s: la.kl(s),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"leaf '0.weight' has shape \(6, 4\), the fitted model's \(8, 4\)"):
            call(other)
        with pytest.raises(ValueError, match="state has structure 'kron', this Laplace was built for 'diag'"):
            call(kron_state)
        with pytest.raises(ValueError, match=r"its posterior covers leaves \['2.weight', '2.bias'\]"):
            call(last)
    with pytest.raises(TypeError, match="state must be a LaplaceState"):
        la.predict({"mean": 1}, data[0])


@pytest.mark.parametrize("structure", STRUCTURES)
def test_concurrent_predictions_equal_serial_ones(structure, data):
    apply_fn, params, _ = funcbnn.functionalize(_mlp())
    la, state = laplace.fit(apply_fn, params, data, "classification", structure=structure)
    x = data[0]
    reference = la.predict(state, x)
    results, errors = [], []

    def work():
        try:
            for _ in range(6):
                results.append(torch.equal(la.predict(state, x), reference))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 24 and all(results)


def test_several_inputs_fit_like_one_concatenated_input():
    from funcbnn.model import Inputs

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(3, 3)
            self.scale = nn.Parameter(torch.rand(3) + 0.5)  # a bare leaf: the generic (per-example) engine

        def forward(self, x, z, shift=0.0):
            return self.lin(x) * self.scale + z + shift

    class One(Two):
        def forward(self, xz):
            return super().forward(xz[:, :3], xz[:, 3:], 0.5)

    g = torch.Generator().manual_seed(1)
    x, z, y = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g), torch.randint(0, 3, (8,), generator=g)
    two_fn, two_params, _ = funcbnn.functionalize(Two())
    one_fn, one_params, _ = funcbnn.functionalize(One())
    for structure in STRUCTURES:
        la2, s2 = laplace.fit(two_fn, two_params, (Inputs(x, z, shift=0.5), y), "classification", structure=structure)
        la1, s1 = laplace.fit(one_fn, one_params, (torch.cat([x, z], 1), y), "classification", structure=structure)
        torch.testing.assert_close(optree.tree_leaves(s2.curvature), optree.tree_leaves(s1.curvature))
        torch.testing.assert_close(la2.predict(s2, Inputs(x, z, shift=0.5)), la1.predict(s1, torch.cat([x, z], 1)))


def test_marglik_training_names_bad_inputs_outputs_params_and_batch_statistics(data):
    x, y = data
    apply_fn, params, _ = funcbnn.functionalize(_mlp())
    kw = dict(structure="diag", epochs=1, hyper_steps=1)
    with pytest.raises(ValueError, match=r"could not run on x of data batch 0 \(a tensor of shape \(24, 5\)"):
        laplace.marglik_training(apply_fn, params, [(torch.randn(24, 5), y)], "classification", **kw)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 2\]"):
        laplace.marglik_training(apply_fn, params, [(x, y + 3)], "classification", **kw)
    bad = {k: v.clone() for k, v in params.items()}
    bad["0.bias"][0] = float("inf")
    with pytest.raises(NonFiniteError, match="params contains non-finite values .* in leaf '0.bias'"):
        laplace.marglik_training(apply_fn, bad, [(x, y)], "classification", **kw)
    tuple_fn, tuple_params, _ = funcbnn.functionalize(_TupleOut("tuple"))
    with pytest.raises(TypeError, match="output is one tensor"):
        laplace.marglik_training(tuple_fn, tuple_params, [(x, y)], "classification", **kw)
    bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    bn_fn, bn_params, _ = funcbnn.functionalize(bn, train=True)
    with pytest.raises(ValueError, match=r"marglik_training needs eval-mode normalisation.*\['1'\]"):
        laplace.marglik_training(bn_fn, bn_params, [(x, y)], "classification", **kw)


def test_laplace_approximation_deep_copies(data):
    la = LaplaceApproximation(_mlp(), "classification", structure="kron").fit([data])
    twin = copy.deepcopy(la)
    assert torch.equal(twin(data[0]), la(data[0]))


def test_inputs_of_the_wrong_type_integer_generators_and_empty_batches_are_named(fitted, data):
    apply_fn, params, la, state = fitted
    x, y = data
    with pytest.raises(ValueError, match=r"could not run on x of data batch 0 \(list"):
        laplace.fit(apply_fn, params, [(x.tolist(), y)], "classification")
    with pytest.raises(ValueError, match="x must be a tensor with a leading batch axis .* got list"):
        la.predict(state, x.tolist())
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got int 0"):
        laplace.fit(apply_fn, params, data, "classification", curvature="mc_ggn", generator=0)
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got int 3"):
        la.predict(state, x, link_approx="mc", generator=3)
    with pytest.raises(ValueError, match=r"data batch 1 has no examples"):
        laplace.fit(apply_fn, params, [(x, y), (x[:0], y[:0])], "classification")
    with pytest.raises(ValueError, match="x has no examples"):
        la.predict(state, x[:0])


@pytest.mark.parametrize("structure", STRUCTURES)
def test_targets_on_another_device_than_the_outputs_are_named(structure, data):
    """On a GPU, targets left on the CPU; here the "meta" device plays the other device."""
    apply_fn, params, _ = funcbnn.functionalize(_mlp())
    x, y = data
    with pytest.raises(ValueError, match="data batch 0: targets y are on meta, the model's outputs on cpu"):
        laplace.fit(apply_fn, params, (x, y.to("meta")), "classification", structure=structure)


def test_dropout_in_train_mode_is_refused_naming_the_layer(data):
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    apply_fn, params, _ = funcbnn.functionalize(model, train=True)
    for structure in STRUCTURES:
        with pytest.raises(ValueError, match=r"deterministic network, but the dropout layer\(s\) \['1'\] are in train mode"):
            laplace.fit(apply_fn, params, data, "classification", structure=structure)
    with pytest.raises(ValueError, match="dropout layer"):
        laplace.marglik_training(apply_fn, params, [data], "classification", structure="diag", epochs=1)
    eval_fn, eval_params, _ = funcbnn.functionalize(model)  # eval mode: dropout is the identity
    la, state = laplace.fit(eval_fn, eval_params, data, "classification")
    assert torch.equal(la.predict(state, data[0]), la.predict(state, data[0]))


def test_from_state_refuses_a_model_in_train_mode(data):
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    apply_fn, params, _ = funcbnn.functionalize(model)
    _, state = laplace.fit(apply_fn, params, data, "classification")
    train_fn, train_params, _ = funcbnn.functionalize(model, train=True)
    with pytest.raises(ValueError, match=r"from_state needs a deterministic network.*\['1'\]"):
        laplace.from_state(train_fn, train_params, state)


def test_lstm_through_torchs_own_vmap_fallback_matches_the_loop():
    """Without warnings-as-errors, vmap runs an LSTM through torch's per-op loop (it only warns): same numbers."""
    import warnings

    model, batches = _awkward_cases()["lstm"]
    apply_fn, params, _ = funcbnn.functionalize(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, state = laplace.fit(apply_fn, params, batches, "classification", structure="diag")
    truth = _loop_curvature(apply_fn, params, list(state.mean), batches, "ggn").diagonal()
    got = torch.cat([state.curvature[k].reshape(-1) for k in state.mean]).double()
    torch.testing.assert_close(got, truth, atol=1e-5, rtol=1e-4)


# --- subset="last_layer" on parametrized heads; Inputs tensors without the batch axis -------------


def _parametrized(kind: str) -> nn.Module:
    from torch.nn.utils import parametrizations as P

    torch.manual_seed(0)
    wrap = {"weight_norm": P.weight_norm, "spectral_norm": P.spectral_norm, "plain": lambda m: m}
    head = wrap[kind.removeprefix("all_")](nn.Linear(8, 3))
    body = wrap[kind.removeprefix("all_")](nn.Linear(4, 8)) if kind.startswith("all_") else nn.Linear(4, 8)
    return nn.Sequential(body, nn.Tanh(), head).eval()  # eval: spectral_norm's power iteration stays put


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "all_weight_norm", "all_spectral_norm"])
@pytest.mark.parametrize("structure", ["diag", "full"])
def test_last_layer_of_a_parametrized_head_is_its_original_tensors_and_bias(kind, structure, data):
    # Before: the hidden layer's ['0.weight', '0.bias'] (the head's weight is no leaf named "2.weight"),
    # or "no nn.Linear layer with trainable weights" when every Linear was parametrized.
    x, y = data
    apply_fn, params, _ = funcbnn.functionalize(_parametrized(kind))
    head = sorted(k for k in params if k.startswith("2."))  # by name: every leaf of the output layer
    assert any("parametrizations.weight.original" in k for k in head) and "2.bias" in head
    la, state = laplace.fit(apply_fn, params, [(x, y)], "classification", subset="last_layer", structure=structure)
    assert sorted(state.mean) == head
    assert sorted(laplace.last_layer_names(apply_fn, params)) == head  # registration order agrees
    _, ref = laplace.fit(apply_fn, params, [(x, y)], "classification", subset=head, structure=structure)
    torch.testing.assert_close(optree.tree_leaves(state.curvature), optree.tree_leaves(ref.curvature))
    torch.testing.assert_close(la.predict(state, x[:5]), la.predict(ref, x[:5]))


def test_last_layer_empirical_fisher_of_a_weight_normed_head_matches_per_example_gradients(data):
    x, y = data
    net = _parametrized("weight_norm")
    apply_fn, params, _ = funcbnn.functionalize(net)
    _, state = laplace.fit(apply_fn, params, [(x, y)], "classification", subset="last_layer", curvature="ef")
    expected = {k: torch.zeros_like(v) for k, v in params.items() if k.startswith("2.")}
    for i in range(len(y)):  # brute force: autograd on the module itself, one example at a time
        net.zero_grad()
        nn.functional.cross_entropy(net(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        named = dict(net.named_parameters())
        for k in expected:
            expected[k] += named[k].grad.square()
    assert set(state.curvature) == set(expected)
    for k in expected:
        torch.testing.assert_close(state.curvature[k], expected[k])


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.norm = nn.Linear(4, 3), nn.LayerNorm(3)

    def forward(self, x, scale=None, temp=None):
        out = self.norm(self.lin(x if scale is None else x * scale))
        return out if temp is None else out / temp


@pytest.mark.parametrize("structure", STRUCTURES)
def test_inputs_tensors_without_the_batch_axis_are_refused_naming_them(structure):
    # Before: torch's IndexError ("index 4 is out of bounds", "slice() cannot be applied to a 0-dim tensor").
    from funcbnn import Inputs

    apply_fn, params, _ = funcbnn.functionalize(_Scaled())
    g = torch.Generator().manual_seed(0)
    x, y, shared = torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g), torch.rand(4) + 0.5
    bad = {
        "positional input 1": Inputs(x, shared),
        "keyword input 'temp'": Inputs(x, temp=torch.tensor(2.0)),
        "keyword input 'scale'": Inputs(x, scale=x[:3]),
    }
    for where, inputs in bad.items():
        with pytest.raises(ValueError, match=f"data batch 0 inputs x: {where}.*close over it"):
            laplace.fit(apply_fn, params, [(inputs, y)], "classification", structure=structure)
    la, state = laplace.fit(apply_fn, params, [(Inputs(x, temp=2.0), y)], "classification", structure=structure)
    for where, inputs in bad.items():
        with pytest.raises(ValueError, match=f"^x: {where}.*leading batch axis"):
            la.predict(state, inputs)
        with pytest.raises(ValueError, match=f"^x: {where}"):
            la.output_covariance(state, inputs)
    with pytest.raises(ValueError, match="^x: keyword input 'temp' of the funcbnn.Inputs is a 0-d tensor"):
        la.predict(state, Inputs(x, temp=torch.tensor(2.0)))


def test_closing_over_a_shared_tensor_as_the_error_says_gives_the_per_example_curvature():
    # The four-example batch a shared (4,) vector cannot be told from: the documented way
    # (the model closes over the vector) matches autograd one example at a time.
    from funcbnn import Inputs

    net = _Scaled().double()
    shared = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)

    class Closed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x, temp=None):
            return self.net(x, shared, temp)

    apply_fn, params, _ = funcbnn.functionalize(Closed())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
    _, state = laplace.fit(apply_fn, params, [(Inputs(x, temp=2.0), y)], "classification", curvature="ef")
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(4):
        grads = torch.func.grad(
            lambda p: nn.functional.cross_entropy(
                torch.func.functional_call(Closed(), p, (x[i : i + 1],), {"temp": 2.0}), y[i : i + 1], reduction="sum"
            )
        )(dict(params))
        for k in expected:
            expected[k] += grads[k].square()
    for k in expected:
        torch.testing.assert_close(state.curvature[k], expected[k])


def test_a_diverging_marglik_training_raises_diverged_error_with_the_last_parameters():
    from funcbnn.checks import DivergedError
    from funcbnn.laplace import marglik_training

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 1))
    apply_fn, params, _ = funcbnn.functionalize(net)
    x, y = torch.randn(64, 3) * 100, torch.randn(64, 1) * 1e3
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    sgd = lambda leaves: torch.optim.SGD(leaves, lr=1e30)  # noqa: E731
    with pytest.raises(DivergedError, match=r"loss became nan at epoch 1, data batch 1") as info:
        marglik_training(apply_fn, params, batches, "regression", epochs=5, optimizer=sgd)
    assert sorted(info.value.state) == sorted(params) and all(torch.isfinite(v).all() for v in info.value.state.values())
    # the hyperparameter phase: a -inf marginal likelihood is a divergence too, named as such
    with pytest.raises(DivergedError, match="log marginal likelihood became"):
        marglik_training(apply_fn, params, [(x, y)], "regression", epochs=20,
                         optimizer=lambda leaves: torch.optim.SGD(leaves, lr=1e6))
