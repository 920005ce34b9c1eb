"""Processes as the tests see them: trees read from /proc (what a pod's SIGKILL reaches on
a node), whether one is alive, and what starting some needs."""

from __future__ import annotations

import contextlib
import os
import shutil
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


def alive(pid: int) -> bool:
    """Whether `pid` exists (also one of another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def require_root_and(who: str, **debs: str) -> None:
    """Fail, saying what to do, where network namespaces (root) or a tool is missing: each
    tool given with the Debian package it comes in."""
    if os.geteuid() != 0:
        raise PermissionError(f"network namespaces need root: run {who} as root")
    for tool, deb in debs.items():
        if not (shutil.which(tool) or shutil.which(tool, path="/usr/sbin")):
            raise FileNotFoundError(
                f"{tool} not found: install the Debian package {deb} (make test-deps does)"
            )


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and everything below it at once, as the kubelet ends a container."""
    for member in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
