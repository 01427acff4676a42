"""The atlas under concurrency, kills and refusals: one run per folder (locks), leftovers of
killed runs, read-only stores, ``threads``, and the dry run's estimate.

The runs are tiny atlases of the bundled FashionInception (a few ``mixed3a`` neurons, 1 step).
Several tests start real processes (``python -c`` with this checkout on ``PYTHONPATH``): two
runs at once, a run killed mid-task, a write killed mid-file, a run without the permission
to override file modes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from circuits.atlas import (
    AtlasLockedError,
    FolderLock,
    LockHolder,
    StoreNotWritableError,
    build_atlas,
    clean_leftovers,
)
from circuits.atlas.lock import LOCK_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(neurons=4, upstream_renders="none", dataset=None, steps=1, top_k=2)
SMALL = dict(neurons=8, upstream_renders="none", steps=2, top_k=2, dataset_size=32, n_examples=2)


@pytest.fixture(scope="module")
def model():
    from circuits.models import load_model

    return load_model().eval()


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(extra)
    return env


def _python(code: str, *args: str, prefix: tuple[str, ...] = (), timeout: float = 600, **env: str
            ) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=_env(**env), timeout=timeout, cwd=ROOT)


def _npz(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.npz"))


# ----------------------------------------------------------------------------- the lock itself


def test_folder_lock_excludes_reports_and_releases(tmp_path):
    with FolderLock(tmp_path / "a") as lock:
        assert lock.held and (tmp_path / "a" / LOCK_NAME).is_file()
        holder = LockHolder.read(tmp_path / "a" / LOCK_NAME)
        assert holder.pid == os.getpid() and holder.host == socket.gethostname()
        # a second lock on the same folder (even in this process) is refused, naming the holder
        with pytest.raises(AtlasLockedError) as err:
            FolderLock(tmp_path / "a").acquire()
        text = str(err.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in text and "holding it for" in text
        assert "--wait" in text and str(tmp_path / "a") in text and err.value.holder.pid == os.getpid()
        # waiting a bounded time says how long it waited
        t0 = time.monotonic()
        with pytest.raises(AtlasLockedError, match="still held after waiting"):
            FolderLock(tmp_path / "a", wait=0.4).acquire()
        assert time.monotonic() - t0 >= 0.4
        # another folder is free
        with FolderLock(tmp_path / "b"):
            pass
    assert not (tmp_path / "a" / LOCK_NAME).exists() and not (tmp_path / "b" / LOCK_NAME).exists()
    # waiting without a bound: the lock comes free after 0.5 s
    first = FolderLock(tmp_path / "a")
    first.acquire()
    messages: list[str] = []
    threading.Timer(0.5, first.release).start()
    t0 = time.monotonic()
    with FolderLock(tmp_path / "a", wait=True, on_wait=messages.append) as second:
        assert second.held and time.monotonic() - t0 >= 0.45
    assert len(messages) == 1 and f"pid {os.getpid()}" in messages[0]
    assert len(second.notes) == 1 and second.notes[0].startswith("waited ") and f"pid {os.getpid()}" in second.notes[0]
    for bad in (-1, "soon", None):
        with pytest.raises(ValueError, match="wait"):
            FolderLock(tmp_path / "c", wait=bad)


def test_folder_lock_heartbeat_and_other_hosts(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    path = folder / LOCK_NAME
    # a run on another host that is alive (fresh heartbeat) is respected ...
    record = {"pid": 4242, "host": "elsewhere.example", "started": time.time() - 3600, "command": "circuits atlas"}
    path.write_text(json.dumps(record))
    with pytest.raises(AtlasLockedError, match="pid 4242 on elsewhere.example, holding it for 1 h 00 min"):
        FolderLock(folder).acquire()
    # ... and taken over with a note once its heartbeat is older than stale_after
    old = time.time() - 600
    os.utime(path, (old, old))
    with FolderLock(folder, stale_after=300) as lock:
        assert len(lock.notes) == 1 and "pid 4242 on elsewhere.example" in lock.notes[0]
        assert "ended without releasing it" in lock.notes[0]
        assert LockHolder.read(path).pid == os.getpid()
    # the holder's heartbeat keeps the file fresh
    with FolderLock(folder, heartbeat=0.1):
        os.utime(path, (old, old))
        time.sleep(0.6)
        assert time.time() - path.stat().st_mtime < 5


def test_folder_lock_without_os_locks_goes_by_pid(tmp_path, monkeypatch):
    """On a file system without flock, the pid decides for a holder on this host."""
    import circuits.atlas.lock as lock_module

    monkeypatch.setattr(lock_module, "_try_lock", lambda fd: None)
    folder = tmp_path / "nolocks"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": host, "started": time.time()}))
    with FolderLock(folder) as lock:
        assert f"pid {dead.pid} on {host}" in lock.notes[0] and "ended without releasing it" in lock.notes[0]
        with pytest.raises(AtlasLockedError, match=f"pid {os.getpid()} on"):  # alive: this process
            FolderLock(folder).acquire()
    assert not (folder / LOCK_NAME).exists()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": host, "started": time.time()}))
    with pytest.raises(AtlasLockedError, match=f"pid {os.getppid()} on"):
        FolderLock(folder).acquire()


def test_clean_leftovers_only_touches_atomic_write_names(tmp_path):
    from circuits._io import atomic_path

    keep = [tmp_path / "x.html", tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / "a" / ".cfg.tmp"]
    gone = [tmp_path / ".x.html.abcd1234.tmp", tmp_path / "a" / "b" / f".k.npz.{'f' * 32}.tmp",
            tmp_path / ".write-test-q1w2e3r4"]
    other_run = tmp_path / "nested-atlas"
    other = [other_run / ".p.png.zz99yy88.tmp"]
    for p in keep + gone + other:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    (other_run / LOCK_NAME).write_text("{}")
    with atomic_path(tmp_path / "young" / "y.npz"):  # a temporary file made by the atomic write itself
        made = list((tmp_path / "young").iterdir())
        assert len(made) == 1 and made[0].name.startswith(".y.npz.") and made[0].name.endswith(".tmp")
        assert clean_leftovers(tmp_path, min_age=30) == [] and made[0].exists()  # too young: maybe being written
    young = tmp_path / "young" / ".y.npz.abcdefgh.tmp"
    young.write_text("x")
    assert clean_leftovers(tmp_path, min_age=30) == []
    old = time.time() - 60
    for p in gone + [young]:
        os.utime(p, (old, old))
    removed = clean_leftovers(tmp_path, min_age=30)
    assert sorted(removed) == sorted(gone + [young])
    assert all(p.exists() for p in keep + other)
    assert clean_leftovers(tmp_path, held=[other_run]) == other  # a folder whose lock the caller holds is entered


# ----------------------------------------------------------------------------- build_atlas and the lock


def test_build_atlas_refuses_or_waits_for_a_held_folder(model, tmp_path):
    out, store = tmp_path / "out", tmp_path / "store"
    with FolderLock(out):
        with pytest.raises(AtlasLockedError, match="is in use by another atlas run") as err:
            build_atlas(model, ["mixed3a"], out, progress=False, **TINY)
        assert err.value.folder == out.resolve() and err.value.holder.pid == os.getpid()
        assert not (out / "plan.json").exists()  # refused before any work
    with FolderLock(store):  # the store is locked too (another run with another out folder)
        with pytest.raises(AtlasLockedError) as err:
            build_atlas(model, ["mixed3a"], tmp_path / "out2", cache=store, progress=False, **TINY)
        assert err.value.folder == store.resolve()
        assert not (tmp_path / "out2" / LOCK_NAME).exists()  # the out folder's lock was given back
    holder = FolderLock(out)
    holder.acquire()
    threading.Timer(1.0, holder.release).start()
    t0 = time.monotonic()
    result = build_atlas(model, ["mixed3a"], out, cache=store, progress=False, wait=True, **TINY)
    assert time.monotonic() - t0 >= 0.9 and result.completed and result.report.rendered == 4
    assert not (out / LOCK_NAME).exists() and not (store / LOCK_NAME).exists()
    assert len(result.notes) == 1 and result.notes[0].startswith("waited ") and str(out.resolve()) in result.notes[0]


_CONCURRENT = """
import json, sys, time
from pathlib import Path
from circuits.atlas import AtlasLockedError, build_atlas
from circuits.models import load_model
out, ready, go, mode, report = sys.argv[1:6]
model = load_model().eval()
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.01)
try:
    r = build_atlas(model, ["mixed3a"], out, progress=False, wait=mode == "wait", threads=1, neurons=6,
                    upstream_renders="none", dataset=None, steps=1, top_k=2)
    res = {"ok": True, "rendered": r.report.rendered, "pages_rendered": r.pages_rendered,
           "tasks_run": r.report.tasks_run, "pages_built": r.pages_built, "completed": r.completed, "notes": r.notes}
