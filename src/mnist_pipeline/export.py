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
import dataclasses
import difflib
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

from mnist_pipeline import data, gate, interrupts, model, quantize, settings
from mnist_pipeline.errors import PipelineFailure, UsageError
from mnist_pipeline.registry import sync_after_export
from mnist_pipeline.repository import (
    CHALLENGER,
    PUBLISHED,
    Repository,
    Scan,
    Version,
    open_repository,
    republish_hint,
)
from mnist_pipeline.storage import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    ExportStatus,
    ModelRepository,
    RunStatus,
    available_cpus,
    best_model_link,
    checkpoints_dir,
    fsync_dir,
    read_metrics,
    repository_at,
    run_dir,
    validate_name,
)
from mnist_pipeline.tracking import UNTRACKED, Tracking
from mnist_pipeline.tritonconfig import TritonConfig, parse_config, render_config

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
class PublishConfig(settings.Settings):
    """Whether and how export publishes (settings.py declares each)."""

    min_improvement: float = settings.MIN_IMPROVEMENT.field()
    min_accuracy: float = settings.PUBLISH_MIN_ACCURACY.field()
    precision: str = settings.PRECISION.field()

    @property
    def rules(self) -> gate.Rules:
        return gate.Rules(self.min_improvement, self.min_accuracy)


@dataclass(frozen=True)
class Job:
    """One export: of which training run's checkpoint (`owner`, if any), to which
    repository, how, and what it takes to replace the published version."""

    storage: Path
    cfg: TritonConfig
    owner: str | None
    publish: PublishConfig
    repo: Repository
    canary: bool = False  # publish as the challenger of a canary release

    def record(self, outcome: Outcome) -> Outcome:
        """Add `outcome` to the owner's record in the repository (under its lock)."""
        if self.owner is None:
            return outcome
        attempt = {
            "status": outcome.status,
            "model_name": self.cfg.name,
            "version": outcome.version,
            "accuracy": outcome.accuracy,
            "champion_accuracy": outcome.champion_accuracy,
            "reason": outcome.reason,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        with self.repo.lock.held("export"):
            self.repo.record(self.owner, attempt)
        return outcome

    def record_failure(self, error: BaseException) -> None:
        """Record what ended the export; a repository that cannot take it is named, and the
        original error still ends the stage."""
        try:
            self.record(failed(error))
        except (PipelineFailure, UsageError, OSError) as e:
            log.warning("the outcome could not be recorded: %s", e)


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
    storage: Path, checkpoint: Path | None, run_id: str | None, metrics: dict[str, Any] | None
) -> tuple[Path, str | None]:
    """Which model.pth to export, and the training run it belongs to (if any); `metrics`:
    the run's, where training just returned them (else read)."""
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
    check_complete(storage, run_id, metrics)
    return run_dir(storage, run_id) / CHECKPOINT_FILE, run_id


def check_complete(storage: Path, run_id: str, metrics: dict[str, Any] | None = None) -> None:
    """Raise UsageError, saying what to do, unless training run `run_id` is complete."""
    run = run_dir(storage, run_id)
    if not run.is_dir():
        raise UsageError(missing_run_message(storage, run_id))
    metrics = metrics or read_metrics(run)
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


def check_architecture(candidate: Candidate, cfg: TritonConfig) -> None:
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


def check_contract(onnx_model: Any, cfg: TritonConfig) -> None:
    """Raise UsageError unless the graph's inputs and outputs are exactly what config.pbtxt
    declares (names, FP32, the batch dimension then the declared dims): Triton refuses a
    model that differs, and with model control mode none the server then does not start."""
    import onnx

    declared = parse_config(render_config(cfg))
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


