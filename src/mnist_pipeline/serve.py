"""Serve the model with a real, local Triton Inference Server.

The `tritonserver` 2.51 bundled in the nvidia-pytriton wheel has one backend, Triton's
python backend: what it serves is a repository `pin` wrote with `--triton-backend python`
(the exported model, its config as exported but for the backend, and the project's
model.py running ONNX Runtime from PyPI). `serve` and `run` pin into their work folder,
then start it; the chart's pods do the same in two containers.

`LocalTriton` is the reusable piece (used by `serve`, `run`, the tests and benchmarks): a
ManagedProcess (processes.py) in its own process group, killed with it if this process
dies.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import logging
import os
import shutil
import site
import socket
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mnist_pipeline import interrupts, settings, storage
from mnist_pipeline.errors import PipelineFailure, UsageError
from mnist_pipeline.pinning import write_served_repository
from mnist_pipeline.processes import ManagedProcess
from mnist_pipeline.tritonconfig import TritonConfig

log = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = settings.HTTP_PORT.default
DEFAULT_GRPC_PORT = settings.GRPC_PORT.default
DEFAULT_METRICS_PORT = settings.METRICS_PORT.default


def locate_tritonserver() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise UsageError("nvidia-pytriton is not installed: pip install 'mnist-pipeline[serve]'")
    binary = Path(spec.origin).parent / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise UsageError(f"{binary}: missing from the nvidia-pytriton wheel")
    return binary


def wheel_server(backends: Path) -> tuple[list[str], dict[str, str]]:
    """The wheel's tritonserver with its python backend: the command line's start and the
    environment to add. `backends` becomes its --backend-directory: python/ holding the
    backend, its utilities and the stub for this Python, linked from the wheel."""
    binary = locate_tritonserver()
    check_libpython()
    wheel = binary.parents[1]
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    files = [
        wheel / "backends" / "python" / "libtriton_python.so",
        wheel / "backends" / "python" / "triton_python_backend_utils.py",
        wheel / "python_backend_stubs" / python / "triton_python_backend_stub",
    ]
    folder = backends / "python"
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        if not path.is_file():
            raise UsageError(f"{path}: missing from the nvidia-pytriton wheel (Python {python})")
        link = folder / path.name
        link.unlink(missing_ok=True)
        link.symlink_to(path)
    # The stub links libpython and the wheel's CUDA runtime; model.py finds onnxruntime
    # in this environment's site-packages through PYTHONPATH.
    libraries = [
        sysconfig.get_config_var("LIBDIR"),
        str(binary.parents[3] / "nvidia_pytriton.libs"),
    ]
    env = {
        "LD_LIBRARY_PATH": search_path(libraries, "LD_LIBRARY_PATH"),
        "PYTHONPATH": search_path(site.getsitepackages(), "PYTHONPATH"),
    }
    return [str(binary), f"--backend-directory={backends.resolve()}"], env


def check_libpython() -> None:
    """The stub embeds this Python through its shared library, which not every Python
    installs: UsageError naming the remedy where it is missing."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    library = f"libpython{version}.so.1.0"
    if (Path(sysconfig.get_config_var("LIBDIR")) / library).is_file():
        return
    if ctypes.util.find_library(f"python{version}"):
        return
    raise UsageError(
        f"Triton's python backend needs {library}, which this Python lacks: install it "
        f"(Debian/Ubuntu: apt-get install libpython{version}; pyenv: build with "
        "PYTHON_CONFIGURE_OPTS=--enable-shared)"
    )


def search_path(first: list[str], variable: str) -> str:
    """`first`, then what the variable already holds."""
    inherited = [p for p in os.environ.get(variable, "").split(os.pathsep) if p]
    return os.pathsep.join([*first, *inherited])


def served_models(served: Path) -> list[str]:
    """The models of a repository pin wrote; UsageError (exit 2) if there are none."""
    names = sorted(
        p.name for p in served.glob("*") if p.is_dir() and (p / storage.CONFIG_FILE).is_file()
    )
    if not names:
        raise UsageError(f"{served} holds no model: write it with `mnist-pipeline pin`")
    return names


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


