"""Export a trained checkpoint to ONNX and publish it to the Triton repository if it is better.

    load checkpoint -> ONNX -> optimise -> parity -> measure -> gate (champion) -> publish
                                      int8: -> quantise -> measure -> refuse a loss -> agreement

With --precision int8 the published model is the fp32 export statically quantised
(quantize.py), refused when it loses more than MAX_INT8_ACCURACY_LOSS of test accuracy
against that fp32 export; the champion gate then treats it like any model.

The gate compares like with like: the accuracy of the very model.onnx about to be
published, measured here with onnxruntime on all 10 000 MNIST test images, against the
published version's, measured the same way when it was published (its metadata.json).
The accuracy a training run reported may come from a subset (--limit-test) and never
decides. A model identical to a published
version (same weights or same ONNX bytes) is never published again. All of it happens
under the model's export lock, so two exports at once neither take the same version nor
both win against the same champion.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnist_pipeline import data, interrupts, model, quantize, repository, settings
from mnist_pipeline.storage import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    EXPORT_FILE,
    METRICS_FILE,
    MODEL_FILE,
    ExportStatus,
    ModelRepository,
    PipelineFailure,
    RunStatus,
    UsageError,
    atomic_write_json,
    available_cpus,
    best_model_link,
    checkpoints_dir,
    fsync_dir,
    read_export_record,
    read_metrics,
    repository_at,
    run_dir,
    standing_record,
    validate_name,
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
EVAL_BATCH = 500
EVAL_SOURCE = "onnxruntime, CPU, on the published model.onnx"
PRECISIONS = ("fp32", "int8")
# 0.1 percentage point: 10 of the 10 000 test images. More is a quantisation that broke
# something (an activation range one outlier stretched), not int8 rounding.
MAX_INT8_ACCURACY_LOSS = 0.001


@dataclass(frozen=True)
class Candidate:
    """A checkpoint to export, loaded and checked."""

    path: Path
    accuracy: float
    net: torch.nn.Module
    payload: dict[str, Any]
    weights_sha256: str


@dataclass(frozen=True)
class OnnxExport:
    content: bytes
    opset: int
    ir_version: int
    nodes_exported: int
    nodes_optimised: int


@dataclass(frozen=True)
class Evaluation:
    """How a model's accuracy was measured: what metadata.json records and the gate compares."""

    accuracy: float
    correct: int
    images: int
    source: str
    test_set_sha256: str

    def record(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "correct": self.correct,
            "split": "MNIST test (t10k)",
            "test_set_sha256": self.test_set_sha256,
            "source": self.source,
        }


@dataclass(frozen=True)
class Built:
    """The model about to be gated: its bytes, its accuracy, and what metadata.json
    records of how it was made (precision, parity, quantisation)."""

    content: bytes
    evaluation: Evaluation
    record: dict[str, Any]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


@dataclass(frozen=True)
class Outcome:
    """What export decided: the standing fields of export.json."""

    status: ExportStatus
    version: int | None  # published, or the better one kept
    accuracy: float | None
    champion_accuracy: float | None
    reason: str


def failed(error: BaseException) -> Outcome:
    """What `error` ended: an interrupt, even where a library wrapped it, or a failure."""
    interrupt = interrupts.as_interrupt(error)
    if interrupt is not None:
        why = f"interrupted ({interrupt.name}): the same command exports again"
        return Outcome(ExportStatus.INTERRUPTED, None, None, None, why)
    return Outcome(ExportStatus.FAILED, None, None, None, str(error))


