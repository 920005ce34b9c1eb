"""One Triton replica against two behind client-side round_robin, as the chart's headless
Service has them: each tritonserver in its own network namespace with its own address and
pinned to its own core (taskset), one name with an A record per replica from dnsmasq
(tests/harness/replicas.py), and the pipeline's own client (its Driver, a dns: target,
round_robin) at a few concurrencies: images/s, p50/p99 and each replica's share, from its
own metrics. Each replica serves what the chart's pin writes for a 1-CPU pod.

    sudo PYTHONPATH=tests .venv/bin/python benchmarks/bench_replicas.py --storage STORAGE  # 1-2 min

perf_analyzer (2.51) takes a dns: target (-u dns:///ADDRESS:8001 works) but always balances
pick_first: measured here, every request of a run went to one replica. Hence the
project's client. Triton's --host-policy is not used: taskset already confines each whole
server to its core.

STORAGE holds an exported model (models/resnet18_mnist) and MNIST (data/). Needs root
(network namespaces), dnsmasq and taskset. Writes docs/benchmarks/replicas.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench_serving import served_latencies
from common import machine, percentiles
from harness.replicas import Replicas, require_tools
from mnist_pipeline import data

MODEL = "resnet18_mnist"
OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "replicas.json"


def pinned_repository(storage: Path, dest: Path) -> Path:
    """The repository a 1-CPU Triton pod serves: `mnist-pipeline pin`, as the chart runs it."""
    command = [
        sys.executable, "-m", "mnist_pipeline", "pin", "--storage", str(storage),
        "--served-repository", str(dest), "--model-name", MODEL, "--model-version", "",
        "--server-cpus", "1", "--instance-count", "1", "--instance-kind", "cpu",
        "--triton-backend", "python",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    return dest


def measure(replicas: Replicas, storage: Path, concurrency: int, requests: int) -> dict[str, Any]:
    x, labels = data.load(storage, "test")
    before = replicas.inference_counts(MODEL)
    latencies, images_per_s = served_latencies(
        replicas.target, MODEL, x, labels, requests, concurrency
    )
    counts = [a - b for a, b in zip(replicas.inference_counts(MODEL), before, strict=True)]
    return {
        "concurrency": concurrency,
        "images_per_s": round(images_per_s, 1),
        **{k: round(v, 3) for k, v in percentiles(latencies).items()},
        "shares": [round(c / sum(counts), 3) for c in counts],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    require_tools()
    cores = [str(c) for c in sorted(os.sched_getaffinity(0))]
    results: dict[str, Any] = {"machine": machine(), "requests": args.requests, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        repository = pinned_repository(args.storage, Path(tmp) / "pinned")
        for count in (1, 2):
            with Replicas(repository, cpus=cores) as replicas:
                for _ in range(count):
                    replicas.add()
                runs = [measure(replicas, args.storage, c, args.requests) for c in args.concurrency]
            results["runs"][f"{count} replica{'s' if count > 1 else ''}"] = runs
            print(count, json.dumps(runs), flush=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
