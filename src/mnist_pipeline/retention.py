"""Bounded storage: keep the newest few runs, model versions and inference results (a
canary analysis's probe results, canary/<run>, go with their run).

A long-lived volume (the chart's 5 Gi claim) otherwise fills up: every run leaves an
89 MB resume.pth and model.pth, every publication a version. What is never deleted,
whatever the limits: the newest version (Triton serves it), any version asked to be
kept (a pinned servedVersion), the run that checkpoints/best_model.pth points at, the
current run, the versions those two published, the version the current run's export
chose (published or kept), versions a pin or serve still holds (repository.py's served
records), and runs still marked "running" or
"interrupted" (they may resume), unless nothing in them changed for `abandoned_after`
seconds: a run whose pods were deleted (`helm uninstall` mid-training) stays "running"
forever otherwise.

Deletion first renames a folder to a dot-name (ignored by every stage), then removes
it, so a reader never sees half a folder; a version loses its marker (metadata.json)
first and keeps its number in the repository's ledger. Standard library only (boto3
for an object-storage repository): the lean client image runs it.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from mnist_pipeline import settings
from mnist_pipeline.errors import PipelineFailure, UsageError
from mnist_pipeline.repository import (
    DAMAGED,
    PUBLISHED,
    Repository,
    Version,
    exported_version,
    open_repository,
)
from mnist_pipeline.storage import (
    DELETING_PREFIX,
    ExportStatus,
    ModelRepository,
    RunStatus,
    best_model_link,
    canary_dir,
    checkpoints_dir,
    inference_dir,
    read_metrics,
    repository_at,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits(settings.Settings):
    """How many of each to keep; 0 keeps all (settings.py declares each)."""

    runs: int = settings.KEEP_RUNS.field()
    versions: int = settings.KEEP_VERSIONS.field()
    inference: int = settings.KEEP_INFERENCE.field()

    def __str__(self) -> str:
        def keep(n: int, what: str) -> str:
            return f"all {what}" if n == 0 else f"the newest {n} {what}"

        return ", ".join(
            [
                keep(self.runs, "runs"),
                keep(self.versions, "versions"),
                keep(self.inference, "inference folders"),
            ]
        )


def _may_resume(run: Path) -> bool:
    metrics = read_metrics(run)
    return metrics is not None and metrics.get("status") in (
        RunStatus.RUNNING,
        RunStatus.INTERRUPTED,
    )


def _abandoned(run: Path, after: float) -> bool:
    """Nothing written under `run` for `after` seconds (0: never say so). A live run
    rewrites metrics.json each epoch and resume.pth every few hundred steps."""
    if not after:
        return False
    newest = max((p.stat().st_mtime for p in run.rglob("*")), default=run.stat().st_mtime)
    return time.time() - newest > after


def _best_run(storage: Path) -> str | None:
    link = best_model_link(storage)
    if not link.is_symlink():
        return None
    target = (link.parent / link.readlink()).resolve()
    return (
        target.parent.name if target.parent.parent == checkpoints_dir(storage).resolve() else None
    )


def _chosen_by(repo: Repository, run_id: str | None) -> set[int]:
    """The version run `run_id`'s export chose (published, or kept as better), if it
    chose one: the version that run's pods serve."""
    record = None if run_id is None else repo.read_record(run_id)
    if (
        run_id is None
        or record is None
        or record.get("status")
        in (
            ExportStatus.FAILED,
            ExportStatus.INTERRUPTED,
        )
    ):
        return set()
    return {exported_version(repo, run_id)}


def _served(repo: Repository, abandoned_after: float) -> set[int]:
    """The versions pins and serves placed and still hold. A record whose folder is on
    this host and no longer holds its version is dropped; another host's is believed,
    unless older than `abandoned_after` (when set)."""
    held = set()
    for key, record in repo.served().items():
        version, folder = record.get("version"), record.get("folder")
        here = record.get("host") == socket.gethostname()
        gone = here and not (Path(str(folder)) / str(version)).is_dir()
        stale = abandoned_after and time.time() - float(record.get("since", 0)) > abandoned_after
        if gone or (not here and stale):
            log.info("%s: %s no longer serves version %s", repo.url(key), folder, version)
            repo.unmark_served(key)
        elif isinstance(version, int):
            held.add(version)
    return held


