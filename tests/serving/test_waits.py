"""`mnist-pipeline wait`: the chart's ordering, on artifacts and (optionally) Job status."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from mnist_pipeline import waits
from mnist_pipeline.errors import PipelineFailure, UsageError
from mnist_pipeline.kube import JobState, KubeApi
from mnist_pipeline.storage import (
    DEFAULT_MODEL_NAME,
    atomic_write_json,
)

REPO = Path(__file__).resolve().parents[2]
RUN = "20261124-101010-abcd-r1"


def wait_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "mnist_pipeline", "wait", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def write_metrics(storage: Path, run_id: str, status: str, **extra: Any) -> None:
    atomic_write_json(
        storage / "checkpoints" / run_id / "metrics.json", {"status": status, **extra}
    )


def write_export(storage: Path, run_id: str, status: str, version: int | None) -> None:
    atomic_write_json(  # the run's record, which export keeps in the repository
        storage / "models" / DEFAULT_MODEL_NAME / ".export" / "runs" / f"{run_id}.json",
        {
            "status": status,
            "model_name": DEFAULT_MODEL_NAME,
            "version": version,
            "reason": f"test says {status}",
        },
    )


def publish_version(storage: Path, version: int, name: str = DEFAULT_MODEL_NAME) -> None:
    model = storage / "models" / name
    (model / str(version)).mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(f'name: "{name}"\n')
    (model / str(version) / "model.onnx").write_bytes(b"onnx")
    files = {"model.onnx": {"bytes": 4}}  # what a version is checked against
    (model / str(version) / "metadata.json").write_text(
        json.dumps({"version": version, "files": files})
    )


def test_training_complete_passes(tmp_path: Path) -> None:
    write_metrics(tmp_path, RUN, "complete")
    r = wait_cli("training", f"--storage={tmp_path}", f"--run-id={RUN}", "--wait-timeout=10")
    assert r.returncode == 0, r.stderr


def test_training_failed_fails_at_once(tmp_path: Path) -> None:
    write_metrics(tmp_path, RUN, "failed", error="RuntimeError: boom")
    start = time.monotonic()
    r = wait_cli("training", f"--storage={tmp_path}", f"--run-id={RUN}", "--wait-timeout=60")
    assert r.returncode == 1
    assert time.monotonic() - start < 20
    assert "boom" in r.stderr


def test_an_earlier_runs_artifacts_never_satisfy_the_wait(tmp_path: Path) -> None:
    # Same volume, an earlier install's run (same revision number, other install token).
    earlier = "20251001-090000-wxyz-r1"
    write_metrics(tmp_path, earlier, "complete")
    write_export(tmp_path, earlier, "published", 1)
    publish_version(tmp_path, 1)
    r = wait_cli(
        "export",
        f"--storage={tmp_path}",
        f"--run-id={RUN}",
        "--wait-timeout=1.5",
        "--wait-interval=0.2",
    )
    assert r.returncode == 1
    assert "gave up after" in r.stderr and RUN in r.stderr


def test_training_wait_sees_the_artifact_appear(tmp_path: Path) -> None:
    timer = threading.Timer(1.0, write_metrics, (tmp_path, RUN, "complete"))
    timer.start()
    try:
        r = wait_cli(
            "training",
            f"--storage={tmp_path}",
            f"--run-id={RUN}",
            "--wait-timeout=20",
            "--wait-interval=0.2",
        )
    finally:
        timer.cancel()
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("status", ["published", "skipped"])
def test_export_done_with_a_servable_version_passes(tmp_path: Path, status: str) -> None:
    write_metrics(tmp_path, RUN, "complete")
    write_export(tmp_path, RUN, status, 2)
    publish_version(tmp_path, 1)
    publish_version(tmp_path, 2)
    r = wait_cli("export", f"--storage={tmp_path}", f"--run-id={RUN}", "--wait-timeout=10")
    assert r.returncode == 0, r.stderr


def test_export_failed_fails(tmp_path: Path) -> None:
    write_metrics(tmp_path, RUN, "complete")
    write_export(tmp_path, RUN, "failed", None)
    r = wait_cli("export", f"--storage={tmp_path}", f"--run-id={RUN}", "--wait-timeout=60")
    assert r.returncode == 1 and "test says failed" in r.stderr


def test_export_wait_fails_at_once_when_training_failed(tmp_path: Path) -> None:
    write_metrics(tmp_path, RUN, "failed", error="diverged")
    r = wait_cli("export", f"--storage={tmp_path}", f"--run-id={RUN}", "--wait-timeout=60")
    assert r.returncode == 1 and "diverged" in r.stderr


def test_export_naming_a_version_that_is_not_there_fails(tmp_path: Path) -> None:
    write_metrics(tmp_path, RUN, "complete")
    write_export(tmp_path, RUN, "published", 3)
    publish_version(tmp_path, 1)
    r = wait_cli("export", f"--storage={tmp_path}", f"--run-id={RUN}", "--wait-timeout=60")
    assert r.returncode == 1 and "would not serve it" in r.stderr


def test_serving_wait_times_out_without_triton(tmp_path: Path) -> None:
    write_metrics(tmp_path, RUN, "complete")
    write_export(tmp_path, RUN, "published", 1)
    publish_version(tmp_path, 1)
    r = wait_cli(
        "serving",
        f"--storage={tmp_path}",
        f"--run-id={RUN}",
        "--http-url=127.0.0.1:9",
        "--wait-timeout=1",
        "--wait-interval=0.2",
    )
    assert r.returncode == 1 and "waiting for Triton" in r.stderr


def test_a_damaged_artifact_fails_at_once_naming_the_file(tmp_path: Path) -> None:
    metrics = tmp_path / "checkpoints" / RUN / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text('{"status": "comp')
    r = wait_cli("training", f"--storage={tmp_path}", f"--run-id={RUN}", "--wait-timeout=60")
    assert r.returncode == 2, r.stderr
    assert f"training record {metrics} is damaged" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_version_without_metadata_is_not_servable(tmp_path: Path) -> None:
    write_metrics(tmp_path, RUN, "complete")
    write_export(tmp_path, RUN, "published", 1)
    publish_version(tmp_path, 1)
    (tmp_path / "models" / DEFAULT_MODEL_NAME / "1" / "metadata.json").unlink()
    # Damage, never a version to wait for: named, with what publishes it again.
    with pytest.raises(PipelineFailure, match=r"which is damaged: .* holds no metadata\.json"):
        waits.export_check(tmp_path, RUN, DEFAULT_MODEL_NAME)()


class TritonModels(BaseHTTPRequestHandler):
    """Answers Triton's readiness endpoints for the paths in `ready`."""

    ready: ClassVar[set[str]] = set()

    def do_GET(self) -> None:
        self.send_response(200 if self.path in self.ready else 400)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def triton_http() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), TritonModels)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    TritonModels.ready = {"/v2/health/ready"}
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()


