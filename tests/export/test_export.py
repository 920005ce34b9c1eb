"""The export stage against real parts: MNIST from data/mnist, checkpoints from real training
runs (tiny), torch's exporter, onnxruntime, and Triton's own model-config protobuf."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from harness.pipeline import TrainedRun, cli_background, snapshot
from mnist_pipeline import data, export, quantize, tritonconfig
from mnist_pipeline.errors import PipelineFailure, UsageError
from mnist_pipeline.model import build, checkpoint_payload
from mnist_pipeline.model import weights_sha256 as model_weights_sha256
from mnist_pipeline.repository import GONE, LEFTOVER, Repository, open_repository
from mnist_pipeline.settings import PUBLISH_MIN_ACCURACY
from mnist_pipeline.storage import DEFAULT_MODEL_NAME, ModelRepository

pytestmark = pytest.mark.slow

NAME = DEFAULT_MODEL_NAME


def cli(
    *args: str | Path, check: int | None = 0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "mnist_pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    if check is not None:
        assert result.returncode == check, result.stderr
    return result


def copy_storage(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest, symlinks=True)
    return dest


def repository(storage: Path, name: str = NAME) -> Repository:
    return open_repository(ModelRepository(folder=storage / "models"), name)


def marker(storage: Path, run_id: str) -> dict[str, Any]:
    """The run's export record, kept in the repository."""
    record = repository(storage).read_record(run_id)
    assert record is not None, f"no export record for {run_id}"
    return record


