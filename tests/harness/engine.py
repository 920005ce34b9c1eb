"""A real container engine for the tests: Debian's dockerd, and the project's three images.

dockerd runs with no bridge and no iptables rules (containers get `--network=host` or
`--network=none` only), its data, exec root and socket under one folder of ours outside the
clone (ENGINE_DIR, kept between runs: deleting gigabytes of layers takes minutes, reusing
them takes none). It is started and stopped by its PID; `make test-deps` installs the
engine (CONTAINER_DEBS) when missing.

No registry is reachable, so no base image is pulled: a stand-in for python:3.11-slim
is bootstrapped from Debian's packages with mmdebstrap (with this machine's CA bundle, which
pip needs here, and libpython3.11, which the python backend's stub in the Triton image links
as python:3.11-slim's /usr/local/lib holds it). It exists for these checks only and is never
published. PyTorch's index is unreachable too: the CPU torch wheel that pip finds on this
machine is served to the builds on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from harness import REPO
from mnist_pipeline import __version__
from mnist_pipeline.processes import ManagedProcess

ENGINE_DIR = Path(os.environ.get("CONTAINER_ENGINE_DIR", "/var/lib/mnist-pipeline-ci"))
# Debian's client: a newer static client, if any, comes first on PATH and misses the
# legacy builder's cache.
DOCKER = "/usr/bin/docker"
# What the stand-in for python:3.11-slim holds; its tag changes with the list, so that a
# base bootstrapped before a change is not reused.
BASE_PACKAGES = "python3,python3-venv,python-is-python3,libpython3.11,ca-certificates"
BASE = (
    "mnist-pipeline-ci/python:3.11-bookworm-"
    + hashlib.sha256(BASE_PACKAGES.encode()).hexdigest()[:8]
)
IMAGES = ("pipeline", "client", "triton")
HOW_TO_RUN = "run them with `make container-check` as root (CI=true runs them in `make test`)"


class EngineUnavailable(Exception):
    """The container checks cannot run here; the message says why."""


def image(name: str) -> str:
    """The tag `make images` gives, which the chart's values name by default."""
    return f"mnist-pipeline/{name}:{__version__}"


class Engine(ManagedProcess):
    """dockerd on a socket of its own: start() and wait_ready() raise EngineUnavailable
    where it cannot run."""

    name = "dockerd"
    grace = 60.0

    def __init__(self, folder: Path = ENGINE_DIR) -> None:
        super().__init__(log_path=folder / "dockerd.log")
        self.folder = folder
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{folder}/docker.sock"}

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DOCKER, *args], env=self.env, capture_output=True, text=True, check=check
        )

    def start(self) -> None:
        if os.geteuid() != 0:
            raise EngineUnavailable("starting dockerd needs root")
        if not (shutil.which("dockerd") and Path(DOCKER).exists() and shutil.which("mmdebstrap")):
            raise EngineUnavailable("docker.io or mmdebstrap is not installed (make test-deps)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.command = [
            "dockerd",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--storage-driver=overlay2",
            f"--data-root={self.folder}/root",
            f"--exec-root={self.folder}/exec",
            f"--host=unix://{self.folder}/docker.sock",
            f"--pidfile={self.folder}/dockerd.pid",
        ]
        super().start()

    def ready(self) -> bool:
        return self.docker("version", check=False).returncode == 0

    def failure(self, what: str) -> EngineUnavailable:
        return EngineUnavailable(f"dockerd did not start ({what}):\n{self.log_tail()}")

    def stop(self) -> None:
        super().stop()
        # dockerd can leave its network namespace mounted, which blocks the next start.
        netns = self.folder / "exec" / "netns" / "default"
        if os.path.ismount(netns):
            subprocess.run(["umount", str(netns)], check=False)

    def has_image(self, name: str) -> bool:
        return self.docker("image", "inspect", name, check=False).returncode == 0

    def bootstrap_base(self) -> None:
        if self.has_image(BASE):
            return
        mirrors = [
            f"deb http://deb.debian.org/{archive} {suite} main"
            for archive, suite in (
                ("debian", "bookworm"),
                ("debian", "bookworm-updates"),
                ("debian-security", "bookworm-security"),
            )
        ]
        debootstrap = subprocess.Popen(
            [
                "mmdebstrap",
                "--quiet",
                "--mode=root",
                "--variant=minbase",
                f"--include={BASE_PACKAGES}",
                '--customize-hook=cp /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/"',
                "bookworm",
                "-",
                *mirrors,
            ],
            stdout=subprocess.PIPE,
        )
        imported = subprocess.run(
            [DOCKER, "import", "-", BASE], stdin=debootstrap.stdout, env=self.env, check=False
        )
        assert debootstrap.wait() == 0 and imported.returncode == 0, "mmdebstrap | docker import"

    def build_images(self, logs: Path) -> dict[str, float]:
        """`make images` with the base and the loopback sources; seconds per image."""
        self.bootstrap_base()
        seconds = {}
        with loopback_sources(self.folder / "sources-port") as url:
            build_args = [
                "--network=host",
                f"--build-arg=PYTHON_IMAGE={BASE}",
                "--build-arg=TORCH_INDEX_URL=https://pypi.org/simple",
                f"--build-arg=TORCH_FIND_LINKS={url}/wheels/",
            ]
            for name in IMAGES:
                started = time.monotonic()
                with open(logs / f"build-{name}.log", "w") as log:
                    built = subprocess.run(
                        [
                            "make",
                            f"image-{name}",
                            f"DOCKER={DOCKER}",
                            f"BUILD_ARGS={' '.join(build_args)}",
                        ],
                        cwd=REPO,
                        env={**self.env, "DOCKER_BUILDKIT": "1"},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        check=False,
                    )
                tail = (logs / f"build-{name}.log").read_text()[-4000:]
                assert built.returncode == 0, f"building {name} failed:\n{tail}"
                seconds[name] = time.monotonic() - started
        return seconds


