"""pin: write the repository one Triton serves, one version with this server's settings.

    SERVED/<name>/config.pbtxt                  the repository's, for this server (tritonconfig)
    SERVED/<name>/<version>/{model.onnx,metadata.json[,model.py]}

The version's files are placed from the model repository (linked from a folder,
downloaded from a bucket) and each checked against the sha256 its metadata.json records,
whatever holds them. The placed version is recorded in the repository as served
(.export/served/), so that prune keeps it while this folder holds it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from mnist_pipeline.errors import PipelineFailure, UsageError
from mnist_pipeline.repository import (
    DAMAGED,
    Repository,
    Scan,
    now,
    open_repository,
    republish_hint,
    resolve_version,
)
from mnist_pipeline.storage import (
    CONFIG_FILE,
    METADATA_FILE,
    ModelRepository,
    atomic_write_text,
    fsync_dir,
    is_version_name,
)
from mnist_pipeline.tritonconfig import (
    PYTHON_MODEL_FILE,
    TritonConfig,
    pod_config,
    python_model_source,
)

log = logging.getLogger(__name__)

# Where pin assembles a version before renaming it into place (Triton skips dot-names).
PLACING_PREFIX = ".placing-"


def write_served_repository(
    location: ModelRepository,
    out: Path,
    cfg: TritonConfig,
    wanted: str,
    run_id: str | None = None,
    backend: str = "onnxruntime",
) -> int:
    """Write the repository one Triton serves into `out` (a pod's emptyDir, `serve`'s work
    folder); return the version placed.

    `wanted` is a --model-version: "run" (the version `run_id`'s export chose), N, or ""
    (the newest). `backend` is what the server runs the model with: "onnxruntime" serves
    the repository as exported; "python" (a tritonserver without that backend) serves the
    same model through the project's model.py, placed in the version folder. Re-runnable
    on the same `out` (init containers re-run when a pod sandbox is re-created): every
    file is replaced, other versions removed."""
    if backend == "python" and cfg.instance_kind != "cpu":
        raise UsageError(
            "--instance-kind gpu needs --triton-backend onnxruntime (NVIDIA's tritonserver "
            "images): the python backend's model.py runs ONNX Runtime on the CPU"
        )
    repo = open_repository(location, cfg.name)
    if repo.files.holds(out):
        raise UsageError(
            f"--served-repository {out} is inside the model repository {location}: "
            "pin would rewrite the exported config there; choose a folder outside it"
        )
    version = chosen(repo, repo.scan(), resolve_version(repo, wanted, run_id))
    served = out / cfg.name
    served.mkdir(parents=True, exist_ok=True)
    mark_served(repo, served, version)
    staging = Path(tempfile.mkdtemp(dir=served, prefix=PLACING_PREFIX))
    try:
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide it from Triton as another user
        place_checked(repo, repo.scan(), version, staging)
        if backend == "python":
            atomic_write_text(staging / PYTHON_MODEL_FILE, python_model_source())
        pod = pod_config(repo.config_text(), cfg, version, backend)
        atomic_write_text(served / CONFIG_FILE, pod)
        place_only_version(served, staging, version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "serving %s version %d alone with Triton's %s backend: %d %s instance(s), "
        "%d thread(s) each",
        cfg.name, version, backend, cfg.instance_count, cfg.triton_kind, cfg.intra_op_threads,
    )  # fmt: skip
    return version


def chosen(repo: Repository, scan: Scan, resolved: str) -> int:
    """The version `resolved` names ("" the newest), refused when damaged (or when the
    config does not parse), since Triton would not start on it."""
    if scan.config_damage:
        raise PipelineFailure(f"cannot serve {repo.name}: {scan.config_damage}; export again")
    version = scan.champion if not resolved else scan.versions.get(int(resolved))
    if version is None and not resolved:
        # Nothing was exported yet (or it all went): a step missing, not a failure.
        raise UsageError(f"{repo} holds no version to serve; run `mnist-pipeline export`")
    if version is not None and version.state == DAMAGED:
        raise PipelineFailure(
            f"cannot serve version {version.number} of {repo.name}: {version.why}; "
            + republish_hint(version)
        )
    if version is None or version.number not in scan.servable:
        raise PipelineFailure(
            f"version {resolved} is not in {repo} (servable versions: {scan.servable or 'none'})"
        )
    return version.number


def served_key(served: Path) -> str:
    """The served record's name for this folder on this host: pinning it again replaces it."""
    where = f"{socket.gethostname()}:{served.resolve()}"
    return hashlib.sha256(where.encode()).hexdigest()[:16]


def mark_served(repo: Repository, served: Path, version: int) -> None:
    """Record in the repository that `served` holds `version` (prune keeps it meanwhile).
    A repository this server may only read (the chart's Triton pods) cannot say so: the
    version is then kept by prune's --run-id and --keep-version alone."""
    record = {"version": version, "host": socket.gethostname(), "folder": str(served.resolve()),
              "at": now(), "since": time.time()}  # fmt: skip
    try:
        repo.mark_served(served_key(served), record)
    except (OSError, UsageError, PipelineFailure) as e:
        log.info("version %d is not recorded as served in %s (%s)", version, repo, e)


def place_checked(repo: Repository, scan: Scan, number: int, folder: Path) -> None:
    """Place the version's files in `folder`, each checked against its recorded sha256."""
    version = scan.versions[number]
    for name in repo.place(version, folder):
        record = version.metadata["files"][name]
        digest, size = hashlib.sha256(), 0
        with open(folder / name, "rb") as f:  # through the link, as Triton will read it
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        if (size, digest.hexdigest()) != (record.get("bytes"), record.get("sha256")):
            raise PipelineFailure(
                f"cannot serve version {number} of {repo.name}: {repo.url(f'{number}/{name}')} "
                f"is {size} bytes, sha256 {digest.hexdigest()}, but {METADATA_FILE} records "
                f"{record.get('bytes')} bytes, {record.get('sha256')}; " + republish_hint(version)
            )


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
