"""Bounded storage: keep the newest few runs, model versions and inference results.

A long-lived volume (the chart's 5 Gi claim) otherwise fills up: every run leaves an
89 MB resume.pth and model.pth, every publication a version. What is never deleted,
whatever the limits: the newest version (Triton serves it), any version asked to be
kept (a pinned servedVersion), the run that checkpoints/best_model.pth points at, the
current run, the versions those two published, the version the current run's export
chose (published or kept), and runs still marked "running" or
"interrupted" (they may resume), unless nothing in them changed for `abandoned_after`
seconds: a run whose pods were deleted (`helm uninstall` mid-training) stays "running"
forever otherwise.

Deletion first renames a folder to a dot-name (ignored by Triton and by every stage),
then removes it, so a reader never sees half a folder; a version on object storage loses
its marker (metadata.json) first. Standard library only (boto3 for an object-storage
repository): the lean client image runs it.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from mnist_pipeline.storage import (
    DELETING_PREFIX,
    ExportStatus,
    ModelRepository,
    RecordReader,
    RunStatus,
    UsageError,
    best_model_link,
    checkpoints_dir,
    export_records,
    inference_dir,
    read_metadata,
    read_metrics,
    repository_at,
    resolve_served_version,
    version_dirs,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """How many of each to keep; 0 keeps all."""

    runs: int = 5
    versions: int = 3
    inference: int = 20

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


def _published_by(meta: dict[str, Any] | None) -> str | None:
    run_id = (meta or {}).get("run_id")
    return run_id if isinstance(run_id, str) else None


def _chosen_by(
    storage: Path, model_name: str, run_id: str | None, records: RecordReader
) -> set[int]:
    """The version of `model_name` run `run_id`'s export chose (published, or kept as
    better), if it chose one: the version that run's pods serve."""
    if run_id is None or not checkpoints_dir(storage).joinpath(run_id).is_dir():
        return set()
    record = records(run_id)[0] or {}
    if record.get("model_name") != model_name or record.get("status") in (
        None,
        ExportStatus.FAILED,
    ):
        return set()
    return {int(resolve_served_version(storage, model_name, "run", run_id, records))}


def _remove(path: Path) -> None:
    hidden = path.with_name(f"{DELETING_PREFIX}{path.name}")
    path.rename(hidden)
    shutil.rmtree(hidden)
    log.info("removed %s", path)


def prune(
    storage: Path,
    model_name: str,
    limits: Limits,
    run_id: str | None = None,
    keep_versions: tuple[int, ...] = (),
    abandoned_after: float = 0,
    repo: ModelRepository | None = None,
) -> list[str]:
    """Delete what is beyond the limits; return what was deleted (paths, or URLs of
    versions on object storage). Runs and inference results are on the volume."""
    if not storage.is_dir():  # a mistyped --storage must not look like a clean volume
        raise UsageError(
            f"storage {storage} does not exist: check --storage (MNIST_PIPELINE_STORAGE)"
        )
    best = _best_run(storage)
    protected_runs = {best, run_id} - {None}
    repo = repository_at(repo, storage)
    records = export_records(storage, repo, model_name)
    kept = {*keep_versions, *_chosen_by(storage, model_name, run_id, records)}
    deleted = _prune_versions(_versions(repo, model_name), limits.versions, kept, protected_runs)
    deleted += map(str, _prune_runs(storage, limits.runs, protected_runs, abandoned_after))
    deleted += map(str, _prune_inference(storage, limits.inference))
    log.info("retention: removed %d folder(s), keeping %s", len(deleted), limits)
    return deleted


@dataclass(frozen=True)
class Version:
    number: int
    published_by: str | None
    where: str
    remove: Callable[[], None]


def _versions(repo: ModelRepository, model_name: str) -> list[Version]:
    """The model's versions, ascending: folders, or versions on object storage that count
    (their marker first to go when one is deleted, so that half deleted it counts no more)."""
    if repo.is_s3:
        from mnist_pipeline import objectstore

        model = objectstore.S3Model(repo, model_name)
        return [
            Version(
                n,
                _published_by(model.metadata(n)),
                model.url(str(n)),
                partial(model.delete_version, n),
            )
            for n in model.versions()
        ]
    assert repo.folder is not None
    return [
        Version(int(p.name), _published_by(read_metadata(p)), str(p), partial(_remove, p))
        for p in version_dirs(repo.folder / model_name)
    ]


def _prune_versions(
    found: list[Version], limit: int, kept: set[int], protected_runs: set[str | None]
) -> list[str]:
    """Beyond the newest `limit` versions, those neither kept nor published by a
    protected run; the newest (Triton serves it) always stays."""
    if not limit or not found:
        return []
    deleted = []
    for version in found[:-limit]:
        if version is found[-1] or version.number in kept:
            continue
        if version.published_by in protected_runs:
            continue
        version.remove()
        deleted.append(version.where)
    return deleted


def _prune_runs(
    storage: Path, limit: int, protected: set[str | None], abandoned_after: float
) -> list[Path]:
    """Beyond the newest `limit` runs (by last change), those not protected and not
    able to resume (unless abandoned)."""
    checkpoints = checkpoints_dir(storage)
    runs = sorted(
        (d for d in (checkpoints.iterdir() if checkpoints.is_dir() else []) if d.is_dir()),
        key=lambda d: d.stat().st_mtime,
    )
    runs = [d for d in runs if not d.name.startswith(".")]
    if not limit:
        return []
    deleted = []
    for run in runs[:-limit]:
        if run.name in protected:
            continue
        if _may_resume(run) and not _abandoned(run, abandoned_after):
            continue
        _remove(run)
        deleted.append(run)
    return deleted


def _prune_inference(storage: Path, limit: int) -> list[Path]:
    results = inference_dir(storage)
    folders = sorted(
        d for d in (results.iterdir() if results.is_dir() else []) if not d.name.startswith(".")
    )
    if not limit:
        return []
    for folder in folders[:-limit]:
        _remove(folder)
    return folders[:-limit]
