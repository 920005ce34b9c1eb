"""The benchmark suite: training, export and serving measured in one run on one machine.

    PYTHONPATH=src:tests python benchmarks/run.py                # full: writes docs/
    PYTHONPATH=src:tests python benchmarks/run.py --quick --out /tmp/bench   # smoke test

Writes OUT/benchmarks/results.json, the plots OUT/benchmarks/*.png and the tables of
OUT/BENCHMARKS.md (docs/BENCHMARKS.md's hand-written text where OUT has none), rendered from
the JSON by benchmarks/report.py (`python benchmarks/report.py docs` renders them again
without measuring); the targets are judged by benchmarks/targets.py. Every timing is the
median of --repeats rounds; ratios compare figures of the same run.

  training  images/s and test accuracy against training time, default recipe and the
            original one (Adam 1e-3, batch 64); --stretch adds the default over 3 epochs
  export    the ONNX graph before and after optimisation: nodes, size, onnxruntime
            batch-1 latency and batch-16 throughput
  serving   in-process onnxruntime against the local Triton over gRPC: the wheel's
            tritonserver serving what `pin --triton-backend python` writes (its python
            backend running the project's model.py on the same onnxruntime): NVIDIA's
            perf_analyzer at concurrency 1-16, and the pipeline's own client with the
            repository's dynamic batching and without it: sequential latency, throughput
            and p99 at each concurrency, the batch sizes Triton executed; meanwhile a
            local Prometheus scrapes Triton, and the chart's Grafana dashboard is drawn
            from it over perf_analyzer's sweep. Then the serving variants: the model
            pinned with other instance counts and server CPUs, or its pinned config.pbtxt
            edited (the dynamic batcher: bench_serving.VARIANTS), the baseline repeated
            between them, through perf_analyzer at concurrency 1, 8 and 16, with where the
            time and the CPU go (Triton's statistics, both processes' CPU time)

--only serving re-measures the serving section alone and keeps the training and export
sections of OUT/benchmarks/results.json, noting when and where each was measured. The
model it serves is the default recipe's on seed 0, as a full run serves (quick mode: a
small one): serving speed does not depend on the weights, but the int8 export served
beside it is refused when quantisation loses more than 0.1 pp, as a barely trained
model's does.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

import bench_export
import bench_serving
import bench_training
import report
import targets
from common import EPOCH_IMAGES, load_average, machine, median_of, percentiles
from harness import prometheus as monitoring
from harness.ports import free_ports
from harness.serving import local_triton
from mnist_pipeline import client, data, tritonconfig
from mnist_pipeline.errors import PipelineFailure
from mnist_pipeline.export import PublishConfig, export
from mnist_pipeline.serve import LocalTriton, pinned
from mnist_pipeline.storage import (
    CONFIG_FILE,
    DEFAULT_MODEL_NAME,
    METADATA_FILE,
    MODEL_FILE,
    ModelRepository,
    read_json,
)
from mnist_pipeline.train import TrainConfig, train

MODEL = DEFAULT_MODEL_NAME
CONCURRENCIES = (1, 2, 4, 8, 16)
SEEDS = (0, 1, 2)
# The schedule that would meet 0.6× the previous default's seconds, measured beside the
# default to show what it costs in accuracy.
SHORT_EPOCHS = 0.8
# Export's publishing floor for the served models: none. Serving speed does not depend on
# the weights, and quick mode's model (1000 training images) learns little.
PUBLISH_ANY = 0.0
# The serving targets' concurrency 1 and 8, and 16 to see whether more in flight helps.
VARIANT_CONCURRENCIES = (1, 8, 16)


@dataclasses.dataclass(frozen=True)
class Settings:
    quick: bool
    limit_train: int
    limit_test: int
    eval_images: int
    stretch: bool
    requests: int
    repeats: int


def settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        return Settings(
            True,
            args.limit_train or 1000,
            args.limit_test or 1000,
            256,
            False,
            args.requests or 40,
            args.repeats or 1,
        )
    return Settings(
        False,
        args.limit_train,
        args.limit_test,
        6400,
        args.stretch,
        args.requests or 1000,
        args.repeats or 3,
    )


def bench_training_section(storage: Path, s: Settings) -> dict[str, Any]:
    """The default recipe on each seed against the 0.1.0 recipe, between two
    readings of the machine's matrix-product rate."""
    limits = {"limit_train": s.limit_train, "limit_test": s.limit_test}
    recipes = [(f"default-seed{seed}", TrainConfig(seed=seed, **limits), False) for seed in SEEDS]
    recipes += [
        (f"short-seed{seed}", TrainConfig(epochs=SHORT_EPOCHS, seed=seed, **limits), False)
        for seed in SEEDS
    ]
    recipes.append(
        ("previous-default", dataclasses.replace(bench_training.PREVIOUS_DEFAULT, **limits), True)
    )
    if s.stretch:
        recipes.append(("default-3-epochs", TrainConfig(epochs=3, **limits), False))
        recipes.append(("original", dataclasses.replace(bench_training.ORIGINAL, **limits), False))
    matmul_before = bench_training.matmul_flops_per_s()
    runs = []
    for name, cfg, plain in recipes:
        print(f"training: {name} recipe …", file=sys.stderr, flush=True)
        runs.append(bench_training.run_recipe(storage, name, cfg, s.eval_images, plain))
    section = {
        "runs": runs,
        "full_dataset": not s.limit_train and not s.limit_test,
        "flops_per_image": bench_training.flops_per_image(),
        "matmul_flops_per_s": [matmul_before, bench_training.matmul_flops_per_s()],
    }
    for run in runs:
        add_flop_figures(section, run)
    return section


