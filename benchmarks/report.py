"""docs/BENCHMARKS.md's tables and plot links, rendered from the suite's results.

BENCHMARKS.md is written by hand; this rewrites only its generated regions, each between
`<!-- [[[generated: NAME]]] -->` and `<!-- [[[end]]] -->`, with what function NAME returns:

    python benchmarks/report.py [docs | docs/benchmarks/results.json] [--plots] [--check]

--plots draws the plots again too; --check writes nothing and exits 1 when the document
differs from what the results render to. An OUT without a BENCHMARKS.md of its own (a
--quick run's) gets docs/BENCHMARKS.md's text around its regions."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import plots
from common import EPOCH_IMAGES
from figures import B16, P50, Results, baselines, level, references, served, sweep
from mnist_pipeline.storage import atomic_write_json
from targets import judge, judged

RESULTS = "results.json"
DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
REGION = re.compile(r"(<!-- \[\[\[generated: (\w+)\]\]\] -->\n).*?(<!-- \[\[\[end\]\]\] -->)", re.S)
NOT_MEASURED = "_Not measured in this run._"


def table(columns: list[tuple[str, str]], rows: Iterable[Any], **context: Any) -> str:
    """A Markdown table: each column a header and a format string, filled from each row's
    figures and `context`'s (which the headers may use too)."""
    cells = [[header.format_map(context) for header, _ in columns]]
    cells += [[cell.format_map({**context, **row}) for _, cell in columns] for row in rows]
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join([lines[0], "|" + "---|" * len(columns), *lines[1:]])


def pairs(rows: list[tuple[str, str]], header: str = "") -> str:
    return table([(header, "{k}"), ("", "{v}")], [{"k": k, "v": v} for k, v in rows])


