"""The core on a CUDA device (skipped where there is none): same answers as on the CPU."""

import pytest
import torch

from conftest import make_cnn, make_mlp
from funcbnn import diag_gaussian, functionalize, priors, sample_outputs, summarize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("make,shape", [(make_mlp, (9, 4)), (make_cnn, (9, 1, 6, 6))])
def test_prediction_on_cuda_matches_the_cpu(make, shape, monkeypatch):
    # TF32 convolutions (cuDNN's default) round to ~1e-3; compare in full float32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    net = make()
    apply_fn, params, _ = functionalize(net)
    post = diag_gaussian(init_std=0.1)
    state = post.init(params)
    samples = post.sample(state, 8, generator=torch.Generator().manual_seed(0))
    x = torch.randn(shape)
    want = sample_outputs(apply_fn, samples, x, method="loop")

    apply_cuda, params_cuda, _ = functionalize(make().cuda())
    samples_cuda = {k: v.cuda() for k, v in samples.items()}
    for method in ("auto", "vmap", "loop"):
        got = sample_outputs(apply_cuda, samples_cuda, x.cuda(), method=method)
        assert got.device.type == "cuda"
        assert torch.allclose(got.cpu(), want, atol=1e-4), method
    s = summarize(got, "classification")
    assert s.probs.device.type == "cuda"


def test_sampling_and_kl_on_cuda_with_a_cuda_generator():
    params = {k: v.cuda() for k, v in functionalize(make_mlp())[1].items()}
    post = diag_gaussian(init_std=0.1)
    state = post.init(params)
    a = post.sample(state, 4, generator=torch.Generator("cuda").manual_seed(0))
    b = post.sample(state, 4, generator=torch.Generator("cuda").manual_seed(0))
    assert all(v.device.type == "cuda" and torch.equal(v, b[k]) for k, v in a.items())
    kl = post.kl(state, priors.gaussian(1.0))
    mc = post.kl(state, priors.scale_mixture(), num_samples=16, generator=torch.Generator("cuda").manual_seed(0))
    assert kl.device.type == "cuda" and torch.isfinite(mc)
