"""Where a new process group meets: a free local TCP port for MASTER_PORT."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (the OS picks it). Another process may take it
    before the group binds it; launchers on one machine accept that small race."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
