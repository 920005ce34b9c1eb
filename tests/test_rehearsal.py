"""Rehearse the chart: its own command lines, run locally, drive the whole pipeline.

Each container's command, args and env are taken from the rendered manifests, /storage is
rewritten to a temporary folder and the Service address to local ports, and they run in
the chart's order. The tritonserver container runs the real `tritonserver` 2.51 (from the
nvidia-pytriton wheel) with its rendered command line, paths and ports remapped, plus
`--backend-directory` pointing at the locally built onnxruntime backend (the image has
its own): a flag tritonserver rejects fails the rehearsal. The waits (initContainers) are
started FIRST, before what they wait for, and must hold until their stage is done, then
let it through.

With `training.workers: 2` the train Job is Indexed: both worker pods run at once, with
what Kubernetes gives them (JOB_COMPLETION_INDEX, the job-name label, `$(VAR)` expanded in
args) and the pod names cluster DNS would resolve through the headless Service mapped to
127.0.0.1, so the rendered torchrun command lines rendezvous for real.

Then the same for an upgrade (revision 2, more training data: a new run id) on the same
volume: its waits ignore the first run's artifacts, export publishes version 2 because it
is better, and the new Triton serves it.
"""

from __future__ import annotations

import json
import os
import re
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

VALUES: dict[str, Any] = {
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
        # Every pod name the cluster DNS would resolve (a multi-worker Job's): this machine.
        self.addresses |= dict.fromkeys(dns_names(objects), "127.0.0.1")
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": str(logs),
            "PYTHONPATH": str(REPO / "src"),
        }

    def rewrite(self, value: str) -> str:
        for address, here in self.addresses.items():
            value = value.replace(address, here)
        # The mount points as whole path components, in one pass: never inside a rewritten
        # one. /pinned is Triton's emptyDir: one per rehearsed revision.
        mounts = {"/storage": self.storage, "/pinned": self.logs / "pinned"}
        return re.sub(
            r"(?<![\w.-])(/storage|/pinned)(?![\w.-])", lambda m: str(mounts[m[1]]), value
        )

    def argv_env(
        self, container: dict[str, Any], pod: dict[str, Any] | None = None
    ) -> tuple[list[str], dict[str, str]]:
        declared = container_env(container, pod or {"metadata": {}})
        env = {**self.env, **{name: self.rewrite(value) for name, value in declared.items()}}
        container = {
            **container,
            "args": [self.rewrite(expand(a, declared)) for a in container.get("args", [])],
        }
        if container["name"] == "tritonserver":
            # The image's entrypoint runs args: the real tritonserver, as rendered.
            assert container["args"][0] == "tritonserver" and "command" not in container
            args = []
            for a in container["args"][1:]:
                flag, _, value = a.partition("=")
                if flag.endswith("-port"):
                    value = str(self.local_port[int(value)])
                args.append(f"{flag}={value}")
            backends = check_backend(DEFAULT_BACKEND_DIR)
            return [str(locate_tritonserver()), *args, f"--backend-directory={backends}"], env
        if container["command"] == ["python3", "-c"]:  # the helm test's script
            return [sys.executable, "-c", *container["args"]], env
        if container["command"] == ["torchrun"]:  # the console script of this module
            return [sys.executable, "-m", "torch.distributed.run", *container["args"]], env
        assert container["command"] == ["mnist-pipeline"], container["command"]
        return [sys.executable, "-m", "mnist_pipeline", *container["args"]], env

    def start(
        self, container: dict[str, Any], tag: str, pod: dict[str, Any] | None = None
    ) -> subprocess.Popen[bytes]:
        argv, env = self.argv_env(container, pod)
        log = open(self.logs / f"{tag}.log", "wb")  # noqa: SIM115 (closed with the test)
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

    def run(self, container: dict[str, Any], tag: str, timeout: float = 600) -> None:
        self.run_together([(container, None, tag)], timeout)

    def run_together(
        self, runs: list[tuple[dict[str, Any], dict[str, Any] | None, str]], timeout: float = 600
    ) -> None:
        """Start every (container, pod, tag) at once; each must exit 0."""
        processes = [(self.start(container, tag, pod), tag) for container, pod, tag in runs]
        try:
            for process, tag in processes:
                assert process.wait(timeout) == 0, self.log(tag)
        finally:
            for process, _ in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()

    def log(self, tag: str) -> str:
        return f"{tag} failed:\n" + (self.logs / f"{tag}.log").read_text()[-4000:]


