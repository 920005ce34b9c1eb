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
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnist_pipeline import settings
from mnist_pipeline.storage import (
    CONFIG_FILE,
    EXPORT_LOCK_FILE,
    METADATA_FILE,
    MODEL_FILE,
    STAGING_PREFIX,
    PipelineFailure,
    UsageError,
    atomic_write_json,
    atomic_write_text,
    export_work_dir,
    fsync_dir,
    is_version_name,
    model_dir,
    models_dir,
    naming,
    read_metadata,
    resolve_served_version,
    servable_versions,
    validate_name,
    version_dirs,
    versions,
)

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def version_damage(version_path: Path) -> str | None:
    """Why a published version is not what its metadata.json records (None: intact): a
    truncated or replaced model.onnx would stop Triton loading it."""
    try:
        meta = read_metadata(version_path)
    except UsageError as e:
        return str(e)
    model_file = version_path / MODEL_FILE
    if meta is None or not model_file.is_file():
        return f"{version_path} lacks {METADATA_FILE if meta is None else MODEL_FILE}"
    if file_sha256(model_file) != meta.get("sha256"):
        return f"{model_file} does not match the sha256 its {METADATA_FILE} records"
    return None


def damaged_versions(model_path: Path) -> dict[int, str]:
    """{version: what is wrong} for every damaged version of the model, each logged."""
    damaged = {}
    for folder in version_dirs(model_path):
        if why := version_damage(folder):
            damaged[int(folder.name)] = why
            log.error("damaged model version %s: %s", folder, why)
    return damaged


def republish_hint(model_path: Path, version: int) -> str:
    """What the operator runs to serve a damaged version's model again."""
    run_id = None
    with contextlib.suppress(UsageError):
        run_id = (read_metadata(model_path / str(version)) or {}).get("run_id")
    if isinstance(run_id, str):
        return f"re-export the run it came from: mnist-pipeline export --run-id {run_id}"
    return "export its checkpoint again (mnist-pipeline export --checkpoint PATH)"


def config_damage(model_path: Path) -> str | None:
    """Why the model's config.pbtxt cannot be served (None: it parses)."""
    from google.protobuf import text_format

    path = model_path / CONFIG_FILE
    try:
        parse_config(path.read_text())
    except (OSError, UnicodeDecodeError, text_format.ParseError) as e:
        return f"{path}: {e}"
    return None


@dataclass(frozen=True)
class Champion:
    version: int
    accuracy: float
    metadata: dict[str, Any]


def champion(model_path: Path, damaged: Collection[int] = ()) -> Champion | None:
    """The newest published version (of those not `damaged`) and its accuracy: what a
    candidate has to beat."""
    found = [v for v in versions(model_path) if v not in damaged]
    if not found:
        return None
    newest = found[-1]
    version_path = model_path / str(newest)
    # Never guess: overwriting the served model because its record is unreadable could
    # replace a better model with a worse one.
    meta = read_metadata(version_path)
    if meta is None:
        raise PipelineFailure(f"the served version {version_path} has no {METADATA_FILE}")
    accuracy = meta.get("accuracy")
    if not isinstance(accuracy, int | float) or isinstance(accuracy, bool):
        raise PipelineFailure(
            f"the served version's {version_path / METADATA_FILE} records no accuracy "
            f"(found {accuracy!r})"
        )
    return Champion(newest, float(accuracy), meta)


@contextlib.contextmanager
def locked(storage: Path, name: str, shared: bool = False) -> Iterator[None]:
    """Hold the model's export lock (released by the kernel if the process dies): exclusive
    for what changes the published versions or what backs them (export, prune), shared for
    readers (pin), which may have the volume read-only."""
    work = export_work_dir(storage, name)
    if shared and not (work / EXPORT_LOCK_FILE).is_file():
        yield  # nothing was ever exported or pruned here: nothing to wait for
        return
    if not shared:
        work.mkdir(parents=True, exist_ok=True)
    # On NFS volumes flock is emulated with POSIX locks: exclusive needs the file open for
    # writing, shared for reading.
    with open(work / EXPORT_LOCK_FILE, "r" if shared else "a") as lock_file:
        log.debug("waiting for the export lock of %s", name)
        fcntl.flock(lock_file, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def clean_stale(storage: Path, name: str) -> None:
    """Remove staging folders a crashed export left; call only while holding the lock."""
    model_path = model_dir(storage, name)
    stale = [p for p in model_path.glob(f"{STAGING_PREFIX}*") if p.is_dir()]
    stale += [p for p in export_work_dir(storage, name).glob(f"{STAGING_PREFIX}*") if p.is_dir()]
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
        staging = _staging(export_work_dir(storage, cfg.name), STAGING_PREFIX)
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

    `wanted` is a --model-version: "run" (the version `run_id`'s export chose), N, or ""
    (the newest). Settings of the pod, not of the run, so they reach Triton without a new
    export. Re-runnable on the same `out` (init containers re-run when a pod sandbox is
    re-created): every file is replaced, links to other versions removed.
    """
    from google.protobuf import text_format

    cfg.validate()
    model_path = model_dir(storage, cfg.name)
    version = served_version(model_path, resolve_served_version(storage, cfg.name, wanted, run_id))
    for why in (version_damage(model_path / str(version)), config_damage(model_path)):
        if why:  # Triton would refuse it and, with model control mode none, not start
            raise PipelineFailure(
                f"cannot serve version {version} of {cfg.name}: {why}; "
                + republish_hint(model_path, version)
            )
    config = parse_config((model_path / CONFIG_FILE).read_text())
    del config.instance_group[:]
    config.instance_group.add(count=cfg.instance_count, kind=cfg.instance_kind)
    config.parameters["intra_op_thread_count"].string_value = str(cfg.intra_op_threads)
    config.parameters["inter_op_thread_count"].string_value = "1"
    config.version_policy.specific.versions[:] = [version]

    served = out / cfg.name
    served.mkdir(parents=True, exist_ok=True)
    atomic_write_text(served / CONFIG_FILE, text_format.MessageToString(config))
    link_only_version(served, model_path / str(version))
    log.info(
        "serving %s version %d alone: %d %s instance(s), %d thread(s) each",
        cfg.name,
        version,
        cfg.instance_count,
        cfg.instance_kind,
        cfg.intra_op_threads,
    )
    return version


def served_version(model_path: Path, resolved: str) -> int:
    """The servable version `resolved` names ("" the newest) in `model_path`."""
    found = servable_versions(model_path)
    if not resolved:
        if not found:
            raise PipelineFailure(f"{model_path} holds no version to serve")
        return found[-1]
    if int(resolved) not in found:
        raise PipelineFailure(
            f"version {resolved} of {model_path.name} is not in {model_path} "
            f"(servable versions: {found or 'none'})"
        )
    return int(resolved)


def link_only_version(served: Path, version_path: Path) -> None:
    """Make `served/<version>` a link to `version_path`, and the only version there."""
    link = served / version_path.name
    for stale in served.iterdir():
        if is_version_name(stale.name) and stale != link:
            stale.unlink()
    temp = served / f".link-{version_path.name}"
    temp.unlink(missing_ok=True)
    temp.symlink_to(version_path)
    os.replace(temp, link)
