"""The documentation: the site builds strictly, the API reference is complete, every example runs.

* ``test_docs_site_builds`` runs ``mkdocs build --strict`` (warnings are errors: broken internal
  links and anchors, docstrings that document parameters the signature does not have) and
  ``test_api_reference_*`` compare the built reference with every public ``__all__``.
* Every fenced example of README.md and docs/**/*.md runs (issue 15 item 5, issue 16 item 6):
  Python blocks of one file run in order in one namespace (a subprocess per file, cwd a
  temporary folder, before the file's shell commands, which may use what they wrote); in shell blocks every ``circuits ...`` command (also ``.venv/bin/circuits``
  and ``python -m circuits``) runs as written, in a temporary folder per file that has
  ``configs/`` and ``experiments/`` of the repository, as in a clone. Other shell commands
  (``bash .ci/setup.sh``, ``pip install ...``, ``pytest``) are not run. A block with no language
  is checked as shell when a line starts with ``circuits``.

An HTML comment right above a fence changes what is checked (the reader does not see it):

* ``<!-- test: absent FILE ... -->`` — these files do not exist in this environment (the real
  ``inception5h.pth``). A command naming one must exit 2 with a one-line error naming the file;
  a Python block may fail only with an error naming the file, raised on a line naming it, with
  no code after that line.
* ``<!-- test: skip REASON -->`` — running is impossible here (e.g. hours of work): Python is
  compiled, each ``circuits`` command is parsed by the real argument parser.
  ``<!-- test: skip[circuits atlas] REASON -->`` does that only for the commands of the block
  that start with ``circuits atlas``.

Commands that fail because of known library bugs are listed in ``KNOWN_FAILURES`` below and
run as ``xfail(strict=True)``: the test fails as soon as they pass, so the entry gets removed.
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md"] + sorted((REPO / "docs").rglob("*.md"))

# Commands (as written in the docs, comments stripped) that fail today because of library bugs
# owned elsewhere; strict: the test fails once they are fixed, so this entry gets removed.
KNOWN_FAILURES: dict[str, str] = {}
# Subcommands that take more than a few seconds on the bundled model (CI runs them all).
SLOW_SUBCOMMANDS = {"explore", "run", "render", "figure", "inspect", "atlas"}
# Python examples that render feature visualizations or build pages (measured 30-70 s on the
# shared 2-core machine; CI runs them all).
SLOW_PYTHON = {"README.md", "docs/guide/feature-visualization.md", "docs/guide/neuron-pages.md",
               "docs/howto/atlas-ray.md", "docs/howto/own-model.md"}

PYTHON_LANGS = {"python", "py", "python3", "pycon"}
SHELL_LANGS = {"bash", "sh", "shell", "console", "shell-session"}


# ----------------------------------------------------------------------------- parsing


@dataclass
class Block:
    path: Path
    line: int  # 1-based line number of the first line of code
    lang: str  # "python" | "shell" | other
    code: str
    skip: str | None = None  # the reason, when the whole block is only parsed
    skip_commands: dict[str, str] = field(default_factory=dict)  # command prefix -> reason
    absent: list[str] = field(default_factory=list)

    def skip_reason(self, argv: list[str]) -> str | None:
        text = " ".join(["circuits", *argv])
        for prefix, reason in self.skip_commands.items():
            if text == prefix or text.startswith(prefix + " "):
                return reason
        return self.skip

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)[^\n]*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*test:\s*(\w[\w-]*)(?:\[([^\]]+)\])?\s*(.*?)\s*-->\s*$")


def parse_blocks(path: Path) -> list[Block]:
    """Fenced code blocks of a Markdown file with their ``<!-- test: ... -->`` directives."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence[0] * len(fence)):
            j += 1
        body = textwrap.dedent("\n".join(l[len(indent):] if l.startswith(indent) else l for l in lines[i + 1:j]))
        block = Block(path, i + 2, lang, body)
        k = i - 1
        while k >= 0 and _DIRECTIVE.match(lines[k]):
            kind, prefix, arg = _DIRECTIVE.match(lines[k]).groups()
            if kind == "skip":
                if not arg:
                    raise ValueError(f"{path.name}:{k + 1}: '<!-- test: skip -->' needs a reason")
                if prefix:
                    block.skip_commands[prefix.strip()] = arg
                else:
                    block.skip = arg
            elif kind == "absent":
                block.absent = arg.split()
            else:
                raise ValueError(f"{path.name}:{k + 1}: unknown test directive {kind!r} (skip, absent)")
            k -= 1
        if lang in PYTHON_LANGS:
            block.lang = "python"
        elif lang in SHELL_LANGS or (not lang and any(l.strip().startswith("circuits ") for l in body.splitlines())):
            block.lang = "shell"
        blocks.append(block)
        i = j + 1
    return blocks


