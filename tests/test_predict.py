import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from conftest import make_cnn, make_mlp
from funcbnn import VmapFallbackWarning, functionalize, sample_outputs, summarize
from funcbnn.families import diag_gaussian


def _samples(params, n, seed=0, std=0.1):
    post = diag_gaussian(init_std=std)
    return post.sample(post.init(params), n, generator=torch.Generator().manual_seed(seed))


def _loop_reference(module, samples, x):
    """Independent truth: torch's own functional_call, one sample at a time."""
    n = next(iter(samples.values())).shape[0]
    return torch.stack(
        [torch.func.functional_call(module.eval(), {k: v[i] for k, v in samples.items()}, (x,)) for i in range(n)]
    )


@given(
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    batch=st.integers(1, 5),
    num=st.integers(1, 6),
    chunk=st.integers(1, 7),
    seed=st.integers(0, 1000),
)
def test_sample_outputs_equals_a_loop_on_generated_mlps_for_every_chunk_size(widths, batch, num, chunk, seed):
    net = make_mlp((3, *widths, 2), seed=seed)
    apply_fn, params, _ = functionalize(net)
    samples = _samples(params, num, seed)
    x = torch.randn(batch, 3, generator=torch.Generator().manual_seed(seed))
    want = _loop_reference(net, samples, x)
    for method in ("vmap", "auto", "loop"):
        got = sample_outputs(apply_fn, samples, x, chunk_size=chunk, method=method)
        assert got.shape == (num, batch, 2)
        assert torch.allclose(got, want, atol=1e-6), method


@given(num=st.integers(1, 5), chunk=st.integers(1, 6))
def test_sample_outputs_equals_a_loop_on_a_small_cnn(num, chunk):
    net = make_cnn()
    apply_fn, params, _ = functionalize(net)
    samples = _samples(params, num)
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    got = sample_outputs(apply_fn, samples, x, chunk_size=chunk, method="vmap")
    assert torch.allclose(got, _loop_reference(net, samples, x), atol=1e-5)


def test_default_chunk_respects_the_memory_budget(mlp):
    apply_fn, params, _ = functionalize(mlp)
    samples = _samples(params, 10)
    x = torch.randn(64, 4)
    # The widest intermediate is 64 examples x 8 features x 4 bytes = 2 KiB per sample.
    full = sample_outputs(apply_fn, samples, x, method="vmap")
    tight = sample_outputs(apply_fn, samples, x, method="vmap", memory_budget=3 * 2048)
    assert torch.allclose(full, tight, atol=1e-6)


def test_tuple_outputs_and_tuple_inputs_are_supported():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, inputs):
            x, z = inputs
            return self.a(x), self.b(z)

    torch.manual_seed(0)
    net = TwoHeads()
    apply_fn, params, _ = functionalize(net)
    samples = _samples(params, 4)
    x, z = torch.randn(5, 3), torch.randn(5, 3)
    mean, other = sample_outputs(apply_fn, samples, (x, z))
    assert mean.shape == other.shape == (4, 5, 2)
    assert torch.allclose(mean[2], nn.functional.linear(x, samples["a.weight"][2], samples["a.bias"][2]))