def test_serving_waits_for_the_version_the_run_exported(tmp_path: Path, triton_http: str) -> None:
    write_metrics(tmp_path, RUN, "complete")
    write_export(tmp_path, RUN, "skipped", 1)  # kept the better version 1
    publish_version(tmp_path, 1)
    publish_version(tmp_path, 2)
    check = waits.serving_check(tmp_path, RUN, DEFAULT_MODEL_NAME, triton_http, "run")
    newest = waits.serving_check(tmp_path, RUN, DEFAULT_MODEL_NAME, triton_http)
    TritonModels.ready.add(f"/v2/models/{DEFAULT_MODEL_NAME}/versions/2/ready")
    assert "versions/1" in (check() or "")
    TritonModels.ready.add(f"/v2/models/{DEFAULT_MODEL_NAME}/ready")
    assert newest() is None  # the default: any version Triton serves
    TritonModels.ready.add(f"/v2/models/{DEFAULT_MODEL_NAME}/versions/1/ready")
    assert check() is None


def test_serving_refuses_a_malformed_version_at_once(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="model version '01': expected run, challenger"):
        waits.serving_check(tmp_path, RUN, DEFAULT_MODEL_NAME, "127.0.0.1:9", "01")


def test_bad_timeout_is_a_usage_error(tmp_path: Path) -> None:
    r = wait_cli("training", f"--storage={tmp_path}", f"--run-id={RUN}", "--wait-timeout=-1")
    assert r.returncode == 2


