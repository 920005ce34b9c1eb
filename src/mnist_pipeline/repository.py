"""The Triton model repository: layout, config.pbtxt, versions, and safe publication.

    models/<name>/config.pbtxt
    models/<name>/<version>/{model.onnx,metadata.json}

Triton may be reading the repository at any moment, so nothing in it is ever half
written. A new version is built in a folder whose name Triton ignores (it only
loads all-digit folder names as versions) and renamed into place; the very first
publication builds the whole model folder outside the repository and renames it in,
because a model folder without a version would stop Triton from starting.
Concurrent exports serialise on a lock file. The lock and that first staging folder
live in STORAGE/.export/<name>/, outside the repository, where Triton would take any
folder for a model.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnist_pipeline import settings
from mnist_pipeline.storage import (
    PipelineFailure,
    UsageError,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    models_dir,
    naming,
    read_json,
    validate_name,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "resnet18_mnist"
PLATFORM = "onnxruntime_onnx"
MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
CONFIG_FILE = "config.pbtxt"
STAGING_PREFIX = ".staging-"
# export --instance-kind → config.pbtxt instance_group kind.
INSTANCE_KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}


@dataclass(frozen=True)
class TritonConfig:
    """What config.pbtxt says; the defaults are the original deployment's values."""

    name: str = settings.MODEL_NAME.field()
    max_batch_size: int = settings.MAX_BATCH_SIZE.field()
    instance_count: int = settings.INSTANCE_COUNT.field()
    instance_kind: str = "KIND_CPU"  # Triton's name of --instance-kind's choice
    preferred_batch_sizes: tuple[int, ...] = settings.PREFERRED_BATCH_SIZES.field()
    pinned_memory: bool = settings.PINNED_MEMORY.field()
    input_name: str = "input"
    input_dims: tuple[int, ...] = (1, 28, 28)
    output_name: str = "output"
    output_dims: tuple[int, ...] = (10,)
    # The CPUs the server gets (the chart's Triton CPU limit): shared out between the
    # instances as ONNX Runtime threads, so that concurrent batches do not oversubscribe.
    server_cpus: int = settings.SERVER_CPUS.field()

    @property
    def intra_op_threads(self) -> int:
        return max(1, self.server_cpus // self.instance_count)

    def validate(self) -> None:
        try:
            validate_name(self.name, "model name")
        except UsageError as e:
            raise ValueError(str(e)) from None
        if self.max_batch_size < 1:
            raise ValueError("max batch size must be at least 1")
        if self.instance_count < 1:
            raise ValueError("instance count must be at least 1")
        if self.server_cpus < 1:
            raise ValueError("server CPUs must be at least 1")
        if self.instance_kind not in INSTANCE_KINDS.values():
            raise ValueError(f"instance kind {self.instance_kind!r}: one of {INSTANCE_KINDS}")
        too_big = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if too_big:
            raise ValueError(
                f"preferred batch sizes {too_big} are outside "
                f"1..max batch size {self.max_batch_size}"
            )


def render_config(cfg: TritonConfig) -> str:
    """config.pbtxt in protobuf text format (dims exclude the batch dimension)."""
    cfg.validate()

    def dims(d: Sequence[int]) -> str:
        return ", ".join(str(x) for x in d)

    text = f"""name: "{cfg.name}"
platform: "{PLATFORM}"
max_batch_size: {cfg.max_batch_size}
input [
  {{
    name: "{cfg.input_name}"
    data_type: TYPE_FP32
    dims: [ {dims(cfg.input_dims)} ]
  }}
]
output [
  {{
    name: "{cfg.output_name}"
    data_type: TYPE_FP32
    dims: [ {dims(cfg.output_dims)} ]
  }}
]
instance_group [
  {{
    count: {cfg.instance_count}
    kind: {cfg.instance_kind}
  }}
]
"""
    if cfg.preferred_batch_sizes:
        text += f"""dynamic_batching {{
  preferred_batch_size: [ {dims(cfg.preferred_batch_sizes)} ]
}}
"""
    else:
        text += "dynamic_batching { }\n"
    if cfg.pinned_memory:
        text += """optimization {
  input_pinned_memory { enable: true }
  output_pinned_memory { enable: true }
}
"""
    # Read by Triton's onnxruntime backend; without them every instance starts one thread
    # per core of the node.
    text += f"""parameters {{
  key: "intra_op_thread_count"
  value {{ string_value: "{cfg.intra_op_threads}" }}
}}
parameters {{
  key: "inter_op_thread_count"
  value {{ string_value: "1" }}
}}
"""
    return text


def parse_config(text: str) -> Any:
    """Parse config.pbtxt with Triton's own ModelConfig message (from tritonclient)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def model_dir(storage: Path, name: str) -> Path:
    return models_dir(storage) / name


def versions(model_path: Path) -> list[int]:
    """The version numbers Triton would load from a model folder, ascending."""
    if not model_path.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_path.iterdir()
        if p.is_dir() and p.name.isdigit() and not p.name.startswith("0")
    )


@dataclass(frozen=True)
class Champion:
    version: int
    accuracy: float
    metadata: dict[str, Any]


def champion(model_path: Path) -> Champion | None:
    """The newest published version and its accuracy: what a candidate has to beat."""
    found = versions(model_path)
    if not found:
        return None
    newest = found[-1]
    meta_path = model_path / str(newest) / METADATA_FILE
    try:
        meta = read_json(meta_path)
        accuracy = float(meta["accuracy"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        # Never guess: overwriting the served model because its record is unreadable
        # could replace a better model with a worse one.
        raise PipelineFailure(
            f"cannot read the served model's accuracy from {meta_path}: {e}"
        ) from e
    return Champion(newest, accuracy, meta)


def work_dir(storage: Path, name: str) -> Path:
    """Where a model's lock and first-publication staging live: beside the repository,
    not in it, since Triton treats every folder in the repository as a model."""
    return storage / ".export" / name


@contextlib.contextmanager
def locked(storage: Path, name: str) -> Iterator[None]:
    """Hold the model's exclusive export lock (released by the kernel if the process dies)."""
    work = work_dir(storage, name)
    work.mkdir(parents=True, exist_ok=True)
    # Opened for writing: on NFS volumes flock is emulated with POSIX locks, which need it.
    with open(work / "lock", "a") as lock_file:
        log.debug("waiting for the export lock of %s", name)
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def clean_stale(storage: Path, name: str) -> None:
    """Remove staging folders a crashed export left; call only while holding the lock."""
    model_path = model_dir(storage, name)
    stale = [p for p in model_path.glob(f"{STAGING_PREFIX}*") if p.is_dir()]
    stale += [p for p in work_dir(storage, name).glob(f"{STAGING_PREFIX}*") if p.is_dir()]
    for path in stale:
        log.warning("removing %s, left by an interrupted export", path)
        shutil.rmtree(path)


def _fill_version(folder: Path, files: dict[str, bytes], metadata: dict[str, Any]) -> None:
    for filename, content in files.items():
        with naming(folder / filename), open(folder / filename, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
    atomic_write_json(folder / METADATA_FILE, metadata)
    fsync_dir(folder)


def _staging(parent: Path, prefix: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(path, 0o755)  # mkdtemp's 0700 would hide the model from Triton running as another user
    return path


def publish(
    storage: Path, cfg: TritonConfig, files: dict[str, bytes], metadata: dict[str, Any]
) -> int:
    """Add a version holding `files` and metadata.json; return its number.

    Call while holding `locked(storage, cfg.name)`: the version number is chosen here.
    """
    model_path = model_dir(storage, cfg.name)
    version = (versions(model_path) or [0])[-1] + 1
    metadata = {**metadata, "version": version}
    config_text = render_config(cfg)

    if model_path.is_dir():
        staging = _staging(model_path, STAGING_PREFIX)
        try:
            _fill_version(staging, files, metadata)
            # The config goes first: options may change (batch sizes), the tensors never do,
            # so the version being served keeps working with it.
            atomic_write_text(model_path / CONFIG_FILE, config_text)
            os.rename(staging, model_path / str(version))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(model_path)
    else:
        staging = _staging(work_dir(storage, cfg.name), STAGING_PREFIX)
        try:
            (staging / str(version)).mkdir(mode=0o755)
            _fill_version(staging / str(version), files, metadata)
            atomic_write_text(staging / CONFIG_FILE, config_text)
            models_dir(storage).mkdir(parents=True, exist_ok=True)
            os.rename(staging, model_path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(models_dir(storage))
    return version


def resolve_served_version(storage: Path, name: str, wanted: str, run_id: str | None) -> int:
    """The version a Triton pod serves: "run" the one RUN_ID's export chose (the newest
    without a run, as in serve-only mode), "" the newest, N itself."""
    model_path = model_dir(storage, name)
    if wanted == "run" and run_id:
        outcome_path = storage / "checkpoints" / run_id / "export.json"
        try:
            wanted = str(read_json(outcome_path)["version"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PipelineFailure(f"cannot read the version run {run_id} exported: {e}") from e
    if wanted in ("", "run"):
        found = versions(model_path)
        if not found:
            raise PipelineFailure(f"{model_path} holds no version to serve")
        return found[-1]
    if not wanted.isdigit() or wanted.startswith("0"):
        raise UsageError(f"served version {wanted!r}: use run, empty (newest) or a number")
    return int(wanted)


def write_served_repository(
    storage: Path,
    out: Path,
    cfg: TritonConfig,
    wanted: str,
    run_id: str | None = None,
) -> int:
    """Write the repository one Triton pod serves into `out` (the pod's emptyDir): the
    volume's config.pbtxt with this pod's instance groups and ONNX Runtime threads (cfg)
    and a version_policy naming one version, plus a link to that version on the volume.

    Settings of the pod, not of the run, so they reach Triton without a new export.
    Re-runnable on the same `out` (init containers re-run when a pod sandbox is
    re-created): every file is replaced, links to other versions removed.
    """
    from google.protobuf import text_format

    cfg.validate()
    model_path = model_dir(storage, cfg.name)
    version = resolve_served_version(storage, cfg.name, wanted, run_id)
    if not (model_path / str(version) / MODEL_FILE).is_file():
        raise PipelineFailure(f"version {version} of {cfg.name} is not in {model_path}")
    config = parse_config((model_path / CONFIG_FILE).read_text())
    del config.instance_group[:]
    config.instance_group.add(count=cfg.instance_count, kind=cfg.instance_kind)
    config.parameters["intra_op_thread_count"].string_value = str(cfg.intra_op_threads)
    config.parameters["inter_op_thread_count"].string_value = "1"
    config.version_policy.specific.versions[:] = [version]

    served = out / cfg.name
    served.mkdir(parents=True, exist_ok=True)
    atomic_write_text(served / CONFIG_FILE, text_format.MessageToString(config))
    link = served / str(version)
    for stale in served.iterdir():
        if stale.name.isdigit() and stale != link:
            stale.unlink()
    temp = served / f".link-{version}"
    temp.unlink(missing_ok=True)
    temp.symlink_to(model_path / str(version))
    os.replace(temp, link)
    log.info(
        "serving %s version %d alone: %d %s instance(s), %d thread(s) each",
        cfg.name,
        version,
        cfg.instance_count,
        cfg.instance_kind,
        cfg.intra_op_threads,
    )
    return version
