"""The shape of the package (docs/ARCHITECTURE.md): no import cycles, the CLI on top of the
library and never below it, no private names across modules, a command line that starts
without torch, and public functions with real signatures and no test hooks."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "circuits"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _imports(module: str, path: Path, top_level_only: bool) -> list[tuple[str, list[str], int]]:
    """``[(imported module, imported names, line)]`` of ``module``'s import statements."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:  # `if TYPE_CHECKING:` imports are for type checkers only
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node.level, node.module)
            out.append((target, [a.name for a in node.names], node.lineno))
    return out


def test_no_import_cycles_at_module_level():
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for target, names, _ in _imports(m, path, top_level_only=True):
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in mods and cand != m:
                    graph[m].add(cand)
                    break
            # importing a submodule runs its package __init__ first
    cycles = []
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_library_never_imports_the_cli():
    offenders = []
    for m, path in _modules().items():
        if m.startswith("circuits.cli") or m == "circuits.__main__":
            continue
        for target, names, line in _imports(m, path, top_level_only=False):
            if target == "circuits.cli" or target.startswith("circuits.cli.") or (target == "circuits" and "cli" in names):
                offenders.append(f"{m}:{line}")
    assert not offenders, f"library modules import the CLI: {offenders}"


def test_no_private_names_imported_across_modules():
    mods = _modules()
    offenders = []
    for m, path in mods.items():
        for target, names, line in _imports(m, path, top_level_only=False):
            if not target.startswith("circuits"):
                continue
            for n in names:
                if n.startswith("_") and not n.endswith("__") and f"{target}.{n}" not in mods:  # a private *module* may be imported
                    offenders.append(f"{m}:{line} imports {target}.{n}")
    assert not offenders, "\n".join(offenders)


def test_command_line_starts_without_torch():
    code = (
        "import sys\n"
        "from circuits.cli import main\n"
        "for argv in (['--help'], ['explore', '--help'], ['atlas', '--help'], ['inspect', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "NO-TORCH"


def _public_callables():
    import circuits

    seen = []
    for modname in ["circuits"] + [f"circuits.{m}" for m in circuits._SUBMODULES]:
        mod = importlib.import_module(modname)
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if inspect.isfunction(obj) or inspect.isbuiltin(obj):
                seen.append((f"{modname}.{name}", obj))
    return seen


def test_public_functions_have_real_signatures_and_no_test_hooks():
    for qual, fn in _public_callables():
        params = list(inspect.signature(fn).parameters.values())
        kinds = [p.kind for p in params]
        assert kinds != [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD], f"{qual} hides its signature"
        assert not any(p.name in ("fail_once", "_test_hook") for p in params), f"{qual} has a test hook in its signature"


def test_lazy_top_level_exports_are_the_real_objects():
    import circuits
    from circuits.figures.pages import build_pages
    from circuits.models import resolve_model

    assert circuits.build_pages is build_pages and circuits.resolve_model is resolve_model
    assert "out_dir" in inspect.signature(circuits.build_pages).parameters
    assert set(circuits.__all__) <= set(dir(circuits))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        circuits.nope  # noqa: B018
