"""`mnist-pipeline run`: every stage locally, on a small training subset."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from harness.objectstore import LocalRadosgw
from harness.pipeline import LIMIT_TRAIN, MODEL, PipelineRun, cli, port_variables, snapshot
from harness.serving import triton_processes
from mnist_pipeline.train import TrainConfig, default_run_id

pytestmark = pytest.mark.slow


def test_run_goes_from_data_to_measured_serving(pipeline: PipelineRun) -> None:
    storage, stdout = pipeline.storage, pipeline.result.stdout
    assert "mnist-pipeline run: done" in stdout
    assert "export           version 1 (first export)" in stdout
    assert "p50" in stdout and "p99" in stdout

    (run,) = [p for p in (storage / "checkpoints").iterdir() if p.is_dir()]
    assert (run / "model.pth").is_file()
    record = storage / "models" / MODEL / ".export" / "runs" / f"{run.name}.json"
    assert json.loads(record.read_text())["status"] == "published"
    assert sorted(p.name for p in run.iterdir()) == ["metrics.json", "model.pth", "train.log"]
    assert (storage / "models" / MODEL / "1" / "model.onnx").is_file()

    inference = pipeline.inference
    assert str(inference) in stdout
    latency = json.loads((inference / "latency.json").read_text())
    assert latency["status"] == "complete" and latency["count"] == 100
    assert latency["accuracy"] > 0.8
    assert f"p50 {latency['p50_ms']:.2f} ms" in stdout
    # The server it started is gone.
    assert triton_processes(f"--grpc-port={pipeline.grpc_port}") == []


def test_a_second_run_reuses_the_completed_run_and_says_so(
    pipeline: PipelineRun, tmp_path: Path
) -> None:
    """The default run id is a function of the settings, so `make run` twice
    trains once; the identical model is not exported again."""
    run_id = default_run_id(TrainConfig(limit_train=int(LIMIT_TRAIN)))
    assert [p.name for p in (pipeline.storage / "checkpoints").iterdir() if p.is_dir()] == [run_id]
    storage = tmp_path / "storage"
    shutil.copytree(pipeline.storage, storage, symlinks=True)
    model_before = snapshot(storage / "checkpoints" / run_id)
    ports = port_variables()
    result = cli(
        "run", "--storage", storage, "--limit-train", LIMIT_TRAIN, "--requests", "20",
        env={**os.environ, **ports},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run {run_id}: completed before: reusing it, not training again" in result.stderr
    assert "export           nothing published, identical to the published version 1" in (
        result.stdout
    )
    after = snapshot(storage / "checkpoints" / run_id)
    assert after == model_before  # train's folder: export writes nothing there
    assert [p.name for p in (storage / "models" / MODEL).iterdir() if p.is_dir()] == [
        ".export",
        "1",
    ]
    record = json.loads(
        (storage / "models" / MODEL / ".export" / "runs" / f"{run_id}.json").read_text()
    )
    assert [a["status"] for a in record["history"]] == ["published", "skipped"]


def test_run_publishes_to_and_serves_from_a_bucket(
    mnist_storage: Path, radosgw: LocalRadosgw, tmp_path: Path
) -> None:
    """--model-repository s3://… (or its variable) takes every stage of `run` to the
    bucket: the version, the run's record and the ledger are there, the volume keeps the
    checkpoints alone, and the client is served the bucket's version."""
    storage = tmp_path / "storage"
    shutil.copytree(mnist_storage, storage)
    bucket = radosgw.new_bucket()
    env = {
        **radosgw.env,
        "MNIST_PIPELINE_MODEL_REPOSITORY": radosgw.url(bucket, "models"),
        **port_variables(),
    }
    result = cli(
        "run", "--storage", storage, "--limit-train", "300", "--limit-test", "100",
        "--requests", "10", "--min-accuracy", "0", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model repository s3://" in result.stdout
    objects = set(radosgw.bucket_objects(bucket))
    (run,) = [p.name for p in (storage / "checkpoints").iterdir() if p.is_dir()]
    assert {
        f"models/{MODEL}/1/model.onnx",
        f"models/{MODEL}/1/metadata.json",
        f"models/{MODEL}/.export/versions/1.json",
        f"models/{MODEL}/.export/runs/{run}.json",
    } <= objects, objects
    assert not (storage / "models").exists()
    (inference,) = (storage / "inference").iterdir()
    assert json.loads((inference / "latency.json").read_text())["model_version_served"] == "1"