except AtlasLockedError as exc:
    res = {"ok": False, "error": str(exc)}
Path(report).write_text(json.dumps(res))
"""


def test_concurrent_runs_into_one_folder_render_each_image_once(model, tmp_path):
    """Three processes start the same atlas into one folder at the same moment (after their
    imports, at a barrier): two wait for the lock, one refuses if it finds it taken. Every
    image is rendered once in total, and the finished atlas is the one a lone run makes."""
    out = tmp_path / "atlas"
    go = tmp_path / "go"
    modes = ["wait", "wait", "refuse"]
    procs = []
    for i, mode in enumerate(modes):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _CONCURRENT, str(out), str(tmp_path / f"ready{i}"), str(go), mode,
             str(tmp_path / f"report{i}.json")], env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    try:
        deadline = time.monotonic() + 400
        while not all((tmp_path / f"ready{i}").exists() for i in range(len(modes))):
            assert time.monotonic() < deadline, "the processes did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
            time.sleep(0.05)
        go.touch()
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    reports = [json.loads((tmp_path / f"report{i}.json").read_text()) for i in range(len(modes))]
    assert reports[0]["ok"] and reports[1]["ok"] and reports[0]["completed"] and reports[1]["completed"]
    done = [r for r in reports if r["ok"]]
    refused = [r for r in reports if not r["ok"]]
    for r in refused:
        assert "is in use by another atlas run (pid " in r["error"] and "--wait" in r["error"]
    waited = [r for r in done if any(n.startswith("waited ") for n in r["notes"])]
    assert len(waited) + len(refused) >= 1  # they did meet at the lock (each run takes seconds; they start together)
    # each image once: what the runs say they rendered is what the cache holds, and no more
    images = _npz(out / "cache")
    fv = [p for p in images if "atlas-tasks" not in p.parts]
    assert sum(r["rendered"] + r["pages_rendered"] for r in done) == len(fv) > 6
    assert sum(r["tasks_run"] for r in done) == 2  # one tables task and one render task, once
    assert sum(r["pages_built"] for r in done) == 1
    # the same atlas as a lone run makes
    alone = build_atlas(model, ["mixed3a"], tmp_path / "alone", progress=False, threads=1, neurons=6,
                        upstream_renders="none", dataset=None, steps=1, top_k=2)
    assert alone.report.rendered + alone.pages_rendered == len(fv)
    pages = sorted(str(p.relative_to(out / "pages")) for p in (out / "pages").rglob("*.html"))
    assert pages == sorted(str(p.relative_to(tmp_path / "alone" / "pages")) for p in (tmp_path / "alone" / "pages").rglob("*.html"))
    assert not list(out.rglob(LOCK_NAME)) and not list(out.rglob("*.tmp"))


_KILL_MID_WRITE = """
import os, sys
from pathlib import Path
from circuits._io import atomic_path
from circuits.atlas import FolderLock
out = Path(sys.argv[1])
lock = FolderLock(out)
lock.acquire()
with atomic_path(out / "pages" / "layers" / "mixed3a" / "0.html") as tmp:
    tmp.write_text("<html>half a page")
    os._exit(9)  # killed mid-write: the lock file and the temporary file stay behind
