"""BENCHMARKS.md and its plots, generated from the suite's results (never edited by hand)."""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import verdicts
from common import EPOCH_IMAGES
from mnist_pipeline.storage import atomic_write_json

PLOTS = {
    "latency": "serving-latency.png",
    "throughput": "serving-throughput.png",
    "accuracy": "training-accuracy.png",
    "dashboard": "serving-dashboard.png",
}
RESULTS = "results.json"
# The in-process figures measured beside each served one (bench_serving.Yardstick): batch-1
# p50 on one instance's threads, batch-16 images/s on the server's thread budget.
P50 = "inprocess_p50_ms"
B16 = "inprocess_batch16_images_per_s"
TEMPLATE = Path(__file__).with_name("template.md")


def sections(path: Path = TEMPLATE) -> dict[str, str]:
    """template.md's sections by name: the text after each `<!-- section: NAME -->` line."""
    parts = re.split(r"^<!-- section: (\w+) -->\n", path.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


SECTIONS = sections()


def fill(name: str, **fields: Any) -> str:
    """A block section of the template, filled."""
    return SECTIONS[name].format(**fields)


def sentence(name: str, **fields: Any) -> str:
    """A section that is a paragraph inside another one: without its final newline."""
    return fill(name, **fields).removesuffix("\n")


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
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5.5))
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
    _, budget = references(serving)
    b16 = [level[B16] for level in perf]
    left.plot(
        c,
        b16,
        color="k",
        linestyle="--",
        marker="x",
        label=f"in-process batch 16 ({budget['threads']} thread(s)), beside each level",
    )
    left.plot(c, [v * 0.6 for v in b16], color="grey", linestyle=":", label="target: 60% of that")
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
        # Below the axes: the in-process lines move with the load, anywhere in the plot.
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
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
    return verdicts.NOT_REACHED if value is None else f"{value:.0f} s"


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
    one, _ = references(serving)
    rows = [
        [
            f"in-process onnxruntime, {r['threads']} thread(s)",
            f"{r['p50_ms']:.2f}",
            f"{r['p90_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            "—",
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
                f"{seq[P50]:.2f} ({seq['p50_ms'] - seq[P50]:+.2f})",
            ]
        )
    return _table(
        [
            "batch 1, one request at a time",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            f"in-process p50 beside it, {one['threads']} thr. (served p50 − that)",
        ],
        rows,
    )