# The Kubernetes API: a stand-in API server answering GET on one namespace's Jobs, as the
# real one does (no cluster can run here).


class FakeJobs(BaseHTTPRequestHandler):
    jobs: ClassVar[dict[str, dict[str, Any]]] = {}
    seen_auth: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen_auth.append(self.headers.get("Authorization", ""))
        prefix = "/apis/batch/v1/namespaces/ml/jobs/"
        name = self.path.removeprefix(prefix)
        job = self.jobs.get(name) if self.path.startswith(prefix) else None
        body = json.dumps(job or {"kind": "Status", "code": 404}).encode()
        self.send_response(200 if job else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def api(tmp_path: Path) -> Iterator[KubeApi]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJobs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    FakeJobs.jobs, FakeJobs.seen_auth = {}, []
    yield KubeApi(f"http://127.0.0.1:{server.server_port}", "ml", token_file=token)
    server.shutdown()


def job(condition: str | None, reason: str = "") -> dict[str, Any]:
    conditions = [{"type": condition, "status": "True", "reason": reason}] if condition else []
    return {"kind": "Job", "status": {"conditions": conditions}}


def test_a_failed_job_fails_the_wait_although_its_artifact_says_running(
    tmp_path: Path, api: KubeApi
) -> None:
    # OOM-killed until backoffLimit: the pod never got to write "failed".
    write_metrics(tmp_path, RUN, "running")
    FakeJobs.jobs["demo-train-r1"] = job("Failed", "BackoffLimitExceeded")
    w = waits.Wait("training", timeout=30, interval=0.1, api=api, job="demo-train-r1")
    with pytest.raises(PipelineFailure, match="BackoffLimitExceeded"):
        w.run(waits.training_check(tmp_path, RUN))
    assert FakeJobs.seen_auth[-1] == "Bearer secret-token"


def test_a_deleted_job_leaves_the_artifacts_to_decide(tmp_path: Path, api: KubeApi) -> None:
    # ttlSecondsAfterFinished removed the Job long ago; the run's artifacts remain.
    write_metrics(tmp_path, RUN, "complete")
    write_export(tmp_path, RUN, "published", 1)
    publish_version(tmp_path, 1)
    w = waits.Wait("export", timeout=5, interval=0.1, api=api, job="demo-export-r1")
    w.run(waits.export_check(tmp_path, RUN, DEFAULT_MODEL_NAME))
    assert KubeApi.job_state(api, "demo-export-r1") == JobState("absent")


def test_a_complete_job_without_its_artifact_fails_after_the_grace(
    tmp_path: Path, api: KubeApi
) -> None:
    FakeJobs.jobs["demo-train-r1"] = job("Complete")
    w = waits.Wait("training", 30, 0.1, api, "demo-train-r1", visibility_grace=1.0)
    started = time.monotonic()
    with pytest.raises(PipelineFailure, match=r"completed 1 s ago but waiting for .*same volume"):
        w.run(waits.training_check(tmp_path, RUN))
    assert 1.0 <= time.monotonic() - started < 10


@pytest.mark.parametrize("stage", ["training", "export"])
def test_an_artifact_shown_late_after_its_job_completed_is_waited_for(
    tmp_path: Path, api: KubeApi, stage: str
) -> None:
    """NFS (EFS, Filestore): another node's file appears after the attribute cache expires,
    though its Job is Complete already. Before the grace, this failed after 0.0 s."""
    if stage == "export":  # trained and published; only its record is not visible yet
        write_metrics(tmp_path, RUN, "complete")
        publish_version(tmp_path, 1)
    late = {
        "training": lambda: write_metrics(tmp_path, RUN, "complete"),
        "export": lambda: write_export(tmp_path, RUN, "published", 1),
    }[stage]
    check = {
        "training": waits.training_check(tmp_path, RUN),
        "export": waits.export_check(tmp_path, RUN, DEFAULT_MODEL_NAME),
    }[stage]
    FakeJobs.jobs["demo-job"] = job("Complete")
    threading.Timer(2.0, late).start()
    w = waits.Wait(stage, 30, 0.1, api, "demo-job", visibility_grace=15)
    started = time.monotonic()
    w.run(check)
    assert time.monotonic() - started >= 2.0


def test_an_active_job_keeps_the_wait_going(tmp_path: Path, api: KubeApi) -> None:
    FakeJobs.jobs["demo-train-r1"] = job(None)
    threading.Timer(0.5, write_metrics, (tmp_path, RUN, "complete")).start()
    w = waits.Wait("training", timeout=20, interval=0.1, api=api, job="demo-train-r1")
    w.run(waits.training_check(tmp_path, RUN))


def test_in_cluster_needs_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert KubeApi.in_cluster(None, sa_dir=tmp_path) is None
    (tmp_path / "token").write_text("t")
    (tmp_path / "namespace").write_text("team-b\n")
    found = KubeApi.in_cluster(None, sa_dir=tmp_path)
    assert found is not None
    assert found.namespace == "team-b" and found.base_url == "https://10.0.0.1:443"


def test_an_unreachable_api_is_named_at_every_progress_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A default-deny egress policy drops the API: every progress line says so."""
    from harness.ports import free_ports

    (closed,) = free_ports(1)
    api = KubeApi(f"http://127.0.0.1:{closed}", "ml")
    w = waits.Wait("training", timeout=1, interval=0.2, api=api, job="j", report_every=0)
    with caplog.at_level("INFO"), pytest.raises(PipelineFailure, match="gave up"):
        w.run(waits.training_check(tmp_path, RUN))
    progress = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert len(progress) >= 2
    assert all("Kubernetes API unreachable" in line for line in progress), progress


def test_a_retried_training_attempt_keeps_the_waits_going(tmp_path: Path, api: KubeApi) -> None:
    """A worker lost mid-run: rank 0 wrote "retrying", the Job retries, the retry
    completes; neither the training nor the export wait gives up meanwhile."""
    write_metrics(tmp_path, RUN, "retrying", error="rank 0 lost contact with the other ranks")
    FakeJobs.jobs["demo-train-r1"] = job(None)
    check = waits.training_check(tmp_path, RUN)
    assert "being retried" in (check() or "") and "lost contact" in (check() or "")
    exported = waits.export_check(tmp_path, RUN, DEFAULT_MODEL_NAME)
    assert "being retried" in (exported() or "")

    def retry_completes() -> None:
        write_metrics(tmp_path, RUN, "complete")
        write_export(tmp_path, RUN, "published", 1)
        publish_version(tmp_path, 1)

    threading.Timer(0.5, retry_completes).start()
    w = waits.Wait("export", timeout=20, interval=0.1, api=api, job="demo-train-r1")
    w.run(exported)


def test_retrying_ends_when_the_job_has_failed_for_good(tmp_path: Path, api: KubeApi) -> None:
    write_metrics(tmp_path, RUN, "retrying", error="rank 1 lost contact with the other ranks")
    FakeJobs.jobs["demo-train-r1"] = job("Failed", "BackoffLimitExceeded")
    w = waits.Wait("export", timeout=30, interval=0.1, api=api, job="demo-train-r1")
    with pytest.raises(PipelineFailure, match="BackoffLimitExceeded"):
        w.run(waits.export_check(tmp_path, RUN, DEFAULT_MODEL_NAME))


def test_retrying_without_an_api_waits_until_the_timeout(tmp_path: Path) -> None:
    """No token: only a for-good record would end the wait; "retrying" is not one."""
    write_metrics(tmp_path, RUN, "retrying", error="rank 1 lost contact")
    r = wait_cli(
        "export", f"--storage={tmp_path}", f"--run-id={RUN}", "--wait-timeout=1.5",
        "--wait-interval=0.2",
    )  # fmt: skip
    assert r.returncode == 1 and "gave up after" in r.stderr and "being retried" in r.stderr
