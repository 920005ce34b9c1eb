"""Process trees, read from /proc: what a pod's SIGKILL reaches on a node."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def parent(pid: int) -> int:
    """The parent of `pid` (OSError once it is gone)."""
    # After the command's closing parenthesis (it may hold spaces): state, then parent.
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, torchrun's ranks included (they run in sessions of
    their own, so a process group does not hold them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        process = int(stat.parent.name)
        try:
            children.setdefault(parent(process), []).append(process)
        except OSError:
            continue
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and everything below it at once, as the kubelet ends a container."""
    for member in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
