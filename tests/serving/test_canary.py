"""A canary release decided for real, from the chart's rendered command lines: two real
tritonservers behind one name (each in its own network namespace, a real dnsmasq answering
one A record per replica, as the headless Service), one pinned as the stable Deployment's
pods pin (the champion), one as the canary's (the challenger); a real Prometheus scraping
both; clients sending traffic through the name while the analysis Job's command decides
from Prometheus and its own labelled probe. A first release has nothing to decide; a
challenger whose every request fails is rolled back; a better one is promoted, and the
pins of both Deployments then serve it (what the analysis's restarts give them; no API
server runs here: restart_replicas is tested against a stand-in in test_canary_decision).

In CI on an idle 2-core AMD EPYC Zen 4: 19 s of setup and 58 s for the test (a tiny
training, three exports, four server starts)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from harness.chart import PROJECT_TRITON, containers, pod_spec, render
from harness.pipeline import MODEL, PipelineRun, TrainedRun, cli, failing_onnx_model
from harness.ports import free_ports
from harness.prometheus import LocalPrometheus
from harness.replicas import METRICS, Replicas, require_tools

pytestmark = pytest.mark.slow

DEPLOYMENTS = ("demo-mnist-pipeline-triton", "demo-mnist-pipeline-triton-canary")


def chart(**canary: Any) -> dict[str, dict[str, Any]]:
    """The rendered containers that make a canary release, by name: the two Deployments'
    pin-version and tritonserver, and the analysis Job's."""
    values = {
        "images": {"triton": PROJECT_TRITON},
        "canary": {"enabled": True, "prometheusUrl": "http://prometheus.monitoring:9090",
                   "requests": 50, "probeRequests": 60, **canary},
    }  # fmt: skip
    objects, _ = render(values)
    found = {}
    for obj in objects:
        name = obj["metadata"]["name"]
        if obj["kind"] == "Deployment" and name in DEPLOYMENTS:
            track = "canary" if name.endswith("-canary") else "stable"
            for c in containers(pod_spec(obj)):
                found[f"{track} {c['name']}"] = c
        elif (
            obj["kind"] == "Job"
            and obj["metadata"]["labels"]["app.kubernetes.io/component"] == "canary"
        ):
            found["analysis"] = next(c for c in containers(pod_spec(obj)) if c["name"] == "canary")
    return found


def here(container: dict[str, Any], **flags: str | Path | None) -> list[str]:
    """A rendered `mnist-pipeline` container's args, its flags in `flags` (--run-id as
    run_id) given this machine's values; a flag given None is dropped."""
    args = []
    for a in container["args"]:
        flag = a.split("=", 1)[0].removeprefix("--").replace("-", "_")
        if a.startswith("--") and flag in flags:
            if flags[flag] is not None:
                args.append(f"{a.split('=', 1)[0]}={flags[flag]}")
        else:
            args.append(a)
    return args


@pytest.fixture(scope="module")
def release(
    tmp_path_factory: pytest.TempPathFactory,
    mnist_storage: Path,
    pipeline: PipelineRun,
    quantisable: TrainedRun,
) -> tuple[Path, str, str]:
    """A repository whose champion (version 1) is a tiny run, released as the chart's
    export Job does (--canary: a first release is the champion at once); the session's two
    better models are the challengers to be: (storage, first challenger's run, second's)."""
    require_tools()
    storage = tmp_path_factory.mktemp("canary") / "storage"
    shutil.copytree(mnist_storage / "data", storage / "data")
    quick = "--limit-train 128 --limit-test 100 --checkpoint-every 0 --threads 1".split()
    cli("train", "--storage", storage, *quick, "--run-id", "weak", check=True)
    (first,) = [p for p in (pipeline.storage / "checkpoints").iterdir() if p.is_dir()]
    for run in (first, quantisable.storage / "checkpoints" / quantisable.run_id):
        shutil.copytree(run, storage / "checkpoints" / run.name, symlinks=True)
    cli("export", "--storage", storage, "--run-id", "weak", "--publish-min-accuracy", "0.05",
        "--canary", check=True)  # fmt: skip
    return storage, first.name, quantisable.run_id


