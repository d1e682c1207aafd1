"""A free TCP port, the one helper for it: MASTER_PORT of a run without the launcher (loop.py), and the ports of
the benches' launchers and servers and of the tests. Standard library only, so that a bench imports it without
loading torch or DeepSpeed."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the OS picks it; another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
