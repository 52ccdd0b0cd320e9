"""The runnable examples in the Laplace modules' docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
from torch import nn

MODULES = [
    "funcbnn.laplace.curvature",
    "funcbnn.laplace.fit",
    "funcbnn.laplace.kron",
    "funcbnn.laplace.predictive",
    "funcbnn.laplace.subnetwork",
    "funcbnn.laplace.training",
    "funcbnn.laplace.validation",
    "funcbnn.families.kron_gaussian",
    "funcbnn.families.dense_gaussian",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    torch.manual_seed(0)
    result = doctest.testmod(
        importlib.import_module(name),
        extraglobs={"torch": torch, "nn": nn},
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
    )
    assert result.failed == 0 and result.attempted > 0
