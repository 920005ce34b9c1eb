"""The figures derived from a run's recorded ones, which the targets judge and the tables and
plots show: the in-process references, each served level's ratios and where its time and CPU
went, the serving variants' sweep."""

from __future__ import annotations

import statistics
from typing import Any

Results = dict[str, Any]
# The in-process figures measured beside each served one (bench_serving.Yardstick): batch-1
# p50 on one instance's threads, batch-16 images/s on the server's thread budget.
P50 = "inprocess_p50_ms"
B16 = "inprocess_batch16_images_per_s"


def references(serving: Results) -> tuple[Results, Results]:
    """The in-process figures the serving targets compare with: on one instance's threads
    (what a lone request gets) and on the server's whole thread budget."""
    on = serving["servers"]["batching_on"]
    threads = {r["threads"]: r for r in serving["inprocess"]}
    return threads[on["intra_op_threads"]], threads[on["instances"] * on["intra_op_threads"]]


def best_inprocess(serving: Results) -> tuple[float, float]:
    """The run's best in-process figures beside its served ones (both servers, the
    pipeline's client and perf_analyzer): the lowest batch-1 p50 and the highest batch-16
    images/s, the readings the machine's load held back least."""
    levels = []
    for server in serving["servers"].values():
        levels += [server["sequential"], *server["concurrency"], *server.get("perf_analyzer", [])]
    return best_of(levels)


def best_of(levels: list[Results]) -> tuple[float, float]:
    return min(x[P50] for x in levels), max(x[B16] for x in levels)


def level(levels: list[Results], concurrency: int) -> Results:
    return next(x for x in levels if x["concurrency"] == concurrency)


def c1_gap(level: Results, best_p50: float) -> float:
    """A served p50 over in-process batch 1, the higher of beside it and at its best."""
    return float(level["p50_ms"] - min(level[P50], best_p50))


def c8_share(level: Results, best_b16: float) -> float:
    """Served images/s over in-process batch 16, the higher of beside it and at its best."""
    return float(level["images_per_s"] / max(level[B16], best_b16))


def served(level: Results, threads: int = 0) -> Results:
    """A served level's figures with those derived from them; `threads`: the server's
    budget, which in-process batch 16 beside the level ran on."""
    x = {**level, "gap": level["p50_ms"] - level[P50], "share": level["images_per_s"] / level[B16]}
    x["p99_ratio"] = level["p99_ms"] / level["p50_ms"]
    executed = ", ".join(f"{k}×{v}" for k, v in level.get("executed_batch_sizes", {}).items())
    x["batches"] = f"{executed} (mean {level.get('mean_batch_size', 0):.2f})"
    if "wall_s" in level:  # perf_analyzer's, with Triton's statistics and the CPU times
        wall, requests = level["wall_s"], level["requests"]
        x["executed"] = executed
        x["send_recv"] = level["client_send_ms"] + level["client_recv_ms"]
        x["compute_io"] = level["server_compute_input_ms"] + level["server_compute_output_ms"]
        x["cpus"] = f"{level['server_cpu_s'] / wall:.2f} / {level['client_cpu_s'] / wall:.2f}"
        x["cpu_ms"] = 1000 * level["server_cpu_s"] / requests
        x["b16_cpu_ms"] = 1000 * threads / level[B16]
        x["executing_ms"] = 1000 * level["executing_s"] / requests
    return x


def sweep(serving: Results) -> list[Results]:
    """The variants' runs in the order run, each with its levels by concurrency ("c1", "c8",
    "c16"), its model's best in-process readings over its sweep and the targets' figures
    against the stricter of those and the ones beside; how busy its instances were at c8,
    and what the batches they ran there take in-process."""
    runs, b16_threads = serving["variants"], references(serving)[1]["threads"]
    levels: dict[str, list[Results]] = {}
    for r in runs:
        levels.setdefault(r["repository"], []).extend(r["levels"])
    rows = []
    for r in runs:
        best_p50, best_b16 = best_of(levels[r["repository"]])
        row: Results = {f"c{x['concurrency']}": served(x, b16_threads) for x in r["levels"]}
        row |= {"run": r, "load": r["load_average"][0], "best_p50": best_p50, "best_b16": best_b16}
        row |= {"c1_gap": c1_gap(row["c1"], best_p50), "c8_share": c8_share(row["c8"], best_b16)}
        row["instances"] = sum(g.get("count", 1) for g in r["config"]["instance_group"])
        row["busy"] = row["c8"]["executing_s"] / (row["instances"] * row["c8"]["wall_s"])
        row["same_batches"] = same_batches(serving, r, row["c8"])
        rows.append(row)
    return rows


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


def same_batches(serving: Results, run: Results, level: Results) -> str:
    """In-process ms per image for the batches this level executed, on the ONNX Runtime
    threads the variant's config gives model.py (the server's budget else), if the
    in-process section measured that many."""
    parameter = (run["config"].get("parameters") or {}).get("intra_op_thread_count")
    threads = int(parameter["string_value"]) if parameter else references(serving)[1]["threads"]
    measured = {r["threads"]: r for r in serving["inprocess"]}
    if threads not in measured:
        return "—"
    ms = inprocess_ms(level["executed_batch_sizes"], measured[threads]["batch_ms"])
    return f"{ms / level['requests']:.2f} ({threads} thr.)"


# The figures of a model's baseline runs the models table gives the median of.
MEDIANS = [("c1", "p50_ms"), ("c1", "gap"), ("c1", "p99_ms")]
MEDIANS += [(c, key) for c in ("c8", "c16") for key in ("images_per_s", "share")]


def baselines(serving: Results) -> list[Results]:
    """Each model the sweep served: its accuracy and size, the medians over its baseline
    runs (the sweep's first variant), its sweep's best in-process readings."""
    rows, swept = [], sweep(serving)
    for name, model in serving.get("models", {}).items():
        runs = [v for v in swept if v["run"]["repository"] == name]
        baseline = [v for v in runs if v["run"]["variant"] == serving["variants"][0]["variant"]]
        row = {**model, "name": name, "megabytes": model["bytes"] / 1e6, "runs": len(baseline)}
        for c, key in MEDIANS:
            row[f"{c}_{key}"] = statistics.median(v[c][key] for v in baseline)
        rows.append(row | {"best_p50": runs[0]["best_p50"], "best_b16": runs[0]["best_b16"]})
    return rows
