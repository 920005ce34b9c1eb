"""The benchmark suite runs end to end in quick mode and writes well-formed outputs.

Timings are never asserted: the figures depend on the machine and its load.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.prometheus import dashboard_panels

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])
        ),
    }
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=out,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


@pytest.mark.slow
def test_quick_run_writes_results_json(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    results = json.loads((out / "benchmarks" / "results.json").read_text())
    assert results["mode"] == "quick"
    machine = results["machine"]
    for key in ("cpu_model", "torch", "onnxruntime", "tritonserver", "date"):
        assert isinstance(machine[key], str) and machine[key]
    assert len(machine["load_average_start"]) == 3 and len(machine["load_average_end"]) == 3

    training = results["training"]
    runs = {run["name"]: run for run in training["runs"]}
    seeds = {f"{recipe}-seed{i}" for recipe in ("default", "short") for i in range(3)}
    assert set(runs) == seeds | {"previous-default"}
    assert runs["short-seed0"]["config"]["epochs"] == 0.8
    assert [runs[f"default-seed{i}"]["config"]["seed"] for i in range(3)] == [0, 1, 2]
    assert runs["previous-default"]["plain_convolutions"] is True
    assert runs["previous-default"]["config"]["epochs"] == 1
    # The architecture's FLOPs per training image (forward + backward): 196.8 M.
    assert 190e6 < training["flops_per_image"] < 200e6
    assert len(training["matmul_flops_per_s"]) == 2
    for run in runs.values():
        assert number(run["images_per_s"]) and number(run["train_seconds"])
        assert number(run["matmul_epochs"]) and number(run["matmul_share"])
        assert 0 < run["cpu_share"] <= 1.5  # CPU time per wall second per thread
        assert 0 <= run["test_accuracy"] <= 1
        assert len(run["evals"]) >= 2
        seconds = [e["train_seconds"] for e in run["evals"]]
        assert seconds == sorted(seconds)
        assert set(run["time_to_accuracy_s"]) == {"0.99", "0.995"}

    unoptimised, optimised = results["export"]["rows"]
    assert optimised["nodes"] < unoptimised["nodes"]
    for row in (unoptimised, optimised):
        for key in ("bytes", "p50_ms", "p99_ms", "images_per_s"):
            assert number(row[key]), key

    serving = results["serving"]
    assert {r["threads"] for r in serving["inprocess"]} >= {1}
    for row in serving["inprocess"]:
        assert number(row["p50_ms"]) and number(row["batch16_images_per_s"])
        assert len(row["latencies_ms"]) == results["settings"]["requests"]
    assert set(serving["servers"]) == {"batching_on", "batching_off"}
    assert serving["servers"]["batching_on"]["dynamic_batching"] is not None
    assert serving["servers"]["batching_off"]["dynamic_batching"] is None
    for server in serving["servers"].values():
        assert [c["concurrency"] for c in server["concurrency"]] == [1, 2, 4, 8, 16]
        assert beside(server["sequential"])
        for level in server["concurrency"]:
            assert number(level["images_per_s"]) and number(level["p99_ms"])
            assert beside(level)
            executed = {int(k): v for k, v in level["executed_batch_sizes"].items()}
            # Triton's own count: every request ran, in batches no larger than max_batch_size.
            assert sum(size * n for size, n in executed.items()) == level["requests"]
            assert all(1 <= size <= 16 for size in executed)
    on = serving["servers"]["batching_on"]
    assert on["backend"] == "python"
    perf = on["perf_analyzer"]
    assert [p["concurrency"] for p in perf] == [1, 2, 4, 8, 16]
    for level in perf:
        for key in ("images_per_s", "p50_ms", "p99_ms", "server_compute_infer_ms"):
            assert number(level[key]), key
        assert level["p50_ms"] <= level["p99_ms"]
        assert beside(level)
    # The chart's dashboard over the sweep: every panel drew something from Prometheus.
    panels = on["dashboard"]["panels"]
    assert [p["title"] for p in panels] == [p.title for p in dashboard_panels()]
    for panel in panels:
        assert any(number(v) for s in panel["series"] for v in s["v"]), panel["title"]
    for level in perf:
        executed = {int(k): v for k, v in level["executed_batch_sizes"].items()}
        assert sum(size * n for size, n in executed.items()) == level["requests"]
        for key in ("client_send_ms", "server_queue_ms", "server_cpu_s", "client_cpu_s"):
            assert number(level[key]), key
        assert 0 < level["executing_s"] <= 16 * level["wall_s"]
    check_variants(serving["variants"])
    check_models(serving)
    off = serving["servers"]["batching_off"]["concurrency"]
    assert all(set(level["executed_batch_sizes"]) == {"1"} for level in off)
    # perf_analyzer's three targets, then the pipeline's client's c1 p50 and c8.
    assert [t["target"].partition(":")[0] for t in results["targets"]][-5:] == [
        "perf_analyzer"
    ] * 3 + ["the pipeline's client"] * 2
    assert all(isinstance(t["met"], bool) for t in results["targets"])


def hand_written(document: str) -> str:
    return re.sub(
        r"(<!-- \[\[\[generated: \w+\]\]\] -->\n).*?(<!-- \[\[\[end)", r"\1\2", document, flags=re.S
    )


def beside(figures: dict[str, Any]) -> bool:
    """A served figure carries the in-process figures measured right beside it."""
    return number(figures["inprocess_p50_ms"]) and figures["inprocess_batch16_images_per_s"] > 0


def check_models(serving: dict[str, Any]) -> None:
    """fp32 and the int8 export of the same checkpoint, served side by side."""
    models = serving["models"]
    if "int8_refused" in serving:  # quick mode's model trains on 1000 images only
        assert "int8 model refused" in serving["int8_refused"] and set(models) == {"fp32"}
        return
    assert [models[m]["precision"] for m in ("fp32", "int8")] == ["fp32", "int8"]
    # The int8 export passed its gate: at most 0.1 pp below its own fp32 export.
    assert models["int8"]["accuracy"] >= models["int8"]["fp32_accuracy"] - 0.001
    assert models["int8"]["fp32_accuracy"] == models["fp32"]["accuracy"]
    assert models["int8"]["bytes"] < models["fp32"]["bytes"] / 2


def check_variants(rows: list[dict[str, Any]]) -> None:
    """The serving-variants sweep: the baseline first and last, each variant through
    perf_analyzer at concurrency 1, 8 and 16, with Triton's statistics and CPU times, and
    the edits visible in the config Triton served."""
    assert [r["repository"] for r in rows] == sorted(
        (r["repository"] for r in rows), key=["fp32", "int8"].index
    )
    int8 = [r for r in rows if r["repository"] == "int8"]
    rows = [r for r in rows if r["repository"] == "fp32"]
    # int8 (the same checkpoint quantised) is served beside fp32: its baseline, first and last.
    assert int8 and int8[0]["variant"] == int8[-1]["variant"] == "baseline (exported config)"
    assert [r["order"] for r in rows] == list(range(1, len(rows) + 1))
    assert rows[0]["variant"] == rows[-1]["variant"] == "baseline (exported config)"
    assert len({r["variant"] for r in rows}) >= 3
    baseline = rows[0]["config"]
    assert baseline["backend"] == "python"
    assert baseline["max_batch_size"] == 16
    assert [g["count"] for g in baseline["instance_group"]] == [2]
    assert baseline["parameters"]["intra_op_thread_count"]["string_value"] == "1"
    assert baseline["dynamic_batching"]["preferred_batch_size"] == [2, 4, 8]
    assert rows[0]["pin"] == {"instance_count": 2, "server_cpus": 2, "intra_op_threads": 1}
    # Both ways a variant is made: pinned otherwise, and its pinned config edited.
    pinned = [r for r in rows if r["pin"] != rows[0]["pin"]]
    assert pinned and all(
        sum(g["count"] for g in r["config"]["instance_group"]) == r["pin"]["instance_count"]
        for r in pinned
    )
    assert any(
        r["pin"] == rows[0]["pin"]
        and r["config"]["dynamic_batching"] != baseline["dynamic_batching"]
        for r in rows
    )
    for row in rows:
        assert len(row["load_average"]) == 3
        assert [level["concurrency"] for level in row["levels"]] == [1, 8, 16]
        for level in row["levels"]:
            for key in ("images_per_s", "p50_ms", "p99_ms", "server_queue_ms", "wall_s"):
                assert number(level[key]), key
            assert level["requests"] > 0 and level["executions"] > 0
            assert beside(level)
            assert number(level["server_cpu_s"]) and number(level["client_cpu_s"])


@pytest.mark.slow
def test_quick_run_writes_plots_and_document(quick_run: tuple[Path, str]) -> None:
    out, stdout = quick_run
    doc = (out / "BENCHMARKS.md").read_text()
    for name in (
        "serving-latency.png",
        "serving-throughput.png",
        "training-accuracy.png",
        "serving-dashboard.png",
    ):
        png = out / "benchmarks" / name
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        assert png.stat().st_size > 10_000
        assert f"](benchmarks/{name})" in doc
    for heading in ("## Machine", "## Targets", "## Training", "## Export", "## Serving"):
        assert heading in doc
    table_rows = [line for line in doc.splitlines() if line.startswith("| ")]
    for run in ("default-seed0", "default-seed1", "default-seed2", "previous-default"):
        assert any(line.startswith(f"| {run} |") for line in table_rows)
    assert any(line.startswith("| Time to 99.0%") for line in table_rows)
    assert any(line.startswith("| 8 |") for line in table_rows)
    assert "### perf_analyzer" in doc and "### Serving variants" in doc
    assert "int8 export of this model was refused" in doc or any(
        line.startswith("| int8 |") for line in table_rows
    )
    # The sweep's runs, in the targets' table and where the time goes at concurrency 8.
    baseline = [line for line in table_rows if line.startswith("| fp32 | 1 | baseline (exported")]
    assert len(baseline) == 2 and baseline[0].endswith(("no |", "**yes** |"))
    assert "{" not in doc  # every cell's format string filled
    # The hand-written text is docs/BENCHMARKS.md's: only the generated regions differ.
    assert hand_written(doc) == hand_written((REPO / "docs" / "BENCHMARKS.md").read_text())
    # One verdict line per target, whatever the verdict (quick mode's tiny runs miss them).
    verdicts = [line for line in stdout.splitlines() if line.startswith(("met ", "NOT MET "))]
    targets = json.loads((out / "benchmarks" / "results.json").read_text())["targets"]
    assert len(verdicts) == len(targets)
