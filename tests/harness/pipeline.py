"""The pipeline as the tests run it: its CLI in a child process, the runs the fixtures
make, and models published by hand."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import REPO
from harness.ports import free_ports

MNIST_SOURCE = REPO / "data" / "mnist"
MODEL = "resnet18_mnist"
# Trains in seconds and still scores well above 80% on the test set.
LIMIT_TRAIN = "5000"


def cli(
    *args: str | os.PathLike[str],
    check: bool = False,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `mnist-pipeline ARGS` as a user would, in a child process; `env` over ours."""
    result = subprocess.run(
        [sys.executable, "-m", "mnist_pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def cli_background(
    *args: str | os.PathLike[str], env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """`mnist-pipeline ARGS` started, not waited for: its stderr piped, its output dropped."""
    return subprocess.Popen(
        [sys.executable, "-m", "mnist_pipeline", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def port_variables() -> dict[str, str]:
    """Three free loopback ports as the variables `run` and `serve` read them from."""
    http, grpc, metrics = free_ports(3)
    return {
        "MNIST_PIPELINE_HTTP_PORT": str(http),
        "MNIST_PIPELINE_GRPC_PORT": str(grpc),
        "MNIST_PIPELINE_METRICS_PORT": str(metrics),
    }


@dataclass(frozen=True)
class TrainedRun:
    storage: Path
    run_id: str
    accuracy: float  # on all 10 000 test images


@dataclass(frozen=True)
class PipelineRun:
    storage: Path
    result: subprocess.CompletedProcess[str]
    grpc_port: int
    inference: Path  # the folder its client wrote


def failing_onnx_model(image_dims: tuple[int, ...] = (784,)) -> bytes:
    """An ONNX model that loads, matches its config (input [batch, *image_dims]), and
    fails every request inside ONNX Runtime: a Gather at an index past the end of each
    784-pixel image."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.zeros((784, 10), np.float32), "w")
    index = numpy_helper.from_array(np.array([784], np.int64), "past_the_end")
    flat = numpy_helper.from_array(np.array([-1, 784], np.int64), "flat_shape")
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["input", "flat_shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
            helper.make_node("Gather", ["flat", "past_the_end"], ["pixel"], axis=1),
            helper.make_node("Add", ["logits", "pixel"], ["output"]),
        ],
        "failing",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *image_dims])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10])],
        [weights, index, flat],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def publish_by_hand(version: Path, model: bytes) -> None:
    """`model` as version folder `version`, with the metadata.json that pin checks it
    against: what export would publish, without export's own checks."""
    version.mkdir(parents=True, exist_ok=True)
    (version / "model.onnx").write_bytes(model)
    sha256 = hashlib.sha256(model).hexdigest()
    files = {"model.onnx": {"bytes": len(model), "sha256": sha256}}
    metadata = {"sha256": sha256, "accuracy": 0.0, "files": files}
    (version / "metadata.json").write_text(json.dumps(metadata))


def snapshot(root: Path) -> dict[str, Any]:
    """Every path under root with its content hash (or link target): any change shows."""
    if not root.exists():
        return {}
    state: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            state[key] = ("link", os.readlink(path))
        elif path.is_file():
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[key] = "dir"
    return state
