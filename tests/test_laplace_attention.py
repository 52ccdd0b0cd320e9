"""Layers whose weights are read outside their own forward: attention, transformer blocks, tied reads.

``nn.MultiheadAttention`` reads ``out_proj.weight`` / ``out_proj.bias`` in its own
forward without calling ``out_proj``; a tapped ``out_proj`` would get zero
curvature. Every quantity here is checked against a per-example loop of
``torch.autograd.grad`` on the ``nn.Module`` itself (``test_laplace.brute_force``),
hooks on the real module (KFAC factors) or ``torch.autograd.functional.jacobian``
(GLM output covariance), in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from funcbnn import functionalize
from funcbnn.laplace import diag_curvature, fit
from funcbnn.laplace._taps import OutsideForward, structured_layers, tapped_forward
from funcbnn.laplace.glm import diag_output_covariance
from funcbnn.laplace.kron import kron_curvature
from test_glm import _brute_force as glm_brute_force
from test_laplace import brute_force

DT = torch.float64


class Attention(nn.Module):
    """Self-attention then a Linear head on the mean over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.attn(x, x, x)
        return self.head(out.mean(1))


class Encoder(nn.Module):
    """A TransformerEncoderLayer (attention, two Linears, LayerNorms) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.enc(x).mean(1))


class TiedRead(nn.Module):
    """``fc`` is called normally *and* its weight is read directly (a tied projection)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc(x))
        return self.head(h @ self.fc.weight)


def _build(cls: type) -> nn.Module:
    torch.manual_seed(0)
    return cls().to(DT)


MODELS = {"attention": (Attention, (4, 8)), "encoder": (Encoder, (4, 8)), "tied_read": (TiedRead, (5,))}
OUTSIDE = {"attention": "attn.out_proj.weight", "encoder": "enc.self_attn.out_proj.weight", "tied_read": "fc.weight"}


def _data(shape: tuple[int, ...], n: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _diag_of(dense: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    d, out, start = dense.diagonal(), {}, 0
    for k, v in params.items():
        out[k] = d[start : start + v.numel()].reshape(v.shape)
        start += v.numel()
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_the_tapped_forward_reports_weights_read_outside_their_layer(name):
    cls, shape = MODELS[name]
    apply_fn, params, _ = functionalize(_build(cls))
    layers = structured_layers(apply_fn, set(params))
    with pytest.raises(OutsideForward) as err:
        tapped_forward(apply_fn, params, layers, _data(shape)[0])
    assert [layer.weight for layer in err.value.layers] == [OUTSIDE[name]]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("kind", ["ef", "ggn"])
def test_diag_curvature_equals_the_per_example_loop(name, kind):
    cls, shape = MODELS[name]
    net = _build(cls)
    apply_fn, params, _ = functionalize(net)
    x, y = _data(shape)
    want = _diag_of(brute_force(net, x, y, "categorical", kind), params)
    got, _ = diag_curvature(apply_fn, params, [(x[:4], y[:4]), (x[4:], y[4:])], "categorical", kind=kind)
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=1e-8, atol=1e-10, msg=k)
    assert got[OUTSIDE[name]].abs().max() > 1e-3  # the bug this guards against made it exactly zero


def test_structured_method_refuses_weights_read_outside_their_layer():
    apply_fn, params, _ = functionalize(_build(Attention))
    with pytest.raises(ValueError, match="out_proj"):
        diag_curvature(apply_fn, params, _data((4, 8)), "categorical", method="structured", subset=["attn.out_proj.weight"])


def _kfac_factors_by_hooks(net: nn.Module, layer: nn.Linear, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``A = sum [a, 1][a, 1]^T`` over examples and positions, ``G = sum g g^T`` over examples,
    positions and the columns ``sqrt(p_c) (e_c - p)`` of the softmax Hessian, from hooks on ``net``."""
    store: dict[str, Tensor] = {}

    def hook(mod: nn.Module, inputs: tuple, output: Tensor) -> None:
        store["a"] = inputs[0].detach()
        output.retain_grad()
        store["z"] = output

    handle = layer.register_forward_hook(hook)
    A = G = 0
    try:
        for n in range(x.shape[0]):
            f = net(x[n : n + 1])[0]
            a = store["a"].reshape(-1, store["a"].shape[-1])
            a1 = torch.cat([a, torch.ones(a.shape[0], 1, dtype=DT)], 1)
            A = A + a1.T @ a1
            p = f.detach().softmax(-1)
            for c in range(p.shape[0]):
                column = p[c].sqrt() * (torch.eye(p.shape[0], dtype=DT)[c] - p)
                (g,) = torch.autograd.grad(f, store["z"], column, retain_graph=True)
                g = g.reshape(-1, g.shape[-1])
                G = G + g.T @ g
    finally:
        handle.remove()
    return A, G


def test_kron_blocks_of_a_transformer_equal_hook_sums_and_out_proj_takes_the_diagonal():
    net = _build(Encoder)
    apply_fn, params, _ = functionalize(net)
    x, y = _data((4, 8))
    curv, _ = kron_curvature(apply_fn, params, [(x[:3], y[:3]), (x[3:], y[3:])], "categorical")
    assert ("enc.self_attn.out_proj.weight", "enc.self_attn.out_proj.bias") not in curv.blocks
    want = _diag_of(brute_force(net, x, y, "categorical", "ggn"), params)
    for k in ("enc.self_attn.out_proj.weight", "enc.self_attn.out_proj.bias", "enc.self_attn.in_proj_weight"):
        torch.testing.assert_close(curv.diag[k], want[k], rtol=1e-8, atol=1e-10, msg=k)
    for name in ("enc.linear1", "enc.linear2", "head"):
        A, G = _kfac_factors_by_hooks(net, net.get_submodule(name), x, y)
        block = curv.blocks[f"{name}.weight", f"{name}.bias"]
        torch.testing.assert_close(block.A, A, msg=name)
        torch.testing.assert_close(block.G, G, msg=name)


@pytest.mark.parametrize("name", list(MODELS))
def test_glm_output_covariance_equals_the_brute_force_jacobian(name):
    cls, shape = MODELS[name]
    apply_fn, params, _ = functionalize(_build(cls))
    g = torch.Generator().manual_seed(5)
    variances = {k: torch.rand(v.shape, generator=g, dtype=DT) for k, v in params.items()}
    x, _ = _data(shape, n=3)
    _, cov = diag_output_covariance(apply_fn, params, variances, x)
    torch.testing.assert_close(cov, glm_brute_force(apply_fn, params, variances, x))


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_a_transformer_fits_and_predicts_without_vmap_fallback_warnings(structure):
    # pytest turns warnings into errors: the fused attention kernels' "performance drop" fallback would fail here.
    apply_fn, params, _ = functionalize(_build(Encoder))
    x, y = _data((4, 8))
    la, state = fit(apply_fn, params, [(x, y)], "classification", structure=structure)
    probs = la.predict(state, x)
    torch.testing.assert_close(probs.sum(-1), torch.ones(6, dtype=DT))
