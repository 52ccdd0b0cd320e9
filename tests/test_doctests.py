"""Every docstring example of every public module runs and prints what it says.

The examples run as ``python -m pytest --doctest-modules src/funcbnn/<file>.py``
runs them: in a copy of the module's own globals, with no names injected, so an
example that uses ``torch`` or ``nn`` must import them (the API reference shows
these examples as they are). The same examples appear in the rendered API
reference, so a broken one is a broken page.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import funcbnn


def public_modules() -> list[str]:
    """``funcbnn`` and every ``funcbnn.*`` module, recursively, with no ``_``-prefixed part."""
    names = ["funcbnn"]
    for info in pkgutil.walk_packages(funcbnn.__path__, "funcbnn."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            names.append(info.name)
    return names


# Examples known to fail, with the fix; each entry fails the suite (strict xfail) once the fix lands,
# so the entry goes with it.
NEEDS_FIX: dict[str, str] = {}


def _examples() -> list:
    finder = doctest.DocTestFinder()
    params = []
    for name in public_modules():
        module = importlib.import_module(name)
        for test in finder.find(module, name):
            # The finder skips what a module imported from elsewhere: each example runs once, where defined.
            if not test.examples:
                continue
            marks = []
            if test.name in NEEDS_FIX:
                marks.append(pytest.mark.xfail(reason=NEEDS_FIX[test.name], strict=True))
            params.append(pytest.param(test, id=test.name, marks=marks))
    return params


EXAMPLES = _examples()


def test_the_finder_sees_the_examples_of_every_area():
    names = {p.id for p in EXAMPLES}
    assert len(names) == len(EXAMPLES) > 60
    areas = ("funcbnn.vi.", "funcbnn.laplace.", "funcbnn.swag.", "funcbnn.ensemble.", "funcbnn.families.")
    for area in areas:
        assert any(n.startswith(area) for n in names), area


@pytest.mark.parametrize("test", EXAMPLES)
def test_docstring_example_runs(test):
    torch.manual_seed(0)
    runner = doctest.DocTestRunner(optionflags=0)  # as --doctest-modules (no doctest_optionflags set here)
    out: list[str] = []
    result = runner.run(test, out=out.append, clear_globs=True)
    assert result.failed == 0, "".join(out)
