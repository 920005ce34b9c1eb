"""The command line's contract: one naming rule for everything that becomes a path, every
option settable (and shown) as an environment variable, the same variables honoured by
every subcommand, and errors from a variable that name it. Real child processes."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from harness.pipeline import cli
from mnist_pipeline.cli import cli as group
from mnist_pipeline.errors import UsageError
from mnist_pipeline.settings import parse_model_repository
from mnist_pipeline.storage import available_cpus, validate_name

# Every way a name could escape checkpoints/ or break a path.
BAD_NAMES = ["..", ".", "../escape", "a/b", "a b", "a\tb", "a\\b", "-x", ".hidden", "é", "x" * 65]


def test_the_name_rule() -> None:
    for good in ("a", "20261124-130819", "cfg-0123abcd", "run_1.2", "A-b_c.d", "x" * 64):
        assert validate_name(good) == good
    for bad in [*BAD_NAMES, ""]:
        with pytest.raises(UsageError, match="not allowed: use 1-64 characters"):
            validate_name(bad)


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_run_ids_are_refused_everywhere_before_touching_storage(
    tmp_path: Path, name: str
) -> None:
    storage = tmp_path / "storage"
    commands = [
        ["train", "--run-id", name],
        ["export", "--run-id", name],
        ["run", "--run-id", name],
        ["wait", "training", "--run-id", name, "--wait-timeout", "1"],
        ["wait", "export", "--run-id", name, "--wait-timeout", "1"],
    ]
    for args in commands:
        result = cli(args[0], *args[1:], "--storage", storage)
        assert result.returncode == 2, (args, result.stderr)
        assert "run id" in result.stderr and "not allowed" in result.stderr, result.stderr
    # From the environment too, and the error names the variable.
    result = cli("train", "--storage", storage, env={"MNIST_PIPELINE_RUN_ID": name})
    assert result.returncode == 2 and "MNIST_PIPELINE_RUN_ID=" in result.stderr
    assert not storage.exists() and not (tmp_path / "escape").exists()


def test_bad_model_names_are_refused(tmp_path: Path) -> None:
    for args in (["export"], ["wait", "export", "--run-id", "r"], ["infer"]):
        result = cli(*args, "--model-name", "../models", "--storage", tmp_path / "s")
        assert result.returncode == 2 and "model name '../models' is not allowed" in result.stderr


def commands(command: click.Command = group, path: str = "") -> list[tuple[str, click.Command]]:
    if isinstance(command, click.Group):
        return [
            found
            for name, sub in command.commands.items()
            for found in commands(sub, f"{path} {name}".strip())
        ]
    return [(path, command)]


def envvars(command: click.Command) -> dict[str, str]:
    return {
        p.name: p.envvar
        for p in command.params
        if isinstance(p, click.Option) and p.name and isinstance(p.envvar, str)
    }


@pytest.mark.parametrize("path,command", commands(), ids=[p for p, _ in commands()])
def test_every_option_has_a_variable_shown_in_help(path: str, command: click.Command) -> None:
    options = [p for p in command.params if isinstance(p, click.Option) and p.name != "help"]
    assert all(p.envvar and p.show_envvar for p in options), [
        p.name for p in options if not (p.envvar and p.show_envvar)
    ]
    help_text = cli(*path.split(), "--help").stdout
    for option in options:
        names = [option.envvar] if isinstance(option.envvar, str) else option.envvar
        assert f"env var: {', '.join(names)}" in " ".join(help_text.split()), option.name


def test_group_options_have_variables_too() -> None:
    verbose = next(p for p in group.params if p.name == "verbose")
    assert (
        isinstance(verbose, click.Option)
        and verbose.envvar == "MNIST_PIPELINE_VERBOSE"
        and verbose.show_envvar
    )


def test_run_honours_every_variable_of_the_stages_it_runs() -> None:
    by_path = dict(commands())
    run = envvars(by_path["run"])
    for stage in ("train", "export", "infer", "serve"):
        shared = set(envvars(by_path[stage])) & set(run)
        for name in shared:
            assert run[name] == envvars(by_path[stage])[name], (stage, name)
    for name in ("RUN_ID", "LR", "LIMIT_TEST", "SEED", "MIN_IMPROVEMENT", "MAX_BATCH_SIZE"):
        assert "MNIST_PIPELINE_" + name in run.values(), name
    missing = set(envvars(by_path["train"]).values()) - set(run.values())
    assert not missing, missing


@pytest.mark.parametrize(
    "args,env,flag",
    [
        (["train"], {"MNIST_PIPELINE_EPOCHS": "0"}, "'--epochs'"),
        (["train"], {"MNIST_PIPELINE_DEVICE": "gpu0"}, "'--device'"),
        (["train"], {"MNIST_PIPELINE_VERBOSE": "maybe"}, "'--verbose'"),
        (["run"], {"MNIST_PIPELINE_LR": "-1"}, "'--lr'"),
        (["run"], {"MNIST_PIPELINE_LIMIT_TEST": "many"}, "'--limit-test'"),
        (["infer"], {"MNIST_PIPELINE_URL": "localhost"}, "'--url'"),
        (["export"], {"MNIST_PIPELINE_MAX_BATCH_SIZE": "0"}, "'--max-batch-size'"),
    ],
)
def test_an_error_from_a_variable_names_it(
    tmp_path: Path, args: list[str], env: dict[str, str], flag: str
) -> None:
    result = cli(*args, "--storage", tmp_path / "s", env=env)
    ((var, value),) = env.items()
    assert result.returncode == 2, result.stderr
    assert f"{var}={value!r} (the variable of" in result.stderr and flag in result.stderr
    assert not (tmp_path / "s").exists()


def float_options() -> list[tuple[str, click.Option]]:
    return [
        (f"{path} {p.name}", p)
        for path, command in commands()
        for p in command.params
        if isinstance(p, click.Option) and isinstance(p.type, click.types.FloatParamType)
    ]


@pytest.mark.parametrize("name,option", float_options(), ids=[n for n, _ in float_options()])
def test_every_float_option_refuses_nan_and_infinity(name: str, option: click.Option) -> None:
    for bad in ("nan", "NaN", "inf", "-inf", "Infinity", "1e999"):
        with pytest.raises(click.BadParameter, match="is not a finite number"):
            option.type.convert(bad, option, None)


def test_non_finite_settings_exit_2_naming_their_variable(tmp_path: Path) -> None:
    storage = tmp_path / "s"
    for args, env, flag in [
        (["train"], {"MNIST_PIPELINE_LR": "nan"}, "'--lr'"),
        (["run"], {"MNIST_PIPELINE_WEIGHT_DECAY": "inf"}, "'--weight-decay'"),
        (["infer"], {"MNIST_PIPELINE_TIMEOUT": "nan"}, "'--timeout'"),
        (["export"], {"MNIST_PIPELINE_MIN_IMPROVEMENT": "inf"}, "'--min-improvement'"),
    ]:
        result = cli(*args, "--storage", storage, env=env)
        ((var, value),) = env.items()
        assert result.returncode == 2, (args, result.stderr)
        assert f"{var}={value!r} (the variable of {flag}" in result.stderr, result.stderr
        assert "is not a finite number" in result.stderr
    assert not storage.exists()


def test_training_settings_refuse_non_finite_numbers_from_python_too() -> None:
    from mnist_pipeline.train import TrainConfig

    for bad in ({"lr": float("nan")}, {"lr": float("inf")}, {"weight_decay": float("nan")}):
        with pytest.raises(UsageError, match="must be a finite number"):
            TrainConfig(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("version", ["abc", "0", "-1", "1.5", "01", "9" * 20])
def test_a_model_version_triton_cannot_have_is_refused_up_front(
    tmp_path: Path, version: str
) -> None:
    # Nothing listens at the URL: a version let through would fail there instead (exit 1).
    result = cli(
        "infer",
        "--url",
        "localhost:1",
        "--timeout",
        "1",
        env={"MNIST_PIPELINE_MODEL_VERSION": version},
    )
    assert result.returncode == 2, result.stderr
    assert f"MNIST_PIPELINE_MODEL_VERSION={version!r}" in result.stderr
    assert "expected run, challenger, a version number such as 1" in result.stderr
    result = cli("run", "--storage", tmp_path / "s", "--model-version", version)
    assert result.returncode == 2 and "a version number such as 1" in result.stderr
    assert not (tmp_path / "s").exists()


def test_epochs_are_bounded(tmp_path: Path) -> None:
    """10**23 epochs would run, with an ETA of 8e20 hours."""
    from mnist_pipeline.train import TrainConfig

    result = cli("train", "--storage", tmp_path / "s", "--epochs", "9" * 23)
    assert result.returncode == 2 and "0<x<=1000" in result.stderr, result.stderr
    result = cli("run", "--storage", tmp_path / "s", env={"MNIST_PIPELINE_EPOCHS": "1001"})
    assert result.returncode == 2 and "MNIST_PIPELINE_EPOCHS='1001'" in result.stderr, result.stderr
    assert not (tmp_path / "s").exists()
    with pytest.raises(UsageError, match="--epochs 1001: must be > 0 and <= 1000"):
        TrainConfig(epochs=1001)


def test_counts_are_bounded_by_what_the_machine_has(tmp_path: Path) -> None:
    """--threads 100000 segfaulted torch (exit 139, no output); --nproc-per-node 100000
    would have started that many ranks."""
    cpus = available_cpus()  # the CPUs this process may use, cgroup limit included
    for flag in ("--threads", "--nproc-per-node"):
        result = cli("train", "--storage", tmp_path / "s", flag, "100000")
        assert result.returncode == 2, result.stderr
        assert f"{flag} 100000: this machine has {cpus} CPUs; use at most {cpus}" in result.stderr
    result = cli("infer", "--storage", tmp_path / "s", "--concurrency", "100000")
    assert result.returncode == 2 and "1<=x<=256" in result.stderr, result.stderr
    assert not (tmp_path / "s").exists()


def test_a_variable_the_command_line_overrides_is_named_as_ignored(tmp_path: Path) -> None:
    """A chart's extraEnv repeating a flag the chart passes had no effect and said nothing."""
    args = ("infer", "--storage", tmp_path, "--requests", "7", "--url", "127.0.0.1:1")
    result = cli(*args, "--timeout", "0.1", env={"MNIST_PIPELINE_REQUESTS": "5"})
    assert "MNIST_PIPELINE_REQUESTS='5' is ignored: --requests on the command line wins" in (
        result.stderr
    )
    same = cli(*args, "--timeout", "0.1", env={"MNIST_PIPELINE_REQUESTS": "7"})
    assert "is ignored" not in same.stderr


