"""MkDocs hooks: pages that quote a README section stay in step with it.

A page writes::

    <!-- readme: Evaluation -->
    text shown only while the README has no such section
    <!-- /readme -->

and the build replaces the block with the body of the README's ``## Evaluation``
section (up to the next ``## `` heading). ``<!-- readme: top -->`` quotes what
comes before the first ``## `` heading (the install commands). A block with no
text inside is required: the build fails if the README lost that section. Links
into ``funcbnn-eval/`` (where ``python -m funcbnn`` writes its figures) point
to the copies under ``docs/figures/evaluation/``.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.exceptions import PluginError

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"<!-- readme: (?P<name>[^>]+?) -->\n(?P<fallback>.*?)<!-- /readme -->", re.S)


def readme_sections(text: str) -> dict[str, str]:
    """The README's ``## `` sections by title, and ``"top"`` for what precedes the first one."""
    sections: dict[str, str] = {}
    title, lines = "top", []
    in_fence = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        if not in_fence and line.startswith("## "):
            sections[title] = "\n".join(lines).strip() + "\n"
            title, lines = line[3:].strip(), []
        elif in_fence or not (title == "top" and line.startswith("# ")):
            lines.append(line)
    sections[title] = "\n".join(lines).strip() + "\n"
    return sections


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- readme:" not in markdown:
        return markdown
    sections = readme_sections(README.read_text(encoding="utf-8"))

    def quote(m: re.Match) -> str:
        name, fallback = m["name"].strip(), m["fallback"]
        body = sections.get(name)
        if body is None:
            if fallback.strip():
                return fallback
            raise PluginError(f"{page.file.src_path}: README.md has no '## {name}' section to quote")
        return body.replace("](funcbnn-eval/", "](figures/evaluation/")

    return _BLOCK.sub(quote, markdown)
