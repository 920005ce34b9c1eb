"""Waits that order the stages on Kubernetes: the Helm chart's initContainers run them.

Each wait watches an ARTIFACT on the shared storage, keyed by the run id the chart gives
every release revision, so nothing left on the volume by an earlier release can satisfy it:

    training  checkpoints/<run_id>/metrics.json has status "complete"
    export    the run's export record in the repository is "published" or "skipped",
              and the version it names is servable
    serving   Triton answers ready over HTTP, serving the --model-version asked for
              (run: the version export chose; N: a pinned one; nothing: any)

A stage that fails writes "failed" into its artifact and the wait fails at once; a training
attempt that lost a worker writes "retrying", which is no answer (the Job retries). A stage
whose pods die without writing anything (OOM-killed until its Job's backoffLimit, an
activeDeadlineSeconds) is seen through the Kubernetes API when the pod has a service
account token: the Job's Failed condition fails the wait too. A Job that no longer exists
(deleted by ttlSecondsAfterFinished, long before a Triton pod restarts) is no answer, so
the wait falls back to the artifacts. A Job complete while its artifact is not visible yet
(NFS shows another node's files late) is looked at for --visibility-grace seconds more.
Every wait gives up after --wait-timeout seconds.

Standard library only (boto3 for an object-storage repository): the lean client image
(no torch) runs these too.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mnist_pipeline import settings
from mnist_pipeline.errors import PipelineFailure
from mnist_pipeline.kube import KubeApi
from mnist_pipeline.repository import open_repository, republish_hint, resolve_version
from mnist_pipeline.storage import (
    METRICS_FILE,
    ExportStatus,
    ModelRepository,
    RunStatus,
    check_model_version,
    read_metrics,
    repository_at,
    run_dir,
)

log = logging.getLogger(__name__)


@dataclass
class Wait:
    """Poll `check` until it says done, fails, or time runs out."""

    what: str
    timeout: float
    interval: float = 5.0
    api: KubeApi | None = None
    job: str | None = None
    report_every: float = 60.0
    # How long a completed Job's artifact may take to show on this node's view of the
    # volume: NFS caches attributes and missing names for 30-60 s by default.
    visibility_grace: float = 120.0

    def run(self, check: Callable[[], str | None]) -> None:
        """`check` returns None when done, else a line saying what it still waits for;
        it raises PipelineFailure when what it waits for has failed."""
        start = time.monotonic()
        last_report = -self.report_every
        completed_at: float | None = None
        if self.job and self.api is None:
            log.info("no Kubernetes API token in this pod: watching storage only")
        while True:
            waiting_for = check()
            if waiting_for is None:
                log.info("%s: ready after %.0f s", self.what, time.monotonic() - start)
                return
            job = self.api.job_state(self.job) if self.api and self.job else None
            if job is not None and job.phase == "failed":
                raise PipelineFailure(f"{self.what}: Job {self.job} failed ({job.detail})")
            if job is not None and job.phase == "complete" and completed_at is None:
                # The Job wrote its artifact before it completed; this node may not see it
                # yet (NFS), so look a while longer, not forever.
                completed_at = time.monotonic()
                log.info(
                    "%s: Job %s completed but %s; looking for up to %.0f s more "
                    "(a shared volume may show it late)",
                    self.what,
                    self.job,
                    waiting_for,
                    self.visibility_grace,
                )
            if (
                completed_at is not None
                and time.monotonic() - completed_at >= self.visibility_grace
            ):
                raise PipelineFailure(
                    f"{self.what}: Job {self.job} completed {self.visibility_grace:.0f} s ago "
                    f"but {waiting_for}; does it write to the same volume?"
                )
            elapsed = time.monotonic() - start
            if elapsed >= self.timeout:
                raise PipelineFailure(
                    f"{self.what}: gave up after {self.timeout:.0f} s, still {waiting_for}"
                )
            if elapsed - last_report >= self.report_every:
                suffix = f" (Job {self.job}: {job.phase})" if job else ""
                if self.api and self.api.error:
                    suffix = (
                        f" (Kubernetes API unreachable, {self.api.error}: a failed Job is "
                        "noticed only through its artifact; see networkPolicy.egress)"
                    )
                log.info("%s: %s%s", self.what, waiting_for, suffix)
                last_report = elapsed
            left = self.timeout - elapsed
            if completed_at is not None:
                left = min(left, completed_at + self.visibility_grace - time.monotonic())
            time.sleep(min(self.interval, max(0.0, left)))


def training_check(storage: Path, run_id: str) -> Callable[[], str | None]:
    run = run_dir(storage, run_id)

    def check() -> str | None:
        metrics = read_metrics(run)
        if metrics is None:
            return f"waiting for {run / METRICS_FILE} to appear"
        status = metrics.get("status")
        if status == RunStatus.COMPLETE:
            return None
        if status == RunStatus.FAILED:
            raise PipelineFailure(f"training run {run_id} failed: {metrics.get('error', '?')}")
        epochs = len(metrics.get("history") or [])
        if status == RunStatus.RETRYING:
            # Not final: the Job's Failed condition (Wait.run) ends the wait if no retry comes.
            return (
                f"training run {run_id}: an attempt failed and is being retried "
                f"({metrics.get('error', '?')}; {epochs} epoch(s) done)"
            )
        return f"training run {run_id} is {status} ({epochs} epoch(s) done)"

    return check


def export_check(
    storage: Path, run_id: str, model_name: str, location: ModelRepository | None = None
) -> Callable[[], str | None]:
    """The run's export record and the version it names, read from the repository (a
    bucket needs no volume: the Triton pod that waits has none)."""
    repo = open_repository(repository_at(location, storage), model_name)
    trained = training_check(storage, run_id)

    def check() -> str | None:
        record = repo.read_record(run_id)
        if record is None:
            waiting = f"waiting for {repo.url(repo.record_key(run_id))} to appear"
            # A failed training run means no export will come: say so now, not at the
            # timeout (where the volume is mounted).
            return (trained() or waiting) if storage.is_dir() else waiting
        status = record.get("status")
        if status == ExportStatus.FAILED:
            raise PipelineFailure(f"export of run {run_id} failed: {record.get('reason', '?')}")
        if status not in (ExportStatus.PUBLISHED, ExportStatus.SKIPPED):
            return f"export of run {run_id} is {status}"
        scan = repo.scan()
        versions, version = scan.servable, record.get("version")
        if isinstance(version, int) and version in scan.damaged:
            raise PipelineFailure(
                f"export of run {run_id} chose version {version} of {model_name}, which is "
                f"damaged: {scan.damaged[version]}; {republish_hint(scan.versions[version])}"
            )
        # Published: the new version; skipped: the better one already there. Either is in
        # the repository by now, so a missing one will not come later.
        if version not in versions:
            raise PipelineFailure(
                f"export of run {run_id} was {status} naming version {version} of "
                f"{model_name}, but {repo} holds {versions or 'no servable version'}: "
                "Triton would not serve it"
            )
        log.debug("export %s; servable versions of %s: %s", status, model_name, versions)
        return None

    return check


def http_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False


def serving_check(
    storage: Path,
    run_id: str,
    model_name: str,
    url: str,
    version: str = "",
    repo: ModelRepository | None = None,
) -> Callable[[], str | None]:
    """Triton ready and serving `version` (a --model-version): "run" the one export chose
    for this run (new or kept), N that version (a pinned triton.servedVersion), "" any."""
    check_model_version(version)  # a typo fails now, not at the timeout
    exported = export_check(storage, run_id, model_name, repo)
    repository = open_repository(repository_at(repo, storage), model_name)
    base = (url if "://" in url else f"http://{url}").rstrip("/")

    def check() -> str | None:
        if (waiting_for := exported()) is not None:
            return waiting_for
        model_url = f"{base}/v2/models/{model_name}"
        if wanted := resolve_version(repository, version, run_id):
            model_url += f"/versions/{wanted}"
        if not http_ready(f"{base}/v2/health/ready"):
            return f"waiting for Triton at {base} to be ready"
        if not http_ready(f"{model_url}/ready"):
            return f"waiting for Triton to serve {model_url}"
        return None

    return check


@dataclass(frozen=True)
class WaitConfig(settings.Settings):
    """How a wait looks, and for how long (settings.py declares each)."""

    timeout: float = settings.WAIT_TIMEOUT.field()
    interval: float = settings.WAIT_INTERVAL.field()
    visibility_grace: float = settings.VISIBILITY_GRACE.field()
    job: str | None = settings.JOB.field()
    namespace: str | None = settings.NAMESPACE.field()

    def wait(self, what: str) -> Wait:
        api = KubeApi.in_cluster(self.namespace) if self.job else None
        return Wait(what, self.timeout, self.interval, api, self.job,
                    visibility_grace=self.visibility_grace)  # fmt: skip