def circuits_commands(block: Block) -> list[list[str]]:
    """The argument lists (after ``circuits``) of every circuits command in a shell block."""
    text = re.sub(r"\\\n", " ", block.code)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line, comments=True)
        segment: list[str] = []
        for w in words + ["&&"]:
            if w in ("&&", ";", "||"):
                argv = _circuits_argv(segment)
                if argv is not None:
                    out.append(argv)
                segment = []
            else:
                segment.append(w)
    return out


def _circuits_argv(words: list[str]) -> list[str] | None:
    if not words:
        return None
    if words[0] == "circuits" or words[0].endswith("/circuits"):
        return words[1:]
    if len(words) >= 3 and Path(words[0]).name.startswith("python") and words[1:3] == ["-m", "circuits"]:
        return words[3:]
    return None


def _all_blocks() -> list[Block]:
    return [b for p in DOC_FILES for b in parse_blocks(p)]


def _command_text(argv: list[str]) -> str:
    return " ".join(["circuits", *argv])


def _shell_cases():
    cases, seen = [], set()
    for block in _all_blocks():
        if block.lang != "shell":
            continue
        for argv in circuits_commands(block):
            key = (block.path, tuple(argv))
            if key in seen:  # the README names `circuits explore` twice: one run
                continue
            seen.add(key)
            text = _command_text(argv)
            marks = []
            if argv and argv[0] in SLOW_SUBCOMMANDS and not block.skip_reason(argv):
                marks.append(pytest.mark.slow)
            if text in KNOWN_FAILURES:
                marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[text]))
            cases.append(pytest.param(block, argv, marks=marks, id=f"{block.where} {text}"))
    return cases


def _python_cases():
    cases = []
    for path in DOC_FILES:
        blocks = [b for b in parse_blocks(path) if b.lang == "python"]
        if blocks:
            rel = str(path.relative_to(REPO))
            marks = [pytest.mark.slow] if rel in SLOW_PYTHON else []
            cases.append(pytest.param(path, blocks, marks=marks, id=rel))
    return cases


# ----------------------------------------------------------------------------- running


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["CIRCUITS_CACHE"] = str(cache)
    env["MPLBACKEND"] = "Agg"
    env.pop("CIRCUITS_EXPERIMENTS_DIR", None)
    return env


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """One working folder per documentation file (commands of one file build on each other)."""
    dirs: dict[Path, Path] = {}

    def get(path: Path) -> Path:
        if path not in dirs:
            d = tmp_path_factory.mktemp(path.stem.lower())
            for name in ("configs", "experiments"):
                (d / name).symlink_to(REPO / name, target_is_directory=True)
            dirs[path] = d
        return dirs[path]

    return get


@pytest.fixture(scope="module")
def doc_cache(tmp_path_factory):
    """A feature-visualization cache shared by the examples (as a user's would be)."""
    return tmp_path_factory.mktemp("doc-cache")


def test_examples_are_found():
    blocks = _all_blocks()
    readme = [b for b in blocks if b.path.name == "README.md"]
    assert any(b.lang == "python" for b in readme), "README.md has no Python example"
    assert sum(len(circuits_commands(b)) for b in readme if b.lang == "shell") >= 10
    for b in blocks:
        for name in b.absent:
            assert not (REPO / name).exists(), f"{b.where}: {name} is marked absent but exists"


