"""One atlas run per folder: a lock file per output folder and per local store, and the clean-up
of what an interrupted run left behind.

::

    with FolderLock("atlas/") as lock:      # AtlasLockedError if another run holds it
        ...
    with FolderLock("atlas/", wait=True):   # or wait until the other run is done
        ...

The lock is ``<folder>/.circuits-atlas.lock``. The run that holds it keeps it open with an
exclusive ``flock`` (``msvcrt.locking`` on Windows) and writes who it is into it (pid, host,
start time, command); a heartbeat thread touches the file every :data:`HEARTBEAT_SECONDS`.
A second run finds the lock taken and refuses, naming the holder and how long it has held
the folder, or waits for it (``wait``). A run that was killed leaves the file behind but not
the ``flock`` (the kernel drops it with the process), so the next run on the same host knows
the holder is gone, takes the lock over and says so. A holder on another host (a shared
network folder whose file system does not share ``flock``) counts as gone when its heartbeat
is older than ``stale_after`` seconds. On a file system without ``flock`` at all, a holder on
this host counts as gone when its pid is no longer running (best effort: two runs starting
in the same instant are told apart by who wrote the file last).

:func:`clean_leftovers` removes the temporary files of atomic writes (``.<name>.<random>.tmp``,
see :func:`circuits._io.atomic_path`) that a killed run left in folders the caller holds.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

from .._io import PathLike

__all__ = [
    "FolderLock",
    "LockHolder",
    "AtlasLockedError",
    "clean_leftovers",
    "LOCK_NAME",
    "HEARTBEAT_SECONDS",
    "STALE_AFTER_SECONDS",
    "TMP_GRACE_SECONDS",
]

LOCK_NAME = ".circuits-atlas.lock"
#: How often the holder touches its lock file.
HEARTBEAT_SECONDS = 10.0
#: A lock of another host whose heartbeat is older than this is taken over.
STALE_AFTER_SECONDS = 120.0
#: Temporary files younger than this are kept in folders other programs may write to.
TMP_GRACE_SECONDS = 60.0

# atomic writes: ".<final name>.<mkstemp's 8 characters or a uuid's 32>.tmp"; check_writable's probe
_LEFTOVER = re.compile(r"^\..+\.[A-Za-z0-9_]{8,32}\.tmp$|^\.write-test-[A-Za-z0-9_]{8}$")

_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _try_lock(fd: int) -> Optional[bool]:
    """Take the exclusive OS lock on ``fd`` without blocking: ``True`` taken, ``False`` someone
    holds it, ``None`` the file system has no such locks (the holder's pid and heartbeat decide)."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            return False
        except OSError as exc:
            if exc.errno in _NO_LOCKS:
                return None
            raise
        return True
    import msvcrt  # pragma: no cover - Windows

    os.lseek(fd, 1 << 30, os.SEEK_SET)  # pragma: no cover - a byte far past the text, so readers can read it
    try:  # pragma: no cover
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:  # pragma: no cover
        return False
    return True  # pragma: no cover


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:  # pragma: no cover - e.g. Windows without the process
        return False
    return True


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return
    import msvcrt  # pragma: no cover - Windows

    os.lseek(fd, 1 << 30, os.SEEK_SET)  # pragma: no cover
    msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)  # pragma: no cover


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{max(0.0, seconds):.1f} s"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a folder's lock: what its lock file says, and when it was last touched."""

    pid: Optional[int]
    host: str
    started: float
    heartbeat: float
    command: str = ""
    token: str = ""

    @classmethod
    def read(cls, path: Path) -> Optional["LockHolder"]:
        """The holder recorded in the lock file ``path`` (``None`` when there is no file; an
        unknown holder when the file is empty or half-written)."""
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError:
            return cls(None, "", 0.0, 0.0)
        return cls.parse(text, mtime)

    @classmethod
    def parse(cls, text: str, mtime: float) -> Optional["LockHolder"]:
        if not text.strip():
            return None
        try:
            d = json.loads(text)
            return cls(int(d["pid"]), str(d["host"]), float(d["started"]), mtime, str(d.get("command", "")),
                       str(d.get("token", "")))
        except (ValueError, KeyError, TypeError):
            return cls(None, "", mtime, mtime)

    def describe(self, now: Optional[float] = None) -> str:
        now = time.time() if now is None else now
        if self.pid is None:
            return "a run whose lock file is being written or unreadable"
        text = f"pid {self.pid} on {self.host}, holding it for {_duration(now - self.started)}"
        text += f", last heartbeat {_duration(now - self.heartbeat)} ago"
        return text + (f": {self.command}" if self.command else "")