def add_flop_figures(training: dict[str, Any], run: dict[str, Any]) -> None:
    """The run's FLOP/s as the architecture counts them (plain convolutions, padding taps
    included), as a share of the machine's matmul rate, and its training time in
    matmul-epochs: what one full epoch's FLOPs take at that rate. Comparable across
    machines where seconds are not."""
    rate = statistics.mean(training["matmul_flops_per_s"])
    flops = training["flops_per_image"]
    run["flops_per_s"] = run["train_images_seen"] * flops / run["train_seconds"]
    run["matmul_share"] = run["flops_per_s"] / rate
    run["matmul_epochs"] = run["train_seconds"] * rate / (flops * EPOCH_IMAGES)


def measure_server(
    url: str, x: np.ndarray, labels: np.ndarray, s: Settings, yardstick: bench_serving.Yardstick
) -> dict[str, Any]:
    """Sequential latencies, then each concurrency's throughput, p99 and executed batches;
    each round with the in-process figures measured beside it."""
    latencies, _ = bench_serving.served_latencies(url, MODEL, x, labels, s.requests, 1)

    def beside(concurrency: int) -> dict[str, float]:
        served = partial(bench_serving.served, url, MODEL, x, labels, s.requests, concurrency)
        return median_of(s.repeats, partial(yardstick.around, served))

    sequential = beside(1)
    levels = []
    for concurrency in CONCURRENCIES:
        before = bench_serving.inference_statistics(url, MODEL)
        figures = beside(concurrency)
        # Triton may count a request just after its response has left.
        time.sleep(0.2)
        after = bench_serving.inference_statistics(url, MODEL)
        levels.append(
            {
                "concurrency": concurrency,
                **figures,
                **bench_serving.statistics_delta(before, after),
            }
        )
    return {"sequential": sequential, "latencies_ms": latencies, "concurrency": levels}


def watched_perf_sweep(
    server: LocalTriton, s: Settings, yardstick: bench_serving.Yardstick
) -> tuple[list[dict[str, Any]], Any]:
    """perf_analyzer at each concurrency while a local Prometheus scrapes Triton each
    second: the sweep's figures, and the dashboard's panels over the sweep."""
    (port,) = free_ports(1)
    config = bench_serving.scrape_config(server.metrics_port, 1)
    with monitoring.LocalPrometheus(None, port, [config]) as prometheus:
        while not monitoring.values(prometheus.query("count_over_time(up[10s]) >= 2")):
            time.sleep(0.5)
        start = time.time()
        window_ms = 500 if s.quick else 3000
        levels = []
        for concurrency in CONCURRENCIES:
            print(
                f"serving: perf_analyzer, concurrency {concurrency} …", file=sys.stderr, flush=True
            )
            levels.append(perf_level(server, concurrency, window_ms, yardstick))
        time.sleep(3)  # the last scrapes of the sweep
        dashboard = bench_serving.dashboard_over(prometheus, start, time.time(), 2)
    return levels, dashboard


