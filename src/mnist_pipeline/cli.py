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
        "--storage", envvar="STORAGE_ROOT", default=DEFAULT_STORAGE, show_default=True,
        show_envvar=True, type=click.Path(file_okay=False, path_type=Path),
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
@click.option("--source", envvar="MNIST_SOURCE", type=click.Path(path_type=Path), default=None,
              help="Folder holding the four MNIST IDX files, .gz or raw. "
                   "Default: the copy shipped with the project (data/mnist).")
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
@click.option("--lr", envvar="LR", type=click.FloatRange(min=0, min_open=True), default=0.05,
              help="Peak learning rate.")
@click.option("--optimizer", envvar="OPTIMIZER", type=click.Choice(["sgd", "adamw", "adam"]),
              default="sgd")
@click.option("--schedule", envvar="SCHEDULE", type=click.Choice(["onecycle", "constant"]),
              default="onecycle", help="One-cycle warm-up + cosine decay, or a constant lr.")
@click.option("--weight-decay", envvar="WEIGHT_DECAY", type=click.FloatRange(min=0),
              default=5e-4)
@click.option("--label-smoothing", envvar="LABEL_SMOOTHING",
              type=click.FloatRange(min=0, max=1, max_open=True), default=0.1)
@click.option("--seed", envvar="SEED", type=int, default=0)
@click.option("--limit-train", envvar="LIMIT_TRAIN", type=click.IntRange(min=0), default=0,
              help="Train on the first N images only (0: all 60000), for quick runs.")
@click.option("--run-id", envvar="RUN_ID", default=None,
              help="Name of the run folder. Re-running with the same id resumes it. "
                   "Default: the UTC time.")
@click.option("--device", envvar="DEVICE", type=click.Choice(["auto", "cpu", "cuda"]),
              default="auto")
@click.option("--threads", envvar="THREADS", type=click.IntRange(min=0), default=0,
              help="CPU threads (0: every CPU this process may use, cgroup limit included).")
@click.option("--checkpoint-every", envvar="CHECKPOINT_EVERY", type=click.IntRange(min=0),
              default=200, help="Also save a resumable checkpoint every N steps (0: epochs only).")
@stage
def train(storage: Path, epochs: int, batch_size: int, lr: float, optimizer: str, schedule: str,
          weight_decay: float, label_smoothing: float, seed: int, limit_train: int,
          run_id: str | None, device: str, threads: int, checkpoint_every: int) -> None:
    """Train ResNet-18 on MNIST read from STORAGE (never downloaded).

    Writes STORAGE/checkpoints/RUN_ID/{model.pth,train.log,metrics.json}. Killed and
    started again with the same --run-id, it continues from its last checkpoint.
    """
    from mnist_pipeline import train as train_stage

    cfg = train_stage.TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, schedule=schedule,
        weight_decay=weight_decay, label_smoothing=label_smoothing, seed=seed,
        limit_train=limit_train,
    )
    train_stage.train(storage, cfg, run_id=run_id, device=device, threads=threads,
                      checkpoint_every=checkpoint_every)


@cli.command()
@storage_option
@click.pass_context
@stage
def run(ctx: click.Context, storage: Path) -> None:
    """Run every stage locally on STORAGE with the default settings."""
    ctx.invoke(data, storage=storage)
    ctx.invoke(train, storage=storage)


def wait_options(f: F) -> F:
    options = [
        storage_option,
        click.option("--run-id", envvar="RUN_ID", required=True,
                     help="The run to wait for (the chart gives each release revision its own)."),
        click.option("--timeout", envvar="WAIT_TIMEOUT", type=click.FloatRange(min=0, min_open=True),
                     default=21600, help="Give up (exit 1) after this many seconds."),
        click.option("--interval", envvar="WAIT_INTERVAL",
                     type=click.FloatRange(min=0, min_open=True), default=5,
                     help="Seconds between looks."),
        click.option("--job", envvar="WAIT_JOB", default=None,
                     help="Kubernetes Job producing the artifact: its Failed condition fails "
                          "the wait at once. Read only where the pod has a service account "
                          "token; a deleted Job is ignored."),
        click.option("--namespace", envvar="POD_NAMESPACE", default=None,
                     help="Namespace of --job (default: the pod's own)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@cli.group()
def wait() -> None:
    """Block until an earlier stage of a run is done; exit 1 at once if it failed.

    The Helm chart's initContainers use these to enforce the order
    training → export → Triton → client. Artifacts on storage decide; the Kubernetes
    API (--job) only adds failures an artifact cannot report (a pod killed for memory).
    """


@wait.command("training")
@wait_options
@stage
def wait_training(storage: Path, run_id: str, timeout: float, interval: float, job: str | None,
                  namespace: str | None) -> None:
    """Until checkpoints/RUN_ID/metrics.json says complete."""
    from mnist_pipeline import waits

    w = waits.make_wait(f"training run {run_id}", timeout, interval, job, namespace)
    w.run(waits.training_check(storage, run_id))


@wait.command("export")
@wait_options
@click.option("--model-name", envvar="MODEL_NAME", default="resnet18_mnist")
@stage
def wait_export(storage: Path, run_id: str, timeout: float, interval: float, job: str | None,
                namespace: str | None, model_name: str) -> None:
    """Until the export of RUN_ID is published or skipped and models/NAME is servable."""
    from mnist_pipeline import waits

    w = waits.make_wait(f"export of run {run_id}", timeout, interval, job, namespace)
    w.run(waits.export_check(storage, run_id, model_name))


@wait.command("serving")
@wait_options
@click.option("--model-name", envvar="MODEL_NAME", default="resnet18_mnist")
@click.option("--url", envvar="TRITON_HTTP_URL", required=True,
              help="Triton's HTTP endpoint, HOST:PORT.")
@stage
def wait_serving(storage: Path, run_id: str, timeout: float, interval: float, job: str | None,
                 namespace: str | None, model_name: str, url: str) -> None:
    """Until Triton at URL is ready and serves the model version RUN_ID exported."""
    from mnist_pipeline import waits

    w = waits.make_wait(f"Triton serving run {run_id}", timeout, interval, job, namespace)
    w.run(waits.serving_check(storage, run_id, model_name, url))


def main() -> None:
    cli(auto_envvar_prefix=None)
