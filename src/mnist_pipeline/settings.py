"""Every setting, declared once: its default, its range or choices, its help.

A configuration dataclass declares each field with `Setting.field()`, and
options that belong to no configuration are `Setting`s below. Everything else derives from
these declarations: the click options of every command that takes a setting, the
environment variable (MNIST_PIPELINE_ and the flag's name, as pip has PIP_), the checks a
dataclass runs on itself once made (`Settings`), and docs/CLI.md.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from mnist_pipeline.errors import UsageError
from mnist_pipeline.storage import (
    DEFAULT_MODEL_NAME,
    DEFAULT_STORAGE,
    MAX_EPOCHS,
    NAME_PATTERN,
    ModelRepository,
    check_model_version,
    validate_name,
)

ENV_PREFIX = "MNIST_PIPELINE_"


def envvar(name: str) -> str:
    """The variable of the option --NAME: MNIST_PIPELINE_BATCH_SIZE for --batch-size."""
    return ENV_PREFIX + name.upper().replace("-", "_")


@dataclass(frozen=True)
class Setting:
    """One option: `name` is its Python name (batch_size), its flag --batch-size."""

    name: str
    default: Any
    help: str
    type: Any = None  # int, float, str, bool, Path; None: the default's type
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    choices: tuple[str, ...] | None = None
    parse: Callable[[Any], Any] | None = None  # str -> value, raising UsageError
    path: str | None = None  # "dir" or "file" for Path settings
    multiple: bool = False
    required: bool = False
    short: str | None = None  # a one-letter alias: -v
    default_text: str | None = None  # the default as --help shows it, where it is not fixed
    fallback_envvar: str | None = None  # another tool's convention, read when ours is unset

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def envvar(self) -> str:
        return envvar(self.name)

    @property
    def python_type(self) -> Any:
        if self.type is not None:
            return self.type
        return Path if isinstance(self.default, Path) else type(self.default)

    def field(self) -> Any:
        """This setting as a dataclass field (its default, and itself as metadata)."""
        default = self.default
        if isinstance(default, list | dict | set):
            raise TypeError(f"{self.name}: use a tuple default")
        return dataclasses.field(default=default, metadata={"setting": self})

    def check(self, value: Any) -> Any:
        """The value, converted and checked as the CLI would; UsageError naming the flag."""
        if value is None:
            return value
        if self.parse is not None and isinstance(value, str):
            return self.parse(value)
        if self.choices is not None and value not in self.choices:
            raise UsageError(f"{self.flag} {value!r}: one of {', '.join(self.choices)}")
        if self.python_type in (int, float):
            self._check_range(value)
        return value

    def _check_range(self, value: float) -> None:
        if not math.isfinite(value):
            raise UsageError(f"{self.flag} {value}: must be a finite number")
        low = self.min is not None and (value <= self.min if self.min_open else value < self.min)
        high = self.max is not None and (value >= self.max if self.max_open else value > self.max)
        if low or high:
            raise UsageError(f"{self.flag} {value}: must be {self.range_text()}")

    def range_text(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f"{'>' if self.min_open else '>='} {self.min:g}")
        if self.max is not None:
            parts.append(f"{'<' if self.max_open else '<='} {self.max:g}")
        return " and ".join(parts)


def settings_of(cls: Any) -> list[tuple[str, Setting]]:
    """(field name, setting) for each field of dataclass `cls` declared as a setting."""
    return [
        (f.name, f.metadata["setting"]) for f in dataclasses.fields(cls) if "setting" in f.metadata
    ]


class Settings:
    """Base of a frozen dataclass of settings, checked once made (from the CLI's values or
    in Python) as the CLI checks each, and by `check`: whoever holds one holds valid ones."""

    def __post_init__(self) -> None:
        for attr, spec in settings_of(type(self)):
            spec.check(getattr(self, attr))
        self.check()

    def check(self) -> None:
        """What no single setting can say (a subclass adds its rules)."""

    @classmethod
    def of(cls, values: dict[str, Any], **given: Any) -> Self:
        """From a command's values of the settings it declares: `given` overrides them;
        those the command does not take keep their defaults."""
        fields = {attr: values[spec.name] for attr, spec in settings_of(cls) if spec.name in values}
        return cls(**{**fields, **given})


@dataclass(frozen=True)
class NameRule:
    """The parse of a name that becomes a path (storage.validate_name): declared rather than
    a lambda, so that the Helm chart applies the same pattern (scripts/chart_settings.py)."""

    what: str  # "model name": how the message calls the value

    @property
    def pattern(self) -> str:
        """The regular expression validate_name applies (RE2-compatible, anchored)."""
        return NAME_PATTERN

    def __call__(self, value: str) -> str:
        return validate_name(value, self.what)


def parse_batch_sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.replace(",", " ").split())
    except ValueError:
        raise UsageError(f"{value!r}: expected integers such as 2,4,8") from None
    if any(s < 1 for s in sizes):
        raise UsageError(f"{value!r}: batch sizes must be at least 1")
    return sizes


DNS_TARGET = "dns:"


def grpc_endpoint(url: str) -> str:
    """The HOST:PORT a gRPC target dials: `url` itself, or what follows a dns: target's
    optional //DNS-SERVER/ (dns:///name:8001, dns://10.0.0.10:53/name:8001)."""
    if not url.startswith(DNS_TARGET):
        return url
    rest = url[len(DNS_TARGET) :]
    return rest.split("/", 3)[3] if rest.startswith("//") and rest.count("/") >= 3 else rest


