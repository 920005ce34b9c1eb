"""Serve the Triton model repository with a real, local Triton Inference Server.

Locally as in Kubernetes: the `tritonserver` 2.51 binary bundled in the nvidia-pytriton
wheel serves the repository as it is (`platform: "onnxruntime_onnx"`) with Triton's own
ONNX Runtime backend (release r24.10, the one of the chart's tritonserver:24.10-py3
image), built CPU-only by scripts/build_triton_backend.sh into `BACKEND_DIR/onnxruntime/`
against that image's ONNX Runtime 1.19.2.

`LocalTriton` is the reusable piece (used by `serve`, `run`, the tests and benchmarks):
it starts tritonserver in its own process group (killed with it if this process dies),
waits until it is ready, and stops it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from mnist_pipeline import repository, settings, storage
from mnist_pipeline.storage import PipelineFailure, UsageError

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2

log = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = settings.HTTP_PORT.default
DEFAULT_GRPC_PORT = settings.GRPC_PORT.default
DEFAULT_METRICS_PORT = settings.METRICS_PORT.default
ONNX_BACKEND = "onnxruntime"
BACKEND_LIBRARY = "libtriton_onnxruntime.so"
DEFAULT_BACKEND_DIR: Path = settings.BACKEND_DIRECTORY.default
BUILD_REMEDY = "build it with `make backend` (scripts/build_triton_backend.sh DIR)"
PR_SET_PDEATHSIG = 1


def locate_tritonserver() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise UsageError("nvidia-pytriton is not installed: pip install 'mnist-pipeline[serve]'")
    binary = Path(spec.origin).parent / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise UsageError(f"{binary}: missing from the nvidia-pytriton wheel")
    return binary


def check_backend(backend_dir: Path) -> Path:
    """The backend directory, once it holds the built onnxruntime backend; exit 2 if not."""
    library = backend_dir / ONNX_BACKEND / BACKEND_LIBRARY
    if not library.is_file():
        raise UsageError(f"no Triton onnxruntime backend at {library}: {BUILD_REMEDY}")
    return backend_dir


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    """Parse config.pbtxt with Triton's own schema; a typo is an error naming the file."""
    from google.protobuf import text_format

    try:
        return repository.parse_config(path.read_text())
    except text_format.ParseError as e:
        raise UsageError(f"{path}: not a valid Triton model config: {e}") from e


def check_repository(source: Path) -> list[str]:
    """The names of the models Triton will load from `source`; UsageError (exit 2) for
    what cannot be served, before a server is started."""
    if not source.is_dir():
        raise UsageError(f"model repository {source} does not exist; run `mnist-pipeline export`")
    names = []
    for model_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        if model_dir.name.startswith("."):
            continue  # an interrupted export's staging folder, which Triton ignores too
        config_path = model_dir / storage.CONFIG_FILE
        if not config_path.is_file():
            raise UsageError(f"{model_dir}: no {storage.CONFIG_FILE}")
        config = read_config(config_path)
        if config.platform != repository.PLATFORM and config.backend != ONNX_BACKEND:
            raise UsageError(
                f"{config_path}: platform {config.platform!r} backend {config.backend!r}: the "
                f"local Triton serves only {repository.PLATFORM} models"
            )
        found = storage.versions(model_dir)
        if not found:
            raise UsageError(f"{model_dir}: no version folder (1/, 2/, …)")
        newest = model_dir / str(found[-1])
        # Only a version that records its checksum can be checked: a repository
        # another tool wrote is Triton's to judge.
        recorded = (newest / storage.METADATA_FILE).is_file()
        if recorded and (why := repository.version_damage(newest)):
            # Triton would refuse the version it serves and, with model control mode none,
            # not start at all.
            raise PipelineFailure(
                f"the version Triton would serve is damaged: {why}; "
                + repository.republish_hint(
                    functools.partial(repository.folder_metadata, model_dir), found[-1]
                )
            )
        names.append(config.name or model_dir.name)
    if not names:
        raise UsageError(f"model repository {source} holds no model; run `mnist-pipeline export`")
    return names


def _die_with_parent(prctl: Callable[..., int], parent: int) -> None:
    """In the child before exec: its own process group, and SIGTERM when the parent dies."""
    os.setpgid(0, 0)
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def check_port_free(host: str, port: int) -> None:
    # Without this, a server already on the port would answer our readiness probe.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As servers do, so that connections of a server just stopped do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UsageError(f"port {port} on {host} is not available ({e.strerror})") from e


# Printed at every start on a machine without a GPU; not the reason anything failed.
HARMLESS = ("CudaDriverHelper", "NVML", "DCGM", "GPU metrics")


