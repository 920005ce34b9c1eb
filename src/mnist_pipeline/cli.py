"""The `mnist-pipeline` command line.

Every option can also be set through the environment variable shown in --help, so
Kubernetes manifests configure the stages the way the original Jobs did.
Exit codes: 0 done (an export skipped as not better is done), 1 failure, 2 bad input or usage.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from mnist_pipeline import __version__
from mnist_pipeline.storage import DEFAULT_STORAGE, PipelineFailure, UsageError

log = logging.getLogger("mnist_pipeline")
F = TypeVar("F", bound=Callable[..., Any])


def storage_option(f: F) -> F:
    return click.option(
        "--storage",
        envvar="STORAGE_ROOT",
        default=DEFAULT_STORAGE,
        show_default=True,
        show_envvar=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Root of the shared storage (the PVC is mounted at /storage).",
    )(f)


def stage(f: F) -> F:
    """Map the project's errors onto exit codes, with one clear line instead of a traceback."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except UsageError as e:
            log.error("%s", e)
            sys.exit(2)
        except PipelineFailure as e:
            log.error("%s", e)
            sys.exit(1)
        except KeyboardInterrupt:
            log.error("interrupted")
            sys.exit(130)
        except OSError as e:
            # Storage read-only, full or missing: say which file and why, not a traceback.
            log.error("%s", e)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="mnist-pipeline")
