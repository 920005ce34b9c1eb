"""Profile sequential serving with py-spy: the client process and Triton's python stubs.

    pip install py-spy
    PYTHONPATH=src python benchmarks/profile_serving.py OUT_DIR [--seconds 12]
    python benchmarks/profile_serving.py --summarise OUT_DIR/*.txt

Trains a tiny model (latency does not depend on its accuracy), exports it, starts the
local Triton and records py-spy's raw stacks of the client (this process) and of each
python-backend stub while batch-1 requests go one at a time. The summary gives each
function's share of samples: how much of a served request is onnxruntime, the backend's
Python glue, gRPC waiting and the client's own Python.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_serving
from common import free_ports
from mnist_pipeline import data, repository
from mnist_pipeline.export import export
from mnist_pipeline.serve import LocalTriton
from mnist_pipeline.train import TrainConfig, train


def py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            shutil.which("py-spy") or "py-spy",
            "record",
            "-p",
            str(pid),
            "-d",
            str(int(seconds)),
            "-r",
            "200",
            "-f",
            "raw",
            "--nonblocking",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def profile(out: Path, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    storage = Path(tempfile.mkdtemp(prefix="profile-storage-"))
    try:
        data.place(storage)
        train(storage, TrainConfig(limit_train=512, limit_test=512), run_id="p", checkpoint_every=0)
        export(storage, repository.TritonConfig(), checkpoint=storage / "checkpoints/p/model.pth")
        images, labels = data.load(storage, "test")
        x = data.normalize(images)
        http, grpc, metrics = free_ports(3)
        with LocalTriton(
            storage / "models", http_port=http, grpc_port=grpc, metrics_port=metrics
        ) as server:
            url, model = server.grpc_url, repository.DEFAULT_MODEL_NAME
            bench_serving.served(url, model, x, labels, 200, 1)  # warm up
            assert server.process is not None
            stubs = subprocess.run(
                ["pgrep", "-g", str(server.process.pid), "-f", "triton_python_backend_stub"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            spies = [py_spy(int(pid), seconds, out / f"stub-{pid}.txt") for pid in stubs]
            spies.append(py_spy(os.getpid(), seconds, out / "client.txt"))
            deadline = time.monotonic() + seconds - 1
            while time.monotonic() < deadline:
                print(bench_serving.served(url, model, x, labels, 500, 1))
            for spy in spies:
                spy.wait()
    finally:
        shutil.rmtree(storage, ignore_errors=True)


def summarise(path: Path, top: int = 12) -> str:
    """Each function's inclusive share of the samples that have a Python stack at all
    (a stub waiting for Triton's next request shows an empty stack)."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            idle += n
        for frame in set(frames):
            inclusive[frame] += n
    busy = max(1, total - idle)
    lines = [f"{path.name}: {total} samples, {idle / max(1, total):.0%} without a Python stack"]
    lines += [f"  {n / busy:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", type=Path, nargs="+")
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--summarise", action="store_true", help="summarise raw py-spy files")
    args = parser.parse_args()
    if args.summarise:
        print("\n".join(summarise(p) for p in args.paths))
    else:
        profile(args.paths[0], args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