@contextlib.contextmanager
def loopback_sources(port_file: Path) -> Iterator[str]:
    """Serve, on 127.0.0.1, the CPU torch wheel (wheels/).

    The URL is a build argument, hence part of the layer cache's key: the port of the last
    run (port_file) is taken again when it is free, so that an unchanged image rebuilds
    nothing."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "torch==2.13.0+cpu",
                # Where PyTorch's index is reachable; elsewhere pip finds the wheel locally.
                "--extra-index-url=https://download.pytorch.org/whl/cpu",
                "--dest",
                str(root / "wheels"),
            ],
            check=True,
        )
        handler = partial(QuietHandler, directory=folder)
        try:
            server = http.server.ThreadingHTTPServer(
                ("127.0.0.1", int(port_file.read_text())), handler
            )
        except (OSError, ValueError):
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            port_file.write_text(str(server.server_address[1]))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class Container:
    """`docker run` of one container, waited on and stopped like a child process: the
    client's exit status is the container's."""

    def __init__(self, engine: Engine, name: str, run_args: list[str], log: Path) -> None:
        self.engine = engine
        self.name = name
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [DOCKER, "run", "--rm", f"--name={name}", *run_args],
                env=engine.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def send_signal(self, sig: int) -> None:
        self.engine.docker("kill", f"--signal={signal.Signals(sig).name}", self.name, check=False)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
        self.process.wait(60)

    def stop(self, grace: int) -> int:
        """As the kubelet stops a container (a pod deleted, drained): SIGTERM, then SIGKILL
        after `grace` seconds; its exit code."""
        self.engine.docker("stop", f"--time={grace}", self.name, check=False)
        return self.process.wait(60)


def memory(quantity: str) -> list[str]:
    """A Kubernetes memory limit (4Gi, 512Mi) as docker's options (4g, 512m). A node's
    container never swaps (the kubelet refuses swap by default): past its limit it is
    OOM-killed, so --memory-swap, memory and swap together, is the limit itself."""
    units = {"Ki": "k", "Mi": "m", "Gi": "g"}
    limit = quantity[:-2] + units[quantity[-2:]] if quantity[-2:] in units else quantity
    return [f"--memory={limit}", f"--memory-swap={limit}"]


def cpus(quantity: str) -> str:
    """A Kubernetes CPU quantity (2, 800m) as docker's --cpus."""
    return str(int(quantity[:-1]) / 1000) if quantity.endswith("m") else quantity
