"""Processes that must not outlive the process that started them (Linux parent-death signal).

A rank killed with SIGKILL cannot clean up after itself, and a launcher (torchrun) killed that
way cannot stop its ranks: the survivors sit in a collective or a rendezvous retry loop under
init, holding memory, until their timeouts (30 minutes for the merge tool). The kernel's
parent-death signal is the one mechanism that still acts after a SIGKILL.
"""

from __future__ import annotations

import os
import signal

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: Set by torchrun (torch.distributed.elastic) in every process it launches.
_TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"


def die_with_parent(expected_parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies; exit now if it already has.

    The parent may die between this process's start and the ``prctl`` call, so ``getppid`` is
    checked after it. A no-op where ``prctl`` is not available (not Linux). The signal fires
    when the parent's *thread* that started this process exits, so call it only in processes
    started from a long-lived thread (a main thread).
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != expected_parent:
        os._exit(1)


def die_with_launcher() -> bool:
    """Under torchrun: this rank dies when its torchrun agent dies. Returns whether it applied.

    torchrun starts its workers from the agent's main thread and outlives them in normal runs,
    so the signal only fires when the agent itself was killed.
    """
    if _TORCHRUN_ENV not in os.environ:
        return False
    die_with_parent(os.getppid())
    return True


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists on this host (it may belong to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
