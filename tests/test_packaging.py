"""Packaging: the sdist and wheel carry everything, and the wheel works on its own.

The wheel is built from a copy of the source (sdist first, wheel from the sdist, as
``python -m build`` does), installed **non-editable** into a fresh virtual environment and run
from an empty folder with no ``PYTHONPATH``. The fresh environment reuses this environment's
installed packages (torch etc.) through a ``.pth`` line that appends their folder to
``sys.path`` — a plain path line, so the project's own editable-install hooks there are not run
— and the test checks that every runtime requirement of the wheel resolves from them offline.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DIST_NAME = "torch-circuits"
# what `python -m build` needs; the package data is declared in pyproject.toml
SOURCE_FILES = ["pyproject.toml", "README.md", "CHANGELOG.md", "MANIFEST.in"]

pytest.importorskip("build", reason="the dev extra installs build")


def source_version() -> str:
    """``__version__`` as written in circuits/__init__.py (the one place it is written)."""
    tree = ast.parse((REPO / "circuits" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("circuits/__init__.py has no literal __version__")


def package_data_files() -> list[str]:
    """Non-Python files the installed package needs, relative to the repository."""
    files = ["circuits/py.typed"]
    for folder in ("circuits/models/weights", "circuits/figures/templates"):
        files += [str(p.relative_to(REPO)) for p in sorted((REPO / folder).iterdir()) if p.is_file()]
    return files


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(extra)
    return env


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """``{"sdist": ..., "wheel": ...}`` built from a clean copy of the source."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCE_FILES:
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "circuits", src / "circuits", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)], env=_clean_env(), timeout=600)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_version_is_written_once():
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert meta["project"]["name"] == DIST_NAME
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "circuits.__version__"}
    version = source_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]\d+|rc\d+|\.dev\d+|\.post\d+)?", version), version
    import circuits

    assert circuits.__version__ == version


def test_changelog_has_the_current_version():
    text = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"^## \[{re.escape(source_version())}\]", text, re.M), "CHANGELOG.md has no section for it"


def test_wheel_and_sdist_carry_the_package(dists):
    version = source_version()
    assert dists["wheel"].name == f"torch_circuits-{version}-py3-none-any.whl"
    assert dists["sdist"].name == f"torch_circuits-{version}.tar.gz"
    wheel = set(zipfile.ZipFile(dists["wheel"]).namelist())
    with tarfile.open(dists["sdist"]) as tar:
        prefix = f"torch_circuits-{version}/"
        sdist = {n[len(prefix):] for n in tar.getnames() if n.startswith(prefix)}
    modules = [str(p.relative_to(REPO)) for p in (REPO / "circuits").rglob("*.py") if "__pycache__" not in p.parts]
    needed = package_data_files() + modules
    assert "circuits/models/weights/fashion_inception.safetensors" in needed
    assert "circuits/models/weights/MODEL_CARD.md" in needed
    assert [f for f in needed if f not in wheel] == []
    assert [f for f in needed if f not in sdist] == []
    assert {"README.md", "CHANGELOG.md", "pyproject.toml"} <= sdist
    # the wheel carries the checkpoint byte for byte
    blob = zipfile.ZipFile(dists["wheel"]).read("circuits/models/weights/fashion_inception.safetensors")
    assert blob == (REPO / "circuits/models/weights/fashion_inception.safetensors").read_bytes()
    meta = zipfile.ZipFile(dists["wheel"]).read(f"torch_circuits-{version}.dist-info/METADATA").decode()
    assert f"Name: {DIST_NAME}\n" in meta and f"Version: {version}\n" in meta
    assert "Requires-Dist: torch" in meta
    entry = zipfile.ZipFile(dists["wheel"]).read(f"torch_circuits-{version}.dist-info/entry_points.txt").decode()
    assert "circuits = circuits.cli:main" in entry


def test_twine_check_passes(dists):
    pytest.importorskip("twine", reason="the dev extra installs twine")
    proc = _run([sys.executable, "-m", "twine", "check", "--strict", str(dists["sdist"]), str(dists["wheel"])],
                env=_clean_env(), timeout=300)
    assert proc.stdout.count("PASSED") == 2, proc.stdout


_CHECK_DEPS = r"""
import importlib.metadata as md, sys
from packaging.requirements import Requirement
dist = md.distribution("torch-circuits")
bad = []
for line in dist.requires or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        bad.append(f"{req}: not installed")
        continue
    if req.specifier and not req.specifier.contains(have, prereleases=True):
        bad.append(f"{req}: {have} installed")
import circuits
print(circuits.__file__)
print(dist.version, circuits.__version__)
print("BAD", bad)
"""


def _site_dirs() -> list[str]:
    """This interpreter's folders of installed packages (the project venv's, system ones if shared)."""
    dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    dirs |= {p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()}
    return sorted(d for d in dirs if Path(d).is_dir() and not Path(d).resolve().is_relative_to(REPO.resolve() / "circuits"))


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_venv(dists, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=300)
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   env=_clean_env()).stdout.strip()
    # plain path lines: the folders are appended to sys.path, their own .pth hooks are not run
    (Path(purelib) / "_reuse_installed.pth").write_text("\n".join(_site_dirs()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          "--force-reinstall", "--no-compile", str(dists["wheel"])], env=_clean_env(), timeout=600)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _clean_env(CIRCUITS_CACHE=str(tmp_path / "cache"), MPLBACKEND="Agg")
    lines = _run([str(python), "-c", _CHECK_DEPS], cwd=work, env=env, timeout=300).stdout.strip().splitlines()
    module_file, versions, bad = Path(lines[-3]), lines[-2].split(), lines[-1]
    assert module_file.resolve().is_relative_to(Path(purelib).resolve()), f"imported {module_file}, not the wheel"
    assert versions == [source_version()] * 2
    assert bad == "BAD []", f"runtime requirements that do not resolve offline: {bad}"
    assert (module_file.parent / "py.typed").is_file()

    circuits_cmd = venv / "bin" / "circuits"
    assert circuits_cmd.is_file(), "the wheel installs no `circuits` command"
    version = _run([str(circuits_cmd), "--version"], cwd=work, env=env, timeout=300).stdout
    assert source_version() in version
    layers = _run([str(circuits_cmd), "layers"], cwd=work, env=env, timeout=600).stdout
    assert re.search(r"^mixed3b\b", layers, re.M) and "parameters" in layers
    _run([str(circuits_cmd), "explore", "--layers", "mixed3a", "--steps", "2", "--per-layer", "1",
          "--no-dataset", "--out", "tmp", "--quiet"], cwd=work, env=env, timeout=900)
    index = work / "tmp" / "index.html"
    assert index.is_file() and "mixed3a" in index.read_text(encoding="utf-8")
    assert len(list((work / "tmp").rglob("*.html"))) >= 2
    assert not (work / "circuits").exists()
