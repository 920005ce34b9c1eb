"""The `mnist-pipeline` command line.

Every option can also be set through the environment variable shown in --help, so
Kubernetes manifests configure the stages the way the original Jobs did.
Exit codes: 0 done (an export skipped as not better is done), 1 failure, 2 bad input or usage,
130 interrupted by Ctrl-C and 143 stopped by SIGTERM (128 + the signal, as shells report them).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from mnist_pipeline import __version__
from mnist_pipeline.storage import DEFAULT_STORAGE, MAX_EPOCHS, PipelineFailure, UsageError

log = logging.getLogger("mnist_pipeline")
F = TypeVar("F", bound=Callable[..., Any])


def env_error_hint(ctx: click.Context, e: click.BadParameter) -> None:
    """Make a bad value that came from the environment name its variable first, not the
    option the user never typed: "Invalid value for EPOCHS='0' (the variable of '--epochs')"."""
    param = e.param
    if not isinstance(param, click.Option) or param.name is None:
        return
    if ctx.get_parameter_source(param.name) is not ParameterSource.ENVIRONMENT:
        return
    names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or [])
    var = next((n for n in names if n in os.environ), names[0] if names else None)
    if var is not None:
        flags = " / ".join(repr(o) for o in param.opts)
        e.param_hint = f"{var}={os.environ.get(var, '')!r} (the variable of {flags})"


def show_envvars(params: list[click.Parameter]) -> None:
    for param in params:
        if isinstance(param, click.Option) and param.envvar:
            param.show_envvar = True


class EnvCommand(click.Command):
    """Every option's variable shown in --help; an invalid value from a variable names it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        show_envvars(self.params)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.BadParameter as e:
            env_error_hint(ctx, e)
            raise


class EnvGroup(click.Group):
    command_class = EnvCommand
    group_class = type  # subgroups (wait) behave the same

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        show_envvars(self.params)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.BadParameter as e:
            env_error_hint(ctx, e)
            raise


class FiniteFloatRange(click.FloatRange):
    """Every float option's type: a range that also refuses nan and inf. NaN passes every
    bound (all its comparisons are false), and no setting here means anything infinite:
    LR=nan trained to a NaN model and wrote NaN into metrics.json."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


def _name(what: str) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    """A click callback applying storage's one rule for names that become paths."""

    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        from mnist_pipeline.storage import validate_name

        if value is None:
            return None
        try:
            return validate_name(value, what)
        except UsageError as e:
            raise click.BadParameter(str(e), ctx, param) from None

    return check


def model_name_option(f: F) -> F:
    """The model of the Triton repository that prune and pin look after."""
    return click.option(
        "--model-name", envvar="MODEL_NAME", default="resnet18_mnist", callback=_name("model name")
    )(f)


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
        except KeyboardInterrupt as e:  # Ctrl-C: the shell's code for SIGINT, documented
            log.error("%s", e or "interrupted")
            sys.exit(130)
        except OSError as e:
            # Storage read-only, full or missing: say which file and why, not a traceback.
            log.error("%s", describe_os_error(e))
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def describe_os_error(e: OSError) -> str:
    """'No space left on device: /storage/checkpoints/x/resume.pth' rather than Python's
    "[Errno 28] No space left on device: '/storage/…'"."""
    if e.strerror and e.filename is not None:
        return f"{e.strerror}: {e.filename}"
    return str(e)


def unwind_on_sigterm() -> None:
    """Let SIGTERM (a pod stopped, `kill`) unwind like Ctrl-C: servers stop, results are kept."""
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))


