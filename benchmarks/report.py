"""BENCHMARKS.md and its plots, generated from the suite's results (never edited by hand)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from common import EPOCH_IMAGES
from mnist_pipeline.storage import atomic_write_json

PLOTS = {
    "latency": "serving-latency.png",
    "throughput": "serving-throughput.png",
    "accuracy": "training-accuracy.png",
    "dashboard": "serving-dashboard.png",
}
RESULTS = "results.json"


def write(results: dict[str, Any], out: Path) -> None:
    """out/BENCHMARKS.md, out/benchmarks/results.json and the plots next to it."""
    folder = out / "benchmarks"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / RESULTS, results)
    plot_latency(results, folder / PLOTS["latency"])
    plot_throughput(results, folder / PLOTS["throughput"])
    if results["training"] is not None:
        plot_accuracy(results, folder / PLOTS["accuracy"])
    if "dashboard" in results["serving"]["servers"]["batching_on"]:
        plot_dashboard(results, folder / PLOTS["dashboard"])
    tmp = out / ".BENCHMARKS.md.tmp"
    tmp.write_text(markdown(results))
    tmp.replace(out / "BENCHMARKS.md")


def _subtitle(results: dict[str, Any]) -> str:
    m = results["machine"]
    return f"{m['cpu_model']}, {m['cpus_available']} CPUs, {m['date'][:10]}, {results['mode']} run"


def plot_latency(results: dict[str, Any], path: Path) -> None:
    serving = results["serving"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    series = [
        (f"in-process onnxruntime, {r['threads']} thread(s)", r["latencies_ms"])
        for r in serving["inprocess"]
    ] + [
        (f"Triton gRPC, {name.replace('_', ' ')}", server["latencies_ms"])
        for name, server in serving["servers"].items()
    ]
    top = max(max(lat) for _, lat in series)
    low = min(min(lat) for _, lat in series)
    bins = list(_log_bins(low, top))
    for label, latencies in series:
        ax.hist(latencies, bins=bins, histtype="step", linewidth=1.6, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("batch-1 latency, sequential requests (ms, log scale)")
    ax.set_ylabel("requests")
    ax.set_title(f"Latency distribution\n{_subtitle(results)}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dashboard(results: dict[str, Any], path: Path) -> None:
    """The chart's Grafana dashboard as Grafana would draw it over perf_analyzer's sweep:
    the same panels, the same queries, against a local Prometheus."""
    dashboard = results["serving"]["servers"]["batching_on"]["dashboard"]
    panels = dashboard["panels"]
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(12, 2.8 * rows), sharex=True, squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for s in panel["series"]:
            v = [float("nan") if x is None else x for x in s["v"]]
            ax.plot(s["t"], v, linewidth=1.2, label=s["legend"])
        ax.set_title(panel["title"], fontsize=9)
        ax.set_ylabel(panel["unit"], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if panel["series"]:
            ax.legend(fontsize=6, loc="upper left")
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("seconds into the perf_analyzer sweep (concurrency 1, 2, 4, 8, 16)")
    fig.suptitle(
        f"Grafana dashboard of the chart, from Prometheus\n{_subtitle(results)}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _log_bins(low: float, high: float, n: int = 60) -> Any:
    import numpy as np

    return np.geomspace(max(low * 0.9, 1e-3), high * 1.1, n)


def plot_throughput(results: dict[str, Any], path: Path) -> None:
    serving = results["serving"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, server in serving["servers"].items():
        levels = server["concurrency"]
        c = [level["concurrency"] for level in levels]
        label = f"Triton gRPC, {name.replace('_', ' ')}"
        left.plot(c, [level["images_per_s"] for level in levels], marker="o", label=label)
        right.plot(c, [level["p99_ms"] for level in levels], marker="o", label=label)
    perf = serving["servers"]["batching_on"]["perf_analyzer"]
    label = "perf_analyzer, batching on"
    c = [level["concurrency"] for level in perf]
    left.plot(c, [level["images_per_s"] for level in perf], marker="s", label=label)
    right.plot(c, [level["p99_ms"] for level in perf], marker="s", label=label)
    best = max(serving["inprocess"], key=lambda r: r["batch16_images_per_s"])
    left.axhline(
        best["batch16_images_per_s"],
        color="k",
        linestyle="--",
        label=f"in-process batch 16 ({best['threads']} thread(s))",
    )
    left.axhline(
        best["batch16_images_per_s"] * 0.6, color="grey", linestyle=":", label="target: 60% of that"
    )
    fastest = max(serving["inprocess"], key=lambda r: r["batch1_images_per_s"])
    left.axhline(
        fastest["batch1_images_per_s"],
        color="k",
        linestyle="-.",
        label=f"in-process batch 1 ({fastest['threads']} thread(s))",
    )
    for ax, ylabel in ((left, "images/s"), (right, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(c), [str(v) for v in c])
        ax.set_xlabel("requests in flight (batch 1 each)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.01, 0.88 if ax is left else 0.99))
    left.set_title("Throughput vs concurrency", fontsize=10)
    right.set_title("p99 latency vs concurrency", fontsize=10)
    fig.suptitle(_subtitle(results), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(results: dict[str, Any], path: Path) -> None:
    """Left: the whole curve; right: the last percents, where the targets are."""
    runs = results["training"]["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax in axes:
        for run in runs:
            evals = run["evals"]
            ax.plot(
                [e["train_seconds"] for e in evals],
                [100 * e["test_accuracy"] for e in evals],
                marker=".",
                label=f"{run['name']} ({_recipe(run['config'])})",
            )
        ax.axhline(99.0, color="grey", linestyle=":", label="99.0%")
        ax.axhline(99.5, color="grey", linestyle="-.", label="99.5%")
        ax.set_xlabel("training seconds (evaluation time excluded)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    accuracies = [100 * e["test_accuracy"] for r in runs for e in r["evals"]]
    axes[0].set_ylim(max(min(accuracies) - 1, 0), 100)
    axes[0].set_title("Test accuracy vs training time", fontsize=10)
    axes[0].legend(fontsize=8, loc="lower right")
    axes[1].set_ylim(97 if max(accuracies) >= 97 else 0, 100)
    axes[1].set_title("The same, from 97%", fontsize=10)
    fig.suptitle(_subtitle(results), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _recipe(cfg: dict[str, Any]) -> str:
    text = f"{cfg['optimizer']} lr {cfg['lr']:g} {cfg['schedule']}, batch {cfg['batch_size']}"
    return text + f", {cfg['epochs']:g} epoch(s), seed {cfg['seed']}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_load(load: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


def _load(section: dict[str, Any]) -> str:
    fmt = fmt_load
    before, after = section["load_average_before"], section["load_average_after"]
    return f"Load average (1/5/15 min): {fmt(before)} before, {fmt(after)} after"


def _s(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.0f} s"


def training_table(results: dict[str, Any]) -> str:
    runs = results["training"]["runs"]
    previous = next(r for r in runs if r["name"] == "previous-default")
    rows = []
    for run in runs:
        tta = run["time_to_accuracy_s"]
        rows.append(
            [
                run["name"],
                _recipe(run["config"])
                + (", plain convolutions" if run["plain_convolutions"] else ""),
                f"{run['train_images_seen']}",
                f"{run['train_seconds']:.1f}",
                f"{run['train_seconds'] / previous['train_seconds']:.2f}×",
                f"{run['images_per_s']:.0f}",
                f"{run['cpu_share']:.0%} of {run['threads']}",
                f"{run['flops_per_s'] / 1e9:.0f} ({run['matmul_share']:.0%})",
                f"{run['matmul_epochs']:.2f}",
                f"{run['test_accuracy']:.2%}",
                _s(tta["0.99"]),
                _s(tta["0.995"]),
            ]
        )
    return _table(
        [
            "run",
            "recipe",
            "images trained",
            "train s",
            "× previous",
            "images/s",
            "CPU share (of threads)",
            "GFLOP/s (of matmul)",
            "matmul-epochs",
            "final test acc.",
            "first eval ≥ 99.0%",
            "first eval ≥ 99.5%",
        ],
        rows,
    )


def export_table(results: dict[str, Any]) -> str:
    rows = [
        [
            r["label"],
            str(r["nodes"]),
            f"{r['bytes'] / 1e6:.1f} MB",
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['images_per_s']:.0f}",
        ]
        for r in results["export"]["rows"]
    ]
    return _table(
        [
            "ONNX model",
            "nodes",
            "file size",
            "batch-1 p50 ms",
            "batch-1 p99 ms",
            "batch-16 images/s",
        ],
        rows,
    )


def sequential_table(results: dict[str, Any]) -> str:
    serving = results["serving"]
    best_p50 = min(r["p50_ms"] for r in serving["inprocess"])
    rows = [
        [
            f"in-process onnxruntime, {r['threads']} thread(s)",
            f"{r['p50_ms']:.2f}",
            f"{r['p90_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['p50_ms'] / best_p50:.2f}",
        ]
        for r in serving["inprocess"]
    ]
    for name, server in serving["servers"].items():
        seq = server["sequential"]
        rows.append(
            [
                f"Triton gRPC, {name.replace('_', ' ')}",
                f"{seq['p50_ms']:.2f}",
                f"{seq['p90_ms']:.2f}",
                f"{seq['p99_ms']:.2f}",
                f"{seq['p50_ms'] / best_p50:.2f}",
            ]
        )
    return _table(
        ["batch 1, one request at a time", "p50 ms", "p90 ms", "p99 ms", "p50 / best in-process"],
        rows,
    )


def concurrency_table(results: dict[str, Any]) -> str:
    serving = results["serving"]
    best_b16 = max(r["batch16_images_per_s"] for r in serving["inprocess"])
    on, off = serving["servers"]["batching_on"], serving["servers"]["batching_off"]
    rows = []
    for a, b in zip(on["concurrency"], off["concurrency"], strict=True):
        rows.append(
            [
                str(a["concurrency"]),
                f"{a['images_per_s']:.0f}",
                f"{a['images_per_s'] / best_b16:.0%}",
                f"{a['p99_ms']:.1f}",
                _batches(a),
                f"{b['images_per_s']:.0f}",
                f"{b['images_per_s'] / best_b16:.0%}",
                f"{b['p99_ms']:.1f}",
                _batches(b),
            ]
        )
    return _table(
        [
            "in flight",
            "batching on: images/s",
            "/ in-process b16",
            "p99 ms",
            "batch sizes executed (size×count)",
            "batching off: images/s",
            "/ in-process b16",
            "p99 ms",
            "batch sizes executed",
        ],
        rows,
    )


def perf_table(results: dict[str, Any]) -> str:
    """perf_analyzer's sweep: client-side latency and the server-side breakdown (ms)."""
    serving = results["serving"]
    on = serving["servers"]["batching_on"]
    _, budget = references(serving)
    b16 = budget["batch16_images_per_s"]
    rows = [
        [
            str(p["concurrency"]),
            f"{p['images_per_s']:.0f}",
            f"{p['images_per_s'] / b16:.0%}",
            f"{p['p50_ms']:.2f}",
            f"{p['p99_ms']:.2f}",
            f"{p['client_send_ms'] + p['client_recv_ms']:.2f}",
            f"{p['network_ms']:.2f}",
            f"{p['server_queue_ms']:.2f}",
            f"{p['server_compute_input_ms'] + p['server_compute_output_ms']:.2f}",
            f"{p['server_compute_infer_ms']:.2f}",
            ", ".join(f"{k}×{v}" for k, v in p["executed_batch_sizes"].items()),
            f"{p['server_cpu_s'] / p['wall_s']:.2f} / {p['client_cpu_s'] / p['wall_s']:.2f}",
        ]
        for p in on["perf_analyzer"]
    ]
    return _table(
        [
            "in flight",
            "images/s",
            f"/ in-process b16 ({budget['threads']} thr.)",
            "p50 ms",
            "p99 ms",
            "client send + recv",
            "network + server send/recv",
            "server queue",
            "compute input + output",
            "compute infer",
            "batch sizes executed",
            "CPUs used: server / client",
        ],
        rows,
    )


