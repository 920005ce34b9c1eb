"""Shared fixtures.

MNIST is placed once per session and copied into a fresh storage folder per test. The
serving tests share one real pipeline run and one real local Triton: training and server
starts are what cost time on 2 cores. Every server started here is stopped by a finaliser,
also when a test fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from mnist_pipeline import data
from mnist_pipeline.serve import LocalTriton
from mnist_pipeline.tritonconfig import TritonConfig
from support.engine import HOW_TO_RUN, Engine, EngineUnavailable
from support.objectstore import radosgw  # noqa: F401 (one radosgw for the whole session)
from support.serving import free_ports, pinned_models

REPO = Path(__file__).resolve().parents[1]
MNIST_SOURCE = REPO / "data" / "mnist"
# The tests export models trained on a few hundred images, which can land below the
# publishing floor real training clears by far: every command they run publishes whatever
# it is given, unless a test sets the floor itself (test_export.py's floor test).
os.environ["MNIST_PIPELINE_PUBLISH_MIN_ACCURACY"] = "0"


def cli(
    *args: str | os.PathLike[str],
    check: bool = False,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `mnist-pipeline ARGS` as a user would, in a child process."""
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


@pytest.fixture(scope="session")
def container_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """dockerd running, the three images built (once per session). In CI an engine that
    cannot start fails every container check; elsewhere they are skipped, saying so."""
    engine = Engine()
    try:
        engine.start()
    except EngineUnavailable as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the container checks must run in CI: {error}")
        pytest.skip(f"container checks did NOT run ({error}); {HOW_TO_RUN}")
    try:
        seconds = engine.build_images(tmp_path_factory.mktemp("image-builds"))
        # What the builds cost, for the record (README, "Container images").
        (engine.folder / "last-build.json").write_text(json.dumps(seconds, indent=1))
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def mnist_storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A storage folder with verified MNIST in place; shared, so tests must not modify it."""
    root = tmp_path_factory.mktemp("mnist-storage")
    data.place(root, MNIST_SOURCE)
    return root


@dataclass(frozen=True)
class TrainedRun:
    storage: Path
    run_id: str
    accuracy: float  # on all 10 000 test images


@pytest.fixture(scope="session")
def quantisable(tmp_path_factory: pytest.TempPathFactory, mnist_storage: Path) -> TrainedRun:
    """A model worth quantising: 192 steps on 12288 images, about 0.97. Near 0.93 an int8
    export's accuracy moves by a tenth of a point either way (0.9369 -> 0.9356 seen),
    which the 0.1-point gate refuses on one CPU and passes on another."""
    root = tmp_path_factory.mktemp("quantisable") / "storage"
    shutil.copytree(mnist_storage / "data", root / "data")
    quick = "--limit-train 12288 --checkpoint-every 0 --threads 1 --run-id q".split()
    cli("train", "--storage", root, *quick, check=True)
    metrics = json.loads((root / "checkpoints" / "q" / "metrics.json").read_text())
    return TrainedRun(root, "q", metrics["test_accuracy"])


@pytest.fixture
def storage(tmp_path: Path, mnist_storage: Path) -> Path:
    """A fresh storage folder of this test's own, with MNIST already placed."""
    root = tmp_path / "storage"
    shutil.copytree(mnist_storage / "data", root / "data")
    return root


MODEL = "resnet18_mnist"
# Trains in seconds and still scores well above 80% on the test set.
LIMIT_TRAIN = "5000"


@dataclass(frozen=True)
class PipelineRun:
    storage: Path
    result: CompletedProcess[str]
    grpc_port: int
    inference: Path  # the folder its client wrote


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    """`mnist-pipeline run` end to end on a small training subset, on free ports."""
    storage = tmp_path_factory.mktemp("pipeline") / "storage"
    http, grpc, metrics = free_ports(3)
    env = {
        **os.environ,
        "MNIST_PIPELINE_HTTP_PORT": str(http),
        "MNIST_PIPELINE_GRPC_PORT": str(grpc),
        "MNIST_PIPELINE_METRICS_PORT": str(metrics),
    }
    result = cli(
        "run",
        "--storage",
        str(storage),
        "--limit-train",
        LIMIT_TRAIN,
        "--requests",
        "100",
        "--concurrency",
        "2",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (inference,) = list((storage / "inference").iterdir())
    return PipelineRun(storage, result, grpc, inference)


@pytest.fixture(scope="session")
def onnx_path(pipeline: PipelineRun) -> Path:
    return pipeline.storage / "models" / MODEL / "1" / "model.onnx"


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


@pytest.fixture(scope="session")
def test_repository(tmp_path_factory: pytest.TempPathFactory, pipeline: PipelineRun) -> Path:
    """The exported model, plus `failing`: a model whose every request fails inside
    ONNX Runtime, behind a config of the same form with a flat [784] input."""
    repo = tmp_path_factory.mktemp("repository")
    shutil.copytree(pipeline.storage / "models" / MODEL, repo / MODEL, symlinks=True)
    failing = repo / "failing"
    (failing / "1").mkdir(parents=True)
    publish_by_hand(failing / "1", failing_onnx_model())
    config = (repo / MODEL / "config.pbtxt").read_text()
    (failing / "config.pbtxt").write_text(
        config.replace(f'name: "{MODEL}"', 'name: "failing"')
        .replace("dims: [ 1, 28, 28 ]", "dims: [ 784 ]")
        .replace("count: 2", "count: 1")
    )
    assert 'name: "failing"' in (failing / "config.pbtxt").read_text()
    assert "dims: [ 784 ]" in (failing / "config.pbtxt").read_text()
    return repo


def pin_test_repository(test_repository: Path, out: Path) -> Path:
    """Both models of `test_repository` pinned into `out` for the local Triton."""
    for name, instances in ((MODEL, 2), ("failing", 1)):
        cfg = TritonConfig(name=name, instance_count=instances)
        pinned_models(test_repository, out, cfg)
    return out


@pytest.fixture(scope="session")
def served(
    tmp_path_factory: pytest.TempPathFactory, test_repository: Path
) -> Iterator[LocalTriton]:
    http, grpc, metrics = free_ports(3)
    server = LocalTriton(
        pin_test_repository(test_repository, tmp_path_factory.mktemp("served")),
        workdir=tmp_path_factory.mktemp("triton"),
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
    )
    with server:
        yield server
