"""`make test-deps`: what `make test` installs from Debian, and what it says without root."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


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


def test_nothing_is_built_from_third_party_sources() -> None:
    """Every dependency comes from PyPI, Debian or npm: no compiler, CMake or source
    download anywhere in what `make run`, `make test` or CI run."""
    for path in [REPO / "Makefile", REPO / ".ci" / "run", *sorted((REPO / "scripts").iterdir())]:
        text = path.read_text()
        for word in ("cmake", "g++", "git clone", "curl", "wget"):
            assert word not in text, f"{path} mentions {word}"


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