def published_state(models: Path) -> dict[str, Any]:
    """Every file of the repository but the runs' export records, which every export
    extends: versions, ledger, config.pbtxt."""
    return {k: v for k, v in snapshot(models).items() if "/.export/runs" not in f"/{k}"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """MNIST placed once and two tiny training runs of different accuracy, trained at once."""
    storage = tmp_path_factory.mktemp("trained") / "storage"
    cli("data", "--storage", storage)
    runs = {"r256": ("256", "1"), "r768": ("768", "2")}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mnist_pipeline",
                "train",
                "--storage",
                str(storage),
                "--run-id",
                run_id,
                "--limit-train",
                limit,
                "--seed",
                seed,
                "--checkpoint-every",
                "0",
                "--threads",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for run_id, (limit, seed) in runs.items()
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    accuracy = {
        run_id: json.loads((storage / "checkpoints" / run_id / "metrics.json").read_text())[
            "test_accuracy"
        ]
        for run_id in runs
    }
    low, high = sorted(runs, key=accuracy.__getitem__)
    assert accuracy[low] < accuracy[high], f"tiny runs happened to tie: {accuracy}"
    return {"storage": storage, "low": low, "high": high, "accuracy": accuracy}


@pytest.fixture(scope="module")
def published(trained: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One repository through its life: first export, repeat, better, worse."""
    storage = copy_storage(trained["storage"], tmp_path_factory.mktemp("published") / "s")
    low, high = trained["low"], trained["high"]
    models = storage / "models"
    steps: dict[str, Any] = {}

    steps["first"] = cli("export", "--storage", storage, "--run-id", low)
    steps["first_marker"] = marker(storage, low)
    before = published_state(models)
    steps["repeat"] = cli("export", "--storage", storage, "--run-id", low)
    steps["repeat_unchanged"] = published_state(models) == before
    steps["repeat_marker"] = marker(storage, low)

    # Options also come from the environment, as the Helm chart sets them.
    steps["margin"] = cli(
        "export",
        "--storage",
        storage,
        "--run-id",
        high,
        env={"MNIST_PIPELINE_MIN_IMPROVEMENT": "0.99"},
    )
    steps["margin_unchanged"] = published_state(models) == before
    steps["better"] = cli("export", "--storage", storage, "--run-id", high)
    steps["better_marker"] = marker(storage, high)

    before = published_state(models)
    steps["worse"] = cli("export", "--storage", storage, "--run-id", low)
    steps["worse_unchanged"] = published_state(models) == before
    steps["worse_marker"] = marker(storage, low)
    return {**trained, **steps, "storage": storage}


def test_first_export_publishes_version_1(published: dict[str, Any]) -> None:
    model_path = published["storage"] / "models" / NAME
    assert (model_path / "1" / "model.onnx").is_file()
    assert published["first_marker"]["status"] == "published"
    assert published["first_marker"]["version"] == 1
    assert published["first_marker"]["champion_accuracy"] is None


def test_exporting_the_same_checkpoint_twice_skips_the_second(published: dict[str, Any]) -> None:
    assert published["repeat_unchanged"]
    line = [ln for ln in published["repeat"].stderr.splitlines() if "not exported" in ln]
    assert len(line) == 1 and "identical to the published version 1" in line[0]
    # The publication record survives the later skip; the skip is in the history.
    first, repeat = published["first_marker"], published["repeat_marker"]
    assert {k: v for k, v in repeat.items() if k != "history"} == {
        k: v for k, v in first.items() if k != "history"
    }
    assert [a["status"] for a in repeat["history"]] == ["published", "skipped"]
    assert repeat["history"][-1]["version"] == 1
    assert "identical" in repeat["history"][-1]["reason"]


def test_a_later_skip_never_erases_the_publication_record(published: dict[str, Any]) -> None:
    """low was published as version 1, then skipped twice (repeat, and after high won)."""
    record = published["worse_marker"]
    assert record["status"] == "published" and record["version"] == 1
    assert [a["status"] for a in record["history"]] == ["published", "skipped", "skipped"]
    assert record["history"][-1]["version"] == 2


def test_min_improvement_holds_back_a_small_gain(published: dict[str, Any]) -> None:
    assert published["margin_unchanged"]
    assert "by more than 0.99" in published["margin"].stderr


def test_better_model_becomes_the_next_version(published: dict[str, Any]) -> None:
    model_path = published["storage"] / "models" / NAME
    assert repository(published["storage"]).scan().servable == [1, 2]
    meta = json.loads((model_path / "2" / "metadata.json").read_text())
    # Measured by export on the ONNX model; training measured the same 10000 images.
    assert meta["accuracy"] == pytest.approx(published["accuracy"][published["high"]], abs=2e-3)
    assert meta["training_reported_accuracy"] == published["accuracy"][published["high"]]
    assert published["better_marker"]["status"] == "published"
    assert published["better_marker"]["version"] == 2
    v1 = json.loads((model_path / "1" / "metadata.json").read_text())
    assert published["better_marker"]["champion_accuracy"] == v1["accuracy"]


def test_what_a_crashed_export_left_is_cleaned_and_its_number_never_given_again(
    published: dict[str, Any], tmp_path: Path
) -> None:
    """An export killed after claiming version 3 and writing part of it: the next export
    (here a skip, which builds nothing) removes it under the lock; 3 stays taken."""
    storage = copy_storage(published["storage"], tmp_path / "s")
    model_path = storage / "models" / NAME
    claim = {"version": 3, "state": "claimed", "run_id": "crashed", "at": "2026-01-01T00:00Z"}
    (model_path / ".export" / "versions" / "3.json").write_text(json.dumps(claim))
    (model_path / "3").mkdir()
    (model_path / "3" / "model.onnx").write_bytes(b"partial")
    assert repository(storage).scan().versions[3].state == LEFTOVER
    assert repository(storage).scan().servable == [1, 2]  # never counted meanwhile

    result = cli("export", "--storage", storage, "--run-id", published["high"])
    assert f"removing {model_path / '3'}: left by an export that did not finish" in result.stderr
    assert not (model_path / "3").exists()
    scan = repository(storage).scan()
    assert scan.versions[3].state == GONE and scan.high_water == 3
    assert scan.servable == [1, 2]


def test_worse_model_is_skipped_and_changes_nothing(published: dict[str, Any]) -> None:
    assert published["worse"].returncode == 0
    assert published["worse_unchanged"]
    assert published["worse_marker"]["history"][-1]["status"] == "skipped"


def test_best_model_link_is_relative_and_points_at_the_champion(published: dict[str, Any]) -> None:
    link = published["storage"] / "checkpoints" / "best_model.pth"
    assert link.is_symlink()
    assert not os.path.isabs(os.readlink(link))
    assert (
        link.resolve()
        == (published["storage"] / "checkpoints" / published["high"] / "model.pth").resolve()
    )


def test_best_model_link_is_derived_from_the_champion_by_every_export(
    published: dict[str, Any], tmp_path: Path
) -> None:
    """A link lost or pointed elsewhere is put back at the champion's checkpoint by the
    next export, even one that publishes nothing."""
    storage = copy_storage(published["storage"], tmp_path / "s")
    link = storage / "checkpoints" / "best_model.pth"
    champion = (storage / "checkpoints" / published["high"] / "model.pth").resolve()
    link.unlink()
    cli("export", "--storage", storage, "--run-id", published["low"])  # skipped: identical
    assert link.is_symlink() and link.resolve() == champion
    link.unlink()
    link.symlink_to(f"{published['low']}/model.pth")
    cli("export", "--storage", storage, "--run-id", published["high"])  # skipped: identical
    assert link.resolve() == champion
    assert not os.path.isabs(os.readlink(link))


def test_metadata_describes_the_version(published: dict[str, Any]) -> None:
    from datetime import datetime

    version_dir = published["storage"] / "models" / NAME / "2"
    meta = json.loads((version_dir / "metadata.json").read_text())
    assert datetime.fromisoformat(meta["export_date"]).tzinfo is not None
    assert meta["source_model"] == f"checkpoints/{published['high']}/model.pth"
    assert meta["run_id"] == published["high"]
    assert meta["sha256"] == hashlib.sha256((version_dir / "model.onnx").read_bytes()).hexdigest()
    assert meta["opset"] == export.OPSET
    assert 0 <= meta["parity_max_abs_diff"] <= export.PARITY_TOLERANCE
    assert meta["parameters"] == 11_175_370  # ResNet-18, 1 input channel, 10 classes
    assert meta["onnxruntime_version"] == ort.__version__
    assert meta["version"] == 2
    assert meta["evaluation"]["images"] == 10_000
    assert meta["evaluation"]["correct"] == round(meta["accuracy"] * 10_000)
    assert meta["evaluation"]["source"].startswith(export.EVAL_SOURCE)
    assert meta["evaluation"]["test_set_sha256"] == data.FILES[("test", "images")].sha256
    net = export.load_candidate(published["storage"] / meta["source_model"]).net
    assert meta["weights_sha256"] == model_weights_sha256(net)


def test_config_parses_with_tritons_proto_and_has_the_original_values(
    published: dict[str, Any],
) -> None:
    text = (published["storage"] / "models" / NAME / "config.pbtxt").read_text()
    config = tritonconfig.parse_config(text)
    assert config.name == NAME
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    (inp,), (out,) = config.input, config.output
    assert (inp.name, inp.data_type, list(inp.dims)) == ("input", 11, [1, 28, 28])  # TYPE_FP32
    assert (out.name, out.data_type, list(out.dims)) == ("output", 11, [10])
    (group,) = config.instance_group
    assert (group.count, group.kind) == (2, 2)  # KIND_CPU
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4, 8]
    assert config.optimization.input_pinned_memory.enable
    assert config.optimization.output_pinned_memory.enable
    # 2 server CPUs shared by 2 instances: one ONNX Runtime thread each.
    threads = {k: v.string_value for k, v in config.parameters.items()}
    assert threads == {"intra_op_thread_count": "1", "inter_op_thread_count": "1"}


def test_a_failed_publication_is_never_counted_and_the_next_repair_removes_it(
    published: dict[str, Any], tmp_path: Path
) -> None:
    """A file that cannot be written (here: under a name that is a file) ends the
    publication before its marker: the version never counts, and what it wrote goes at
    the next repair (every export and prune starts with one)."""
    storage = copy_storage(published["storage"], tmp_path / "s")
    unwritable = {"model.onnx": b"onnx", "model.onnx/extra": b""}
    repo = repository(storage)
    before = snapshot(storage / "models" / NAME)
    with repo.lock.held("export"), pytest.raises(OSError):
        repo.publish(repo.config_text(), unwritable, {"run_id": "x"})
    scan = repo.scan()
    assert scan.servable == [1, 2] and scan.versions[3].state == LEFTOVER
    with repo.lock.held("prune"):
        assert repo.repair().versions[3].state == GONE
    after = snapshot(storage / "models" / NAME)
    assert {k: v for k, v in after.items() if not k.startswith(".export")} == {
        k: v for k, v in before.items() if not k.startswith(".export")
    }

    fresh = repository(storage, "fresh")
    config = tritonconfig.render_config(tritonconfig.TritonConfig(name="fresh"))
    with fresh.lock.held("export"), pytest.raises(OSError):
        fresh.publish(config, unwritable, {"run_id": "x"})
    with fresh.lock.held("prune"):
        assert {n: v.state for n, v in fresh.repair().versions.items()} == {1: GONE}
    assert not (storage / "models" / "fresh" / "1").exists()


def test_config_options_override_each_value() -> None:
    cfg = tritonconfig.TritonConfig(
        name="digits",
        max_batch_size=32,
        instance_count=4,
        preferred_batch_sizes=(8, 16),
        pinned_memory=False,
    )
    config = tritonconfig.parse_config(tritonconfig.render_config(cfg))
    assert (config.name, config.max_batch_size, config.instance_group[0].count) == ("digits", 32, 4)
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert not config.HasField("optimization")
    with pytest.raises(UsageError, match="preferred batch sizes"):
        tritonconfig.TritonConfig(preferred_batch_sizes=(32,))


@pytest.mark.parametrize(
    ("server_cpus", "instances", "threads"), [(2, 2, 1), (8, 2, 4), (7, 2, 3), (2, 4, 1), (1, 1, 1)]
)
def test_onnxruntime_threads_share_the_server_cpus_between_instances(
    server_cpus: int, instances: int, threads: int
) -> None:
    cfg = tritonconfig.TritonConfig(server_cpus=server_cpus, instance_count=instances)
    config = tritonconfig.parse_config(tritonconfig.render_config(cfg))
    assert config.parameters["intra_op_thread_count"].string_value == str(threads)
    assert config.parameters["inter_op_thread_count"].string_value == "1"


def test_server_cpus_comes_from_the_environment(tmp_path: Path) -> None:
    result = cli("export", "--help")
    assert "--server-cpus" in result.stdout and "MNIST_PIPELINE_SERVER_CPUS" in result.stdout
    refused = cli("export", "--storage", tmp_path, check=2, env={"MNIST_PIPELINE_SERVER_CPUS": "0"})
    assert "server-cpus" in refused.stderr


def test_instance_kind_gpu_writes_kind_gpu_groups(tmp_path: Path) -> None:
    cfg = tritonconfig.TritonConfig(instance_kind="gpu")
    (group,) = tritonconfig.parse_config(tritonconfig.render_config(cfg)).instance_group
    assert group.kind == 1  # KIND_GPU
    with pytest.raises(UsageError, match="--instance-kind 'tpu': one of cpu, gpu"):
        tritonconfig.TritonConfig(instance_kind="tpu")
    result = cli("export", "--help")
    assert "MNIST_PIPELINE_INSTANCE_KIND" in result.stdout
    env = {"MNIST_PIPELINE_INSTANCE_KIND": "tpu"}
    result = cli("export", "--storage", "/nonexistent", check=2, env=env)
    assert "instance-kind" in result.stderr
    # A valid kind gets through to the stage (which finds no run to export).
    result = cli("export", "--storage", tmp_path, "--instance-kind", "gpu", check=2)
    assert "Traceback" not in result.stderr


def test_onnx_model_fits_the_triton_image(published: dict[str, Any]) -> None:
    path = published["storage"] / "models" / NAME / "2" / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    assert opsets == {"ai.onnx": export.OPSET}  # standard ops only: no runtime-specific ones
    assert export.OPSET <= export.TRITON_MAX_OPSET
    assert model.ir_version <= export.TRITON_MAX_IR_VERSION
    assert not any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
    )  # one self-contained file
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"BatchNormalization", "Identity"}  # folded / removed by optimisation
    (inp,), (out,) = model.graph.input, model.graph.output
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert inp.name == "input" and isinstance(in_dims[0], str) and in_dims[1:] == [1, 28, 28]
    assert out.name == "output" and isinstance(out_dims[0], str) and out_dims[1:] == [10]
    assert (
        inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 16):
        x = np.zeros((batch, 1, 28, 28), np.float32)
        assert session.run(["output"], {"input": x})[0].shape == (batch, 10)


def test_parity_check_catches_a_tampered_model(published: dict[str, Any]) -> None:
    storage = published["storage"]
    candidate = export.load_candidate(storage / "checkpoints" / published["high"] / "model.pth")
    images, _ = data.load(storage, "test")
    inputs = data.normalize(images[: export.PARITY_SAMPLES])
    model = onnx.load(str(storage / "models" / NAME / "2" / "model.onnx"))
    assert export.check_parity(model.SerializeToString(), candidate.net, inputs) <= 1e-4

    bias = next(t for t in model.graph.initializer if len(t.dims) == 1 and t.dims[0] == 10)
    tampered = numpy_helper.to_array(bias).copy()
    tampered[3] += 1e-3  # small enough to keep most predictions, far beyond the tolerance
    bias.CopyFrom(numpy_helper.from_array(tampered, bias.name))
    with pytest.raises(PipelineFailure, match="parity check failed"):
        export.check_parity(model.SerializeToString(), candidate.net, inputs)

    tampered[3] = np.nan
    bias.CopyFrom(numpy_helper.from_array(tampered, bias.name))
    with pytest.raises(PipelineFailure, match="parity check failed"):
        export.check_parity(model.SerializeToString(), candidate.net, inputs)


def test_failed_parity_publishes_nothing(published: dict[str, Any], tmp_path: Path) -> None:
    storage = copy_storage(published["storage"], tmp_path / "s")
    source = storage / "checkpoints" / published["high"]
    run = storage / "checkpoints" / "huge"
    run.mkdir()
    # Logits around 1e7, where float32 rounding alone separates the two runtimes by far
    # more than 1e-4: a real model that onnxruntime cannot serve faithfully.
    payload = torch.load(source / "model.pth", weights_only=True)
    payload["state_dict"]["fc.weight"] *= 1e6
    payload["state_dict"]["fc.bias"] *= 1e6
    payload["test_accuracy"] = 0.999
    torch.save(payload, run / "model.pth")
    metrics = json.loads((source / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "run_id": "huge"}))
    before = published_state(storage / "models")
    link_before = os.readlink(storage / "checkpoints" / "best_model.pth")

    result = cli("export", "--storage", storage, "--run-id", "huge", check=1)
    assert "parity check failed" in result.stderr
    assert published_state(storage / "models") == before
    assert os.readlink(storage / "checkpoints" / "best_model.pth") == link_before
    assert marker(storage, "huge")["status"] == "failed"
    assert "parity" in marker(storage, "huge")["reason"]


def test_corrupt_checkpoint_is_refused_and_repository_untouched(
    published: dict[str, Any], tmp_path: Path
) -> None:
    storage = copy_storage(published["storage"], tmp_path / "s")
    run = storage / "checkpoints" / "corrupt"
    shutil.copytree(storage / "checkpoints" / published["high"], run)
    (run / "model.pth").unlink()
    (run / "model.pth").write_bytes(os.urandom(4096))
    before = published_state(storage / "models")

    result = cli("export", "--storage", storage, "--run-id", "corrupt", check=2)
    assert "cannot load checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    assert published_state(storage / "models") == before
    # Recorded, so that the chart's `wait export` fails now instead of at its timeout.
    record = marker(storage, "corrupt")
    assert [a["status"] for a in record["history"]] == ["failed"]
    assert record["reason"].startswith("cannot load checkpoint")


class RunsCode:
    """What a hostile checkpoint holds: unpickling it would run a command."""

    def __init__(self, witness: Path) -> None:
        self.witness = witness

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.witness}",))


def test_malicious_pickle_is_refused_without_running_it(
    published: dict[str, Any], tmp_path: Path
) -> None:
    witness = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"arch": "resnet18", "state_dict": RunsCode(witness)}, evil)
    before = snapshot(published["storage"] / "models")

    result = cli("export", "--storage", published["storage"], "--checkpoint", evil, check=2)
    assert "not a weights-only PyTorch checkpoint" in result.stderr
    assert "weights_only=False" not in result.stderr  # torch's advice to load it unsafely
    assert not witness.exists()
    assert snapshot(published["storage"] / "models") == before


def test_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    wrong_arch = tmp_path / "wrong_arch.pth"
    torch.save({"arch": "resnet50", "state_dict": {}}, wrong_arch)
    wrong_weights = tmp_path / "wrong_weights.pth"
    torch.save(
        {
            "arch": "resnet18",
            "in_channels": 1,
            "num_classes": 10,
            "state_dict": {"fc.weight": torch.zeros(3, 3)},
        },
        wrong_weights,
    )
    plain_tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), plain_tensor)
    for path in (wrong_arch, wrong_weights, plain_tensor):
        with pytest.raises(UsageError, match=str(path)):
            export.load_candidate(path)


@pytest.mark.parametrize(("channels", "classes"), [(3, 10), (1, 11)])
def test_a_checkpoint_the_served_contract_cannot_take_is_refused(
    published: dict[str, Any], tmp_path: Path, channels: int, classes: int
) -> None:
    """11 classes would pass the gate on its first ten and then stop Triton at load; 3
    channels used to reach torch.export and print pages of its error."""
    odd = tmp_path / "odd.pth"
    payload = checkpoint_payload(build(channels, classes), test_accuracy=0.999)
    torch.save(payload, odd)
    before = snapshot(published["storage"] / "models")

    result = cli("export", "--storage", published["storage"], "--checkpoint", odd, check=2)
    assert f"checkpoint {odd}: {channels} input channel(s) and {classes} classes; the " in (
        result.stderr
    )
    assert "serves input [1, 28, 28] and output [10] (config.pbtxt): nothing published" in (
        result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(published["storage"] / "models") == before


def test_a_graph_that_differs_from_config_pbtxt_is_refused() -> None:
    """The last line of defence, on the exported graph itself: names, types and dims."""
    cfg = tritonconfig.TritonConfig()
    export.check_contract(onnx.load_from_string(export.to_onnx(build()).content), cfg)
    wider = onnx.load_from_string(export.to_onnx(build(1, 11)).content)
    with pytest.raises(
        UsageError,
        match=r"outputs are 'output' FP32 \[-1, 11\]; config.pbtxt "
        r"declares 'output' FP32 \[-1, 10\]: nothing published",
    ):
        export.check_contract(wider, cfg)
    renamed = onnx.load_from_string(export.to_onnx(build()).content)
    renamed.graph.input[0].name = "images"
    with pytest.raises(UsageError, match=r"inputs are 'images' FP32 \[-1, 1, 28, 28\]"):
        export.check_contract(renamed, cfg)


def test_a_file_that_is_no_checkpoint_at_all_is_named_as_such(tmp_path: Path) -> None:
    """torch's own errors for such bytes were "101" or "list index out of range"."""
    for name, content in (
        ("text.pth", b"hello\n"),
        ("empty.pth", b""),
        ("passwd.pth", b"root:x:0:0:root:/root:/bin/bash\n"),
    ):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(UsageError, match="not a PyTorch checkpoint"):
            export.load_candidate(path)


def test_no_completed_run_is_a_usage_error(tmp_path: Path) -> None:
    running = tmp_path / "checkpoints" / "busy"
    running.mkdir(parents=True)
    (running / "metrics.json").write_text(json.dumps({"status": "running"}))
    result = cli("export", "--storage", tmp_path, check=2)
    assert "no completed training run" in result.stderr
    assert not (tmp_path / "models").exists()


def test_default_is_the_newest_completed_run(tmp_path: Path) -> None:
    runs = {
        "old": ("complete", "2026-01-01T10:00:00+00:00"),
        "new": ("complete", "2026-01-02T09:00:00+00:00"),
        "newer_but_failed": ("failed", "2026-01-03T09:00:00+00:00"),
        "newest but no run id": ("complete", "2026-01-04T09:00:00+00:00"),
    }
    for run_id, (status, finished_at) in runs.items():
        (tmp_path / "checkpoints" / run_id).mkdir(parents=True)
        (tmp_path / "checkpoints" / run_id / "metrics.json").write_text(
            json.dumps({"status": status, "finished_at": finished_at})
        )
    assert export.newest_completed_run(tmp_path) == "new"


def test_concurrent_exports_never_share_a_version(trained: dict[str, Any], tmp_path: Path) -> None:
    storage = copy_storage(trained["storage"], tmp_path / "s")
    procs = [
        cli_background("export", "--storage", storage, "--run-id", run_id)
        for run_id in (trained["low"], trained["high"])
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err

    outcomes = [marker(storage, run_id) for run_id in (trained["low"], trained["high"])]
    published_versions = sorted(o["version"] for o in outcomes if o["status"] == "published")
    model_path = storage / "models" / NAME
    scan = repository(storage).scan()
    assert scan.servable == published_versions
    assert published_versions in ([1], [1, 2])
    for version in published_versions:
        meta = json.loads((model_path / str(version) / "metadata.json").read_text())
        assert (
            meta["sha256"]
            == hashlib.sha256((model_path / str(version) / "model.onnx").read_bytes()).hexdigest()
        )
    # Whatever the order, the high-accuracy run ends up served.
    assert scan.champion is not None and scan.champion.run_id == trained["high"]
    assert repository(storage).lock.holder_now() is None


def test_the_publication_is_recorded_while_the_repository_lock_is_held(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    """A second export of the same run waits on the lock, then skips as identical and
    extends the run's record: the publication must already be in it by then, or the two
    read-modify-writes race and the record that was to stay says "skipped"."""
    storage = copy_storage(trained["storage"], tmp_path / "s")
    run_id = trained["low"]
    args = ["export", f"--storage={storage}", f"--run-id={run_id}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_pipeline", *args],
        stderr=subprocess.PIPE,
        text=True,
    )
    # Reaped as soon as it exits: a dead holder is then seen as gone at once (a zombie
    # would hold the lock until its lease ends).
    ended: dict[str, str] = {}
    reaper = threading.Thread(target=lambda: ended.update(err=proc.communicate()[1]))
    reaper.start()
    repo = repository(storage)
    record: dict[str, Any] | None = None
    # Take the lock each time the export lets go of it, as a waiting export would.
    while reaper.is_alive():
        with repo.lock.held("export"):
            if repo.scan().servable:
                record = repo.read_record(run_id)
                break
        time.sleep(0.01)  # let the export take it first
    reaper.join(timeout=300)
    assert proc.returncode == 0, ended["err"][-3000:]
    assert record is not None and record["status"] == "published", record


def shifted_copy(storage: Path, source_run: str, run_id: str, reported: float) -> Path:
    """A run whose model differs from `source_run`'s in weights but predicts exactly the
    same (every class bias moved by one constant), with a training-reported accuracy of
    `reported`, as a run evaluated on a small --limit-test subset can report."""
    source = storage / "checkpoints" / source_run
    run = storage / "checkpoints" / run_id
    run.mkdir()
    payload = torch.load(source / "model.pth", weights_only=True)
    payload["state_dict"]["fc.bias"] += 0.5
    payload["test_accuracy"] = reported
    payload["run_id"] = run_id
    torch.save(payload, run / "model.pth")
    metrics = json.loads((source / "metrics.json").read_text())
    (run / "metrics.json").write_text(
        json.dumps({**metrics, "run_id": run_id, "test_accuracy": reported})
    )
    return run


def test_gate_compares_accuracy_measured_on_the_full_test_set(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    """A run reporting 0.99 on a 100-image subset must not beat a champion
    whose predictions it shares: export measures both on all 10000 images."""
    storage = copy_storage(trained["storage"], tmp_path / "s")
    cli("export", "--storage", storage, "--run-id", trained["low"])
    shifted_copy(storage, trained["low"], "subset", reported=0.99)
    before = published_state(storage / "models")

    result = cli("export", "--storage", storage, "--run-id", "subset")
    assert published_state(storage / "models") == before
    outcome = marker(storage, "subset")
    assert outcome["status"] == "skipped", result.stderr
    assert outcome["accuracy"] == outcome["champion_accuracy"] != 0.99
    assert "both on all 10000 test images" in outcome["reason"]


def test_the_same_weights_are_never_published_twice(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    """The same model under another run id, claiming a higher accuracy: still the same model."""
    storage = copy_storage(trained["storage"], tmp_path / "s")
    cli("export", "--storage", storage, "--run-id", trained["low"])
    payload = torch.load(storage / "checkpoints" / trained["low"] / "model.pth", weights_only=True)
    payload["test_accuracy"] = 0.999
    copy = tmp_path / "copy.pth"
    torch.save(payload, copy)
    before = published_state(storage / "models")

    result = cli("export", "--storage", storage, "--checkpoint", copy)
    assert "identical to the published version 1" in result.stderr
    assert published_state(storage / "models") == before


def test_export_names_a_missing_or_unfinished_run(trained: dict[str, Any], tmp_path: Path) -> None:
    storage = copy_storage(trained["storage"], tmp_path / "s")
    low = trained["low"]
    result = cli("export", "--storage", storage, "--run-id", low[:-1] + "x", check=2)
    assert f"training run {low[:-1]}x does not exist" in result.stderr
    assert f"nearest: {low}" in result.stderr
    assert "Errno" not in result.stderr

    metrics_path = storage / "checkpoints" / low / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics_path.write_text(json.dumps({**metrics, "status": "running"}))
    result = cli("export", "--storage", storage, "--run-id", low, check=2)
    assert f"resume it by running the same `mnist-pipeline train --run-id {low}`" in result.stderr


def test_a_file_that_is_not_a_checkpoint_gets_no_unsafe_advice(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    log = trained["storage"] / "checkpoints" / trained["low"] / "train.log"
    result = cli("export", "--storage", tmp_path, "--checkpoint", log, check=2)
    assert f"cannot load checkpoint {log}: not a weights-only PyTorch checkpoint" in result.stderr
    assert "weights_only" not in result.stderr


# INT8 ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8(quantisable: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run exported int8 first, then fp32 and int8 again: one checkpoint, two models."""
    storage = copy_storage(quantisable.storage, tmp_path_factory.mktemp("int8") / "s")
    run = quantisable.run_id
    first = cli("export", "--storage", storage, "--run-id", run, "--precision", "int8")
    meta = json.loads((storage / "models" / NAME / "1" / "metadata.json").read_text())
    fp32 = cli(
        "export", "--storage", storage, "--run-id", run, env={"MNIST_PIPELINE_PRECISION": "fp32"}
    )
    fp32_marker = marker(storage, run)["history"][-1]
    before = published_state(storage / "models")
    again = cli(
        "export", "--storage", storage, "--run-id", run, env={"MNIST_PIPELINE_PRECISION": "int8"}
    )
    return {
        "storage": storage,
        "run": run,
        "first": first,
        "meta": meta,
        "fp32": fp32,
        "fp32_marker": fp32_marker,
        "again": again,
        "again_unchanged": published_state(storage / "models") == before,
    }


def test_int8_export_publishes_a_quantised_model_triton_can_load(int8: dict[str, Any]) -> None:
    path = int8["storage"] / "models" / NAME / "1" / "model.onnx"
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import} == {
        "ai.onnx": export.OPSET
    }
    assert model.ir_version <= export.TRITON_MAX_IR_VERSION
    weights = [
        numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8
    ]
    assert len(weights) >= 20  # every Conv and the Gemm: int8 weights
    assert path.stat().st_size < 16 * 2**20  # about a quarter of the fp32 model's 45 MB


def test_int8_metadata_records_precision_calibration_and_the_fp32_reference(
    int8: dict[str, Any], quantisable: TrainedRun
) -> None:
    meta = int8["meta"]
    assert meta["precision"] == "int8"
    assert meta["calibration"] == {
        "images": quantize.CALIBRATION_IMAGES,
        "source": quantize.CALIBRATION_SOURCE,
    }
    assert "train" in meta["calibration"]["source"]
    # Measured like any candidate, on all 10000 test images, within 0.1 pp of its fp32 export.
    assert meta["evaluation"]["images"] == 10_000
    assert meta["fp32_accuracy"] == pytest.approx(quantisable.accuracy, abs=2e-3)
    assert meta["fp32_accuracy"] - meta["accuracy"] <= export.MAX_INT8_ACCURACY_LOSS + 1e-9
    parity = meta["int8_parity"]
    assert parity["samples"] == export.PARITY_SAMPLES
    assert quantize.MIN_TOP1_AGREEMENT <= parity["top1_agreement"] <= 1
    assert 0 < parity["max_abs_logit_diff"] < 5
    assert 0 <= meta["parity_max_abs_diff"] <= export.PARITY_TOLERANCE  # the fp32 export's
    session = ort.InferenceSession(
        str(int8["storage"] / "models" / NAME / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    images, labels = data.load(int8["storage"], "test")
    logits = session.run(["output"], {"input": data.normalize(images)})[0]
    assert (logits.argmax(1) == labels).mean() == meta["accuracy"]


def test_fp32_and_int8_of_one_checkpoint_are_different_models(int8: dict[str, Any]) -> None:
    """An int8 version does not make the fp32 export of its checkpoint "identical" (nor the
    reverse): the fp32 model goes through the gate, and is published only if it is better."""
    assert int8["first"].returncode == int8["fp32"].returncode == 0
    attempt = int8["fp32_marker"]
    assert "identical" not in attempt["reason"]
    if attempt["status"] == "skipped":
        assert "(fp32) does not beat the published version 1's" in attempt["reason"]
        assert "(int8)" in attempt["reason"]
    else:
        assert attempt["status"] == "published" and attempt["version"] == 2
        meta = json.loads((int8["storage"] / "models" / NAME / "2" / "metadata.json").read_text())
        assert meta["precision"] == "fp32"
    # The same precision of the same checkpoint again: that one is identical.
    assert int8["again_unchanged"]
    assert "identical to the published version 1" in int8["again"].stderr


def test_an_fp32_version_does_not_hide_the_int8_export_of_its_checkpoint(
    quantisable: TrainedRun, tmp_path: Path
) -> None:
    storage = copy_storage(quantisable.storage, tmp_path / "s")
    run = quantisable.run_id
    cli("export", "--storage", storage, "--run-id", run)  # fp32, version 1
    result = cli("export", "--storage", storage, "--run-id", run, "--precision", "int8")
    attempt = marker(storage, run)["history"][-1]
    assert "identical" not in attempt["reason"], result.stderr
    assert attempt["status"] in ("published", "skipped")


def test_quantisation_is_deterministic_and_calibrates_on_training_images(
    int8: dict[str, Any],
) -> None:
    storage = int8["storage"]
    calibration = quantize.calibration_images(storage)
    train, _ = data.load(storage, "train")
    assert calibration.shape == (quantize.CALIBRATION_IMAGES, 1, 28, 28)
    assert np.array_equal(
        calibration[1],
        data.normalize(train[quantize.CALIBRATION_STRIDE : quantize.CALIBRATION_STRIDE + 1])[0],
    )
    fp32 = export.to_onnx(
        export.load_candidate(storage / "checkpoints" / int8["run"] / "model.pth").net
    )
    assert quantize.quantize(fp32.content, calibration) == quantize.quantize(
        fp32.content, quantize.calibration_images(storage)
    )


def test_an_int8_model_losing_accuracy_is_refused(quantisable: TrainedRun, tmp_path: Path) -> None:
    """A real model that quantises badly: one channel of the last residual block scaled up
    1000-fold (and the classifier's weights for it down), so the fp32 model predicts as
    before but that channel's range leaves int8 no resolution for the other 511."""
    storage = copy_storage(quantisable.storage, tmp_path / "s")
    source = storage / "checkpoints" / quantisable.run_id
    run = storage / "checkpoints" / "outlier"
    run.mkdir()
    payload = torch.load(source / "model.pth", weights_only=True)
    weights = payload["state_dict"]
    weights["layer4.1.bn2.weight"][0] *= 1000
    weights["layer4.1.bn2.bias"][0] *= 1000
    weights["fc.weight"][:, 0] /= 1000
    payload["run_id"] = "outlier"
    torch.save(payload, run / "model.pth")
    metrics = json.loads((source / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "run_id": "outlier"}))

    result = cli(
        "export", "--storage", storage, "--run-id", "outlier", "--precision", "int8", check=1
    )
    message = "int8 model refused: accuracy 0."
    assert (
        message in result.stderr and "for the fp32 export of the same checkpoint" in result.stderr
    )
    assert "loses more than 0.1 percentage point" in result.stderr
    assert repository(storage).scan().versions == {}
    record = marker(storage, "outlier")
    assert record["status"] == "failed" and "int8 model refused" in record["reason"]


def test_a_model_below_the_publishing_floor_is_never_published(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    """A model that learnt too little (a broken recipe, a tiny run) fails its export, so
    `run` and the chart stop there instead of serving it; the floor's default is 0.5."""
    storage = tmp_path / "storage"
    shutil.copytree(trained["storage"], storage, symlinks=True)
    floor = {"MNIST_PIPELINE_PUBLISH_MIN_ACCURACY": "0.999"}
    result = cli("export", "--storage", storage, "--run-id", "r256", env=floor, check=1)
    (error,) = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert "is below the publishing floor 0.999 (--publish-min-accuracy)" in error
    assert marker(storage, "r256")["status"] == "failed"
    assert repository(storage).scan().versions == {}
    assert PUBLISH_MIN_ACCURACY.default == 0.5


@pytest.mark.parametrize("value", ["1", "5", "-0.1"])
def test_a_min_improvement_no_accuracy_could_clear_is_refused(tmp_path: Path, value: str) -> None:
    result = cli("export", "--storage", tmp_path, "--min-improvement", value, check=2)
    assert "--min-improvement" in result.stderr
