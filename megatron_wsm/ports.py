"""A free TCP port on the loopback interface (for a process group's rendezvous)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on now; the OS may hand it out again, so bind it soon."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
