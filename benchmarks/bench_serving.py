"""Serving overhead: the exported model in-process with onnxruntime vs served by Triton.

    PYTHONPATH=src python benchmarks/bench_serving.py --storage storage --out results.json

Side by side in one run, each figure the median of --repeats rounds:
  in-process onnxruntime   batch-1 latency p50/p99; batch-16 throughput (all cores,
                           and one thread)
  Triton over gRPC         sequential batch-1 latency p50/p99; throughput with 8
                           single-image requests in flight (the dynamic batcher batches)
Aims: served p50 within 1 ms of the best in-process batch-1 p50; concurrency-8
throughput at least half the best in-process batch-16 throughput. Prints a table and
writes JSON.
Starts its own local Triton on free loopback ports unless --url names a running one.
The functions are importable for a larger benchmark suite.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from mnist_pipeline import client, data
from mnist_pipeline.serve import LocalTriton, available_cpus
from mnist_pipeline.storage import models_dir

MODEL = "resnet18_mnist"


def percentiles(latencies_ms: list[float]) -> dict[str, float]:
    a = np.asarray(latencies_ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def session(onnx_path: Path, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime session as a plain in-process user would make it (0: all cores)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def inprocess_latency(
    sess: ort.InferenceSession, x: np.ndarray, requests: int, warmup: int = 20
) -> dict[str, float]:
    """Batch-1 latency of session.run, image after image."""
    latencies = []
    for i in range(warmup + requests):
        image = x[i % len(x)][None]
        t0 = time.perf_counter()
        sess.run(["output"], {"input": image})
        if i >= warmup:
            latencies.append((time.perf_counter() - t0) * 1000)
    return percentiles(latencies)


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


def served(
    url: str,
    model: str,
    x: np.ndarray,
    labels: np.ndarray,
    requests: int,
    concurrency: int,
    warmup: int = 20,
) -> dict[str, float]:
    """Batch-1 requests over gRPC at `concurrency`, through the pipeline's own client."""
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
    return {**percentiles(driver.latencies_ms), "images_per_s": driver.images / wall_s}


def median_of(repeats: int, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    rounds = [measure() for _ in range(repeats)]
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def run_benchmark(
    onnx_path: Path,
    url: str,
    x: np.ndarray,
    labels: np.ndarray,
    requests: int = 500,
    repeats: int = 3,
) -> dict[str, Any]:
    """Every row the median of `repeats` rounds; the aims against the best in-process row.

    In-process runs twice: onnxruntime's default (all cores) and one thread, because on
    a busy 2-core machine the default's spinning threads can be the slower of the two.
    """
    rows: list[dict[str, Any]] = []
    for threads in sorted({available_cpus(), 1}, reverse=True):
        sess = session(onnx_path, threads)
        rows.append(
            {
                "label": f"in-process, {threads} thread(s), batch 1",
                "kind": "inprocess_batch1",
                **median_of(repeats, partial(inprocess_latency, sess, x, requests)),
            }
        )
        rows.append(
            {
                "label": f"in-process, {threads} thread(s), batch 16",
                "kind": "inprocess_batch16",
                **median_of(repeats, partial(inprocess_throughput, sess, x, requests // 16 or 1)),
            }
        )
    for concurrency in (1, 8):
        rows.append(
            {
                "label": f"Triton gRPC, concurrency {concurrency}, batch 1",
                "kind": f"served_concurrency{concurrency}",
                **median_of(repeats, partial(served, url, MODEL, x, labels, requests, concurrency)),
            }
        )

    def best(kind: str, key: str, pick: Callable[..., float]) -> float:
        return pick(row[key] for row in rows if row["kind"] == kind)

    p50_gap = best("served_concurrency1", "p50_ms", min) - best("inprocess_batch1", "p50_ms", min)
    ratio = best("served_concurrency8", "images_per_s", max) / best(
        "inprocess_batch16", "images_per_s", max
    )
    return {
        "rows": rows,
        "aims": {
            "served_p50_minus_inprocess_p50_ms": p50_gap,
            "served_p50_within_1ms": p50_gap <= 1.0,
            "concurrency8_over_batch16_throughput": ratio,
            "throughput_at_least_half": ratio >= 0.5,
        },
        "setup": {
            "cpus": available_cpus(),
            "requests": requests,
            "repeats": repeats,
            "onnxruntime": ort.__version__,
            "model": str(onnx_path),
        },
    }


def table(results: dict[str, Any]) -> str:
    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "-"

    lines = [f"{'':38} {'p50 ms':>8} {'p99 ms':>8} {'images/s':>9}"]
    for row in results["rows"]:
        lines.append(
            f"{row['label']:38} {cell(row, 'p50_ms', '.2f'):>8} {cell(row, 'p99_ms', '.2f'):>8} "
            f"{cell(row, 'images_per_s', '.0f'):>9}"
        )
    aims = results["aims"]
    lines.append(
        f"served p50 - best in-process batch-1 p50: "
        f"{aims['served_p50_minus_inprocess_p50_ms']:+.2f} ms "
        f"(aim <= 1 ms: {'met' if aims['served_p50_within_1ms'] else 'missed'})"
    )
    lines.append(
        f"concurrency-8 / best in-process batch-16 throughput: "
        f"{aims['concurrency8_over_batch16_throughput']:.0%} "
        f"(aim >= 50%: {'met' if aims['throughput_at_least_half'] else 'missed'})"
    )
    return "\n".join(lines)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--storage",
        type=Path,
        default=Path("storage"),
        help="storage with MNIST and an exported model (after `make run`)",
    )
    parser.add_argument("--url", default=None, help="a running Triton's gRPC HOST:PORT")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    model_dir = models_dir(args.storage) / MODEL
    versions = sorted(
        (p for p in model_dir.glob("[0-9]*") if p.name.isdigit()), key=lambda p: int(p.name)
    )
    if not versions:
        print(f"no exported model under {model_dir}: run `make run` first", file=sys.stderr)
        return 2
    onnx_path = versions[-1] / "model.onnx"  # the one Triton serves under the default policy
    images, labels = data.load(args.storage, "test")
    x = data.normalize(images)

    if args.url:
        results = run_benchmark(onnx_path, args.url, x, labels, args.requests, args.repeats)
    else:
        http, grpc, metrics = free_ports(3)
        with LocalTriton(
            models_dir(args.storage), http_port=http, grpc_port=grpc, metrics_port=metrics
        ) as server:
            results = run_benchmark(
                onnx_path, server.grpc_url, x, labels, args.requests, args.repeats
            )
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
