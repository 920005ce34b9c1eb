"""Serving from object storage against serving from the volume, side by side in one run.

    PYTHONPATH=tests python benchmarks/bench_object_storage.py [--rounds 3] [--requests 500]

One model (a tiny training run, exported once to a volume folder and uploaded to a real
radosgw bucket with the export's own publication) is pinned and served both ways, the
two alternating round by round:

- time to ready: `mnist-pipeline pin` (a symlink on the volume; a download with sha256
  checks from the bucket) plus tritonserver's start until it answers ready;
- steady state: `mnist-pipeline infer` over gRPC once loaded, p50/p99 per request.

Both are pinned with `--triton-backend python` and served by the nvidia-pytriton wheel's
tritonserver (its python backend running the project's model.py). Prints both and writes
docs/benchmarks/object_storage.json (with the machine). Needs the Ceph packages of
tests/harness/objectstore.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from common import load_average, machine
from harness import pipeline
from harness.objectstore import LocalRadosgw
from harness.serving import local_triton
from mnist_pipeline.repository import open_repository
from mnist_pipeline.serve import LocalTriton
from mnist_pipeline.settings import parse_model_repository
from mnist_pipeline.storage import CONFIG_FILE, METADATA_FILE, MODEL_FILE

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks" / "object_storage.json"
NAME = "resnet18_mnist"

cli = partial(pipeline.cli, check=True)


def prepare(work: Path, rgw: LocalRadosgw) -> tuple[Path, str]:
    """A storage folder holding one exported model, and the same version in a bucket."""
    storage = work / "storage"
    cli("data", "--storage", storage)
    quick = "--limit-train 256 --limit-test 500 --checkpoint-every 0 --run-id bench".split()
    cli("train", "--storage", storage, *quick)
    # Serving speed does not depend on the weights: publish the barely trained model.
    cli("export", "--storage", storage, "--run-id", "bench", "--publish-min-accuracy", "0")
    url = rgw.url(rgw.new_bucket(), "models")
    version = storage / "models" / NAME / "1"
    repo = open_repository(parse_model_repository(url), NAME)
    meta = json.loads((version / METADATA_FILE).read_text())
    with repo.lock.held("export"):
        repo.publish(
            (version.parent / CONFIG_FILE).read_text(),
            {MODEL_FILE: (version / MODEL_FILE).read_bytes()},
            {k: v for k, v in meta.items() if k not in ("version", "files")},
        )
    return storage, url


def time_to_ready(storage: Path, url: str | None, served: Path) -> dict[str, Any]:
    """Seconds for pin, then for tritonserver to load and answer ready; the server stays up."""
    shutil.rmtree(served, ignore_errors=True)
    env = {} if url is None else {"MNIST_PIPELINE_MODEL_REPOSITORY": url}
    start = time.perf_counter()
    cli("pin", "--storage", storage, "--served-repository", served, "--triton-backend",
        "python", env=env)  # fmt: skip
    pinned = time.perf_counter()
    server = local_triton(served)
    server.start()
    server.wait_ready()
    ready = time.perf_counter()
    return {"pin_s": pinned - start, "triton_s": ready - pinned, "server": server}


def steady_latency(
    storage: Path, server: LocalTriton, requests: int, out: Path
) -> dict[str, float]:
    cli(
        "infer", "--storage", storage, "--url", server.grpc_url, "--requests", str(requests),
        "--warmup", "50", "--output", out,
    )  # fmt: skip
    (latency,) = sorted(out.glob("*/latency.json"))[-1:]
    report = json.loads(latency.read_text())
    shutil.rmtree(out)
    return {"p50_ms": report["p50_ms"], "p99_ms": report["p99_ms"]}


def measure(rounds: int, requests: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    try:
        with LocalRadosgw(work / "radosgw") as rgw:
            # The credentials, and AWS_EC2_METADATA_DISABLED=true: every S3 client here
            # (pin, and Triton, which inherits this environment) asks nothing of an
            # instance metadata service.
            os.environ.update({**rgw.env, "AWS_EC2_METADATA_DISABLED": "true"})
            storage, url = prepare(work, rgw)
            model_bytes = (storage / "models" / NAME / "1" / MODEL_FILE).stat().st_size
            load_before = load_average()
            rows: dict[str, list[dict[str, float]]] = {"volume": [], "s3": []}
            for _ in range(rounds):
                for label, source in (("volume", None), ("s3", url)):
                    result = time_to_ready(storage, source, work / f"served-{label}")
                    server = result.pop("server")
                    try:
                        result |= steady_latency(storage, server, requests, work / "inference")
                    finally:
                        server.stop()
                    rows[label].append(result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        label: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for label, runs in rows.items()
    }
    for figures in summary.values():
        figures["ready_s"] = figures["pin_s"] + figures["triton_s"]
    return {
        "machine": {**machine(), "load_average_before": load_before},
        "method": (
            f"median of {rounds} alternating rounds; ready = `mnist-pipeline pin` (process "
            "start included) + tritonserver start until ready; latency = `mnist-pipeline "
            f"infer`, {requests} requests of 1 image, concurrency 1, after 50 unmeasured"
        ),
        "model_bytes": model_bytes,
        "summary": summary,
        "rounds": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    results = measure(args.rounds, args.requests)
    header = ("repository", "pin s", "triton s", "ready s", "p50 ms", "p99 ms")
    print(f"{header[0]:<10} " + " ".join(f"{h:>8}" for h in header[1:]))
    for label, f in results["summary"].items():
        print(
            f"{label:<10} "
            + " ".join(
                f"{f[k]:>8.2f}" for k in ("pin_s", "triton_s", "ready_s", "p50_ms", "p99_ms")
            )
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(OUT)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
