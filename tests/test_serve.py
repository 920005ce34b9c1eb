"""The local Triton: repository derivation, real serving, and clean process lifecycle."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from conftest import MODEL, PipelineRun
from mnist_pipeline import data
from mnist_pipeline.serve import LocalTriton, derive_repository, read_config
from mnist_pipeline.storage import UsageError
from serving_helpers import cli, free_ports, pid_alive, triton_processes

pytestmark = pytest.mark.slow


def test_derived_repository_keeps_the_config(pipeline: PipelineRun, tmp_path: Path) -> None:
    source = pipeline.storage / "models"
    assert derive_repository(source, tmp_path / "repo", cpus=2) == [MODEL]

    original = read_config(source / MODEL / "config.pbtxt")
    derived = read_config(tmp_path / "repo" / MODEL / "config.pbtxt")
    assert (derived.platform, derived.backend) == ("", "python")
    assert derived.parameters["intra_op_threads"].string_value == "1"  # 2 CPUs, 2 instances
    for field in (
        "name",
        "max_batch_size",
        "input",
        "output",
        "instance_group",
        "dynamic_batching",
        "optimization",
        "version_policy",
    ):
        assert getattr(derived, field) == getattr(original, field), field
    version = tmp_path / "repo" / MODEL / "1"
    assert (version / "model.onnx").is_symlink()
    assert (version / "model.onnx").resolve() == (source / MODEL / "1" / "model.onnx").resolve()
    assert "TritonPythonModel" in (version / "model.py").read_text()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('name: "m" platform: "onnxruntime_onnx" max_batch_size: sixteen', "not a valid"),
        ('name: "m" platform: "tensorflow_savedmodel"', "serves only onnxruntime_onnx"),
        (None, "holds no model"),
    ],
)
def test_derivation_refuses_what_it_cannot_serve(
    tmp_path: Path, config: str | None, message: str
) -> None:
    source = tmp_path / "models"
    source.mkdir()
    if config is not None:
        (source / "m" / "1").mkdir(parents=True)
        (source / "m" / "config.pbtxt").write_text(config)
    with pytest.raises(UsageError, match=message):
        derive_repository(source, tmp_path / "out")


def test_served_model_answers_like_onnxruntime(
    served: LocalTriton, pipeline: PipelineRun, onnx_path: Path
) -> None:
    images, _ = data.load(pipeline.storage, "test")
    x = data.normalize(images[:16])
    client = grpcclient.InferenceServerClient(served.grpc_url)
    try:
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        served_logits = client.infer(MODEL, [tensor], client_timeout=30).as_numpy("output")
        config = client.get_model_config(MODEL, as_json=True)["config"]
    finally:
        client.close()
    expected = ort.InferenceSession(str(onnx_path)).run(["output"], {"input": x})[0]
    np.testing.assert_allclose(served_logits, expected, atol=1e-4)
    assert config["max_batch_size"] == 16
    assert config["dynamic_batching"]["preferred_batch_size"] == [2, 4, 8]
    assert config["instance_group"][0]["count"] == 2


def _ready(http_port: int) -> bool:
    try:
        url = f"http://127.0.0.1:{http_port}/v2/health/ready"
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture
def serve_cli(
    pipeline: PipelineRun, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[str], Path, int]]:
    """`mnist-pipeline serve` in the background; whatever is left of it is killed after."""
    workdir = tmp_path / "work"
    http, grpc, metrics = free_ports(3)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mnist_pipeline",
            "serve",
            "--storage",
            str(pipeline.storage),
            "--workdir",
            str(workdir),
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc),
            "--metrics-port",
            str(metrics),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not _ready(http):
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "serve not ready in 120 s"
            time.sleep(0.3)
        yield process, workdir, http
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid, _ in triton_processes(str(workdir)):
            os.kill(pid, signal.SIGKILL)


def _wait_gone(marker: str, timeout: float) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    while (left := triton_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_serve_stops_with_every_process_on_sigterm(
    serve_cli: tuple[subprocess.Popen[str], Path, int],
) -> None:
    process, workdir, _ = serve_cli
    running = triton_processes(str(workdir))
    assert any("triton_python_backend_stub" in cmd for _, cmd in running), running
    assert any("bin/tritonserver" in cmd for _, cmd in running), running

    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "stopped" in output
    assert triton_processes(str(workdir)) == []
    assert "Triton ready" in output


def test_server_dies_with_its_parent(serve_cli: tuple[subprocess.Popen[str], Path, int]) -> None:
    process, workdir, http = serve_cli
    process.kill()  # no chance to clean up: the kernel's parent-death signal must do it
    process.wait()
    assert _wait_gone(str(workdir), timeout=60) == []
    assert not _ready(http)


def test_failed_start_reports_tritons_error(pipeline: PipelineRun, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    (repo / MODEL / "1").mkdir(parents=True)
    shutil.copy(pipeline.storage / "models" / MODEL / "config.pbtxt", repo / MODEL)
    (repo / MODEL / "1" / "model.onnx").write_bytes(b"not an onnx model")
    workdir = tmp_path / "work"
    http, grpc, metrics = free_ports(3)
    result = cli(
        "serve",
        "--model-repository",
        str(repo),
        "--workdir",
        str(workdir),
        "--http-port",
        str(http),
        "--grpc-port",
        str(grpc),
        "--metrics-port",
        str(metrics),
        "--ready-timeout",
        "60",
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert f"failed to load '{MODEL}'" in result.stderr
    assert "triton.log" in result.stderr
    assert _wait_gone(str(workdir), timeout=30) == []


def test_port_in_use_is_a_usage_error(served: LocalTriton, pipeline: PipelineRun) -> None:
    http, metrics = free_ports(2)
    result = cli(
        "serve",
        "--storage",
        str(pipeline.storage),
        "--http-port",
        str(http),
        "--grpc-port",
        str(served.grpc_port),
        "--metrics-port",
        str(metrics),
    )
    assert result.returncode == 2
    assert f"port {served.grpc_port}" in result.stderr


def test_local_triton_leaves_nothing_behind_when_the_block_fails(pipeline: PipelineRun) -> None:
    http, grpc, metrics = free_ports(3)
    server = LocalTriton(
        pipeline.storage / "models", http_port=http, grpc_port=grpc, metrics_port=metrics
    )
    with pytest.raises(RuntimeError, match="boom"), server:
        assert server.workdir is not None and server.process is not None
        workdir, pid = server.workdir, server.process.pid
        assert triton_processes(str(workdir))
        raise RuntimeError("boom")
    assert triton_processes(str(workdir)) == []
    assert not pid_alive(pid)
    assert not workdir.exists()  # its own temporary folder is removed