def log_tail(path: Path, lines: int = 20) -> str:
    """What explains a failure: Triton's error lines if any, else the end of its log,
    without the option tables that fill it."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} unreadable)"
    if any(line.startswith("Usage: tritonserver") for line in text):
        # A command line it rejected: its complaint, without the usage text around it.
        text = [
            line
            for line in text
            if line.strip()
            and not line[0].isspace()
            and not line.endswith(":")
            and not line.startswith("Usage:")
        ]
    errors = [
        line
        for line in text
        if ((line.startswith("E") and line[1:5].isdigit()) or line.startswith("error:"))
        and not any(h in line for h in HARMLESS)
    ]
    chosen = errors or [line for line in text if not line.startswith(("|", "+"))]
    return "\n".join(chosen[-lines:]) or "(empty log)"


class LocalTriton:
    """A tritonserver process serving `model_repository` with the onnxruntime backend.

    with LocalTriton(storage / "models", grpc_port=8001) as server:
        ... server.grpc_url ...
    """

    def __init__(
        self,
        model_repository: Path,
        workdir: Path | None = None,
        host: str = "127.0.0.1",
        http_port: int = DEFAULT_HTTP_PORT,
        grpc_port: int = DEFAULT_GRPC_PORT,
        metrics_port: int = DEFAULT_METRICS_PORT,
        log_verbose: int = 0,
        ready_timeout: float = 120.0,
        backend_dir: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.model_repository = model_repository
        self.backend_dir = backend_dir or DEFAULT_BACKEND_DIR
        # Passed to tritonserver untouched, after ours: for a repeated flag the last wins.
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.host = host
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.log_verbose = log_verbose
        self._own_workdir = workdir is None
        self._failed = False  # a temporary workdir is kept then: the error names its log
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.models: list[str] = []

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "triton.log"

    def failure(self, what: str) -> PipelineFailure:
        """`what` happened: the error, with Triton's own explanation and where its whole
        log is; a temporary workdir then outlives stop(), so that path stays readable."""
        self._failed = True
        kept = " (kept)" if self._own_workdir else ""
        return PipelineFailure(f"{what}. From {self.log_path}{kept}:\n{log_tail(self.log_path)}")

    def start(self) -> None:
        if self.process is not None:
            raise RuntimeError("this LocalTriton is already started")
        binary = locate_tritonserver()
        backends = check_backend(self.backend_dir)
        self.models = check_repository(self.model_repository)
        for port in (self.http_port, self.grpc_port, self.metrics_port):
            check_port_free(self.host, port)
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="mnist-triton-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(binary),
            f"--model-repository={self.model_repository.resolve()}",
            f"--backend-directory={backends.resolve()}",
            "--model-control-mode=none",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--exit-timeout-secs=10",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]
        log.info("starting tritonserver (log: %s)", self.log_path)
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                # preexec_fn only makes two system calls: safe even with threads running.
                # libc is looked up here, in the parent: lookups are not fork-safe.
                preexec_fn=functools.partial(
                    _die_with_parent, ctypes.CDLL(None, use_errno=True).prctl, os.getpid()
                ),
            )

    def is_ready(self) -> bool:
        try:
            url = f"http://{self.http_url}/v2/health/ready"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every model is loaded; raise PipelineFailure with Triton's log if not."""
        assert self.process is not None, "start() first"
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            code = self.process.poll()
            if code is not None:
                raise self.failure(f"tritonserver exited with code {code} before it was ready")
            if self.is_ready():
                log.info(
                    "Triton ready: gRPC %s, HTTP %s, metrics %s; models %s",
                    self.grpc_url,
                    self.http_url,
                    self.metrics_url,
                    ", ".join(self.models),
                )
                return
            if time.monotonic() > deadline:
                raise self.failure(f"tritonserver not ready after {timeout:.0f} s")
            time.sleep(delay)
            delay = min(1.0, delay * 1.5)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server's process group, SIGKILL what outlives it."""
        process, self.process = self.process, None
        if process is not None:
            pgid = process.pid
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver ignored SIGTERM for %.0f s; killing it", timeout)
            # Anything it started that is still shutting down goes too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            process.wait()
            log.info("tritonserver stopped (exit code %s)", process.returncode)
        if self._own_workdir and self.workdir is not None and not self._failed:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> LocalTriton:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def served_from(repo: storage.ModelRepository) -> Iterator[Path]:
    """The folder Triton serves for `repo`: the folder itself, or for object storage a
    temporary folder with each model's config and newest version, downloaded and checked
    (removed on exit)."""
    if not repo.is_s3:
        assert repo.folder is not None
        yield repo.folder
        return
    from mnist_pipeline import objectstore

    folder = Path(tempfile.mkdtemp(prefix="mnist-served-"))
    try:
        objectstore.download_repository(repo, folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def serve_forever(server: LocalTriton) -> None:
    """Run until SIGTERM/SIGINT, or until tritonserver dies (PipelineFailure)."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("received %s; stopping Triton", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        server.wait_ready()
        while not stop.wait(0.5):
            assert server.process is not None
            code = server.process.poll()
            if code is not None:
                raise server.failure(f"tritonserver exited unexpectedly with code {code}")
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
