"""Shared fixtures: real MNIST placed once per session, fresh storage folders per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_pipeline import data

REPO = Path(__file__).resolve().parents[1]
MNIST_SOURCE = REPO / "data" / "mnist"


def cli(
    *args: str | os.PathLike[str],
    check: bool = False,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `mnist-pipeline ARGS` as a user would, in a child process."""
    result = subprocess.run(
        [sys.executable, "-m", "mnist_pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def mnist_storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A storage folder with verified MNIST in place; shared, so tests must not modify it."""
    root = tmp_path_factory.mktemp("mnist-storage")
    data.place(root, MNIST_SOURCE)
    return root


@pytest.fixture
def storage(tmp_path: Path, mnist_storage: Path) -> Path:
    """A fresh storage folder of this test's own, with MNIST already placed."""
    root = tmp_path / "storage"
    shutil.copytree(mnist_storage / "data", root / "data")
    return root
