"""MC dropout with seeded masks: equal to a loop applying the same masks, the same for every chunk and path."""

import pytest
import torch
from torch import nn

from conftest import gen
from funcbnn import mc_dropout, sample_outputs, summarize
from funcbnn.families.dropout import dropout
from funcbnn.mc_dropout import hash_uniform


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Dropout(0.5), nn.Linear(32, 3),
    ).eval()


def _reference(net, params, seed, x):
    """The same network written out by hand: masks from hash_uniform, BatchNorm in eval mode."""
    lin0, _, d0, lin1, bn, _, d1, lin2 = net
    h = torch.relu(x @ params["0.weight"].T + params["0.bias"])
    h = h * (hash_uniform(seed, (0 << 16) + 0, h.shape) >= 0.3) / 0.7
    h = h @ params["3.weight"].T + params["3.bias"]
    h = torch.relu((h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * params["4.weight"] + params["4.bias"])
    h = h * (hash_uniform(seed, (1 << 16) + 0, h.shape) >= 0.5) / 0.5
    return h @ params["7.weight"].T + params["7.bias"]


def test_vmapped_equals_a_loop_applying_the_same_masks():
    net = _net()
    apply_fn, params, _ = mc_dropout.functionalize(net)
    post = dropout()
    draws = post.sample(post.init(params), 6, generator=gen(1))
    x = torch.randn(9, 5, generator=gen(2))
    out = sample_outputs(apply_fn, draws, x, method="vmap")
    want = torch.stack([_reference(net, params, draws["seed"][s], x) for s in range(6)])
    torch.testing.assert_close(out, want)


def test_same_generator_same_predictions_for_every_chunk_size_and_path():
    apply_fn, params, _ = mc_dropout.functionalize(_net())
    post = dropout()
    x = torch.randn(9, 5, generator=gen(2))
    outs = []
    for kw in (dict(method="vmap"), dict(method="loop"), dict(method="vmap", chunk_size=1), dict(method="vmap", chunk_size=4), {}):
        torch.manual_seed(123 + len(outs))  # the global RNG plays no part
        draws = post.sample(post.init(params), 8, generator=gen(5))
        outs.append(sample_outputs(apply_fn, draws, x, **kw))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0])
    assert not torch.allclose(outs[0][0], outs[0][1])  # different samples, different masks


def test_rates_are_kept_and_masks_are_uniform():
    net = _net()
    apply_fn, params, _ = mc_dropout.functionalize(net)
    assert apply_fn.rates == {"2": 0.3, "6": 0.5}
    u = hash_uniform(torch.tensor(11), 0, torch.Size([200_000]), torch.float64)
    # a uniform's mean and the fraction below 0.3, within 5 standard errors
    assert abs(u.mean().item() - 0.5) < 5 * (1 / 12) ** 0.5 / 200_000**0.5
    assert abs((u < 0.3).double().mean().item() - 0.3) < 5 * (0.21 / 200_000) ** 0.5
    # streams and seeds decorrelate
    v = hash_uniform(torch.tensor(11), 1, torch.Size([200_000]), torch.float64)
    assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1].item()) < 0.02


def test_plain_params_run_with_dropout_off_and_the_module_is_untouched():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    apply_fn, params, _ = mc_dropout.functionalize(net)
    x = torch.randn(4, 5)
    torch.testing.assert_close(apply_fn(params, x), net(x))
    assert not net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(not m.training for m in net.modules())


def test_summaries_and_errors():
    apply_fn, params, _ = mc_dropout.functionalize(_net())
    post = dropout()
    draws = post.sample(post.init(params), 16, generator=gen(0))
    s = summarize(sample_outputs(apply_fn, draws, torch.randn(3, 5)), "classification")
    assert (s.mutual_info > 0).all()
    with pytest.raises(ValueError, match="no dropout layer"):
        mc_dropout.functionalize(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="undefined"):
        post.kl(post.init(params), None)
    with pytest.raises(ValueError, match="seed"):
        apply_fn({"params": params, "seed": torch.tensor(1.0)}, torch.randn(2, 5))


def test_float16_inputs_drop_at_the_rate():
    net = nn.Sequential(nn.Linear(100, 100), nn.Dropout(0.5)).half()
    apply_fn, params, _ = mc_dropout.functionalize(net)
    x = torch.ones(200, 100, dtype=torch.float16)
    hidden = apply_fn({"params": params, "seed": torch.tensor(1)}, x)
    dense = apply_fn(params, x)
    dropped = ((hidden == 0) & (dense != 0)).float().sum() / (dense != 0).float().sum()
    assert abs(dropped.item() - 0.5) < 0.02


def test_channel_dropout_follows_torch_layouts():
    # Dropout1d on an unbatched (C, L) input drops whole rows (channels), as torch does
    apply_fn, params, _ = mc_dropout.functionalize(nn.Sequential(nn.Identity(), nn.Dropout1d(0.5)))
    h = apply_fn({"params": params, "seed": torch.tensor(3)}, torch.ones(16, 7))
    kept = h != 0
    assert bool((kept.all(1) | (~kept).all(1)).all()) and 0 < kept.all(1).sum() < 16
    # batched (N, C, L): one number per (example, channel)
    h = apply_fn({"params": params, "seed": torch.tensor(3)}, torch.ones(4, 16, 7))
    kept = h != 0
    assert bool((kept.all(2) | (~kept).all(2)).all())
    # Dropout3d on an unbatched (C, D, H, W) input: one number per channel
    apply_fn, params, _ = mc_dropout.functionalize(nn.Sequential(nn.Identity(), nn.Dropout3d(0.5)))
    h = apply_fn({"params": params, "seed": torch.tensor(3)}, torch.ones(8, 3, 4, 4))
    kept = (h != 0).reshape(8, -1)
    assert bool((kept.all(1) | (~kept).all(1)).all())


def test_alpha_dropout_is_refused_and_the_model_pickles():
    import pickle

    with pytest.raises(ValueError, match="AlphaDropout"):
        mc_dropout.functionalize(nn.Sequential(nn.Linear(2, 2), nn.AlphaDropout(0.2)))
    apply_fn, params, _ = mc_dropout.functionalize(_net())
    again = pickle.loads(pickle.dumps(apply_fn))
    draw = {"params": params, "seed": torch.tensor(9)}
    x = torch.randn(3, 5)
    torch.testing.assert_close(again(draw, x), apply_fn(draw, x))


@pytest.mark.parametrize("num_samples", [1, 3])
def test_vi_fit_of_a_dropout_model_is_reproducible_and_keeps_dropout_on(num_samples):
    import funcbnn
    from funcbnn import vi

    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    post, prior = funcbnn.diag_gaussian(init_std=1e-3), funcbnn.priors.gaussian(1.0)

    def run(apply_fn, params, global_seed):
        torch.manual_seed(global_seed)  # must play no part
        return vi.fit(apply_fn, post, prior, post.init(params), (x, y), epochs=3, batch_size=16,
                      num_samples=num_samples, generator=gen(7)).history.loss

    apply_fn, params, _ = mc_dropout.functionalize(net)
    a, b = run(apply_fn, params, 1), run(apply_fn, params, 2)
    torch.testing.assert_close(a, b)
    plain_fn, plain_params, _ = funcbnn.functionalize(net)
    # the first step draws the same weights for both (seeds come after them): only the masks differ
    assert not torch.isclose(a[0], run(plain_fn, plain_params, 1)[0])
