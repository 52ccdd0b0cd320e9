"""Shared fixtures: small models, a realistic multi-leaf parameter tree, data."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from torch import nn

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("ci")


def make_mlp(sizes: tuple[int, ...] = (4, 8, 3), seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def make_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 3),
    )


@pytest.fixture
def mlp() -> nn.Module:
    return make_mlp()


@pytest.fixture
def cnn() -> nn.Module:
    return make_cnn()


def multi_leaf_tree(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """An (out, in) weight, a bias and a 0-d leaf: the shapes single-leaf tests miss."""
    g = torch.Generator().manual_seed(1)
    return {
        "fc.weight": torch.randn(3, 2, generator=g, dtype=dtype),
        "fc.bias": torch.randn(3, generator=g, dtype=dtype),
        "log_scale": torch.randn((), generator=g, dtype=dtype),
    }


@pytest.fixture
def tree() -> dict[str, torch.Tensor]:
    return multi_leaf_tree()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny-model tests: more threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
