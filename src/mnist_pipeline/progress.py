"""What a training run tells its user while it runs: the progress bar or lines, train.log,
each rank's prefix on shared output, and the network traffic of the run."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from mnist_pipeline.distributed import World
from mnist_pipeline.storage import TRAIN_LOG_FILE, log_error_to

log = logging.getLogger(__name__)

# Stays in the files other stages read: the figure is the machine's, not the run's.
NETWORK_SCOPE = (
    "non-loopback interfaces of this network namespace, every process in it "
    "(the machine, or the pod in Kubernetes)"
)


def clock(seconds: float) -> str:
    """'1:05' or, from an hour on, '1:01:05'."""
    minutes, secs = divmod(int(seconds), 60)
    return (
        f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
        if minutes >= 60
        else f"{minutes}:{secs:02d}"
    )


class Progress:
    """A live bar on a terminal; in a Job (no TTY), a plain line every `every_s` seconds.
    Both show elapsed time, speed and the ETA of the whole run (steps are global).

    As a context manager it ends the bar's line on the way out, so that an error is printed
    on a line of its own."""

    def __init__(
        self, total: int, images_per_step: int, start: int = 0, every_s: float = 15.0
    ) -> None:
        self.total, self.images_per_step, self.start = total, images_per_step, start
        self.every_s = every_s
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.monotonic()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def timing(self, step: int, now: float) -> str:
        elapsed = now - self.t0
        steps_per_s = (step - self.start) / elapsed if elapsed > 0 else 0.0
        eta = clock((self.total - step) / steps_per_s) if steps_per_s else "?"
        return (
            f"{clock(elapsed)} elapsed, {steps_per_s * self.images_per_step:.0f} images/s, "
            f"ETA {eta}"
        )

    def update(self, step: int, text: str) -> None:
        now = time.monotonic()
        if self.tty:
            filled = int(30 * step / self.total)
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {step}/{self.total}"
            sys.stderr.write(f"\r{bar} {text} {self.timing(step, now)}")
            sys.stderr.flush()
        elif now - self.last >= self.every_s or step == self.total:
            log.info("step %d/%d %s | %s", step, self.total, text, self.timing(step, now))
        if now - self.last >= self.every_s:
            self.last = now

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


class RankPrefix(logging.Filter):
    """'rank N: ' before each line, once: ranks of one job share a terminal or a pod log."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.prefix = f"rank {rank}: "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


@contextlib.contextmanager
def run_logging(out: Path, world: World) -> Iterator[None]:
    """Rank 0 alone writes train.log; on the terminal (or a pod's log) each rank's
    lines say which rank wrote them. An error leaving the block goes into train.log."""
    out.mkdir(parents=True, exist_ok=True)
    package = logging.getLogger("mnist_pipeline")
    file_log: logging.Handler | None = None
    if world.writer:
        file_log = logging.FileHandler(out / TRAIN_LOG_FILE)
        file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        package.addHandler(file_log)
    prefix = RankPrefix(world.rank)
    console = logging.getLogger().handlers if world.distributed else []
    for handler in console:
        handler.addFilter(prefix)
    try:
        yield
    except Exception as e:
        if file_log is not None:  # the command line prints the error once, on exit
            log_error_to(file_log, log, "training run %s failed: %s", out.name, e)
        raise
    finally:
        for handler in console:
            handler.removeFilter(prefix)
        if file_log is not None:
            package.removeHandler(file_log)
            file_log.close()


PROC_NET_DEV = Path("/proc/net/dev")


def interface_bytes(path: Path = PROC_NET_DEV) -> dict[str, tuple[int, int]]:
    """Bytes received and sent so far by each interface NETWORK_SCOPE names (from
    /proc/net/dev): Linux keeps no per-process count, so other processes' traffic is in it."""
    try:
        lines = path.read_text().splitlines()[2:]
    except OSError:
        return {}
    counts = {}
    for line in lines:
        name, _, counters = line.partition(":")
        if name.strip() != "lo":
            fields = counters.split()
            counts[name.strip()] = (int(fields[0]), int(fields[8]))
    return counts


class NetworkMeter:
    """The traffic NETWORK_SCOPE names since the meter was made, interface by interface:
    one that appeared since counts from zero, one that went away takes its count with it
    (a sum over all of them went negative when a busy one disappeared)."""

    def __init__(self, path: Path = PROC_NET_DEV) -> None:
        self.path = path
        self.start = interface_bytes(path)

    def so_far(self) -> dict[str, int]:
        received = sent = 0
        for name, (rx, tx) in interface_bytes(self.path).items():
            rx0, tx0 = self.start.get(name, (0, 0))
            # Below its start: the interface was made again under the same name.
            received += rx - rx0 if rx >= rx0 else rx
            sent += tx - tx0 if tx >= tx0 else tx
        return {"received": received, "sent": sent}