def test_a_limit_covering_the_whole_split_is_the_whole_split_and_its_run_id() -> None:
    """--limit-train 10000000 trains on all 60000 images, so it is the run of
    --limit-train 0, not a new one training the same model again."""
    from mnist_pipeline.train import TrainConfig, default_run_id

    whole = TrainConfig(limit_train=10_000_000, limit_test=10_000)
    assert (whole.limit_train, whole.limit_test) == (0, 0)
    assert default_run_id(whole) == default_run_id(TrainConfig())
    assert TrainConfig(limit_train=59_999).limit_train == 59_999
    assert default_run_id(TrainConfig(limit_train=60_000)) == default_run_id(TrainConfig())


@pytest.mark.parametrize("path,command", commands(), ids=[p for p, _ in commands()])
def test_every_variable_is_the_prefix_and_the_flag(path: str, command: click.Command) -> None:
    for option in command.params:
        if isinstance(option, click.Option) and option.name != "help":
            flag = next(o for o in option.opts if o.startswith("--"))
            ours = "MNIST_PIPELINE_" + flag[2:].upper().replace("-", "_")
            # MLflow's own variables are read too, after ours: MLFLOW_TRACKING_URI.
            fallback = {"--tracking-uri": "MLFLOW_TRACKING_URI",
                        "--experiment": "MLFLOW_EXPERIMENT_NAME"}.get(flag)  # fmt: skip
            assert option.envvar == ([ours, fallback] if fallback else ours)


