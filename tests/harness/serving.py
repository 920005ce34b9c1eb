"""Local Triton as the tests see it: repositories pinned for it, its processes in /proc."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from harness.pipeline import MODEL
from harness.ports import free_ports
from mnist_pipeline.serve import LocalTriton, pinned
from mnist_pipeline.storage import ModelRepository
from mnist_pipeline.tritonconfig import TritonConfig


def pinned_models(models: Path, out: Path, cfg: TritonConfig | None = None) -> Path:
    """The newest version of a repository folder as exported, pinned into `out` for the
    local Triton (as `serve --model-repository MODELS` does)."""
    return pinned(ModelRepository(folder=models), out, cfg or TritonConfig())


def pin_test_repository(test_repository: Path, out: Path) -> Path:
    """Both models of the `test_repository` fixture pinned into `out` for the local Triton."""
    for name, instances in ((MODEL, 2), ("failing", 1)):
        cfg = TritonConfig(name=name, instance_count=instances)
        pinned_models(test_repository, out, cfg)
    return out


def local_triton(
    served: Path, workdir: Path | None = None, extra_args: Sequence[str] = ()
) -> LocalTriton:
    """The wheel's tritonserver on `served` (a pinned repository), on free loopback ports."""
    http, grpc, metrics = free_ports(3)
    return LocalTriton(
        served, workdir, http_port=http, grpc_port=grpc, metrics_port=metrics,
        extra_args=extra_args,
    )  # fmt: skip


def triton_processes(marker: str) -> list[tuple[int, str]]:
    """tritonserver processes whose command line or working folder mentions `marker`
    (a working folder or repository path unique to one server)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if "tritonserver" in cmdline.split(" ", 1)[0] and (marker in cmdline or marker in cwd):
            found.append((int(entry.name), cmdline))
    return found
