"""The trainer's save-directory lock (issue 24, item 2), without a trainer: two holders in two
processes, release on SIGKILL, and the record-based judgement for file systems without flock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_wsm.checkpoint import lock as run_lock

HOLD = (
    "import sys, time\n"
    "from megatron_wsm.checkpoint import lock as run_lock\n"
    "lock = run_lock.acquire(sys.argv[1])\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def _holder(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    proc = _holder(tmp_path / "save")
    try:
        with pytest.raises(run_lock.SaveDirLocked, match=f"PID {proc.pid} on host "):
            run_lock.acquire(tmp_path / "save")
    finally:
        proc.kill()
        proc.wait()


def test_sigkill_releases_the_lock_and_the_next_run_notes_the_takeover(tmp_path):
    proc = _holder(tmp_path / "save")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lock = run_lock.acquire(tmp_path / "save")
    try:
        assert lock.note and f"PID {proc.pid}" in lock.note
        record = json.loads((tmp_path / "save" / run_lock.LOCK_NAME).read_text())
        assert record["pid"] == os.getpid()
    finally:
        lock.release()
    # A clean release leaves no holder: the next one takes it without a note.
    again = run_lock.acquire(tmp_path / "save")
    assert again.note is None
    again.release()


def test_release_is_idempotent_and_never_deletes(tmp_path):
    lock = run_lock.acquire(tmp_path)
    lock.release()
    lock.release()
    assert (tmp_path / run_lock.LOCK_NAME).is_file()


def test_a_symlinked_lock_file_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "save").mkdir()
    (tmp_path / "save" / run_lock.LOCK_NAME).symlink_to(victim)
    with pytest.raises(run_lock.SaveDirLocked, match="cannot open the trainer lock"):
        run_lock.acquire(tmp_path / "save")
    assert victim.read_text() == "precious"


def test_holder_judged_by_record_without_flock():
    host = socket.gethostname()
    now = time.time()
    parent = {"host": host, "pid": os.getppid()}
    assert run_lock.holder_alive(parent, now - 1000, now, host)  # alive here, old heartbeat
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    assert not run_lock.holder_alive({"host": host, "pid": int(dead.stdout)}, now, now, host)
    other = {"host": "node-17", "pid": 1}
    assert run_lock.holder_alive(other, now - 5, now, host)  # fresh heartbeat elsewhere
    assert not run_lock.holder_alive(other, now - run_lock.STALE_AFTER_S - 1, now, host)
    assert not run_lock.holder_alive({}, now, now, host)


def test_another_hosts_fresh_record_is_refused_even_with_flock(tmp_path):
    """flock may be local to each host (some NFS mounts): a fresh record of another host
    still holds the directory."""
    (tmp_path / run_lock.LOCK_NAME).write_text(json.dumps(
        {"host": "node-17", "pid": 4242, "started": time.time(), "command": "pretrain_moe.py"}))
    with pytest.raises(run_lock.SaveDirLocked, match="PID 4242 on host node-17"):
        run_lock.acquire(tmp_path)
    old = time.time() - run_lock.STALE_AFTER_S - 10
    os.utime(tmp_path / run_lock.LOCK_NAME, (old, old))
    lock = run_lock.acquire(tmp_path)  # that host's heartbeat stopped: stale
    assert lock.note and "node-17" in lock.note
    lock.release()