@dataclass(frozen=True)
class Request:
    """One export: of which training run's checkpoint (`owner`, if any), to which model
    and repository (`store`), how, and what it takes to replace the published version."""

    storage: Path
    cfg: repository.TritonConfig
    owner: str | None
    precision: str
    min_improvement: float
    store: repository.Store
    min_accuracy: float = settings.PUBLISH_MIN_ACCURACY.default

    def record(self, outcome: Outcome) -> Outcome:
        """Write `outcome` into the owner's export.json, and into the repository where it
        keeps its own copy (a bucket: Triton pods have no volume); call only under the
        export lock. A failure is recorded on the volume even when the bucket cannot be."""
        attempt = write_marker(self.storage, self.owner, self.cfg.name, outcome)
        if attempt is None or self.owner is None:
            return outcome
        try:
            self.store.write_record(self.owner, attempt)
        except (PipelineFailure, UsageError) as e:
            if outcome.status not in (ExportStatus.FAILED, ExportStatus.INTERRUPTED):
                raise
            log.warning("the failure is recorded on the volume only: %s", e)
        return outcome


def newest_completed_run(storage: Path) -> str:
    """The completed training run that finished last. A run whose record cannot be read
    is passed over with a warning: it was not asked for."""
    finished: list[tuple[datetime, str]] = []
    for metrics_path in checkpoints_dir(storage).glob(f"*/{METRICS_FILE}"):
        try:
            validate_name(metrics_path.parent.name)  # a folder no run id could name
            metrics = read_metrics(metrics_path.parent) or {}
            if metrics.get("status") == RunStatus.COMPLETE:
                when = datetime.fromisoformat(metrics["finished_at"])
                finished.append((when, metrics_path.parent.name))
        except (OSError, ValueError, KeyError, TypeError, UsageError) as e:
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
    check_complete(storage, run_id)
    return run_dir(storage, run_id) / CHECKPOINT_FILE, run_id


def check_complete(storage: Path, run_id: str) -> None:
    """Raise UsageError, saying what to do, unless training run `run_id` is complete."""
    run = run_dir(storage, run_id)
    if not run.is_dir():
        raise UsageError(missing_run_message(storage, run_id))
    metrics = read_metrics(run)
    if metrics is None:
        raise UsageError(f"training run {run_id} has no {run / METRICS_FILE}: train it first")
    status = metrics.get("status")
    if status in (RunStatus.RUNNING, RunStatus.INTERRUPTED):
        epochs = len(metrics.get("history") or [])
        raise UsageError(
            f"training run {run_id} is not complete (interrupted after {epochs} epoch(s)): "
            f"resume it by running the same `mnist-pipeline train --run-id {run_id}` command "
            "(same settings) again, then export"
        )
    if status != RunStatus.COMPLETE:
        error = f": {metrics['error']}" if metrics.get("error") else ""
        raise UsageError(f"training run {run_id} is not complete (status {status!r}{error})")


def missing_run_message(storage: Path, run_id: str) -> str:
    root = checkpoints_dir(storage)
    runs = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not runs:
        return f"training run {run_id} does not exist: {checkpoints_dir(storage)} holds no runs"
    nearest = difflib.get_close_matches(run_id, runs, n=3, cutoff=0.0)
    return (
        f"training run {run_id} does not exist in {checkpoints_dir(storage)}; "
        f"nearest: {', '.join(nearest)}"
    )


