"""`mnist-pipeline run`: every stage locally, on a small training subset."""

from __future__ import annotations

import json

import pytest

from conftest import MODEL, PipelineRun
from serving_helpers import triton_processes

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
