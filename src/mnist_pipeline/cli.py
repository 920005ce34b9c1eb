"""The `mnist-pipeline` command line.

Every option is a `Setting` declared once in settings.py; a command lists the settings it
takes. Each can also be set through its environment variable, MNIST_PIPELINE_ and the
flag's name (shown in --help), so Kubernetes manifests configure the stages the way the
original Jobs did, and nothing else in a pod's environment can.
Exit codes: 0 done (an export skipped as not better is done), 1 failure, 2 bad input or usage,
130 interrupted by Ctrl-C and 143 stopped by SIGTERM (128 + the signal, as shells report them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from click.core import ParameterSource

from mnist_pipeline import __version__, interrupts
from mnist_pipeline import settings as s
from mnist_pipeline.errors import PipelineFailure, UsageError
from mnist_pipeline.settings import Setting
from mnist_pipeline.storage import ModelRepository
from mnist_pipeline.tracking import Tracking

if TYPE_CHECKING:  # the stages are imported where used: torch stays out of the client image
    from mnist_pipeline.distributed import LaunchConfig
    from mnist_pipeline.train import RankConfig, TrainConfig

log = logging.getLogger("mnist_pipeline")
F = TypeVar("F", bound=Callable[..., Any])


class FiniteFloatRange(click.FloatRange):
    """Every float option's type: a range that also refuses nan and inf. NaN passes every
    bound (all its comparisons are false), and no setting here means anything infinite:
    --lr nan trained to a NaN model and wrote NaN into metrics.json."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


def click_type(spec: Setting) -> Any:
    """The click type that accepts exactly what `spec.check` accepts."""
    if spec.parse is not None:
        return click.STRING
    if spec.choices is not None:
        return click.Choice(spec.choices)
    kind = spec.python_type
    if kind is int and (spec.min is not None or spec.max is not None):
        low, high = (None if b is None else int(b) for b in (spec.min, spec.max))
        return click.IntRange(low, high, min_open=spec.min_open, max_open=spec.max_open)
    if kind is float:
        return FiniteFloatRange(spec.min, spec.max, min_open=spec.min_open, max_open=spec.max_open)
    if kind is Path:
        return click.Path(
            file_okay=spec.path != "dir", dir_okay=spec.path != "file", path_type=Path
        )
    if kind is int:
        return click.INT
    return click.STRING