class LocalTriton(ManagedProcess):
    """A tritonserver process serving `served`, a repository `pin` wrote for the python
    backend (`pinned` below).

    with LocalTriton(served, grpc_port=8001) as server:
        ... server.grpc_url ...
    """

    name = "tritonserver"
    grace = 20.0
    die_with_parent = True

    def __init__(
        self,
        served: Path,
        workdir: Path | None = None,
        host: str = "127.0.0.1",
        http_port: int = DEFAULT_HTTP_PORT,
        grpc_port: int = DEFAULT_GRPC_PORT,
        metrics_port: int = DEFAULT_METRICS_PORT,
        log_verbose: int = 0,
        ready_timeout: float = 120.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.served = served
        # Passed to tritonserver untouched, after ours: for a repeated flag the last wins.
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.host = host
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.log_verbose = log_verbose
        self._own_workdir = workdir is None
        self._failed = False  # a temporary workdir is kept then: the error names its log
        self.workdir = workdir
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

    def failure(self, what: str) -> PipelineFailure:
        """`what` happened: the error, with Triton's own explanation and where its whole
        log is; a temporary workdir then outlives stop(), so that path stays readable."""
        self._failed = True
        kept = " (kept)" if self._own_workdir else ""
        assert self.log_path is not None
        return PipelineFailure(f"{what}. From {self.log_path}{kept}:\n{log_tail(self.log_path)}")

    def start(self) -> None:
        self.models = served_models(self.served)
        for port in (self.http_port, self.grpc_port, self.metrics_port):
            check_port_free(self.host, port)
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="mnist-triton-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        server, self.environment = wheel_server(self.workdir / "backends")
        self.command = [
            *server,
            f"--model-repository={self.served.resolve()}",
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
        self.cwd, self.log_path = self.workdir, self.workdir / "triton.log"
        log.info("starting tritonserver (log: %s)", self.log_path)
        super().start()

    def ready(self) -> bool:
        try:
            url = f"http://{self.http_url}/v2/health/ready"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every model is loaded; raise PipelineFailure with Triton's log if not."""
        super().wait_ready(timeout)
        log.info(
            "Triton ready: gRPC %s, HTTP %s, metrics %s; models %s",
            self.grpc_url,
            self.http_url,
            self.metrics_url,
            ", ".join(self.models),
        )

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL what outlives it."""
        super().stop()
        if self._own_workdir and self.workdir is not None and not self._failed:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


@dataclass(frozen=True)
class ServerConfig(settings.Settings):
    """Where a local Triton listens and how long it may take to start: LocalTriton's keywords."""

    host: str = settings.HOST.field()
    grpc_port: int = settings.GRPC_PORT.field()
    http_port: int = settings.HTTP_PORT.field()
    metrics_port: int = settings.METRICS_PORT.field()
    ready_timeout: float = settings.READY_TIMEOUT.field()


def pinned(
    location: storage.ModelRepository,
    served: Path,
    cfg: TritonConfig,
    wanted: str = "",
    run_id: str | None = None,
) -> Path:
    """`served` with `cfg.name`'s version `wanted` of the repository at `location` pinned
    for this server (`pin`'s --triton-backend python): what LocalTriton starts on."""
    write_served_repository(location, served, cfg, wanted, run_id, backend="python")
    return served


def serve_forever(server: LocalTriton) -> None:
    """Run until Ctrl-C or SIGTERM (Interrupted, once Triton is stopped), or until
    tritonserver dies (PipelineFailure)."""
    try:
        server.start()
        server.wait_ready()
        while True:
            assert server.process is not None
            code = server.process.poll()
            if code is not None:
                raise server.failure(f"tritonserver exited unexpectedly with code {code}")
            time.sleep(0.5)
    except interrupts.Interrupted as e:
        log.info("received %s; stopping Triton", e.name)
        raise e.saying("serve interrupted: Triton stopped; the same command serves again") from None
    finally:
        server.stop()