def test_directives_are_parsed(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("<!-- test: absent a.pth -->\n```bash\ncircuits layers --model a.pth  # c\n"
                  "bash setup.sh && .venv/bin/circuits explore --out 'x y'\n```\n\n"
                  "<!-- test: skip takes hours -->\n```python\nprint(1)\n```\n"
                  "<!-- test: skip[circuits atlas] hours -->\n```\ncircuits nmf x\ncircuits atlas --out a\n```\n")
    blocks = parse_blocks(md)
    assert [b.lang for b in blocks] == ["shell", "python", "shell"]
    assert blocks[0].absent == ["a.pth"] and blocks[0].line == 3
    assert circuits_commands(blocks[0]) == [["layers", "--model", "a.pth"], ["explore", "--out", "x y"]]
    assert blocks[1].skip == "takes hours" and blocks[2].skip is None
    assert blocks[2].skip_reason(["atlas", "--out", "a"]) == "hours" and blocks[2].skip_reason(["nmf", "x"]) is None
    assert blocks[2].skip_reason(["atlasx"]) is None


_RUNNER = r'''
import json, sys, traceback
blocks = json.loads(sys.stdin.read())
ns = {"__name__": "__main__"}
for b in blocks:
    code = "\n" * (b["line"] - 1) + b["code"]
    filename = b["where"].rsplit(":", 1)[0]
    compiled = compile(code, filename, "exec")
    if b["skip"]:
        continue
    try:
        exec(compiled, ns)
    except Exception as exc:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
        line_no = frames[-1].lineno if frames else None
        src = code.splitlines()
        failing = src[line_no - 1] if line_no else ""
        rest = [l for l in src[line_no:] if l.strip() and not l.strip().startswith("#")] if line_no else ["?"]
        names = [n for n in b["absent"] if n in failing and n in str(exc)]
        if names and not rest:
            print(f"ABSENT {names[0]} at {filename}:{line_no}: {type(exc).__name__}: {exc}")
            continue
        traceback.print_exc()
        if b["absent"] and rest:
            print(f"{filename}:{line_no}: code after the line that needs {b['absent']} cannot run here; "
                  "move that line to the end of its block", file=sys.stderr)
        sys.exit(1)
print("OK")
'''


@pytest.mark.parametrize(("path", "blocks"), _python_cases())
def test_python_examples_run(path: Path, blocks: list[Block], workdirs, doc_cache):
    import json

    payload = json.dumps([{"where": b.where, "line": b.line, "code": b.code, "skip": b.skip, "absent": b.absent}
                          for b in blocks])
    proc = subprocess.run([sys.executable, "-c", _RUNNER], input=payload, cwd=workdirs(path),
                          env=_env(doc_cache), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{path.name}: an example failed:\n{proc.stderr[-4000:]}"
    assert proc.stdout.strip().endswith("OK")
    for b in blocks:
        for name in b.absent:
            assert f"ABSENT {name}" in proc.stdout, f"{b.where}: marked absent {name}, but nothing needed it"


@pytest.mark.parametrize(("block", "argv"), _shell_cases())
def test_shell_example_runs(block: Block, argv: list[str], workdirs, doc_cache):
    text = _command_text(argv)
    if block.skip_reason(argv):
        from circuits.cli import build_parser

        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:  # argparse's usage error
            pytest.fail(f"{block.where}: `{text}` does not parse: exit {exc.code}")
        return
    cwd = workdirs(block.path)
    proc = subprocess.run([sys.executable, "-m", "circuits", *argv], cwd=cwd, env=_env(doc_cache),
                          capture_output=True, text=True, timeout=1800)
    missing = [name for name in block.absent if name in argv]
    if missing:
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, f"{block.where}: `{text}` needs the absent {missing[0]}, exit {proc.returncode}: {proc.stderr[-2000:]}"
        assert len(err) == 1 and missing[0] in err[0], f"{block.where}: expected one error line naming {missing[0]}, got {err}"
        assert "not found" in err[0].lower() or "no such file" in err[0].lower(), err[0]
        return
    assert proc.returncode == 0, f"{block.where}: `{text}` exited {proc.returncode}:\n{proc.stderr[-3000:]}"


# ----------------------------------------------------------------------------- the site


def _api_hook():
    spec = importlib.util.spec_from_file_location("api_reference", REPO / "docs" / "hooks" / "api_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="the dev extra installs mkdocs")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=REPO, env=_env(tmp_path_factory.mktemp("cache")), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out


def test_docs_site_builds(site):
    assert (site / "index.html").is_file()
    for page in ("install", "guide/index", "howto/own-model", "api/index", "api/circuits"):
        assert (site / f"{page}.html").is_file(), page
    # offline: no page loads a script, font or stylesheet from elsewhere
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        remote = re.findall(r'<(?:script|link)[^>]+(?:src|href)="(https?://[^"]+)"', text)
        assert not remote, f"{page.relative_to(site)} loads {remote}"


def _public_all() -> dict[str, list[str]]:
    import importlib

    import circuits

    modules = ["circuits"] + [f"circuits.{n}" for n in circuits.__all__
                              if type(getattr(circuits, n)).__name__ == "module"]
    modules += [f"circuits.{p.name}" for p in (REPO / "circuits").iterdir()
                if (p / "__init__.py").is_file() and not p.name.startswith("_")]
    return {m: list(importlib.import_module(m).__all__) for m in sorted(set(modules))}


def test_api_reference_documents_every_public_name(site):
    """Every name of circuits.__all__ and of each public module's __all__ has an entry."""
    public = _public_all()
    assert {"circuits", "circuits.nmf", "circuits.inspect", "circuits.atlas"} <= set(public)
    missing = []
    for module, names in public.items():
        page = site / "api" / f"{module}.html"
        assert page.is_file(), f"no reference page for {module}"
        ids = set(re.findall(r'id="([^"]+)"', page.read_text(encoding="utf-8")))
        missing += [f"{module}.{n}" for n in names if f"{module}.{n}" not in ids]
    assert not missing, f"names without a reference entry: {missing}"


def test_api_reference_entries_have_docs_and_links_resolve(site):
    """Re-exports link to an entry that exists; fully documented names show their docstring."""
    hook = _api_hook()
    pages = hook.reference_entries()
    assert set(pages) >= set(_public_all())
    texts = {m: (site / "api" / f"{m}.html").read_text(encoding="utf-8") for m in pages}
    full = 0
    for module, entries in pages.items():
        for e in entries:
            if e.home is None:
                full += 1
                # a mkdocstrings heading for the object (its defining path or the anchor)
                assert f'id="{e.identifier}"' in texts[module] or f'id="{e.anchor}"' in texts[module]
            else:
                links = re.findall(rf'<a id="{re.escape(e.anchor)}"></a><a href="([^"]+)"', texts[module])
                assert links, f"{e.anchor}: no link to {e.home}"
                page, _, anchor = html.unescape(links[0]).partition("#")
                assert page == f"{e.home}.html"
                if anchor:
                    assert f'id="{anchor}"' in texts[e.home], f"{e.anchor} links to a missing {links[0]}"
    assert full >= 100


def test_api_reference_is_generated_from_all(monkeypatch):
    """A name added to an __all__ appears in the generated reference without editing any file."""
    import circuits.nmf

    hook = _api_hook()
    monkeypatch.setattr(circuits.nmf, "__all__", [*circuits.nmf.__all__, "ArrayLike"], raising=True)
    files = hook.generate()
    assert "::: circuits.nmf.ArrayLike" in files["api/circuits.nmf.md"]
    assert "api/circuits.inspect.md" in files and "api/circuits.featurevis.objectives.md" in files


def test_docstring_extension_splits_grouped_params_and_plain_roles():
    spec = importlib.util.spec_from_file_location("griffe_docstrings", REPO / "docs" / "hooks" / "griffe_docstrings.py")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    doc = "Do.\n\n    Args:\n        a: x\n        max_iter, tol / seed: as nmf,\n            more.\n        b: y\n\n    Returns:\n        x, y: z"
    out = ext.split_grouped_params(doc).splitlines()
    assert out[3:11] == ["        a: x", "        max_iter: as nmf,", "            more.", "        tol: as nmf,",
                         "            more.", "        seed: as nmf,", "            more.", "        b: y"]
    assert out[-1] == "        x, y: z"  # only parameter sections are rewritten
    assert ext.plain_roles("see :func:`nmf`, :class:`~circuits.nmf.NMFReducer`, :meth:`.fit`") == \
        "see `nmf`, `circuits.nmf.NMFReducer`, `fit`"
