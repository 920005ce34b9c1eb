"""The storage layout every stage shares, and the atomic writes between stages.

One folder (a local directory, or the PVC mounted at /storage) holds everything:

    data/MNIST/raw/*-ubyte                          MNIST, placed by `data`
    checkpoints/<run_id>/{model.pth,train.log,metrics.json}
    checkpoints/best_model.pth                      relative symlink to the best model.pth
    models/<name>/config.pbtxt                      Triton model repository
    models/<name>/<version>/{model.onnx,metadata.json}
    inference/<timestamp>/...                       client results

Whatever one stage writes and another reads appears whole or not at all: it is
written to a temporary file in the same directory and renamed into place.
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
from pathlib import Path
from typing import IO, Any

DEFAULT_STORAGE = "storage"
# ResNet-18 reaches 99.5% on MNIST in 3 epochs: far more is a typo (an ETA of 8e20 h), not
# a plan; 1000 epochs are days on a 2-core machine.
MAX_EPOCHS = 1000

# One rule for every name that becomes a path under storage (run ids, model names): it
# can never be `.`, `..`, contain a separator, look like an option, or exceed a file name.
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
NAME_RULE = "1-64 characters: letters, digits, '_', '-' and '.', not starting with '.' or '-'"


class UsageError(Exception):
    """Bad input: a wrong file, a bad option, a foreign checkpoint. Exit code 2."""

    exit_code = 2


class PipelineFailure(Exception):
    """The stage could not finish for a reason other than its input. Exit code 1."""

    exit_code = 1


def validate_name(name: str, what: str = "run id") -> str:
    """Return `name` if it follows NAME_RULE; otherwise raise UsageError naming the rule."""
    if not re.fullmatch(NAME_PATTERN, name, re.ASCII):
        raise UsageError(f"{what} {name!r} is not allowed: use {NAME_RULE}")
    return name


def available_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2 quota (a pod's
    CPU limit), so that a container does not start a thread per core of the node."""
    cpus = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    return cpus


def raw_data_dir(storage: Path) -> Path:
    return storage / "data" / "MNIST" / "raw"


def checkpoints_dir(storage: Path) -> Path:
    return storage / "checkpoints"


def run_dir(storage: Path, run_id: str) -> Path:
    return checkpoints_dir(storage) / validate_name(run_id)


def best_model_link(storage: Path) -> Path:
    return checkpoints_dir(storage) / "best_model.pth"


def models_dir(storage: Path) -> Path:
    return storage / "models"


def inference_dir(storage: Path) -> Path:
    return storage / "inference"


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
