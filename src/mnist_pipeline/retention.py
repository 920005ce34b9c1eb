"""Bounded storage: keep the newest few runs, model versions and inference results.

A long-lived volume (the chart's 5 Gi claim) otherwise fills up: every run leaves an
89 MB resume.pth and model.pth, every publication a version. What is never deleted,
whatever the limits: the newest version (Triton serves it), any version asked to be
kept (a pinned servedVersion), the run that checkpoints/best_model.pth points at, the
current run, the versions those two published, and runs still marked "running" or
"interrupted" (they may resume), unless nothing in them changed for `abandoned_after`
seconds: a run whose pods were deleted (`helm uninstall` mid-training) stays "running"
forever otherwise.

Deletion first renames a folder to a dot-name (ignored by Triton and by every stage),
then removes it, so a reader never sees half a folder. Standard library only: the lean
client image runs it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from mnist_pipeline.storage import (
    UsageError,
    best_model_link,
    checkpoints_dir,
    inference_dir,
    models_dir,
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


def _status(run: Path) -> str:
    try:
        return str(json.loads((run / "metrics.json").read_text()).get("status", ""))
    except (OSError, ValueError, AttributeError):
        return ""


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


def _published_by(version: Path) -> str | None:
    try:
        return str(json.loads((version / "metadata.json").read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove(path: Path) -> None:
    hidden = path.with_name(f".deleting-{path.name}")
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
) -> list[Path]:
    """Delete what is beyond the limits; return what was deleted."""
    if not storage.is_dir():  # a mistyped --storage must not look like a clean volume
        raise UsageError(f"storage {storage} does not exist: check --storage (STORAGE_ROOT)")
    deleted: list[Path] = []
    best = _best_run(storage)

    model = models_dir(storage) / model_name
    protected = {best, run_id} - {None}
    versions = sorted(
        (int(d.name), d) for d in (model.iterdir() if model.is_dir() else []) if d.name.isdigit()
    )
    if limits.versions and versions:
        newest = versions[-1][0]
        for number, folder in versions[: -limits.versions]:
            if number == newest or number in keep_versions or _published_by(folder) in protected:
                continue
            _remove(folder)
            deleted.append(folder)

    checkpoints = checkpoints_dir(storage)
    runs = sorted(
        (d for d in (checkpoints.iterdir() if checkpoints.is_dir() else []) if d.is_dir()),
        key=lambda d: d.stat().st_mtime,
    )
    runs = [d for d in runs if not d.name.startswith(".")]
    if limits.runs:
        for run in runs[: -limits.runs]:
            if run.name in (run_id, best):
                continue
            if _status(run) in ("running", "interrupted") and not _abandoned(run, abandoned_after):
                continue
            _remove(run)
            deleted.append(run)

    results = inference_dir(storage)
    folders = sorted(
        d for d in (results.iterdir() if results.is_dir() else []) if not d.name.startswith(".")
    )
    if limits.inference:
        for folder in folders[: -limits.inference]:
            _remove(folder)
            deleted.append(folder)
    log.info("retention: removed %d folder(s), keeping %s", len(deleted), limits)
    return deleted
