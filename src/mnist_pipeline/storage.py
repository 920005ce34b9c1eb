"""The storage layout every stage shares, and the atomic writes between stages.

One folder (a local directory, or the PVC mounted at /storage) holds everything:

    data/MNIST/raw/*-ubyte                          MNIST, placed by `data`
    checkpoints/<run_id>/{model.pth,resume.pth,train.log,metrics.json}   written by train alone
    checkpoints/best_model.pth                      relative symlink to the champion's model.pth
    models/<name>/...                               the model repository (repository.py)
    inference/<timestamp>/...                       client results

Every name another stage reads is defined here once, with the one reader of each record
and the one rule for version folders. Whatever one stage writes and another reads
appears whole or not at all: it is written to a temporary file in the same directory
and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from mnist_pipeline.errors import UsageError, one_line

DEFAULT_STORAGE = "storage"
# ResNet-18 reaches 99.5% on MNIST in 3 epochs: far more is a typo (an ETA of 8e20 h), not
# a plan; 1000 epochs are days on a 2-core machine.
MAX_EPOCHS = 1000

# One rule for every name that becomes a path under storage (run ids, model names): it
# can never be `.`, `..`, contain a separator, look like an option, or exceed a file name.
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
NAME_RULE = "1-64 characters: letters, digits, '_', '-' and '.', not starting with '.' or '-'"


METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "model.pth"
RESUME_FILE = "resume.pth"
TRAIN_LOG_FILE = "train.log"
BEST_MODEL_FILE = "best_model.pth"
CONFIG_FILE = "config.pbtxt"
MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
# Held by the one process training a run (rank 0 of a DDP job), for as long as it trains.
TRAIN_LOCK_FILE = ".train.lock"
# A dot-name: every stage ignores it, so a half-deleted folder is never read.
DELETING_PREFIX = ".deleting-"

DEFAULT_MODEL_NAME = "resnet18_mnist"

# Triton reads a version folder name as a signed 64-bit number.
VERSION_LIMIT = 2**63
VERSION_PATTERN = r"[1-9][0-9]{0,18}"


class RunStatus(StrEnum):
    """metrics.json "status" of a training run."""

    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"  # for good: the waits give up
    INTERRUPTED = "interrupted"
    RETRYING = "retrying"  # this attempt lost a rank; torchrun or the Job starts another


class ExportStatus(StrEnum):
    """export.json "status" of a training run's export."""

    PUBLISHED = "published"
    SKIPPED = "skipped"  # not better, or identical: the published version stays
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM: not final, the same command goes on


def validate_name(name: str, what: str = "run id") -> str:
    """Return `name` if it follows NAME_RULE; otherwise raise UsageError naming the rule."""
    if not re.fullmatch(NAME_PATTERN, name, re.ASCII):
        raise UsageError(f"{what} {name!r} is not allowed: use {NAME_RULE}")
    return name


CGROUP_ROOT = Path("/sys/fs/cgroup")
# The container's CPU limit in whole CPUs, as the chart passes it from the downward API
# (limits.cpu, divisor 1): a deployment fact, not an option, so no flag declares it.
CPU_LIMIT_VARIABLE = "MNIST_PIPELINE_CPU_LIMIT"


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use, so that a container does not start a thread per core of
    the node: the affinity mask, capped by $MNIST_PIPELINE_CPU_LIMIT where the chart gives
    it, and by the CFS quota of the process's cgroup (v2 or v1)."""
    cpus = len(os.sched_getaffinity(0))
    with contextlib.suppress(ValueError):
        cpus = min(cpus, max(1, int(os.environ.get(CPU_LIMIT_VARIABLE, ""))))
    quota = cpu_quota(cgroup_root)
    return cpus if quota is None else min(cpus, max(1, math.ceil(quota)))


def cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the container's CFS quota allows, or None: cgroup v2's cpu.max ("max 100000"
    when unlimited), else cgroup v1's cpu.cfs_quota_us / cpu.cfs_period_us (-1 unlimited;
    EKS on Amazon Linux 2, older OpenShift and GKE nodes), in the cpu or cpu,cpuacct
    controller that container runtimes mount at the container's own cgroup."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = (cgroup_root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    for controller in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        folder = cgroup_root / controller
        with contextlib.suppress(OSError, ValueError):
            quota_us = int((folder / "cpu.cfs_quota_us").read_text())
            period_us = int((folder / "cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def raw_data_dir(storage: Path) -> Path:
    return storage / "data" / "MNIST" / "raw"


def checkpoints_dir(storage: Path) -> Path:
    return storage / "checkpoints"


def run_dir(storage: Path, run_id: str) -> Path:
    return checkpoints_dir(storage) / validate_name(run_id)


def best_model_link(storage: Path) -> Path:
    return checkpoints_dir(storage) / BEST_MODEL_FILE


def models_dir(storage: Path) -> Path:
    return storage / "models"


def model_dir(storage: Path, name: str) -> Path:
    return models_dir(storage) / name


def inference_dir(storage: Path) -> Path:
    return storage / "inference"


def canary_dir(storage: Path) -> Path:
    """Canary analyses' probe results, a folder per run: pruned with the run."""
    return storage / "canary"


@dataclass(frozen=True)
class ModelRepository:
    """Where the Triton model repository is: a folder, or a bucket and prefix on S3
    (objectstore.py). `host` empty is AWS S3 itself, its region from AWS_DEFAULT_REGION."""

    folder: Path | None = None
    bucket: str = ""
    prefix: str = ""
    scheme: str = "https"
    host: str = ""
    port: int | None = None

    @property
    def is_s3(self) -> bool:
        return bool(self.bucket)

    @property
    def endpoint(self) -> str | None:
        """The S3 endpoint URL; None for AWS (the SDK derives it from the region)."""
        if not self.host:
            return None
        return f"{self.scheme}://{self.host}" + (f":{self.port}" if self.port else "")

    def key(self, *parts: str) -> str:
        """The object key of `parts` under the prefix."""
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))

    def __str__(self) -> str:
        if not self.is_s3:
            return str(self.folder)
        where = f"{self.endpoint}/" if self.endpoint else ""
        return f"s3://{where}{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")


def repository_at(location: ModelRepository | None, storage: Path) -> ModelRepository:
    """--model-repository as given, or STORAGE/models by default."""
    return location if location is not None else ModelRepository(folder=models_dir(storage))


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Let an OSError that names no file (ENOSPC from write(), EIO from fsync()) name `path`,
    so that the stage's one-line error says which file could not be written."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def temp_files(directory: Path, name: str) -> list[Path]:
    """The temporary siblings atomic_open makes for `directory/name`: a process killed while
    writing leaves its own behind, never under the real name."""
    return sorted(directory.glob(f".{name}.*.tmp"))


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path`; on success fsync it and rename it over `path`.

    On any failure (a full or read-only volume included) the temporary file is removed
    and `path` keeps its previous content; the error names `path`.
    """
    with naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        # mkstemp's 0600 would hide it from a later stage running as another user.
        os.chmod(tmp, 0o644)
        try:
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, content: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(content)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (best effort where the platform refuses)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def log_error_to(handler: logging.Handler, logger: logging.Logger, msg: str, *args: Any) -> None:
    """Write an error into one stage's own log file only: the command line prints the
    error once, on exit, and the terminal should not show it twice."""
    handler.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, msg, args, None))


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


# Records --------------------------------------------------------------------------------


def read_record(path: Path, what: str) -> dict[str, Any] | None:
    """The JSON object at `path`; None when there is no such file (parse_record)."""
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return None
    return parse_record(content, str(path), what)


def parse_record(content: bytes | None, where: str, what: str) -> dict[str, Any] | None:
    """The JSON object in `content` (from `where`); None when there is no content.

    Writers replace whole files, so an empty, torn or non-object record is damage (or a
    foreign writer), never a write in progress: UsageError naming it."""
    if content is None:
        return None
    if not content.strip():
        raise UsageError(f"{what} {where} is empty")
    try:
        record = json.loads(content)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise UsageError(f"{what} {where} is damaged: {one_line(e)}") from None
    if not isinstance(record, dict):
        raise UsageError(
            f"{what} {where} is damaged: a JSON {type(record).__name__}, not an object"
        )
    return record


def read_metrics(run: Path) -> dict[str, Any] | None:
    """A training run's metrics.json (its status, history, accuracy)."""
    return read_record(run / METRICS_FILE, "training record")


def standing_record(previous: dict[str, Any], attempt: dict[str, Any]) -> dict[str, Any]:
    """An export record after `attempt`: its top-level fields are the run's standing
    outcome (once published, a later skip or failure never erases that), every attempt
    kept in order under "history"."""
    history = [*previous.get("history", []), attempt]
    published = previous.get("status") == ExportStatus.PUBLISHED
    standing = previous if published and attempt["status"] != ExportStatus.PUBLISHED else attempt
    return {**standing, "history": history}


# Versions -------------------------------------------------------------------------------


def is_version_name(name: str) -> bool:
    """A folder name that is a model version: a positive number without a leading zero
    (one folder per number: "01" would be another folder for version 1), below 2**63."""
    return re.fullmatch(VERSION_PATTERN, name, re.ASCII) is not None and int(name) < VERSION_LIMIT


def check_model_version(value: str) -> str:
    """`value` if it names a served version: "run", "challenger", a version number, or ""
    (the champion)."""
    if value in ("", "run", "challenger") or is_version_name(value):
        return value
    raise UsageError(
        f"model version {value!r}: expected run, challenger, a version number such as 1 "
        "(Triton numbers versions 1, 2, ...), or nothing for the champion"
    )
