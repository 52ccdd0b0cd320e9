import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import make_mlp
from funcbnn import functionalize
from funcbnn._engine import HAVE_LOW_LEVEL_VMAP, vmap_leading
from funcbnn.families import diag_gaussian


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
