"""Rehearse the chart: its own command lines, run locally, drive the whole pipeline.

Each container's command, args and env are taken from the rendered manifests, /storage is
rewritten to a temporary folder and the Service address to local ports, and they run in
the chart's order. The tritonserver container runs the real `tritonserver` 2.51 (from the
nvidia-pytriton wheel) with its rendered command line, paths and ports remapped, plus
`--backend-directory` pointing at the locally built onnxruntime backend (the image has
its own): a flag tritonserver rejects fails the rehearsal. The waits (initContainers) are
started FIRST, before what they wait for, and must hold until their stage is done, then
let it through.

Then the same for an upgrade (revision 2, more training data: a new run id) on the same
volume: its waits ignore the first run's artifacts, export publishes version 2 because it
is better, and the new Triton serves it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helm_chart import REPO, containers, find, pod_spec, render
from mnist_pipeline.serve import DEFAULT_BACKEND_DIR, check_backend, locate_tritonserver
from serving_helpers import free_ports

pytestmark = pytest.mark.slow

VALUES = {
    "training": {
        "epochs": 1,
        "batchSize": 64,
        "extraEnv": [{"name": "LIMIT_TRAIN", "value": "512"}],
    },
    "client": {"requests": 20, "concurrency": 2},
    "tests": {"requests": 5, "minAccuracy": 0.2},
    "waits": {"intervalSeconds": 1, "timeoutSeconds": 600},
    # A valid tritonserver flag that no wrapper knows: it must reach the server untouched.
    "triton": {"extraArgs": ["--pinned-memory-pool-byte-size=0"]},
}


class Rehearsal:
    def __init__(self, storage: Path, logs: Path, objects: list[dict[str, Any]]) -> None:
        self.storage = storage
        self.logs = logs
        self.logs.mkdir(parents=True)
        triton = pod_spec(find(objects, "Deployment", "triton"))["containers"][0]
        service = find(objects, "Service", "triton")
        local = dict(zip(("http", "grpc", "metrics"), free_ports(3), strict=True))
        self.local_port = {p["containerPort"]: local[p["name"]] for p in triton["ports"]}
        host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
        # The Service's address → the port the local Triton listens on for that target.
        self.addresses = {
            f"{host}:{p['port']}": f"127.0.0.1:{local[p['targetPort']]}"
            for p in service["spec"]["ports"]
        }
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": str(logs),
            "PYTHONPATH": str(REPO / "src"),
        }

    def rewrite(self, value: str) -> str:
        for address, here in self.addresses.items():
            value = value.replace(address, here)
        return value.replace("=/storage", f"={self.storage}").replace(
            "/storage/", f"{self.storage}/"
        )

    def argv_env(self, container: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        env = dict(self.env)
        for var in container.get("env", []):
            env[var["name"]] = self.rewrite(var["value"])
        if container["name"] == "tritonserver":
            # The image's entrypoint runs args: the real tritonserver, as rendered.
            assert container["args"][0] == "tritonserver" and "command" not in container
            args = []
            for a in container["args"][1:]:
                flag, _, value = a.partition("=")
                if flag.endswith("-port"):
                    value = str(self.local_port[int(value)])
                args.append(f"{flag}={self.rewrite(value)}")
            backends = check_backend(DEFAULT_BACKEND_DIR)
            return [str(locate_tritonserver()), *args, f"--backend-directory={backends}"], env
        if container["command"] == ["python3", "-c"]:  # the helm test's script
            script, *args = container["args"]
            return [sys.executable, "-c", script, *map(self.rewrite, args)], env
        assert container["command"] == ["mnist-pipeline"], container["command"]
        args = [self.rewrite(a) for a in container["args"]]
        return [sys.executable, "-m", "mnist_pipeline", *args], env

    def start(self, container: dict[str, Any], tag: str) -> subprocess.Popen[bytes]:
        argv, env = self.argv_env(container)
        log = open(self.logs / f"{tag}.log", "wb")  # noqa: SIM115 (closed with the test)
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

    def run(self, container: dict[str, Any], tag: str, timeout: float = 600) -> None:
        process = self.start(container, tag)
        assert process.wait(timeout) == 0, self.log(tag)

    def log(self, tag: str) -> str:
        return f"{tag} failed:\n" + (self.logs / f"{tag}.log").read_text()[-4000:]


def wait_exit(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def read(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def rehearse(r: Rehearsal, objects: list[dict[str, Any]]) -> dict[str, Any]:
    """One release revision, in the chart's order; return its export outcome."""
    train = pod_spec(find(objects, "Job", "train"))
    export = pod_spec(find(objects, "Job", "export"))
    triton = pod_spec(find(objects, "Deployment", "triton"))
    client = pod_spec(find(objects, "Job", "client"))
    (helm_test,) = [o for o in objects if o["kind"] == "Pod"]
    run_id = find(objects, "Job", "train")["metadata"]["annotations"]["mnist-pipeline/run-id"]
    inference = r.storage / "inference"
    results_before = set(inference.iterdir()) if inference.is_dir() else set()

    # Every wait starts now, before anything it waits for exists (whatever an earlier
    # revision left on the volume).
    (wait_training,) = export["initContainers"]
    (wait_export,) = triton["initContainers"]
    wait_serving, prune = client["initContainers"]
    waits = {
        "wait-for-training": r.start(wait_training, "wait-for-training"),
        "wait-for-export": r.start(wait_export, "wait-for-export"),
        "wait-for-serving": r.start(wait_serving, "wait-for-serving"),
    }
    server = None
    try:
        for container in containers(train):  # seed-data, then train
            assert waits["wait-for-training"].poll() is None, "export started before training"
            r.run(container, f"train-{container['name']}")
        assert read(r.storage / "checkpoints" / run_id / "metrics.json")["status"] == "complete"
        assert wait_exit(waits["wait-for-training"], 30) == 0, r.log("wait-for-training")
        assert waits["wait-for-export"].poll() is None, "Triton's wait let it start before export"

        (export_container,) = export["containers"]
        r.run(export_container, "export")
        outcome = read(r.storage / "checkpoints" / run_id / "export.json")
        assert wait_exit(waits["wait-for-export"], 30) == 0, r.log("wait-for-export")
        assert waits["wait-for-serving"].poll() is None, "the client's wait let it start early"

        (tritonserver,) = triton["containers"]
        server = r.start(tritonserver, "tritonserver")
        assert wait_exit(waits["wait-for-serving"], 240) == 0, r.log("wait-for-serving")

        r.run(prune, "prune")  # retention, before the client's results arrive
        (infer,) = client["containers"]
        r.run(infer, "client")
        (result,) = set(inference.iterdir()) - results_before
        latency = read(result / "latency.json")
        assert latency["count"] == VALUES["client"]["requests"]
        assert len(read_samples(result)) == 10
        assert latency["model_version_served"] == str(outcome["version"])

        # `helm test`: the hook Pod's command line against the same Service. It checks the
        # served version and the accuracy floor, and writes nothing to the volume.
        (test_container,) = helm_test["spec"]["containers"]
        r.run(test_container, "helm-test")
        assert (
            f"served version {outcome['version']} (expected {outcome['version']})"
            in (r.logs / "helm-test.log").read_text()
        )
        impossible = {**test_container, "args": [*test_container["args"], "--min-accuracy=1.01"]}
        assert r.start(impossible, "helm-test-floor").wait(300) == 1
        assert "below tests.minAccuracy" in (r.logs / "helm-test-floor.log").read_text()
        assert len(set(inference.iterdir()) - results_before) == 1
    finally:
        for process in waits.values():
            if process.poll() is None:
                process.kill()
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    assert server.returncode == 0, r.log("tritonserver")
    return outcome