def parse_grpc_url(url: str) -> str:
    """Check a gRPC endpoint is HOST:PORT or a dns: target (gRPC's resolver, which gives
    every address of the name: a headless Service's pods) and return it; raise UsageError
    saying what form is expected. Without a port gRPC silently dials 443."""
    expected = (
        "expected HOST:PORT of Triton's gRPC endpoint, such as localhost:8001, or a dns: "
        "target such as dns:///triton-grpc.ml.svc.cluster.local:8001"
    )
    if url.startswith(DNS_TARGET + "//") and url[len(DNS_TARGET) :].count("/") < 3:
        raise UsageError(f"URL {url!r}: {expected} (dns://DNS-SERVER/ needs the / before HOST)")
    endpoint = grpc_endpoint(url)
    if "://" in endpoint:
        scheme = endpoint.split("://", 1)[0]
        raise UsageError(
            f"URL {url!r}: {expected}, without a scheme ({scheme}:// is not part of it)"
        )
    try:
        parts = urllib.parse.urlsplit(f"//{endpoint}")
        port = parts.port
    except ValueError as e:
        raise UsageError(f"URL {url!r}: {expected} ({e})") from None
    if not parts.hostname or parts.path or parts.query or parts.fragment or parts.username:
        raise UsageError(f"URL {url!r}: {expected}")
    if port is None:
        raise UsageError(f"URL {url!r} has no port: {expected} (8001 by default)")
    if port == 0:
        raise UsageError(f"URL {url!r}: port 0 is not a port; {expected}")
    return url


S3_FORMS = (
    "s3://BUCKET/PREFIX (AWS S3), s3://HOST:PORT/BUCKET/PREFIX (plain HTTP) or "
    "s3://https://HOST[:PORT]/BUCKET/PREFIX"
)
# S3's bucket naming rule (3-63 characters; dots allowed, as radosgw and AWS do).
BUCKET_PATTERN = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_tracking_uri(value: str) -> str:
    """An MLflow server's address: the pipeline speaks its REST API, so http(s) only."""
    url = urllib.parse.urlsplit(value)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UsageError(
            f"--tracking-uri {value!r}: an MLflow server's http:// or https:// address "
            "(start one with `mlflow server`; file and database stores are not spoken here)"
        )
    return value.rstrip("/")