class ItemNet(nn.Module):
    """A forward vmap cannot batch: it reads a tensor value with .item()."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x) * (1.0 + 0.0 * self.fc.weight.sum().item())


def test_forward_that_breaks_under_vmap_falls_back_to_a_loop_with_one_warning():
    torch.manual_seed(0)
    net = ItemNet()
    apply_fn, params, _ = functionalize(net)
    samples = _samples(params, 3)
    x = torch.randn(4, 3)
    with pytest.warns(VmapFallbackWarning, match="vmap"):
        out = sample_outputs(apply_fn, samples, x)
    assert torch.allclose(out, _loop_reference(net, samples, x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample_outputs(apply_fn, samples, x)  # the decision is remembered: no second warning
        sample_outputs(apply_fn, samples, x, method="loop")
    with pytest.raises(RuntimeError):
        sample_outputs(apply_fn, samples, x, method="vmap")


def test_bad_inputs_get_clear_errors(mlp):
    apply_fn, params, _ = functionalize(mlp)
    samples = _samples(params, 3)
    with pytest.raises(ValueError, match=r"could not run on x \(a tensor of shape \(5, 7\), dtype torch.float32\)"):
        sample_outputs(apply_fn, samples, torch.randn(5, 7))
    uneven = dict(samples, **{"0.bias": samples["0.bias"][:2]})
    with pytest.raises(ValueError, match="same leading sample axis"):
        sample_outputs(apply_fn, uneven, torch.randn(5, 4))
    with pytest.raises(ValueError, match="samples: leaf '0.weight'"):
        sample_outputs(apply_fn, dict(samples, **{"0.weight": torch.zeros(3, 8, 5)}), torch.randn(5, 4))
    with pytest.raises(ValueError, match="structure"):
        sample_outputs(apply_fn, {"0.weight": samples["0.weight"]}, torch.randn(5, 4))
    with pytest.raises(ValueError, match="chunk_size"):
        sample_outputs(apply_fn, samples, torch.randn(5, 4), chunk_size=0)
    with pytest.raises(ValueError, match="method"):
        sample_outputs(apply_fn, samples, torch.randn(5, 4), method="fast")


def test_inputs_are_not_mutated(mlp):
    apply_fn, params, _ = functionalize(mlp)
    samples = _samples(params, 3)
    kept = {k: v.clone() for k, v in samples.items()}
    x = torch.randn(5, 4)
    x0 = x.clone()
    sample_outputs(apply_fn, samples, x)
    assert torch.equal(x, x0) and all(torch.equal(samples[k], kept[k]) for k in kept)


# --- summarize -------------------------------------------------------------------------------


def test_classification_summary_matches_direct_computation():
    logits = torch.randn(50, 7, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = summarize(logits, "classification")
    p = logits.softmax(-1)
    pbar = p.mean(0)
    h = -(pbar * pbar.log()).sum(-1)
    eh = -(p * p.log()).sum(-1).mean(0)
    assert torch.allclose(s.probs, pbar) and torch.allclose(s.mean, pbar)
    assert torch.allclose(s.entropy, h) and torch.allclose(s.expected_entropy, eh)
    assert torch.allclose(s.mutual_info, h - eh) and (s.mutual_info >= 0).all()
    assert torch.allclose(s.probs_var, p.var(0, unbiased=False))
    assert torch.allclose(s.total_var, pbar * (1 - pbar))  # law of total variance for one-hot labels
    assert s.num_samples == 50


def test_classification_summary_survives_saturated_probabilities():
    logits = torch.tensor([[[1000.0, -1000.0, 0.0]], [[-1000.0, 1000.0, 0.0]]])
    s = summarize(logits, "classification")
    for field in (s.entropy, s.expected_entropy, s.mutual_info, s.probs, s.total_var):
        assert torch.isfinite(field).all()
    assert torch.allclose(s.expected_entropy, torch.zeros(1), atol=1e-6)
    assert torch.allclose(s.mutual_info, torch.tensor([math.log(2)]), atol=1e-5)


def test_binary_summary_equals_two_class_classification():
    z = torch.randn(20, 6, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b = summarize(z, "binary")
    c = summarize(torch.cat([torch.zeros_like(z), z], -1), "classification")
    assert torch.allclose(b.probs, c.probs) and torch.allclose(b.mutual_info, c.mutual_info)
    probs = summarize(torch.sigmoid(z), "binary", outputs_are="probs")
    assert torch.allclose(probs.entropy, b.entropy)


def test_regression_summaries_split_the_variance():
    g = torch.Generator().manual_seed(0)
    mean_s = torch.randn(30, 8, 2, generator=g, dtype=torch.float64)
    s = summarize(mean_s, "regression", noise_std=0.5)
    assert torch.allclose(s.mean, mean_s.mean(0))
    assert torch.allclose(s.epistemic_var, mean_s.var(0, unbiased=False))
    assert torch.allclose(s.aleatoric_var, torch.full((8, 2), 0.25, dtype=torch.float64))
    assert torch.allclose(s.total_var, s.epistemic_var + 0.25)
    log_var = torch.randn(30, 8, 2, generator=g, dtype=torch.float64)
    h = summarize(torch.cat([mean_s, log_var], -1), "heteroscedastic")
    assert torch.allclose(h.aleatoric_var, log_var.exp().mean(0))
    # total variance of the Gaussian mixture, against samples drawn from it
    draws = mean_s + log_var.mul(0.5).exp() * torch.randn(2000, 30, 8, 2, generator=g, dtype=torch.float64)
    assert torch.allclose(h.total_var, draws.reshape(-1, 8, 2).var(0), rtol=0.1)
    t = summarize((mean_s, log_var.exp()), "heteroscedastic", log_variance=False)
    assert torch.allclose(t.total_var, h.total_var)


def test_summarize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown likelihood"):
        summarize(torch.randn(3, 4, 2), "poisson")
    with pytest.raises(ValueError, match="noise_std"):
        summarize(torch.randn(3, 4), "regression", noise_std=-1.0)
    with pytest.raises(ValueError, match="even last axis"):
        summarize(torch.randn(3, 4, 3), "heteroscedastic")
    with pytest.raises(TypeError, match="outputs"):
        summarize([1, 2, 3], "classification")


def test_unbatched_inputs_work(mlp):
    apply_fn, params, _ = functionalize(mlp)
    samples = _samples(params, 3)
    x = torch.randn(4)
    assert torch.allclose(sample_outputs(apply_fn, samples, x), _loop_reference(mlp, samples, x), atol=1e-6)


def _dropout_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 64), nn.Dropout(0.5), nn.Linear(64, 2))
    return functionalize(net, train=lambda name, m: isinstance(m, nn.Dropout))


@pytest.mark.parametrize("method", ["auto", "vmap", "loop"])
def test_randomness_same_and_different_hold_on_every_path(method):
    apply_fn, params, _ = _dropout_model()
    same_weights = {k: v.expand(4, *v.shape).clone() for k, v in params.items()}
    x = torch.randn(5, 3)
    same = sample_outputs(apply_fn, same_weights, x, method=method, randomness="same")
    assert all(torch.equal(same[0], same[i]) for i in range(4))
    different = sample_outputs(apply_fn, same_weights, x, method=method, randomness="different")
    assert not torch.equal(different[0], different[1])


def test_randomness_error_is_never_replaced_by_a_loop():
    apply_fn, params, _ = _dropout_model()
    samples = _samples(params, 3)
    with pytest.raises(RuntimeError, match="randomness"):
        sample_outputs(apply_fn, samples, torch.randn(5, 3), randomness="error")


def test_cached_calls_still_validate_the_sample_count(mlp):
    apply_fn, params, _ = functionalize(mlp)
    samples = _samples(params, 3)
    x = torch.randn(5, 4)
    sample_outputs(apply_fn, samples, x)
    with pytest.raises(ValueError, match="0 samples"):
        sample_outputs(apply_fn, {k: v[:0] for k, v in samples.items()}, x)


def test_non_tensor_inputs_are_part_of_the_cached_decision():
    class Flagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, inputs):
            x, flag = inputs
            y = self.fc(x)
            return y * y.abs().max().item() if flag else y

    torch.manual_seed(0)
    apply_fn, params, _ = functionalize(Flagged())
    samples = _samples(params, 3)
    x = torch.randn(4, 3)
    sample_outputs(apply_fn, samples, (x, False))
    with pytest.warns(VmapFallbackWarning):
        out = sample_outputs(apply_fn, samples, (x, True))
    assert out.shape == (3, 4, 2)


@pytest.mark.parametrize(
    "alias, name, outputs",
    [
        ("classification", "categorical", lambda g: torch.randn(6, 5, 3, generator=g)),
        ("binary", "bernoulli", lambda g: torch.randn(6, 5, 1, generator=g)),
        ("regression", "gaussian", lambda g: torch.randn(6, 5, 2, generator=g)),
        ("heteroscedastic_regression", "heteroscedastic_gaussian", lambda g: torch.randn(6, 5, 4, generator=g)),
        ("heteroscedastic", "heteroscedastic_gaussian", lambda g: torch.randn(6, 5, 4, generator=g)),
    ],
)
def test_every_likelihood_alias_summarizes_like_its_distribution_name(alias, name, outputs):
    out = outputs(torch.Generator().manual_seed(0))
    a, b = summarize(out, alias), summarize(out, name)
    for field in a._fields:
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None and y is None) or (isinstance(x, int) and x == y) or torch.equal(x, y), field


@pytest.mark.parametrize("form", [0.5, torch.tensor(0.5), torch.tensor([0.5])], ids=["float", "0-d", "shape-(1,)"])
def test_noise_std_takes_numbers_and_scalar_tensors(form):
    out = torch.randn(6, 5, 2, generator=torch.Generator().manual_seed(0))
    want = summarize(out, "regression", noise_std=0.5)
    got = summarize(out, "regression", noise_std=form)
    torch.testing.assert_close(got.total_var, want.total_var)
    torch.testing.assert_close(got.aleatoric_var, want.aleatoric_var)


def test_auto_vmap_and_loop_agree_and_the_timing_draws_no_random_numbers(mlp):
    apply_fn, params, _ = functionalize(mlp)
    samples = _samples(params, 12)
    x = torch.randn(9, 4)
    torch.manual_seed(5)
    expected_next = torch.randn(2)
    torch.manual_seed(5)
    auto = sample_outputs(apply_fn, samples, x, chunk_size=5)  # first call: probe and timing
    assert torch.equal(torch.randn(2), expected_next)
    for method in ("vmap", "loop"):
        torch.testing.assert_close(sample_outputs(apply_fn, samples, x, chunk_size=5, method=method), auto)