def test_install_then_upgrade_run_from_the_charts_command_lines(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    install, _ = render(VALUES, release="rehearsal", namespace="ml")
    first = rehearse(Rehearsal(storage, tmp_path / "r1", install), install)
    assert first["status"] == "published" and first["version"] == 1, first

    # helm upgrade with more training data: a new run, trained, exported as version 2 since
    # it is better, and the new Triton serves it.
    more_data = {
        **VALUES,
        "training": {**VALUES["training"], "extraEnv": [{"name": "LIMIT_TRAIN", "value": "1536"}]},
    }
    upgrade, _ = render(more_data, release="rehearsal", namespace="ml", revision=2)
    second = rehearse(Rehearsal(storage, tmp_path / "r2", upgrade), upgrade)
    assert second["status"] == "published" and second["version"] == 2, second
    assert sorted(p.name for p in (storage / "checkpoints").iterdir() if p.is_dir()) == sorted(
        find(o, "Job", "train")["metadata"]["annotations"]["mnist-pipeline/run-id"]
        for o in (install, upgrade)
    )


def read_samples(folder: Path) -> list[Any]:
    samples = json.loads((folder / "samples.json").read_text())
    return list(samples["samples"] if isinstance(samples, dict) else samples)


def test_a_new_run_waits_for_its_own_artifacts_not_the_first(tmp_path: Path) -> None:
    """An upgrade that changes training ignores the complete artifacts of the run before."""
    pinned = {**VALUES, "run": {"id": "rehearsal"}}
    first, _ = render(pinned, release="rehearsal", namespace="ml")
    more_epochs = {**pinned, "training": {**VALUES["training"], "epochs": 2}}
    second, _ = render(more_epochs, release="rehearsal", namespace="ml", revision=2)
    r = Rehearsal(tmp_path / "storage", tmp_path / "logs", first)
    first_run = find(first, "Job", "train")["metadata"]["annotations"]["mnist-pipeline/run-id"]
    done = r.storage / "checkpoints" / first_run
    done.mkdir(parents=True)
    (done / "metrics.json").write_text('{"status": "complete"}')
    (wait,) = pod_spec(find(second, "Job", "export"))["initContainers"]
    wait = {**wait, "args": [*wait["args"], "--timeout=2"]}  # the last --timeout wins
    process = r.start(wait, "wait")
    assert process.wait(60) == 1
    assert "gave up after 2 s" in (r.logs / "wait.log").read_text()


def test_a_flag_tritonserver_rejects_fails_the_rehearsal(tmp_path: Path) -> None:
    """The chart's Triton arguments reach the real tritonserver: a bad one fails there."""
    objects, _ = render({**VALUES, "triton": {"extraArgs": ["--host=0.0.0.0"]}})
    r = Rehearsal(tmp_path / "storage", tmp_path / "logs", objects)
    (tritonserver,) = pod_spec(find(objects, "Deployment", "triton"))["containers"]
    process = r.start(tritonserver, "tritonserver")
    assert wait_exit(process, 60) not in (0, None), r.log("tritonserver")
    assert "--host-policy option format" in (r.logs / "tritonserver.log").read_text()