def parse_model_repository(value: str) -> ModelRepository:
    """A folder, or Triton's S3 URL form: s3://[http://|https://]host[:port]/bucket/prefix
    or s3://bucket/prefix (AWS). Without a scheme, the first part is an endpoint only when
    it has a port, as Triton reads it."""
    if not value.startswith("s3://"):
        if "://" in value:
            raise UsageError(f"model repository {value!r}: a folder, or one of {S3_FORMS}")
        return ModelRepository(folder=Path(value))
    rest, scheme, host, port = value[len("s3://") :], "https", "", None
    explicit = re.match(r"(https?)://", rest)
    first = rest.split("/", 1)[0]
    if explicit or ":" in first:
        if explicit:
            scheme, rest = explicit.group(1), rest[explicit.end() :]
        else:
            scheme = "http"  # Triton's rule for s3://host:port/...
        endpoint, _, rest = rest.partition("/")
        try:
            parts = urllib.parse.urlsplit(f"//{endpoint}")
            host, port = parts.hostname or "", parts.port
        except ValueError as e:
            raise UsageError(f"model repository {value!r}: {e}; {S3_FORMS}") from None
        if not host or parts.username or parts.path:
            raise UsageError(f"model repository {value!r}: no endpoint host; {S3_FORMS}")
    bucket, _, prefix = rest.partition("/")
    if not host and (bucket == "localhost" or is_ip_address(bucket)):
        # As a bucket name, AWS S3 would get it: the requests would leave for Amazon.
        raise UsageError(
            f"model repository {value!r}: {bucket!r} names a host, not an AWS S3 bucket; "
            f"did you mean s3://{bucket}:PORT/{rest.partition('/')[2] or 'BUCKET'} (plain "
            f"HTTP) or s3://https://{bucket}/...? Forms: {S3_FORMS}"
        )
    if not re.fullmatch(BUCKET_PATTERN, bucket, re.ASCII):
        raise UsageError(
            f"model repository {value!r}: bucket {bucket!r} is not an S3 bucket name (3-63 "
            f"lower-case letters, digits, '.' and '-'); expected {S3_FORMS}"
        )
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise UsageError(f"model repository {value!r}: empty, '.' or '..' part in the prefix")
    return ModelRepository(bucket=bucket, prefix=prefix, scheme=scheme, host=host, port=port)


OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("onecycle", "constant")
DEVICES = ("auto", "cpu", "cuda")
GRADIENT_COMPRESSIONS = ("none", "fp16")
PRECISIONS = ("fp32", "int8")
INSTANCE_KINDS = ("cpu", "gpu")
LB_POLICIES = ("auto", "round_robin", "pick_first")
TRITON_BACKENDS = ("onnxruntime", "python")


def _port(name: str, default: int, what: str) -> Setting:
    return Setting(name, default, f"Port of Triton's {what} endpoint.", min=1, max=65535)


def _keep(name: str, default: int, what: str) -> Setting:
    return Setting(name, default, f"Keep the newest {what} (0: all).", min=0)


# Shared by several commands.
STORAGE = Setting(
    "storage",
    Path(DEFAULT_STORAGE),
    "Root of the shared storage (the PVC is mounted at /storage).",
    path="dir",
)
VERBOSE = Setting("verbose", False, "Debug logging.", short="-v")
RUN_ID = Setting(
    "run_id",
    None,
    "The training run (its folder under checkpoints/). train: the same id resumes an "
    "interrupted run and reuses a completed one; default: derived from the training "
    "settings (cfg-<hash>), so repeating a command resumes or reuses its run. export: "
    "this run's checkpoint. wait, pin, prune, infer: the run whose artifacts, version or "
    "folders they look at.",
    type=str,
    parse=NameRule("run id"),
)
MODEL_NAME = Setting(
    "model_name",
    DEFAULT_MODEL_NAME,
    "Model name in the Triton repository (and in config.pbtxt).",
    parse=NameRule("model name"),
)
MODEL_VERSION = Setting(
    "model_version",
    "",
    "Model version: run (the one --run-id's export published; the champion without a run "
    "id), challenger (the one a canary release is deciding on, else the champion), N, or "
    "empty (the champion: the version served by default; for infer, the server's choice).",
    parse=check_model_version,
)

# data
SOURCE = Setting(
    "source",
    None,
    "Folder holding the four MNIST IDX files, .gz or raw. Default: the copy shipped with "
    "the project (data/mnist).",
    type=Path,
    path="dir",
)