def parse_callback(spec: Setting) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def parse(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            return spec.check(value)
        except UsageError as e:
            raise click.BadParameter(str(e), ctx, param) from None

    return parse


def click_option(spec: Setting) -> Callable[[F], F]:
    """The one click option of `spec`, its variable MNIST_PIPELINE_<FLAG>."""
    names = [spec.flag] + ([spec.short] if spec.short else [])
    envvars = [spec.envvar, spec.fallback_envvar] if spec.fallback_envvar else spec.envvar
    how: dict[str, Any] = {"envvar": envvars, "show_envvar": True, "help": spec.help}
    if spec.python_type is bool:
        if spec.default:
            names[0] = f"{spec.flag}/--no-{spec.flag[2:]}"
        how.update(is_flag=True, default=spec.default)
        return click.option(*names, spec.name, **how)
    how.update(type=click_type(spec), required=spec.required, multiple=spec.multiple)
    if spec.parse is not None:
        how["callback"] = parse_callback(spec)
    if not spec.required:
        default = spec.default
        if isinstance(default, tuple) and not spec.multiple:
            default = ",".join(map(str, default))  # as it is typed: 2,4,8
        how["default"] = default
        if spec.default_text is not None:
            how["show_default"] = spec.default_text
    return click.option(*names, spec.name, **how)


def options(*groups: Setting | Iterable[Setting]) -> Callable[[F], F]:
    """The options of these settings (and groups of them), each once, in this order."""
    specs: dict[str, Setting] = {}
    for group in groups:
        for spec in [group] if isinstance(group, Setting) else group:
            specs.setdefault(spec.name, spec)

    def decorate(f: F) -> F:
        for spec in reversed(specs.values()):
            f = click_option(spec)(f)
        return f

    return decorate


def variable_set(param: click.Option) -> str | None:
    """The variable an option's value came from: its own, else another tool's it reads."""
    names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
    return next((name for name in names if name in os.environ), None)


def env_error_hint(ctx: click.Context, e: click.BadParameter) -> None:
    """Make a bad value that came from the environment name its variable first, not the
    option the user never typed: "Invalid value for MNIST_PIPELINE_EPOCHS='0' (the variable
    of '--epochs')"."""
    param = e.param
    if not isinstance(param, click.Option) or param.name is None:
        return
    if ctx.get_parameter_source(param.name) is not ParameterSource.ENVIRONMENT:
        return
    variable = variable_set(param)
    if variable is not None:
        flags = " / ".join(repr(o) for o in param.opts)
        e.param_hint = f"{variable}={os.environ[variable]!r} (the variable of {flags})"


def warn_shadowed_variables(ctx: click.Context) -> None:
    """Say when a variable is set to another value than the option given on the command
    line, which wins: a chart's extraEnv repeating a flag the chart passes is otherwise
    silently ignored."""
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name is None:
            continue
        variable = variable_set(param)
        if variable is None:
            continue
        if ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
            continue
        try:
            from_env = param.process_value(ctx, param.value_from_envvar(ctx))
        except click.ClickException:
            from_env = None
        if from_env != ctx.params.get(param.name):
            log.warning(
                "%s=%r is ignored: %s on the command line wins",
                variable,
                os.environ[variable],
                param.opts[0],
            )


class EnvCommand(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            rest = super().parse_args(ctx, args)
        except click.BadParameter as e:
            env_error_hint(ctx, e)
            raise
        warn_shadowed_variables(ctx)
        return rest


class EnvGroup(click.Group):
    command_class = EnvCommand
    group_class = type  # subgroups (wait) behave the same

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.BadParameter as e:
            env_error_hint(ctx, e)
            raise


def stage(f: F) -> F:
    """Map the project's errors onto exit codes, with one clear line instead of a traceback;
    Ctrl-C and SIGTERM, at any moment, end as interrupts (130, 143), never as failures."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        interrupts.catch()
        try:
            return f(*args, **kwargs)
        except SystemExit:
            raise
        except BaseException as e:
            interrupt = interrupts.as_interrupt(e)
            if interrupt is not None:
                command = click.get_current_context().command_path
                what = interrupt.what or f"{command} interrupted: the same command continues"
                log.error("%s (%s)", what, interrupt.name)
                sys.exit(interrupt.exit_code)
            if isinstance(e, UsageError):
                log.error("%s", e)
                sys.exit(2)
            if isinstance(e, PipelineFailure):
                log.error("%s", e)
                sys.exit(1)
            if isinstance(e, OSError):
                # Storage read-only, full or missing: say which file and why, not a traceback.
                log.error("%s", describe_os_error(e))
                sys.exit(1)
            raise
        finally:
            interrupts.release()

    return wrapper  # type: ignore[return-value]


def describe_os_error(e: OSError) -> str:
    """'No space left on device: /storage/checkpoints/x/resume.pth' rather than Python's
    "[Errno 28] No space left on device: '/storage/…'"."""
    if e.strerror and e.filename is not None:
        return f"{e.strerror}: {e.filename}"
    return str(e)


@click.group(
    cls=EnvGroup,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.version_option(__version__, prog_name="mnist-pipeline")
@options(s.VERBOSE)
def cli(verbose: bool) -> None:
    """Train ResNet-18 on MNIST, export it to ONNX, serve it with Triton, measure it.

    \b
    The stages share one storage folder (--storage, MNIST_PIPELINE_STORAGE):
      mnist-pipeline data     place verified MNIST into storage
      mnist-pipeline train    train, resumably; checkpoint + train.log + metrics.json
      mnist-pipeline export   ONNX + Triton repository, only if better than the served model
      mnist-pipeline serve    run Triton locally on the repository
      mnist-pipeline infer    gRPC client: predictions and latency
      mnist-pipeline run      all of the above, locally
      mnist-pipeline wait     until a run's training, export or serving is done (Kubernetes)
      mnist-pipeline prune    delete old runs, model versions and inference results
      mnist-pipeline pin      write the repository one Triton pod serves (Kubernetes)
      mnist-pipeline status   the repository's versions, runs, damage and lock
      mnist-pipeline canary   promote a canary release's challenger or roll it back
      mnist-pipeline sync-registry
                              the MLflow registry brought in line with the repository
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        stream=sys.stderr,
    )


@cli.command()
@options(s.STORAGE, s.SOURCE)
@stage
def data(storage: Path, source: Path | None) -> None:
    """Place the four MNIST files, verified, at STORAGE/data/MNIST/raw.

    Checks content checksums, IDX magic numbers and record counts; a bad file is
    named and nothing is written. Valid files already in place are left alone.
    """
    from mnist_pipeline import data as data_stage

    data_stage.place(storage, source)


def launch_config(o: dict[str, Any]) -> LaunchConfig | None:
    """How to start the ranks; None in a rank torchrun started, whose world its environment
    says (its command line names no launch settings)."""
    from mnist_pipeline import distributed

    return None if distributed.launched_by_torchrun() else distributed.LaunchConfig.of(o)


def train_locally(
    storage: Path,
    run_id: str | None,
    cfg: TrainConfig,
    rank: RankConfig,
    launch: LaunchConfig | None,
    tracking: Tracking,
) -> dict[str, Any]:
    """Train in this process, or as --nproc-per-node DDP ranks started through torchrun
    (`launch` None: this process is one of them)."""
    from mnist_pipeline import distributed
    from mnist_pipeline import storage as disk
    from mnist_pipeline import train as train_stage

    if launch is None or launch.nproc_per_node == launch.nnodes == 1:
        if launch is not None and cfg.gradient_compression != "none":
            log.warning(
                "--gradient-compression %s compresses what DDP ranks send each other: with "
                "one process nothing is sent, so it changes nothing but the run id",
                cfg.gradient_compression,
            )
        return train_stage.train(storage, cfg, run_id, rank, tracking)
    # Bad input exits 2 here, not as failed ranks.
    nproc = launch.nproc_per_node
    train_stage.check_world(cfg, rank.threads, nproc, nproc * launch.nnodes)
    run_id = run_id or train_stage.default_run_id(cfg)
    run_dir = disk.run_dir(storage, run_id)
    # A pod replaced after the others completed the run: no one is left to meet.
    completed = train_stage.completed_run(run_dir, cfg, run_id)
    if completed is not None:
        return completed

    def finished() -> bool:
        metrics = disk.read_metrics(run_dir) or {}
        return metrics.get("status") == disk.RunStatus.COMPLETE

    given = json.dumps({"train": dataclasses.asdict(cfg), "rank": dataclasses.asdict(rank),
                        "tracking": dataclasses.asdict(tracking)})  # fmt: skip
    argv = ["train", f"--storage={storage}", f"--run-id={run_id}"]
    distributed.launch(launch, argv, given, finished, run_dir / disk.RESUME_FILE)
    metrics = disk.read_metrics(run_dir)
    if metrics is None:
        raise PipelineFailure(f"{run_dir}: the ranks ended without writing {disk.METRICS_FILE}")
    return metrics


@cli.command()
@options(s.STORAGE, s.TRAIN, s.TRAIN_HOW, s.TRACKING)
@stage
def train(storage: Path, run_id: str | None, **o: Any) -> None:
    """Train ResNet-18 on MNIST read from STORAGE (never downloaded).

    Writes STORAGE/checkpoints/RUN_ID/{model.pth,train.log,metrics.json}. Killed and
    started again with the same run id, it continues from its last checkpoint; a
    completed run is not trained again.

    \b
    Data-parallel (PyTorch DDP; --batch-size stays the global batch):
      mnist-pipeline train --nproc-per-node 2 ...          on this machine
      mnist-pipeline train --nnodes N --node-rank I --master-addr HOST ...
                                                           on machine I of N
    """
    from mnist_pipeline.distributed import RANK_SETTINGS_ENV
    from mnist_pipeline.train import RankConfig, TrainConfig

    launch = launch_config(o)
    given = None if launch is not None else os.environ.get(RANK_SETTINGS_ENV)
    if given:  # a rank launch() started: the settings its command made, not parsed again
        made = json.loads(given)
        cfg, rank = TrainConfig(**made["train"]), RankConfig(**made["rank"])
        tracking = Tracking(**made["tracking"])
    else:
        cfg, rank, tracking = TrainConfig.of(o), RankConfig.of(o), Tracking.of(o)
    train_locally(storage, run_id, cfg, rank, launch, tracking)


@cli.command()
@options(s.STORAGE, s.MODEL_REPOSITORY, s.CHECKPOINT, s.RUN_ID, s.PUBLISH, s.CANARY, s.TRITON)
@options(s.TRACKING)
@stage
def export(
    storage: Path,
    model_repository: ModelRepository | None,
    checkpoint: Path | None,
    run_id: str | None,
    canary: bool,
    **o: Any,
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
    Not better: logged, exit 0, repository unchanged. A training run's outcome is
    recorded in the repository (MODEL_NAME/.export/runs/RUN_ID.json, every attempt in
    its history; `mnist-pipeline status` shows it). The champion's record is checked
    against the repository's ledger and its model.onnx against its sha256 first. With
    --precision int8 the fp32 export is quantised and held to that export's accuracy
    first; the int8 and fp32 exports of one checkpoint are different models. The same
    holds for an object-storage --model-repository.
    """
    from mnist_pipeline.export import PublishConfig, export
    from mnist_pipeline.tritonconfig import TritonConfig

    export(storage, TritonConfig.of(o), checkpoint, run_id, PublishConfig.of(o),
           model_repository, Tracking.of(o), canary)  # fmt: skip


@cli.command(context_settings={"ignore_unknown_options": True})
@options(s.STORAGE, s.MODEL_REPOSITORY, s.PIN, s.WORKDIR, s.SERVER, s.LOG_VERBOSE)
@click.argument("triton_args", nargs=-1, type=click.UNPROCESSED)
@stage
def serve(
    storage: Path,
    model_repository: ModelRepository | None,
    model_version: str,
    run_id: str | None,
    workdir: Path | None,
    log_verbose: int,
    triton_args: tuple[str, ...],
    **o: Any,
) -> None:
    """Serve a model of the repository with a local Triton Inference Server until stopped.

    \b
    Pins the model's --model-version (the newest by default) into the work folder as
    `pin --triton-backend python` does (checked against its metadata.json), then runs
    the tritonserver 2.51 bundled in the nvidia-pytriton wheel on it: Triton's python
    backend running the exported model.onnx with ONNX Runtime. Other options
    (TRITON_ARGS, e.g. --pinned-memory-pool-byte-size=0) go to tritonserver untouched.
    Stops cleanly, with every Triton process, on SIGTERM or Ctrl-C. From an
    object-storage repository the version is downloaded and checked.
    """
    from mnist_pipeline.serve import LocalTriton, ServerConfig, pinned, serve_forever
    from mnist_pipeline.storage import repository_at
    from mnist_pipeline.tritonconfig import TritonConfig

    server = dataclasses.asdict(ServerConfig.of(o))
    location = repository_at(model_repository, storage)
    with tempfile.TemporaryDirectory(prefix="mnist-served-") as temp:
        served = pinned(location, Path(temp), TritonConfig.of(o), model_version, run_id)
        serve_forever(LocalTriton(served, workdir, log_verbose=log_verbose,
                                  extra_args=triton_args, **server))  # fmt: skip


@cli.command()
@options(s.URL, s.STORAGE, s.MODEL_REPOSITORY, s.RUN_ID, s.INFER)
@stage
def infer(
    storage: Path, model_repository: ModelRepository | None, run_id: str | None, **o: Any
) -> None:
    """Send real MNIST test images to Triton over gRPC; save predictions and latency.

    Waits (with backoff, up to --timeout) for the server and the model, then sends
    --requests requests of --images-per-request test images, normalised as in
    training. Writes OUTPUT/<UTC time>/{samples.json, latency.json, latency.png,
    inference.log} (OUTPUT: STORAGE/inference by default); on failure latency.json
    says why and keeps what was measured. Exit 1 when Triton served another version
    than --model-version or the accuracy is below --min-accuracy.
    """
    from mnist_pipeline import client

    client.infer(storage, client.InferConfig.of(o), run_id, model_repository)


@cli.command()
@options(
    s.STORAGE, s.SOURCE, s.MODEL_REPOSITORY, s.TRAIN, s.TRAIN_HOW, s.PUBLISH, s.TRITON, s.SERVER,
    s.INFER, s.TRACKING,
)  # fmt: skip
@stage
def run(
    storage: Path,
    source: Path | None,
    model_repository: ModelRepository | None,
    run_id: str | None,
    **o: Any,
) -> None:
    """Run every stage locally: data, train, export, serve, infer, then stop the server.

    `make run`: on the defaults it trains one epoch on all 60000 images (1 to 8 minutes
    on 2 cores, depending on the CPU: docs/BENCHMARKS.md), publishes the model if it
    beats the served one, serves STORAGE/models with a local Triton on loopback and
    measures it with the gRPC client. Prints a summary: test accuracy, the exported
    version (or why not), served accuracy and latency, and where the outputs are.

    The run id defaults to one derived from the training settings: run again, it
    resumes an interrupted run or reuses the completed one instead of retraining.
    Give --run-id (or another --seed) to train a new model.
    """
    from mnist_pipeline import client
    from mnist_pipeline import serve as serving
    from mnist_pipeline import train as train_stage
    from mnist_pipeline.data import place
    from mnist_pipeline.export import PublishConfig, export
    from mnist_pipeline.storage import repository_at
    from mnist_pipeline.tritonconfig import TritonConfig

    location = repository_at(model_repository, storage)
    cfg, rank = train_stage.TrainConfig.of(o), train_stage.RankConfig.of(o)
    launch = launch_config(o)
    triton, publish, tracking = TritonConfig.of(o), PublishConfig.of(o), Tracking.of(o)
    server, infer_cfg = serving.ServerConfig.of(o), client.InferConfig.of(o)
    with tempfile.TemporaryDirectory(prefix="mnist-served-") as temp:
        serving.wheel_server(Path(temp))  # a missing server: before minutes of training, not after
    for port in (server.http_port, server.grpc_port, server.metrics_port):
        serving.check_port_free(server.host, port)  # before minutes of training, not after
    place(storage, source)
    run_id = run_id or train_stage.default_run_id(cfg)
    log.info("run %s: %s", run_id, train_stage.run_state(storage, run_id))
    metrics = train_locally(storage, run_id, cfg, rank, launch, tracking)
    outcome = export(storage, triton, None, run_id, publish, location, tracking, trained=metrics)
    # The version this export chose, as `--model-version run` would read it back.
    version = str(outcome.version)
    if infer_cfg.model_version == "run":
        infer_cfg = dataclasses.replace(infer_cfg, model_version=version)
    with tempfile.TemporaryDirectory(prefix="mnist-served-") as temp:
        served = serving.pinned(location, Path(temp), triton, version)
        with serving.LocalTriton(served, **dataclasses.asdict(server)) as local:
            infer_cfg = dataclasses.replace(infer_cfg, url=local.grpc_url)
            report = client.infer(storage, infer_cfg, run_id, location)
    click.echo(summary(storage, location, run_id, metrics, outcome, report))


def summary(
    storage: Path,
    location: ModelRepository,
    run_id: str,
    metrics: dict[str, Any],
    outcome: Any,
    report: dict[str, Any],
) -> str:
    from mnist_pipeline.storage import run_dir

    if outcome.status == "published":
        exported = f"version {outcome.version} ({outcome.reason})"
    else:
        exported = f"nothing published, {outcome.reason}"
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
            f"  model repository {location}",
            f"  inference        {report['output_dir']}",
        ]
    )


@cli.group()
def wait() -> None:
    """Block until an earlier stage of a run is done; exit 1 at once if it failed.

    The Helm chart's initContainers use these to enforce the order
    training → export → Triton → client. Artifacts on storage decide; the Kubernetes
    API (--job) only adds failures an artifact cannot report (a pod killed for memory).
    """


def waiting(what: str, o: dict[str, Any]) -> Any:
    from mnist_pipeline.waits import WaitConfig

    # A deleted or drained pod's wait exits 143 at once (stage), never 1: its Job's
    # podFailurePolicy fails the Job on 1 and retries 143. As a container's PID 1 without
    # a handler it would ignore SIGTERM until the kubelet's SIGKILL (137).
    return WaitConfig.of(o).wait(what)


@wait.command("training")
@options(s.WAIT)
@stage
def wait_training(storage: Path, run_id: str, **o: Any) -> None:
    """Until checkpoints/RUN_ID/metrics.json says complete."""
    from mnist_pipeline import waits

    waiting(f"training run {run_id}", o).run(waits.training_check(storage, run_id))


@wait.command("export")
@options(s.WAIT, s.MODEL_NAME, s.MODEL_REPOSITORY)
@stage
def wait_export(
    storage: Path,
    run_id: str,
    model_name: str,
    model_repository: ModelRepository | None,
    **o: Any,
) -> None:
    """Until the export of RUN_ID is published or skipped and the repository's NAME has
    that version servable. With an object-storage --model-repository both are read from
    the bucket: no volume needed."""
    from mnist_pipeline import waits

    check = waits.export_check(storage, run_id, model_name, model_repository)
    waiting(f"export of run {run_id}", o).run(check)


@wait.command("serving")
@options(s.WAIT, s.MODEL_NAME, s.HTTP_URL, s.MODEL_VERSION, s.MODEL_REPOSITORY)
@stage
def wait_serving(
    storage: Path,
    run_id: str,
    model_name: str,
    http_url: str,
    model_version: str,
    model_repository: ModelRepository | None,
    **o: Any,
) -> None:
    """Until Triton at --http-url is ready and serves --model-version (run: the version
    RUN_ID exported). With an object-storage --model-repository the export is read from
    the bucket."""
    from mnist_pipeline import waits

    check = waits.serving_check(
        storage, run_id, model_name, http_url, model_version, model_repository
    )
    waiting(f"Triton serving run {run_id}", o).run(check)


@cli.command()
@options(s.STORAGE, s.MODEL_REPOSITORY, s.MODEL_NAME, s.RUN_ID, s.KEEP_RUNS, s.KEEP_VERSIONS)
@options(s.KEEP_INFERENCE, s.KEEP_VERSION, s.ABANDONED_AFTER)
@stage
def prune(
    storage: Path,
    model_repository: ModelRepository | None,
    model_name: str,
    run_id: str | None,
    keep_version: tuple[int, ...],
    abandoned_after: float,
    **o: Any,
) -> None:
    """Delete old runs, model versions and inference results beyond the limits.

    Never deletes the newest version, a --keep-version, a version a pin or serve still
    holds (recorded in the repository; another host's record counts until it is
    --abandoned-after seconds old), the run checkpoints/best_model.pth points at,
    --run-id, the versions those two published, or a run still marked running (unless
    untouched for --abandoned-after seconds). The chart runs it before its client Job.
    A version is deleted marker first, so that half deleted it no longer counts; its
    number is never given again.
    """
    from mnist_pipeline import retention

    limits = retention.Limits.of(o)
    retention.prune(storage, model_name, limits, run_id, keep_version, abandoned_after,
                    model_repository)  # fmt: skip


@cli.command()
@options(s.STORAGE, s.MODEL_REPOSITORY, s.SERVED_REPOSITORY, s.PIN, s.TRITON_BACKEND)
@stage
def pin(
    storage: Path,
    model_repository: ModelRepository | None,
    served_repository: Path,
    model_version: str,
    run_id: str | None,
    triton_backend: str,
    **o: Any,
) -> None:
    """Write the model repository one Triton serves: one version, this server's settings.

    SERVED_REPOSITORY/MODEL_NAME/config.pbtxt is the repository's, with this server's
    instance groups (--instance-count of --instance-kind), ONNX Runtime threads (max(1,
    --server-cpus // --instance-count)) and a version_policy naming the one version
    (--model-version), whose files are linked from the volume once checked against the
    sha256 its metadata.json records. --triton-backend says what the server runs it
    with: onnxruntime (NVIDIA's tritonserver images) serves the config as exported;
    python (the nvidia-pytriton wheel's tritonserver, the project's CPU image) adds the
    project's model.py and names Triton's python backend instead, every other field
    unchanged. The chart's Triton initContainer runs it, so `helm rollback` re-serves the
    old run's version and serving settings reach Triton without retraining; `serve` runs
    it into its work folder. Re-runnable. With an object-storage --model-repository the
    version (and, for --model-version run, the run's record) is read from the bucket and
    its files downloaded and checked: no volume needed.
    """
    from mnist_pipeline.pinning import write_served_repository
    from mnist_pipeline.storage import repository_at
    from mnist_pipeline.tritonconfig import TritonConfig

    location = repository_at(model_repository, storage)
    write_served_repository(
        location, served_repository, TritonConfig.of(o), model_version, run_id, triton_backend
    )


@cli.command()
@options(s.STORAGE, s.MODEL_REPOSITORY, s.MODEL_NAME, s.JSON, s.TRACKING_URI)
@stage
def status(
    storage: Path,
    model_repository: ModelRepository | None,
    model_name: str,
    json: bool,
    tracking_uri: str | None,
) -> None:
    """Show the model repository: its versions, what each run's export decided, damage,
    the versions servers hold and who holds the lock.

    \b
    Each version with the run that published it, its accuracy (as recorded when it was
    published) and its state: published, damaged (with the command that publishes its
    model again), or deleted (its number is never given again). Reads only; works the same
    on a folder and on an object-storage --model-repository. Exit 1 when a version is
    damaged. With --tracking-uri, also the MLflow registry's aliases and what it lacks.
    """
    from mnist_pipeline import status as status_report
    from mnist_pipeline.storage import repository_at

    location = repository_at(model_repository, storage)
    report = status_report.report(location, model_name, Tracking(tracking_uri))
    click.echo(status_report.as_json(report) if json else status_report.as_text(report))
    if report["damaged"]:
        raise PipelineFailure(f"{len(report['damaged'])} damaged version(s): see above")


@cli.command()
@options(s.STORAGE, s.MODEL_REPOSITORY, s.MODEL_NAME, dataclasses.replace(s.RUN_ID, required=True))
@options(s.URL, s.CANARY_ANALYSIS, s.TRACKING)
@stage
def canary(
    storage: Path, model_repository: ModelRepository | None, model_name: str, run_id: str,
    url: str, prometheus_url: str | None, tracking_uri: str | None, experiment: str, **o: Any,
) -> None:  # fmt: skip
    """Decide a canary release: promote run RUN_ID's version (the challenger, published
    with `export --canary`) or roll it back, by measurements.

    \b
    Some Triton replicas serve the challenger beside the champion's replicas, behind the
    name --url reaches (dns:///NAME:PORT: every address), clients sending each its share.
    Watches Prometheus until the challenger answered --canary-requests requests or
    --canary-window seconds passed; reads each version's requests, failures and p99
    (Triton's metrics, by version label; tritonserver --metrics-config=
    summary_latencies=true); sends --probe-requests labelled requests through --url and
    measures each version's accuracy on those it answered. Rolls back when the
    challenger's error rate, p99 ratio or accuracy drop exceeds its limit; else promotes.
    The decision, its numbers and reasons go to the repository (the challenger's ledger
    entry, the run's record), and the registry's aliases move (--tracking-uri). A promoted
    version is served by default from the next start of a replica; a rolled-back one never
    again by default. On Kubernetes, --stable-deployment restarts when the challenger is
    promoted and --canary-deployment once decided, so each serves the new champion. Exit 0
    when decided, either way, or when there is nothing to decide: RUN_ID's version is the
    champion (a first release, or an export that kept the champion) or was decided on
    already. --override promote (roll-back) decides by hand instead, measuring nothing.
    """
    from mnist_pipeline import canary as release
    from mnist_pipeline.kube import KubeApi
    from mnist_pipeline.repository import open_repository
    from mnist_pipeline.storage import repository_at

    if prometheus_url is None and o["override"] is None:
        raise UsageError("--prometheus-url is needed to measure (or decide by hand: --override)")
    analysis = release.Analysis(
        storage, open_repository(repository_at(model_repository, storage), model_name), run_id,
        url, prometheus_url or "", o["canary_window"], o["canary_requests"],
        o["probe_requests"], release.Thresholds.of(o), Tracking(tracking_uri, experiment),
        KubeApi.in_cluster(o["namespace"]), o["stable_deployment"], o["canary_deployment"],
        o["override"],
    )  # fmt: skip
    decision = release.analyse(analysis)
    if isinstance(decision, str):
        click.echo(f"nothing to decide: {decision}")
    elif decision.promote:
        click.echo(f"promoted: run {run_id}'s version is the champion of {model_name}")
    else:
        click.echo(f"rolled back: run {run_id}'s version: " + "; ".join(decision.reasons))


@cli.command("sync-registry")
@options(s.STORAGE, s.MODEL_REPOSITORY, s.MODEL_NAME, s.TRACKING)
@stage
def sync_registry(
    storage: Path,
    model_repository: ModelRepository | None,
    model_name: str,
    tracking_uri: str | None,
    experiment: str,
) -> None:
    """Bring the MLflow model registry in line with the model repository.

    \b
    export does this after every decision; this repairs what an unreachable server made
    it miss. Each published version is a model version of MODEL_NAME (its files copied
    to its run's MLflow artifacts, its repository version, run, accuracy, precision and
    sha256 as tags); a damaged or deleted one is tagged so; alias champion names the
    newest servable version. The repository is never changed. Logs each change.
    """
    from mnist_pipeline import registry
    from mnist_pipeline.repository import open_repository
    from mnist_pipeline.storage import repository_at
    from mnist_pipeline.tracking import TrackingError

    if not tracking_uri:
        raise UsageError("sync-registry needs --tracking-uri (or MLFLOW_TRACKING_URI)")
    repo = open_repository(repository_at(model_repository, storage), model_name)
    try:
        done = registry.sync(repo, Tracking(tracking_uri, experiment))
    except TrackingError as e:
        raise PipelineFailure(str(e)) from e
    click.echo(f"registry {tracking_uri}: up to date ({len(done)} change(s) made)")


def main() -> None:
    cli(auto_envvar_prefix=None)