JOB_INDEX = "batch.kubernetes.io/job-completion-index"


def job_pods(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The pods the Job controller makes: the template with its labels added; for an Indexed
    Job one per index, hostname <job>-<index>, and JOB_COMPLETION_INDEX in every container."""
    name = job["metadata"]["name"]
    template = job["spec"]["template"]
    labels = {**template["metadata"].get("labels", {}), "job-name": name}
    labels["batch.kubernetes.io/job-name"] = name
    if job["spec"].get("completionMode") != "Indexed":
        return [{"metadata": {"labels": labels}, "spec": template["spec"]}]
    index_env = {
        "name": "JOB_COMPLETION_INDEX",
        "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{JOB_INDEX}']"}},
    }
    pods = []
    for index in range(job["spec"]["completions"]):
        spec = dict(template["spec"])
        for key in ("initContainers", "containers"):
            spec[key] = [{**c, "env": [*c.get("env", []), index_env]} for c in spec.get(key, [])]
        metadata = {
            "labels": {**labels, JOB_INDEX: str(index)},
            "annotations": {JOB_INDEX: str(index)},
        }
        pods.append({"metadata": metadata, "spec": {**spec, "hostname": f"{name}-{index}"}})
    return pods


def dns_names(objects: list[dict[str, Any]]) -> list[str]:
    """What cluster DNS resolves to a Job's pods: <hostname>.<subdomain> when a headless
    Service of that name selects the pod, in the namespace's search path; longest first."""
    names = []
    for service in objects:
        if service["kind"] != "Service" or service["spec"].get("clusterIP") != "None":
            continue
        selector = service["spec"]["selector"].items()
        for pod in (p for job in objects if job["kind"] == "Job" for p in job_pods(job)):
            spec = pod["spec"]
            if (
                spec.get("subdomain") == service["metadata"]["name"]
                and "hostname" in spec
                and selector <= pod["metadata"]["labels"].items()
            ):
                short = f"{spec['hostname']}.{spec['subdomain']}"
                fqdn = f"{short}.{service['metadata']['namespace']}.svc"
                names += [f"{fqdn}.cluster.local", fqdn, short]
    return names


def container_env(container: dict[str, Any], pod: dict[str, Any]) -> dict[str, str]:
    """The container's env as the kubelet sets it: fieldRefs read from the pod, $(VAR)
    expanded from the variables before it."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        path = var["valueFrom"]["fieldRef"]["fieldPath"]
        field = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        assert field, f"the rehearsal does not resolve fieldPath {path}"
        env[var["name"]] = pod["metadata"][field[1]][field[2]]
    return env


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: $$ is a literal $; an unknown name is left as written."""
    return re.sub(
        r"\$\$|\$\(([-._a-zA-Z0-9]+)\)",
        lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]),
        value,
    )


