"""Helpers shared by the tests: the CLI, free ports, Triton processes in /proc, tree snapshots."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from mnist_pipeline.serve import pinned
from mnist_pipeline.storage import ModelRepository
from mnist_pipeline.tritonconfig import TritonConfig
from support.ports import free_ports

__all__ = ["cli", "free_ports", "pid_alive", "pinned_models", "snapshot", "triton_processes"]

ROOT = Path(__file__).resolve().parents[2]


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


def pinned_models(models: Path, out: Path, cfg: TritonConfig | None = None) -> Path:
    """The newest version of a repository folder as exported, pinned into `out` for the
    local Triton (as `serve --model-repository MODELS` does)."""
    return pinned(ModelRepository(folder=models), out, cfg or TritonConfig())


def triton_processes(marker: str) -> list[tuple[int, str]]:
    """tritonserver processes whose command line or working folder mentions `marker`
    (a working folder or repository path unique to one server)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if "tritonserver" in cmdline.split(" ", 1)[0] and (marker in cmdline or marker in cwd):
            found.append((int(entry.name), cmdline))
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def snapshot(root: Path) -> dict[str, Any]:
    """Every path under root with its content hash (or link target): any change shows."""
    if not root.exists():
        return {}
    state: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            state[key] = ("link", os.readlink(path))
        elif path.is_file():
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[key] = "dir"
    return state