def perf_level(
    server: LocalTriton, concurrency: int, window_ms: int, yardstick: bench_serving.Yardstick
) -> dict[str, Any]:
    """perf_analyzer at `concurrency`, with what Triton's statistics and the server's
    CPU time say about the same requests, and the in-process figures beside it."""
    assert server.process is not None
    pid = server.process.pid

    def measure() -> dict[str, Any]:
        before = bench_serving.inference_statistics(server.grpc_url, MODEL)
        cpu_before = bench_serving.server_cpu_seconds(pid)
        figures = bench_serving.perf_analyzer(server.grpc_url, MODEL, concurrency, window_ms)
        # Triton may count a request just after its response has left.
        time.sleep(0.2)
        server_cpu_s = bench_serving.server_cpu_seconds(pid) - cpu_before
        after = bench_serving.inference_statistics(server.grpc_url, MODEL)
        return {
            **figures,
            "server_cpu_s": server_cpu_s,
            **bench_serving.statistics_delta(before, after),
        }

    return yardstick.around(measure)


def batch_costs(sess: Any, x: np.ndarray, s: Settings) -> dict[str, float]:
    """Milliseconds per in-process batch of each size: what the batches Triton executes
    would cost here (figures.inprocess_ms)."""
    costs = {}
    for b in (1, 2, 4, 8, 16):
        measure = partial(bench_serving.inprocess_throughput, sess, x, max(1, s.requests // b), b)
        costs[str(b)] = 1000 * b / median_of(s.repeats, measure)["images_per_s"]
    return costs


def bench_serving_section(
    storage: Path,
    onnx_path: Path,
    x: np.ndarray,
    labels: np.ndarray,
    s: Settings,
    swept: dict[str, Path],
) -> dict[str, Any]:
    load_before = load_average()
    # What the chart's Triton serves with the wheel's tritonserver: pin's defaults.
    served = pinned(local_models(storage), storage / "served", tritonconfig.TritonConfig())
    config = tritonconfig.parse_config((served / MODEL / CONFIG_FILE).read_text())
    instances = sum(max(1, g.count) for g in config.instance_group)
    instance_threads = int(config.parameters["intra_op_thread_count"].string_value)
    inprocess = []
    sessions = {}
    # One instance's threads (what a lone request gets) and the server's whole budget.
    for threads in sorted({instances * instance_threads, instance_threads}, reverse=True):
        sess = sessions[threads] = bench_serving.session(onnx_path, threads)
        raw = bench_serving.inprocess_latencies(sess, x, s.requests)
        inprocess.append(
            {
                "threads": threads,
                "latencies_ms": raw,
                **median_of(
                    s.repeats, partial(bench_serving.inprocess_latency, sess, x, s.requests)
                ),
                "batch1_images_per_s": 1000.0 / percentiles(raw)["p50_ms"],
                "batch16_images_per_s": median_of(
                    s.repeats,
                    partial(bench_serving.inprocess_throughput, sess, x, s.requests // 16 or 1),
                )["images_per_s"],
                "batch_ms": batch_costs(sess, x, s),
            }
        )
    # Beside each served figure: half the requests for the p50, as many images at batch 16.
    yardstick = bench_serving.Yardstick(
        sessions[instance_threads], sessions[instances * instance_threads], x, s.requests // 2
    )
    repositories = {
        "batching_on": served,
        "batching_off": bench_serving.config_variant(
            served,
            storage / "served-no-batching",
            bench_serving.clearing("dynamic_batching"),
        ),
    }
    servers: dict[str, Any] = {}
    triton_version = None
    for name, repo in repositories.items():
        print(f"serving: Triton, {name.replace('_', ' ')} …", file=sys.stderr, flush=True)
        with local_triton(repo, extra_args=bench_serving.METRICS_ARGS) as server:
            grpc_client = client.grpc_module().InferenceServerClient(server.grpc_url)
            try:
                triton_version = grpc_client.get_server_metadata(as_json=True)["version"]
                config = grpc_client.get_model_config(MODEL, as_json=True)["config"]
            finally:
                grpc_client.close()
            servers[name] = {
                "dynamic_batching": config.get("dynamic_batching"),
                "backend": config["backend"],
                "instances": instances,
                "intra_op_threads": instance_threads,
                **measure_server(server.grpc_url, x, labels, s, yardstick),
            }
            if name == "batching_on":
                perf, servers[name]["dashboard"] = watched_perf_sweep(server, s, yardstick)
                servers[name]["perf_analyzer"] = perf
    return {
        "inprocess": inprocess,
        "servers": servers,
        "variants": serving_variants(swept, s, yardstick),
        "models": served_models(swept),
        "triton_version": triton_version,
        "requests": s.requests,
        "repeats": s.repeats,
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def variant_schedule(
    variants: tuple[bench_serving.Variant, ...], every: int
) -> list[bench_serving.Variant]:
    """The baseline first, again after every `every` other variants, and last: its
    spread shows how far the machine's load moved the figures meanwhile."""
    others = [v for v in variants if v is not bench_serving.BASELINE]
    order: list[bench_serving.Variant] = []
    for i in range(0, len(others), every):
        order += [bench_serving.BASELINE, *others[i : i + every]]
    return [*order, bench_serving.BASELINE]


def serving_variants(
    storages: dict[str, Path], s: Settings, yardstick: bench_serving.Yardstick
) -> list[dict[str, Any]]:
    """Each storage's model served with each variant, back to back with the baseline
    repeated: perf_analyzer at concurrency 1 (latency), 8 and 16 (throughput). The first
    gets the whole sweep, the others (another precision) the baseline and the queue
    delay (quick mode: the baseline alone): the comparison between models, not the search
    again."""
    window_ms = 300 if s.quick else 1000
    rows = []
    for index, (name, storage) in enumerate(storages.items()):
        variants: tuple[bench_serving.Variant, ...] = (
            bench_serving.QUICK_VARIANTS if s.quick else bench_serving.VARIANTS
        )
        if index:
            variants = (bench_serving.BASELINE,)
            if not s.quick:
                variants += (bench_serving.DELAY_500,)
        schedule = variant_schedule(variants, len(variants) if s.quick else 3)
        served = {
            v.name: variant_repository(storage, storage / f"served-{name}-variant-{i}", v)
            for i, v in enumerate(variants)
        }
        for order, variant in enumerate(schedule, 1):
            print(f"serving: {name}, {variant.name} …", file=sys.stderr, flush=True)
            run = variant_run(served[variant.name], variant, window_ms, yardstick)
            rows.append({"repository": name, "order": order, **run})
    return rows


def local_models(storage: Path) -> ModelRepository:
    return ModelRepository(folder=storage / "models")


def variant_repository(storage: Path, dest: Path, variant: bench_serving.Variant) -> Path:
    """The repository `variant` is served from: `storage`'s model pinned with the
    variant's pin settings (pin's defaults else), then its config edited in a copy."""
    served = pinned(
        local_models(storage), dest / "pinned", tritonconfig.TritonConfig(**variant.pin)
    )
    if variant.edit is None:
        return served
    return bench_serving.config_variant(served, dest / "edited", variant.edit)


def int8_storage(storage: Path, checkpoint: Path) -> Path | str:
    """`export --precision int8` of the served checkpoint into a storage of its own (the
    same data and checkpoints, linked): that storage, whose model is served beside the
    fp32 one; or why export refused it (more than 0.1 pp lost: quick mode's barely
    trained model)."""
    folder = storage / "int8-storage"
    folder.mkdir(exist_ok=True)
    for shared in ("data", "checkpoints"):
        link = folder / shared
        if not link.exists():
            link.symlink_to(storage / shared)
    print("export: int8 …", file=sys.stderr, flush=True)
    try:
        export(
            folder,
            tritonconfig.TritonConfig(),
            checkpoint=checkpoint,
            publish=PublishConfig(min_accuracy=PUBLISH_ANY, precision="int8"),
        )
    except PipelineFailure as e:
        print(f"export: int8 refused: {e}", file=sys.stderr, flush=True)
        return str(e)
    return folder


def served_models(storages: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """What each swept storage serves: precision and accuracy from its metadata.json."""
    models = {}
    for name, storage in storages.items():
        models_dir = storage / "models"
        meta = read_json(models_dir / MODEL / "1" / METADATA_FILE)
        models[name] = {
            "precision": meta.get("precision", "fp32"),
            "accuracy": meta["accuracy"],
            "fp32_accuracy": meta.get("fp32_accuracy", meta["accuracy"]),
            "bytes": (models_dir / MODEL / "1" / MODEL_FILE).stat().st_size,
        }
    return models


def variant_run(
    served: Path, variant: bench_serving.Variant, window_ms: int, yardstick: bench_serving.Yardstick
) -> dict[str, Any]:
    with local_triton(served) as server:
        return {
            "variant": variant.name,
            "pin": pin_settings(variant),
            "config": served_config(server.grpc_url),
            "load_average": load_average(),
            "levels": [perf_level(server, c, window_ms, yardstick) for c in VARIANT_CONCURRENCIES],
        }


def pin_settings(variant: bench_serving.Variant) -> dict[str, int]:
    """What the variant's repository was pinned with: pin's defaults but for its own."""
    cfg = tritonconfig.TritonConfig(**variant.pin)
    return {
        "instance_count": cfg.instance_count,
        "server_cpus": cfg.server_cpus,
        "intra_op_threads": cfg.intra_op_threads,
    }


def served_config(url: str) -> dict[str, Any]:
    """What Triton says it serves: the fields the variants change."""
    grpc_client = client.grpc_module().InferenceServerClient(url)
    try:
        config = grpc_client.get_model_config(MODEL, as_json=True)["config"]
    finally:
        grpc_client.close()
    fields = ("backend", "instance_group", "dynamic_batching", "parameters", "max_batch_size")
    return {key: config.get(key) for key in fields}


def keep_earlier_sections(results: dict[str, Any], out: Path) -> None:
    """Training and export from the last full run in `out`, saying when and where."""
    results["training"] = results["export"] = None
    earlier = out / "benchmarks" / report.RESULTS
    if not earlier.is_file():
        return
    previous = read_json(earlier)
    results["training"], results["export"] = previous.get("training"), previous.get("export")
    m = results["training_machine"] = previous.get("training_machine", previous["machine"])
    results["notes"] = [
        f"Training and export were measured on {m['date']} on {m['cpu_model']} "
        f"({m['cpus_available']} CPUs, load {report.fmt_load(m['load_average_start'])} at "
        f"start); serving was re-measured alone (`--only serving`) at the date above."
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: tiny subsets, few requests"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where BENCHMARKS.md and benchmarks/ go (default: docs; with --quick, a temp folder)",
    )
    parser.add_argument(
        "--limit-train", type=int, default=0, help="train on the first N images (0: all)"
    )
    parser.add_argument(
        "--limit-test", type=int, default=0, help="evaluate on the first N images (0: all)"
    )
    parser.add_argument(
        "--stretch", action="store_true", help="also train the default recipe for 3 epochs"
    )
    parser.add_argument("--requests", type=int, default=0, help="requests per measurement")
    parser.add_argument(
        "--repeats", type=int, default=0, help="rounds per figure (the median is kept)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="storage for the runs (default: temporary)"
    )
    parser.add_argument(
        "--only",
        choices=["serving"],
        default=None,
        help="measure one section; keep the others from OUT/benchmarks/results.json",
    )
    args = parser.parse_args(argv)
    s = settings(args)
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench-quick-")) if s.quick else Path("docs"))
    started = time.monotonic()

    own_workdir = args.workdir is None
    storage = args.workdir or Path(tempfile.mkdtemp(prefix="bench-storage-"))
    try:
        results: dict[str, Any] = {
            "mode": "quick" if s.quick else "full",
            "settings": dataclasses.asdict(s),
            "machine": machine(),
        }
        data.place(storage)
        if args.only == "serving":
            keep_earlier_sections(results, out)
            print("training the model to serve …", file=sys.stderr, flush=True)
            limits = (2000, 1000) if s.quick else (s.limit_train, s.limit_test)
            train(
                storage,
                TrainConfig(limit_train=limits[0], limit_test=limits[1], seed=0),
                run_id="default-seed0",
            )
        else:
            results["training"] = bench_training_section(storage, s)

        print("export …", file=sys.stderr, flush=True)
        checkpoint = storage / "checkpoints" / "default-seed0" / "model.pth"
        export(
            storage,
            tritonconfig.TritonConfig(),
            checkpoint=checkpoint,
            publish=PublishConfig(min_accuracy=PUBLISH_ANY),
        )
        onnx_path = storage / "models" / MODEL / "1" / MODEL_FILE
        images, labels = data.load(storage, "test")
        x = data.normalize(images)
        if args.only is None:
            results["export"] = bench_export.compare(
                checkpoint, onnx_path, storage / "export", x, s.requests, s.repeats
            )
        # The storages whose models the serving variants are swept over, by name: fp32
        # and the int8 export of the same checkpoint, each with its accuracy on all test
        # images.
        int8 = int8_storage(storage, checkpoint)
        swept = {"fp32": storage}
        if isinstance(int8, Path):
            swept["int8"] = int8
        results["serving"] = bench_serving_section(storage, onnx_path, x, labels, s, swept)
        if isinstance(int8, str):
            results["serving"]["int8_refused"] = int8
        results["machine"]["tritonserver"] = results["serving"]["triton_version"]
        results["machine"]["load_average_end"] = load_average()
        results["targets"] = targets.records(results)
        results["suite_seconds"] = round(time.monotonic() - started, 1)
    finally:
        if own_workdir:
            shutil.rmtree(storage, ignore_errors=True)

    report.write(results, out)
    print(targets.summary(results))
    print(f"wrote {out / 'BENCHMARKS.md'} and {out / 'benchmarks'}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
