"""The README's self-contained examples run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

# Sections whose python blocks are complete programs (others continue a reader's own code).
RUNNABLE = ["What it is", "Saving and resuming"]


def _blocks(section: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README.md has no '## {section}' section"
    return re.findall(r"```python\n(.*?)```", match.group(1), re.S)


@pytest.mark.parametrize("section", RUNNABLE)
def test_readme_section_runs(section):
    blocks = _blocks(section)
    assert blocks, f"no python block in '## {section}'"
    for code in blocks:
        exec(compile(code, f"README.md ({section})", "exec"), {"__name__": "readme"})
