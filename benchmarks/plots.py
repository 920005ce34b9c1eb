"""The plots docs/BENCHMARKS.md links to, drawn from a run's results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from figures import B16, references
from targets import TARGETS

PLOTS = {
    "latency": "serving-latency.png",
    "throughput": "serving-throughput.png",
    "accuracy": "training-accuracy.png",
    "dashboard": "serving-dashboard.png",
}


def link(name: str, text: str) -> str:
    """The Markdown image of plot `name`, from BENCHMARKS.md."""
    return f"![{text}](benchmarks/{PLOTS[name]})"


def draw(results: dict[str, Any], folder: Path) -> None:
    """Each plot the results hold figures for, into folder."""
    plot_latency(results, folder / PLOTS["latency"])
    plot_throughput(results, folder / PLOTS["throughput"])
    if results["training"] is not None:
        plot_accuracy(results, folder / PLOTS["accuracy"])
    if "dashboard" in results["serving"]["servers"]["batching_on"]:
        plot_dashboard(results, folder / PLOTS["dashboard"])


def _subtitle(results: dict[str, Any], machine: str = "machine") -> str:
    """The machine the figures were measured on: training's may be an earlier run's."""
    m = results.get(machine, results["machine"])
    mode = results["mode"]
    return f"{m['cpu_model']}, {m['cpus_available']} CPUs, {m['date'][:10]}, {mode} run"


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
    share = TARGETS["c8"].limit
    left.plot(
        c, [v * share for v in b16], color="grey", ls=":", label=f"target: {share:.0%} of that"
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
                label=f"{run['name']} ({recipe(run['config'])})",
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
    fig.suptitle(_subtitle(results, "training_machine"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recipe(cfg: dict[str, Any]) -> str:
    text = f"{cfg['optimizer']} lr {cfg['lr']:g} {cfg['schedule']}, batch {cfg['batch_size']}"
    return text + f", {cfg['epochs']:g} epoch(s), seed {cfg['seed']}"
