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


def _to(tree, device):
    import optree

    return optree.tree_map(lambda t: t.to(device), tree)


def test_swag_fit_and_posterior_draws_on_cuda_match_the_cpu():
    from funcbnn import swag

    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(48, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (48,), generator=g)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)]
    outs = {}
    for device in ("cpu", "cuda"):
        apply_fn, params, _ = functionalize(make_mlp().double().to(device))
        res = swag.fit(apply_fn, params, [(a.to(device), b.to(device)) for a, b in batches], "categorical",
                       epochs=4, burn_in=1, lr=0.05, max_rank=3)
        fam, st = swag.posterior(res.state)
        draws = fam.sample(st, 5, generator=torch.Generator(device).manual_seed(0)) if device == "cpu" else None
        outs[device] = (res, fam, st, draws)
    cpu, cuda = outs["cpu"], outs["cuda"]
    torch.testing.assert_close(_to(cuda[0].history, "cpu"), cpu[0].history, rtol=1e-9, atol=1e-12)
    for k, v in swag.swa(cpu[0].state).items():
        torch.testing.assert_close(swag.swa(cuda[0].state)[k].cpu(), v, rtol=1e-9, atol=1e-12)
    # the posterior's mean and variance agree; CUDA draws come from a CUDA generator
    torch.testing.assert_close(_to(cuda[1].variance(cuda[2]), "cpu"), cpu[1].variance(cpu[2]), rtol=1e-8, atol=1e-14)
    draws = cuda[1].sample(cuda[2], 5, generator=torch.Generator("cuda").manual_seed(0))
    assert all(v.device.type == "cuda" and torch.isfinite(v).all() for v in draws.values())


def test_ensemble_fit_vmap_and_loop_on_cuda_match_the_cpu():
    from funcbnn import ensemble

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g)
    members = ensemble.init_members(make_mlp().double(), 4, generator=torch.Generator().manual_seed(0))
    apply_fn, _, _ = functionalize(make_mlp().double())
    want = ensemble.fit(apply_fn, members, (x, y), epochs=3, batch_size=16, method="loop",
                        generator=torch.Generator().manual_seed(1))
    apply_cuda, _, _ = functionalize(make_mlp().double().cuda())
    for method in ("vmap", "loop"):
        # the data orders come from a CPU generator, so both devices see the same batches
        got = ensemble.fit(apply_cuda, _to(members, "cuda"), (x.cuda(), y.cuda()), epochs=3, batch_size=16,
                           method=method, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(got.history.cpu(), want.history, rtol=1e-8, atol=1e-10)
        for a, b in zip(optree_leaves(got.state), optree_leaves(want.state)):
            assert a.device.type == "cuda"
            torch.testing.assert_close(a.cpu(), b, rtol=1e-8, atol=1e-10)


def optree_leaves(tree):
    import optree

    return optree.tree_leaves(tree)


def test_mc_dropout_masks_are_the_same_on_cuda_and_cpu():
    from torch import nn

    from funcbnn import mc_dropout

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    outs = {}
    for device in ("cpu", "cuda"):
        apply_fn, params, _ = mc_dropout.functionalize(net.to(device))
        # the seeds are drawn on the CPU and moved: the hash masks are integer arithmetic, equal on both devices
        draws = apply_fn.with_seeds(optree_stack(params, 6), 6, torch.Generator().manual_seed(0))
        outs[device] = {m: sample_outputs(apply_fn, draws, x.to(device), method=m) for m in ("vmap", "loop")}
    for m in ("vmap", "loop"):
        assert outs["cuda"][m].device.type == "cuda"
        torch.testing.assert_close(outs["cuda"][m].cpu(), outs["cpu"]["vmap"], rtol=1e-10, atol=1e-12)


def optree_stack(params, n):
    return {k: v.unsqueeze(0).expand(n, *v.shape).clone() for k, v in params.items()}


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_kron_and_full_laplace_on_cuda_match_the_cpu(structure):
    from funcbnn.laplace import fit

    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(40, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
    outs = []
    for device in ("cpu", "cuda"):
        apply_fn, params, _ = functionalize(make_mlp().double().to(device))
        la, state = fit(apply_fn, params, [(x.to(device), y.to(device))], "categorical", subset="all",
                        structure=structure)
        outs.append((la.predict(state, x.to(device)), la.log_marglik(state)))
    for cpu, cuda in zip(*outs):
        assert cuda.device.type == "cuda"
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-7, atol=1e-10)


def test_marglik_training_on_cuda_matches_the_cpu():
    from funcbnn.laplace import marglik_training

    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    y = x @ torch.randn(4, 1, generator=g, dtype=torch.float64) + 0.1 * torch.randn(64, 1, generator=g, dtype=torch.float64)
    outs = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 1).double().to(device)
        apply_fn, params, _ = functionalize(net)
        res = marglik_training(apply_fn, params, [(x.to(device), y.to(device))], "regression", structure="full",
                               epochs=20, lr=1e-2, hyper_steps=5)
        outs.append(res)
    for k, v in outs[0].params.items():
        torch.testing.assert_close(outs[1].params[k].cpu(), v, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.as_tensor(outs[1].state.sigma).cpu(), torch.as_tensor(outs[0].state.sigma),
                               rtol=1e-6, atol=1e-9)
