"""Tracking and the model registry against a real `mlflow server` (sqlite backend,
artifacts in a folder): what an MLflow user sees of a training run and of the published
versions, and that a server that is down fails nothing."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.mlflow import MlflowServer
from harness.objectstore import LocalRadosgw
from harness.pipeline import MODEL, cli
from harness.ports import free_ports

pytestmark = pytest.mark.slow

QUICK = "--limit-train 1024 --limit-test 500 --epochs 2 --eval-every 4 --threads 1".split()
EXPORT = ("--publish-min-accuracy", "0.05")  # two quick epochs score far below the default


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def test_a_run_is_tracked_and_its_published_version_registered(
    storage: Path, mlflow: MlflowServer
) -> None:
    """Trained by 2 DDP ranks: rank 0 alone tracks, one MLflow run."""
    tracked = ("--tracking-uri", mlflow.uri, "--experiment", "tracked")
    ddp = ("--nproc-per-node", "2")
    cli("train", "--storage", storage, *QUICK, "--run-id", "r1", *ddp, *tracked, check=True)
    metrics = json.loads((storage / "checkpoints/r1/metrics.json").read_text())

    (run,) = mlflow.runs("tracked")
    info, data = run["info"], run["data"]
    assert (info["run_name"], info["status"]) == ("r1", "FINISHED")
    params = {p["key"]: p["value"] for p in data["params"]}
    assert params["lr"] == str(metrics["hyperparameters"]["lr"])
    assert params["limit_train"] == "1024" and params["world_size"] == "2"
    epochs = [(h["epoch"], h["test_accuracy"]) for h in metrics["history"]]
    assert mlflow.history(info["run_id"], "test_accuracy") == epochs
    evals = [(e["step"], e["test_accuracy"]) for e in metrics["evals"]]
    assert mlflow.history(info["run_id"], "eval_test_accuracy") == evals
    assert [s for s, _ in evals] == [4, 8, 12, 16]
    final = mlflow.history(info["run_id"], "final_test_accuracy")
    assert final == [(0, metrics["test_accuracy"])]
    logged = mlflow.artifact(info["artifact_uri"], "train.log").decode()
    assert logged == (storage / "checkpoints/r1/train.log").read_text()
    assert "final test accuracy" in logged.splitlines()[-1]  # uploaded once it was complete

    result = cli("export", "--storage", storage, "--run-id", "r1", *EXPORT, *tracked, check=True)
    assert "move alias champion to repository version 1" in result.stderr
    (mv,) = mlflow.model_versions(MODEL)
    metadata = json.loads((storage / "models" / MODEL / "1/metadata.json").read_text())
    assert mv["run_id"] == info["run_id"]  # the model version links to its training run
    assert mv["tags"]["repository_version"] == "1"
    assert mv["tags"]["repository"] == str(storage / "models" / MODEL / "1")
    assert mv["tags"]["run_id"] == "r1" and mv["tags"]["state"] == "published"
    assert mv["tags"]["accuracy"] == str(metadata["accuracy"])
    assert mv["tags"]["sha256"] == metadata["sha256"]
    assert mv["source"] == f"{info['artifact_uri']}/repository-version-1"
    onnx = mlflow.artifact(mv["source"], "model.onnx")
    assert sha256(onnx) == metadata["sha256"]
    assert mlflow.aliases(MODEL) == {"champion": mv["version"]}

    status = cli("status", "--storage", storage, "--tracking-uri", mlflow.uri, check=True)
    assert f"registry {mlflow.uri}: champion -> version 1" in status.stdout
    assert "out of date" not in status.stdout  # in line: nothing left to change


def test_a_resumed_run_goes_on_in_its_mlflow_run(storage: Path, mlflow: MlflowServer) -> None:
    args = ["train", "--storage", storage, *QUICK, "--epochs", "3", "--run-id", "r4",
            "--tracking-uri", mlflow.uri, "--experiment", "resumed"]  # fmt: skip
    metrics = storage / "checkpoints/r4/metrics.json"
    proc = subprocess.Popen([sys.executable, "-m", "mnist_pipeline", *map(str, args)],
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        while not metrics.is_file() or not json.loads(metrics.read_text())["history"]:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # during epoch 2 of 3
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143
    (run,) = mlflow.runs("resumed")
    assert run["info"]["status"] == "KILLED"
    cli(*args, check=True)
    (run,) = mlflow.runs("resumed")  # the same MLflow run, ended this time
    assert run["info"]["status"] == "FINISHED"
    steps = [s for s, _ in mlflow.history(run["info"]["run_id"], "test_accuracy")]
    assert steps == [1, 2, 3]  # epoch 1 logged once, before and after the resume


def test_a_server_that_is_down_fails_nothing_and_sync_registry_catches_up(
    storage: Path, mlflow: MlflowServer, radosgw: LocalRadosgw
) -> None:
    """On a bucket repository: the mirror reads what the registry lacks from the bucket."""
    (dead_port,) = free_ports(1)
    bucket = radosgw.new_bucket()
    repo = ("--model-repository", radosgw.url(bucket), "--model-name", "down_model")
    down = {**radosgw.env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{dead_port}"}  # MLflow's
    tiny = ("--limit-train", "256", "--epochs", "1")
    trained = cli("train", "--storage", storage, *QUICK, *tiny, "--run-id", "r2", env=down)
    assert trained.returncode == 0, trained.stderr[-2000:]
    warnings = [line for line in trained.stderr.splitlines() if "without tracking" in line]
    assert len(warnings) == 1, trained.stderr  # said once, not once per epoch
    assert f"MLflow at http://127.0.0.1:{dead_port} is unreachable" in warnings[0]
    exported = cli("export", "--storage", storage, "--run-id", "r2", *EXPORT, *repo, env=down)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert "the registry missed this export; `mnist-pipeline sync-registry`" in exported.stderr

    live = (*repo, "--tracking-uri", mlflow.uri)
    status = cli("status", "--storage", storage, *live, env=radosgw.env, check=True)
    assert "out of date (`mnist-pipeline sync-registry` applies these):" in status.stdout
    assert "register repository version 1 (run r2)" in status.stdout
    synced = cli("sync-registry", "--storage", storage, *live, env=radosgw.env, check=True)
    assert "3 change(s) made" in synced.stdout  # the model, its version, the alias
    (mv,) = mlflow.model_versions("down_model")
    assert mv["tags"]["repository"] == f"s3://{radosgw.endpoint}/{bucket}/models/down_model/1"
    key = "models/down_model/1/model.onnx"
    onnx = radosgw.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert sha256(mlflow.artifact(mv["source"], "model.onnx")) == sha256(onnx)
    assert mlflow.aliases("down_model") == {"champion": mv["version"]}
    status = cli("status", "--storage", storage, *live, env=radosgw.env, check=True)
    assert "out of date" not in status.stdout

    # Damage in the repository is mirrored, never "repaired" in the registry's favour.
    radosgw.client().delete_object(Bucket=bucket, Key=key)
    cli("sync-registry", "--storage", storage, *live, env=radosgw.env, check=True)
    (mv,) = mlflow.model_versions("down_model")
    assert mv["tags"]["state"] == "damaged"
    assert mlflow.aliases("down_model") == {}  # nothing is servable: no champion
    assert key not in radosgw.bucket_objects(bucket)


def test_a_tracking_uri_mlflow_cannot_be_spoken_to_is_bad_input(storage: Path) -> None:
    result = cli("train", "--storage", storage, env={"MLFLOW_TRACKING_URI": "sqlite:///m.db"})
    assert result.returncode == 2
    assert "MLFLOW_TRACKING_URI='sqlite:///m.db' (the variable of '--tracking-uri')" in (
        result.stderr
    )
    assert "an MLflow server's http:// or https:// address" in result.stderr
    assert not (storage / "checkpoints").exists()