"""


def test_killed_runs_leave_nothing_that_blocks_or_lingers(model, tmp_path):
    out = tmp_path / "atlas"
    # 1. a run killed in the middle of its tasks (its process dies, as on SIGKILL)
    fail_dir = tmp_path / "fail"
    proc = _python(
        "import sys; from circuits.atlas import build_atlas; from circuits.models import load_model; "
        "build_atlas(load_model(), ['mixed3a'], sys.argv[1], progress=False, neurons=4, upstream_renders='none', "
        "dataset=None, steps=1, top_k=2)", str(out), CIRCUITS_ATLAS_FAIL_ONCE=f"{fail_dir}::render-*::exit")
    assert proc.returncode == 1 and (fail_dir / "render-mixed3a-000.failed").is_file()
    killed = LockHolder.read(out / LOCK_NAME)
    assert killed is not None and killed.pid != os.getpid() and (out / "cache" / LOCK_NAME).is_file()
    # 2. a write killed mid-file, by the atomic write itself
    proc = _python(_KILL_MID_WRITE, str(out))
    assert proc.returncode == 9, proc.stderr
    leftovers = list(out.rglob("*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].read_text() == "<html>half a page"
    planted = out / "cache" / "ab" / ".abcdef.npz.k2j4h6g8.tmp"  # one in the store too
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"half")
    # the next run takes the locks over, says so, removes the leftovers and finishes the atlas
    result = build_atlas(model, ["mixed3a"], out, progress=False, **TINY)
    assert result.completed and result.report.tasks_skipped == 1 and result.report.rendered == 4
    notes = "\n".join(result.notes)
    assert "took over the lock" in notes and "ended without releasing it" in notes
    assert "removed 2 unfinished temporary file(s)" in notes and str(leftovers[0]) in notes
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(LOCK_NAME))
    assert (out / "pages" / "layers" / "mixed3a" / f"{result.plan.neurons['mixed3a'][0]}.html").is_file()


# ----------------------------------------------------------------------------- read-only stores


def _without_override() -> tuple[str, ...]:
    """A command prefix under which file permissions hold (root ignores them)."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file permissions cannot be made to hold for a test")
    return (setpriv, "--bounding-set=-dac_override,-dac_read_search", "--")