@contextmanager
def serving(
    storage: Path, workdir: Path, run_id: str, broken: bool = False
) -> Iterator[tuple[Replicas, LocalPrometheus]]:
    """Replica 0 pinned as the stable Deployment's pods pin, replica 1 as the canary's
    (with a model whose every request fails, if `broken`), both with the rendered
    tritonserver's metrics flags; Prometheus scrapes both every second."""
    rendered = chart()
    pins = {}
    for track in ("stable", "canary"):
        pins[track] = workdir / track
        pin = here(rendered[f"{track} pin-version"], storage=storage, served_repository=pins[track],
                   run_id=run_id)  # fmt: skip
        cli(*pin, check=True)
    if broken:
        (version,) = [p for p in (pins["canary"] / MODEL).iterdir() if p.is_dir()]
        model = version / "model.onnx"
        model.unlink()  # a link to the repository's file: leave that one alone
        model.write_bytes(failing_onnx_model((1, 28, 28)))
    metrics = [
        a for a in rendered["stable tritonserver"]["args"] if a.startswith("--metrics-config")
    ]
    with Replicas(pins["stable"], extra_args=metrics, prefix="cn", cpus=["0", "1"]) as replicas:
        replicas.add()
        replicas.add(repository=pins["canary"])
        targets = [f"{replicas.address(i)}:{METRICS}" for i in (0, 1)]
        scrape = {"job_name": "triton", "scrape_interval": "1s",
                  "static_configs": [{"targets": targets}]}  # fmt: skip
        (port,) = free_ports(1)
        with LocalPrometheus(workdir / "prometheus", port, [scrape]) as prometheus:
            yield replicas, prometheus


def analysis(storage: Path, run_id: str, replicas: Replicas | None, prometheus_url: str,
             **canary: Any) -> str:  # fmt: skip
    """The analysis Job's command while clients send requests through the name, as in
    production (each replica answers with its own version): what it printed. Its restarts
    need the API server: dropped here."""
    here_flags: dict[str, str | Path | None] = {
        "storage": storage, "run_id": run_id, "prometheus_url": prometheus_url,
        "stable_deployment": None, "canary_deployment": None, "namespace": None,
    }  # fmt: skip
    if replicas is not None:
        here_flags["url"] = replicas.target
    command = here(chart(**canary)["analysis"], **here_flags)  # fmt: skip
    clients = None if replicas is None else subprocess.Popen(
        [sys.executable, "-m", "mnist_pipeline", "infer", "--storage", storage, "--url",
         replicas.target, "--requests", "1000000", "--warmup", "0", "--concurrency", "2",
         "--output", storage.parent / "clients"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        result = cli(*command)
    finally:  # a broken challenger's first failure has already stopped them
        if clients is not None:
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
    # The first release had no champion to compare with: it is the champion, nothing to decide.
    assert "champion: 1;" in cli("status", "--storage", storage, check=True).stdout
    said = analysis(storage, "weak", None, "http://127.0.0.1:9")  # nothing to reach
    assert f"nothing to decide: run weak's version is the champion of {MODEL}" in said

    exported = cli("export", "--storage", storage, "--run-id", first, "--canary", check=True)
    assert "version 2 is the challenger: the champion stays served by default" in exported.stderr
    assert "champion: 1; challenger: 2;" in cli("status", "--storage", storage, check=True).stdout
    with serving(storage, tmp_path / "a", first, broken=True) as (r, prom):
        # Its first failure stops the clients: the window ends the watch (a few scrapes).
        said = analysis(storage, first, r, prom.url, windowSeconds=6)
    assert f"rolled back: run {first}'s version: error rate 100.00% > 1.00%" in said
    assert "the probe failed" in said
    assert ledger(storage, 2)["release"] == "rolled back"
    record = canary_record(storage, first)
    assert record["decision"] == "rolled back"
    assert record["challenger"]["failures"] == record["challenger"]["requests"] > 0  # type: ignore[index]
    assert "champion: 1; servable: 1, 2;" in cli("status", "--storage", storage).stdout

    # The rolled-back version is no baseline: the next run need only beat the champion.
    cli("export", "--storage", storage, "--run-id", second, "--canary", check=True)
    with serving(storage, tmp_path / "b", second) as (r, prom):
        # Latency is the decision table's to test (test_canary_decision.py): two replicas
        # sharing 2 loaded cores are compared here for accuracy and errors.
        said = analysis(storage, second, r, prom.url, maxP99Ratio=10, windowSeconds=60)
    assert f"promoted: run {second}'s version is the champion of {MODEL}" in said
    assert ledger(storage, 3)["release"] == "promoted"
    record = canary_record(storage, second)
    challenger, champion = record["challenger"], record["champion"]
    assert challenger["accuracy"] > champion["accuracy"]  # type: ignore[index,operator]
    assert challenger["images"] > 0 and challenger["failures"] == 0  # type: ignore[index]
    assert "champion: 3; servable: 1, 2, 3;" in cli("status", "--storage", storage).stdout
    # Restarted, both Deployments' pods pin the new champion.
    for track, pin in chart().items():
        if track.endswith("pin-version"):
            served = tmp_path / "c" / track.split()[0]
            cli(*here(pin, storage=storage, served_repository=served, run_id=second), check=True)
            assert [p.name for p in (served / MODEL).iterdir() if p.is_dir()] == ["3"], track
