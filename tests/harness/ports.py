"""Free loopback ports for servers that tests and benchmarks start side by side, and whether
they answer."""

from __future__ import annotations

import socket
import urllib.request


def free_ports(n: int) -> list[int]:
    """n loopback ports nobody listens on now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def answers(url: str) -> bool:
    """Whether an HTTP GET of `url` answers 200 now (a server's readiness probe)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False
