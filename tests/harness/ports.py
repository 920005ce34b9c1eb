"""Free loopback ports for servers that tests and benchmarks start side by side."""

from __future__ import annotations

import socket


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
