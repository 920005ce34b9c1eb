"""`mnist-pipeline run`: every stage locally, on a small training subset."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import LIMIT_TRAIN, MODEL, PipelineRun, cli
from mnist_pipeline.train import TrainConfig, default_run_id
from support.serving import free_ports, snapshot, triton_processes

pytestmark = pytest.mark.slow


def test_run_goes_from_data_to_measured_serving(pipeline: PipelineRun) -> None:
    storage, stdout = pipeline.storage, pipeline.result.stdout
    assert "mnist-pipeline run: done" in stdout
    assert "export           version 1 (first export)" in stdout
    assert "p50" in stdout and "p99" in stdout

    (run,) = [p for p in (storage / "checkpoints").iterdir() if p.is_dir()]
    assert (run / "model.pth").is_file()
    assert json.loads((run / "export.json").read_text())["status"] == "published"
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
    http, grpc, metrics = free_ports(3)
    ports = {
        "MNIST_PIPELINE_HTTP_PORT": str(http),
        "MNIST_PIPELINE_GRPC_PORT": str(grpc),
        "MNIST_PIPELINE_METRICS_PORT": str(metrics),
    }
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
    del after["export.json"], model_before["export.json"]  # the skip is recorded, nothing else
    assert after == model_before
    assert [p.name for p in (storage / "models" / MODEL).iterdir() if p.is_dir()] == ["1"]
