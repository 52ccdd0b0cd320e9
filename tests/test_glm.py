"""The structured GLM output covariance equals J diag(v) J^T built from a brute-force Jacobian."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from funcbnn import functionalize
from funcbnn.laplace.glm import diag_output_covariance


class _Shared(nn.Module):
    """One Linear applied twice: no single (input, output-gradient) pair, must take the generic path."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def _models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {
        "mlp": (nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), (4,)),
        "mlp_layernorm": (nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)), (4,)),
        "sequence_linear": (nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 2)), (3, 4)),
        "cnn": (
            nn.Sequential(
                nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2), nn.Flatten(), nn.Linear(8, 3)
            ),
            (2, 4, 4),
        ),
        "conv1d": (nn.Sequential(nn.Conv1d(2, 3, 3, dilation=2), nn.Tanh(), nn.Flatten(), nn.Linear(9, 2)), (2, 7)),
        "no_bias_single_output": (nn.Sequential(nn.Linear(4, 6, bias=False), nn.Tanh(), nn.Linear(6, 1)), (4,)),
        "shared_layer": (_Shared(), (4,)),
    }


def _brute_force(apply_fn, params, variances, x):
    names = list(variances)
    rest = {k: v for k, v in params.items() if k not in variances}
    covs = []
    for xi in x:
        def f(*leaves):
            return apply_fn({**rest, **dict(zip(names, leaves))}, xi[None]).reshape(-1)

        jac = torch.autograd.functional.jacobian(f, tuple(params[k] for k in names))
        J = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)
        v = torch.cat([variances[k].reshape(-1) for k in names])
        covs.append(J @ torch.diag(v) @ J.T)
    return torch.stack(covs)


@pytest.mark.parametrize("name", list(_models()))
def test_structured_covariance_equals_brute_force_jacobian(name):
    model, in_shape = _models()[name]
    model = model.double()
    apply_fn, params, _ = functionalize(model)
    g = torch.Generator().manual_seed(1)
    variances = {k: torch.rand(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
    x = torch.randn(5, *in_shape, generator=g, dtype=torch.float64)
    f, cov = diag_output_covariance(apply_fn, params, variances, x, chunk_size=3)
    torch.testing.assert_close(f, model(x).detach())
    torch.testing.assert_close(cov, _brute_force(apply_fn, params, variances, x), rtol=1e-9, atol=1e-12)


def test_leaves_without_variance_count_as_fixed():
    model, _ = _models()["mlp_layernorm"]
    model = model.double()
    apply_fn, params, _ = functionalize(model)
    g = torch.Generator().manual_seed(2)
    variances = {k: torch.rand(v.shape, generator=g, dtype=torch.float64) for k, v in params.items() if k.startswith(("1.", "3.weight"))}
    x = torch.randn(4, 4, generator=g, dtype=torch.float64)
    _, cov = diag_output_covariance(apply_fn, params, variances, x)
    torch.testing.assert_close(cov, _brute_force(apply_fn, params, variances, x), rtol=1e-9, atol=1e-12)


@given(
    width=st.integers(1, 6),
    outputs=st.integers(1, 4),
    n=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_mlp_covariance_matches_brute_force_for_any_sizes(width, outputs, n, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, outputs)).double()
    apply_fn, params, _ = functionalize(model)
    variances = {k: torch.rand_like(v) for k, v in params.items()}
    x = torch.randn(n, 3, dtype=torch.float64)
    _, cov = diag_output_covariance(apply_fn, params, variances, x)
    torch.testing.assert_close(cov, _brute_force(apply_fn, params, variances, x), rtol=1e-9, atol=1e-12)


def test_bad_variances_are_named():
    apply_fn, params, _ = functionalize(nn.Linear(3, 2))
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="not in params"):
        diag_output_covariance(apply_fn, params, {"nope": torch.ones(1)}, x)
    with pytest.raises(ValueError, match="'weight'"):
        diag_output_covariance(apply_fn, params, {"weight": torch.ones(3)}, x)
    with pytest.raises(ValueError, match="batch axis"):
        diag_output_covariance(apply_fn, params, {"weight": torch.ones(2, 3)}, torch.tensor(1.0))


def test_covariance_is_computed_under_no_grad():
    model, _ = _models()["mlp_layernorm"]
    apply_fn, params, _ = functionalize(model.double())
    variances = {k: torch.full_like(v, 0.1) for k, v in params.items()}
    x = torch.randn(3, 4, dtype=torch.float64)
    want = diag_output_covariance(apply_fn, params, variances, x)[1]
    with torch.no_grad():
        got = diag_output_covariance(apply_fn, params, variances, x)[1]
    torch.testing.assert_close(got, want)
