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


def _cnn64():
    return make_cnn().double()


@pytest.mark.parametrize("kind", ["ef", "ggn"])
def test_curvature_and_glm_covariance_on_cuda_match_the_cpu(kind):
    from funcbnn.laplace import diag_curvature
    from funcbnn.laplace.glm import diag_output_covariance

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
    apply_fn, params, _ = functionalize(_cnn64())
    apply_cuda, params_cuda, _ = functionalize(_cnn64().cuda())
    for method in ("structured", "generic"):
        want, _ = diag_curvature(apply_fn, params, [(x, y)], "categorical", kind=kind, method=method)
        got, stats = diag_curvature(apply_cuda, params_cuda, [(x.cuda(), y.cuda())], "categorical", kind=kind, method=method)
        for k in want:
            assert got[k].device.type == "cuda"
            torch.testing.assert_close(got[k].cpu(), want[k], rtol=1e-9, atol=1e-12)
    var = {k: torch.rand(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
    _, want = diag_output_covariance(apply_fn, params, var, x)
    _, got = diag_output_covariance(apply_cuda, params_cuda, {k: v.cuda() for k, v in var.items()}, x.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-12)


def test_laplace_fit_tune_predict_on_cuda_match_the_cpu():
    from funcbnn.laplace import fit

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g)
    outs = []
    for device in ("cpu", "cuda"):
        apply_fn, params, _ = functionalize(make_mlp().double().to(device))
        la, state = fit(apply_fn, params, [(x.to(device), y.to(device))], "categorical")
        state = la.tune(state, steps=20)
        outs.append((la.predict(state, x.to(device)), la.log_marglik(state), state.prior_precision))
    for cpu, cuda in zip(*outs):
        assert cuda.device.type == "cuda"
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-7, atol=1e-10)


def test_vi_step_and_bayesian_module_on_cuda():
    from funcbnn import BayesianModule, vi

    apply_fn, params, _ = functionalize(make_mlp().cuda())
    post, prior = diag_gaussian(init_std=0.1), priors.gaussian(1.0)
    state = vi.trainable(post.init(params))
    opt = torch.optim.Adam(vi.leaves(state), lr=1e-2)
    x, y = torch.randn(32, 4, device="cuda"), torch.randint(0, 3, (32,), device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    losses = {}
    for method in ("vmap", "loop"):
        losses[method] = vi.elbo(apply_fn, post, state, prior, (x, y), 100, num_samples=4, method=method,
                                 generator=torch.Generator("cuda").manual_seed(3)).loss
    torch.testing.assert_close(losses["vmap"], losses["loop"])
    state, info = vi.step(apply_fn, post, prior, state, opt, (x, y), 100, generator=gen, num_samples=4)
    assert info.loss.device.type == "cuda" and torch.isfinite(info.loss)

    net = make_mlp()
    bm_cpu = BayesianModule(net, posterior="pretrained_gaussian")
    bm_cuda = BayesianModule(net, posterior="pretrained_gaussian").cuda()
    bm_cuda.load_state_dict(bm_cpu.state_dict())
    xc = torch.randn(5, 4)
    torch.testing.assert_close(bm_cuda(xc.cuda(), sample=False).cpu(), bm_cpu(xc, sample=False), rtol=1e-5, atol=1e-6)
    assert bm_cuda(xc.cuda(), generator=torch.Generator("cuda").manual_seed(0)).device.type == "cuda"
