"""Griffe extension: ``a, b, c: text`` (or ``a / b: text``) in an ``Args:`` section documents each name.

The project's docstrings group parameters that share a description (``max_iter, tol, seed:
as :func:`nmf`.``). Google-style parsing would read that as one unknown parameter; this
splits it into one line per name before parsing, so griffe still warns (and the strict docs
build fails) when a documented parameter is not in the signature.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Keyword Arguments|Other Parameters):\s*$")
_GROUPED = re.compile(r"^(\s+)([A-Za-z_*]\w*(?:\s*[,/]\s*[A-Za-z_*]\w*)+)\s*:(.*)$")


def split_grouped_params(text: str) -> str:
    """Rewrite grouped parameter lines of Google-style sections into one line per parameter."""
    out: list[str] = []
    section_indent: int | None = None
    item_indent: int | None = None
    for line in text.splitlines():
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
        if grouped and len(grouped.group(1)) == item_indent:
            names = [n.strip() for n in re.split(r"[,/]", grouped.group(2))]
            out.extend(f"{grouped.group(1)}{name}:{grouped.group(3)}" for name in names)
        else:
            out.append(line)
    return "\n".join(out)


class GroupedParams(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and not obj.is_alias:
            obj.docstring.value = split_grouped_params(obj.docstring.value)
