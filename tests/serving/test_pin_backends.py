"""What `pin` writes for each kind of Triton: the exported config for NVIDIA's images
(onnxruntime), the same model through the project's model.py for the python backend of
the nvidia-pytriton wheel and the project's CPU image; and the wheel's server assembled."""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest

from harness.pipeline import MODEL, PipelineRun, cli, snapshot
from mnist_pipeline import tritonconfig
from mnist_pipeline.serve import wheel_server

# What pin sets for the server it writes for; every other field stays as exported.
SERVER_FIELDS = ("platform", "backend", "instance_group", "parameters", "version_policy")


def pin(pipeline: PipelineRun, out: Path, *more: str) -> Path:
    args = ("pin", "--storage", pipeline.storage, "--served-repository", out, *more)
    cli(*args, check=True)
    return out / MODEL


def without_server_fields(config: object) -> str:
    copy = type(config)()  # type: ignore[operator]
    copy.CopyFrom(config)
    for field in SERVER_FIELDS:
        copy.ClearField(field)
    return str(copy)


@pytest.mark.parametrize("backend", ["onnxruntime", "python"])
def test_pin_writes_the_exported_config_for_the_backend_and_checked_links(
    pipeline: PipelineRun, tmp_path: Path, backend: str
) -> None:
    served = pin(pipeline, tmp_path / "served", f"--triton-backend={backend}")
    published = pipeline.storage / "models" / MODEL
    exported = tritonconfig.parse_config((published / "config.pbtxt").read_text())
    written = tritonconfig.parse_config((served / "config.pbtxt").read_text())
    assert without_server_fields(written) == without_server_fields(exported)
    assert list(written.version_policy.specific.versions) == [1]
    if backend == "python":
        assert (written.platform, written.backend) == ("", "python")
    else:
        assert (written.platform, written.backend) == ("onnxruntime_onnx", "")
    files = sorted(p.name for p in (served / "1").iterdir())
    assert files == sorted(["metadata.json", "model.onnx", *(["model.py"] * (backend == "python"))])
    for name in ("model.onnx", "metadata.json"):
        link = served / "1" / name
        assert os.path.isabs(os.readlink(link)) and link.resolve() == published / "1" / name


def test_pin_with_a_relative_storage_writes_links_that_resolve_anywhere(
    pipeline: PipelineRun, tmp_path: Path
) -> None:
    relative = os.path.relpath(pipeline.storage, tmp_path)
    result = cli(
        "pin", "--storage", relative, "--served-repository", "served",
        "--triton-backend", "python", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "served" / MODEL / "1" / "model.onnx").resolve().is_file()


def test_the_python_backend_runs_on_the_cpu_only(pipeline: PipelineRun, tmp_path: Path) -> None:
    args = ("pin", "--storage", pipeline.storage, "--served-repository", tmp_path / "served")
    result = cli(*args, "--triton-backend", "python", "--instance-kind", "gpu")
    assert result.returncode == 2, result.stderr
    assert "--instance-kind gpu needs --triton-backend onnxruntime (NVIDIA" in result.stderr
    assert not (tmp_path / "served" / MODEL / "1").exists()


def test_the_wheel_server_gets_its_python_backend_and_libraries(tmp_path: Path) -> None:
    command, env = wheel_server(tmp_path / "backends")
    assert command[0].endswith("pytriton/tritonserver/bin/tritonserver")
    assert command[1] == f"--backend-directory={(tmp_path / 'backends').resolve()}"
    backend = tmp_path / "backends" / "python"
    names = {"libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"}
    assert {p.name for p in backend.iterdir()} == names
    stub = (backend / "triton_python_backend_stub").resolve()
    assert stub.parent.name == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == sysconfig.get_config_var("LIBDIR")
    assert any(Path(p, "onnxruntime").is_dir() for p in env["PYTHONPATH"].split(os.pathsep))
    again, _ = wheel_server(tmp_path / "backends")  # re-runnable over its own links
    assert again == command


@pytest.mark.parametrize("inside", ["", "resnet18_mnist", "served"])
def test_a_served_repository_inside_the_model_repository_is_refused(
    pipeline: PipelineRun, tmp_path: Path, inside: str
) -> None:
    """It would rewrite the exported config.pbtxt and leave files Triton takes for models."""
    models = tmp_path / "models"
    shutil.copytree(pipeline.storage / "models", models)
    before = snapshot(models)
    out = models / inside if inside else models
    result = cli("pin", "--storage", pipeline.storage, "--model-repository", models,
                 "--served-repository", out)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"--served-repository {out} is inside the model repository {models}" in result.stderr
    assert snapshot(models) == before
