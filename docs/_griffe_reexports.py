"""Griffe extension: document each public name once, where it is defined.

Packages re-export names from their submodules (``funcbnn.families`` exports
``diag_gaussian`` from ``funcbnn.families.diag_gaussian``). mkdocstrings would
render every export again on the package's page; this extension hides an
imported name whose source is itself a public module (rendered on its own
page), and keeps those imported from private modules (``funcbnn._engine``),
whose only documented home is the re-export. It also rewrites two pieces of
reStructuredText that Markdown would print verbatim: Sphinx roles
(``:func:`x```) become code spans, and the ``::`` that introduces an indented
literal block becomes ``:`` (the indented block is a code block in Markdown too).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):`~?([^`]+)`")
_LITERAL = re.compile(r"(?m)(\S)::$|^[ \t]*::$")


def _markdown(text: str) -> str:
    text = _ROLE.sub(r"``\1``", text)
    return _LITERAL.sub(lambda m: f"{m.group(1)}:" if m.group(1) else "", text)


def _public_module(path: str) -> bool:
    return not any(part.startswith("_") for part in path.split("."))


class HideReexports(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._visit(pkg)

    def _visit(self, obj: griffe.Object) -> None:
        for member in list(obj.members.values()):
            if member.is_alias:
                source = member.target_path.rsplit(".", 1)[0]
                if obj.is_module and source != obj.path and _public_module(source):
                    member.public = False
                continue
            if member.docstring is not None:
                member.docstring.value = _markdown(member.docstring.value)
            if member.is_module or member.is_class:
                self._visit(member)
        if obj.docstring is not None:
            obj.docstring.value = _markdown(obj.docstring.value)