def references(serving: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The in-process figures the serving targets compare with: on one instance's threads
    (what a lone request gets) and on the server's whole thread budget."""
    on = serving["servers"]["batching_on"]
    threads = {r["threads"]: r for r in serving["inprocess"]}
    return threads[on["intra_op_threads"]], threads[on["instances"] * on["intra_op_threads"]]


def _level(row: dict[str, Any], concurrency: int) -> dict[str, Any]:
    return next(level for level in row["levels"] if level["concurrency"] == concurrency)


def variants_table(serving: dict[str, Any], repository: str) -> str:
    """Each run of the sweep, in the order run: the three targets' figures."""
    one, budget = references(serving)
    b16 = budget["batch16_images_per_s"]
    rows = []
    for row in serving["variants"]:
        if row["repository"] != repository:
            continue
        c1, c8, c16 = (_level(row, c) for c in (1, 8, 16))
        rows.append(
            [
                str(row["order"]),
                row["variant"],
                f"{row['load_average'][0]:.2f}",
                f"{c1['p50_ms']:.2f} ({c1['p50_ms'] - one['p50_ms']:+.2f})",
                f"{c1['p99_ms']:.2f} ({c1['p99_ms'] / c1['p50_ms']:.1f}×)",
                f"{c8['images_per_s']:.0f} ({c8['images_per_s'] / b16:.0%})",
                f"{c16['images_per_s']:.0f} ({c16['images_per_s'] / b16:.0%})",
                "**yes**" if c8["images_per_s"] >= 0.6 * b16 else "no",
            ]
        )
    return _table(
        [
            "#",
            "variant",
            "load (1 min)",
            f"c1 p50 ms (− in-process {one['threads']} thr.)",
            "c1 p99 ms (× p50)",
            f"c8 images/s (/ in-process b16, {budget['threads']} thr.)",
            "c16 images/s (/ b16)",
            "c8 ≥ 60%",
        ],
        rows,
    )


def inprocess_ms(executed: dict[str, int], batch_ms: dict[str, float]) -> float:
    """In-process milliseconds to run the batches Triton executed (size → count), the
    sizes between those measured interpolated linearly."""
    sizes = sorted(int(b) for b in batch_ms)
    total = 0.0
    for size, count in executed.items():
        b = int(size)
        high = next(s for s in sizes if s >= b)
        low = max((s for s in sizes if s <= b), default=high)
        share = 0.0 if high == low else (b - low) / (high - low)
        total += count * ((1 - share) * batch_ms[str(low)] + share * batch_ms[str(high)])
    return total


def instance_threads(row: dict[str, Any], default: int) -> int:
    """The ONNX Runtime threads a variant's batches run on: the backend's global pool
    when tritonserver has one, else the config's intra-op parameter, else ONNX Runtime's
    default (every CPU, `default`)."""
    for arg in row["server_args"]:
        if ",intra_op_thread_count=" in arg:
            return int(arg.rpartition("=")[2])
    parameter = (row["config"].get("parameters") or {}).get("intra_op_thread_count")
    return int(parameter["string_value"]) if parameter else default


def same_batches_ms(serving: dict[str, Any], row: dict[str, Any], level: dict[str, Any]) -> str:
    """In-process ms per image for the batches this level executed, on the variant's
    threads, if the in-process section measured that many."""
    _, budget = references(serving)
    threads = instance_threads(row, budget["threads"])
    measured = {r["threads"]: r for r in serving["inprocess"]}
    if threads not in measured:
        return "—"
    ms = inprocess_ms(level["executed_batch_sizes"], measured[threads]["batch_ms"])
    return f"{ms / level['requests']:.2f} ({threads} thr.)"


def variants_breakdown_table(serving: dict[str, Any], repository: str) -> str:
    """Where a request's time and the CPU go at concurrency 8, run by run."""
    rows = []
    for row in serving["variants"]:
        if row["repository"] != repository:
            continue
        p = _level(row, 8)
        instances = sum(g.get("count", 1) for g in row["config"]["instance_group"])
        rows.append(
            [
                str(row["order"]),
                row["variant"],
                f"{p['client_send_ms'] + p['client_recv_ms']:.2f}",
                f"{p['network_ms']:.2f}",
                f"{p['server_queue_ms']:.2f}",
                f"{p['server_compute_input_ms'] + p['server_compute_output_ms']:.2f}",
                f"{p['server_compute_infer_ms']:.2f}",
                _batches(p),
                f"{p['executing_s'] / (instances * p['wall_s']):.0%} of {instances}",
                f"{p['server_cpu_s'] / p['wall_s']:.2f} / {p['client_cpu_s'] / p['wall_s']:.2f}",
                f"{1000 * p['executing_s'] / p['requests']:.2f}",
                same_batches_ms(serving, row, p),
                f"{1000 * p['server_cpu_s'] / p['requests']:.2f}",
            ]
        )
    return _table(
        [
            "#",
            "variant",
            "client send + recv",
            "gRPC: network + server send/recv",
            "queue",
            "compute input + output",
            "compute infer",
            "batch sizes executed (mean)",
            "instances busy",
            "CPUs used: server / client",
            "instance ms per image",
            "in-process ms per image, same batches",
            "server CPU ms per image",
        ],
        rows,
    )


def _batches(level: dict[str, Any]) -> str:
    sizes = level["executed_batch_sizes"]
    listed = ", ".join(f"{k}×{v}" for k, v in sizes.items())
    return f"{listed} (mean {level['mean_batch_size']:.2f})"


def breakdown_table(results: dict[str, Any]) -> str:
    """Where a sequential request's time goes, from Triton's statistics at concurrency 1."""
    serving = results["serving"]
    rows = []
    for name, server in serving["servers"].items():
        c1 = next(c for c in server["concurrency"] if c["concurrency"] == 1)
        ms = c1["server_mean_per_request"]
        client_mean = server["sequential"]["p50_ms"]
        rows.append(
            [
                name.replace("_", " "),
                f"{client_mean:.2f}",
                f"{ms['success_ms']:.2f}",
                f"{ms['queue_ms']:.2f}",
                f"{ms['compute_input_ms']:.2f}",
                f"{ms['compute_infer_ms']:.2f}",
                f"{ms['compute_output_ms']:.2f}",
                f"{client_mean - ms['success_ms']:.2f}",
            ]
        )
    return _table(
        [
            "Triton",
            "client p50 ms",
            "server total",
            "queue",
            "input",
            "infer (onnxruntime)",
            "output",
            "client p50 − server mean (gRPC, client)",
        ],
        rows,
    )


def targets_table(results: dict[str, Any]) -> str:
    rows = [
        [t["target"], t["measured"], "**met**" if t["met"] else "**not met**"]
        for t in results["targets"]
    ]
    if not any(t["target"].startswith("stretch") for t in results["targets"]):
        rows.append(
            [
                "stretch: >= 99.5% test accuracy within 5 minutes of training",
                "not run (`--stretch` trains the default recipe for 3 epochs)",
                "not measured",
            ]
        )
    return _table(["target", "measured", "status"], rows)


def machine_table(results: dict[str, Any]) -> str:
    m = results["machine"]
    rows = [
        ["date (UTC)", m["date"]],
        [
            "CPU",
            f"{m['cpu_model']}, {m.get('family_model', '?')}, "
            f"{' '.join(m.get('vector_extensions', [])) or 'no AVX2'}",
        ],
        ["logical CPUs / available to the suite", f"{m['logical_cpus']} / {m['cpus_available']}"],
        ["torch threads (training)", str(m["torch_threads"])],
        [
            "load average (1/5/15 min)",
            f"{fmt_load(m['load_average_start'])} at start, "
            f"{fmt_load(m['load_average_end'])} at end",
        ],
        [
            "Python / torch / onnxruntime (in-process) / numpy",
            f"{m['python']} / {m['torch']} / {m['onnxruntime']} / {m['numpy']}",
        ],
        [
            "tritonserver",
            f"{m['tritonserver']} (nvidia-pytriton wheel) with its onnxruntime backend "
            "(r24.10, built here, ONNX Runtime 1.19.2)",
        ],
        ["suite wall time", f"{results['suite_seconds']:.0f} s ({results['mode']} mode)"],
    ]
    return _table(["", ""], rows)


HEADER = """# Benchmarks

<!-- Generated by benchmarks/run.py from benchmarks/{results}: do not edit by hand;
     run `make bench` to measure again. -->

Training, export and serving measured by `benchmarks/run.py` on one machine.
Timings are medians of {repeats} rounds ({requests} requests each for the pipeline's
client); ratios compare figures of the same run. The machine is shared: its load is given
next to each section, and the absolute figures move with it.

## Machine

{machine}
{notes}
## Targets

{targets}
"""

TRAINING = """
## Training

Images/s is the training set's images divided by training seconds (evaluation
excluded); the test accuracy is measured every {eval_images} training images or so.
CPU share is the CPU time the training process got per wall-clock second, divided by
its threads: below 100%, other processes on this shared machine held the cores.
The *default* recipe is the pipeline's (SGD Nesterov, fused, one-cycle over
{default_epochs:g} epoch, batch 128, label smoothing 0.1, weight decay 5e-4, channels-last,
the 2x2 and 1x1 maps trained as matrix products), on seeds 0, 1 and 2; *short* is the
same over {short_epochs:g} epoch, the schedule the 0.6× target would take, tried beside it;
*previous-default* is release 0.1.0's (the same over 1 whole epoch, every convolution
through oneDNN); with `--stretch`, *original* is the first implementation's (Adam lr 1e-3
constant, batch 64, no smoothing, no decay). Matmul-epochs: training seconds ÷ the
seconds one epoch's FLOPs take at the machine's fp32 matmul rate, measured in the same run.
{training_load}.

{training}

![Test accuracy against training time](benchmarks/{accuracy_png})

{training_analysis}
"""

EXPORT = """
## Export

torch.onnx.export's graph before and after the export stage's optimisation (torch's
ONNX optimiser: BatchNorm folded into Conv, constants folded; then onnxslim), both run
by onnxruntime on {export_threads} thread(s) with ORT_ENABLE_ALL, as Triton would.
{export_load}.

{export}
"""

SERVING = """
## Serving

In-process onnxruntime {ort} (the limit: no network, no server) against the local
Triton {triton} serving the exported repository unchanged with its own onnxruntime
backend ({backend}; r24.10 built against ONNX Runtime 1.19.2, as in the
tritonserver:24.10-py3 image), {instances} instances × {instance_threads} ONNX Runtime
thread(s) from config.pbtxt's parameters, every request one image over gRPC.
Served figures come two ways: NVIDIA's perf_analyzer (tritonclient 2.51.0, C++,
concurrency 1–16, batching on) and the pipeline's own Python client (`infer`), with
dynamic batching on (the exported repository, preferred sizes [2, 4, 8]) and off (a
copy whose config.pbtxt drops dynamic_batching). {serving_load}.

### perf_analyzer

Client-side latency and, from Triton's statistics, where a request's time goes (mean
ms per request); batch sizes executed are Triton's own count during that level, and the
CPUs used the server's and perf_analyzer's CPU time over that level's run.

{perf}
{dashboard}
### Sequential latency, the pipeline's client

{sequential}

![Latency distribution](benchmarks/{latency_png})

### Concurrency, the pipeline's client

Throughput and p99 with N requests in flight; batch sizes executed are Triton's own
count (statistics API, batch_stats) during that level's requests.

{concurrency}

![Throughput against concurrency](benchmarks/{throughput_png})

### Where a served request's time goes

Triton's statistics at concurrency 1 of the pipeline's client, mean ms per request.

{breakdown}

{analysis}

### Serving variants: what Triton offers

The same exported model served with variants of its config.pbtxt (edits of a copy of
the repository) or of tritonserver's options, one server after the other with the
baseline (the exported config, unchanged) repeated between them; each through
perf_analyzer at concurrency 1 (latency) and 8 and 16 (throughput). Ratios compare with
this run's in-process figures above. The exported config keeps its fields whatever
these figures say.

{variants}
"""


def markdown(results: dict[str, Any]) -> str:
    serving = results["serving"]
    on = serving["servers"]["batching_on"]
    text = HEADER.format(
        results=RESULTS,
        repeats=serving["repeats"],
        requests=serving["requests"],
        machine=machine_table(results),
        notes="".join(f"\n- {note}\n" for note in results.get("notes", [])),
        targets=targets_table(results),
    )
    if results["training"] is not None:
        text += TRAINING.format(
            eval_images=results["settings"]["eval_images"],
            default_epochs=next(
                r["config"]["epochs"]
                for r in results["training"]["runs"]
                if r["name"].startswith("default-seed")
            ),
            short_epochs=next(
                r["config"]["epochs"]
                for r in results["training"]["runs"]
                if r["name"].startswith("short-seed")
            ),
            training_load="; ".join(
                f"{run['name']}: {_load(run)[0].lower()}{_load(run)[1:]}"
                for run in results["training"]["runs"]
            ),
            training=training_table(results),
            training_analysis=training_analysis(results),
            accuracy_png=PLOTS["accuracy"],
        )
    if results["export"] is not None:
        text += EXPORT.format(
            export_threads=results["export"]["threads"],
            export_load=_load(results["export"]),
            export=export_table(results),
        )
    return text + SERVING.format(
        ort=results["machine"]["onnxruntime"],
        triton=results["machine"]["tritonserver"],
        backend=on["backend"],
        instances=on["instances"],
        instance_threads=on["intra_op_threads"],
        serving_load=_load(serving),
        perf=perf_table(results),
        dashboard=dashboard_text(results),
        sequential=sequential_table(results),
        latency_png=PLOTS["latency"],
        concurrency=concurrency_table(results),
        throughput_png=PLOTS["throughput"],
        breakdown=breakdown_table(results),
        analysis=analysis_text(results),
        variants=variants_text(serving),
    )


VARIANTS = """
#### Model repository: {repository}

c1 p50 is given with its difference from in-process batch 1 on {one_threads} thread(s)
(target: at most +0.5 ms), c1 p99 with its ratio to p50 (target: at most 3×), c8 and c16
throughput with their ratio to in-process batch 16 on {budget_threads} thread(s) (target
at c8: at least 60%).

{table}

{verdict}

Where the time goes at concurrency 8, run by run. Per request, in mean ms: perf_analyzer's
own send and receive, gRPC (the network over loopback and the server's send/receive),
then from Triton's statistics the dynamic batcher's queue and the compute (a batch's
compute counts in full for each of its requests). Over the whole perf_analyzer run:
the batch sizes the instances executed (size×count), how busy the instances were, the
CPUs the server and perf_analyzer used, and per image the instance time executing
batches and the server's CPU time (in-process batch 16 costs
{b16_cost:.2f} ms of CPU per image: {budget_threads} thread(s) ÷ {b16:.0f} images/s).

{breakdown}

{reading}
"""


def precision_table(serving: dict[str, Any]) -> str:
    """fp32 against int8 served: accuracy, size and the targets' figures (medians over the
    baseline's runs), against the fp32 in-process references."""
    one, budget = references(serving)
    b16 = budget["batch16_images_per_s"]
    rows = []
    for name, served in serving.get("models", {}).items():
        runs = [
            r
            for r in serving["variants"]
            if r["repository"] == name and r["variant"] == serving["variants"][0]["variant"]
        ]
        c1 = [_level(r, 1) for r in runs]
        c8, c16 = ([_level(r, c)["images_per_s"] for r in runs] for c in (8, 16))
        p50, p99 = _median([x["p50_ms"] for x in c1]), _median([x["p99_ms"] for x in c1])
        rows.append(
            [
                name,
                f"{served['accuracy']:.2%}",
                f"{served['bytes'] / 1e6:.1f} MB",
                f"{p50:.2f} ({p50 - one['p50_ms']:+.2f})",
                f"{p99:.2f}",
                f"{_median(c8):.0f} ({_median(c8) / b16:.0%})",
                f"{_median(c16):.0f} ({_median(c16) / b16:.0%})",
                str(len(runs)),
            ]
        )
    return _table(
        [
            "model",
            "test accuracy (all 10 000)",
            "model.onnx",
            f"c1 p50 ms (− fp32 in-process {one['threads']} thr.)",
            "c1 p99 ms",
            f"c8 images/s (/ fp32 in-process b16, {budget['threads']} thr.)",
            "c16 images/s (/ b16)",
            "baseline runs",
        ],
        rows,
    )


def variants_text(serving: dict[str, Any]) -> str:
    one, budget = references(serving)
    b16 = budget["batch16_images_per_s"]
    text = ""
    if "int8_refused" in serving:
        text += f"\nThe int8 export of this model was refused: {serving['int8_refused']}\n"
    if len(serving.get("models", {})) > 1:
        text += (
            "\n#### fp32 and int8 served side by side\n\nThe same checkpoint exported "
            "twice (`export --precision int8`: static QDQ quantisation calibrated on 512 "
            "training images), each served with its exported config; medians over each "
            "model's baseline runs below. Ratios divide by the fp32 model's in-process "
            "figures, so that both are read against one yardstick.\n\n"
            + precision_table(serving)
            + "\n"
        )
    for repository in dict.fromkeys(row["repository"] for row in serving["variants"]):
        rows = [row for row in serving["variants"] if row["repository"] == repository]
        text += VARIANTS.format(
            repository=repository,
            one_threads=one["threads"],
            budget_threads=budget["threads"],
            table=variants_table(serving, repository),
            verdict=variants_verdict(rows, one, b16),
            b16_cost=1000 * budget["threads"] / b16,
            b16=b16,
            breakdown=variants_breakdown_table(serving, repository),
            # The reading compares with in-process runs of the fp32 model only.
            reading=c8_reading(serving, rows, b16) if repository == "fp32" else "",
        )
    return text


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def variants_verdict(rows: list[dict[str, Any]], one: dict[str, Any], b16: float) -> str:
    """Which variants meet the targets, and the best at concurrency 8 against the baseline."""
    c8: dict[str, list[float]] = {}
    for row in rows:
        c8.setdefault(row["variant"], []).append(_level(row, 8)["images_per_s"] / b16)
    baseline = rows[0]["variant"]
    meeting = [name for name, ratios in c8.items() if _median(ratios) >= 0.6]
    latency = [row["variant"] for row in rows if _level(row, 1)["p50_ms"] - one["p50_ms"] <= 0.5]
    best = max(c8, key=lambda name: _median(c8[name]))
    spread = ", ".join(f"{r:.0%}" for r in c8[baseline])
    return (
        f"**Verdict.** The baseline's c8 ratio over its {len(c8[baseline])} runs: {spread} "
        f"(median {_median(c8[baseline]):.0%}): the spread is the machine's doing, and a "
        f"variant's difference from the baseline counts only beyond it. Highest c8 (median "
        f"of its runs): {best}, {_median(c8[best]):.0%}. Meeting c8 ≥ 60%: "
        f"{', '.join(meeting) or 'none'}. Meeting c1 p50 ≤ in-process + 0.5 ms in some run: "
        f"{', '.join(dict.fromkeys(latency)) or 'none'}."
    )


def c8_reading(serving: dict[str, Any], rows: list[dict[str, Any]], b16: float) -> str:
    """The baseline's median run at concurrency 8, in words, its throughput taken apart:
    the batches executed (at in-process speed), how fast Triton ran them, how busy it kept
    its instances."""
    runs = sorted(
        ((row, _level(row, 8)) for row in rows if row["variant"] == rows[0]["variant"]),
        key=lambda run: run[1]["images_per_s"],
    )
    row, p = runs[(len(runs) - 1) // 2]
    instances = sum(g.get("count", 1) for g in row["config"]["instance_group"])
    threads = instance_threads(row, references(serving)[1]["threads"])
    batch_ms = next(r for r in serving["inprocess"] if r["threads"] == threads)["batch_ms"]
    inprocess_s = inprocess_ms(p["executed_batch_sizes"], batch_ms) / 1000
    ceiling = instances * p["requests"] / inprocess_s
    busy = p["executing_s"] / (instances * p["wall_s"])
    grpc = p["client_send_ms"] + p["client_recv_ms"] + p["network_ms"]
    compute = sum(p[f"server_compute_{k}_ms"] for k in ("input", "infer", "output"))
    executed = ", ".join(f"{k}×{v}" for k, v in p["executed_batch_sizes"].items())
    return f"""**Reading the baseline at concurrency 8** (its median run: {p["images_per_s"]:.0f}
images/s, {p["images_per_s"] / b16:.0%} of in-process batch 16). A request spends
{grpc:.2f} ms in perf_analyzer and gRPC, {p["server_queue_ms"]:.2f} ms queued (waiting
for a free instance) and {compute:.2f} ms in its batch's compute. Its throughput, taken
apart: the batcher executed batches of {p["mean_batch_size"]:.2f} images on average
({executed}); run back to back in-process on {instances} × {threads} thread(s), those
batches would give {ceiling:.0f} images/s ({ceiling / b16:.0%} of batch 16). Triton
ran them at {inprocess_s / p["executing_s"]:.0%} of in-process speed
({1000 * p["executing_s"] / p["requests"]:.2f} against {1000 * inprocess_s / p["requests"]:.2f}
instance-ms per image) and kept its instances busy {busy:.0%} of perf_analyzer's run. The
server used {p["server_cpu_s"] / p["wall_s"]:.2f} CPUs and perf_analyzer
{p["client_cpu_s"] / p["wall_s"]:.2f}, on a machine shared with other work (its load
in the table above)."""


def dashboard_text(results: dict[str, Any]) -> str:
    on = results["serving"]["servers"]["batching_on"]
    if "dashboard" not in on:
        return ""
    d = on["dashboard"]
    return f"""
During the sweep ({d["seconds"]:.0f} s) a local Prometheus scraped Triton's metrics
each second; below, every panel of the chart's Grafana dashboard
(deploy/helm/mnist-pipeline/dashboards/triton.json), its queries evaluated every
{d["step_s"]} s over the sweep as Grafana would (`$__rate_interval` = {4 * d["step_s"]} s).
The CPU panel is the machine's utilisation as Triton reads it, shared with the client.

![The dashboard over the sweep](benchmarks/{PLOTS["dashboard"]})
"""


def training_analysis(results: dict[str, Any]) -> str:
    """The headline record, and what limited training speed: the CPU the run got."""
    training = results["training"]
    seeds = [r for r in training["runs"] if r["name"].startswith("default-seed")]
    slowest = max(seeds, key=lambda r: r["train_seconds"])
    rates = " and ".join(f"{r / 1e9:.0f}" for r in training["matmul_flops_per_s"])
    accuracies = ", ".join(f"{r['test_accuracy']:.2%}" for r in seeds)
    cpu = results["machine"]["cpu_model"]
    record = (
        f"**Time to 99.0% on {slowest['threads']} cores of this {cpu}:** "
        f"{slowest['train_seconds']:.0f} s of training (the slowest of {len(seeds)} seeds; "
        f"final accuracies {accuracies})."
        if all(r["test_accuracy"] >= 0.99 for r in seeds) and training["full_dataset"]
        else "**Not every seed reached 99.0% (or a subset was trained): no record.**"
    )
    share = slowest["cpu_share"]
    return (
        f"{record} FLOPs are the architecture's: {training['flops_per_image'] / 1e6:.1f} M "
        f"per training image (forward and backward, plain convolutions with their padding "
        f"taps, torch's FLOP counter), {training['flops_per_image'] * EPOCH_IMAGES / 1e12:.1f} "
        f"TFLOP per epoch. The machine's fp32 matmul rate (2048×2048 products on the same "
        f"threads, median of 7) read {rates} GFLOP/s before and after training. The "
        f"default's matrix products for the 2x2 and 1x1 maps skip the padding taps, so its "
        f"FLOP/s count work it no longer does: read them as epochs per matmul-second. "
        f"The slowest seed got {share:.0%} of its threads' CPU time; below 100%, other "
        f"processes held the cores and the figures are slower than idle ones."
    )


def analysis_text(results: dict[str, Any]) -> str:
    """Where the served time goes, in numbers taken from this run."""
    serving = results["serving"]
    on = serving["servers"]["batching_on"]
    one, budget = references(serving)
    p1, p8 = (next(p for p in on["perf_analyzer"] if p["concurrency"] == c) for c in (1, 8))
    client1 = on["sequential"]["p50_ms"]
    c8 = next(c for c in on["concurrency"] if c["concurrency"] == 8)
    return f"""**Reading the figures.** At concurrency 1, perf_analyzer's p50 is
{p1["p50_ms"]:.2f} ms against {one["p50_ms"]:.2f} ms for in-process onnxruntime on
{one["threads"]} thread(s) (what one instance runs a lone request with). Of perf_analyzer's
mean, Triton's statistics put {p1["server_compute_infer_ms"]:.2f} ms in ONNX Runtime
(compute infer), {p1["server_queue_ms"]:.2f} ms in the queue and
{p1["server_compute_input_ms"] + p1["server_compute_output_ms"]:.2f} ms in copying
tensors in and out; {p1["network_ms"]:.2f} ms is gRPC over loopback plus the server's
send/receive. Its p99 is {p1["p99_ms"]:.2f} ms ({p1["p99_ms"] / p1["p50_ms"]:.1f}× p50):
on this shared machine the tail follows the other processes' load (above). The pipeline's
Python client measures {client1:.2f} ms at p50 for the same request: the difference with
perf_analyzer is the client's own Python (building the request, protobuf, numpy).

With 8 requests in flight, perf_analyzer reaches {p8["images_per_s"]:.0f} images/s =
{p8["images_per_s"] / budget["batch16_images_per_s"]:.0%} of in-process batch 16 on
{budget["threads"]} thread(s) ({budget["batch16_images_per_s"]:.0f} images/s); the
dynamic batcher executed {", ".join(f"{k}×{v}" for k, v in p8["executed_batch_sizes"].items())}.
The Python client at 8 in flight gets {c8["images_per_s"]:.0f} images/s: its 8 sending
threads compete with the server for the same {results["machine"]["cpus_available"]}
CPUs."""


def summary(results: dict[str, Any]) -> str:
    return "\n".join(
        f"{'met    ' if t['met'] else 'NOT MET'}  {t['target']}: {t['measured']}"
        for t in results["targets"]
    )


if __name__ == "__main__":
    # Regenerate the document from a results.json: python benchmarks/report.py docs
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs")
    write(json.loads((out / "benchmarks" / RESULTS).read_text()), out)
