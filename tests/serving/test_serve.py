"""The local Triton (the nvidia-pytriton wheel's tritonserver, its python backend running
ONNX Runtime): real serving and a clean process lifecycle."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from harness.pipeline import MODEL, PipelineRun, TrainedRun, cli, publish_by_hand
from harness.ports import free_ports
from harness.processes import alive as pid_alive
from harness.serving import pinned_models, triton_processes
from mnist_pipeline import data
from mnist_pipeline.errors import UsageError
from mnist_pipeline.serve import LocalTriton, served_models

pytestmark = pytest.mark.slow


def test_a_folder_without_a_pinned_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="holds no model: write it with `mnist-pipeline pin`"):
        served_models(tmp_path)


def test_serve_refuses_a_config_that_does_not_parse_before_starting(
    pipeline: PipelineRun, tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(pipeline.storage / "models", repo)
    (repo / MODEL / "config.pbtxt").write_text('name: "m" max_batch_size: sixteen')
    result = cli(*_serve_args(repo, tmp_path / "work"), timeout=120)
    assert result.returncode == 1, result.stderr
    assert "cannot serve resnet18_mnist: " in result.stderr and "; export again" in result.stderr
    assert "config.pbtxt does not parse" in result.stderr
    assert "starting tritonserver" not in result.stderr


def test_served_bit_for_bit_like_onnxruntime_in_process_on_every_test_image(
    served: LocalTriton, pipeline: PipelineRun, onnx_path: Path
) -> None:
    """Through the python backend's model.py, with dynamic batching merging concurrent
    requests: the same logits, to the bit, as the same onnxruntime in this process, and so
    exactly the accuracy export measured."""
    images, _ = data.load(pipeline.storage, "test")
    x = data.normalize(images)
    client = grpcclient.InferenceServerClient(served.grpc_url)
    try:
        config = client.get_model_config(MODEL, as_json=True)["config"]

        def infer(batch: np.ndarray) -> np.ndarray:
            tensor = grpcclient.InferInput("input", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch)
            return client.infer(MODEL, [tensor], client_timeout=30).as_numpy("output")

        # Batches of 1 to 16 images, 8 at a time: the server merges them as it likes.
        (before,) = client.get_inference_statistics(MODEL, as_json=True)["model_stats"]
        ends = np.cumsum(np.resize(np.arange(1, 17), 1200))
        with ThreadPoolExecutor(8) as pool:
            served_logits = list(pool.map(infer, np.split(x, ends[ends < len(x)])))
        (stats,) = client.get_inference_statistics(MODEL, as_json=True)["model_stats"]
    finally:
        client.close()
    assert config["backend"] == "python" and config.get("platform", "") == ""
    executions = int(stats["execution_count"]) - int(before.get("execution_count", 0))
    assert executions < len(served_logits)  # requests were merged (the fixture is shared)
    assert config["max_batch_size"] == 16
    assert config["dynamic_batching"]["preferred_batch_size"] == [2, 4, 8]
    assert config["instance_group"][0]["count"] == 2
    threads = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert threads == {"intra_op_thread_count": "1", "inter_op_thread_count": "1"}

    served_all = np.concatenate(served_logits)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # as config.pbtxt says
    expected = ort.InferenceSession(str(onnx_path), options).run(["output"], {"input": x})[0]
    assert served_all.shape == expected.shape == (10_000, 10)
    assert np.array_equal(served_all, expected), np.abs(served_all - expected).max()
    _, labels = data.load(pipeline.storage, "test")
    meta = json.loads((onnx_path.parent / "metadata.json").read_text())
    assert (served_all.argmax(1) == labels).mean() == meta["accuracy"]


def test_an_int8_export_is_served_like_onnxruntime_serves_it(
    quantisable: TrainedRun, tmp_path: Path
) -> None:
    """The QDQ model from `export --precision int8` served through the python backend:
    the same logits on every test image as the onnxruntime installed here."""
    storage = tmp_path / "storage"
    shutil.copytree(quantisable.storage, storage, symlinks=True)
    result = cli("export", "--storage", str(storage), "--precision", "int8")
    assert result.returncode == 0, result.stderr
    model = storage / "models" / MODEL / "1" / "model.onnx"
    images, labels = data.load(storage, "test")
    x = data.normalize(images)
    http, grpc, metrics = free_ports(3)
    with LocalTriton(
        pinned_models(storage / "models", tmp_path / "served"),
        workdir=tmp_path / "triton",
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
    ) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            served = []
            for batch in np.array_split(x, len(x) // 16):
                tensor = grpcclient.InferInput("input", list(batch.shape), "FP32")
                tensor.set_data_from_numpy(batch)
                served.append(client.infer(MODEL, [tensor], client_timeout=30).as_numpy("output"))
        finally:
            client.close()
    served_all = np.concatenate(served)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # as config.pbtxt says
    expected = ort.InferenceSession(str(model), options).run(["output"], {"input": x})[0]
    assert np.array_equal(served_all, expected)
    meta = json.loads((model.parent / "metadata.json").read_text())
    assert meta["precision"] == "int8"
    assert (served_all.argmax(1) == labels).mean() == meta["accuracy"]


def _serve_args(repo: Path, workdir: Path, *extra: str) -> list[str]:
    http, grpc, metrics = free_ports(3)
    return [
        "serve",
        "--model-repository",
        str(repo),
        "--workdir",
        str(workdir),
        f"--http-port={http}",
        f"--grpc-port={grpc}",
        f"--metrics-port={metrics}",
        "--ready-timeout=60",
        *extra,
    ]


def test_config_dims_that_do_not_match_the_model_are_refused_naming_both(
    pipeline: PipelineRun, tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(pipeline.storage / "models", repo)
    config = repo / MODEL / "config.pbtxt"
    config.write_text(config.read_text().replace("dims: [ 1, 28, 28 ]", "dims: [ 1, 28, 29 ]"))
    result = cli(*_serve_args(repo, tmp_path / "work"), timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Triton ready" not in result.stderr
    assert "[-1,1,28,28]" in result.stderr and "[-1,1,28,29]" in result.stderr
    assert _wait_gone(str(tmp_path / "work"), timeout=30) == []


def test_a_flag_tritonserver_rejects_fails_serve(pipeline: PipelineRun, tmp_path: Path) -> None:
    """Extra arguments reach tritonserver untouched, so its own parser judges them."""
    args = _serve_args(pipeline.storage / "models", tmp_path / "work", "--no-such-flag=1")
    result = cli(*args, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "no-such-flag" in result.stderr and "Triton ready" not in result.stderr


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
            "--pinned-memory-pool-byte-size=0",  # a tritonserver flag, passed through
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
    (running,) = [cmd for _, cmd in triton_processes(str(workdir))]
    assert "bin/tritonserver" in running and "--pinned-memory-pool-byte-size=0" in running

    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 143, output  # as documented for SIGTERM
    assert "tritonserver stopped" in output
    assert "serve interrupted: Triton stopped; the same command serves again (SIGTERM)" in output
    assert triton_processes(str(workdir)) == []
    assert "starting tritonserver" in output  # the fixture saw it ready over HTTP


def test_server_dies_with_its_parent(serve_cli: tuple[subprocess.Popen[str], Path, int]) -> None:
    process, workdir, http = serve_cli
    process.kill()  # no chance to clean up: the kernel's parent-death signal must do it
    process.wait()
    assert _wait_gone(str(workdir), timeout=60) == []
    assert not _ready(http)


def test_failed_start_reports_tritons_error(pipeline: PipelineRun, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    publish_by_hand(repo / MODEL / "1", b"not an onnx model")
    shutil.copy(pipeline.storage / "models" / MODEL / "config.pbtxt", repo / MODEL)
    workdir = tmp_path / "work"
    result = cli(*_serve_args(repo, workdir), timeout=120)
    assert result.returncode == 1, result.stderr
    assert f"failed to load '{MODEL}'" in result.stderr
    assert "triton.log" in result.stderr
    assert _wait_gone(str(workdir), timeout=30) == []


def test_a_failed_start_keeps_the_log_its_error_names(
    pipeline: PipelineRun, tmp_path: Path
) -> None:
    """Without --workdir, Triton's log lives in a temporary folder: when the error points at
    it, it must still be there to read."""
    repo = tmp_path / "models"
    publish_by_hand(repo / MODEL / "1", b"not an onnx model")
    shutil.copy(pipeline.storage / "models" / MODEL / "config.pbtxt", repo / MODEL)
    temp = tmp_path / "tmp"
    temp.mkdir()
    args = _serve_args(repo, tmp_path / "unused")
    del args[3:5]  # no --workdir
    result = cli(*args, env={**os.environ, "TMPDIR": str(temp)}, timeout=120)
    assert result.returncode == 1, result.stderr
    (log_path,) = re.findall(r"From (\S+/triton\.log) \(kept\):", result.stderr)
    assert Path(log_path).parent.parent == temp
    assert f"failed to load '{MODEL}'" in Path(log_path).read_text()


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


def test_local_triton_leaves_nothing_behind_when_the_block_fails(
    pipeline: PipelineRun, tmp_path: Path
) -> None:
    http, grpc, metrics = free_ports(3)
    served = pinned_models(pipeline.storage / "models", tmp_path / "served")
    server = LocalTriton(served, http_port=http, grpc_port=grpc, metrics_port=metrics)
    with pytest.raises(RuntimeError, match="boom"), server:
        assert server.workdir is not None and server.process is not None
        workdir, pid = server.workdir, server.process.pid
        assert triton_processes(str(workdir))
        raise RuntimeError("boom")
    assert triton_processes(str(workdir)) == []
    assert not pid_alive(pid)
    assert not workdir.exists()  # its own temporary folder is removed
