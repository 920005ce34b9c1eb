"""Helpers shared by the serving tests: the CLI, free ports, Triton processes in /proc."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mnist_pipeline", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def free_ports(n: int) -> list[int]:
    """n loopback ports nobody listens on now (other test runs share this machine)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def triton_processes(marker: str) -> list[tuple[int, str]]:
    """tritonserver and Python stub processes whose command line mentions `marker`
    (a working folder or repository path unique to one server)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and (
            "tritonserver" in cmdline or "triton_python_backend_stub" in cmdline
        ):
            found.append((int(entry.name), cmdline))
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
