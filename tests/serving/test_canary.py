"""A canary release decided for real: two real tritonservers behind one name (each in its
own network namespace, a real dnsmasq answering one A record per replica, as a headless
Service), one serving the champion and one the challenger; a real Prometheus scraping both;
the project's client sending traffic through the name; `mnist-pipeline canary` deciding
from Prometheus and its own labelled probe. A challenger whose every request fails is
rolled back; a better one is promoted and served by default from then on.

Costs about 2 minutes on 2 cores: a tiny training, three exports, four server starts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import MODEL, PipelineRun, TrainedRun, cli, failing_onnx_model
from mnist_pipeline.serve import pinned
from mnist_pipeline.storage import ModelRepository
from mnist_pipeline.tritonconfig import TritonConfig
from support.ports import free_ports
from support.prometheus import LocalPrometheus
from support.replicas import METRICS, Replicas, require_tools

pytestmark = pytest.mark.slow

SUMMARIES = ["--metrics-config=summary_latencies=true"]  # as the chart's Deployment


@pytest.fixture(scope="module")
def release(
    tmp_path_factory: pytest.TempPathFactory,
    mnist_storage: Path,
    pipeline: PipelineRun,
    quantisable: TrainedRun,
) -> tuple[Path, str, str]:
    """A repository whose champion (version 1) is a tiny run; the session's two better
    models are the challengers to be: (storage, first challenger's run, second's)."""
    require_tools()
    storage = tmp_path_factory.mktemp("canary") / "storage"
    shutil.copytree(mnist_storage / "data", storage / "data")
    quick = "--limit-train 128 --limit-test 100 --checkpoint-every 0 --threads 1".split()
    cli("train", "--storage", storage, *quick, "--run-id", "weak", check=True)
    (first,) = [p for p in (pipeline.storage / "checkpoints").iterdir() if p.is_dir()]
    for run in (first, quantisable.storage / "checkpoints" / quantisable.run_id):
        shutil.copytree(run, storage / "checkpoints" / run.name, symlinks=True)
    cli("export", "--storage", storage, "--run-id", "weak", "--publish-min-accuracy", "0.05",
        check=True)  # fmt: skip
    return storage, first.name, quantisable.run_id


@contextmanager
def serving(
    storage: Path, workdir: Path, champion: int, challenger: int, broken: bool = False
) -> Iterator[tuple[Replicas, LocalPrometheus]]:
    """Replica 0 serves the champion, replica 1 the challenger (with a model whose every
    request fails, if `broken`); Prometheus scrapes both every second."""
    models = ModelRepository(folder=storage / "models")
    stable = pinned(models, workdir / "stable", TritonConfig(), str(champion))
    canary = pinned(models, workdir / "canary", TritonConfig(), str(challenger))
    if broken:
        model = canary / MODEL / str(challenger) / "model.onnx"
        model.unlink()  # a link to the repository's file: leave that one alone
        model.write_bytes(failing_onnx_model((1, 28, 28)))
    with Replicas(stable, extra_args=SUMMARIES, prefix="cn", cpus=["0", "1"]) as replicas:
        replicas.add()
        replicas.add(repository=canary)
        targets = [f"{replicas.address(i)}:{METRICS}" for i in (0, 1)]
        scrape = {"job_name": "triton", "scrape_interval": "1s",
                  "static_configs": [{"targets": targets}]}  # fmt: skip
        (port,) = free_ports(1)
        with LocalPrometheus(workdir / "prometheus", port, [scrape]) as prometheus:
            yield replicas, prometheus


def traffic_and_canary(storage: Path, run_id: str, replicas: Replicas, prometheus_url: str,
                       *limits: str) -> str:  # fmt: skip
    """The analysis while clients send requests through the name, as in production (each
    replica answers with its own version): what it printed."""
    clients = subprocess.Popen(
        [sys.executable, "-m", "mnist_pipeline", "infer", "--storage", storage, "--url",
         replicas.target, "--requests", "1000000", "--warmup", "0", "--concurrency", "2",
         "--output", storage.parent / "clients"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        result = cli(
            "canary", "--storage", storage, "--run-id", run_id, "--url", replicas.target,
            "--prometheus-url", prometheus_url, "--canary-requests", "50",
            "--probe-requests", "60", *limits,
        )  # fmt: skip
    finally:  # a broken challenger's first failure has already stopped them
        clients.terminate()
        clients.wait(timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def ledger(storage: Path, version: int) -> dict[str, object]:
    path = storage / "models" / MODEL / ".export" / "versions" / f"{version}.json"
    return dict(json.loads(path.read_text()))


def canary_record(storage: Path, run_id: str) -> dict[str, object]:
    path = storage / "models" / MODEL / ".export" / "runs" / f"{run_id}.json"
    return dict(json.loads(path.read_text())["canary"])


def test_a_failing_challenger_is_rolled_back_and_a_better_one_promoted(
    release: tuple[Path, str, str], tmp_path: Path
) -> None:
    storage, first, second = release
    exported = cli("export", "--storage", storage, "--run-id", first, "--canary", check=True)
    assert "version 2 is the challenger: the champion stays served by default" in (exported.stderr)
    status = cli("status", "--storage", storage, check=True).stdout
    assert "champion: 1; challenger: 2;" in status

    with serving(storage, tmp_path / "a", champion=1, challenger=2, broken=True) as (r, prom):
        # Its first failure stops the clients: the window ends the watch (a few scrapes).
        said = traffic_and_canary(storage, first, r, prom.url, "--canary-window", "6")
    assert f"rolled back: run {first}'s version: error rate 100.00% > 1.00%" in said
    assert "the probe failed" in said
    assert ledger(storage, 2)["release"] == "rolled back"
    record = canary_record(storage, first)
    assert record["decision"] == "rolled back"
    assert record["challenger"]["failures"] == record["challenger"]["requests"] > 0  # type: ignore[index]
    assert "champion: 1; servable: 1, 2;" in cli("status", "--storage", storage).stdout

    # The rolled-back version is no baseline: the next run need only beat the champion.
    cli("export", "--storage", storage, "--run-id", second, "--canary", check=True)
    with serving(storage, tmp_path / "b", champion=1, challenger=3) as (r, prom):
        # Latency is the decision table's to test (test_canary_decision.py): two replicas
        # sharing 2 loaded cores are compared here for accuracy and errors.
        said = traffic_and_canary(storage, second, r, prom.url, "--max-p99-ratio", "10",
                                  "--canary-window", "60")  # fmt: skip
    assert f"promoted: run {second}'s version is the champion of {MODEL}" in said
    assert ledger(storage, 3)["release"] == "promoted"
    record = canary_record(storage, second)
    challenger, champion = record["challenger"], record["champion"]
    assert challenger["accuracy"] > champion["accuracy"]  # type: ignore[index,operator]
    assert challenger["images"] > 0 and challenger["failures"] == 0  # type: ignore[index]
    assert "champion: 3; servable: 1, 2, 3;" in cli("status", "--storage", storage).stdout
    served = pinned(ModelRepository(folder=storage / "models"), tmp_path / "c", TritonConfig())
    assert (served / MODEL / "3").is_dir()  # served by default now
