"""Export a trained checkpoint to ONNX and publish it to the Triton repository if it is better.

    load checkpoint -> gate (champion/challenger) -> ONNX -> optimise -> parity -> publish

The gate compares the candidate's test accuracy with that of the newest published
version, under the model's export lock, so two exports at once neither take the same
version nor both win against the same champion.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnist_pipeline import data, model, repository
from mnist_pipeline.storage import (
    PipelineFailure,
    UsageError,
    atomic_write_json,
    best_model_link,
    checkpoints_dir,
    fsync_dir,
    read_json,
    run_dir,
)

log = logging.getLogger(__name__)

# The chart serves with nvcr.io/nvidia/tritonserver:24.10-py3 (Triton 2.51), whose ONNX
# Runtime backend is built with ONNX Runtime 1.19.2: the backend stayed on 1.19.2 through
# that release (triton-inference-server/onnxruntime_backend PR #284, 2024-11-15, moved main
# back to 1.19.2 after trying 1.20.0). ONNX Runtime 1.19 implements ONNX 1.16: opsets up to
# 21, IR version up to 10 (microsoft/onnxruntime docs/Versioning.md). A model stamped newer
# does not load there, even though the newer onnxruntime installed here runs it.
TRITON_ONNXRUNTIME_VERSION = "1.19.2"
TRITON_MAX_OPSET = 21
TRITON_MAX_IR_VERSION = 10
# torch's exporter builds at opset 18 (torchlib's own) and converts any other opset
# afterwards; 18 also leaves a margin: onnxruntime runs it since 1.14.
OPSET = 18

PARITY_SAMPLES = 256
PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Candidate:
    """A checkpoint to export, loaded and checked."""

    path: Path
    accuracy: float
    net: torch.nn.Module
    payload: dict[str, Any]


@dataclass(frozen=True)
class OnnxExport:
    content: bytes
    opset: int
    ir_version: int
    nodes_exported: int
    nodes_optimised: int


@dataclass(frozen=True)
class Outcome:
    status: str  # "published" | "skipped"
    version: int | None
    accuracy: float
    champion_accuracy: float | None
    reason: str


def newest_completed_run(storage: Path) -> str:
    """The completed training run that finished last."""
    finished: list[tuple[datetime, str]] = []
    for metrics_path in checkpoints_dir(storage).glob("*/metrics.json"):
        try:
            metrics = read_json(metrics_path)
            if metrics.get("status") == "complete":
                when = datetime.fromisoformat(metrics["finished_at"])
                finished.append((when, metrics_path.parent.name))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring %s: %s", metrics_path, e)
    if not finished:
        raise UsageError(
            f"no completed training run in {checkpoints_dir(storage)}: "
            "train first, or name one with --run-id or --checkpoint"
        )
    return max(finished)[1]


def resolve_checkpoint(
    storage: Path, checkpoint: Path | None, run_id: str | None
) -> tuple[Path, str | None]:
    """Which model.pth to export, and the training run it belongs to (if any)."""
    if checkpoint is not None and run_id is not None:
        raise UsageError("give --checkpoint or --run-id, not both")
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise UsageError(f"checkpoint {checkpoint} does not exist")
        parent = checkpoint.resolve().parent
        owner = parent.name if parent.parent == checkpoints_dir(storage).resolve() else None
        return checkpoint, owner
    if run_id is None:
        run_id = newest_completed_run(storage)
        log.info("newest completed training run: %s", run_id)
    metrics_path = run_dir(storage, run_id) / "metrics.json"
    try:
        status = read_json(metrics_path).get("status")
    except (OSError, ValueError, AttributeError) as e:
        raise UsageError(f"training run {run_id}: cannot read {metrics_path}: {e}") from e
    if status != "complete":
        raise UsageError(f"training run {run_id} is not complete (status {status!r})")
    return run_dir(storage, run_id) / "model.pth", run_id


def load_candidate(path: Path) -> Candidate:
    """Load a checkpoint safely: weights only, so a pickle can never run code here."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever the bytes are, a checkpoint that does not load is bad input
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load checkpoint {path} (weights only): {first_line}") from e
    try:
        net = model.from_checkpoint(payload)
    except ValueError as e:
        raise UsageError(f"checkpoint {path}: {e}") from e
    accuracy = payload.get("test_accuracy")
    if not isinstance(accuracy, int | float) or not 0 <= accuracy <= 1:
        raise UsageError(f"checkpoint {path} has no test accuracy in 0..1 (found {accuracy!r})")
    return Candidate(path, float(accuracy), net, payload)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's per-pass INFO lines and its warnings about torchvision ops
    (not used here), which would bury the stage's own log; errors still show."""
    loggers = {name: logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")}
    levels = {name: logger.level for name, logger in loggers.items()}
    try:
        for logger in loggers.values():
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for name, logger in loggers.items():
            logger.setLevel(levels[name])


def torch_export(net: torch.nn.Module, opset: int = OPSET) -> Any:
    """torch.onnx.export's program with a dynamic batch dimension, not yet optimised."""
    example = torch.zeros(2, 1, data.ROWS, data.COLS)
    with _quiet_exporter():
        try:
            program = torch.onnx.export(
                net.eval(),
                (example,),
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
                opset_version=opset,
                dynamo=True,
                external_data=False,
                optimize=False,
                verbose=False,
            )
        except Exception as e:  # the exporter raises many kinds; the stage reports one failure
            raise PipelineFailure(f"ONNX export failed: {type(e).__name__}: {e}") from e
    assert program is not None
    return program


def to_onnx(net: torch.nn.Module, opset: int = OPSET) -> OnnxExport:
    """Export with a dynamic batch dimension, then optimise portably for inference.

    torch's ONNX optimiser folds BatchNorm into the preceding Conv, folds constants and
    drops identities; onnxslim then removes whatever dead or redundant nodes remain.
    Both rewrite the graph in standard ONNX ops only, unlike onnxruntime's ORT_ENABLE_ALL,
    whose saved models carry layouts specific to the exporting machine's CPU.
    """
    import onnx
    import onnxslim

    program = torch_export(net, opset)
    nodes_exported = len(program.model_proto.graph.node)
    with _quiet_exporter():
        program.optimize()
        optimised = onnxslim.slim(program.model_proto)
    onnx.checker.check_model(optimised, full_check=True)
    opsets = {o.domain or "ai.onnx": o.version for o in optimised.opset_import}
    if opsets != {"ai.onnx": opset} or optimised.ir_version > TRITON_MAX_IR_VERSION:
        # A newer torch/onnx could stamp a model the served onnxruntime refuses to load.
        raise PipelineFailure(
            f"exported model uses opsets {opsets}, IR version {optimised.ir_version}: the "
            f"Triton image's onnxruntime {TRITON_ONNXRUNTIME_VERSION} needs standard ops at "
            f"opset <= {TRITON_MAX_OPSET} and IR version <= {TRITON_MAX_IR_VERSION}"
        )
    log.info(
        "ONNX opset %d, IR version %d: %d nodes exported, %d after optimisation",
        opset,
        optimised.ir_version,
        nodes_exported,
        len(optimised.graph.node),
    )
    return OnnxExport(
        optimised.SerializeToString(),
        opset,
        optimised.ir_version,
        nodes_exported,
        len(optimised.graph.node),
    )


def check_parity(
    onnx_model: bytes, net: torch.nn.Module, inputs: np.ndarray, tolerance: float = PARITY_TOLERANCE
) -> float:
    """Run onnxruntime and PyTorch on the same inputs; return the largest absolute difference.

    Raises PipelineFailure if it exceeds `tolerance` or any prediction differs.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
    batch = np.ascontiguousarray(inputs, dtype=np.float32)
    got = session.run(["output"], {"input": batch})[0]
    with torch.no_grad():
        want = net(torch.from_numpy(batch)).numpy()
    if got.shape != want.shape:
        raise PipelineFailure(f"parity: ONNX output shape {got.shape} != PyTorch {want.shape}")
    max_diff = float(np.max(np.abs(got - want)))
    mismatched = int(np.sum(got.argmax(1) != want.argmax(1)))
    # `not <=` so that a NaN difference fails too.
    if not max_diff <= tolerance or mismatched:
        raise PipelineFailure(
            f"parity check failed on {len(inputs)} test images: max |ONNX - PyTorch| = "
            f"{max_diff:.3g} (tolerance {tolerance:g}), {mismatched} predictions differ"
        )
    log.info(
        "parity on %d MNIST test images: max abs diff %.3g, predictions identical",
        len(inputs),
        max_diff,
    )
    return max_diff


def update_best_link(storage: Path, checkpoint: Path) -> None:
    """Point checkpoints/best_model.pth at `checkpoint` with a relative symlink, atomically."""
    link = best_model_link(storage)
    link.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(checkpoint.resolve(), link.parent.resolve())
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def repair_best_link(storage: Path, champion: repository.Champion) -> None:
    """Point best_model.pth at the served version's checkpoint if it does not: an export
    killed between publishing a version and moving the link leaves it on the one before."""
    source = champion.metadata.get("source_model")
    if not isinstance(source, str):
        return
    checkpoint = Path(source) if Path(source).is_absolute() else storage / source
    link = best_model_link(storage)
    if not checkpoint.is_file() or (link.is_symlink() and link.resolve() == checkpoint.resolve()):
        return
    log.warning(
        "%s did not point at %s, the checkpoint of the served version %d: repaired",
        link,
        checkpoint,
        champion.version,
    )
    update_best_link(storage, checkpoint)


def relative_to_storage(storage: Path, path: Path) -> str:
    try:
        return path.resolve().relative_to(storage.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def write_marker(
    storage: Path,
    run_id: str | None,
    status: str,
    cfg: repository.TritonConfig,
    reason: str,
    version: int | None = None,
    accuracy: float | None = None,
    champion_accuracy: float | None = None,
) -> None:
    """checkpoints/<run_id>/export.json: what export decided about this training run."""
    if run_id is None or not run_dir(storage, run_id).is_dir():
        return
    atomic_write_json(
        run_dir(storage, run_id) / "export.json",
        {
            "status": status,
            "model_name": cfg.name,
            "version": version,
            "accuracy": accuracy,
            "champion_accuracy": champion_accuracy,
            "reason": reason,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )


def export(
    storage: Path,
    cfg: repository.TritonConfig,
    checkpoint: Path | None = None,
    run_id: str | None = None,
    min_improvement: float = 0.0,
) -> Outcome:
    """The export stage. Returns what happened; raises UsageError / PipelineFailure."""
    try:
        cfg.validate()
    except ValueError as e:
        raise UsageError(str(e)) from e
    path, owner = resolve_checkpoint(storage, checkpoint, run_id)
    try:
        candidate = load_candidate(path)
    except UsageError as e:
        write_marker(storage, owner, "failed", cfg, str(e))
        raise
    log.info("candidate %s: test accuracy %.4f", path, candidate.accuracy)

    with repository.locked(storage, cfg.name):
        repository.clean_stale(storage, cfg.name)
        champion = repository.champion(repository.model_dir(storage, cfg.name))
        if champion is not None:
            repair_best_link(storage, champion)
        if champion is not None and not candidate.accuracy > champion.accuracy + min_improvement:
            reason = (
                f"candidate accuracy {candidate.accuracy:.4f} does not beat the published "
                f"version {champion.version}'s {champion.accuracy:.4f}"
                + (f" by more than {min_improvement:g}" if min_improvement else "")
            )
            log.info("not exported: %s", reason)
            write_marker(
                storage,
                owner,
                "skipped",
                cfg,
                reason,
                champion.version,
                candidate.accuracy,
                champion.accuracy,
            )
            return Outcome(
                "skipped", champion.version, candidate.accuracy, champion.accuracy, reason
            )
        champion_accuracy = None if champion is None else champion.accuracy
        try:
            exported = to_onnx(candidate.net)
            images, _ = data.load(storage, "test")
            max_diff = check_parity(
                exported.content, candidate.net, data.normalize(images[:PARITY_SAMPLES])
            )
        except (PipelineFailure, UsageError) as e:
            write_marker(
                storage, owner, "failed", cfg, str(e), None, candidate.accuracy, champion_accuracy
            )
            raise

        import onnxruntime

        metadata = {
            "model_name": cfg.name,
            "export_date": datetime.now(UTC).isoformat(timespec="seconds"),
            "accuracy": candidate.accuracy,
            "source_model": relative_to_storage(storage, path),
            "run_id": candidate.payload.get("run_id", owner),
            "sha256": hashlib.sha256(exported.content).hexdigest(),
            "opset": exported.opset,
            "ir_version": exported.ir_version,
            "parity_max_abs_diff": max_diff,
            "parity_samples": PARITY_SAMPLES,
            "parameters": sum(p.numel() for p in candidate.net.parameters()),
            "onnxruntime_version": onnxruntime.__version__,
            "onnx_nodes": {
                "exported": exported.nodes_exported,
                "optimised": exported.nodes_optimised,
            },
            "previous_accuracy": champion_accuracy,
        }
        version = repository.publish(
            storage, cfg, {repository.MODEL_FILE: exported.content}, metadata
        )
        update_best_link(storage, path)

    reason = (
        "first export"
        if champion is None
        else f"accuracy {candidate.accuracy:.4f} beats version {champion.version}'s "
        f"{champion.accuracy:.4f}"
    )
    log.info(
        "published %s version %d (%s) to %s",
        cfg.name,
        version,
        reason,
        repository.model_dir(storage, cfg.name) / str(version),
    )
    write_marker(
        storage, owner, "published", cfg, reason, version, candidate.accuracy, champion_accuracy
    )
    return Outcome("published", version, candidate.accuracy, champion_accuracy, reason)