# train: what the model is (TrainConfig; the run id is derived from these)
EPOCHS = Setting(
    "epochs",
    1.0,
    "Passes over the training set; a fraction (0.7) ends within a pass, on that share of "
    "its shuffled images.",
    min=0,
    min_open=True,
    max=MAX_EPOCHS,
)
BATCH_SIZE = Setting("batch_size", 128, "Training images per step (the global batch).", min=2)
LR = Setting("lr", 0.05, "Peak learning rate.", min=0, min_open=True)
OPTIMIZER = Setting("optimizer", "sgd", "Optimiser.", choices=OPTIMIZERS)
SCHEDULE = Setting(
    "schedule",
    "onecycle",
    "One-cycle warm-up + cosine decay, or a constant lr.",
    choices=SCHEDULES,
)
WEIGHT_DECAY = Setting("weight_decay", 5e-4, "Weight decay (not on BatchNorm and biases).", min=0)
LABEL_SMOOTHING = Setting(
    "label_smoothing", 0.1, "Label smoothing of the loss.", min=0, max=1, max_open=True
)
SEED = Setting("seed", 0, "Random seed; another seed is another run id, so a new model.")
LIMIT_TRAIN = Setting(
    "limit_train",
    0,
    "Train on the first N images only (0, or 60000 and more: all 60000), for quick runs.",
    min=0,
)
LIMIT_TEST = Setting(
    "limit_test",
    0,
    "Evaluate training on the first N test images only (0, or 10000 and more: all 10000). "
    "Export always measures on all 10000.",
    min=0,
)
SYNC_BN = Setting(
    "sync_bn",
    False,
    "With several processes, BatchNorm statistics over all of them (CUDA only); default: "
    "each process its own.",
)
GRADIENT_COMPRESSION = Setting(
    "gradient_compression",
    "none",
    "With several processes, the gradients sent between them: fp16 halves the bytes of every "
    "all-reduce (DDP's fp16 compression hook; the sum is cast back to fp32).",
    choices=GRADIENT_COMPRESSIONS,
)
# train: how it runs (not in the run id)
DEVICE = Setting("device", "auto", "Where to train: auto picks CUDA when present.", choices=DEVICES)
THREADS = Setting(
    "threads", 0, "CPU threads (0: every CPU this process may use, cgroup limit included).", min=0
)
CHECKPOINT_EVERY = Setting(
    "checkpoint_every",
    200,
    "Also save a resumable checkpoint every N steps (0: epochs only).",
    min=0,
)
EVAL_EVERY = Setting(
    "eval_every", 0, "Also measure test accuracy every N steps (0: at epoch ends only).", min=0
)
NPROC_PER_NODE = Setting(
    "nproc_per_node",
    1,
    "Train as N data-parallel processes on this machine (through torchrun). Ignored under "
    "torchrun, which sets the world itself.",
    min=1,
)
NNODES = Setting(
    "nnodes",
    1,
    "Machines in the data-parallel job; each runs this command with its own --node-rank "
    "(torchrun is started for you, rendezvous at --master-addr).",
    min=1,
    max=1024,
)
NODE_RANK = Setting("node_rank", 0, "This machine's index, 0 to --nnodes - 1.", min=0)
MASTER_ADDR = Setting(
    "master_addr", "", "With --nnodes > 1: the name of node 0, which hosts the rendezvous."
)
MASTER_PORT = Setting("master_port", 29500, "The rendezvous port on node 0.", min=1, max=65535)
RENDEZVOUS_TIMEOUT = Setting(
    "rendezvous_timeout",
    600,
    "With --nnodes > 1: seconds this machine waits for all the others at each "
    "(re)start before it fails; it must cover the slowest machine's start.",
    min=1,
    max=86400,
)
MAX_RESTARTS = Setting(
    "max_restarts",
    3,
    "Times torchrun restarts all ranks after one fails (each resumes from the last "
    "checkpoint) before this attempt fails; the default is the chart's training.maxRestarts.",
    min=0,
    max=100,
)
COLLECTIVE_TIMEOUT = Setting(
    "collective_timeout",
    300,
    "Seconds a rank waits in a collective (a gradient all-reduce) for the others before "
    "it gives them up as lost; it must cover rank 0 writing a checkpoint.",
    min=1,
    max=86400,
)