@click.option("-v", "--verbose", is_flag=True, envvar="VERBOSE", help="Debug logging.")
def cli(verbose: bool) -> None:
    """Train ResNet-18 on MNIST, export it to ONNX, serve it with Triton, measure it.

    \b
    The stages share one storage folder (--storage, env STORAGE_ROOT):
      mnist-pipeline data     place verified MNIST into storage
      mnist-pipeline train    train, resumably; checkpoint + train.log + metrics.json
      mnist-pipeline export   ONNX + Triton repository, only if better than the served model
      mnist-pipeline serve    run Triton locally on the repository
      mnist-pipeline infer    gRPC client: predictions and latency
      mnist-pipeline run      all of the above, locally
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        stream=sys.stderr,
    )


@cli.command()
@storage_option
@click.option(
    "--source",
    envvar="MNIST_SOURCE",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder holding the four MNIST IDX files, .gz or raw. "
    "Default: the copy shipped with the project (data/mnist).",
)
@stage
def data(storage: Path, source: Path | None) -> None:
    """Place the four MNIST files, verified, at STORAGE/data/MNIST/raw.

    Checks content checksums, IDX magic numbers and record counts; a bad file is
    named and nothing is written. Valid files already in place are left alone.
    """
    from mnist_pipeline import data as data_stage

    data_stage.place(storage, source)


@cli.command()
@storage_option
@click.option("--epochs", envvar="EPOCHS", type=click.IntRange(min=1), default=1)
@click.option("--batch-size", envvar="BATCH_SIZE", type=click.IntRange(min=2), default=128)
@click.option(
    "--lr",
    envvar="LR",
    type=click.FloatRange(min=0, min_open=True),
    default=0.05,
    help="Peak learning rate.",
)
@click.option(
    "--optimizer", envvar="OPTIMIZER", type=click.Choice(["sgd", "adamw", "adam"]), default="sgd"
)
@click.option(
    "--schedule",
    envvar="SCHEDULE",
    type=click.Choice(["onecycle", "constant"]),
    default="onecycle",
    help="One-cycle warm-up + cosine decay, or a constant lr.",
)
@click.option("--weight-decay", envvar="WEIGHT_DECAY", type=click.FloatRange(min=0), default=5e-4)
@click.option(
    "--label-smoothing",
    envvar="LABEL_SMOOTHING",
    type=click.FloatRange(min=0, max=1, max_open=True),
    default=0.1,
)
@click.option("--seed", envvar="SEED", type=int, default=0)
@click.option(
    "--limit-train",
    envvar="LIMIT_TRAIN",
    type=click.IntRange(min=0),
    default=0,
    help="Train on the first N images only (0: all 60000), for quick runs.",
)
@click.option(
    "--limit-test",
    envvar="LIMIT_TEST",
    type=click.IntRange(min=0),
    default=0,
    help="Evaluate on the first N test images only (0: all 10000), for quick runs.",
)
@click.option(
    "--run-id",
    envvar="RUN_ID",
    default=None,
    help="Name of the run folder. Re-running with the same id resumes it. Default: the UTC time.",
)
@click.option(
    "--device", envvar="DEVICE", type=click.Choice(["auto", "cpu", "cuda"]), default="auto"
)
@click.option(
    "--threads",
    envvar="THREADS",
    type=click.IntRange(min=0),
    default=0,
    help="CPU threads (0: every CPU this process may use, cgroup limit included).",
)
@click.option(
    "--checkpoint-every",
    envvar="CHECKPOINT_EVERY",
    type=click.IntRange(min=0),
    default=200,
    help="Also save a resumable checkpoint every N steps (0: epochs only).",
)
@click.option(
    "--eval-every",
    envvar="EVAL_EVERY",
    type=click.IntRange(min=0),
    default=0,
    help="Also measure test accuracy every N steps (0: at epoch ends only).",
)
@stage
def train(
    storage: Path,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str,
    schedule: str,
    weight_decay: float,
    label_smoothing: float,
    seed: int,
    limit_train: int,
    limit_test: int,
    run_id: str | None,
    device: str,
    threads: int,
    checkpoint_every: int,
    eval_every: int,
) -> None:
    """Train ResNet-18 on MNIST read from STORAGE (never downloaded).

    Writes STORAGE/checkpoints/RUN_ID/{model.pth,train.log,metrics.json}. Killed and
    started again with the same --run-id, it continues from its last checkpoint.
    """
    from mnist_pipeline import train as train_stage

    cfg = train_stage.TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        schedule=schedule,
        weight_decay=weight_decay,
        label_smoothing=label_smoothing,
        seed=seed,
        limit_train=limit_train,
        limit_test=limit_test,
    )
    train_stage.train(
        storage,
        cfg,
        run_id=run_id,
        device=device,
        threads=threads,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
    )


@cli.command()
@storage_option
@click.pass_context
@stage
def run(ctx: click.Context, storage: Path) -> None:
    """Run every stage locally on STORAGE with the default settings."""
    ctx.invoke(data, storage=storage)
    ctx.invoke(train, storage=storage)


def _batch_sizes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected integers such as 2,4,8") from None
    if any(s < 1 for s in sizes):
        raise click.BadParameter(f"{value!r}: batch sizes must be at least 1")
    return sizes


@cli.command()
@storage_option
@click.option(
    "--model-name",
    show_envvar=True,
    envvar="MODEL_NAME",
    default="resnet18_mnist",
    help="Model name in the Triton repository (and in config.pbtxt).",
)
@click.option(
    "--checkpoint",
    show_envvar=True,
    envvar="CHECKPOINT",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Export this model.pth. Default: the newest completed training run's.",
)
@click.option(
    "--run-id",
    show_envvar=True,
    envvar="RUN_ID",
    default=None,
    help="Export this training run's checkpoint (the chart passes its training Job's).",
)
@click.option(
    "--min-improvement",
    show_envvar=True,
    envvar="MIN_IMPROVEMENT",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Publish only if test accuracy beats the published model's by more than this.",
)
@click.option(
    "--max-batch-size",
    show_envvar=True,
    envvar="MAX_BATCH_SIZE",
    type=click.IntRange(min=1),
    default=16,
    help="config.pbtxt max_batch_size.",
)
@click.option(
    "--instance-count",
    show_envvar=True,
    envvar="INSTANCE_COUNT",
    type=click.IntRange(min=1),
    default=2,
    help="config.pbtxt instance_group count (KIND_CPU).",
)
@click.option(
    "--preferred-batch-sizes",
    show_envvar=True,
    envvar="PREFERRED_BATCH_SIZES",
    default="2,4,8",
    callback=_batch_sizes,
    help="config.pbtxt dynamic_batching preferred_batch_size, comma-separated.",
)
@click.option(
    "--pinned-memory/--no-pinned-memory",
    show_envvar=True,
    envvar="PINNED_MEMORY",
    default=True,
    help="config.pbtxt input/output pinned memory.",
)
@stage
def export(
    storage: Path,
    model_name: str,
    checkpoint: Path | None,
    run_id: str | None,
    min_improvement: float,
    max_batch_size: int,
    instance_count: int,
    preferred_batch_sizes: tuple[int, ...],
    pinned_memory: bool,
) -> None:
    """Convert a checkpoint to ONNX and publish it to Triton's repository if it is better.

    \b
    Publishes STORAGE/models/MODEL_NAME/VERSION/{model.onnx,metadata.json} and
    STORAGE/models/MODEL_NAME/config.pbtxt only when the checkpoint's test accuracy beats
    the newest published version's by more than --min-improvement (the first export
    always publishes), and only after onnxruntime reproduces PyTorch's outputs on real
    test images. A version appears whole or not at all; concurrent exports are
    serialised. checkpoints/best_model.pth then points at the published checkpoint.
    Not better: logged, exit 0, repository unchanged. A training run's outcome is also
    written to checkpoints/RUN_ID/export.json.
    """
    from mnist_pipeline import export as export_stage
    from mnist_pipeline.repository import TritonConfig

    cfg = TritonConfig(
        name=model_name,
        max_batch_size=max_batch_size,
        instance_count=instance_count,
        preferred_batch_sizes=preferred_batch_sizes,
        pinned_memory=pinned_memory,
    )
    export_stage.export(
        storage, cfg, checkpoint=checkpoint, run_id=run_id, min_improvement=min_improvement
    )


def main() -> None:
    cli(auto_envvar_prefix=None)
