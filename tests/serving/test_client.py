"""`mnist-pipeline infer` against the real local Triton, and its failures."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from subprocess import CompletedProcess

import numpy as np
import pytest

from harness.pipeline import MODEL, PipelineRun, cli
from harness.ports import free_ports
from mnist_pipeline import client, data
from mnist_pipeline.serve import LocalTriton

pytestmark = pytest.mark.slow


def infer(pipeline: PipelineRun, url: str, *args: str) -> tuple[CompletedProcess[str], Path]:
    """Run the client; return its result and the inference folder it created."""
    root = pipeline.storage / "inference"
    before = set(root.iterdir())
    result = cli("infer", "--storage", str(pipeline.storage), "--url", url, *args, timeout=300)
    created = set(root.iterdir()) - before
    assert len(created) == 1, (created, result.stderr)
    return result, created.pop()


def test_infer_measures_real_predictions(served: LocalTriton, pipeline: PipelineRun) -> None:
    result, out = infer(pipeline, served.grpc_url, "--requests", "60", "--concurrency", "2")
    assert result.returncode == 0, result.stderr
    _, labels = data.load(pipeline.storage, "test")

    samples = json.loads((out / "samples.json").read_text())
    assert [s["test_index"] for s in samples] == list(range(10))
    for s in samples:
        assert s["true_label"] == labels[s["test_index"]]
        assert len(s["probabilities"]) == 10
        assert sum(s["probabilities"]) == pytest.approx(1.0, abs=1e-4)
        assert s["predicted_label"] == int(np.argmax(s["probabilities"]))
    assert sum(s["predicted_label"] == s["true_label"] for s in samples) >= 7

    latency = json.loads((out / "latency.json").read_text())
    assert latency["status"] == "complete"
    assert (latency["count"], latency["errors"], latency["images"]) == (60, 0, 60)
    assert 0 < latency["min_ms"] <= latency["p50_ms"] <= latency["p90_ms"] <= latency["p95_ms"]
    assert latency["p95_ms"] <= latency["p99_ms"] <= latency["max_ms"]
    assert latency["accuracy"] > 0.8  # real images, normalised as in training: not chance
    assert latency["throughput_images_per_s"] > 0 and latency["concurrency"] == 2
    assert (latency["model_name"], latency["model_version_served"]) == (MODEL, "1")

    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "p50" in (out / "inference.log").read_text()
    assert not list(out.glob(".*.tmp"))


def test_concurrent_batched_requests(served: LocalTriton, pipeline: PipelineRun) -> None:
    result, out = infer(
        pipeline,
        served.grpc_url,
        "--requests",
        "40",
        "--concurrency",
        "4",
        "--images-per-request",
        "8",
    )
    assert result.returncode == 0, result.stderr
    latency = json.loads((out / "latency.json").read_text())
    assert (latency["count"], latency["images"], latency["images_per_request"]) == (40, 320, 8)
    assert latency["accuracy"] > 0.8


def test_the_client_runs_without_torch(served: LocalTriton, pipeline: PipelineRun) -> None:
    """The client image has no torch: block it and run `infer` all the same."""
    code = (
        "import runpy, sys; sys.modules['torch'] = None; "
        "sys.argv = ['mnist-pipeline'] + sys.argv[1:]; "
        "runpy.run_module('mnist_pipeline', run_name='__main__')"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "infer",
            "--storage",
            str(pipeline.storage),
            "--url",
            served.grpc_url,
            "--requests",
            "5",
            "--warmup",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr


def test_more_images_than_max_batch_size_is_a_usage_error(
    served: LocalTriton,
    pipeline: PipelineRun,
) -> None:
    result, out = infer(pipeline, served.grpc_url, "--images-per-request", "17")
    assert result.returncode == 2
    assert "exceed the max_batch_size 16" in result.stderr
    assert json.loads((out / "latency.json").read_text())["status"] == "failed"


def test_wrong_model_name_lists_what_is_served(served: LocalTriton, pipeline: PipelineRun) -> None:
    t0 = time.monotonic()
    result, out = infer(
        pipeline, served.grpc_url, "--model-name", "no_such_model", "--timeout", "60"
    )
    assert result.returncode == 1
    assert time.monotonic() - t0 < 30  # a ready server will not load it later: no waiting
    assert "model no_such_model is not ready" in result.stderr
    assert f"{MODEL}:1 (READY)" in result.stderr
    report = json.loads((out / "latency.json").read_text())
    assert report["status"] == "failed" and "no_such_model" in report["reason"]


def test_unreachable_server_fails_within_the_bound(pipeline: PipelineRun) -> None:
    (port,) = free_ports(1)
    t0 = time.monotonic()
    result, out = infer(pipeline, f"127.0.0.1:{port}", "--timeout", "3")
    assert result.returncode == 1
    assert time.monotonic() - t0 < 30
    assert f"Triton at 127.0.0.1:{port} not ready after 3 s" in result.stderr
    assert json.loads((out / "latency.json").read_text())["status"] == "failed"


def test_a_client_killed_outright_leaves_a_record_saying_so(pipeline: PipelineRun) -> None:
    """SIGKILL (an OOM kill, a node lost) runs no handler: the folder must still say it
    never finished, not be empty."""
    (port,) = free_ports(1)
    root = pipeline.storage / "inference"
    before = set(root.iterdir())
    args = ("infer", "--storage", pipeline.storage, "--url", f"127.0.0.1:{port}", "--timeout", 120)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_pipeline", *map(str, args)], stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while not (created := set(root.iterdir()) - before) and time.monotonic() < deadline:
            time.sleep(0.2)
        (out,) = created
        while not (out / "latency.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    report = json.loads((out / "latency.json").read_text())
    assert report["status"] == "running"
    assert report["url"] == f"127.0.0.1:{port}"


def test_failing_requests_keep_what_was_measured(
    served: LocalTriton, pipeline: PipelineRun
) -> None:
    result, out = infer(
        pipeline, served.grpc_url, "--model-name", "failing", "--warmup", "0", "--requests", "5"
    )
    assert result.returncode == 1
    # ONNX Runtime's own error, through the python backend's model.py (worded as NVIDIA's
    # onnxruntime backend words it).
    assert "request" in result.stderr and "onnx runtime error" in result.stderr
    assert "Gather node" in result.stderr
    report = json.loads((out / "latency.json").read_text())
    assert report["status"] == "failed" and report["errors"] >= 1
    assert "onnx runtime error" in report["reason"]
    assert (out / "inference.log").is_file()


@pytest.mark.parametrize(
    "url,message",
    [
        ("localhost", "has no port"),
        ("http://localhost:8001", "without a scheme (http:// is not part of it)"),
        ("grpc://localhost:8001", "without a scheme"),
        ("localhost:99999", "expected HOST:PORT"),
        ("localhost:8001/v2", "expected HOST:PORT"),
        ("dns:///triton-grpc", "has no port"),
        ("dns://10.0.0.10:53", "needs the / before HOST"),
        ("dns:///http://triton:8001", "without a scheme"),
    ],
)
def test_a_malformed_url_is_refused_up_front(tmp_path: Path, url: str, message: str) -> None:
    t0 = time.monotonic()
    result = cli("infer", "--storage", str(tmp_path), "--url", url, "--timeout", "60")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "expected HOST:PORT of Triton's gRPC endpoint, such as localhost:8001" in result.stderr
    assert time.monotonic() - t0 < 30  # not after waiting out --timeout
    assert not (tmp_path / "inference").exists()


@pytest.mark.parametrize("policy", ["auto", "pick_first"])
def test_a_dns_target_reaches_the_server(
    served: LocalTriton, pipeline: PipelineRun, policy: str
) -> None:
    url = f"dns:///{served.grpc_url}"
    result, out = infer(pipeline, url, "--requests", "20", "--lb-policy", policy)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "latency.json").read_text())
    assert report["status"] == "complete" and report["url"] == url


def test_the_http_port_is_named_as_the_wrong_protocol(
    served: LocalTriton, pipeline: PipelineRun
) -> None:
    t0 = time.monotonic()
    result, out = infer(pipeline, served.http_url, "--timeout", "60")
    assert result.returncode == 2
    assert f"{served.http_url} answers HTTP, not gRPC" in result.stderr
    assert time.monotonic() - t0 < 30
    assert "answers HTTP, not gRPC" in (out / "inference.log").read_text()


def test_a_failed_infer_writes_its_reason_to_inference_log(pipeline: PipelineRun) -> None:
    (port,) = free_ports(1)
    result, out = infer(pipeline, f"127.0.0.1:{port}", "--timeout", "2")
    assert result.returncode == 1
    log = (out / "inference.log").read_text()
    assert f"inference failed: Triton at 127.0.0.1:{port} not ready after 2 s" in log
    # The terminal shows it once (the command's own error line).
    assert result.stderr.count("not ready after 2 s") == 1


def test_latency_plot_shows_p50_p99_and_throughput() -> None:
    latencies = [1.0] * 50 + [2.0] * 49 + [9.0]
    fig = client.latency_figure(latencies, "title", images_per_s=612.4)
    legend = fig.axes[1].get_legend()
    labels = [text.get_text() for text in legend.get_texts()]
    p50, p99 = np.percentile(latencies, 50), np.percentile(latencies, 99)
    assert labels == [f"p50 {p50:.2f} ms", f"p99 {p99:.2f} ms"]
    assert legend.get_title().get_text() == "612 images/s"


def test_infer_writes_where_told_asks_for_the_run_s_version_and_holds_an_accuracy_floor(
    served: LocalTriton, pipeline: PipelineRun, tmp_path: Path
) -> None:
    """What the helm test runs: results in a scratch folder (the volume is read-only
    there), the version the run published, and a floor that fails the command."""
    (run_id,) = [p.name for p in (pipeline.storage / "checkpoints").iterdir() if p.is_dir()]
    common = ["infer", "--storage", pipeline.storage, "--url", served.grpc_url]
    common += ["--run-id", run_id, "--model-version", "run", "--requests", "20"]
    inference_before = set((pipeline.storage / "inference").iterdir())
    result = cli(*common, "--output", tmp_path / "passed", "--min-accuracy", "0.5")
    assert result.returncode == 0, result.stderr
    (out,) = (tmp_path / "passed").iterdir()
    latency = json.loads((out / "latency.json").read_text())
    assert (latency["model_version_requested"], latency["model_version_served"]) == ("1", "1")
    assert set((pipeline.storage / "inference").iterdir()) == inference_before

    # 1000 images: no model trained on a subset gets every one right.
    thousand = ["--requests", "125", "--images-per-request", "8"]
    result = cli(*common, *thousand, "--output", tmp_path / "failed", "--min-accuracy", "1")
    assert result.returncode == 1
    assert "is below --min-accuracy 1" in result.stderr
    (out,) = (tmp_path / "failed").iterdir()
    assert json.loads((out / "latency.json").read_text())["status"] == "failed"


def test_a_client_stopped_by_sigterm_keeps_what_it_measured_and_says_so(
    served: LocalTriton, pipeline: PipelineRun
) -> None:
    """A client pod deleted mid-run: exit 143, one line, latency.json names the interrupt."""
    root = pipeline.storage / "inference"
    before = set(root.iterdir())
    client = subprocess.Popen(
        [sys.executable, "-m", "mnist_pipeline", "infer", "--storage", str(pipeline.storage),
         "--url", served.grpc_url, "--requests", "1000000", "--warmup", "0"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert client.stderr is not None
    for line in client.stderr:
        if "inference run" in line:
            time.sleep(1)  # sending by now
            client.send_signal(signal.SIGTERM)
            break
    err = client.stderr.read()
    assert client.wait(timeout=60) == 143, err
    assert "Traceback" not in err
    (out,) = set(root.iterdir()) - before
    report = json.loads((out / "latency.json").read_text())
    assert report["reason"] == "interrupted (SIGTERM)" and report["count"] > 0, report
