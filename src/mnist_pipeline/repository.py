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
folder for a model. The same repository on object storage is objectstore.py's; export
sees either as a `Store`, and `pin` writes a pod's repository from either.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from mnist_pipeline import settings
from mnist_pipeline.storage import (
    CONFIG_FILE,
    EXPORT_LOCK_FILE,
    EXPORT_WORK_DIR,
    METADATA_FILE,
    MODEL_FILE,
    STAGING_PREFIX,
    ModelRepository,
    PipelineFailure,
    UsageError,
    atomic_write_json,
    atomic_write_text,
    export_records,
    export_work_dir,
    file_records,
    fsync_dir,
    is_version_name,
    models_dir,
    naming,
    read_metadata,
    resolve_served_version,
    servable_versions,
    validate_name,
    versions,
    volume_records,
)

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"
# Triton's python backend model that serves PLATFORM's model for a server without the
# onnxruntime backend, shipped in the package and placed beside model.onnx by pin.
PYTHON_MODEL_PATH = "python_backend/model.py"
PYTHON_MODEL_FILE = "model.py"
# Where pin assembles a version before renaming it into place (Triton skips dot-names).
PLACING_PREFIX = ".placing-"
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


def damaged_versions(store: Store) -> dict[int, str]:
    """{version: what is wrong} for every damaged version of the model, each logged."""
    damaged = {}
    for version in store.versions():
        if why := store.damage(version):
            damaged[version] = why
            log.error("damaged model version %s: %s", store.url(str(version)), why)
    return damaged


def folder_metadata(model_path: Path, version: int) -> dict[str, Any] | None:
    """metadata.json of a version in a model folder."""
    return read_metadata(model_path / str(version))


def republish_hint(metadata: Callable[[int], dict[str, Any] | None], version: int) -> str:
    """What the operator runs to serve a damaged version's model again (`metadata`: a
    store's reader of metadata.json)."""
    run_id = None
    with contextlib.suppress(UsageError):
        run_id = (metadata(version) or {}).get("run_id")
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


class Store(Protocol):
    """A model's published versions as export sees them: FolderModel, objectstore.S3Model."""

    def versions(self) -> list[int]: ...
    def metadata(self, version: int) -> dict[str, Any] | None: ...
    def url(self, *parts: str) -> str: ...
    def clean_stale(self) -> None: ...
    def publish(
        self, config_text: str, files: dict[str, bytes], metadata: dict[str, Any]
    ) -> int: ...
    def exclusive(self) -> contextlib.AbstractContextManager[None]: ...
    def write_record(self, run_id: str, attempt: dict[str, Any]) -> None: ...
    def read_record(self, run_id: str) -> tuple[dict[str, Any] | None, str]: ...
    def damage(self, version: int) -> str | None: ...
    def config_damage(self) -> str | None: ...
    def write_config(self, config_text: str) -> None: ...


class FolderModel:
    """A model's folder in a repository folder (STORAGE/models by default). Publication
    is a rename, so every version folder counts; the volume's lock serialises exports."""

    def __init__(self, storage: Path, root: Path, name: str) -> None:
        self.storage, self.root, self.name = storage, root, name
        self.path = root / name

    def versions(self) -> list[int]:
        return versions(self.path)

    def metadata(self, version: int) -> dict[str, Any] | None:
        return folder_metadata(self.path, version)

    def url(self, *parts: str) -> str:
        return str(self.path.joinpath(*parts))

    def clean_stale(self) -> None:
        clean_stale(self.storage, self.name, self.root)

    def publish(self, config_text: str, files: dict[str, bytes], metadata: dict[str, Any]) -> int:
        return publish_folder(self.path, self._staging_parent(), config_text, files, metadata)

    def _staging_parent(self) -> Path:
        """Where a first publication is built: beside the repository, on its file system."""
        return self.root.parent / EXPORT_WORK_DIR / self.name

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Nothing more to hold: every export into this folder holds the volume's lock."""
        return contextlib.nullcontext()

    def write_record(self, run_id: str, attempt: dict[str, Any]) -> None:
        """The run's export.json on the volume is the record."""

    def read_record(self, run_id: str) -> tuple[dict[str, Any] | None, str]:
        return volume_records(self.storage)(run_id)

    def damage(self, version: int) -> str | None:
        return version_damage(self.path / str(version))

    def config_damage(self) -> str | None:
        return config_damage(self.path) if (self.path / CONFIG_FILE).exists() else None

    def write_config(self, config_text: str) -> None:
        atomic_write_text(self.path / CONFIG_FILE, config_text)


