"""The README's bad-input table, executed: every row is a careless call and the error it must give.

Each case names the public entry point, the mistake, the exception type and text the message
must contain (the argument's name, or what to do). The README's "Bad input" table lists the
same rows; ``test_readme_lists_every_row`` keeps the two in step.
"""

from __future__ import annotations

import pathlib
import re
from typing import Callable, NamedTuple

import pytest
import torch
from torch import nn

import funcbnn
from funcbnn import checks, ensemble, laplace, swag, vi

X = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(1))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def model():
    return funcbnn.functionalize(mlp())


POST, PRIOR = funcbnn.diag_gaussian(init_std=1e-2), funcbnn.priors.gaussian(1.0)


def draws(params, n=4):
    return POST.sample(POST.init(params), n, generator=torch.Generator().manual_seed(0))


def with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def fitted_laplace():
    f, p, _ = model()
    return laplace.fit(f, p, (X, Y), likelihood="classification", subset="all", structure="diag")


class Case(NamedTuple):
    entry: str
    mistake: str
    error: type
    text: str
    call: Callable[[], object]


def _sample_outputs(x):
    f, p, _ = model()
    return funcbnn.sample_outputs(f, draws(p), x)


def _vi_fit(data, **kw):
    f, p, _ = model()
    return vi.fit(f, POST, PRIOR, POST.init(p), data, **kw)


def _laplace_fit(data):
    f, p, _ = model()
    return laplace.fit(f, p, data, likelihood="classification", subset="all", structure="kron")


def _predict(x):
    la, state = fitted_laplace()
    return la.predict(state, x)


def _swag_fit(data, **kw):
    f, p, _ = model()
    return swag.fit(f, p, data, "classification", epochs=1, **kw)


def _ensemble_fit(data, **kw):
    f, _, _ = model()
    members = ensemble.init_members(mlp(), 2, generator=torch.Generator().manual_seed(0))
    return ensemble.fit(f, members, data, epochs=1, batch_size=16, **kw)


def _other_state():
    f, _, _ = model()
    _, p_other, _ = funcbnn.functionalize(nn.Linear(4, 3))
    return vi.fit(f, POST, PRIOR, POST.init(p_other), (X, Y))


def _train_bn():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    f, p, _ = funcbnn.functionalize(net, train=True)
    return laplace.fit(f, p, (X, Y), likelihood="classification", subset="all")


def _tuple_output():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x), x

    f, p, _ = funcbnn.functionalize(Pair())
    return laplace.fit(f, p, (X, Y), likelihood="classification", subset="all")


def _embedding_out_of_range():
    net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3))
    f, p, _ = funcbnn.functionalize(net)
    samples = draws(p)
    funcbnn.sample_outputs(f, samples, torch.randint(0, 10, (5, 2)))  # fine
    return funcbnn.sample_outputs(f, samples, torch.randint(10, 20, (5, 2)))


def _diverging():
    return _vi_fit((X * 100, Y), lr=1e8, epochs=5)