_CLI = "import sys; from circuits.cli import main; sys.exit(main(sys.argv[1:]))"


def test_read_only_store_is_refused_before_work_with_what_to_do(model, tmp_path):
    """A store that refuses writes stops the run at once (exit 2) with the store, the reason and
    the way out; a store that becomes read-only mid-run says running again will not help."""
    prefix = _without_override()
    store = tmp_path / "ro-store"
    store.mkdir()
    argv = ["atlas", "--layers", "mixed3a", "--per-layer", "4", "--steps", "1", "--top-k", "2", "--no-dataset",
            "--no-upstream-renders", "--quiet", "--out", str(tmp_path / "out"), "--cache", str(store)]
    read_only = [store]
    try:
        store.chmod(0o555)
        proc = _python(_CLI, *argv, prefix=prefix)
        assert proc.returncode == 2, proc.stderr
        err = proc.stderr.strip()
        assert len(err.splitlines()) == 1 and err.startswith("circuits: error: cannot write to the atlas result store")
        assert str(store) in err and "permission denied" in err and "--cache" in err and "run again" not in err
        assert not _npz(tmp_path) and not (tmp_path / "out" / "pages").exists()
        # read-only below the root: the check at the start passes, the first image fails to be saved
        store.chmod(0o755)
        first = build_atlas(model, ["mixed3a"], tmp_path / "out", cache=store, progress=False, max_tasks=1,
                            neurons=4, upstream_renders="none", dataset=None, steps=1, top_k=2)
        assert first.report.tasks_run == 1 and first.plan.tasks[0].kind == "tables"
        model_dir = store / first.plan.model_hash
        model_dir.mkdir()
        read_only.append(model_dir)
        model_dir.chmod(0o555)
        proc = _python(_CLI, *argv, prefix=prefix)
        assert proc.returncode == 2, proc.stderr
        err = proc.stderr.strip()
        assert "cannot write to the atlas result store" in err and "task render-mixed3a-000" in err
        assert "running again fails the same way until you choose another store with --cache" in err
        assert len(err.splitlines()) == 1
        assert not list(model_dir.iterdir())
    finally:
        for p in read_only:
            p.chmod(0o755)


def test_read_only_url_store(model, tmp_path):
    """An fsspec store that refuses writes: the same precheck, naming the URL."""
    fsspec = pytest.importorskip("fsspec")
    from fsspec.implementations.local import LocalFileSystem

    class ReadOnlyFileSystem(LocalFileSystem):
        protocol = "readonlytest"

        def _open(self, path, mode="rb", **kwargs):
            if "r" not in mode:
                raise PermissionError(13, "Permission denied", path)
            return super()._open(path, mode, **kwargs)

    fsspec.register_implementation("readonlytest", ReadOnlyFileSystem, clobber=True)
    url = f"readonlytest://{tmp_path / 'remote'}"
    with pytest.raises(StoreNotWritableError) as err:
        build_atlas(model, ["mixed3a"], tmp_path / "out", cache=url, progress=False, **TINY)
    text = str(err.value)
    assert url in text and "permission denied" in text and "--cache" in text
    assert not _npz(tmp_path)


# ----------------------------------------------------------------------------- threads


