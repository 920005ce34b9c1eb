"""Data-parallel training: on one machine, over shaped links, and a model of more machines.

    make bench-distributed     # = python benchmarks/bench_distributed.py: 12 800 images per config
    PYTHONPATH=tests python benchmarks/bench_distributed.py --quick --out /tmp/bench   # smoke test
    PYTHONPATH=tests python benchmarks/bench_distributed.py --links-only  # as root: links.json
    PYTHONPATH=tests python benchmarks/bench_distributed.py --compression-accuracy

By default, measures images/s of the same recipe as 1 process × 2 threads and as 2 ranks ×
1 thread (torchrun, gloo) on the same 2 cores: the same silicon, so the ratio is DDP's
overhead on one machine, not a speed-up; from the one-process compute time per step and the
bytes DDP all-reduces per step (every gradient, fp32) it models the step time at 2-16 nodes
on 10/25/100 Gb/s networks (the first model: line rate, no overlap). Writes
OUT/distributed.json and prints the table.

--links-only times one DDP step's gradient synchronisation between 2 ranks in network
namespaces joined by links shaped to 100, 1000 and 2500 Mbit/s (and unshaped), for fp32 and
fp16 gradients and two bucket sizes; fits the achieved share of line rate and the overlap
with the backward pass, compares the corrected model with every point, and rebuilds the
projection from it. --compression-accuracy trains the default recipe on 2 ranks with and
without fp16 gradients on every seed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import load_average, machine
from harness.netnodes import Link, Nodes
from mnist_pipeline import data, model

NODES = (1, 2, 4, 8, 16)
NETWORKS_GBPS = (10, 25, 100)


def train(storage: Path, run_id: str, args: list[str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "mnist_pipeline", "train", "--storage", str(storage)]
    load_before = load_average()
    t0 = time.monotonic()
    subprocess.run(
        [*command, "--run-id", run_id, "--checkpoint-every", "0", *args],
        check=True,
        capture_output=True,
    )
    wall = time.monotonic() - t0
    metrics = json.loads((storage / "checkpoints" / run_id / "metrics.json").read_text())
    last = metrics["history"][-1]
    return {
        "run": run_id,
        "world_size": metrics["world_size"],
        "images_per_s": last["images_per_s"],
        "rank_images_per_s": last["rank_images_per_s"],
        "train_seconds": metrics["train_seconds"],
        "wall_seconds": round(wall, 1),
        "test_accuracy": metrics["test_accuracy"],
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


LINKS_MBIT = (100, 1000, 2500, 0)  # 0: the veth unshaped, as fast as 2 cores move bytes
VARIANTS = "fp32:25,fp16:25,fp32:100"  # hook : bucket_cap_mb (25: its default); bf16 needs CUDA


def link_sweep(gradient_bytes: int, steps: int) -> list[dict[str, Any]]:
    """2 ranks, each in its own network namespace, over a link of each rate: the real DDP
    step with and without its gradient synchronisation (benchmarks/ddp_sync.py)."""
    rows = []
    for mbit in LINKS_MBIT:
        with Nodes(2, Link(mbit), cpus=["0", "1"]) as nodes, tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "sync.json"
            workers = [
                nodes.popen(
                    i,
                    [
                        *(sys.executable, "-m", "torch.distributed.run", "--nnodes=2"),
                        *("--nproc-per-node=1", f"--node-rank={i}"),
                        *(f"--master-addr={nodes.name(0)}", "--master-port=29500"),
                        str(Path(__file__).with_name("ddp_sync.py")),
                        *("--variants", VARIANTS, "--steps", str(steps), "--out", str(out)),
                    ],
                    env={**os.environ, "OMP_NUM_THREADS": "1"},
                )
                for i in range(2)
            ]
            for worker in workers:
                output = worker.communicate(timeout=1200)[0]
                if worker.returncode != 0:
                    raise RuntimeError(f"link {mbit} Mbit/s: {output[-3000:]}")
            for r in json.loads(out.read_text()):
                sync = max(0.0, r["step_s"] - r["compute_s"])
                modelled = ring_allreduce_seconds(2, gradient_bytes, mbit / 1000) if mbit else None
                rows.append({"link_mbit": mbit, **r, "sync_s": round(sync, 4),
                             "modelled_sync_s": modelled and round(modelled, 4)})  # fmt: skip
        print(f"link {mbit or 'unshaped'} Mbit/s measured", file=sys.stderr, flush=True)
    return rows


def corrected_model(rows: list[dict[str, Any]], gradient_bytes: int) -> dict[str, float]:
    """What the first model left out, read off the shaped links: the share of line rate gloo
    achieves (one bucket: nothing overlaps, the all-reduce is all there is to see) and the
    share of the compute that hides the all-reduce (DDP's default buckets)."""
    shaped = [r for r in rows if r["link_mbit"] and r["hook"] == "fp32"]
    whole = [r for r in shaped if one_bucket(r, gradient_bytes)]
    efficiency = statistics.median(r["modelled_sync_s"] / r["sync_s"] for r in whole)
    bucketed = [r for r in shaped if not one_bucket(r, gradient_bytes)]
    hidden = statistics.median(
        max(0.0, r["modelled_sync_s"] / efficiency - r["sync_s"]) / r["compute_s"] for r in bucketed
    )
    return {
        "efficiency": round(efficiency, 3),
        "hidden_share": round(hidden, 3),
        "last_bucket_share": round(last_bucket_share(), 3),
    }


def one_bucket(row: dict[str, Any], gradient_bytes: int) -> bool:
    """Whether the row's bucket cap holds every gradient: one all-reduce, after the backward."""
    return bool(row["bucket_mb"] * 1e6 >= gradient_bytes)


def last_bucket_share(bucket_mb: float = 25) -> float:
    """The share of the gradients in DDP's last bucket, filled in DDP's order (the layers
    nearest the input, whose gradients come last): its all-reduce starts when the backward
    pass has ended, so no compute hides it. DDP caps the first bucket at 1 MiB."""
    buckets, cap = [0], 2**20
    for parameter in reversed(list(model.build().parameters())):
        if buckets[-1] >= cap:
            buckets, cap = [*buckets, 0], int(bucket_mb * 2**20)
        buckets[-1] += parameter.numel() * 4
    return buckets[-1] / sum(buckets)


def exposed_seconds(allreduce: float, compute: float, fit: dict[str, float]) -> float:
    """What of one step's all-reduce the compute does not hide: never less than the last
    bucket's share of it."""
    return max(fit["last_bucket_share"] * allreduce, allreduce - fit["hidden_share"] * compute)


def predicted_sync_seconds(
    row: dict[str, Any], gradient_bytes: int, fit: dict[str, float]
) -> float | None:
    """The corrected model at one measured point: fp16 sends half the bytes; a bucket that
    holds every gradient starts only when the backward pass has ended."""
    if not row["link_mbit"]:
        return None
    sent = gradient_bytes // 2 if row["hook"] == "fp16" else gradient_bytes
    allreduce = ring_allreduce_seconds(2, sent, row["link_mbit"] / 1000) / fit["efficiency"]
    if one_bucket(row, gradient_bytes):
        return allreduce
    return exposed_seconds(allreduce, row["compute_s"], fit)


def sweep_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| link | hook | bucket MB | compute ms | step ms | sync ms measured | "
        "first model | corrected model | corrected / measured |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        first, corrected, measured = r["modelled_sync_s"], r["corrected_sync_s"], r["sync_s"]
        shaped = corrected is not None
        lines.append(
            f"| {r['link_mbit'] or 'unshaped'} Mbit/s | {r['hook']} | {r['bucket_mb']:g} | "
            f"{r['compute_s'] * 1000:.0f} | {r['step_s'] * 1000:.0f} | "
            f"{measured * 1000:.0f} | {f'{first * 1000:.0f}' if shaped else '–'} | "
            f"{f'{corrected * 1000:.0f}' if shaped else '–'} | "
            f"{f'{corrected / measured:.2f}' if shaped else '–'} |"
        )
    return "\n".join(lines)


def links_only(out: Path, gradient_bytes: int, measured_on: dict[str, Any]) -> int:
    rows = link_sweep(gradient_bytes, steps=7)
    fit = corrected_model(rows, gradient_bytes)
    for row in rows:
        predicted = predicted_sync_seconds(row, gradient_bytes, fit)
        row["corrected_sync_s"] = None if predicted is None else round(predicted, 4)
    # A node of two such cores computes the 128 images of a step in the time one core
    # took for its 64 here (both ranks computed at once).
    node_step = round(statistics.median(r["compute_s"] for r in rows if r["hook"] == "fp32"), 4)
    results = {
        "machine": {**measured_on, "load_average_end": load_average()},
        "links": rows,
        "fit": fit,
        "node_step_seconds": node_step,
        "projection": scaling_model(node_step, 128, gradient_bytes, fit),
        "projection_fp16": scaling_model(node_step, 128, gradient_bytes // 2, fit),
        "first_model": scaling_model(node_step, 128, gradient_bytes),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "links.json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    print(f"machine: {m['cpu_model']}, load average {m['load_average_start']} → "
          f"{m['load_average_end']}")  # fmt: skip
    print(sweep_table(rows))
    print(f"gloo reached {fit['efficiency']:.0%} of line rate; DDP's buckets hid the "
          f"all-reduce behind {fit['hidden_share']:.0%} of the compute")  # fmt: skip
    print(f"projection from a {node_step * 1000:.0f} ms step of 128 images per node:")
    print(projection_table(results))
    return 0


def projection_table(results: dict[str, Any]) -> str:
    """Step time and speed-up at 2-16 nodes: the first model, the corrected one, and the
    corrected one with fp16 gradients (half the bytes)."""
    lines = [
        "| network | nodes | first model | corrected model | corrected, fp16 gradients |",
        "| --- | --- | --- | --- | --- |",
    ]
    models = (results["first_model"], results["projection"], results["projection_fp16"])
    for rows in zip(*models, strict=True):
        if rows[0]["nodes"] == 1:
            continue
        cells = [f"{r['compute_ms'] + r['allreduce_ms']:.1f} ms, {r['speedup']}x" for r in rows]
        lines.append(
            f"| {rows[0]['network_gbps']} Gb/s | {rows[0]['nodes']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def own_thread_counts() -> Iterator[None]:
    """Without OMP_NUM_THREADS, for each run's --threads / --nproc-per-node to set its own."""
    saved = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["OMP_NUM_THREADS"] = saved


SEEDS = (0, 1, 2)
COMPRESSIONS = ("none", "fp16")


def compression_accuracy(out: Path, measured_on: dict[str, Any]) -> int:
    """The default recipe (all 60 000 images, 1 epoch) on 2 ranks, with and without fp16
    gradient compression, on every seed: the accuracy a default must keep (>= 99.0%)."""
    runs = []
    with own_thread_counts(), tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp:
        storage = Path(tmp)
        data.place(storage)
        for seed in SEEDS:
            for compression in COMPRESSIONS:
                print(f"seed {seed}: {compression} …", file=sys.stderr, flush=True)
                args = ["--nproc-per-node", "2", "--seed", str(seed),
                        "--gradient-compression", compression]  # fmt: skip
                run = train(storage, f"{compression}-{seed}", args)
                runs.append({"seed": seed, "gradient_compression": compression, **run})
    results = {"machine": {**measured_on, "load_average_end": load_average()}, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "compression.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| seed | gradients | test accuracy (10 000 images) | images/s |")
    print("| --- | --- | --- | --- |")
    for r in runs:
        print(f"| {r['seed']} | {r['gradient_compression']} | {r['test_accuracy']:.2%} | "
              f"{r['images_per_s']:.0f} |")  # fmt: skip
    return 0


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median images/s (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r["images_per_s"])[(len(runs) - 1) // 2]


def ring_allreduce_seconds(nodes: int, gradient_bytes: int, gbps: float) -> float:
    """A ring all-reduce sends and receives 2 (N-1)/N of the buffer on each node's link."""
    return 2 * (nodes - 1) / nodes * gradient_bytes * 8 / (gbps * 1e9)


FIRST_MODEL = {"efficiency": 1.0, "hidden_share": 0.0, "last_bucket_share": 1.0}


def scaling_model(
    step_seconds: float, batch: int, gradient_bytes: int, fit: dict[str, float] = FIRST_MODEL
) -> list[dict[str, Any]]:
    """Global batch fixed (the recipe is unchanged): each of N nodes computes batch/N images
    (time ∝ images, at this machine's speed), then waits for what of the all-reduce its
    compute did not hide. The first model: line rate, nothing hidden; the corrected one
    takes both from the link sweep."""
    rows = []
    for gbps in NETWORKS_GBPS:
        for nodes in NODES:
            compute = step_seconds / nodes
            allreduce = ring_allreduce_seconds(nodes, gradient_bytes, gbps) / fit["efficiency"]
            network = exposed_seconds(allreduce, compute, fit)
            step = compute + network
            rows.append(
                {
                    "network_gbps": gbps,
                    "nodes": nodes,
                    "compute_ms": round(compute * 1000, 1),
                    "allreduce_ms": round(network * 1000, 1),
                    "images_per_s": round(batch / step),
                    "speedup": round(step_seconds / step, 2),
                }
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| network | nodes | compute ms/step | all-reduce ms/step not hidden | images/s | "
        "speed-up |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['network_gbps']} Gb/s | {r['nodes']} | {r['compute_ms']} | "
            f"{r['allreduce_ms']} | {r['images_per_s']} | {r['speedup']}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 1024 images")
    parser.add_argument("--limit-train", type=int, default=12800, help="images per config")
    parser.add_argument("--repeats", type=int, default=2, help="rounds (the median is kept)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for distributed.json (default: docs/benchmarks; with --quick, a temp folder)",
    )
    parser.add_argument(
        "--links-only",
        action="store_true",
        help="only the sweep over network-namespace links (needs root): links.json",
    )
    parser.add_argument(
        "--compression-accuracy",
        action="store_true",
        help="only the default recipe on 2 ranks, with and without fp16 gradients, every "
        "seed: compression.json",
    )
    args = parser.parse_args(argv)
    measured_on = machine()
    if args.compression_accuracy:
        return compression_accuracy(args.out or Path("docs/benchmarks"), measured_on)
    parameters = sum(p.numel() for p in model.build().parameters())
    gradient_bytes = parameters * 4
    if args.links_only:
        return links_only(args.out or Path("docs/benchmarks"), gradient_bytes, measured_on)
    images = 1024 if args.quick else args.limit_train
    repeats = 1 if args.quick else args.repeats
    batch = 128
    recipe = ["--limit-train", str(images), "--limit-test", "1000", "--batch-size", str(batch)]
    configs = {
        "one_process_2_threads": [*recipe, "--threads", "2"],
        "two_ranks_1_thread": [*recipe, "--nproc-per-node", "2"],
    }
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    with own_thread_counts(), tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        storage = Path(tmp)
        data.place(storage)
        for i in range(repeats):
            # Alternate the order: on a shared machine the load drifts between runs.
            for name in sorted(configs, reverse=bool(i % 2)):
                print(f"round {i + 1}: {name} …", file=sys.stderr, flush=True)
                rounds[name].append(train(storage, f"{name}-{i}", configs[name]))
    one, two = (median_run(rounds[name]) for name in configs)
    step_seconds = batch / one["images_per_s"]
    results = {
        "machine": {**measured_on, "load_average_end": load_average()},
        "images": images,
        "batch": batch,
        "repeats": repeats,
        "one_process_2_threads": one,
        "two_ranks_1_thread": two,
        "rounds": rounds,
        "ratio_two_ranks_to_one_process": round(two["images_per_s"] / one["images_per_s"], 3),
        "parameters": parameters,
        "allreduce_bytes_per_step": gradient_bytes,
        "compute_seconds_per_step": round(step_seconds, 4),
        "model": scaling_model(step_seconds, batch, gradient_bytes),
    }
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="bench-distributed-out-"))
        if args.quick
        else Path("docs/benchmarks")
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed.json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    print(
        f"machine: {m['cpu_model']}, {m['cpus_available']} CPUs, load average "
        f"{m['load_average_start']} at start, {m['load_average_end']} at end"
    )
    for name in ("one_process_2_threads", "two_ranks_1_thread"):
        r = results[name]
        print(
            f"{name}: {r['images_per_s']:.0f} images/s (per rank {r['rank_images_per_s']}), "
            f"test accuracy {r['test_accuracy']:.4f}, load {r['load_average_after']}"
        )
    print(f"2 ranks / 1 process: {results['ratio_two_ranks_to_one_process']:.2f}")
    print(f"all-reduced per step: {gradient_bytes / 1e6:.1f} MB ({parameters:,} fp32 gradients)")
    print(f"compute per step of {batch} images here: {step_seconds * 1000:.0f} ms")
    print(table(results["model"]))
    print(f"wrote {out / 'distributed.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
