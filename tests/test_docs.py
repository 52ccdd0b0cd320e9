"""The documentation site builds, covers the public API, and its code runs.

- ``mkdocs build --strict`` succeeds (a broken link, a reference mkdocstrings
  cannot resolve, a page missing from the nav or a README section a page quotes
  fails it);
- every public module and every name in each public module's ``__all__`` has an
  entry in the API reference (mkdocstrings renders no entry for a name without
  a docstring, so an undocumented public name fails here);
- every fenced ``python`` block of every page runs, in order, in one namespace
  per page, unless the line before it is ``<!-- docs-test: skip (<reason>) -->``
  (for code that needs ``torchrun`` or a peer library; the page says so);
- every ``docs/examples/*.py`` runs with ``--fast`` and writes its figure, and
  the guide that shows the figure names the example.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import runpy
import subprocess
import sys
import types
from pathlib import Path

import pytest

from test_doctests import public_modules

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "api" not in p.relative_to(DOCS).parts)
EXAMPLES = sorted(p for p in (DOCS / "examples").glob("*.py") if not p.name.startswith("_"))

_FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ ]*$", re.S | re.M)
_SKIP = re.compile(r"<!-- docs-test: skip \((?P<reason>[^)]+)\) -->\s*$")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


@pytest.fixture(scope="module")
def reference_ids(site) -> set[str]:
    ids: set[str] = set()
    for page in (site / "api").rglob("*.html"):
        ids.update(re.findall(r'id="(funcbnn[\w.]*)"', page.read_text(encoding="utf-8")))
    return ids


def test_site_builds_strict_with_every_page_in_the_nav(site):
    assert (site / "index.html").exists()
    for page in PAGES:
        rel = page.relative_to(DOCS).with_suffix("")
        html = site / ("index.html" if rel.name == "index" and rel.parent == Path(".") else
                       (rel.parent / "index.html" if rel.name == "index" else rel / "index.html"))
        assert html.exists(), f"{page} did not become {html}"


def test_every_public_module_has_a_reference_entry(reference_ids):
    missing = [m for m in public_modules() if m not in reference_ids]
    assert not missing, f"add '::: <module>' for these to a page under docs/api/: {missing}"


def _documented_at(name: str, obj: object, reference_ids: set[str]) -> bool:
    """Whether ``obj`` (exported as ``name``) is rendered somewhere: as itself, or under its defining name."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__ in reference_ids
    routine_or_class = inspect.isclass(obj) or inspect.isfunction(obj)
    if routine_or_class and f"{obj.__module__}.{obj.__qualname__}" in reference_ids:
        return True  # an alias (``NormalPosterior = GaussianPosterior``) of a documented class or function
    for ident in reference_ids:
        home, _, attr = ident.rpartition(".")
        if attr != name or not home:
            continue
        try:
            if getattr(importlib.import_module(home), attr, None) is obj:
                return True
        except ImportError:  # a class's member id, not a module path
            continue
    return False


# Public names that have no docstring yet, so no entry (a data attribute documents itself with a string
# literal on the line after its assignment). The test fails on any other undocumented name, and on an entry
# here that has become documented, so the list only shrinks.
KNOWN_UNDOCUMENTED: set[str] = set()


def test_every_public_name_has_a_reference_entry(reference_ids):
    missing = []
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if name.startswith("__"):
                continue
            obj = getattr(module, name)
            if f"{module_name}.{name}" in reference_ids or _documented_at(name, obj, reference_ids):
                continue
            missing.append(f"{module_name}.{name}")
    new = sorted(set(missing) - KNOWN_UNDOCUMENTED)
    assert not new, f"public names with no entry in the API reference (give them a docstring): {new}"
    fixed = sorted(KNOWN_UNDOCUMENTED - set(missing))
    assert not fixed, f"documented now: remove from KNOWN_UNDOCUMENTED in tests/test_docs.py: {fixed}"


def test_funcbnn_all_is_covered_by_the_checks_above(reference_ids):
    # The top-level names are re-exports: each must resolve to an entry where it is defined.
    import funcbnn

    for name in funcbnn.__all__:
        if not name.startswith("__"):
            obj = getattr(funcbnn, name)
            assert _documented_at(name, obj, reference_ids) or f"funcbnn.{name}" in reference_ids, name