def point_best_model(storage: Path, champion: Version | None) -> None:
    """Point checkpoints/best_model.pth at the checkpoint the repository's champion (its
    newest published version) was exported from, when this volume holds it."""
    source = None if champion is None else champion.metadata.get("source_model")
    if champion is None or not isinstance(source, str):
        return
    checkpoint = Path(source) if Path(source).is_absolute() else storage / source
    link = best_model_link(storage)
    if not checkpoint.is_file():
        log.info("%s, the champion version %d's checkpoint, is not on this volume: %s "
                 "unchanged", checkpoint, champion.number, link)  # fmt: skip
        if link.is_symlink() and not link.exists():
            log.warning("%s pointed at a file that is gone: removed", link)
            link.unlink()
        return
    if link.is_symlink() and link.resolve() == checkpoint.resolve():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(checkpoint.resolve(), link.parent.resolve()), tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)
    log.info("%s -> %s (version %d)", link, checkpoint, champion.number)


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


def export(
    storage: Path,
    cfg: TritonConfig,
    checkpoint: Path | None = None,
    run_id: str | None = None,
    publish: PublishConfig = PublishConfig(),
    repo: ModelRepository | None = None,
    tracking: Tracking = UNTRACKED,
    canary: bool = False,
    trained: dict[str, Any] | None = None,
) -> Outcome:
    """The export stage. Returns what happened; raises UsageError / PipelineFailure.

    `repo` is where versions are published (default STORAGE/models); the checkpoints
    and the data stay on the volume. With `tracking.uri` the MLflow registry is brought in
    line with the repository afterwards (registry.py). `trained`: the metrics training
    run `run_id` just returned, where it ran in this process."""
    path, owner = resolve_checkpoint(storage, checkpoint, run_id, trained)
    repository = open_repository(repository_at(repo, storage), cfg.name)
    job = Job(storage, cfg, owner, publish, repository, canary)
    try:
        outcome = export_job(job, path)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: "interrupted", never "failed"
        job.record_failure(e)
        raise
    sync_after_export(repository, tracking)
    return outcome


def export_job(job: Job, path: Path) -> Outcome:
    """Load the checkpoint at `path`; under the repository's lock, judge it by its weights
    alone (a model already published needs no export), else build and measure it outside
    the lock and judge it again under it; apply the decision."""
    try:
        candidate = load_candidate(path)
        check_architecture(candidate, job.cfg)
    except UsageError as e:
        job.record_failure(e)
        raise
    log.info("candidate %s: training reported test accuracy %.4f", path, candidate.accuracy)
    offer = gate.Candidate(job.owner, candidate.weights_sha256, job.publish.precision)
    try:
        with job.repo.lock.held("export"):
            scan, decision = judge(job, offer)
            if decision.action != gate.BUILD:
                return apply(job, candidate, None, scan, decision)
        try:
            built = build_measured(job, candidate)
        except (PipelineFailure, UsageError) as e:
            job.record_failure(e)
            raise
        offer = dataclasses.replace(offer, sha256=built.sha256, accuracy=built.evaluation.accuracy,
                                    images=built.evaluation.images)  # fmt: skip
        with job.repo.lock.held("export"):
            scan, decision = judge(job, offer)
            return apply(job, candidate, built, scan, decision)
    except OSError as e:  # a full or read-only volume: the waits must see the outcome
        job.record_failure(PipelineFailure(describe_error(e)))
        raise


