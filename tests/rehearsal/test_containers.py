"""The three images, built and run in a real container engine (harness/engine.py).

Each runs what the chart runs it for, with the chart's restrictions: user 10001, read-only
root filesystem with /tmp the only writable path, every capability dropped, no privilege
escalation. data, train and export run with no network at all; the client image pins the
exported version for Triton's python backend (as the chart's pin initContainer does with
images.triton.backend python), the Triton image serves it through that backend, READY, and
the client image's `infer` gets answers. The chart's pods in these images: test_rehearsal.py.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from test_rehearsal import VALUES, Rehearsal, job_pods, wait_exit

from harness.chart import find, render
from harness.engine import Container, Engine, image
from harness.failure_policy import action, failed_pod
from harness.ports import free_ports

pytestmark = pytest.mark.slow

RESTRICTED = [
    "--user=10001:10001",
    "--read-only",
    "--tmpfs=/tmp",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
]


@pytest.mark.parametrize(
    ("name", "entrypoint", "command"),
    [
        ("pipeline", ["mnist-pipeline"], ["--help"]),
        ("client", ["mnist-pipeline"], ["--help"]),
        # As NVIDIA's image: the chart's args are the whole command (`tritonserver ...`).
        ("triton", None, ["tritonserver", "--help"]),
    ],
)
def test_image_runs_as_its_user_with_its_entrypoint(
    container_engine: Engine, name: str, entrypoint: list[str] | None, command: list[str]
) -> None:
    config = json.loads(
        container_engine.docker("image", "inspect", "-f", "{{json .Config}}", image(name)).stdout
    )
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == entrypoint
    # It runs as that user, with nothing writable but /tmp (tritonserver's --help exits 1:
    # its usage text is the proof).
    helped = container_engine.docker(
        "run", "--rm", "--network=none", *RESTRICTED, image(name), *command, check=False
    )
    program = (entrypoint or command)[0]
    assert f"Usage: {program}" in helped.stdout + helped.stderr, helped


def run(engine: Engine, storage: Path, network: str, *args: str, served: Path | None = None) -> str:
    """`docker run` of the image and command in `args`, restricted, the storage at /storage
    (and `served` at /served)."""
    mounts = [f"--mount=type=bind,source={storage},target=/storage"]
    if served is not None:
        mounts.append(f"--mount=type=bind,source={served},target=/served")
    done = engine.docker(
        "run", "--rm", f"--network={network}", *RESTRICTED, *mounts, *args, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_pipeline_to_triton_to_client_in_the_images(
    container_engine: Engine, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    storage.mkdir()
    storage.chmod(0o777)
    pipeline = image("pipeline")
    run(container_engine, storage, "none", pipeline, "data", "--storage=/storage")
    run(
        container_engine,
        storage,
        "none",
        pipeline,
        "train",
        "--storage=/storage",
        "--run-id=smoke",
        "--limit-train=512",
        "--limit-test=500",
        "--batch-size=64",
        "--checkpoint-every=0",
    )
    exported = run(
        container_engine,
        storage,
        "none",
        pipeline,
        "export",
        "--storage=/storage",
        "--run-id=smoke",
        # 8 training steps can land at chance: this checks the images, not the model.
        "--publish-min-accuracy=0",
    )
    assert (storage / "models" / "resnet18_mnist" / "1" / "model.onnx").is_file(), exported
    # As the chart's pin-version initContainer with images.triton.backend python: the
    # version's files linked by their /storage paths, config.pbtxt and model.py in a folder
    # of its own, which the Triton container mounts beside the storage at the same paths.
    served = tmp_path / "served"
    served.mkdir()
    served.chmod(0o777)
    client = image("client")
    pinned = run(
        container_engine,
        storage,
        "none",
        client,
        "pin",
        "--storage=/storage",
        "--served-repository=/served",
        "--triton-backend=python",
        served=served,
    )
    version = served / "resnet18_mnist" / "1"
    assert (version / "model.py").is_file(), pinned
    assert str((version / "model.onnx").readlink()).startswith("/storage/"), pinned

    http, grpc, metrics = free_ports(3)
    server = Container(
        container_engine,
        f"smoke-triton-{tmp_path.name}",
        [
            "--network=host",
            *RESTRICTED,
            f"--mount=type=bind,source={storage},target=/storage,readonly",
            f"--mount=type=bind,source={served},target=/served,readonly",
            image("triton"),
            "tritonserver",  # no entrypoint, as NVIDIA's image: the command is the args
            "--model-repository=/served",
            "--model-control-mode=none",
            f"--http-port={http}",
            f"--grpc-port={grpc}",
            f"--metrics-port={metrics}",
            "--pinned-memory-pool-byte-size=0",
        ],
        tmp_path / "triton.log",
    )
    try:
        run(
            container_engine,
            storage,
            "host",
            client,
            "wait",
            "serving",
            "--storage=/storage",
            "--run-id=smoke",
            f"--http-url=127.0.0.1:{http}",
            "--wait-timeout=180",
        )
        answered = run(
            container_engine,
            storage,
            "host",
            client,
            "infer",
            "--storage=/storage",
            f"--url=127.0.0.1:{grpc}",
            "--requests=20",
        )
    finally:
        server.send_signal(15)
        server.wait(60)
    log = (tmp_path / "triton.log").read_text()
    assert server.returncode == 0, log[-3000:]
    # The python backend, from tritonserver's default backend directory, served the model.
    assert "/opt/tritonserver/backends/python/libtriton_python.so" in log, log[-3000:]
    assert "READY" in log, log[-3000:]
    (result,) = (storage / "inference").iterdir()
    latency = json.loads((result / "latency.json").read_text())
    assert latency["count"] == 20 and latency["model_version_served"] == "1", answered


# The wait of each Job, and the artifact whose failure it reports (exit 1): training's
# record on the volume, the export's in the repository.
WAITED = {
    "export": "checkpoints/{run}/metrics.json",
    "client": "models/resnet18_mnist/.export/runs/{run}.json",
}


@pytest.mark.parametrize("stage", WAITED)
def test_a_waiting_pod_deleted_or_oom_killed_is_retried_a_failed_stage_fails_the_job(
    container_engine: Engine, tmp_path: Path, stage: str
) -> None:
    """The Job's wait, in its image with the rendered command line and limits, stopped while
    it waits as the kubelet stops a deleted or drained pod (SIGTERM, then SIGKILL after the
    grace period) and SIGKILLed as the OOM killer does: the exit codes it returns fall to no
    FailJob rule of the rendered Job (retried). Before, the wait ignored SIGTERM as PID 1
    (137 after the grace period) and `NotIn [0]` failed the Job on any code. What it waits
    for having failed, it exits 1: that fails the Job at once."""
    objects, _ = render(VALUES, release="rehearsal", namespace="ml")
    job = find(objects, "Job", stage)
    (pod,) = job_pods(job)
    wait = pod["spec"]["initContainers"][0]
    r = Rehearsal(tmp_path / "storage", tmp_path / "logs", objects, container_engine)
    run_id = job["metadata"]["annotations"]["mnist-pipeline/run-id"]
    for how in ("stop", "oom"):
        waiting = r.start(wait, pod, f"wait-{how}")
        assert isinstance(waiting, Container)
        log = r.logs / f"wait-{how}.log"
        deadline = time.monotonic() + 60
        while "waiting for" not in log.read_text() and waiting.poll() is None:
            assert time.monotonic() < deadline, r.log(f"wait-{how}")
            time.sleep(0.2)
        limits = json.loads(
            container_engine.docker("inspect", "-f", "{{json .HostConfig}}", waiting.name).stdout
        )
        # As on a node: the memory limit holds memory and swap together (no swap).
        assert limits["Memory"] == limits["MemorySwap"] == 128 * 2**20, limits
        if how == "stop":
            started = time.monotonic()
            code = waiting.stop(grace=30)
            assert time.monotonic() - started < 20, "the wait ignored SIGTERM until SIGKILL"
        else:
            waiting.send_signal(signal.SIGKILL)
            code = wait_exit(waiting, 30)
        assert code == {"stop": 143, "oom": 137}[how], r.log(f"wait-{how}")
        assert action(job, failed_pod(wait["name"], code)) == "Count", code
    record = r.storage / WAITED[stage].format(run=run_id)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"status": "failed", "error": "a test", "reason": "a test"}))
    record.chmod(0o644)
    code = r.start(wait, pod, "wait-failed").wait(60)
    assert code == 1, r.log("wait-failed")
    assert action(job, failed_pod(wait["name"], code)) == "FailJob"
