"""A Laplace state saved with ``torch.save`` predicts identically after plain ``torch.load`` elsewhere.

The round trip runs in a real subprocess: a fresh interpreter that imports
funcbnn, loads the state with torch's default ``weights_only=True`` (no
``safe_globals`` of its own), rebuilds the Laplace functions with
``funcbnn.laplace.from_state`` and the model alone, and predicts.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn  # noqa: F401 (the CASES architectures are eval-ed)

from funcbnn import functionalize
from funcbnn.laplace import LaplaceState, fit, from_state

DT = torch.float64

# structure -> (architecture as code the subprocess can run too, likelihood, subset)
CASES = {
    "diag": ("nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4))", "classification", "all"),
    "kron": ("nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 4))", "classification", "all"),
    "full": ("nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))", "regression", "last_layer"),
}

_CHILD = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    import funcbnn

    torch.set_num_threads(1)
    folder, structure, arch = sys.argv[1], sys.argv[2], sys.argv[3]
    net = eval(arch).double()
    net.load_state_dict(torch.load(f"{folder}/{structure}_net.pt"))
    state = torch.load(f"{folder}/{structure}_state.pt")  # torch's default: weights_only=True
    x = torch.load(f"{folder}/x.pt")
    apply_fn, params, _ = funcbnn.functionalize(net)
    la = funcbnn.laplace.from_state(apply_fn, params, state)
    out = {
        "glm": la.predict(state, x),
        "nn": la.predict(state, x, pred_type="nn", num_samples=16, generator=torch.Generator().manual_seed(0)),
        "log_marglik": la.log_marglik(state),
        "draws": la.sample(state, 4, generator=torch.Generator().manual_seed(1)),
    }
    torch.save(out, f"{folder}/{structure}_out.pt")
    """
)


def _fitted(structure: str):
    arch, likelihood, subset = CASES[structure]
    torch.manual_seed(0)
    net = eval(arch).double()
    apply_fn, params, _ = functionalize(net)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, generator=g, dtype=DT)
    y = torch.randint(0, 4, (24,), generator=g) if likelihood == "classification" else torch.randn(24, 2, generator=g, dtype=DT)
    la, state = fit(apply_fn, params, [(x, y)], likelihood, structure=structure, subset=subset, sigma=None)
    state = la.tune(state, per_leaf=True, steps=5)  # non-default hyperparameters travel too
    return net, la, state


def _outputs(la, state, x) -> dict:
    return {
        "glm": la.predict(state, x),
        "nn": la.predict(state, x, pred_type="nn", num_samples=16, generator=torch.Generator().manual_seed(0)),
        "log_marglik": la.log_marglik(state),
        "draws": la.sample(state, 4, generator=torch.Generator().manual_seed(1)),
    }


def _assert_same(got, want) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want)
        for k in want:
            _assert_same(got[k], want[k])
    elif isinstance(want, (tuple, list)):
        for a, b in zip(got, want, strict=True):
            _assert_same(a, b)
    else:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_saved_states_predict_identically_in_a_fresh_process(tmp_path: Path):
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=DT)
    torch.save(x, tmp_path / "x.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the child runs single-threaded too, so reductions add up alike
    try:
        expected = {}
        for structure in CASES:
            net, la, state = _fitted(structure)
            torch.save(state, tmp_path / f"{structure}_state.pt")
            torch.save(net.state_dict(), tmp_path / f"{structure}_net.pt")
            expected[structure] = _outputs(la, state, x)
    finally:
        torch.set_num_threads(threads)
    for structure, (arch, _, _) in CASES.items():
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(tmp_path), structure, arch],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = torch.load(tmp_path / f"{structure}_out.pt")
        _assert_same(got, expected[structure])


@pytest.mark.parametrize("structure", list(CASES))
def test_state_round_trips_with_weights_only_and_from_state_rebuilds_the_same_functions(structure, tmp_path):
    net, la, state = _fitted(structure)
    path = tmp_path / "state.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert isinstance(loaded, LaplaceState) and loaded.structure == structure
    assert loaded.likelihood in ("categorical", "gaussian")
    apply_fn, params, _ = functionalize(net)
    again = from_state(apply_fn, params, loaded)
    assert again.names == la.names and again.structure == la.structure
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(5), dtype=DT)
    _assert_same(_outputs(again, loaded, x), _outputs(la, state, x))
    moved = loaded.to(torch.float32)
    assert moved.mean[la.names[0]].dtype == torch.float32 and moved.structure == structure
    assert moved.num_data.dtype == torch.int64 and moved.sigma.dtype == torch.float32


def test_from_state_refuses_states_and_params_that_do_not_fit():
    net, la, state = _fitted("diag")
    apply_fn, params, _ = functionalize(net)
    with pytest.raises(TypeError, match="LaplaceState"):
        from_state(apply_fn, params, tuple(state))
    with pytest.raises(ValueError, match="no leaf '0.weight'"):
        from_state(apply_fn, {k: v for k, v in params.items() if k != "0.weight"}, state)
    with pytest.raises(ValueError, match="has shape"):
        from_state(apply_fn, {**params, "0.weight": torch.zeros(2, 2, dtype=DT)}, state)
    with pytest.raises(ValueError, match="pass likelihood="):
        from_state(apply_fn, params, state._replace(likelihood="poisson"))
    with pytest.raises(ValueError, match="does not match the state"):
        from_state(apply_fn, params, state, likelihood="gaussian")
    with pytest.raises(ValueError, match="structure"):
        from_state(apply_fn, params, state._replace(structure="lowrank"))