class AtlasLockedError(FileExistsError):
    """Another atlas run holds the folder's lock (``holder`` says who). Exit status 2 on the command line."""

    def __init__(self, folder: Path, holder: Optional[LockHolder], waited: Optional[float] = None):
        who = holder.describe() if holder is not None else "another run"
        how = (f"still held after waiting {_duration(waited)}" if waited
               else "wait for it to finish or run with --wait (wait=True in Python)")
        super().__init__(
            f"{folder} is in use by another atlas run ({who}); {how}, or choose another --out / --cache. "
            f"If that run is gone, delete {folder / LOCK_NAME}"
        )
        self.folder = folder
        self.holder = holder


class FolderLock:
    """The exclusive lock of one folder for the length of an atlas run (a context manager).

    Args:
        folder: the folder (created when needed).
        wait: ``False``: raise :class:`AtlasLockedError` at once when another run holds it;
            ``True``: wait as long as it takes; a number: wait at most that many seconds.
        stale_after: seconds without a heartbeat after which another host's lock is taken over.
        heartbeat: seconds between the holder's heartbeats.
        on_wait: called once with a message when the lock is busy and ``wait`` says to wait.

    ``notes`` lists what happened that a person should know (a stale lock taken over, a wait).
    """

    def __init__(self, folder: PathLike, *, wait: Union[bool, float] = False,
                 stale_after: float = STALE_AFTER_SECONDS, heartbeat: float = HEARTBEAT_SECONDS,
                 on_wait: Optional[Callable[[str], None]] = None):
        if isinstance(wait, bool):
            self.max_wait: Optional[float] = None if wait else 0.0
        elif isinstance(wait, (int, float)) and wait >= 0:
            self.max_wait = float(wait)
        else:
            raise ValueError(f"wait must be True, False or a number of seconds >= 0, got {wait!r}")
        if not stale_after > 0 or not heartbeat > 0:
            raise ValueError("stale_after and heartbeat must be positive numbers of seconds")
        self.folder = Path(folder).expanduser().resolve()
        self.path = self.folder / LOCK_NAME
        self.stale_after = float(stale_after)
        self.heartbeat = float(heartbeat)
        self.on_wait = on_wait
        self.notes: list[str] = []
        self._fd: Optional[int] = None
        self._os_lock = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- acquiring
    def acquire(self) -> None:
        """Take the lock, waiting as ``wait`` allows; :class:`AtlasLockedError` when it stays busy."""
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this lock object")
        self.folder.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        told = False
        delay = 0.05
        waited_for: Optional[LockHolder] = None
        while True:
            holder = self._attempt()
            if holder is None:
                if waited_for is not None:
                    self.notes.append(f"waited {_duration(time.monotonic() - t0)} for another atlas run to finish with "
                                      f"{self.folder} (pid {waited_for.pid} on {waited_for.host})")
                return
            waited = time.monotonic() - t0
            if holder.pid is not None:
                waited_for = holder
            # a holder not yet written, or a lock file replaced under us, is a moment's state: look again
            unsettled = holder.pid is None and waited < 2.0
            if not unsettled and self.max_wait is not None and waited >= self.max_wait:
                raise AtlasLockedError(self.folder, holder, waited if self.max_wait > 0 else None)
            if not told and self.on_wait is not None and holder.pid is not None:
                self.on_wait(f"waiting for {self.folder}: it is in use by another atlas run ({holder.describe()})")
                told = True
            pause = delay if self.max_wait is None or unsettled else min(delay, max(0.0, self.max_wait - waited))
            time.sleep(pause)
            delay = min(1.0, delay * 2)

    def _attempt(self) -> Optional[LockHolder]:
        """One try: ``None`` when taken, else the holder in the way."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        keep = False
        try:
            os_lock = _try_lock(fd)
            if os_lock is False:
                return LockHolder.read(self.path) or LockHolder(None, "", 0.0, 0.0)
            try:
                here = os.stat(self.path)
            except FileNotFoundError:
                here = None
            mine = os.fstat(fd)
            if here is None or (here.st_dev, here.st_ino) != (mine.st_dev, mine.st_ino):
                return LockHolder(None, "", 0.0, 0.0)  # released (and removed) between open and lock: try again
            os.lseek(fd, 0, os.SEEK_SET)
            previous = LockHolder.parse(os.read(fd, 1 << 16).decode("utf-8", "replace"), mine.st_mtime)
            if previous is not None:
                if not self._is_gone(previous, os_lock is True):
                    if os_lock:
                        _unlock(fd)
                    return previous
                self.notes.append(
                    f"took over the lock of {self.folder} from an earlier run that ended without releasing it "
                    f"({previous.describe()}; killed or lost?)"
                )
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                      "command": " ".join(sys.argv)[:300], "token": os.urandom(8).hex()}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(record).encode("utf-8"))
            os.fsync(fd)
            if os_lock is None:  # no OS lock: the last of two simultaneous writers wins, the other backs off
                time.sleep(0.05)
                now = LockHolder.read(self.path)
                if now is None or now.token != record["token"]:
                    return now or LockHolder(None, "", 0.0, 0.0)
            self._fd, self._os_lock, keep = fd, bool(os_lock), True
            self._start_heartbeat()
            return None
        finally:
            if not keep:
                os.close(fd)

    def _is_gone(self, previous: LockHolder, os_locked: bool) -> bool:
        """Is the run recorded in the lock file gone? With the OS lock in hand, a run of this
        host is (the kernel dropped its lock when it ended); without OS locks, a run of this
        host is gone when its process is; a run of another host when its heartbeat is stale."""
        if previous.pid is not None and previous.host == socket.gethostname():
            return os_locked or not _pid_alive(previous.pid)
        return time.time() - previous.heartbeat > self.stale_after

    # -- holding
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"atlas-lock-heartbeat {self.folder}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            fd = self._fd
            if fd is None:
                return
            try:
                os.utime(fd if os.utime in os.supports_fd else self.path)
            except OSError:  # a vanished or unreachable folder: the run's own writes will say so
                pass

    def release(self) -> None:
        """Give the lock back (removes the lock file). Safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            here = os.stat(self.path)
            mine = os.fstat(fd)
            if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(self.path)  # before unlocking: a waiter then finds a fresh file, not ours
        except OSError:
            pass
        try:
            if self._os_lock:
                _unlock(fd)
        finally:
            os.close(fd)


def clean_leftovers(root: PathLike, *, min_age: float = 0.0, held: Iterable[PathLike] = ()) -> list[Path]:
    """Remove the temporary files interrupted atomic writes left under ``root``; returns them.

    Only names an atomic write makes are touched (``.<name>.<random>.tmp``, and the
    ``.write-test-<random>`` probe of :func:`circuits._io.check_writable`). Files younger than
    ``min_age`` seconds are kept (a program outside the atlas may still be writing them).
    Sub-folders with a lock file are another run's and are not entered, unless they are in
    ``held`` (folders whose lock the caller holds). Call it only on a folder whose lock you hold.
    """
    root = Path(root)
    mine = {Path(h).resolve() for h in held}
    now = time.time()
    removed: list[Path] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    sub = Path(entry.path)
                    if not (sub / LOCK_NAME).exists() or sub.resolve() in mine:
                        stack.append(sub)
                elif _LEFTOVER.match(entry.name) and now - entry.stat(follow_symlinks=False).st_mtime >= min_age:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except (FileNotFoundError, PermissionError):  # gone meanwhile, or a folder this run cannot change
                continue
    return removed