def test_threads_hold_for_every_task_and_are_restored(model, tmp_path):
    """``threads=2``: every task runs with 2 torch threads — the tables task's NMF changes torch's
    count (numba's OpenMP), the engine sets it again — and the caller's count is restored."""
    before = torch.get_num_threads()
    result = build_atlas(model, ["mixed3a"], tmp_path / "a", progress=False, threads=2, **TINY)
    assert result.report.threads == 2 and [r["threads"] for r in result.report.results] == [2, 2]
    assert torch.get_num_threads() == before == 1
    assert "2 torch thread(s) per task" in str(result.report)
    # the default keeps the caller's count for every task
    result = build_atlas(model, ["mixed3b"], tmp_path / "b", progress=False, **TINY)
    assert [r["threads"] for r in result.report.results] == [1, 1]
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            build_atlas(model, ["mixed3a"], tmp_path / "c", progress=False, threads=bad, **TINY)


def test_cli_threads_and_wait(model, tmp_path, capsys):
    from circuits.cli import main

    argv = ["atlas", "--layers", "mixed3a", "--per-layer", "2", "--steps", "1", "--top-k", "2", "--no-dataset",
            "--no-upstream-renders", "--quiet", "--out", str(tmp_path / "a")]
    assert main(argv + ["--threads", "2"]) == 0
    assert "(2 torch thread(s) per task)" in capsys.readouterr().out and torch.get_num_threads() == 1
    with FolderLock(tmp_path / "a"):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("circuits: error:") and "in use by another atlas run" in err and len(err.splitlines()) == 1
        assert main(argv + ["--wait", "0.3"]) == 2
        assert "still held after waiting" in capsys.readouterr().err
    assert main(argv + ["--wait"]) == 0
    assert main(argv + ["--wait", "soon"]) == 2


# ----------------------------------------------------------------------------- the estimate


def test_dry_run_estimates_every_part_and_writes_nothing(model, tmp_path):
    """The estimate covers planning, start-up, tables, examples, renders and pages, from real
    runs in a temporary folder; nothing lands in the store. (How close it comes to real runs is
    measured by ``python -m benchmarks atlas --estimate``, not here: timings on a shared machine
    are not a unit test.)"""
    out = tmp_path / "dry"
    # the inputs shown are rendered by the pages (not planned): the estimate counts those renders too
    dry = build_atlas(model, ["mixed3a"], out, dry_run=True, progress=False, **SMALL)
    est = dry.estimate
    assert est.tasks == {"tables": 1, "examples": 1, "render": 1} and est.pending == est.tasks
    assert set(est.seconds) == {"plan", "start-up", "tables", "examples", "render", "pages"}
    assert all(est.seconds[k] > 0 for k in ("plan", "tables", "examples", "render", "pages"))
    assert est.total_seconds == pytest.approx(sum(est.seconds.values()))
    assert est.task_seconds == pytest.approx(est.seconds["tables"] + est.seconds["examples"] + est.seconds["render"])
    assert est.threads == 1 and est.pages_files > 8 * 3
    assert not _npz(out) and (out / "plan.json").is_file() and not (out / "pages").exists()
    assert "estimated run time" in str(est) and "pages" in str(est)
    # the run it estimates; then nothing is left to do and the estimate says so
    run = build_atlas(model, ["mixed3a"], out, progress=False, **SMALL)
    assert run.completed
    again = build_atlas(model, ["mixed3a"], out, dry_run=True, progress=False, **SMALL).estimate
    assert again.pending == {"tables": 0, "examples": 0, "render": 0}
    assert again.seconds["render"] == again.seconds["tables"] == again.seconds["examples"] == again.seconds["pages"] == 0
    # more steps than the calibration runs: extrapolated (redirected-ReLU steps apart from the others)
    short = build_atlas(model, ["mixed3a"], tmp_path / "s", dry_run=True, progress=False, pages=False, **TINY).estimate
    long = build_atlas(model, ["mixed3a"], tmp_path / "l", dry_run=True, progress=False, pages=False,
                       calibration_steps=2, **dict(TINY, steps=40)).estimate
    assert short.seconds["pages"] == long.seconds["pages"] == 0 and long.seconds_per_step["mixed3a"] > 0
    assert long.seconds["render"] > 3 * short.seconds["render"] > 0  # 40 steps against 1
    with pytest.raises(ValueError, match="calibration_steps"):
        build_atlas(model, ["mixed3a"], out, dry_run=True, progress=False, calibration_steps=0, **TINY)
