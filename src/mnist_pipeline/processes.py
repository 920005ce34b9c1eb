"""Servers in child processes: started, awaited until ready and stopped by their PID.

LocalTriton (serve.py) is one; so is every server the tests and benchmarks start
(tests/harness: Prometheus, radosgw, MLflow, Triton replicas, dnsmasq, dockerd).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
S = TypeVar("S", bound="Service")


class Service:
    """start(), wait_ready(), stop(). As a context manager it is ready inside, and stopped
    on the way out, also when it failed to start or to become ready."""

    def start(self) -> None:
        raise NotImplementedError

    def wait_ready(self) -> None:
        """Return once it serves (at once unless a subclass has something to wait for)."""

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: S) -> S:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_group(process: subprocess.Popen[Any], grace: float = 0) -> bool:
    """Stop `process` and everything in its process group (its PID is the group's): with a
    `grace`, SIGTERM and that many seconds to exit; then SIGKILL for whatever is left.
    Whether it outlived its grace."""
    outlived = False
    if grace and process.poll() is None:
        signal_group(process.pid, signal.SIGTERM)
        signal_group(process.pid, signal.SIGCONT)  # a stopped process handles it once woken
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            outlived = True
    signal_group(process.pid, signal.SIGKILL)
    process.wait()
    return outlived


def signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _die_with_parent(prctl: Callable[..., int], parent: int) -> None:
    """In the child before exec: its own process group, and SIGTERM when the parent dies."""
    os.setpgid(0, 0)
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class ManagedProcess(Service):
    """One server process in a process group of its own, its output in `log_path`: start()
    runs `command`, wait_ready() polls ready() until it holds, stop() ends the group by the
    PID. If it exits or is not ready in time, failure() says so with the end of its log.

    Subclasses set `command` (and `environment`, `cwd`) in their start() before the base's, and say
    what ready() means."""

    name = "process"  # what its failures call it
    grace = 0.0  # seconds between SIGTERM and SIGKILL on stop(); 0: SIGKILL at once
    ready_timeout = 120.0
    # Also SIGTERM when this process dies (only where the parent outlives the thread that
    # starts it: the signal follows the thread).
    die_with_parent = False

    def __init__(
        self,
        command: Sequence[str] = (),
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.command = list(command)
        self.log_path = log_path
        self.environment = dict(env or {})  # over this process's own
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "start() first"
        return self.process.pid

    def start(self) -> None:
        if self.process is not None:
            raise RuntimeError(f"this {self.name} is already started")
        assert self.log_path is not None, "no log_path"
        if self.die_with_parent:
            # preexec_fn only makes two system calls: safe even with threads running.
            # libc is looked up here, in the parent: lookups are not fork-safe.
            prctl = ctypes.CDLL(None, use_errno=True).prctl
            group: dict[str, Any] = {
                "preexec_fn": functools.partial(_die_with_parent, prctl, os.getpid())
            }
        else:
            group = {"start_new_session": True}
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.environment},
                cwd=self.cwd,
                **group,
            )

    def ready(self) -> bool:
        return True

    def wait_ready(self, timeout: float | None = None) -> None:
        assert self.process is not None, "start() first"
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            code = self.process.poll()
            if code is not None:
                raise self.failure(f"{self.name} exited with code {code} before it was ready")
            if self.ready():
                return
            if time.monotonic() > deadline:
                raise self.failure(f"{self.name} not ready after {timeout:.0f} s")
            time.sleep(delay)
            delay = min(0.5, delay * 1.5)

    def failure(self, what: str) -> Exception:
        return RuntimeError(f"{what}. From {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return Path(str(self.log_path)).read_text(errors="replace")[-chars:]
        except OSError:
            return f"({self.log_path} unreadable)"

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if stop_group(process, self.grace):
            log.warning("%s ignored SIGTERM for %.0f s; killed it", self.name, self.grace)
        log.info("%s stopped (exit code %s)", self.name, process.returncode)