def model_store(storage: Path, repo: ModelRepository, name: str) -> Store:
    """The export's view of `repo`: a folder, or a bucket (claims remembered on the volume)."""
    if repo.is_s3:
        from mnist_pipeline import objectstore

        return objectstore.S3Model(repo, name, work=export_work_dir(storage, name))
    assert repo.folder is not None
    return FolderModel(storage, repo.folder, name)


def champion(store: Store, damaged: Collection[int] = ()) -> Champion | None:
    """The newest published version (of those not `damaged`) and its accuracy: what a
    candidate has to beat."""
    found = [v for v in store.versions() if v not in damaged]
    if not found:
        return None
    newest = found[-1]
    # Never guess: overwriting the served model because its record is unreadable could
    # replace a better model with a worse one.
    meta = store.metadata(newest)
    if meta is None:
        raise PipelineFailure(f"the served version {store.url(str(newest))} has no {METADATA_FILE}")
    accuracy = meta.get("accuracy")
    if not isinstance(accuracy, int | float) or isinstance(accuracy, bool):
        raise PipelineFailure(
            f"the served version's {store.url(str(newest), METADATA_FILE)} records no accuracy "
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


def clean_stale(storage: Path, name: str, root: Path | None = None) -> None:
    """Remove staging folders a crashed export left; call only while holding the lock."""
    root = models_dir(storage) if root is None else root
    model_path = root / name
    stale = [p for p in model_path.glob(f"{STAGING_PREFIX}*") if p.is_dir()]
    work = root.parent / EXPORT_WORK_DIR / name
    stale += [p for p in work.glob(f"{STAGING_PREFIX}*") if p.is_dir()]
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
    """Add a version holding `files` and metadata.json to STORAGE/models; return its number.

    Call while holding `locked(storage, cfg.name)`: the version number is chosen here.
    """
    store = FolderModel(storage, models_dir(storage), cfg.name)
    return store.publish(render_config(cfg), files, metadata)


def publish_folder(
    model_path: Path,
    staging_parent: Path,
    config_text: str,
    files: dict[str, bytes],
    metadata: dict[str, Any],
) -> int:
    """FolderModel.publish: a version folder built under a dot-name and renamed into place."""
    version = (versions(model_path) or [0])[-1] + 1
    metadata = {**metadata, "version": version, "files": file_records(files)}

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
        staging = _staging(staging_parent, STAGING_PREFIX)
        try:
            (staging / str(version)).mkdir(mode=0o755)
            _fill_version(staging / str(version), files, metadata)
            atomic_write_text(staging / CONFIG_FILE, config_text)
            model_path.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, model_path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(model_path.parent)
    return version


def write_served_repository(
    storage: Path,
    out: Path,
    cfg: TritonConfig,
    wanted: str,
    run_id: str | None = None,
    repo: ModelRepository | None = None,
    backend: str = "onnxruntime",
) -> int:
    """Write the repository one Triton serves into `out` (a pod's emptyDir, `serve`'s work
    folder): the repository's config.pbtxt with this server's instance groups and ONNX
    Runtime threads (cfg), its `backend` and a version_policy naming one version, plus that
    version, checked against its metadata.json: a link to it on the volume, or with an
    object-storage repository its files, downloaded and checked.

    `wanted` is a --model-version: "run" (the version `run_id`'s export chose), N, or ""
    (the newest). `backend` is what the server runs the model with: "onnxruntime" serves
    the repository as exported; "python" (a tritonserver without that backend) serves the
    same model through the project's model.py, placed in the version folder. Settings of
    the server, not of the run, so they reach Triton without a new export. Re-runnable on
    the same `out` (init containers re-run when a pod sandbox is re-created): every file is
    replaced, other versions removed.
    """
    cfg.validate()
    if backend == "python" and cfg.instance_kind != INSTANCE_KINDS["cpu"]:
        raise UsageError(
            "--instance-kind gpu needs --triton-backend onnxruntime (NVIDIA's tritonserver "
            "images): the python backend's model.py runs ONNX Runtime on the CPU"
        )
    repo = repo or ModelRepository(folder=models_dir(storage))
    if repo.folder is not None and out.resolve().is_relative_to(repo.folder.resolve()):
        raise UsageError(
            f"--served-repository {out} is inside the model repository {repo.folder}: "
            "pin would rewrite the exported config there; choose a folder outside it"
        )
    # Shared: pins read at once; an export or prune changing the versions waits for them.
    with locked(storage, cfg.name, shared=True):
        version = _write_served(storage, out, cfg, wanted, run_id, repo, backend)
    log.info(
        "serving %s version %d alone with Triton's %s backend: %d %s instance(s), "
        "%d thread(s) each",
        cfg.name,
        version,
        backend,
        cfg.instance_count,
        cfg.instance_kind,
        cfg.intra_op_threads,
    )
    return version


def _write_served(
    storage: Path,
    out: Path,
    cfg: TritonConfig,
    wanted: str,
    run_id: str | None,
    repo: ModelRepository,
    backend: str,
) -> int:
    records = export_records(storage, repo, cfg.name)
    resolved = resolve_served_version(storage, cfg.name, wanted, run_id, records)
    served = out / cfg.name
    served.mkdir(parents=True, exist_ok=True)
    staging = placing_folder(served)
    try:
        if repo.is_s3:
            from mnist_pipeline import objectstore

            model = objectstore.S3Model(repo, cfg.name)
            version = served_version(model.versions(), resolved, model.url())
            config_text = model.config_text()
            model.download_version(version, staging)
        else:
            assert repo.folder is not None
            model_path = repo.folder / cfg.name
            version = served_version(servable_versions(model_path), resolved, str(model_path))
            for why in (version_damage(model_path / str(version)), config_damage(model_path)):
                if why:  # Triton would refuse it and, with model control mode none, not start
                    raise PipelineFailure(
                        f"cannot serve version {version} of {cfg.name}: {why}; "
                        + republish_hint(partial(folder_metadata, model_path), version)
                    )
            config_text = (model_path / CONFIG_FILE).read_text()
            link_files(staging, (model_path / str(version)).resolve())
        if backend == "python":
            atomic_write_text(staging / PYTHON_MODEL_FILE, python_model_source())
        atomic_write_text(served / CONFIG_FILE, pod_config(config_text, cfg, version, backend))
        place_only_version(served, staging, version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # What Triton will read, looked at through the links: each must resolve from here.
    dangling = [p.name for p in (served / str(version)).iterdir() if not p.is_file()]
    if dangling:
        raise PipelineFailure(f"{served / str(version)}: {', '.join(dangling)} do not resolve")
    return version


def placing_folder(served: Path) -> Path:
    """A folder beside the served versions where the next one is assembled (Triton skips
    its name), readable by a Triton running as another user."""
    path = Path(tempfile.mkdtemp(dir=served, prefix=PLACING_PREFIX))
    os.chmod(path, 0o755)
    return path


def link_files(folder: Path, version_path: Path) -> None:
    """Link each file of a published version into `folder`: absolute links, which resolve
    wherever the served repository is read from."""
    for path in sorted(version_path.iterdir()):
        if path.is_file():
            (folder / path.name).symlink_to(path)


def python_model_source() -> str:
    """The model.py of Triton's python backend that runs the model on ONNX Runtime."""
    return resources.files("mnist_pipeline").joinpath(PYTHON_MODEL_PATH).read_text()


def pod_config(config_text: str, cfg: TritonConfig, version: int, backend: str) -> str:
    """The repository's config.pbtxt with this server's backend, instance groups, threads
    and version; every other field (name, batching, tensors) as exported."""
    from google.protobuf import text_format

    config = parse_config(config_text)
    if backend == "python":
        config.platform = ""
        config.backend = "python"
    del config.instance_group[:]
    config.instance_group.add(count=cfg.instance_count, kind=cfg.instance_kind)
    config.parameters["intra_op_thread_count"].string_value = str(cfg.intra_op_threads)
    config.parameters["inter_op_thread_count"].string_value = "1"
    config.version_policy.specific.versions[:] = [version]
    return str(text_format.MessageToString(config))


def served_version(found: list[int], resolved: str, where: str) -> int:
    """The servable version `resolved` names ("" the newest) among `found`, in `where`."""
    if not resolved:
        if not found:
            # Nothing was exported yet (or it all went): a step missing, not a failure.
            raise UsageError(f"{where} holds no version to serve; run `mnist-pipeline export`")
        return found[-1]
    if int(resolved) not in found:
        raise PipelineFailure(
            f"version {resolved} is not in {where} (servable versions: {found or 'none'})"
        )
    return int(resolved)


def place_only_version(served: Path, staging: Path, version: int) -> None:
    """Rename the assembled folder to `served/<version>`, the only version there."""
    for stale in served.iterdir():
        if stale == staging:
            continue
        if is_version_name(stale.name) or stale.name.startswith(PLACING_PREFIX):
            if stale.is_symlink() or not stale.is_dir():
                stale.unlink()
            else:
                shutil.rmtree(stale)
    os.rename(staging, served / str(version))
    fsync_dir(served)
