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
to the copies under ``docs/figures/evaluation/``; other relative links (files of
the repository, outside the site) become their text and path.

``<!-- api: funcbnn.__all__ -->`` becomes a table of the top-level names, each
linked to the entry where it is documented (the module that defines it), with
the first line of its docstring; a name whose entry is missing fails the strict
build (an unresolved cross-reference).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

README = Path(__file__).resolve().parent.parent / "README.md"
_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):`~?([^`]+)`")
_REPO_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\((?!https?://|#|figures/|mailto:)([^)\s]+)\)")
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


def _home(name: str, obj: object, modules: list) -> str:
    """The reference entry that documents ``obj``, exported from ``funcbnn`` as ``name``."""
    if inspect.ismodule(obj):
        return obj.__name__
    module = getattr(obj, "__module__", None) or ""
    public = not any(part.startswith("_") for part in module.split("."))
    if (inspect.isclass(obj) or inspect.isfunction(obj)) and public:
        return f"{module}.{obj.__qualname__}"
    # Data, and objects defined in private modules: the deepest public module that exports this very object.
    for mod in sorted(modules, key=lambda m: -m.__name__.count(".")):
        if name in getattr(mod, "__all__", ()) and getattr(mod, name) is obj:
            return f"{mod.__name__}.{name}"
    return f"funcbnn.{name}"


def top_level_table() -> str:
    import funcbnn

    modules = [funcbnn] + [
        importlib.import_module(m.name)
        for m in pkgutil.walk_packages(funcbnn.__path__, "funcbnn.")
        if not any(part.startswith("_") for part in m.name.split(".")[1:])
    ]
    rows = ["| name | what |", "|---|---|"]
    for name in funcbnn.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(funcbnn, name)
        described = obj if callable(obj) or inspect.ismodule(obj) else type(obj)   # a registry: its class
        doc = (inspect.getdoc(described) or "").strip().split("\n")[0]
        doc = _ROLE.sub(r"`\1`", doc).replace("``", "`").rstrip(":")
        rows.append(f"| [`funcbnn.{name}`][{_home(name, obj, modules)}] | {doc} |")
    return "\n".join(rows) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- api: funcbnn.__all__ -->" in markdown:
        markdown = markdown.replace("<!-- api: funcbnn.__all__ -->", top_level_table())
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
        body = body.replace("](funcbnn-eval/", "](figures/evaluation/")
        # Other relative links point into the repository, outside the site: keep the text, show the path.
        return _REPO_LINK.sub(lambda link: f"{link[1]} (`{link[2]}`)", body)

    return _BLOCK.sub(quote, markdown)