CASES = [
    Case("functionalize", "not a module", TypeError, "module must be an nn.Module", lambda: funcbnn.functionalize(3)),
    Case("sample_outputs", "x with the wrong trailing shape", ValueError, "could not run on x",
         lambda: _sample_outputs(torch.randn(5, 7))),
    Case("sample_outputs", "x of another dtype", ValueError, "differs from the parameters",
         lambda: _sample_outputs(X.double())),
    Case("sample_outputs", "token ids out of an Embedding's range", ValueError, "values in [",
         _embedding_out_of_range),
    Case("sample_outputs", "NaN in x", checks.NonFiniteError, "x contains non-finite", lambda: _sample_outputs(with_nan(X))),
    Case("sample_outputs", "a posterior state instead of samples", TypeError, "post.sample(state, S)",
         lambda: funcbnn.sample_outputs(model()[0], POST.init(model()[1]), X)),
    Case("summarize", "NaN outputs", checks.NonFiniteError, "outputs contains non-finite",
         lambda: funcbnn.summarize(with_nan(torch.randn(4, 8, 3)), "classification")),
    Case("summarize", "binary probabilities outside [0, 1]", ValueError, "probabilities in [0, 1]",
         lambda: funcbnn.summarize(torch.rand(4, 8) * 2, "binary", outputs_are="probs")),
    Case("summarize", "an unknown likelihood", ValueError, "likelihood",
         lambda: funcbnn.summarize(torch.randn(4, 8, 3), "poisson")),
    Case("post.init", "NaN in params", checks.NonFiniteError, "params contains non-finite",
         lambda: POST.init({**model()[1], "0.weight": with_nan(model()[1]["0.weight"])})),
    Case("post.sample", "an int as generator", TypeError, "torch.Generator",
         lambda: POST.sample(POST.init(model()[1]), 3, generator=0)),
    Case("likelihoods.gaussian", "sigma = inf", ValueError, "sigma", lambda: funcbnn.likelihoods.gaussian(sigma=float("inf"))),
    Case("vi.fit", "x of another dtype", ValueError, "differs from the parameters", lambda: _vi_fit((X.double(), Y))),
    Case("vi.fit", "x with the wrong trailing shape", ValueError, "could not run on", lambda: _vi_fit((torch.randn(32, 5), Y))),
    Case("vi.fit", "class labels out of range", ValueError, "target", lambda: _vi_fit((X, Y + 3))),
    Case("vi.fit", "NaN in the inputs", checks.NonFiniteError, "inputs contains non-finite", lambda: _vi_fit((with_nan(X), Y))),
    Case("vi.fit", "an empty data set", ValueError, "no batches", lambda: _vi_fit([], num_data=10)),
    Case("vi.fit", "an int as generator", TypeError, "torch.Generator", lambda: _vi_fit((X, Y), generator=0)),
    Case("vi.fit", "a state of another model", ValueError, "do not fit the model", _other_state),
    Case("vi.fit", "a diverging run (lr = 1e8)", checks.DivergedError, "error.state", _diverging),
    Case("laplace.fit", "x with the wrong trailing shape", ValueError, "could not run on x",
         lambda: _laplace_fit((torch.randn(32, 5), Y))),
    Case("laplace.fit", "NaN in the inputs", checks.NonFiniteError, "non-finite", lambda: _laplace_fit((with_nan(X), Y))),
    Case("laplace.fit", "BatchNorm in train mode", ValueError, "BatchNorm", _train_bn),
    Case("laplace.fit", "a model with a tuple output", TypeError, "one tensor", _tuple_output),
    Case("la.predict", "x of another dtype", ValueError, "differs from the parameters", lambda: _predict(X.double())),
    Case("la.predict", "NaN in x", checks.NonFiniteError, "x contains non-finite", lambda: _predict(with_nan(X))),
    Case("swag.fit", "x with the wrong trailing shape", ValueError, "could not run on",
         lambda: _swag_fit([(torch.randn(32, 5), Y)])),
    Case("swag.fit", "NaN in the targets of a regression", checks.NonFiniteError, "non-finite",
         lambda: swag.fit(*funcbnn.functionalize(nn.Linear(4, 1))[:2], [(X, with_nan(torch.randn(32, 1)))],
                          "regression", epochs=1)),
    Case("ensemble.fit", "an int as generator", TypeError, "torch.Generator", lambda: _ensemble_fit((X, Y), generator=0)),
    Case("ensemble.fit", "x with the wrong trailing shape", ValueError, "could not run on",
         lambda: _ensemble_fit((torch.randn(32, 5), Y))),
]


def _row_id(case: Case) -> str:
    return f"{case.entry}: {case.mistake}"


@pytest.mark.parametrize("case", CASES, ids=_row_id)
def test_bad_input_gives_a_named_error(case: Case) -> None:
    with pytest.raises(case.error) as info:
        case.call()
    message = str(info.value)
    assert case.text in message, message
    # Our message, raised from our code: the first line of the traceback's last frame is in funcbnn.
    assert "site-packages/torch" not in info.traceback[-1].path.as_posix(), info.traceback[-1]


def test_nothing_the_user_passed_is_mutated_by_a_failed_call() -> None:
    f, p, b = model()
    before = {k: v.clone() for k, v in p.items()}
    x = with_nan(X)
    x_before = x.clone()
    with pytest.raises(checks.NonFiniteError):
        vi.fit(f, POST, PRIOR, POST.init(p), (x, Y))
    assert all(torch.equal(p[k], before[k]) for k in p)
    assert torch.equal(x.isnan(), x_before.isnan()) and torch.equal(x.nan_to_num(), x_before.nan_to_num())


def test_the_finite_checks_can_be_turned_off() -> None:
    with checks.set_finite_checks(False):
        out = _sample_outputs(with_nan(X))
    assert out.isnan().any()  # the user asked for it: no check, NaN passes through


def test_readme_lists_every_row() -> None:
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    match = re.search(r"## Bad input\n(.*?)(\n## |\Z)", readme, re.S)
    assert match, "README.md needs a '## Bad input' section"
    table = match.group(1)
    missing = [_row_id(c) for c in CASES if f"| `{c.entry}` | {c.mistake} |" not in table]
    assert not missing, f"rows missing from the README's Bad input table: {missing}"