def wait_exit(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def pod_tag(stage: str, pod: dict[str, Any], container: dict[str, Any]) -> str:
    """train-train for one pod, train-1-train for worker 1's: the log's name."""
    index = pod["metadata"].get("annotations", {}).get(JOB_INDEX)
    return "-".join(p for p in (stage, index, container["name"]) if p is not None)


def read(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def rehearse(r: Rehearsal, objects: list[dict[str, Any]]) -> dict[str, Any]:
    """One release revision, in the chart's order; return its export outcome."""
    train_pods = job_pods(find(objects, "Job", "train"))
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
    wait_export, pin = triton["initContainers"]
    wait_serving, prune = client["initContainers"]
    waits = {
        "wait-for-training": r.start(wait_training, "wait-for-training"),
        "wait-for-export": r.start(wait_export, "wait-for-export"),
        "wait-for-serving": r.start(wait_serving, "wait-for-serving"),
    }
    server = None
    try:
        # seed-data, then train, in every worker's pod at once (one pod unless workers > 1)
        for step in zip(*(containers(pod["spec"]) for pod in train_pods), strict=True):
            assert waits["wait-for-training"].poll() is None, "export started before training"
            r.run_together(
                [
                    (container, pod, pod_tag("train", pod, container))
                    for container, pod in zip(step, train_pods, strict=True)
                ]
            )
        assert read(r.storage / "checkpoints" / run_id / "metrics.json")["status"] == "complete"
        assert wait_exit(waits["wait-for-training"], 30) == 0, r.log("wait-for-training")
        assert waits["wait-for-export"].poll() is None, "Triton's wait let it start before export"

        (export_container,) = export["containers"]
        r.run(export_container, "export")
        outcome = read(r.storage / "checkpoints" / run_id / "export.json")
        assert wait_exit(waits["wait-for-export"], 30) == 0, r.log("wait-for-export")
        assert waits["wait-for-serving"].poll() is None, "the client's wait let it start early"

        r.run(pin, "pin-version")  # the repository Triton serves, into its emptyDir
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


def test_two_workers_train_one_run_under_torchrun_then_it_is_served(tmp_path: Path) -> None:
    """training.workers: 2 — both pods of the Indexed Job run the rendered torchrun command
    line at once, with what Kubernetes injects (JOB_COMPLETION_INDEX, JOB_NAME from the
    pod's label) and worker 0's DNS name resolving to this machine; then the same export,
    Triton and client as one worker."""
    (port,) = free_ports(1)  # the rendezvous: masterPort is a value
    extra_env = [
        *VALUES["training"]["extraEnv"],
        {"name": "LIMIT_TEST", "value": "1000"},
        # A pod's CPU limit is its own; here both ranks share 2 cores: one thread each.
        {"name": "THREADS", "value": "1"},
    ]
    values = {
        **VALUES,
        "persistence": {"accessModes": ["ReadWriteMany"]},
        "training": {
            **VALUES["training"],
            "workers": 2,
            "masterPort": port,
            # 32 steps: at 8 (one epoch of 64) rank 0's BatchNorm running statistics have
            # not settled and the model scored 0.09 and 0.13; here 0.58 (on 1000 images).
            "epochs": 2,
            "batchSize": 32,
            "extraEnv": extra_env,
        },
    }
    objects, _ = render(values, release="rehearsal", namespace="ml")
    r = Rehearsal(tmp_path / "storage", tmp_path / "logs", objects)
    # Worker 0's name as the pods expand it must be one cluster DNS resolves (torchrun would
    # retry an unknown one until its rendezvous times out, minutes later).
    for pod in job_pods(find(objects, "Job", "train")):
        argv, _ = r.argv_env(pod["spec"]["containers"][0], pod)
        assert "--master-addr=127.0.0.1" in argv, argv
    outcome = rehearse(r, objects)
    assert outcome["status"] == "published" and outcome["version"] == 1, outcome

    run_id = find(objects, "Job", "train")["metadata"]["annotations"]["mnist-pipeline/run-id"]
    out = r.storage / "checkpoints" / run_id
    metrics = read(out / "metrics.json")
    assert metrics["world_size"] == 2 and metrics["status"] == "complete", metrics
    assert sorted(p.name for p in out.iterdir()) == [
        "export.json",
        "metrics.json",
        "model.pth",
        "train.log",
    ]
    logs = [(r.logs / f"train-{index}-train.log").read_text() for index in (0, 1)]
    # Rank 0 alone wrote model.pth; both ranks ended with the same parameters.
    assert "rank 0: final test accuracy" in logs[0] and "final test accuracy" not in logs[1]
    assert "rank 1: done; rank 0 wrote" in logs[1]
    digest = metrics["parameters_sha256"]
    for rank, log in enumerate(logs):
        assert f"rank {rank}: parameters sha256 {digest}, identical on all 2 ranks" in log


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