def describe_error(e: Exception) -> str:
    """'No space left on device: PATH' rather than Python's "[Errno 28] …: 'PATH'"."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"{e.strerror}: {e.filename}"
    return str(e)


def judge(job: Job, offer: gate.Candidate) -> tuple[Scan, gate.Decision]:
    """The repository repaired and scanned, its champion verified byte for byte (its
    metadata.json against the ledger, its model.onnx against metadata.json), and the
    gate's decision on it. Call holding the repository's lock."""
    scan = job.repo.repair()
    if scan.config_damage:
        log.warning("%s; rewritten from this export's settings", scan.config_damage)
        job.repo.write_config(render_config(job.cfg))
        scan = job.repo.scan()
    champion = scan.champion
    mismatch = (
        None if champion is None or champion.state != PUBLISHED else job.repo.verify(champion)
    )
    if champion is not None and mismatch:
        scan = scan.damaging(champion.number, mismatch)
    for number, why in scan.damaged.items() if offer.accuracy is None else ():  # once
        hint = republish_hint(scan.versions[number])
        log.error("damaged model version %s: %s; %s", job.repo.url(str(number)), why, hint)
    record = None if job.owner is None else job.repo.read_record(job.owner)
    return scan, gate.decide(offer, scan, record, job.publish.rules)


def apply(
    job: Job, candidate: Candidate, built: Built | None, scan: Scan, decision: gate.Decision
) -> Outcome:
    """Carry out the gate's decision and record it. Call holding the repository's lock."""
    champion = decision.champion
    best = None if champion is None else champion.accuracy
    if decision.action == gate.REFUSE:
        error = PipelineFailure(decision.reason)
        job.record(failed(error))
        raise error
    if decision.action in (gate.SKIP, gate.RECORD):
        log.info("not exported: %s", decision.reason)
        status = ExportStatus.SKIPPED if decision.action == gate.SKIP else ExportStatus.PUBLISHED
        point_best_model(job.storage, scan.champion)
        return job.record(
            Outcome(status, decision.version, decision.accuracy, best, decision.reason)
        )
    assert decision.action == gate.PUBLISH and built is not None
    metadata = version_metadata(job, candidate, built, best)
    # A first release has nothing to compare a challenger with: it is the champion.
    canary = job.canary and champion is not None
    release = CHALLENGER if canary else None
    try:
        config = render_config(job.cfg)
        version = job.repo.publish(config, {MODEL_FILE: built.content}, metadata, release)
    except (PipelineFailure, UsageError, OSError) as e:
        error = PipelineFailure(f"publication failed: {describe_error(e)}")
        job.record_failure(error)
        raise error from e
    log.info("published %s version %d (%s) to %s", job.cfg.name, version, decision.reason,
             job.repo.url(str(version)))  # fmt: skip
    reason = decision.reason
    if canary:
        reason += "; the challenger of a canary release: `mnist-pipeline canary` decides"
        log.info("version %d is the challenger: the champion stays served by default until "
                 "`mnist-pipeline canary --run-id %s` promotes it", version, job.owner)  # fmt: skip
    point_best_model(job.storage, job.repo.scan().champion)
    outcome = Outcome(ExportStatus.PUBLISHED, version, decision.accuracy, best, reason)
    return job.record(outcome)


def build_measured(job: Job, candidate: Candidate) -> Built:
    import onnx

    images, labels = data.load(job.storage, "test")
    built = build(job.storage, candidate, job.publish.precision, images, labels)
    check_contract(onnx.load_from_string(built.content), job.cfg)
    log.info(
        "exported %s model: accuracy %.4f on all %d MNIST test images (%s)",
        job.publish.precision,
        built.evaluation.accuracy,
        built.evaluation.images,
        built.evaluation.source,
    )
    return built


def version_metadata(
    job: Job, candidate: Candidate, built: Built, previous_accuracy: float | None
) -> dict[str, Any]:
    """metadata.json of the version about to be published (publish adds "version")."""
    import onnxruntime

    return {
        "model_name": job.cfg.name,
        "export_date": datetime.now(UTC).isoformat(timespec="seconds"),
        "accuracy": built.evaluation.accuracy,
        "evaluation": built.evaluation.record(),
        "training_reported_accuracy": candidate.accuracy,
        "source_model": relative_to_storage(job.storage, candidate.path),
        "run_id": candidate.payload.get("run_id", job.owner),
        "sha256": built.sha256,
        "weights_sha256": candidate.weights_sha256,
        **built.record,
        "parameters": sum(p.numel() for p in candidate.net.parameters()),
        "onnxruntime_version": onnxruntime.__version__,
        "previous_accuracy": previous_accuracy,
    }