class Removal:
    """Deletes folders one by one, each first renamed to a dot-name so no reader sees half
    of it; what cannot be removed is named and the rest still goes."""

    def __init__(self) -> None:
        self.removed: list[str] = []
        self.failed: list[str] = []

    def run(self, where: str, remove: Callable[[], None]) -> None:
        """Remove what `remove` removes (a version on object storage), naming `where`."""
        try:
            remove()
        except (OSError, PipelineFailure) as e:
            self.failed.append(f"{where}: {e}")
            return
        log.info("removed %s", where)
        self.removed.append(where)

    def remove(self, path: Path) -> None:
        errors: list[str] = []

        def note(_function: object, failed: str, exc_info: Any) -> None:
            errors.append(f"{failed}: {exc_info[1].strerror or exc_info[1]}")

        try:
            if path.is_symlink():
                path.unlink()  # the link alone: what it points at is not this volume's to delete
            else:
                hidden = path
                if not path.name.startswith(DELETING_PREFIX):
                    hidden = path.with_name(f"{DELETING_PREFIX}{path.name}")
                    path.rename(hidden)
                shutil.rmtree(hidden, onerror=note)  # everything it can, naming the rest
        except OSError as e:
            errors.append(f"{path}: {e.strerror or e}")
        if errors:
            self.failed += errors
            return
        log.info("removed %s", path)
        self.removed.append(str(path))

    def finish_interrupted(self, *parents: Path) -> None:
        """Remove what an earlier prune renamed but could not delete."""
        for parent in parents:
            for leftover in parent.glob(f"{DELETING_PREFIX}*") if parent.is_dir() else []:
                self.remove(leftover)


def prune(
    storage: Path,
    model_name: str,
    limits: Limits,
    run_id: str | None = None,
    keep_versions: tuple[int, ...] = (),
    abandoned_after: float = 0,
    location: ModelRepository | None = None,
) -> list[str]:
    """Delete what is beyond the limits; return what was deleted (paths, or URLs of
    versions). Runs and inference results are on the volume. Raises PipelineFailure
    naming everything it could not remove, after removing all it could."""
    if not storage.is_dir():  # a mistyped --storage must not look like a clean volume
        raise UsageError(
            f"storage {storage} does not exist: check --storage (MNIST_PIPELINE_STORAGE)"
        )
    removal = Removal()
    repo = open_repository(repository_at(location, storage), model_name)
    # Under the repository's lock: an export publishing an older run's checkpoint at this
    # moment would otherwise lose that checkpoint, and best_model.pth with it.
    with repo.lock.held("prune"):
        removal.finish_interrupted(checkpoints_dir(storage), inference_dir(storage),
                                   canary_dir(storage))  # fmt: skip
        scan = repo.repair()
        best = _best_run(storage)
        protected_runs = {best, run_id} - {None}
        kept = {*keep_versions, *_chosen_by(repo, run_id), *_served(repo, abandoned_after)}
        recorded = [v for v in scan.having(PUBLISHED, DAMAGED) if v.ledger or v.metadata]
        _prune_versions(removal, repo, recorded, limits.versions, kept, protected_runs)
        # A version that stays keeps the checkpoint it was exported from.
        backing = {v.run_id for v in repo.scan().having(PUBLISHED, DAMAGED)} - {None}
        _prune_runs(removal, storage, limits.runs, protected_runs | backing, abandoned_after)
    _prune_inference(removal, storage, limits.inference)
    log.info("retention: removed %d folder(s), keeping %s", len(removal.removed), limits)
    if removal.failed:
        raise PipelineFailure(f"could not remove {'; '.join(removal.failed)}")
    return removal.removed


def _prune_versions(
    removal: Removal,
    repo: Repository,
    found: list[Version],
    limit: int,
    kept: set[int],
    protected_runs: set[str | None],
) -> None:
    """Beyond the newest `limit` versions, those neither kept nor published by a
    protected run; the newest always stays. Their numbers stay in the ledger."""
    if not limit or not found:
        return
    for version in found[:-limit]:
        if version is found[-1] or version.number in kept or version.run_id in protected_runs:
            continue
        removal.run(repo.url(str(version.number)), partial(repo.delete_version, version.number))


def _prune_runs(
    removal: Removal,
    storage: Path,
    limit: int,
    protected: set[str | None],
    abandoned_after: float,
) -> None:
    """Beyond the newest `limit` runs (by last change), those not protected and not
    able to resume (unless abandoned)."""
    checkpoints = checkpoints_dir(storage)
    runs = sorted(
        (d for d in (checkpoints.iterdir() if checkpoints.is_dir() else []) if d.is_dir()),
        key=lambda d: d.stat().st_mtime,
    )
    runs = [d for d in runs if not d.name.startswith(".")]
    if not limit:
        return
    for run in runs[:-limit]:
        if run.name in protected:
            continue
        if _may_resume(run) and not _abandoned(run, abandoned_after):
            continue
        removal.remove(run)
        if (probes := canary_dir(storage) / run.name).is_dir():
            removal.remove(probes)


def _prune_inference(removal: Removal, storage: Path, limit: int) -> None:
    results = inference_dir(storage)
    folders = sorted(
        d for d in (results.iterdir() if results.is_dir() else []) if not d.name.startswith(".")
    )
    if not limit:
        return
    for folder in folders[:-limit]:
        removal.remove(folder)