def code_blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """``(line, source, skip_reason)`` of each fenced python block of ``page``."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for m in _FENCE.finditer(text):
        if m["lang"].strip().split(" ")[0] not in ("python", "py"):
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = _SKIP.search(before)
        body = "\n".join(line[len(m["indent"]):] for line in m["body"].splitlines())
        blocks.append((text[: m.start()].count("\n") + 1, body, skip["reason"] if skip else None))
    return blocks


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_code_runs(page, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)  # snippets that save files write here
    namespace: dict = {"__name__": "__docs__"}
    for line, source, skip in code_blocks(page):
        if skip:
            continue
        try:
            exec(compile(source, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{page.relative_to(ROOT)}, code block at line {line} failed: {e!r}") from e


def test_skipped_blocks_say_why():
    for page in PAGES:
        for line, _, skip in code_blocks(page):
            assert skip is None or len(skip.strip()) > 3, f"{page}:{line}: give the reason for the skip"
        # A malformed marker would silently run (or not skip) a block.
        for m in re.finditer(r"<!-- docs-test:[^>]*-->", page.read_text(encoding="utf-8")):
            assert _SKIP.search(m.group(0) + "\n"), f"{page}: malformed marker {m.group(0)}"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_writes_its_figure(example, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.setattr(sys, "argv", [str(example), "--out", str(tmp_path), "--fast"])
    monkeypatch.syspath_prepend(str(example.parent))  # as `python docs/examples/x.py` does: _gap.py beside it
    runpy.run_path(str(example), run_name="__main__")
    figure = tmp_path / f"{example.stem}.png"
    assert figure.exists() and figure.stat().st_size > 1000
    committed = DOCS / "figures" / f"{example.stem}.png"
    assert committed.exists(), f"commit the figure: python {example.relative_to(ROOT)}"
    shown_in = [p for p in PAGES if f"figures/{example.stem}.png" in p.read_text(encoding="utf-8")]
    assert shown_in, f"no page shows figures/{example.stem}.png"
    assert all(f"examples/{example.name}" in p.read_text(encoding="utf-8") for p in shown_in)


def test_the_capability_table_in_concepts_matches_the_families():
    from funcbnn.families import FAMILIES, capabilities

    text = (DOCS / "concepts.md").read_text(encoding="utf-8")
    table = text.split("<!-- capability-table -->")[1].split("<!-- /capability-table -->")[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        caps = cells[2]
        rows[cells[0].strip("`")] = set() if caps == "—" else {c.strip() for c in caps.split(",")}
    assert set(rows) == set(FAMILIES.names()), "add or remove rows of the table in docs/concepts.md"
    import torch

    params = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}
    for name, example in FAMILIES.examples().items():
        family, _ = example(params, torch.Generator().manual_seed(0))
        assert rows[name] == set(capabilities(family)), name


def test_a_readme_bad_input_section_replaces_the_placeholder(tmp_path, monkeypatch):
    sys.path.insert(0, str(DOCS))
    try:
        import _hooks
    finally:
        sys.path.remove(str(DOCS))
    page = (DOCS / "bad-input.md").read_text(encoding="utf-8")
    fake = types.SimpleNamespace(file=types.SimpleNamespace(src_path="bad-input.md"))
    readme = tmp_path / "README.md"
    monkeypatch.setattr(_hooks, "README", readme)

    readme.write_text("# funcbnn\n\n## Bad input\n\n| input | error |\n|---|---|\n| x | [see](tests/t.py) |\n"
                      "\n## Next\n\nmore\n", encoding="utf-8")
    quoted = _hooks.on_page_markdown(page, fake, None, None)
    assert "| x | see (`tests/t.py`) |" in quoted and "The table of bad inputs" not in quoted
    assert "more" not in quoted and "<!-- readme" not in quoted

    readme.write_text("# funcbnn\n\n## Other\n\ntext\n", encoding="utf-8")
    assert "The table of bad inputs" in _hooks.on_page_markdown(page, fake, None, None)
