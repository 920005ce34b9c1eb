"""The model repository's lock: one file in the repository (.export/lock.json), created
only if absent, saying who holds it, since when and until when.

Exports and prunes from any machine serialise on it, whether the repository is a folder
or a bucket. A holder that is provably gone (this host, its process dead or replaced by
another with the same number) is taken over at once; another host's lock when its lease
has ended. A holder never commits after its lease (minus a margin) has run out, so
holders' clocks must agree within that margin.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

from mnist_pipeline.errors import PipelineFailure, UsageError
from mnist_pipeline.files import Files
from mnist_pipeline.storage import parse_record

log = logging.getLogger(__name__)

LOCK = ".export/lock.json"
LEASE_SECONDS = 600.0
LEASE_MARGIN = 60.0
POLL_SECONDS = 0.5
REPORT_EVERY = 30.0


def process_started(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), None if there is none: with
    the pid, it tells a live holder from a new process that was given its number."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_namespace() -> str:
    """This process's PID namespace: containers sharing a host name (docker --network=host)
    number their processes apart, so a pid means something only within one namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "?"


def clock(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Holder:
    token: str
    purpose: str
    host: str
    pid_namespace: str
    pid: int
    started: int | None
    since: float
    until: float

    @classmethod
    def me(cls, purpose: str, lease: float) -> Holder:
        now = time.time()
        pid = os.getpid()
        host = socket.gethostname()
        started = process_started(pid)
        return cls(uuid.uuid4().hex, purpose, host, pid_namespace(), pid, started, now, now + lease)

    @classmethod
    def parse(cls, body: bytes | None, where: str) -> Holder | None:
        try:
            record = parse_record(body, where, "lock")
        except UsageError:
            record = {}  # torn by hand: nobody can prove holding it
        if body is None or record is None:
            return None
        try:
            return cls(**record)
        except TypeError:
            return cls("?", "?", "?", "?", 0, None, 0.0, 0.0)  # an older lock: its lease is over

    def body(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    def gone(self) -> str | None:
        """Why the holder is certainly not holding the lock any more, or None."""
        if time.time() > self.until:
            return f"its lease ended at {clock(self.until)}"
        if (self.host, self.pid_namespace) == (socket.gethostname(), pid_namespace()):
            if self.pid == os.getpid() and self.token not in Lock.tokens:
                return "this process holds it no more"
            if process_started(self.pid) != self.started:
                return f"process {self.pid} is gone"
        return None

    def __str__(self) -> str:
        left = max(0.0, self.until - time.time())
        return (
            f"{self.purpose} by process {self.pid} on {self.host} since {clock(self.since)}, "
            f"lease until {clock(self.until)} ({left:.0f} s left)"
        )


class Lock:
    """Hold with `held(purpose)`; re-entrant within one Lock."""

    tokens: ClassVar[set[str]] = set()  # held by this process, across Locks

    def __init__(self, files: Files, lease: float = LEASE_SECONDS) -> None:
        self.files, self.lease = files, lease
        self.holder: Holder | None = None
        self.taken_at = 0.0

    def holder_now(self) -> Holder | None:
        return Holder.parse(self.files.get(LOCK), self.files.url(LOCK))

    @contextlib.contextmanager
    def held(self, purpose: str) -> Iterator[None]:
        if self.holder is not None:
            yield
            return
        me = Holder.me(purpose, self.lease)
        try:
            self._take(me)
        except BaseException:
            Lock.tokens.discard(me.token)
            raise
        try:
            yield
        finally:
            self._release()

    def _take(self, me: Holder) -> None:
        Lock.tokens.add(me.token)
        reported = -REPORT_EVERY
        start = time.monotonic()
        while not self.files.create(LOCK, me.body()):
            body = self.files.get(LOCK)
            other = Holder.parse(body, self.files.url(LOCK))
            why = None if other is None else other.gone()
            if why is not None:
                log.warning("taking over %s, held by %s: %s", self.files.url(LOCK), other, why)
                if self.files.get(LOCK) == body:  # still that holder's
                    self.files.delete([LOCK])
                continue
            if other is not None and time.monotonic() - start - reported >= REPORT_EVERY:
                reported = time.monotonic() - start
                log.info("waiting for the repository lock %s: %s", self.files.url(LOCK), other)
            time.sleep(POLL_SECONDS)
        self.holder, self.taken_at = me, time.monotonic()
        if self.files.create(LOCK, me.body()):
            log.warning(
                "%s ignores conditional writes (If-None-Match): writers from different "
                "machines into it are not serialised",
                self.files.url(),
            )

    def check(self) -> None:
        """Before a commit: the lock still ours, with time left on its lease."""
        assert self.holder is not None, "check() outside held()"
        if time.monotonic() - self.taken_at > self.lease - LEASE_MARGIN:
            raise PipelineFailure(
                f"{self.files.url(LOCK)}: this {self.holder.purpose} held the repository lock "
                f"longer than its lease ({self.lease:.0f} s): nothing committed"
            )
        if self.files.get(LOCK) != self.holder.body():
            raise PipelineFailure(f"{self.files.url(LOCK)} changed hands: nothing committed")

    def _release(self) -> None:
        me, self.holder = self.holder, None
        assert me is not None
        Lock.tokens.discard(me.token)
        with contextlib.suppress(PipelineFailure, UsageError, OSError):
            if self.files.get(LOCK) == me.body():  # another may hold it after our lease
                self.files.delete([LOCK])