def fmt_load(load: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


TARGETS_COLUMNS = [("target", "{name}"), ("threshold", "{threshold}"), ("measured", "{measured}")]
TARGETS_COLUMNS += [("÷ threshold", "{ratio}"), ("status", "{status}"), ("from", "{source}")]


def targets_table(results: Results) -> str:
    return table(TARGETS_COLUMNS, [t.row() for t in judged(results)])


MACHINE = [
    ("date (UTC)", "{date}"),
    ("CPU", "{cpu_model}, {family_model}, {vector}"),
    ("logical CPUs / available", "{logical_cpus} / {cpus_available}"),
    ("torch threads (training)", "{torch_threads}"),
    ("load average (1/5/15 min) at start; at end", "{start}; {end}"),
    ("Python / torch / onnxruntime / numpy", "{python} / {torch} / {onnxruntime} / {numpy}"),
    ("tritonserver (nvidia-pytriton wheel)", "{tritonserver}"),
]


def machine_table(results: Results) -> str:
    """Each machine the results were measured on: the run's, and training's when kept from
    an earlier run (`--only serving`)."""
    machines = {"this run": results["machine"]}
    if "training_machine" in results:
        machines = {"serving": results["machine"], "training, export": results["training_machine"]}
    filled = [
        {"family_model": "?", **m, "vector": " ".join(m.get("vector_extensions", [])) or "no AVX2"}
        | {"start": fmt_load(m["load_average_start"]), "end": fmt_load(m["load_average_end"])}
        for m in machines.values()
    ]
    rows = [
        {"field": f} | {f"m{i}": v.format_map(m) for i, m in enumerate(filled)} for f, v in MACHINE
    ]
    columns = [("", "{field}")] + [(name, f"{{m{i}}}") for i, name in enumerate(machines)]
    notes = "".join(f"\n\n- {note}" for note in results.get("notes", []))
    return table(columns, rows) + notes


SETTINGS = [
    ("suite wall time", "{suite_seconds:.0f} s ({mode} mode)"),
    ("rounds per figure (the median kept)", "{repeats}"),
    ("requests per round (the pipeline's client)", "{requests}"),
    ("training: test accuracy every", "{eval_images} images"),
    ("served: backend, instances × threads", "{backend}, {instances} × {intra_op_threads}"),
    ("in-process beside each served figure: batch 1, 16 on", "{p50_threads}, {b16_threads} thr."),
]


def run_table(results: Results) -> str:
    """How the run measured: rounds, requests, what it served, the threads it compared with."""
    serving, export = results["serving"], results["export"]
    on = serving["servers"]["batching_on"]
    context = {**results, **results["settings"], **serving, **on, **threads(results)}
    rows = [(label, cell.format_map(context)) for label, cell in SETTINGS]
    if export:
        rows.append(("export: onnxruntime threads", str(export["threads"])))
    if d := on.get("dashboard"):
        sweep = f"{d['seconds']:.0f} s, queried every {d['step_s']} s"
        rows.append(("dashboard: the sweep", f"{sweep} (`$__rate_interval` = {4 * d['step_s']} s)"))
    return pairs(rows, "run")


def load_table(results: Results) -> str:
    """The shared machine's load around each measurement."""
    rows = [(f"training: {r['name']}", r) for r in (results["training"] or {}).get("runs", [])]
    rows += [("export", results["export"])] if results["export"] else []
    rows += [("serving", results["serving"])]
    loads = []
    for what, x in rows:
        before, after = (fmt_load(x[f"load_average_{w}"]) for w in ("before", "after"))
        loads.append({"what": what, "before": before, "after": after})
    columns = [("measured", "{what}"), ("load average (1/5/15 min) before", "{before}")]
    return table([*columns, ("after", "{after}")], loads)


TRAINING = [
    ("run", "{name}"),
    ("recipe", "{recipe}"),
    ("images trained", "{train_images_seen}"),
    ("train s", "{train_seconds:.1f}"),
    ("× previous", "{previous:.2f}×"),
    ("images/s", "{images_per_s:.0f}"),
    ("CPU share (of threads)", "{cpu_share:.0%} of {threads}"),
    ("GFLOP/s (of matmul)", "{gflops:.0f} ({matmul_share:.0%})"),
    ("matmul-epochs", "{matmul_epochs:.2f}"),
    ("final test acc.", "{test_accuracy:.2%}"),
    ("first eval ≥ 99.0%", "{first[0.99]}"),
    ("first eval ≥ 99.5%", "{first[0.995]}"),
]


def training_table(results: Results) -> str:
    if not results["training"]:
        return NOT_MEASURED
    runs = results["training"]["runs"]
    previous = next(r for r in runs if r["name"] == "previous-default")["train_seconds"]

    def first(seconds: float | None) -> str:
        return "not reached" if seconds is None else f"{seconds:.0f} s"

    rows = [
        {**r, "previous": r["train_seconds"] / previous, "gflops": r["flops_per_s"] / 1e9}
        | {"recipe": plots.recipe(r["config"]) + (", plain convolutions" * r["plain_convolutions"])}
        | {"first": {k: first(s) for k, s in r["time_to_accuracy_s"].items()}}
        for r in runs
    ]
    return table(TRAINING, rows) + "\n\n" + plots.link("accuracy", "Test accuracy against time")


def training_figures_table(results: Results) -> str:
    """The record, if any, the architecture's FLOPs and the machine's matmul rate."""
    training = results["training"]
    if not training:
        return NOT_MEASURED
    seeds = [r for r in training["runs"] if r["name"].startswith("default-seed")]
    slowest = max(seeds, key=lambda r: r["train_seconds"])
    cpu = (results.get("training_machine") or results["machine"])["cpu_model"]
    finals = ", ".join(f"{r['test_accuracy']:.2%}" for r in seeds)
    record = "no record: not every seed reached 99.0%, or a subset was trained"
    if training["full_dataset"] and all(judge("accuracy", r["test_accuracy"]) for r in seeds):
        record = f"{slowest['train_seconds']:.0f} s on {slowest['threads']} cores of this {cpu}"
        record += f" (final accuracies {finals})"
    flops = training["flops_per_image"]
    rates = "; ".join(f"{r / 1e9:.0f} GFLOP/s" for r in training["matmul_flops_per_s"])
    rows = [
        (f"Time to 99.0%, the slowest of {len(seeds)} default seeds", record),
        ("FLOPs per training image (forward and backward)", f"{flops / 1e6:.1f} M"),
        ("FLOPs per epoch", f"{flops * EPOCH_IMAGES / 1e12:.1f} T"),
        ("fp32 matmul rate before; after training", rates),
        ("CPU share of the slowest default seed", f"{slowest['cpu_share']:.0%}"),
    ]
    return pairs(rows)


EXPORT = [
    ("ONNX model", "{label}"),
    ("nodes", "{nodes}"),
    ("file size", "{megabytes:.1f} MB"),
    ("batch-1 p50 ms", "{p50_ms:.2f}"),
    ("batch-1 p99 ms", "{p99_ms:.2f}"),
    ("batch-16 images/s", "{images_per_s:.0f}"),
]


def export_table(results: Results) -> str:
    if not results["export"]:
        return NOT_MEASURED
    return table(EXPORT, [{**r, "megabytes": r["bytes"] / 1e6} for r in results["export"]["rows"]])


PERF = [
    ("in flight", "{concurrency}"),
    ("images/s", "{images_per_s:.0f}"),
    ("in-process b16 beside, {b16_threads} thr. (served / that)", f"{{{B16}:.0f}} ({{share:.0%}})"),
    ("p50 ms", "{p50_ms:.2f}"),
    ("in-process p50 beside, {p50_threads} thr. (served − that)", f"{{{P50}:.2f}} ({{gap:+.2f}})"),
    ("p99 ms", "{p99_ms:.2f}"),
    ("client send + recv", "{send_recv:.2f}"),
    ("network + server send/recv", "{network_ms:.2f}"),
    ("server queue", "{server_queue_ms:.2f}"),
    ("compute input + output", "{compute_io:.2f}"),
    ("compute infer", "{server_compute_infer_ms:.2f}"),
    ("batch sizes executed", "{executed}"),
    ("CPUs used: server / client", "{cpus}"),
    ("server CPU ms per image (in-process b16's)", "{cpu_ms:.2f} ({b16_cpu_ms:.2f})"),
]


def threads(results: Results) -> dict[str, int]:
    """The in-process references' threads: one instance's (p50), the server's budget (b16)."""
    one, budget = references(results["serving"])
    return {"p50_threads": one["threads"], "b16_threads": budget["threads"]}


def perf_table(results: Results) -> str:
    """perf_analyzer's sweep: client-side latency and the server-side breakdown (ms)."""
    on, context = results["serving"]["servers"]["batching_on"], threads(results)
    rows = [served(p, context["b16_threads"]) for p in on["perf_analyzer"]]
    dashboard = plots.link("dashboard", "The dashboard over the sweep") if "dashboard" in on else ""
    return table(PERF, rows, **context) + "\n\n" + (dashboard or NOT_MEASURED)


def sequential_table(results: Results) -> str:
    serving = results["serving"]
    rows = [
        {"label": f"in-process onnxruntime, {r['threads']} thread(s)", **r, "beside": "—"}
        for r in serving["inprocess"]
    ]
    for name, server in serving["servers"].items():
        seq = served(server["sequential"])
        beside = f"{seq[P50]:.2f} ({seq['gap']:+.2f})"
        rows.append({"label": f"Triton gRPC, {name.replace('_', ' ')}", **seq, "beside": beside})
    columns = [("batch 1, one request at a time", "{label}")]
    columns += [(f"{q} ms", f"{{{q}_ms:.2f}}") for q in ("p50", "p90", "p99")]
    columns += [("in-process p50 beside it, {p50_threads} thr. (served p50 − that)", "{beside}")]
    link = plots.link("latency", "Latency distribution")
    return table(columns, rows, **threads(results)) + "\n\n" + link


def concurrency_table(results: Results) -> str:
    servers = results["serving"]["servers"]
    on, off = (servers[f"batching_{s}"]["concurrency"] for s in ("on", "off"))
    rows = [
        {"c": a["concurrency"], "on": served(a), "off": served(b)}
        for a, b in zip(on, off, strict=True)
    ]
    columns = [("in flight", "{c}")]
    for s in ("on", "off"):
        columns += [
            (f"batching {s}: images/s", f"{{{s}[images_per_s]:.0f}}"),
            ("/ in-process b16", f"{{{s}[share]:.0%}}"),
            ("p99 ms", f"{{{s}[p99_ms]:.1f}}"),
            ("batch sizes executed (size×count)", f"{{{s}[batches]}}"),
        ]
    link = plots.link("throughput", "Throughput against concurrency")
    return table(columns, rows) + "\n\n" + link


BREAKDOWN = [
    ("Triton", "{name}"),
    ("client p50 ms", "{client:.2f}"),
    ("server total", "{success_ms:.2f}"),
    ("queue", "{queue_ms:.2f}"),
    ("input", "{compute_input_ms:.2f}"),
    ("infer (stub round trip, model.py, onnxruntime)", "{compute_infer_ms:.2f}"),
    ("output", "{compute_output_ms:.2f}"),
    ("client p50 − server mean (gRPC, client)", "{rest:.2f}"),
]


def breakdown_table(results: Results) -> str:
    """Where a sequential request's time goes, from Triton's statistics at concurrency 1."""
    rows = []
    for name, server in results["serving"]["servers"].items():
        means = level(server["concurrency"], 1)["server_mean_per_request"]
        client = server["sequential"]["p50_ms"]
        rows.append({**means, "name": name.replace("_", " "), "client": client})
        rows[-1]["rest"] = client - means["success_ms"]
    return table(BREAKDOWN, rows)


MODELS = [
    ("model", "{name}"),
    ("test accuracy", "{accuracy:.2%}"),
    ("model.onnx", "{megabytes:.1f} MB"),
    ("c1 p50 ms (− in-process {p50_threads} thr. beside)", "{c1_p50_ms:.2f} ({c1_gap:+.2f})"),
    ("c1 p99 ms", "{c1_p99_ms:.2f}"),
    ("c8 images/s (/ b16 beside, {b16_threads} thr.)", "{c8_images_per_s:.0f} ({c8_share:.0%})"),
    ("c16 images/s (/ b16 beside)", "{c16_images_per_s:.0f} ({c16_share:.0%})"),
    ("baseline runs", "{runs}"),
    ("its sweep's best in-process: b1 p50 ms, b16 images/s", "{best_p50:.2f}, {best_b16:.0f}"),
]


def models_table(results: Results) -> str:
    """Each model the variants sweep served (fp32; int8 unless its export was refused)."""
    refused = results["serving"].get("int8_refused")
    why = f"\n\nThe int8 export of this model was refused: {refused}" if refused else ""
    return table(MODELS, baselines(results["serving"]), **threads(results)) + why


SWEPT = [("model", "{run[repository]}"), ("#", "{run[order]}"), ("variant", "{run[variant]}")]
VARIANTS = [
    *SWEPT,
    ("load (1 min)", "{load:.2f}"),
    ("c1 p50 ms (− in-process {p50_threads} thr. beside)", "{c1[p50_ms]:.2f} ({c1[gap]:+.2f})"),
    ("c1 p99 ms (× p50)", "{c1[p99_ms]:.2f} ({c1[p99_ratio]:.1f}×)"),
    ("c8 images/s (/ b16 beside, {b16_threads} thr.)", "{c8[images_per_s]:.0f} ({c8[share]:.0%})"),
    ("c16 images/s (/ b16 beside)", "{c16[images_per_s]:.0f} ({c16[share]:.0%})"),
    ("c1 p50 − the stricter in-process", "{c1_gap:+.2f} ms: {c1_met}"),
    ("c8 ÷ the stricter in-process b16", "{c8_share:.0%}: {c8_met}"),
]
VARIANTS_BREAKDOWN = [
    *SWEPT,
    ("client send + recv", "{c8[send_recv]:.2f}"),
    ("gRPC: network + server send/recv", "{c8[network_ms]:.2f}"),
    ("queue", "{c8[server_queue_ms]:.2f}"),
    ("compute input + output", "{c8[compute_io]:.2f}"),
    ("compute infer", "{c8[server_compute_infer_ms]:.2f}"),
    ("batch sizes executed (mean)", "{c8[batches]}"),
    ("instances busy", "{busy:.0%} of {instances}"),
    ("CPUs used: server / client", "{c8[cpus]}"),
    ("instance ms per image", "{c8[executing_ms]:.2f}"),
    ("in-process ms per image, same batches", "{same_batches}"),
    ("server CPU ms per image (in-process b16's)", "{c8[cpu_ms]:.2f} ({c8[b16_cpu_ms]:.2f})"),
]


def variants_table(results: Results) -> str:
    """Each run of the sweep, in the order run: the targets' figures, judged against the
    stricter of the in-process figures beside them and the sweep's best."""
    rows = sweep(results["serving"])
    for v in rows:
        v["c1_met"] = "**yes**" if judge("c1_p50", v["c1_gap"]) else "no"
        v["c8_met"] = "**yes**" if judge("c8", v["c8_share"]) else "no"
    return table(VARIANTS, rows, **threads(results))


def variants_breakdown_table(results: Results) -> str:
    """Where a request's time and the CPU go at concurrency 8, run by run."""
    return table(VARIANTS_BREAKDOWN, sweep(results["serving"]))


# The generated regions, named after the functions that render them.
REGIONS = {name: f for name, f in list(globals().items()) if name.endswith("_table")}


def render(document: str, results: Results) -> str:
    """`document` with each generated region rendered again from `results`."""
    names = [m[2] for m in REGION.finditer(document)]
    if sorted(names) != sorted(REGIONS):
        raise SystemExit(f"BENCHMARKS.md's regions {names} are not report.py's {list(REGIONS)}")
    return REGION.sub(lambda m: f"{m[1]}\n{REGIONS[m[2]](results)}\n\n{m[3]}", document)


def write(results: Results, out: Path) -> None:
    """out/benchmarks/results.json, the plots next to it, and out/BENCHMARKS.md's regions."""
    folder = out / "benchmarks"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / RESULTS, results)
    plots.draw(results, folder)
    publish(results, out / "BENCHMARKS.md")


def publish(results: Results, document: Path) -> None:
    text = render((document if document.is_file() else DOCUMENT).read_text(), results)
    tmp = document.with_name(".BENCHMARKS.md.tmp")
    tmp.write_text(text)
    tmp.replace(document)


def main(argv: list[str]) -> int:
    path = next((Path(a) for a in argv if not a.startswith("--")), Path("docs"))
    results_json = path if path.suffix == ".json" else path / "benchmarks" / RESULTS
    document = results_json.parent.parent / "BENCHMARKS.md"  # OUT/benchmarks/results.json's
    results = json.loads(results_json.read_text())
    if "--check" in argv:
        if not document.is_file() or document.read_text() != render(document.read_text(), results):
            print(f"{document} is stale: run python benchmarks/report.py {results_json}")
            return 1
        return 0
    if "--plots" in argv:
        plots.draw(results, results_json.parent)
    publish(results, document)
    print(f"wrote {document}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
