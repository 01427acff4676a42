"""Griffe extension: read the project's docstrings as written.

* ``a, b, c: text`` (or ``a / b: text``) in an ``Args:`` section documents each name. The
  docstrings group parameters that share a description (``max_iter, tol, seed: as
  :func:`nmf`.``); Google-style parsing would read that as one unknown parameter, so it is
  split into one line per name before parsing, and griffe still warns (and the strict docs
  build fails) when a documented parameter is not in the signature.
* Sphinx roles (``:func:`nmf```, ``:class:`~circuits.nmf.NMFReducer```) become inline code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Keyword Arguments|Other Parameters):\s*$")
_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|data|attr|exc|obj|const):`~?\.?([^`]+)`")
_GROUPED = re.compile(r"^(\s+)([A-Za-z_*]\w*(?:\s*[,/]\s*[A-Za-z_*]\w*)+)\s*:(.*)$")


def split_grouped_params(text: str) -> str:
    """Rewrite grouped parameter items of Google-style sections into one item per parameter."""
    lines = text.splitlines()
    out: list[str] = []
    section_indent: int | None = None
    item_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        header = _SECTION.match(line)
        if header:
            section_indent, item_indent = len(header.group(1)), None
            out.append(line)
            continue
        if section_indent is not None and line.strip():
            indent = len(line) - len(line.lstrip())
            if indent <= section_indent:
                section_indent = item_indent = None
            elif item_indent is None:
                item_indent = indent
        grouped = _GROUPED.match(line) if section_indent is not None else None
        if not grouped or len(grouped.group(1)) != item_indent:
            out.append(line)
            continue
        continuation = []
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > item_indent):
            if not lines[i].strip() and (i + 1 >= len(lines) or len(lines[i + 1]) - len(lines[i + 1].lstrip()) <= item_indent):
                break
            continuation.append(lines[i])
            i += 1
        for name in (n.strip() for n in re.split(r"[,/]", grouped.group(2))):
            out.append(f"{grouped.group(1)}{name}:{grouped.group(3)}")
            out.extend(continuation)
    return "\n".join(out)


def plain_roles(text: str) -> str:
    """``:func:`name``` → ```name``` (Markdown inline code)."""
    return _ROLE.sub(lambda m: f"`{m.group(1)}`", text)


class ProjectDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and not obj.is_alias:
            obj.docstring.value = plain_roles(split_grouped_params(obj.docstring.value))