# export: whether to publish
MIN_IMPROVEMENT = Setting(
    "min_improvement",
    0.0,
    "Publish only if the test accuracy beats the published model's by more than this (both "
    "measured on all 10000 test images; accuracies are fractions, so below 1).",
    min=0,
    max=1,
    max_open=True,
)
PUBLISH_MIN_ACCURACY = Setting(
    "publish_min_accuracy",
    0.5,
    "Never publish a model below this test accuracy (on all 10000 test images): the export "
    "fails instead. Real training reaches 0.99; a model that learnt nothing scores 0.1.",
    min=0,
    max=1,
)
PRECISION = Setting(
    "precision",
    "fp32",
    "int8: publish the fp32 export statically quantised (QDQ, calibrated on training "
    "images), refused if it loses more than 0.1 percentage point of test accuracy against "
    "the fp32 export.",
    choices=PRECISIONS,
)
CHECKPOINT = Setting(
    "checkpoint",
    None,
    "Export this model.pth. Default: --run-id's, else the newest completed run's.",
    type=Path,
    path="file",
)
# export: what config.pbtxt says (TritonConfig)
MAX_BATCH_SIZE = Setting("max_batch_size", 16, "config.pbtxt max_batch_size.", min=1)
INSTANCE_COUNT = Setting("instance_count", 2, "config.pbtxt instance_group count.", min=1)
INSTANCE_KIND = Setting(
    "instance_kind",
    "cpu",
    "config.pbtxt instance_group kind: cpu (KIND_CPU) or gpu (KIND_GPU).",
    choices=INSTANCE_KINDS,
)
SERVER_CPUS = Setting(
    "server_cpus",
    2,
    "CPUs the Triton server gets: each instance gets max(1, server CPUs // instance count) "
    "ONNX Runtime threads (inter-op 1).",
    min=1,
)
PREFERRED_BATCH_SIZES = Setting(
    "preferred_batch_sizes",
    (2, 4, 8),
    "config.pbtxt dynamic_batching preferred_batch_size, comma-separated.",
    parse=parse_batch_sizes,
)
PINNED_MEMORY = Setting("pinned_memory", True, "config.pbtxt input/output pinned memory.")

# serve
HOST = Setting(
    "host", "127.0.0.1", "Address the server binds to (0.0.0.0 to serve other machines)."
)
GRPC_PORT = _port("grpc_port", 8001, "gRPC")
HTTP_PORT = _port("http_port", 8000, "HTTP")
METRICS_PORT = _port("metrics_port", 8002, "Prometheus metrics")
READY_TIMEOUT = Setting(
    "ready_timeout", 120.0, "Seconds to wait for Triton to load the models.", min=1
)
TRITON_BACKEND = Setting(
    "triton_backend",
    "onnxruntime",
    "What the serving tritonserver runs the model with: onnxruntime (NVIDIA's tritonserver "
    "images: config.pbtxt as exported) or python (the nvidia-pytriton wheel's tritonserver, "
    "the project's CPU image: its python backend running the project's model.py on ONNX "
    "Runtime; CPU only).",
    choices=TRITON_BACKENDS,
)
MODEL_REPOSITORY = Setting(
    "model_repository",
    None,
    "The Triton model repository export and run publish to, and pin, serve, infer, prune, "
    f"status and the waits read: a folder, or object storage: {S3_FORMS}; credentials from "
    "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN, AWS_DEFAULT_REGION).",
    type=str,
    parse=parse_model_repository,
    default_text="STORAGE/models",
)
WORKDIR = Setting(
    "workdir",
    None,
    "Folder for triton.log, kept afterwards. Default: a temporary folder, removed on exit "
    "unless Triton failed (the error then names the log it kept).",
    type=Path,
    path="dir",
)
LOG_VERBOSE = Setting("log_verbose", 0, "Triton's own log verbosity.", min=0)

# infer (InferConfig)
URL = Setting(
    "url",
    "localhost:8001",
    "Triton's gRPC endpoint, HOST:PORT (no scheme; 8001 is gRPC, 8000 is HTTP), or "
    "dns:///NAME:PORT to reach every address of NAME (a headless Service's pods).",
    parse=parse_grpc_url,
)
LB_POLICY = Setting(
    "lb_policy",
    "auto",
    "gRPC load balancing over the addresses --url resolves to: round_robin sends each "
    "request to the next replica, pick_first all to one; auto: round_robin for dns: "
    "targets, pick_first otherwise.",
    choices=LB_POLICIES,
)
REQUESTS = Setting("requests", 1000, "Measured requests.", min=1)
CONCURRENCY = Setting(
    "concurrency",
    1,
    "Requests in flight at once, each thread with its own gRPC connection; above 1 "
    "Triton's dynamic batcher forms batches.",
    min=1,
    max=256,  # one thread and one connection each: thousands exhaust the client, not Triton
)
IMAGES_PER_REQUEST = Setting(
    "images_per_request", 1, "Images in each request, at most the model's max_batch_size.", min=1
)
WARMUP = Setting("warmup", 20, "Unmeasured requests sent first.", min=0)
TIMEOUT = Setting(
    "timeout",
    60.0,
    "Seconds to wait for the server and the model to be ready, and to retry a request "
    "while the server is unreachable.",
    min=0,
    min_open=True,
)
REQUEST_TIMEOUT = Setting(
    "request_timeout", 30.0, "Seconds one request may take.", min=0, min_open=True
)
MAX_SECONDS = Setting(
    "max_seconds", 600.0, "Seconds the whole measurement may take.", min=0, min_open=True
)
OUTPUT = Setting(
    "output",
    None,
    "Folder the result folder (<UTC time>/) goes in. Default: STORAGE/inference.",
    type=Path,
    path="dir",
)
MIN_ACCURACY = Setting(
    "min_accuracy",
    0.0,
    "Fail (exit 1) when the served model's accuracy on the images sent is below this.",
    min=0,
    max=1,
)

