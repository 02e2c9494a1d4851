"""One trainer per save directory: a lock held for the whole run.

Two trainers writing into the same ``--save`` interleave their checkpoints (and a window that
mixes two runs merges into nonsense), so rank 0 takes ``<save>/.wsm-trainer.lock`` before the
first save and holds it until the process exits:

* the lock is an exclusive ``flock`` on that file, which the kernel releases when the process
  dies in any way, SIGKILL included: a stale lock of a killed run is recognised without
  anyone cleaning up;
* the file names its holder (host, PID, start time, command) so a refusal can say who holds
  the directory, and a heartbeat thread refreshes its modification time;
* on file systems without working ``flock`` (or where it is local to each host, as on some
  NFS mounts), the holder is judged from the file itself: a process on this host that is
  still alive, or any host whose heartbeat is fresher than :data:`STALE_AFTER_S`, holds it.

Nothing here deletes anything: releasing only unlocks (the file stays, empty of a holder).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from megatron_wsm.process_guard import pid_alive

LOCK_NAME = ".wsm-trainer.lock"
HEARTBEAT_S = 20.0
#: A holder whose heartbeat is older than this is taken for dead (file systems without flock).
STALE_AFTER_S = 120.0
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class SaveDirLocked(RuntimeError):
    """Another live trainer holds the save directory."""


def describe(holder: dict[str, Any]) -> str:
    """``holder`` (the lock file's JSON) in words."""
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return (f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}"
            f" ({holder.get('command', '?')})")


def holder_alive(holder: dict[str, Any], mtime: float, now: float, host: str) -> bool:
    """Whether the recorded ``holder`` still holds the lock, judged without ``flock``: a process
    of this host that exists, or another host's whose heartbeat (``mtime``) is fresh."""
    if not holder:
        return False
    fresh = now - mtime < STALE_AFTER_S
    if holder.get("host") == host:
        pid = holder.get("pid")
        return isinstance(pid, int) and pid_alive(pid) and pid != os.getpid()
    return fresh


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 64 << 10, 0)
        holder = json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


class RunLock:
    """The held lock of one save directory (see the module docstring)."""

    def __init__(self, directory: Path, fd: int, flocked: bool) -> None:
        self.directory = directory
        self.path = directory / LOCK_NAME
        self._fd: int | None = fd
        self.flocked = flocked
        self.note: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="wsm-lock-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Unlock (idempotent): the holder record is cleared, the file stays."""
        if self._fd is None:
            return
        self._stop.set()
        try:
            os.ftruncate(self._fd, 0)
            if self.flocked:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def acquire(directory: str | os.PathLike) -> RunLock:
    """Take ``directory``'s trainer lock (creating the directory) or raise
    :class:`SaveDirLocked` naming the holder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        raise SaveDirLocked(f"cannot open the trainer lock {path}: {e.strerror}") from e
    host = socket.gethostname()
    try:
        flocked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SaveDirLocked(_held_message(directory, _read_holder(fd))) from None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
            flocked = False
        previous = _read_holder(fd)
        mtime = os.fstat(fd).st_mtime
        other_host = previous.get("host") not in (None, host)
        if (not flocked or other_host) and holder_alive(previous, mtime, time.time(), host):
            # Without flock, or with a flock that may not reach the other host: the record
            # decides (a fresh heartbeat of another host, a live PID here).
            raise SaveDirLocked(_held_message(directory, previous))
        record = {"host": host, "pid": os.getpid(), "started": time.time(),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    lock = RunLock(directory, fd, flocked)
    if previous:
        lock.note = f"took over the stale trainer lock of {describe(previous)}"
    return lock


def _held_message(directory: Path, holder: dict[str, Any]) -> str:
    who = describe(holder) if holder else "another process"
    return (f"--save {directory} is in use by another trainer: {who}. Two runs in one save "
            "directory would mix their checkpoints; wait for it to finish or save elsewhere "
            f"(the lock is {directory / LOCK_NAME}; it is released when that process exits)")
