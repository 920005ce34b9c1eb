"""The three images, built and run in a real container engine (support/engine.py).

Each runs what the chart runs it for, with the chart's restrictions: user 10001, read-only
root filesystem with /tmp the only writable path, every capability dropped, no privilege
escalation. data, train and export run with no network at all; the Triton image serves
the exported repository through its onnxruntime backend, READY, and the client image's
`infer` gets answers. The chart's pods in these images: test_rehearsal.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.engine import Container, Engine, image
from support.serving import free_ports

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


def run(engine: Engine, storage: Path, network: str, *args: str) -> str:
    done = engine.docker(
        "run",
        "--rm",
        f"--network={network}",
        *RESTRICTED,
        f"--mount=type=bind,source={storage},target=/storage",
        *args,
        check=False,
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
    )
    assert (storage / "models" / "resnet18_mnist" / "1" / "model.onnx").is_file(), exported

    http, grpc, metrics = free_ports(3)
    server = Container(
        container_engine,
        f"smoke-triton-{tmp_path.name}",
        [
            "--network=host",
            *RESTRICTED,
            f"--mount=type=bind,source={storage},target=/storage,readonly",
            image("triton"),
            "--model-repository=/storage/models",
            "--model-control-mode=none",
            f"--http-port={http}",
            f"--grpc-port={grpc}",
            f"--metrics-port={metrics}",
            "--pinned-memory-pool-byte-size=0",
        ],
        tmp_path / "triton.log",
    )
    try:
        client = image("client")
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
    assert "onnxruntime" in log and "READY" in log, log[-3000:]
    (result,) = (storage / "inference").iterdir()
    latency = json.loads((result / "latency.json").read_text())
    assert latency["count"] == 20 and latency["model_version_served"] == "1", answered
