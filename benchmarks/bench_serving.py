"""Serving measurements for the suite (benchmarks/run.py): the exported model in-process
with onnxruntime, and served by Triton over gRPC (the nvidia-pytriton wheel's tritonserver,
its python backend running the project's model.py on the same onnxruntime), measured two
ways: the pipeline's own client (mnist_pipeline.client) and NVIDIA's perf_analyzer, with
Triton's statistics, and the chart's Grafana dashboard drawn from a local Prometheus
scraping Triton meanwhile.

perf_analyzer ships in the tritonclient 2.51.0 wheel (`make bench` installs it into
.venv-perf; PERF_ANALYZER names the binary). At load it needs libb64.so.0d (Debian
libb64-0d) and libcudart.so.12, taken from the nvidia-cuda-runtime-cu12 wheel beside it.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import resource
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from common import percentiles
from harness import prometheus as monitoring
from harness.processes import descendants
from mnist_pipeline import client, tritonconfig
from mnist_pipeline.storage import CONFIG_FILE, is_version_name

MODEL = "resnet18_mnist"


def session(onnx_path: Path, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime session as a plain in-process user would make it (0: all cores)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def inprocess_latencies(
    sess: ort.InferenceSession, x: np.ndarray, requests: int, warmup: int = 20
) -> list[float]:
    """Batch-1 latencies (ms) of session.run, image after image."""
    latencies = []
    for i in range(warmup + requests):
        image = x[i % len(x)][None]
        t0 = time.perf_counter()
        sess.run(["output"], {"input": image})
        if i >= warmup:
            latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


def inprocess_latency(
    sess: ort.InferenceSession, x: np.ndarray, requests: int, warmup: int = 20
) -> dict[str, float]:
    return percentiles(inprocess_latencies(sess, x, requests, warmup))


def inprocess_throughput(
    sess: ort.InferenceSession, x: np.ndarray, batches: int, batch_size: int = 16
) -> dict[str, float]:
    """Images/s of back-to-back session.run on batches of `batch_size`."""
    sess.run(["output"], {"input": x[:batch_size]})
    t0 = time.perf_counter()
    for i in range(batches):
        start = (i * batch_size) % (len(x) - batch_size)
        sess.run(["output"], {"input": x[start : start + batch_size]})
    return {"images_per_s": batches * batch_size / (time.perf_counter() - t0)}


@dataclasses.dataclass(frozen=True)
class Yardstick:
    """In-process onnxruntime measured right before and right after each served figure,
    for the ratios the targets judge: on a shared machine whose load moves within
    minutes, only figures taken together compare. `one`: a session on one instance's
    threads (batch-1 p50: the latency target's reference); `budget`: on the server's
    whole thread budget (batch-16 images/s: the throughput target's)."""

    one: ort.InferenceSession
    budget: ort.InferenceSession
    x: np.ndarray
    requests: int

    def measure(self) -> dict[str, float]:
        return {
            "inprocess_p50_ms": inprocess_latency(self.one, self.x, self.requests)["p50_ms"],
            "inprocess_batch16_images_per_s": inprocess_throughput(
                self.budget, self.x, max(1, self.requests // 16)
            )["images_per_s"],
        }

    def around(self, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """`measure`'s figures with the mean of the in-process figures before and after."""
        before = self.measure()
        figures = measure()
        after = self.measure()
        return {**figures, **{key: (before[key] + after[key]) / 2 for key in before}}


def served_latencies(
    url: str,
    model: str,
    x: np.ndarray,
    labels: np.ndarray,
    requests: int,
    concurrency: int,
    warmup: int = 20,
) -> tuple[list[float], float]:
    """Batch-1 requests over gRPC at `concurrency`, through the pipeline's own client:
    the latencies (ms) and the images/s."""
    cfg = client.InferConfig(
        url=url, model_name=model, requests=requests, concurrency=concurrency, warmup=warmup
    )
    grpc = client.grpc_module().InferenceServerClient(url)
    try:
        client.wait_until_ready(grpc, cfg)
        info = client.read_model_info(grpc, cfg)
    finally:
        grpc.close()
    driver = client.Driver(cfg, info, x, labels)
    try:
        driver.drive(max(warmup, concurrency), record=False)
        wall_s = driver.drive(requests, record=True)
    finally:
        driver.close()
    if driver.errors:
        raise RuntimeError(driver.errors[0])
    return driver.latencies_ms, driver.images / wall_s


def served(*args: Any, **kwargs: Any) -> dict[str, float]:
    """served_latencies (same arguments) as percentiles and images/s."""
    latencies, images_per_s = served_latencies(*args, **kwargs)
    return {**percentiles(latencies), "images_per_s": images_per_s}


def inference_statistics(url: str, model: str) -> dict[str, Any]:
    """Triton's cumulative statistics for `model`: per executed batch size, how many
    executions; per request, total nanoseconds of queueing, input, inference, output;
    and the nanoseconds the instances spent executing batches."""
    grpc = client.grpc_module().InferenceServerClient(url)
    try:
        stats = grpc.get_inference_statistics(model, as_json=True)
    finally:
        grpc.close()
    batches: dict[int, int] = {}
    requests = executing_ns = 0
    ns = dict.fromkeys(("success", "queue", "compute_input", "compute_infer", "compute_output"), 0)
    for version in stats.get("model_stats", []):
        for b in version.get("batch_stats", []):
            size = int(b["batch_size"])
            batches[size] = batches.get(size, 0) + int(b["compute_infer"]["count"])
            for phase in ("compute_input", "compute_infer", "compute_output"):
                executing_ns += int(b.get(phase, {}).get("ns", 0))
        inference = version.get("inference_stats", {})
        requests += int(inference.get("success", {}).get("count", 0))
        for key in ns:
            ns[key] += int(inference.get(key, {}).get("ns", 0))
    return {"batches": batches, "requests": requests, "ns": ns, "executing_ns": executing_ns}


def statistics_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the server did between two inference_statistics snapshots: executions by
    batch size, the mean milliseconds per request of each phase (a batch's compute
    counts in full for each of its requests), and the instances' busy seconds."""
    batches = {
        size: count - before["batches"].get(size, 0)
        for size, count in sorted(after["batches"].items())
        if count - before["batches"].get(size, 0) > 0
    }
    requests = after["requests"] - before["requests"]
    mean_ms = {
        f"{key}_ms": (after["ns"][key] - before["ns"][key]) / max(1, requests) / 1e6
        for key in after["ns"]
    }
    executions = sum(batches.values())
    return {
        "executed_batch_sizes": {str(k): v for k, v in batches.items()},
        "requests": requests,
        "executions": executions,
        "mean_batch_size": requests / executions if executions else 0.0,
        "server_mean_per_request": mean_ms,
        "executing_s": (after["executing_ns"] - before["executing_ns"]) / 1e9,
    }


def config_variant(source: Path, dest: Path, edit: Callable[[Any], None]) -> Path:
    """A copy of the model repository `source` whose configs (Triton's ModelConfig
    messages) `edit` changed; the versions' files (model.onnx, model.py) are linked."""
    from google.protobuf import text_format

    for model_dir in sorted(p for p in source.iterdir() if p.is_dir() and p.name[0] != "."):
        config = tritonconfig.parse_config((model_dir / CONFIG_FILE).read_text())
        edit(config)
        out = dest / model_dir.name
        out.mkdir(parents=True)
        (out / CONFIG_FILE).write_text(text_format.MessageToString(config))
        for version in (p for p in model_dir.iterdir() if is_version_name(p.name)):
            (out / version.name).mkdir()
            for f in version.iterdir():
                (out / version.name / f.name).symlink_to(f.resolve())
    return dest


def clearing(field: str) -> Callable[[Any], None]:
    """An edit dropping `field` (dynamic_batching: each request runs alone)."""
    return lambda config: config.ClearField(field)


@dataclasses.dataclass(frozen=True)
class Variant:
    """The same exported model served another way: `pin` overrides what `mnist-pipeline
    pin` is given (TritonConfig's fields: instance_count, server_cpus, whose quotient is
    each instance's ONNX Runtime threads), `edit` then changes a copy of the pinned
    config.pbtxt (the dynamic batcher's settings, which pin keeps as exported)."""

    name: str
    edit: Callable[[Any], None] | None = None
    pin: dict[str, int] = dataclasses.field(default_factory=dict)


def queue_delay(microseconds: int) -> Callable[[Any], None]:
    def edit(config: Any) -> None:
        config.dynamic_batching.max_queue_delay_microseconds = microseconds

    return edit


def preferred_sizes(*sizes: int) -> Callable[[Any], None]:
    def edit(config: Any) -> None:
        config.dynamic_batching.preferred_batch_size[:] = sizes

    return edit


def instances(count: int, server_cpus: int) -> dict[str, int]:
    """pin --instance-count COUNT --server-cpus SERVER_CPUS: COUNT python backend stubs of
    max(1, SERVER_CPUS // COUNT) ONNX Runtime threads each."""
    return {"instance_count": count, "server_cpus": server_cpus}


BASELINE = Variant("baseline (exported config)")
DELAY_500 = Variant("max_queue_delay 500 µs", queue_delay(500))
ONE_INSTANCE = Variant("1 instance × 2 threads", pin=instances(1, 2))
VARIANTS = (
    BASELINE,
    Variant("max_queue_delay 100 µs", queue_delay(100)),
    DELAY_500,
    Variant("max_queue_delay 2000 µs", queue_delay(2000)),
    ONE_INSTANCE,
    Variant("1 instance × 2 threads, max_queue_delay 500 µs", queue_delay(500), instances(1, 2)),
    Variant("1 instance × 1 thread", pin=instances(1, 1)),
    Variant("4 instances × 1 thread", pin=instances(4, 4)),
    Variant("preferred [4, 8, 16]", preferred_sizes(4, 8, 16)),
)
# Quick mode: one config edit and one pin setting, enough to exercise both paths.
QUICK_VARIANTS = (BASELINE, DELAY_500, ONE_INSTANCE)


def perf_analyzer_binary() -> Path:
    default = Path(__file__).resolve().parents[1] / ".venv-perf" / "bin" / "perf_analyzer"
    binary = Path(os.environ.get("PERF_ANALYZER") or default)
    if not binary.is_file():
        raise SystemExit(f"no perf_analyzer at {binary}: make .venv-perf/bin/perf_analyzer")
    return binary


# perf_analyzer's CSV columns (microseconds) → our keys (milliseconds).
PERF_COLUMNS = {
    "p50 latency": "p50_ms",
    "p90 latency": "p90_ms",
    "p95 latency": "p95_ms",
    "p99 latency": "p99_ms",
    "Client Send": "client_send_ms",
    "Network+Server Send/Recv": "network_ms",
    "Server Queue": "server_queue_ms",
    "Server Compute Input": "server_compute_input_ms",
    "Server Compute Infer": "server_compute_infer_ms",
    "Server Compute Output": "server_compute_output_ms",
    "Client Recv": "client_recv_ms",
}


def perf_analyzer(url: str, model: str, concurrency: int, window_ms: int) -> dict[str, Any]:
    """One perf_analyzer measurement: batch 1 over gRPC at `concurrency`, until stable.

    The stability and trial settings let it finish on a busy 2-core machine, where its
    default (10% over 3 windows) may never be reached at high concurrency.
    """
    binary = perf_analyzer_binary()
    libs = sorted(binary.parent.parent.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": os.pathsep.join(
            [*map(str, libs), *filter(None, [os.environ.get("LD_LIBRARY_PATH")])]
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "perf.csv"
        command = [
            str(binary),
            *("-m", model, "-u", url, "-i", "grpc", "-b", "1"),
            *("--concurrency-range", f"{concurrency}:{concurrency}"),
            *("--measurement-interval", str(window_ms)),
            *("--stability-percentage", "50", "--max-trials", "12"),
            *("-f", str(out)),
        ]
        # Its CPU time: what the children reaped meanwhile used, and it is the only one
        # (servers and Prometheus are reaped when stopped, never during a measurement).
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        wall_s = time.perf_counter() - t0
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            raise RuntimeError(f"perf_analyzer failed:\n{result.stdout[-2000:]}{result.stderr}")
        (row,) = list(csv.DictReader(out.open()))
    figures: dict[str, Any] = {
        "concurrency": concurrency,
        "images_per_s": float(row["Inferences/Second"]),
        "wall_s": wall_s,
        "client_cpu_s": (cpu_after.ru_utime + cpu_after.ru_stime)
        - (cpu_before.ru_utime + cpu_before.ru_stime),
    }
    figures.update({key: float(row[column]) / 1000 for column, key in PERF_COLUMNS.items()})
    return figures


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process, all its threads."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name (which may hold spaces): utime and stime are the
    # 12th and 13th, in clock ticks.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU time of tritonserver `pid` and the processes below it: the
    python backend runs each instance's model.py in a stub process of its own, started
    with the server and running until it stops."""
    total = 0.0
    for process in (pid, *descendants(pid)):
        with contextlib.suppress(OSError):
            total += process_cpu_seconds(process)
    return total


# What the chart's Triton runs with: latency summaries for the dashboard's p50/p99.
METRICS_ARGS = ("--metrics-config=summary_latencies=true",)
NAMESPACE = "bench"


def scrape_config(metrics_port: int, interval_s: int) -> dict[str, Any]:
    """Triton's metrics port as the chart's ServiceMonitor scrapes it, with the target's
    namespace and pod as labels (the dashboard selects on them)."""
    return {
        "job_name": "triton",
        "scrape_interval": f"{interval_s}s",
        "metrics_path": "/metrics",
        "static_configs": [
            {
                "targets": [f"127.0.0.1:{metrics_port}"],
                "labels": {"namespace": NAMESPACE, "pod": "triton"},
            }
        ],
    }


def dashboard_over(
    prometheus: monitoring.LocalPrometheus, start: float, end: float, step_s: int
) -> dict[str, Any]:
    """Every panel of the chart's Grafana dashboard, queried as Grafana would over
    [start, end]: per target, each series' legend and its (seconds from start, value)."""
    variables = {"namespace": NAMESPACE, "pod": ".*", "__rate_interval": f"{4 * step_s}s"}
    panels = []
    for panel in monitoring.dashboard_panels():
        series = []
        for legend, expr in panel.targets:
            for s in prometheus.query_range(monitoring.expand(expr, variables), start, end, step_s):
                label = legend
                for key, value in s["metric"].items():
                    label = label.replace("{{" + key + "}}", value)
                series.append(
                    {
                        "legend": label,
                        "t": [round(float(t) - start, 1) for t, _ in s["values"]],
                        # NaN (a summary without samples) as null: results.json stays JSON.
                        "v": [float(v) if v.lower() != "nan" else None for _, v in s["values"]],
                    }
                )
        panels.append({"title": panel.title, "unit": panel.unit, "series": series})
    return {"seconds": round(end - start, 1), "step_s": step_s, "panels": panels}