def test_a_shared_option_is_the_same_option_in_every_command() -> None:
    seen: dict[str, tuple[object, ...]] = {}
    for path, command in commands():
        for p in command.params:
            if isinstance(p, click.Option) and p.name not in ("help", "run_id"):
                same = (p.envvar, p.help, p.default, p.type.to_info_dict())
                assert seen.setdefault(str(p.name), same) == same, (path, p.name)


def test_unprefixed_variables_are_ignored(tmp_path: Path) -> None:
    """What a shell or a pod happens to hold (a Service named grpc injects GRPC_PORT) never
    feeds the CLI: only MNIST_PIPELINE_ variables do."""
    storage = tmp_path / "s"
    ignored = cli("train", "--storage", storage, env={"EPOCHS": "0", "NNODES": "2"})
    assert ignored.returncode == 2 and "missing; run `mnist-pipeline data" in ignored.stderr
    refused = cli("train", "--storage", storage, env={"MNIST_PIPELINE_BATCH_SIZE": "1"})
    assert refused.returncode == 2 and "MNIST_PIPELINE_BATCH_SIZE='1'" in refused.stderr


def test_python_configs_are_checked_as_the_cli_checks_them() -> None:
    from mnist_pipeline.client import InferConfig
    from mnist_pipeline.train import TrainConfig

    with pytest.raises(UsageError, match="--batch-size 1: must be >= 2"):
        TrainConfig(batch_size=1)
    with pytest.raises(UsageError, match="--optimizer 'adamw': one of sgd, adam"):
        TrainConfig(optimizer="adamw")
    with pytest.raises(UsageError, match="--min-accuracy 2: must be >= 0 and <= 1"):
        InferConfig(min_accuracy=2)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3"])
def test_an_s3_url_naming_a_local_host_without_a_port_never_means_aws(
    tmp_path: Path, host: str
) -> None:
    """s3://127.0.0.1/bucket read as AWS would be a bucket named 127.0.0.1 at Amazon's
    endpoint: refused before any request, with the form the user meant."""
    url = f"s3://{host}/models"
    env = {"MNIST_PIPELINE_MODEL_REPOSITORY": url, "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    result = cli("pin", "--storage", tmp_path, "--served-repository", tmp_path / "served", env=env)
    assert result.returncode == 2, result.stderr
    assert f"{host!r} names a host, not an AWS S3 bucket" in result.stderr
    assert f"did you mean s3://{host}:PORT/models" in result.stderr
    assert "Traceback" not in result.stderr
    assert parse_model_repository("s3://my-models/prefix").host == ""  # AWS, as before