# wait
WAIT_TIMEOUT = Setting(
    "wait_timeout", 21600.0, "Give up (exit 1) after this many seconds.", min=0, min_open=True
)
WAIT_INTERVAL = Setting("wait_interval", 5.0, "Seconds between looks.", min=0, min_open=True)
VISIBILITY_GRACE = Setting(
    "visibility_grace",
    120.0,
    "Seconds to keep looking once --job has completed but its artifact is not visible yet: "
    "NFS-backed volumes (EFS, Filestore) show a file written on another node only after "
    "their attribute caches expire, up to a minute. Then exit 1.",
    min=0,
)
JOB = Setting(
    "job",
    None,
    "Kubernetes Job producing the artifact: its Failed condition fails the wait at once. "
    "Read only where the pod has a service account token; a deleted Job is ignored.",
    type=str,
)
NAMESPACE = Setting(
    "namespace", None, "Namespace of the Job or Deployments named (default: the pod's own).",
    type=str,
)  # fmt: skip
HTTP_URL = Setting("http_url", None, "Triton's HTTP endpoint, HOST:PORT.", type=str, required=True)

# prune
KEEP_RUNS = _keep("keep_runs", 5, "N run folders under checkpoints/")
KEEP_VERSIONS = _keep("keep_versions", 3, "N model versions")
KEEP_INFERENCE = _keep("keep_inference", 20, "N inference result folders")
KEEP_VERSION = Setting(
    "keep_version",
    (),
    "A version kept whatever the limits (e.g. a pinned served version); repeatable.",
    type=int,
    min=1,
    multiple=True,
)
ABANDONED_AFTER = Setting(
    "abandoned_after",
    0.0,
    "Seconds without a write after which a run still marked running counts as abandoned "
    "(its pods gone) and may go like any other (0: never).",
    min=0,
)

# pin
SERVED_REPOSITORY = Setting(
    "served_repository",
    None,
    "The model repository Triton is started on (the pod's emptyDir).",
    type=Path,
    path="dir",
    required=True,
)

# status
JSON = Setting("json", False, "Print one JSON object instead of text.")

# canary releases (export --canary, canary.py)
CANARY = Setting(
    "canary",
    False,
    "Publish as the challenger of a canary release: the champion (the version served by "
    "default) stays until `mnist-pipeline canary` promotes the challenger or rolls it back.",
)
PROMETHEUS_URL = Setting(
    "prometheus_url", None, "Prometheus scraping every Triton, http(s)://HOST:PORT "
    "(required unless --override).", type=str,
)  # fmt: skip
CANARY_WINDOW = Setting(
    "canary_window", 300.0,
    "Seconds to watch at most: decide then, or as soon as --canary-requests were counted.",
    min=0,
)  # fmt: skip
CANARY_REQUESTS = Setting(
    "canary_requests", 200,
    "Requests the challenger must have answered (Prometheus' count) before deciding early.",
    min=1,
)  # fmt: skip
MAX_P99_RATIO = Setting(
    "max_p99_ratio", 1.5, "Roll back if the challenger's p99 latency exceeds the champion's "
    "times this.", min=0, min_open=True,
)  # fmt: skip
MAX_ERROR_RATE = Setting(
    "max_error_rate", 0.01, "Roll back if more than this share of the challenger's requests "
    "failed.", min=0, max=1,
)  # fmt: skip
MAX_ACCURACY_DROP = Setting(
    "max_accuracy_drop", 0.005, "Roll back if the challenger's accuracy on the probe's "
    "labelled images is below the champion's by more than this.", min=0, max=1,
)  # fmt: skip
PROBE_REQUESTS = Setting(
    "probe_requests", 400, "Labelled requests (8 test images each) the analysis sends "
    "through --url; each version's accuracy is measured on those it answered.", min=1,
)  # fmt: skip
OVERRIDES = ("promote", "roll-back")
OVERRIDE = Setting(
    "override", None, "Decide by hand, measuring nothing: promote the challenger, or roll "
    "it back; recorded as decided by hand.", type=str, choices=OVERRIDES,
)  # fmt: skip
STABLE_DEPLOYMENT = Setting(
    "stable_deployment", None, "Kubernetes Deployment of the champion's replicas, restarted "
    "when the challenger is promoted, so they serve it (patch on it, from the pod's service "
    "account token).", type=str,
)  # fmt: skip
CANARY_DEPLOYMENT = Setting(
    "canary_deployment", None, "Kubernetes Deployment of the challenger's replicas "
    "(--model-version challenger), restarted once decided, so they serve the champion.",
    type=str,
)  # fmt: skip

