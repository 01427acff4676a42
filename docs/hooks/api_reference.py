"""MkDocs hook: the API reference, generated from the package's ``__all__`` lists.

One page per public module (``circuits``, every module named in its ``__all__``, every
subpackage, and any module named in a documented module's ``__all__``), with one entry per
name in that module's ``__all__``. An object is documented in full once, on the page of its
home module (the deepest documented module it is defined under); every other ``__all__`` that
re-exports it gets a row linking there. Each entry carries the HTML id ``module.name``, which
``tests/test_docs.py`` checks against the ``__all__`` lists in the built site.

Nothing here is hand-maintained: a name added to an ``__all__`` appears on the next build.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

ROOT_PACKAGE = "circuits"
API_DIR = "api"
NAV_TITLE = "API reference"


@dataclass(frozen=True)
class Entry:
    """One name of one module's ``__all__`` on that module's page."""

    module: str  # the documented module whose __all__ lists the name
    name: str
    identifier: str  # what mkdocstrings collects (the object's defining path)
    home: Optional[str]  # documented module holding the full entry; None: in full on this page
    is_module: bool = False

    @property
    def anchor(self) -> str:
        return f"{self.module}.{self.name}"


def _import(name: str) -> ModuleType:
    return importlib.import_module(name)


def public_modules() -> list[str]:
    """Every module that gets a reference page, in a stable order (parents before children)."""
    root = _import(ROOT_PACKAGE)
    todo = [ROOT_PACKAGE]
    todo += [f"{ROOT_PACKAGE}.{info.name}" for info in pkgutil.iter_modules(root.__path__)
             if info.ispkg and not info.name.startswith("_")]
    seen: list[str] = []
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.append(name)
        module = _import(name)
        for attr in getattr(module, "__all__", ()):
            value = getattr(module, attr)
            if inspect.ismodule(value) and value.__name__.startswith(ROOT_PACKAGE + "."):
                todo.append(value.__name__)
    return sorted(seen, key=lambda m: (m.count("."), m))


def _defined_path(value: Any) -> Optional[str]:
    """``module.qualname`` where a class or function is defined (``None`` for other values)."""
    if not (inspect.isclass(value) or inspect.isroutine(value)):
        return None
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if not module or not qualname or "<" in qualname or not module.startswith(ROOT_PACKAGE):
        return None
    return f"{module}.{qualname}"


def reference_entries() -> dict[str, list[Entry]]:
    """``{module: [Entry, ...]}`` in ``__all__`` order, for every page of :func:`public_modules`."""
    modules = public_modules()
    exported = {m: {n: getattr(_import(m), n) for n in _import(m).__all__} for m in modules}

    def home_of(value: Any, defined: Optional[str]) -> Optional[str]:
        if defined is None:
            return None
        candidates = [m for m in modules if defined.startswith(m + ".")
                      and any(v is value for v in exported[m].values())]
        if candidates:
            return max(candidates, key=len)
        holders = [m for m in modules if any(v is value for v in exported[m].values())]
        return holders[0] if holders else None

    pages: dict[str, list[Entry]] = {}
    for m in modules:
        entries = []
        for name, value in exported[m].items():
            if inspect.ismodule(value):
                entries.append(Entry(m, name, value.__name__, home=value.__name__, is_module=True))
                continue
            defined = _defined_path(value)
            home = home_of(value, defined)
            identifier = defined or f"{m}.{name}"
            entries.append(Entry(m, name, identifier, home=None if home in (None, m) else home))
        pages[m] = entries
    return pages


def page_path(module: str) -> str:
    return f"{API_DIR}/{module}.md"


def _summary(value: Any) -> str:
    doc = inspect.getdoc(value) or ""
    line = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
    return line.replace("|", "\\|")


def page_markdown(module: str, entries: list[Entry], anchors: dict[str, str]) -> str:
    """The Markdown of one module's page; ``anchors`` maps ``module.name`` to a link target."""
    out = [f"# `{module}`", "", f"::: {module}", "    options:", "      members: false",
           "      show_root_heading: false", "      show_root_toc_entry: false", ""]
    linked = [e for e in entries if e.home is not None]
    full = [e for e in entries if e.home is None]
    if linked:
        out += ["## Re-exported names", "", "| name | documented in | summary |", "| --- | --- | --- |"]
        mod = _import(module)
        for e in linked:
            target = anchors.get(f"{e.home}.{e.name}") if not e.is_module else f"{e.home}.md"
            if target is None:  # re-exported under another name: link to the home page's entry
                target = next(t for k, t in anchors.items() if k.startswith(e.home + ".") and
                              getattr(_import(e.home), k[len(e.home) + 1:], None) is getattr(mod, e.name))
            where = f"`{e.home}`"
            out.append(f'| <a id="{e.anchor}"></a>[`{e.name}`]({target}) | {where} | {_summary(getattr(mod, e.name))} |')
        out.append("")
    for e in full:
        if e.identifier != e.anchor:
            out.append(f'<a id="{e.anchor}"></a>')
            out.append("")
        out += [f"::: {e.identifier}", "    options:", "      heading_level: 2", ""]
    return "\n".join(out)


def index_markdown(modules: list[str]) -> str:
    out = ["# API reference", "",
           "Generated from the docstrings of every name in each public module's `__all__` "
           "(the import name is `circuits`; the distribution is `torch-circuits`).", "",
           "| module | summary |", "| --- | --- |"]
    for m in modules:
        out.append(f"| [`{m}`]({m}.md) | {_summary(_import(m))} |")
    return "\n".join(out) + "\n"


def _anchor_targets(pages: dict[str, list[Entry]]) -> dict[str, str]:
    """``module.name`` → ``page.md#id`` for every fully documented entry."""
    targets = {}
    for m, entries in pages.items():
        for e in entries:
            if e.home is None:
                targets[e.anchor] = f"{m}.md#{e.anchor}"
    return targets


def generate() -> dict[str, str]:
    """``{docs-relative path: Markdown}`` for the whole reference."""
    pages = reference_entries()
    anchors = _anchor_targets(pages)
    files = {f"{API_DIR}/index.md": index_markdown(list(pages))}
    for m, entries in pages.items():
        files[page_path(m)] = page_markdown(m, entries, anchors)
    return files


# ----------------------------------------------------------------------------- MkDocs events

_generated: dict[str, str] = {}


def on_config(config):
    repo = str(Path(config.config_file_path).resolve().parent)
    if repo not in sys.path:
        sys.path.insert(0, repo)
    _generated.clear()
    _generated.update(generate())
    section = [{"Overview": f"{API_DIR}/index.md"}]
    section += [{path[len(API_DIR) + 1:-3]: path} for path in _generated if path != f"{API_DIR}/index.md"]
    nav = config.nav or []
    for i, item in enumerate(nav):
        if isinstance(item, dict) and NAV_TITLE in item:
            nav[i] = {NAV_TITLE: section}
            break
    else:
        nav.append({NAV_TITLE: section})
    config.nav = nav
    return config


def on_files(files, config):
    from mkdocs.structure.files import File

    for path, text in _generated.items():
        files.append(File.generated(config, path, content=text))
    return files