def concurrency_table(results: dict[str, Any]) -> str:
    serving = results["serving"]
    on, off = serving["servers"]["batching_on"], serving["servers"]["batching_off"]
    rows = []
    for a, b in zip(on["concurrency"], off["concurrency"], strict=True):
        rows.append(
            [
                str(a["concurrency"]),
                f"{a['images_per_s']:.0f}",
                f"{a['images_per_s'] / a[B16]:.0%}",
                f"{a['p99_ms']:.1f}",
                _batches(a),
                f"{b['images_per_s']:.0f}",
                f"{b['images_per_s'] / b[B16]:.0%}",
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
    one, budget = references(serving)
    rows = [
        [
            str(p["concurrency"]),
            f"{p['images_per_s']:.0f}",
            f"{p[B16]:.0f} ({p['images_per_s'] / p[B16]:.0%})",
            f"{p['p50_ms']:.2f}",
            f"{p[P50]:.2f} ({p['p50_ms'] - p[P50]:+.2f})",
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
            f"in-process b16 beside, {budget['threads']} thr. (served / that)",
            "p50 ms",
            f"in-process p50 beside, {one['threads']} thr. (served − that)",
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


def best_inprocess(serving: dict[str, Any]) -> tuple[float, float]:
    """The run's best in-process figures beside its served ones (both servers, the
    pipeline's client and perf_analyzer): the lowest batch-1 p50 and the highest batch-16
    images/s, the readings the machine's load held back least."""
    levels = []
    for server in serving["servers"].values():
        levels += [server["sequential"], *server["concurrency"], *server.get("perf_analyzer", [])]
    return min(level[P50] for level in levels), max(level[B16] for level in levels)


def best_of_rows(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """best_inprocess over a sweep's runs: the lowest p50, the highest batch 16."""
    levels = [level for row in rows for level in row["levels"]]
    return min(level[P50] for level in levels), max(level[B16] for level in levels)


def meets_c1(level: dict[str, Any], best_p50: float) -> bool:
    """c1 p50 within the target of in-process both beside it and at its best."""
    return level["p50_ms"] - min(level[P50], best_p50) <= verdicts.C1_P50_GAP_MS


def strict_share(level: dict[str, Any], best_b16: float) -> float:
    """Images/s over in-process batch 16, the higher of beside it and at its best."""
    return float(level["images_per_s"] / max(level[B16], best_b16))


def meets_c8(level: dict[str, Any], best_b16: float) -> bool:
    """c8 images/s at the target share of in-process batch 16 both beside it and at its best."""
    return strict_share(level, best_b16) >= verdicts.C8_SHARE


def _share(level: dict[str, Any]) -> float:
    """A served level's images/s over in-process batch 16 measured beside it."""
    return float(level["images_per_s"] / level[B16])


def _level(row: dict[str, Any], concurrency: int) -> dict[str, Any]:
    return next(level for level in row["levels"] if level["concurrency"] == concurrency)


def variants_table(serving: dict[str, Any], repository: str) -> str:
    """Each run of the sweep, in the order run: the three targets' figures."""
    one, budget = references(serving)
    _, best_b16 = best_of_rows([r for r in serving["variants"] if r["repository"] == repository])
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
                f"{c1['p50_ms']:.2f} ({c1['p50_ms'] - c1[P50]:+.2f})",
                f"{c1['p99_ms']:.2f} ({c1['p99_ms'] / c1['p50_ms']:.1f}×)",
                f"{c8['images_per_s']:.0f} ({_share(c8):.0%})",
                f"{c16['images_per_s']:.0f} ({_share(c16):.0%})",
                verdicts.C8_MEETS[meets_c8(c8, best_b16)],
            ]
        )
    return _table(
        [
            "#",
            "variant",
            "load (1 min)",
            f"c1 p50 ms (− in-process {one['threads']} thr. beside)",
            "c1 p99 ms (× p50)",
            f"c8 images/s (/ in-process b16 beside, {budget['threads']} thr.)",
            "c16 images/s (/ b16 beside)",
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
    """The ONNX Runtime threads a variant's batches run on: the config's intra-op
    parameter (what model.py gives its session), else `default`."""
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
            "infer (stub round trip, model.py, onnxruntime)",
            "output",
            "client p50 − server mean (gRPC, client)",
        ],
        rows,
    )


def targets_table(results: dict[str, Any]) -> str:
    rows = [[t["target"], t["measured"], verdicts.STATUS[t["met"]]] for t in results["targets"]]
    if not any(t["target"].startswith("stretch") for t in results["targets"]):
        rows.append(verdicts.STRETCH_NOT_RUN)
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
            f"{m['tritonserver']} (nvidia-pytriton wheel) with its python backend: the "
            f"project's model.py on PyPI onnxruntime {m['onnxruntime']}, as in-process",
        ],
        ["suite wall time", f"{results['suite_seconds']:.0f} s ({results['mode']} mode)"],
    ]
    return _table(["", ""], rows)


def markdown(results: dict[str, Any]) -> str:
    serving = results["serving"]
    on = serving["servers"]["batching_on"]
    text = fill(
        "header",
        results=RESULTS,
        repeats=serving["repeats"],
        requests=serving["requests"],
        machine=machine_table(results),
        notes="".join(f"\n- {note}\n" for note in results.get("notes", [])),
        targets=targets_table(results),
    )
    if results["training"] is not None:
        text += fill(
            "training",
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
        text += fill(
            "export",
            export_threads=results["export"]["threads"],
            export_load=_load(results["export"]),
            export=export_table(results),
        )
    return text + fill(
        "serving",
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


def precision_table(serving: dict[str, Any]) -> str:
    """fp32 against int8 served: accuracy, size and the targets' figures (medians over the
    baseline's runs), against the fp32 in-process references."""
    one, budget = references(serving)
    rows = []
    for name, served in serving.get("models", {}).items():
        runs = [
            r
            for r in serving["variants"]
            if r["repository"] == name and r["variant"] == serving["variants"][0]["variant"]
        ]
        c1 = [_level(r, 1) for r in runs]
        c8, c16 = ([_level(r, c) for r in runs] for c in (8, 16))
        p50, p99 = _median([x["p50_ms"] for x in c1]), _median([x["p99_ms"] for x in c1])
        gap = _median([x["p50_ms"] - x[P50] for x in c1])
        rows.append(
            [
                name,
                f"{served['accuracy']:.2%}",
                f"{served['bytes'] / 1e6:.1f} MB",
                f"{p50:.2f} ({gap:+.2f})",
                f"{p99:.2f}",
                *(
                    f"{_median([x['images_per_s'] for x in c]):.0f} "
                    f"({_median([_share(x) for x in c]):.0%})"
                    for c in (c8, c16)
                ),
                str(len(runs)),
            ]
        )
    return _table(
        [
            "model",
            "test accuracy (all 10 000)",
            "model.onnx",
            f"c1 p50 ms (− fp32 in-process {one['threads']} thr. beside)",
            "c1 p99 ms",
            f"c8 images/s (/ fp32 in-process b16 beside, {budget['threads']} thr.)",
            "c16 images/s (/ b16 beside)",
            "baseline runs",
        ],
        rows,
    )


def variants_text(serving: dict[str, Any]) -> str:
    one, budget = references(serving)
    text = ""
    if "int8_refused" in serving:
        text += fill("int8_refused", reason=serving["int8_refused"])
    if len(serving.get("models", {})) > 1:
        text += fill("precision", table=precision_table(serving))
    for repository in dict.fromkeys(row["repository"] for row in serving["variants"]):
        rows = [row for row in serving["variants"] if row["repository"] == repository]
        # What batch 16 ran at in-process beside these runs' concurrency-8 levels.
        b16 = _median([_level(row, 8)[B16] for row in rows])
        text += fill(
            "variants",
            repository=repository,
            one_threads=one["threads"],
            budget_threads=budget["threads"],
            table=variants_table(serving, repository),
            verdict=variants_verdict(rows),
            b16_cost=1000 * budget["threads"] / b16,
            b16=b16,
            breakdown=variants_breakdown_table(serving, repository),
            # The reading compares with in-process runs of the fp32 model only.
            reading=c8_reading(serving, rows) if repository == "fp32" else "",
        )
    return text


def _median(values: list[float]) -> float:
    return statistics.median(values)


def variants_verdict(rows: list[dict[str, Any]]) -> str:
    """Which variants meet the targets, and the best at concurrency 8 against the baseline."""
    c8: dict[str, list[float]] = {}
    strict: dict[str, list[float]] = {}
    best_p50, best_b16 = best_of_rows(rows)
    for row in rows:
        c8.setdefault(row["variant"], []).append(_share(_level(row, 8)))
        strict.setdefault(row["variant"], []).append(strict_share(_level(row, 8), best_b16))
    baseline = rows[0]["variant"]
    # In most of its runs: one run that a load burst favoured does not meet it.
    meeting = [
        name
        for name, shares in strict.items()
        if 2 * sum(s >= verdicts.C8_SHARE for s in shares) > len(shares)
    ]
    latency = [row["variant"] for row in rows if meets_c1(_level(row, 1), best_p50)]
    best = max(strict, key=lambda name: _median(strict[name]))
    return sentence(
        "verdict",
        best_p50=best_p50,
        best_b16=best_b16,
        runs=len(c8[baseline]),
        spread=", ".join(f"{r:.0%}" for r in c8[baseline]),
        median=_median(c8[baseline]),
        strict_spread=", ".join(f"{r:.0%}" for r in strict[baseline]),
        best=best,
        best_median=_median(strict[best]),
        meeting=", ".join(meeting) or verdicts.NONE,
        latency=", ".join(dict.fromkeys(latency)) or verdicts.NONE,
    )


def c8_reading(serving: dict[str, Any], rows: list[dict[str, Any]]) -> str:
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
    return sentence(
        "c8_reading",
        images_per_s=p["images_per_s"],
        share=_share(p),
        grpc=p["client_send_ms"] + p["client_recv_ms"] + p["network_ms"],
        queue=p["server_queue_ms"],
        compute=sum(p[f"server_compute_{k}_ms"] for k in ("input", "infer", "output")),
        mean_batch=p["mean_batch_size"],
        executed=", ".join(f"{k}×{v}" for k, v in p["executed_batch_sizes"].items()),
        instances=instances,
        threads=threads,
        ceiling=ceiling,
        ceiling_share=ceiling / p[B16],
        speed=inprocess_s / p["executing_s"],
        instance_ms=1000 * p["executing_s"] / p["requests"],
        inprocess_ms=1000 * inprocess_s / p["requests"],
        busy=busy,
        server_cpus=p["server_cpu_s"] / p["wall_s"],
        client_cpus=p["client_cpu_s"] / p["wall_s"],
    )


def dashboard_text(results: dict[str, Any]) -> str:
    on = results["serving"]["servers"]["batching_on"]
    if "dashboard" not in on:
        return ""
    d = on["dashboard"]
    return fill(
        "dashboard",
        seconds=d["seconds"],
        step_s=d["step_s"],
        rate_interval=4 * d["step_s"],
        png=PLOTS["dashboard"],
    )


def training_analysis(results: dict[str, Any]) -> str:
    """The headline record, and what limited training speed: the CPU the run got."""
    training = results["training"]
    seeds = [r for r in training["runs"] if r["name"].startswith("default-seed")]
    slowest = max(seeds, key=lambda r: r["train_seconds"])
    full = all(r["test_accuracy"] >= verdicts.ACCURACY for r in seeds) and training["full_dataset"]
    record = (
        sentence(
            "record",
            threads=slowest["threads"],
            cpu=results["machine"]["cpu_model"],
            seconds=slowest["train_seconds"],
            seeds=len(seeds),
            accuracies=", ".join(f"{r['test_accuracy']:.2%}" for r in seeds),
        )
        if full
        else sentence("no_record")
    )
    return sentence(
        "training_analysis",
        record=record,
        mflops=training["flops_per_image"] / 1e6,
        tflops=training["flops_per_image"] * EPOCH_IMAGES / 1e12,
        rates=" and ".join(f"{r / 1e9:.0f}" for r in training["matmul_flops_per_s"]),
        share=slowest["cpu_share"],
    )


def analysis_text(results: dict[str, Any]) -> str:
    """Where the served time goes, in numbers taken from this run."""
    serving = results["serving"]
    on = serving["servers"]["batching_on"]
    one, budget = references(serving)
    p1, p8 = (next(p for p in on["perf_analyzer"] if p["concurrency"] == c) for c in (1, 8))
    client1 = on["sequential"]
    c8 = next(c for c in on["concurrency"] if c["concurrency"] == 8)
    return sentence(
        "analysis",
        p1_p50=p1["p50_ms"],
        one_p50=p1[P50],
        one_threads=one["threads"],
        p1_gap=p1["p50_ms"] - p1[P50],
        p1_infer=p1["server_compute_infer_ms"],
        p1_backend=p1["server_compute_infer_ms"] - p1[P50],
        p1_queue=p1["server_queue_ms"],
        p1_copy=p1["server_compute_input_ms"] + p1["server_compute_output_ms"],
        p1_network=p1["network_ms"],
        p1_p99=p1["p99_ms"],
        p1_ratio=p1["p99_ms"] / p1["p50_ms"],
        client1=client1["p50_ms"],
        client1_gap=client1["p50_ms"] - client1[P50],
        p8_images=p8["images_per_s"],
        p8_share=_share(p8),
        best_b16=best_inprocess(serving)[1],
        p8_best_share=p8["images_per_s"] / best_inprocess(serving)[1],
        budget_threads=budget["threads"],
        b16=p8[B16],
        p8_executed=", ".join(f"{k}×{v}" for k, v in p8["executed_batch_sizes"].items()),
        p8_server_cpu_ms=1000 * p8["server_cpu_s"] / p8["requests"],
        b16_cpu_ms=1000 * budget["threads"] / p8[B16],
        c8_images=c8["images_per_s"],
        c8_share=_share(c8),
        cpus=results["machine"]["cpus_available"],
    )


def summary(results: dict[str, Any]) -> str:
    return "\n".join(
        f"{verdicts.SUMMARY[t['met']]}  {t['target']}: {t['measured']}" for t in results["targets"]
    )


def document_for(results_json: Path) -> Path:
    """The BENCHMARKS.md that OUT/benchmarks/results.json belongs to: OUT/BENCHMARKS.md."""
    return results_json.parent.parent / "BENCHMARKS.md"


def main(argv: list[str]) -> int:
    """Render BENCHMARKS.md from a results.json without measuring again:

        python benchmarks/report.py docs/benchmarks/results.json [--plots] [--check]

    (or the folder, `docs`). --plots draws the plots again too; --check writes nothing and
    exits 1 when the document differs from what the results render to."""
    paths = [Path(a) for a in argv if not a.startswith("--")] or [Path("docs")]
    path = paths[0]
    results_json = path if path.suffix == ".json" else path / "benchmarks" / RESULTS
    document = document_for(results_json)
    results = json.loads(results_json.read_text())
    text = markdown(results)
    if "--check" in argv:
        if not document.is_file() or document.read_text() != text:
            print(f"{document} is stale: run python benchmarks/report.py {results_json}")
            return 1
        return 0
    if "--plots" in argv:
        write(results, document.parent)
    else:
        tmp = document.with_name(".BENCHMARKS.md.tmp")
        tmp.write_text(text)
        tmp.replace(document)
    print(f"wrote {document}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