# MLflow (tracking.py, registry.py)
TRACKING_URI = Setting(
    "tracking_uri",
    None,
    "MLflow tracking server, http(s)://HOST[:PORT][/PATH]: train mirrors each run there, "
    "export registers every published version in its model registry, status shows the "
    "registry. Unset: nothing is tracked. A server that cannot be reached fails nothing.",
    type=str,
    parse=parse_tracking_uri,
    fallback_envvar="MLFLOW_TRACKING_URI",
)
EXPERIMENT = Setting(
    "experiment",
    "mnist-pipeline",
    "MLflow experiment the training runs are tracked in (created when missing).",
    fallback_envvar="MLFLOW_EXPERIMENT_NAME",
)

# The groups commands share: a command takes a group, so the same flags mean the same.
TRAIN = (
    EPOCHS, BATCH_SIZE, LR, OPTIMIZER, SCHEDULE, WEIGHT_DECAY, LABEL_SMOOTHING, SEED,
    LIMIT_TRAIN, LIMIT_TEST, SYNC_BN, GRADIENT_COMPRESSION,
)  # fmt: skip
# how each rank trains, besides the device
RANK = (THREADS, CHECKPOINT_EVERY, EVAL_EVERY, COLLECTIVE_TIMEOUT)
# how the ranks are started
LAUNCH = (NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, RENDEZVOUS_TIMEOUT,
          MAX_RESTARTS)  # fmt: skip
TRAIN_HOW = (RUN_ID, DEVICE, *RANK, *LAUNCH)
PUBLISH = (MIN_IMPROVEMENT, PUBLISH_MIN_ACCURACY, PRECISION)
TRACKING = (TRACKING_URI, EXPERIMENT)
CANARY_ANALYSIS = (PROMETHEUS_URL, CANARY_WINDOW, CANARY_REQUESTS, MAX_P99_RATIO,
                   MAX_ERROR_RATE, MAX_ACCURACY_DROP, PROBE_REQUESTS, OVERRIDE,
                   STABLE_DEPLOYMENT, CANARY_DEPLOYMENT, NAMESPACE)  # fmt: skip
TRITON = (MODEL_NAME, MAX_BATCH_SIZE, INSTANCE_COUNT, INSTANCE_KIND, SERVER_CPUS,
          PREFERRED_BATCH_SIZES, PINNED_MEMORY)  # fmt: skip
SERVER = (HOST, GRPC_PORT, HTTP_PORT, METRICS_PORT, READY_TIMEOUT)
# What pin (and serve, which pins first) writes for one Triton: its model, version and share
# of CPUs.
PIN = (MODEL_NAME, MODEL_VERSION, RUN_ID, SERVER_CPUS, INSTANCE_COUNT, INSTANCE_KIND)
INFER = (MODEL_NAME, MODEL_VERSION, LB_POLICY, REQUESTS, CONCURRENCY, IMAGES_PER_REQUEST, WARMUP,
         TIMEOUT, REQUEST_TIMEOUT, MAX_SECONDS, OUTPUT, MIN_ACCURACY)  # fmt: skip
WAIT = (STORAGE, dataclasses.replace(RUN_ID, required=True), WAIT_TIMEOUT, WAIT_INTERVAL,
        VISIBILITY_GRACE, JOB, NAMESPACE)  # fmt: skip
