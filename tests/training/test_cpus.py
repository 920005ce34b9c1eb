"""The CPUs a container may use, read from its cgroup as a container runtime mounts it:
cgroup v2 (cpu.max) and cgroup v1 (cpu.cfs_quota_us / cpu.cfs_period_us), on hierarchies
laid out as on the nodes (no cgroup of this machine is changed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mnist_pipeline.storage import available_cpus, cpu_quota

AFFINITY = len(os.sched_getaffinity(0))


def hierarchy(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "150000 100000"}, 1.5),  # v2, limits.cpu 1500m
        ({"cpu.max": "max 100000"}, None),  # v2, no limit
        # v1 as on EKS's Amazon Linux 2 nodes (cpu and cpuacct mounted together).
        ({"cpu,cpuacct/cpu.cfs_quota_us": "50000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),  # unlimited
        ({}, None),  # no cpu controller visible
    ],
)
def test_the_cfs_quota_of_either_cgroup_version(
    tmp_path: Path, files: dict[str, str], quota: float | None
) -> None:
    assert cpu_quota(hierarchy(tmp_path, files)) == quota


def test_cpus_are_the_quota_rounded_up_within_the_affinity_mask(tmp_path: Path) -> None:
    v1 = {"cpu,cpuacct/cpu.cfs_quota_us": "50000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}
    assert available_cpus(hierarchy(tmp_path / "v1", v1)) == 1
    many = {"cpu.max": f"{(AFFINITY + 8) * 100000} 100000"}
    assert available_cpus(hierarchy(tmp_path / "v2", many)) == AFFINITY
    assert available_cpus(tmp_path / "none") == AFFINITY


def test_the_limit_the_chart_passes_caps_the_cpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The downward API's limits.cpu, never above the affinity mask (a limit may exceed
    the node's CPUs) and never below 1."""
    monkeypatch.setenv("MNIST_PIPELINE_CPU_LIMIT", "1")
    assert available_cpus(tmp_path) == 1
    monkeypatch.setenv("MNIST_PIPELINE_CPU_LIMIT", str(AFFINITY + 8))
    assert available_cpus(tmp_path) == AFFINITY
    monkeypatch.setenv("MNIST_PIPELINE_CPU_LIMIT", "0")
    assert available_cpus(tmp_path) == 1
