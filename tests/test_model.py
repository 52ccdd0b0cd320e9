import pytest
import torch
from torch import nn

from conftest import make_cnn, make_mlp
from funcbnn import functionalize, sample_outputs
from funcbnn.families import diag_gaussian


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, [m.training for m in module.modules()]


@pytest.mark.parametrize("make", [make_mlp, make_cnn])
def test_apply_fn_equals_the_module_and_leaves_it_untouched(make):
    net = make()
    x = torch.randn(5, 4) if make is make_mlp else torch.randn(5, 1, 6, 6)
    before = _snapshot(net)
    apply_fn, params, buffers = functionalize(net)
    assert torch.allclose(apply_fn(params, x), net(x))
    shifted = {k: v + 1.0 for k, v in params.items()}
    apply_fn(shifted, x)
    params["0.weight"].add_(5.0)  # the returned tree is a copy, not the module's storage
    after = _snapshot(net)
    assert before[1] == after[1]
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_apply_fn_is_differentiable_and_vmappable(mlp):
    apply_fn, params, _ = functionalize(mlp)
    x = torch.randn(3, 4)
    grads = torch.func.grad(lambda p: apply_fn(p, x).square().sum())(params)
    ref = {k: v.clone().requires_grad_() for k, v in params.items()}
    torch.autograd.grad(apply_fn(ref, x).square().sum(), list(ref.values()))
    want = dict(zip(ref, torch.autograd.grad(apply_fn(ref, x).square().sum(), list(ref.values()))))
    assert all(torch.allclose(grads[k], want[k]) for k in params)


def test_frozen_parameters_stay_out_of_the_params_tree():
    net = make_mlp()
    net[0].weight.requires_grad_(False)
    apply_fn, params, _ = functionalize(net)
    assert "0.weight" not in params and "0.bias" in params
    x = torch.randn(2, 4)
    assert torch.allclose(apply_fn(params, x), net(x))


class TiedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.body = nn.Linear(4, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.body(self.embed(idx))))


def test_tied_weights_appear_once_and_move_together():
    torch.manual_seed(0)
    net = TiedNet()
    apply_fn, params, _ = functionalize(net)
    assert "embed.weight" in params and "out.weight" not in params
    idx = torch.tensor([0, 3, 6])
    assert torch.allclose(apply_fn(params, idx), net(idx))
    new = dict(params, **{"embed.weight": torch.randn(7, 4)})
    ref = TiedNet()
    ref.load_state_dict(net.state_dict())
    with torch.no_grad():
        ref.embed.weight.copy_(new["embed.weight"])  # also the output layer: same Parameter
    assert torch.allclose(apply_fn(new, idx), ref(idx))


def _bn_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    net.train()
    for _ in range(3):
        net(torch.randn(16, 4))  # give the running statistics non-trivial values
    return net


def test_batchnorm_uses_eval_statistics_by_default_without_touching_the_module():
    net = _bn_net()
    assert net.training
    apply_fn, params, buffers = functionalize(net)
    x = torch.randn(5, 4)
    out = apply_fn(params, x)
    assert net.training  # the user's flag is unchanged
    net.eval()
    assert torch.allclose(out, net(x))
    assert torch.equal(buffers["1.running_mean"], net[1].running_mean)


def test_train_mode_batchnorm_under_vmap_gives_a_clear_error_and_loop_works():
    net = _bn_net()
    apply_fn, params, buffers = functionalize(net, train=True)
    samples = diag_gaussian(init_std=0.01).sample(diag_gaussian().init(params), 3)
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"BatchNorm/InstanceNorm layers \['1'\] are in training mode.*train=False"):
        sample_outputs(apply_fn, samples, x)
    before = buffers["1.running_mean"].clone()
    out = sample_outputs(apply_fn, samples, x, method="loop")
    assert out.shape == (3, 6, 2)
    assert torch.equal(apply_fn.buffers["1.running_mean"], before)  # buffers are not mutated


def test_train_predicate_selects_submodules():
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    apply_fn, params, _ = functionalize(net, train=lambda name, m: isinstance(m, nn.Dropout))
    assert [m.training for m in apply_fn.module] == [False, True, False]
    x = torch.randn(200, 4)
    torch.manual_seed(0)
    assert not torch.allclose(apply_fn(params, x), apply_fn(params, x))


def test_params_that_do_not_fit_are_rejected_with_the_keys(mlp):
    apply_fn, params, _ = functionalize(mlp)
    with pytest.raises(ValueError, match=r"missing keys \['2.bias'\]"):
        apply_fn({k: v for k, v in params.items() if k != "2.bias"}, torch.zeros(1, 4))
    with pytest.raises(TypeError, match="nn.Module"):
        functionalize(lambda x: x)


def test_modules_with_non_leaf_tensor_attributes_can_be_functionalized():
    torch.manual_seed(0)
    net = make_mlp()
    from torch.nn.utils import prune

    prune.l1_unstructured(net[0], "weight", amount=0.5)  # weight = orig * mask, a non-leaf
    apply_fn, params, _ = functionalize(net)
    assert "0.weight_orig" in params
    x = torch.randn(3, 4)
    assert torch.allclose(apply_fn(params, x), net(x))


def test_train_mode_layers_that_write_buffers_do_not_touch_the_callers_tree():
    net = nn.Sequential(nn.Conv1d(2, 2, 1), nn.InstanceNorm1d(2, track_running_stats=True))
    apply_fn, params, buffers = functionalize(net, train=True)
    mine = {k: v.clone() for k, v in buffers.items()}
    apply_fn(params, torch.randn(3, 2, 5), buffers)
    apply_fn(params, torch.randn(3, 2, 5))
    assert all(torch.equal(buffers[k], mine[k]) and torch.equal(apply_fn.buffers[k], mine[k]) for k in mine)


def test_apply_fn_keeps_no_reference_to_the_users_module_tensors():
    import gc
    import weakref

    net = make_mlp()
    ref = weakref.ref(net[0].weight)
    apply_fn, params, _ = functionalize(net)
    del net
    gc.collect()
    assert ref() is None
    assert apply_fn(params, torch.zeros(1, 4)).shape == (1, 3)


def test_concurrent_calls_from_threads_give_the_right_answers(mlp):
    from concurrent.futures import ThreadPoolExecutor

    apply_fn, params, _ = functionalize(mlp)
    x = torch.randn(5, 4)
    variants = [{k: v * (1 + 0.1 * i) for k, v in params.items()} for i in range(8)]
    want = [apply_fn(p, x) for p in variants]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: [apply_fn(variants[i], x) for _ in range(20)], range(8)))
    assert all(torch.equal(o, want[i]) for i, outs in enumerate(got) for o in outs)


def test_functional_model_deep_copies_into_an_independent_equal_model():
    import copy

    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    apply_fn, params, _ = functionalize(net)
    twin = copy.deepcopy(apply_fn)
    x = torch.randn(5, 3)
    torch.testing.assert_close(twin(params, x), net(x))
    assert twin.module is not apply_fn.module
    assert all(t.device.type == "meta" for t in twin.module.parameters())
