"""Shared fixtures.

MNIST is placed once per session and copied into a fresh storage folder per test. The
serving tests share one real pipeline run and one real local Triton: training and server
starts are what cost time on 2 cores. Every server started here is stopped by a finaliser,
also when a test fails.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import REPO
from harness.engine import HOW_TO_RUN, Engine, EngineUnavailable
from harness.objectstore import radosgw  # noqa: F401 (one radosgw for the whole session)
from harness.pipeline import (
    LIMIT_TRAIN,
    MNIST_SOURCE,
    MODEL,
    PipelineRun,
    TrainedRun,
    cli,
    failing_onnx_model,
    port_variables,
    publish_by_hand,
)
from harness.serving import local_triton, pin_test_repository
from mnist_pipeline import data
from mnist_pipeline.serve import LocalTriton

# Child Pythons the tests start (the benchmarks) import the harness as the tests do.
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])
)
# The tests export models trained on a few hundred images, which can land below the
# publishing floor real training clears by far: every command they run publishes whatever
# it is given, unless a test sets the floor itself (test_export.py's floor test).
os.environ["MNIST_PIPELINE_PUBLISH_MIN_ACCURACY"] = "0"


@pytest.fixture(scope="session")
def container_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """dockerd running, the three images built (once per session). In CI an engine that
    cannot start fails every container check; elsewhere they are skipped, saying so."""
    engine = Engine()
    try:
        engine.start()
        engine.wait_ready()
    except EngineUnavailable as error:
        engine.stop()
        if os.environ.get("CI") == "true":
            pytest.fail(f"the container checks must run in CI: {error}")
        pytest.skip(f"container checks did NOT run ({error}); {HOW_TO_RUN}")
    try:
        seconds = engine.build_images(tmp_path_factory.mktemp("image-builds"))
        # What the builds cost, for the record (docs/CHART-DESIGN.md, "The container check").
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


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    """`mnist-pipeline run` end to end on a small training subset, on free ports."""
    storage = tmp_path_factory.mktemp("pipeline") / "storage"
    env = port_variables()
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
    return PipelineRun(storage, result, int(env["MNIST_PIPELINE_GRPC_PORT"]), inference)


@pytest.fixture(scope="session")
def onnx_path(pipeline: PipelineRun) -> Path:
    return pipeline.storage / "models" / MODEL / "1" / "model.onnx"


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


@pytest.fixture(scope="session")
def served(
    tmp_path_factory: pytest.TempPathFactory, test_repository: Path
) -> Iterator[LocalTriton]:
    served = pin_test_repository(test_repository, tmp_path_factory.mktemp("served"))
    with local_triton(served, tmp_path_factory.mktemp("triton")) as server:
        yield server