@click.group(
    cls=EnvGroup,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
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
      mnist-pipeline wait     until a run's training, export or serving is done (Kubernetes)
      mnist-pipeline prune    delete old runs, model versions and inference results
      mnist-pipeline pin      write the repository one Triton pod serves (Kubernetes)
      mnist-pipeline check-train  check train's settings for N ranks, train nothing
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


# Options that become TrainConfig fields (the run id is derived from these).
TRAIN_CONFIG = (
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "schedule",
    "weight_decay",
    "label_smoothing",
    "seed",
    "limit_train",
    "limit_test",
    "sync_bn",
)


def train_options(f: F) -> F:
    """Training's options, shared by `train` and `run` so both honour the same variables."""
    options = [
        click.option(
            "--epochs",
            envvar="EPOCHS",
            type=FiniteFloatRange(min=0, min_open=True, max=MAX_EPOCHS),
            default=1,
            help="Passes over the training set; a fraction (0.7) ends within a pass, on "
            "that share of its shuffled images.",
        ),
        click.option(
            "--batch-size",
            envvar="BATCH_SIZE",
            type=click.IntRange(min=2),
            default=128,
            help="Training images per step.",
        ),
        click.option(
            "--lr",
            envvar="LR",
            type=FiniteFloatRange(min=0, min_open=True),
            default=0.05,
            help="Peak learning rate.",
        ),
        click.option(
            "--optimizer",
            envvar="OPTIMIZER",
            type=click.Choice(["sgd", "adamw", "adam"]),
            default="sgd",
        ),
        click.option(
            "--schedule",
            envvar="SCHEDULE",
            type=click.Choice(["onecycle", "constant"]),
            default="onecycle",
            help="One-cycle warm-up + cosine decay, or a constant lr.",
        ),
        click.option(
            "--weight-decay", envvar="WEIGHT_DECAY", type=FiniteFloatRange(min=0), default=5e-4
        ),
        click.option(
            "--label-smoothing",
            envvar="LABEL_SMOOTHING",
            type=FiniteFloatRange(min=0, max=1, max_open=True),
            default=0.1,
        ),
        click.option(
            "--seed",
            envvar="SEED",
            type=int,
            default=0,
            help="Random seed; another seed is another run id, so a new model.",
        ),
        click.option(
            "--limit-train",
            envvar="LIMIT_TRAIN",
            type=click.IntRange(min=0),
            default=0,
            help="Train on the first N images only (0, or 60000 and more: all 60000), "
            "for quick runs.",
        ),
        click.option(
            "--limit-test",
            envvar="LIMIT_TEST",
            type=click.IntRange(min=0),
            default=0,
            help="Evaluate training on the first N test images only (0, or 10000 and "
            "more: all 10000). "
            "Export always measures on all 10000.",
        ),
        click.option(
            "--run-id",
            envvar="RUN_ID",
            default=None,
            callback=_name("run id"),
            help="Name of the run folder; the same id resumes an interrupted run and "
            "reuses a completed one. Default: derived from the training settings "
            "(cfg-<hash>), so repeating a command resumes or reuses its run; pass "
            "another --run-id or --seed to train anew.",
        ),
        click.option(
            "--device", envvar="DEVICE", type=click.Choice(["auto", "cpu", "cuda"]), default="auto"
        ),
        click.option(
            "--threads",
            envvar="THREADS",
            type=click.IntRange(min=0),
            default=0,
            help="CPU threads (0: every CPU this process may use, cgroup limit included).",
        ),
        click.option(
            "--checkpoint-every",
            envvar="CHECKPOINT_EVERY",
            type=click.IntRange(min=0),
            default=200,
            help="Also save a resumable checkpoint every N steps (0: epochs only).",
        ),
        click.option(
            "--eval-every",
            envvar="EVAL_EVERY",
            type=click.IntRange(min=0),
            default=0,
            help="Also measure test accuracy every N steps (0: at epoch ends only).",
        ),
        click.option(
            "--nproc-per-node",
            envvar="NPROC_PER_NODE",
            type=click.IntRange(min=1),
            default=1,
            help="Train as N data-parallel processes on this machine (through torchrun). "
            "Ignored under torchrun, which sets the world itself.",
        ),
        click.option(
            "--sync-bn",
            envvar="SYNC_BN",
            is_flag=True,
            help="With several processes, BatchNorm statistics over all of them (CUDA only); "
            "default: each process its own.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def train_locally(
    storage: Path, cfg: Any, run_id: str | None, nproc_per_node: int, **how: Any
) -> dict[str, Any]:
    """Train in this process, or as NPROC_PER_NODE DDP ranks started through torchrun."""
    from mnist_pipeline import distributed
    from mnist_pipeline import train as train_stage
    from mnist_pipeline.storage import read_json, run_dir

    if nproc_per_node == 1 or distributed.launched_by_torchrun():
        return train_stage.train(storage, cfg, run_id=run_id, **how)
    cfg.validate()  # bad input exits 2 here, not as a failed rank
    train_stage.check_batch(cfg, nproc_per_node)
    run_id = run_id or train_stage.default_run_id(cfg)
    distributed.launch(nproc_per_node, train_argv(storage, cfg, run_id, **how))
    metrics: dict[str, Any] = read_json(run_dir(storage, run_id) / "metrics.json")
    return metrics


def train_argv(storage: Path, cfg: Any, run_id: str, **how: Any) -> list[str]:
    """`train`'s command line for these settings: what each rank runs."""
    argv = ["train", f"--storage={storage}", f"--run-id={run_id}"]
    settings = {name: getattr(cfg, name) for name in TRAIN_CONFIG}
    for name, value in {**settings, **how}.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
        else:
            argv.append(f"{flag}={value}")
    return argv


@cli.command()
@storage_option
@train_options
@stage
def train(
    storage: Path,
    run_id: str | None,
    device: str,
    threads: int,
    checkpoint_every: int,
    eval_every: int,
    nproc_per_node: int,
    **config: Any,
) -> None:
    """Train ResNet-18 on MNIST read from STORAGE (never downloaded).

    Writes STORAGE/checkpoints/RUN_ID/{model.pth,train.log,metrics.json}. Killed and
    started again with the same run id, it continues from its last checkpoint; a
    completed run is not trained again.

    \b
    Data-parallel (PyTorch DDP; --batch-size stays the global batch):
      mnist-pipeline train --nproc-per-node 2 ...          on this machine
      torchrun --nnodes N --nproc-per-node 1 --node-rank I \\
        --master-addr HOST --master-port 29500 -m mnist_pipeline train ...
    """
    from mnist_pipeline import train as train_stage

    train_locally(
        storage,
        train_stage.TrainConfig(**config),
        run_id,
        nproc_per_node,
        device=device,
        threads=threads,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
    )


@cli.command("check-train")
@storage_option
@train_options
@click.option(
    "--world-size",
    envvar="CHECK_WORLD_SIZE",
    show_envvar=True,
    type=click.IntRange(min=1),
    default=1,
    help="Ranks the settings must work for.",
)
@stage
def check_train(storage: Path, device: str, world_size: int, **options: Any) -> None:
    """Check `train`'s settings for --world-size ranks, train nothing: exit 2 on bad input.

    The chart runs it in each worker pod before torchrun, which turns a rank's exit 2
    into 1 (retried) so that settings every rank rejects would fail the Job only after
    backoffLimit × workers pods.
    """
    from mnist_pipeline import train as train_stage

    config = {k: v for k, v in options.items() if k in TRAIN_CONFIG}
    cfg = train_stage.TrainConfig(**config)
    cfg.validate()
    # SyncBatchNorm's CUDA check belongs to the ranks, which get the GPUs.
    sync_bn = cfg.sync_bn and device != "cuda"
    train_stage.check_batch(dataclasses.replace(cfg, sync_bn=sync_bn), world_size)
    log.info("training settings are valid for %d rank(s)", world_size)


def _batch_sizes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected integers such as 2,4,8") from None
    if any(s < 1 for s in sizes):
        raise click.BadParameter(f"{value!r}: batch sizes must be at least 1")
    return sizes


# Options that shape the published model (config.pbtxt), shared by `export` and `run`.
EXPORT_OPTIONS = (
    "max_batch_size",
    "instance_count",
    "instance_kind",
    "server_cpus",
    "preferred_batch_sizes",
    "pinned_memory",
)


def export_options(f: F) -> F:
    options = [
        click.option(
            "--min-improvement",
            envvar="MIN_IMPROVEMENT",
            type=FiniteFloatRange(min=0),
            default=0.0,
            help="Publish only if the test accuracy beats the published model's by more "
            "than this (both measured on all 10000 test images).",
        ),
        click.option(
            "--precision",
            envvar="PRECISION",
            type=click.Choice(["fp32", "int8"]),
            default="fp32",
            help="int8: publish the fp32 export statically quantised (QDQ, calibrated on "
            "training images), refused if it loses more than 0.1 percentage point of test "
            "accuracy against the fp32 export.",
        ),
        click.option(
            "--max-batch-size",
            envvar="MAX_BATCH_SIZE",
            type=click.IntRange(min=1),
            default=16,
            help="config.pbtxt max_batch_size.",
        ),
        click.option(
            "--instance-count",
            envvar="INSTANCE_COUNT",
            type=click.IntRange(min=1),
            default=2,
            help="config.pbtxt instance_group count.",
        ),
        click.option(
            "--instance-kind",
            envvar="INSTANCE_KIND",
            type=click.Choice(["cpu", "gpu"]),
            default="cpu",
            help="config.pbtxt instance_group kind: cpu (KIND_CPU) or gpu (KIND_GPU).",
        ),
        click.option(
            "--server-cpus",
            envvar="SERVER_CPUS",
            type=click.IntRange(min=1),
            default=2,
            help="CPUs the Triton server gets: config.pbtxt parameters give each instance "
            "max(1, SERVER_CPUS // INSTANCE_COUNT) ONNX Runtime threads (inter-op 1).",
        ),
        click.option(
            "--preferred-batch-sizes",
            envvar="PREFERRED_BATCH_SIZES",
            default="2,4,8",
            callback=_batch_sizes,
            help="config.pbtxt dynamic_batching preferred_batch_size, comma-separated.",
        ),
        click.option(
            "--pinned-memory/--no-pinned-memory",
            envvar="PINNED_MEMORY",
            default=True,
            help="config.pbtxt input/output pinned memory.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def triton_config(model_name: str, **options: Any) -> Any:
    from mnist_pipeline.repository import INSTANCE_KINDS, TritonConfig

    kind = INSTANCE_KINDS[options.pop("instance_kind")]
    return TritonConfig(name=model_name, instance_kind=kind, **options)


def port_option(name: str, envvar: str, default: int, what: str) -> Callable[[F], F]:
    return click.option(
        name,
        envvar=envvar,
        type=click.IntRange(1, 65535),
        default=default,
        show_envvar=True,
        help=f"Port of Triton's {what} endpoint.",
    )


def server_options(f: F) -> F:
    from mnist_pipeline.serve import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT

    for option in reversed(
        [
            click.option(
                "--host",
                envvar="TRITON_HOST",
                default="127.0.0.1",
                show_envvar=True,
                help="Address the server binds to (0.0.0.0 to serve other machines).",
            ),
            port_option("--grpc-port", "GRPC_PORT", DEFAULT_GRPC_PORT, "gRPC"),
            port_option("--http-port", "HTTP_PORT", DEFAULT_HTTP_PORT, "HTTP"),
            port_option(
                "--metrics-port", "METRICS_PORT", DEFAULT_METRICS_PORT, "Prometheus metrics"
            ),
            click.option(
                "--ready-timeout",
                envvar="READY_TIMEOUT",
                type=FiniteFloatRange(min=1),
                default=120.0,
                show_envvar=True,
                help="Seconds to wait for Triton to load the models.",
            ),
        ]
    ):
        f = option(f)
    return f


def backend_option(f: F) -> F:
    from mnist_pipeline.serve import DEFAULT_BACKEND_DIR

    return click.option(
        "--backend-directory",
        envvar="TRITON_BACKEND_DIR",
        show_envvar=True,
        type=click.Path(file_okay=False, path_type=Path),
        default=DEFAULT_BACKEND_DIR,
        help="Triton backends folder holding onnxruntime/libtriton_onnxruntime.so "
        "(built by `make backend`).",
    )(f)


@cli.command(context_settings={"ignore_unknown_options": True})
@storage_option
@click.option(
    "--model-repository",
    envvar="MODEL_REPOSITORY",
    show_envvar=True,
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Triton model repository to serve. Default: STORAGE/models.",
)
@click.option(
    "--workdir",
    envvar="TRITON_WORKDIR",
    show_envvar=True,
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for triton.log, kept afterwards. Default: a temporary folder, removed on "
    "exit unless Triton failed (the error then names the log it kept).",
)
@server_options
@backend_option
@click.option(
    "--log-verbose",
    envvar="TRITON_LOG_VERBOSE",
    type=click.IntRange(min=0),
    default=0,
    show_envvar=True,
    help="Triton's own log verbosity.",
)
@click.argument("triton_args", nargs=-1, type=click.UNPROCESSED)
@stage
def serve(
    storage: Path,
    model_repository: Path | None,
    workdir: Path | None,
    host: str,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    ready_timeout: float,
    backend_directory: Path,
    log_verbose: int,
    triton_args: tuple[str, ...],
) -> None:
    """Serve the model repository with a local Triton Inference Server until stopped.

    \b
    Runs the tritonserver 2.51 bundled in the nvidia-pytriton wheel with Triton's own
    onnxruntime backend (r24.10, ONNX Runtime 1.19.2, as in the tritonserver:24.10-py3
    image), on the repository as it is. Other options (TRITON_ARGS, e.g.
    --pinned-memory-pool-byte-size=0) go to tritonserver untouched.
    Stops cleanly, with every Triton process, on SIGTERM or Ctrl-C.
    """
    from mnist_pipeline.serve import LocalTriton, serve_forever
    from mnist_pipeline.storage import models_dir

    server = LocalTriton(
        model_repository or models_dir(storage),
        workdir=workdir,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        log_verbose=log_verbose,
        ready_timeout=ready_timeout,
        backend_dir=backend_directory,
        extra_args=triton_args,
    )
    serve_forever(server)


def client_options(f: F) -> F:
    from mnist_pipeline.client import InferConfig

    d = InferConfig()
    for option in reversed(
        [
            click.option(
                "--model-name",
                envvar="MODEL_NAME",
                default=d.model_name,
                show_envvar=True,
                callback=_name("model name"),
                help="Model to query (and, for run, to export).",
            ),
            click.option(
                "--model-version",
                envvar="MODEL_VERSION",
                default=d.model_version,
                show_envvar=True,
                callback=_model_version,
                help="Version to ask for (1, 2, ...). Default: the server's choice.",
            ),
            click.option(
                "--requests",
                envvar="REQUESTS",
                type=click.IntRange(min=1),
                default=d.requests,
                show_envvar=True,
                help="Measured requests.",
            ),
            click.option(
                "--concurrency",
                envvar="CONCURRENCY",
                type=click.IntRange(min=1),
                default=d.concurrency,
                show_envvar=True,
                help="Requests in flight at once, each thread with its own gRPC "
                "connection; above 1 Triton's dynamic batcher forms batches.",
            ),
            click.option(
                "--images-per-request",
                envvar="IMAGES_PER_REQUEST",
                type=click.IntRange(min=1),
                default=d.images_per_request,
                show_envvar=True,
                help="Images in each request, at most the model's max_batch_size.",
            ),
            click.option(
                "--warmup",
                envvar="WARMUP",
                type=click.IntRange(min=0),
                default=d.warmup,
                show_envvar=True,
                help="Unmeasured requests sent first.",
            ),
            click.option(
                "--timeout",
                envvar="TIMEOUT",
                type=FiniteFloatRange(min=0, min_open=True),
                default=d.timeout,
                show_envvar=True,
                help="Seconds to wait for the server and the model to be ready, and to "
                "retry a request while the server is unreachable.",
            ),
            click.option(
                "--request-timeout",
                envvar="REQUEST_TIMEOUT",
                type=FiniteFloatRange(min=0, min_open=True),
                default=d.request_timeout,
                show_envvar=True,
                help="Seconds one request may take.",
            ),
            click.option(
                "--max-seconds",
                envvar="MAX_SECONDS",
                type=FiniteFloatRange(min=0, min_open=True),
                default=d.max_seconds,
                show_envvar=True,
                help="Seconds the whole measurement may take.",
            ),
        ]
    ):
        f = option(f)
    return f


def _model_version(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from mnist_pipeline.client import parse_model_version

    try:
        return parse_model_version(value)
    except UsageError as e:
        raise click.BadParameter(str(e), ctx, param) from None


def _grpc_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from mnist_pipeline.client import parse_grpc_url

    try:
        return parse_grpc_url(value)
    except UsageError as e:
        raise click.BadParameter(str(e), ctx, param) from None


@cli.command()
@click.option(
    "--url",
    envvar="TRITON_URL",
    default="localhost:8001",
    show_envvar=True,
    callback=_grpc_url,
    help="Triton's gRPC endpoint, HOST:PORT (no scheme; 8001 is gRPC, 8000 is HTTP).",
)
@storage_option
@client_options
@stage
def infer(url: str, storage: Path, **options: Any) -> None:
    """Send real MNIST test images to Triton over gRPC; save predictions and latency.

    Waits (with backoff, up to --timeout) for the server and the model, then sends
    --requests requests of --images-per-request test images, normalised as in
    training. Writes STORAGE/inference/<UTC time>/{samples.json, latency.json,
    latency.png, inference.log}; on failure latency.json says why and keeps what
    was measured.
    """
    from mnist_pipeline import client

    unwind_on_sigterm()
    client.infer(storage, client.InferConfig(url=url, **options))


@cli.command()
@storage_option
@train_options
@export_options
@server_options
@backend_option
@client_options
@stage
def run(
    storage: Path,
    run_id: str | None,
    device: str,
    threads: int,
    checkpoint_every: int,
    eval_every: int,
    nproc_per_node: int,
    host: str,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    ready_timeout: float,
    backend_directory: Path,
    **opts: Any,
) -> None:
    """Run every stage locally: data, train, export, serve, infer, then stop the server.

    The README's `make run`: on the defaults it trains one epoch on all 60000 images
    (1 to 8 minutes on 2 cores, depending on the CPU: see the README), publishes the
    model if it beats the served one, serves STORAGE/models with a local Triton on
    loopback and measures it with the gRPC client. Prints a summary: test accuracy,
    the exported version (or why not), served accuracy and latency, and where the
    outputs are.

    The run id defaults to one derived from the training settings: run again, it
    resumes an interrupted run or reuses the completed one instead of retraining.
    Give --run-id (or another --seed) to train a new model.
    """
    from mnist_pipeline import client
    from mnist_pipeline import export as export_stage
    from mnist_pipeline import train as train_stage
    from mnist_pipeline.data import place
    from mnist_pipeline.serve import LocalTriton, check_backend, check_port_free
    from mnist_pipeline.storage import models_dir

    config = train_stage.TrainConfig(**{k: opts.pop(k) for k in TRAIN_CONFIG})
    triton = triton_config(opts["model_name"], **{k: opts.pop(k) for k in EXPORT_OPTIONS})
    min_improvement = opts.pop("min_improvement")
    precision = opts.pop("precision")
    unwind_on_sigterm()
    check_backend(backend_directory)  # before minutes of training, not after
    for port in (http_port, grpc_port, metrics_port):
        check_port_free(host, port)  # before minutes of training, not after
    place(storage)
    run_id = run_id or train_stage.default_run_id(config)
    log.info("run %s: %s", run_id, train_stage.run_state(storage, run_id))
    metrics = train_locally(
        storage,
        config,
        run_id,
        nproc_per_node,
        device=device,
        threads=threads,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
    )
    outcome = export_stage.export(
        storage, triton, run_id=run_id, min_improvement=min_improvement, precision=precision
    )
    with LocalTriton(
        models_dir(storage),
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        ready_timeout=ready_timeout,
        backend_dir=backend_directory,
    ) as server:
        report = client.infer(storage, client.InferConfig(url=server.grpc_url, **opts))

    if outcome.status == "published":
        exported = f"version {outcome.version} ({outcome.reason})"
    else:
        exported = f"skipped: {outcome.reason}"
    click.echo(summary(storage, run_id, metrics, exported, report))


def summary(
    storage: Path, run_id: str, metrics: dict[str, Any], exported: str, report: dict[str, Any]
) -> str:
    from mnist_pipeline.storage import models_dir, run_dir

    return "\n".join(
        [
            "mnist-pipeline run: done",
            f"  test accuracy    {metrics['test_accuracy']:.4f} (run {run_id})",
            f"  export           {exported}",
            f"  served           {report['model_name']} version {report['model_version_served']}, "
            f"accuracy {report['accuracy']:.4f} on {report['images']} test images",
            f"  latency          p50 {report['p50_ms']:.2f} ms, p99 {report['p99_ms']:.2f} ms "
            f"({report['count']} requests, concurrency {report['concurrency']}, "
            f"{report['throughput_images_per_s']:.0f} images/s)",
            f"  checkpoint       {run_dir(storage, run_id)}",
            f"  model repository {models_dir(storage)}",
            f"  inference        {report['output_dir']}",
        ]
    )


@cli.command()
@storage_option
@click.option(
    "--model-name",
    envvar="MODEL_NAME",
    default="resnet18_mnist",
    callback=_name("model name"),
    help="Model name in the Triton repository (and in config.pbtxt).",
)
@click.option(
    "--checkpoint",
    envvar="CHECKPOINT",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Export this model.pth. Default: the newest completed training run's.",
)
@click.option(
    "--run-id",
    envvar="RUN_ID",
    default=None,
    callback=_name("run id"),
    help="Export this training run's checkpoint (the chart passes its training Job's).",
)
@export_options
@stage
def export(
    storage: Path,
    model_name: str,
    checkpoint: Path | None,
    run_id: str | None,
    min_improvement: float,
    precision: str,
    **options: Any,
) -> None:
    """Convert a checkpoint to ONNX and publish it to Triton's repository if it is better.

    \b
    Publishes STORAGE/models/MODEL_NAME/VERSION/{model.onnx,metadata.json} and
    STORAGE/models/MODEL_NAME/config.pbtxt only when the exported model's accuracy,
    measured here with onnxruntime on all 10000 MNIST test images, beats the newest
    published version's (measured the same way) by more than --min-improvement (the
    first export always publishes), and only after onnxruntime reproduces PyTorch's
    outputs on real test images. A model identical to a published version is never
    published again. A version appears whole or not at all; concurrent exports are
    serialised. checkpoints/best_model.pth then points at the published checkpoint.
    Not better: logged, exit 0, repository unchanged. A training run's outcome is also
    written to checkpoints/RUN_ID/export.json, with every attempt in its history.
    With --precision int8 the fp32 export is quantised and held to that export's
    accuracy first; the int8 and fp32 exports of one checkpoint are different models.
    """
    from mnist_pipeline import export as export_stage

    export_stage.export(
        storage,
        triton_config(model_name, **options),
        checkpoint=checkpoint,
        run_id=run_id,
        min_improvement=min_improvement,
        precision=precision,
    )


def wait_options(f: F) -> F:
    options = [
        storage_option,
        click.option(
            "--run-id",
            envvar="RUN_ID",
            show_envvar=True,
            required=True,
            callback=_name("run id"),
            help="The run to wait for (the chart gives each release revision its own).",
        ),
        click.option(
            "--timeout",
            envvar="WAIT_TIMEOUT",
            show_envvar=True,
            type=FiniteFloatRange(min=0, min_open=True),
            default=21600,
            help="Give up (exit 1) after this many seconds.",
        ),
        click.option(
            "--interval",
            envvar="WAIT_INTERVAL",
            show_envvar=True,
            type=FiniteFloatRange(min=0, min_open=True),
            default=5,
            help="Seconds between looks.",
        ),
        click.option(
            "--job",
            envvar="WAIT_JOB",
            show_envvar=True,
            default=None,
            help="Kubernetes Job producing the artifact: its Failed condition fails "
            "the wait at once. Read only where the pod has a service account "
            "token; a deleted Job is ignored.",
        ),
        click.option(
            "--namespace",
            envvar="POD_NAMESPACE",
            show_envvar=True,
            default=None,
            help="Namespace of --job (default: the pod's own).",
        ),
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
def wait_training(
    storage: Path,
    run_id: str,
    timeout: float,
    interval: float,
    job: str | None,
    namespace: str | None,
) -> None:
    """Until checkpoints/RUN_ID/metrics.json says complete."""
    from mnist_pipeline import waits

    w = waits.make_wait(f"training run {run_id}", timeout, interval, job, namespace)
    w.run(waits.training_check(storage, run_id))


@wait.command("export")
@wait_options
@click.option(
    "--model-name",
    envvar="MODEL_NAME",
    show_envvar=True,
    default="resnet18_mnist",
    callback=_name("model name"),
)
@stage
def wait_export(
    storage: Path,
    run_id: str,
    timeout: float,
    interval: float,
    job: str | None,
    namespace: str | None,
    model_name: str,
) -> None:
    """Until the export of RUN_ID is published or skipped and models/NAME is servable."""
    from mnist_pipeline import waits

    w = waits.make_wait(f"export of run {run_id}", timeout, interval, job, namespace)
    w.run(waits.export_check(storage, run_id, model_name))


@wait.command("serving")
@wait_options
@click.option(
    "--model-name",
    envvar="MODEL_NAME",
    show_envvar=True,
    default="resnet18_mnist",
    callback=_name("model name"),
)
@click.option(
    "--url",
    envvar="TRITON_HTTP_URL",
    show_envvar=True,
    required=True,
    help="Triton's HTTP endpoint, HOST:PORT.",
)
@click.option(
    "--model-version",
    envvar="MODEL_VERSION",
    show_envvar=True,
    default="run",
    show_default=True,
    help="The version Triton must serve: run (the one RUN_ID exported), N, or empty (any).",
)
@stage
def wait_serving(
    storage: Path,
    run_id: str,
    timeout: float,
    interval: float,
    job: str | None,
    namespace: str | None,
    model_name: str,
    url: str,
    model_version: str,
) -> None:
    """Until Triton at URL is ready and serves the model version RUN_ID exported (or
    --model-version)."""
    from mnist_pipeline import waits

    w = waits.make_wait(f"Triton serving run {run_id}", timeout, interval, job, namespace)
    w.run(waits.serving_check(storage, run_id, model_name, url, model_version))


def _keep_option(name: str, envvar: str, default: int, what: str) -> Callable[[F], F]:
    return click.option(
        name,
        envvar=envvar,
        type=click.IntRange(min=0),
        default=default,
        help=f"Keep the newest {what} (0: all).",
    )


@cli.command()
@storage_option
@model_name_option
@click.option(
    "--run-id",
    envvar="RUN_ID",
    default=None,
    callback=_name("run id"),
    help="The current run: kept.",
)
@_keep_option("--keep-runs", "KEEP_RUNS", 5, "N run folders under checkpoints/")
@_keep_option("--keep-versions", "KEEP_VERSIONS", 3, "N model versions")
@_keep_option("--keep-inference", "KEEP_INFERENCE", 20, "N inference result folders")
@click.option(
    "--keep-version",
    envvar="KEEP_VERSION",
    type=click.IntRange(min=1),
    multiple=True,
    help="A version kept whatever the limits (e.g. a pinned served version); repeatable.",
)
@click.option(
    "--abandoned-after",
    envvar="ABANDONED_AFTER",
    type=FiniteFloatRange(min=0),
    default=0,
    help="Seconds without a write after which a run still marked running counts as "
    "abandoned (its pods gone) and may go like any other (0: never).",
)
@stage
def prune(
    storage: Path,
    model_name: str,
    run_id: str | None,
    keep_runs: int,
    keep_versions: int,
    keep_inference: int,
    keep_version: tuple[int, ...],
    abandoned_after: float,
) -> None:
    """Delete old runs, model versions and inference results beyond the limits.

    Never deletes the newest version (Triton serves it), a --keep-version, the run
    checkpoints/best_model.pth points at, --run-id, the versions those two published, or
    a run still marked running (unless untouched for --abandoned-after seconds). The chart
    runs it before its client Job.
    """
    from mnist_pipeline import retention

    limits = retention.Limits(runs=keep_runs, versions=keep_versions, inference=keep_inference)
    retention.prune(
        storage,
        model_name,
        limits,
        run_id=run_id,
        keep_versions=keep_version,
        abandoned_after=abandoned_after,
    )


@cli.command()
@storage_option
@model_name_option
@click.option(
    "--out",
    envvar="SERVED_REPOSITORY",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The model repository Triton is started on (the pod's emptyDir).",
)
@click.option(
    "--version",
    "wanted",
    envvar="SERVED_VERSION",
    default="run",
    show_default=True,
    help="run: the version --run-id exported (the newest without --run-id); empty: the "
    "newest; N: version N.",
)
@click.option(
    "--run-id", envvar="RUN_ID", default=None, callback=_name("run id"), help="The pod's run."
)
@click.option("--server-cpus", envvar="SERVER_CPUS", type=click.IntRange(min=1), default=2)
@click.option("--instance-count", envvar="INSTANCE_COUNT", type=click.IntRange(min=1), default=2)
@click.option(
    "--instance-kind", envvar="INSTANCE_KIND", type=click.Choice(["cpu", "gpu"]), default="cpu"
)
@stage
def pin(
    storage: Path,
    model_name: str,
    out: Path,
    wanted: str,
    run_id: str | None,
    server_cpus: int,
    instance_count: int,
    instance_kind: str,
) -> None:
    """Write the model repository one Triton pod serves: one version, this pod's settings.

    OUT/MODEL_NAME/config.pbtxt is the volume's, with this pod's instance groups
    (--instance-count of --instance-kind), ONNX Runtime threads (max(1, --server-cpus //
    --instance-count)) and a version_policy naming the one version, linked from the
    volume. The chart's Triton initContainer runs it, so `helm rollback` re-serves the old
    run's version and serving settings reach Triton without retraining. Re-runnable.
    """
    from mnist_pipeline.repository import INSTANCE_KINDS, TritonConfig, write_served_repository

    cfg = TritonConfig(
        name=model_name,
        instance_count=instance_count,
        instance_kind=INSTANCE_KINDS[instance_kind],
        server_cpus=server_cpus,
    )
    write_served_repository(storage, out, cfg, wanted, run_id)


def main() -> None:
    cli(auto_envvar_prefix=None)
