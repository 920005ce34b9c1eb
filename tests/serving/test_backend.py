"""The onnxruntime backend build (scripts/build_triton_backend.sh): skipped when up to date,
and sources that fail their checksums are refused before anything is built."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_pipeline.serve import BACKEND_LIBRARY, DEFAULT_BACKEND_DIR, check_backend

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "build_triton_backend.sh"


def build(dest: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), str(dest)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable, **env},
    )


def test_the_built_backend_is_complete_and_not_rebuilt() -> None:
    backend = check_backend(DEFAULT_BACKEND_DIR) / "onnxruntime"
    names = {p.name for p in backend.iterdir()}
    assert {BACKEND_LIBRARY, "libonnxruntime.so", "libonnxruntime.so.1"} <= names
    assert "libonnxruntime.so.1.19.2" in names  # the runtime of tritonserver:24.10-py3
    assert (backend / "libtritonserver.so").resolve().is_file()
    before = (backend / BACKEND_LIBRARY).stat().st_mtime_ns

    again = build(DEFAULT_BACKEND_DIR)
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stdout
    assert (backend / BACKEND_LIBRARY).stat().st_mtime_ns == before


def test_sources_that_fail_their_checksums_are_refused(tmp_path: Path) -> None:
    sources = tmp_path / "sources"
    (sources / "triton-r24.10").mkdir(parents=True)
    archive = sources / "triton-r24.10" / "core.tar.gz"
    archive.write_bytes(b"not the pinned archive")
    wrong = hashlib.sha256(b"the pinned archive").hexdigest()
    (sources / "SHA256SUMS").write_text(f"{wrong}  triton-r24.10/core.tar.gz\n")

    result = build(tmp_path / "backends", TRITON_SOURCES=str(sources))
    assert result.returncode == 2
    assert "do not match its SHA256SUMS" in result.stderr
    assert not (tmp_path / "backends" / "onnxruntime").exists()


def test_sources_missing_from_sha256sums_are_refused(tmp_path: Path) -> None:
    """Every archive used must be checksummed: a SHA256SUMS without RapidJSON's line (an
    older TRITON_SOURCES folder) is refused by name, before anything is built."""
    vendor = Path(os.environ.get("TRITON_SOURCES", REPO.parent / "shared" / "vendor"))
    if not (vendor / "SHA256SUMS").is_file():
        pytest.skip(f"no TRITON_SOURCES folder at {vendor}")
    sources = tmp_path / "sources"
    shutil.copytree(vendor, sources)
    sums = sources / "SHA256SUMS"
    sums.chmod(0o644)
    lines = sums.read_text().splitlines(keepends=True)
    sums.write_text("".join(line for line in lines if "rapidjson" not in line))

    result = build(tmp_path / "backends", TRITON_SOURCES=str(sources))
    assert result.returncode == 2
    assert "SHA256SUMS does not list rapidjson-24b5e7a8/rapidjson.tar.gz" in result.stderr
    assert not (tmp_path / "backends" / "onnxruntime").exists()


def make_test_deps(debs: str, container_debs: str = "dpkg") -> subprocess.CompletedProcess[str]:
    """`make test-deps` as a user without root or sudo: as nobody when the tests run as root."""
    unprivileged = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    make = ["make", "-s", "-C", str(REPO), "test-deps", f"TEST_DEBS={debs}"]
    make.append(f"CONTAINER_DEBS={container_debs}")
    return subprocess.run(
        [*(unprivileged if os.geteuid() == 0 else []), *make],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_make_test_depends_on_test_deps_first() -> None:
    makefile = (REPO / "Makefile").read_text()
    test_rule = next(line for line in makefile.splitlines() if line.startswith("test:"))
    assert test_rule.split()[1] == "test-deps"
    assert "TEST_DEBS ?= libb64-0d" in makefile


def test_test_deps_without_root_stops_at_once_with_the_command() -> None:
    if (
        os.geteuid() != 0
        and shutil.which("sudo")
        and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0
    ):
        pytest.skip("passwordless sudo: test-deps would install")
    result = make_test_deps("dpkg mnist-pipeline-no-such-deb")
    assert result.returncode != 0
    assert (
        "sudo apt-get update && sudo apt-get install -y --no-install-recommends "
        "mnist-pipeline-no-such-deb\n" in result.stderr
    ), result.stderr
    assert "Installing" not in result.stdout  # nothing attempted


def test_test_deps_with_everything_installed_does_nothing() -> None:
    result = make_test_deps("dpkg")
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""


def test_test_deps_without_root_goes_on_without_the_container_engine() -> None:
    """The engine only serves the container checks, which need root anyway: a user without
    it is told what will not run and how to install it, and the tests go on."""
    result = make_test_deps("dpkg", container_debs="mnist-pipeline-no-such-engine")
    if os.geteuid() != 0 and result.stdout.startswith("Installing"):
        pytest.skip("passwordless sudo: test-deps would install")
    assert result.returncode == 0, result.stderr
    assert "the container checks will not run" in result.stderr
    assert "sudo apt-get install -y --no-install-recommends mnist-pipeline-no-such-engine" in (
        result.stderr
    )