def load_candidate(path: Path) -> Candidate:
    """Load a checkpoint safely: weights only, so a pickle can never run code here."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever the bytes are, a checkpoint that does not load is bad input
        raise UsageError(f"cannot load checkpoint {path}: {model.load_error(e)}") from e
    try:
        net = model.from_checkpoint(payload)
    except ValueError as e:
        raise UsageError(f"checkpoint {path}: {e}") from e
    accuracy = payload.get("test_accuracy")
    if not isinstance(accuracy, int | float) or not 0 <= accuracy <= 1:
        raise UsageError(f"checkpoint {path} has no test accuracy in 0..1 (found {accuracy!r})")
    return Candidate(path, float(accuracy), net, payload, model.weights_sha256(net))


def check_architecture(candidate: Candidate, cfg: repository.TritonConfig) -> None:
    """Refuse a checkpoint whose model cannot answer the served contract: a classifier
    with more outputs than config.pbtxt declares would pass the gate on its first ten and
    then stop the whole Triton server at load."""
    channels = int(candidate.payload["in_channels"])
    classes = int(candidate.payload["num_classes"])
    wanted_channels, wanted_classes = cfg.input_dims[0], cfg.output_dims[0]
    if (channels, classes) != (wanted_channels, wanted_classes):
        raise UsageError(
            f"checkpoint {candidate.path}: {channels} input channel(s) and {classes} classes; "
            f"the repository serves {cfg.input_name} {list(cfg.input_dims)} and "
            f"{cfg.output_name} {list(cfg.output_dims)} ({CONFIG_FILE}): nothing published"
        )


def check_contract(onnx_model: Any, cfg: repository.TritonConfig) -> None:
    """Raise UsageError unless the graph's inputs and outputs are exactly what config.pbtxt
    declares (names, FP32, the batch dimension then the declared dims): Triton refuses a
    model that differs, and with model control mode none the server then does not start."""
    import onnx

    declared = repository.parse_config(repository.render_config(cfg))
    weights = {t.name for t in onnx_model.graph.initializer}
    for kind, tensors, graph_tensors in (
        ("input", declared.input, [t for t in onnx_model.graph.input if t.name not in weights]),
        ("output", declared.output, list(onnx_model.graph.output)),
    ):
        want = [(t.name, "FP32", [-1, *t.dims]) for t in tensors]
        have = [
            (
                t.name,
                "FP32"
                if t.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
                else onnx.TensorProto.DataType.Name(t.type.tensor_type.elem_type),
                [
                    d.dim_value if d.HasField("dim_value") else -1
                    for d in t.type.tensor_type.shape.dim
                ],
            )
            for t in graph_tensors
        ]
        if have != want:
            raise UsageError(
                f"the exported graph's {kind}s are {describe(have)}; {CONFIG_FILE} declares "
                f"{describe(want)}: nothing published"
            )


def describe(tensors: list[tuple[str, str, list[int]]]) -> str:
    return ", ".join(f"{name!r} {dtype} {dims}" for name, dtype, dims in tensors) or "none"


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
    import onnxslim

    program = torch_export(net, opset)
    nodes_exported = len(program.model_proto.graph.node)
    with _quiet_exporter():
        program.optimize()
        optimised = onnxslim.slim(program.model_proto)
    check_servable(optimised, opset)
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


def check_servable(onnx_model: Any, opset: int) -> None:
    """Raise PipelineFailure unless Triton's onnxruntime loads `onnx_model` (a ModelProto):
    a newer torch, onnx or quantizer could stamp a model only newer runtimes load."""
    import onnx

    onnx.checker.check_model(onnx_model, full_check=True)
    opsets = {o.domain or "ai.onnx": o.version for o in onnx_model.opset_import}
    if opsets != {"ai.onnx": opset} or onnx_model.ir_version > TRITON_MAX_IR_VERSION:
        raise PipelineFailure(
            f"exported model uses opsets {opsets}, IR version {onnx_model.ir_version}: the "
            f"Triton image's onnxruntime {TRITON_ONNXRUNTIME_VERSION} needs standard ops at "
            f"opset <= {TRITON_MAX_OPSET} and IR version <= {TRITON_MAX_IR_VERSION}"
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
    options.intra_op_num_threads = available_cpus()  # not one per core of the node
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
    if not checkpoint.is_file():
        log.warning(
            "%s, the checkpoint of the served version %d, is gone: that model can no longer "
            "be exported again",
            checkpoint,
            champion.version,
        )
        if link.is_symlink() and not link.exists():
            log.warning("%s pointed at a file that is gone: removed", link)
            link.unlink()
        return
    if link.is_symlink() and link.resolve() == checkpoint.resolve():
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


def measure_accuracy(onnx_model: bytes, images: np.ndarray, labels: np.ndarray) -> Evaluation:
    """Accuracy of `onnx_model` on the whole MNIST test set (data.load has verified it
    against MNIST's checksums), with onnxruntime in batches: the figure the gate compares
    and metadata.json records."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = available_cpus()  # not one per core of the node
    session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
    correct = 0
    for i in range(0, len(images), EVAL_BATCH):
        batch = data.normalize(images[i : i + EVAL_BATCH])
        logits = session.run(["output"], {"input": batch})[0]
        correct += int((logits.argmax(1) == labels[i : i + EVAL_BATCH]).sum())
    return Evaluation(
        accuracy=correct / len(images),
        correct=correct,
        images=len(images),
        source=f"{EVAL_SOURCE}, onnxruntime {ort.__version__}",
        test_set_sha256=data.FILES[("test", "images")].sha256,
    )


def build(
    storage: Path, candidate: Candidate, precision: str, images: np.ndarray, labels: np.ndarray
) -> Built:
    """Export the candidate at `precision`, checked and measured on all test images.

    int8 starts from the fp32 export, itself checked against PyTorch first: its own
    accuracy is the figure the int8 model is held to."""
    exported = to_onnx(candidate.net)
    parity_inputs = data.normalize(images[:PARITY_SAMPLES])
    max_diff = check_parity(exported.content, candidate.net, parity_inputs)
    fp32 = measure_accuracy(exported.content, images, labels)
    record = {
        "precision": "fp32",
        "opset": exported.opset,
        "ir_version": exported.ir_version,
        "parity_max_abs_diff": max_diff,
        "parity_samples": PARITY_SAMPLES,
        "onnx_nodes": {"exported": exported.nodes_exported, "optimised": exported.nodes_optimised},
    }
    if precision == "fp32":
        return Built(exported.content, fp32, record)
    return build_int8(storage, exported.content, fp32, parity_inputs, images, labels, record)


def build_int8(
    storage: Path,
    fp32_model: bytes,
    fp32: Evaluation,
    parity_inputs: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    record: dict[str, Any],
) -> Built:
    """Quantise the fp32 export; refuse it when it loses accuracy against that export."""
    import onnx

    calibration = quantize.calibration_images(storage)
    content = quantize.quantize(fp32_model, calibration)
    quantised = onnx.load_from_string(content)
    check_servable(quantised, record["opset"])
    evaluation = measure_accuracy(content, images, labels)
    check_accuracy_loss(evaluation, fp32)
    agreement = quantize.check_agreement(content, fp32_model, parity_inputs)
    log.info(
        "int8 model: accuracy %.4f against the fp32 export's %.4f; top-1 agreement %.1f%% "
        "on %d test images, max logit difference %.3g",
        evaluation.accuracy,
        fp32.accuracy,
        100 * agreement["top1_agreement"],
        agreement["samples"],
        agreement["max_abs_logit_diff"],
    )
    return Built(
        content,
        evaluation,
        {
            **record,
            "precision": "int8",
            "fp32_accuracy": fp32.accuracy,
            "calibration": {"images": len(calibration), "source": quantize.CALIBRATION_SOURCE},
            "int8_parity": agreement,
            "onnx_nodes": {**record["onnx_nodes"], "quantised": len(quantised.graph.node)},
        },
    )


def check_accuracy_loss(int8: Evaluation, fp32: Evaluation) -> None:
    """Refuse an int8 model more than MAX_INT8_ACCURACY_LOSS below its own fp32 export
    (counted in images, so that float rounding cannot decide a tie)."""
    allowed = round(MAX_INT8_ACCURACY_LOSS * fp32.images)
    if fp32.correct - int8.correct > allowed:
        raise PipelineFailure(
            f"int8 model refused: accuracy {int8.accuracy:.4f} against {fp32.accuracy:.4f} "
            f"for the fp32 export of the same checkpoint (both on all {fp32.images} test "
            f"images) loses more than {100 * MAX_INT8_ACCURACY_LOSS:g} percentage point"
        )


def identical_version(
    store: repository.Store,
    weights: str,
    precision: str,
    onnx_sha256: str | None,
    skip: Collection[int] = (),
) -> int | None:
    """A published version (not in `skip`) holding the same model (same weights at the
    same precision, or the same ONNX bytes). The int8 and fp32 exports of one checkpoint
    are two models, each gated on its own accuracy."""
    for version in store.versions():
        if version in skip:
            continue
        meta = store.metadata(version) or {}
        same_weights = meta.get("weights_sha256") == weights
        if (same_weights and meta.get("precision") == precision) or (
            onnx_sha256 is not None and meta.get("sha256") == onnx_sha256
        ):
            return version
    return None


def write_marker(
    storage: Path, run_id: str | None, model_name: str, outcome: Outcome
) -> dict[str, Any] | None:
    """checkpoints/<run_id>/export.json: what export decided about this training run.
    Call only while holding the model's export lock (a read-modify-write).

    Its top-level fields are the run's standing outcome: once a run is published, a later
    attempt (skipped, failed) never erases that record; every attempt is kept in order
    under "history". Returns this attempt."""
    if run_id is None or not run_dir(storage, run_id).is_dir():
        return None
    run = run_dir(storage, run_id)
    attempt = {
        "status": outcome.status,
        "model_name": model_name,
        "version": outcome.version,
        "accuracy": outcome.accuracy,
        "champion_accuracy": outcome.champion_accuracy,
        "reason": outcome.reason,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        previous = read_export_record(run) or {}
    except UsageError as e:
        # export.json is this stage's own record: refusing to write it would leave the
        # run without an outcome for good, so a damaged one is started again.
        log.warning("%s: starting it again", e)
        previous = {}
    atomic_write_json(run / EXPORT_FILE, standing_record(previous, attempt))
    return attempt


def export(
    storage: Path,
    cfg: repository.TritonConfig,
    checkpoint: Path | None = None,
    run_id: str | None = None,
    min_improvement: float = 0.0,
    precision: str = "fp32",
    repo: ModelRepository | None = None,
    min_accuracy: float = settings.PUBLISH_MIN_ACCURACY.default,
) -> Outcome:
    """The export stage. Returns what happened; raises UsageError / PipelineFailure.

    `repo` is where versions are published (default STORAGE/models); the checkpoints,
    the data and the export lock stay on the volume."""
    try:
        cfg.validate()
    except ValueError as e:
        raise UsageError(str(e)) from e
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    path, owner = resolve_checkpoint(storage, checkpoint, run_id)
    store = repository.model_store(storage, repository_at(repo, storage), cfg.name)
    request = Request(storage, cfg, owner, precision, min_improvement, store, min_accuracy)
    try:
        return export_request(request, path)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: "interrupted", never "failed"
        with repository.locked(storage, cfg.name):
            request.record(failed(e))
        raise


def export_request(request: Request, path: Path) -> Outcome:
    """Load the checkpoint at `path`, gate it and publish it if better, recording the
    outcome (export() records an interrupt)."""
    storage, cfg = request.storage, request.cfg
    try:
        candidate = load_candidate(path)
        check_architecture(candidate, cfg)
    except UsageError as e:
        with repository.locked(storage, cfg.name):  # export.json is only written under it
            request.record(failed(e))
        raise
    log.info("candidate %s: training reported test accuracy %.4f", path, candidate.accuracy)
    with repository.locked(storage, cfg.name):
        try:
            return gate_and_publish(request, candidate)
        except OSError as e:  # a full or read-only volume: the waits must see the outcome
            with contextlib.suppress(OSError):  # the record may not fit either
                request.record(failed(PipelineFailure(f"{e.strerror or e}: {e.filename}")))
            raise


def gate_and_publish(request: Request, candidate: Candidate) -> Outcome:
    """Publish the candidate if it is a new model better than the published version.
    Call while holding the model's export lock."""
    store = request.store
    store.clean_stale()
    repair_config(request)
    # A damaged version is no champion and no twin: the candidate is gated against the
    # newest intact one, and a copy of a damaged served version is published again.
    damaged = repository.damaged_versions(store)
    champion = repository.champion(store, damaged)
    if champion is not None:
        repair_best_link(request.storage, champion)
    weights = candidate.weights_sha256
    # The cheap check first: the same weights need no export to be recognised.
    same = identical_version(store, weights, request.precision, None, damaged)
    if same is not None:
        refuse_if_served_damaged(request, damaged)
        return skip_identical(request, same, champion)
    try:
        built = build_measured(request, candidate)
    except (PipelineFailure, UsageError) as e:
        request.record(failed(e))
        raise
    # Object storage: exports from other volumes gate and publish one at a time too.
    with store.exclusive():
        return decide(request, candidate, built, repository.champion(store, damaged), damaged)


def decide(
    request: Request,
    candidate: Candidate,
    built: Built,
    champion: repository.Champion | None,
    damaged: dict[int, str],
) -> Outcome:
    """Publish or skip the built candidate; call holding every lock of the repository."""
    store, weights = request.store, candidate.weights_sha256
    same = identical_version(store, weights, request.precision, built.sha256, damaged)
    if same is not None:
        refuse_if_served_damaged(request, damaged)
        return skip_identical(request, same, champion)
    if built.evaluation.accuracy < request.min_accuracy:
        error = PipelineFailure(
            f"not published: accuracy {built.evaluation.accuracy:.4f} on all "
            f"{built.evaluation.images} test images is below the publishing floor "
            f"{request.min_accuracy:g} (--publish-min-accuracy): the model did not learn enough"
        )
        request.record(failed(error))
        raise error
    found = store.versions()
    twin = identical_version(store, weights, request.precision, None, set(found) - set(damaged))
    if twin is not None and twin == found[-1]:  # the served version, damaged
        return publish(request, candidate, built, champion, f"republished: {damaged[twin]}")
    if champion is not None and not (
        built.evaluation.accuracy > champion.accuracy + request.min_improvement
    ):
        refuse_if_served_damaged(request, damaged)
        return skip_not_better(request, built, champion)
    return publish(request, candidate, built, champion)


def refuse_if_served_damaged(request: Request, damaged: dict[int, str]) -> None:
    """Before a skip: Triton serves the newest version, so skipping over a damaged one
    would leave the repository unservable with exit 0."""
    found = request.store.versions()
    if found and found[-1] in damaged:
        newest = found[-1]
        error = PipelineFailure(
            f"not published, and the served version {newest} is damaged: {damaged[newest]}; "
            + repository.republish_hint(request.store.metadata, newest)
        )
        request.record(failed(error))
        raise error


def repair_config(request: Request) -> None:
    """Rewrite a config.pbtxt that no longer parses: it is derived from the export's
    settings alone, and every version is unservable without it."""
    why = request.store.config_damage()
    if why:
        log.warning("%s; rewritten from this export's settings", why)
        request.store.write_config(repository.render_config(request.cfg))


def build_measured(request: Request, candidate: Candidate) -> Built:
    import onnx

    images, labels = data.load(request.storage, "test")
    built = build(request.storage, candidate, request.precision, images, labels)
    check_contract(onnx.load_from_string(built.content), request.cfg)
    log.info(
        "exported %s model: accuracy %.4f on all %d MNIST test images (%s)",
        request.precision,
        built.evaluation.accuracy,
        built.evaluation.images,
        built.evaluation.source,
    )
    return built


def skip_identical(request: Request, same: int, champion: repository.Champion | None) -> Outcome:
    """Never publish a model twice: it would only add a version serving the same thing."""
    meta = request.store.metadata(same) or {}
    accuracy = float(meta["accuracy"])
    if request.owner is not None and meta.get("run_id") == request.owner:
        # The repository's record: on object storage another volume's export of a run of
        # the same name may have published it.
        record = request.store.read_record(request.owner)[0] or {}
        if (record.get("status"), record.get("version")) != (ExportStatus.PUBLISHED, same):
            # An export killed between publishing and recording: the version is this run's.
            reason = f"published as version {same} by an earlier export whose record was lost"
            log.info("%s: recorded now", reason)
            return request.record(Outcome(ExportStatus.PUBLISHED, same, accuracy, None, reason))
    reason = f"identical to the published version {same} (same model), not published again"
    log.info("not exported: %s", reason)
    champion_acc = None if champion is None else champion.accuracy
    version = None if champion is None else champion.version
    return request.record(Outcome(ExportStatus.SKIPPED, version, accuracy, champion_acc, reason))


def skip_not_better(request: Request, built: Built, champion: repository.Champion) -> Outcome:
    accuracy, best = built.evaluation.accuracy, champion.accuracy
    reason = (
        f"not better: accuracy {accuracy:.4f} ({request.precision}) does not beat "
        f"the published version {champion.version}'s {best:.4f} "
        f"({champion.metadata.get('precision')})"
        + (f" by more than {request.min_improvement:g}" if request.min_improvement else "")
        + f" (both on all {built.evaluation.images} test images)"
    )
    log.info("not exported: %s", reason)
    return request.record(Outcome(ExportStatus.SKIPPED, champion.version, accuracy, best, reason))


def publish(
    request: Request,
    candidate: Candidate,
    built: Built,
    champion: repository.Champion | None,
    reason: str | None = None,
) -> Outcome:
    """Publish the built model as the next version, point best_model.pth at it, record it."""
    version = publish_version(request, candidate, built, champion)
    return published(request, candidate, built, champion, version, reason)


def publish_version(
    request: Request, candidate: Candidate, built: Built, champion: repository.Champion | None
) -> int:
    """Publish the built model as the next version; a failure is recorded, then raised."""
    best = None if champion is None else champion.accuracy
    metadata = version_metadata(request, candidate, built, best)
    try:
        return request.store.publish(
            repository.render_config(request.cfg), {MODEL_FILE: built.content}, metadata
        )
    except (PipelineFailure, UsageError, OSError) as e:
        request.record(failed(PipelineFailure(f"publication failed: {e}")))
        raise


def published(
    request: Request,
    candidate: Candidate,
    built: Built,
    champion: repository.Champion | None,
    version: int,
    reason: str | None = None,
) -> Outcome:
    """Point best_model.pth at the published checkpoint and record the publication."""
    update_best_link(request.storage, candidate.path)
    best = None if champion is None else champion.accuracy
    accuracy, images = built.evaluation.accuracy, built.evaluation.images
    if reason is None:
        reason = (
            ("first export" if version == 1 else "no intact version to beat")
            if champion is None
            else f"accuracy {accuracy:.4f} ({request.precision}) beats version "
            f"{champion.version}'s {best:.4f} (both on all {images} test images)"
        )
    log.info(
        "published %s version %d (%s) to %s",
        request.cfg.name,
        version,
        reason,
        request.store.url(str(version)),
    )
    # Still under the lock: export.json is read, extended and rewritten, and a
    # concurrent export of the same run must see the publication, not overwrite it.
    return request.record(Outcome(ExportStatus.PUBLISHED, version, accuracy, best, reason))


def version_metadata(
    request: Request, candidate: Candidate, built: Built, previous_accuracy: float | None
) -> dict[str, Any]:
    """metadata.json of the version about to be published (publish adds "version")."""
    import onnxruntime

    return {
        "model_name": request.cfg.name,
        "export_date": datetime.now(UTC).isoformat(timespec="seconds"),
        "accuracy": built.evaluation.accuracy,
        "evaluation": built.evaluation.record(),
        "training_reported_accuracy": candidate.accuracy,
        "source_model": relative_to_storage(request.storage, candidate.path),
        "run_id": candidate.payload.get("run_id", request.owner),
        "sha256": built.sha256,
        "weights_sha256": candidate.weights_sha256,
        **built.record,
        "parameters": sum(p.numel() for p in candidate.net.parameters()),
        "onnxruntime_version": onnxruntime.__version__,
        "previous_accuracy": previous_accuracy,
    }
