"""File locks for results files, fitted checkpoints and shared artifacts (built on ``filelock``).

A lock is a marker file ``<name>.lock`` written by :class:`filelock.SoftFileLock`: it holds the
holder's process id, host name and process start token, so a lock left by a killed process on this
host is recognised as stale and taken over (filelock's own check), while a lock held by a process on
another machine of a shared file system is never broken. Before filelock sees a marker, this module
reads it: a file that is not a filelock marker (a user's file, an older zsad-bench's bare pid) is
refused with one line and left in place, never deleted without a word.

:func:`exclusive` is for a whole run that owns a file (``run --out``): a second holder is refused at
once. :func:`waiting` is for short critical sections (merging records into a results file shared by
several worker processes, fitting a checkpoint another worker may be fitting): it waits its turn.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import filelock

from zsad_bench.errors import ZsadError

WAIT_S = 3600.0  # waiting() gives up after an hour: a longer hold means a hung holder


def lock_path(path: Path) -> Path:
    """The marker beside ``path``: ``results.json`` -> ``results.json.lock``."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def holder(marker: Path) -> tuple[int, str] | None:
    """(pid, host) recorded in a filelock marker; None when absent or still being written; ZsadError when the
    file is not a marker (kept in place)."""
    try:
        text = Path(marker).read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ZsadError(f"{marker}: unreadable lock file ({exc}); remove it if no zsad-bench run is active") from None
    lines = text.splitlines()
    if not text or (len(lines) == 1 and lines[0].isdigit()):
        return None  # a holder is still writing its marker (filelock waits for it)
    if len(lines) not in (2, 3) or not lines[0].isdigit():
        raise ZsadError(
            f"{marker}: exists and is not a zsad-bench lock (content {text[:40]!r}); it was left in place: "
            "remove it yourself if no run is active, or choose another path"
        )
    return int(lines[0]), lines[1]


def _describe(marker: Path) -> str:
    try:
        found = holder(marker)
    except ZsadError:
        return "another process"
    if found is None:
        return "another process"
    pid, host = found
    return f"pid {pid}" if host == socket.gethostname() else f"pid {pid} on host {host}"


@contextmanager
def exclusive(path: Path, what: str = "file") -> Iterator[None]:
    """Own ``path`` for the duration (refused at once when a live process holds it)."""
    marker = lock_path(path)
    marker.parent.mkdir(parents=True, exist_ok=True)
    holder(marker)  # refuse foreign files before filelock could reclaim them
    lock = filelock.SoftFileLock(str(marker), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise ZsadError(
            f"{path}: {_describe(marker)} is writing this {what}; wait for it, or delete {marker.name} if that "
            "process is gone"
        ) from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def waiting(path: Path, timeout: float | None = WAIT_S) -> Iterator[None]:
    """Hold the lock of ``path`` for a critical section, waiting while another process holds it.

    ``timeout=None`` waits as long as the holder lives (a fit that another worker is computing).
    """
    marker = lock_path(path)
    marker.parent.mkdir(parents=True, exist_ok=True)
    holder(marker)
    lock = filelock.SoftFileLock(str(marker), timeout=-1 if timeout is None else timeout)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise ZsadError(
            f"{path}: {_describe(marker)} held its lock for over {timeout or 0:.0f} s; "
            f"delete {marker.name} if it is hung"
        ) from None
    try:
        yield
    finally:
        lock.release()
