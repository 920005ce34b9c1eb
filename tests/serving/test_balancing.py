"""Requests spread over Triton replicas as the chart's headless Service and client do it:
two (then three) real tritonservers, each in its own network namespace with its own
address, one name with an A record per ready replica from a real dnsmasq, and the
project's client with a dns: target. Costs about 25 s on 2 cores (AMD EPYC Zen 4) besides
the shared pipeline fixture: three server starts and about 4000 requests."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.pipeline import MODEL, PipelineRun
from harness.replicas import Replicas, require_tools
from harness.serving import pinned_models

AGE_MS = 1000  # the chart's default is a minute: short here, so the test is


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, pipeline: PipelineRun) -> Iterator[Replicas]:
    require_tools()
    repository = pinned_models(pipeline.storage / "models", tmp_path_factory.mktemp("replicas"))
    age = [f"--grpc-max-connection-age={AGE_MS}", f"--grpc-max-connection-age-grace={AGE_MS}"]
    with Replicas(repository, extra_args=age) as r:
        r.add()
        r.add()
        yield r


def infer_command(pipeline: PipelineRun, target: str, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "mnist_pipeline", "infer", "--storage", str(pipeline.storage),
        "--url", target, "--warmup", "0", *args,
    ]  # fmt: skip


def sent(replicas: Replicas, *args: str, pipeline: PipelineRun) -> list[int]:
    """Requests each replica answered for one `mnist-pipeline infer` run."""
    before = replicas.inference_counts(MODEL)
    result = subprocess.run(
        infer_command(pipeline, replicas.target, *args), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [a - b for a, b in zip(replicas.inference_counts(MODEL), before, strict=True)]


def test_round_robin_sends_each_replica_an_even_share(
    replicas: Replicas, pipeline: PipelineRun
) -> None:
    counts = sent(replicas, "--requests", "400", "--concurrency", "2", pipeline=pipeline)
    assert sum(counts) == 400
    for count in counts:  # within 5 % of even
        assert abs(count - 200) <= 10, counts


def test_pick_first_sends_everything_to_one_replica(tmp_path: Path, pipeline: PipelineRun) -> None:
    """Replicas of their own, whose connections never age: with the others' connection age
    a slow CPU would reconnect mid-run, and pick_first may then pick the other replica."""
    with Replicas(pinned_models(pipeline.storage / "models", tmp_path), prefix="pf") as replicas:
        replicas.add()
        replicas.add()
        counts = sent(replicas, "--requests", "200", "--lb-policy", "pick_first", pipeline=pipeline)
    assert sorted(counts) == [0, 200], counts


def test_a_replica_added_later_gets_traffic_after_the_connection_age(
    replicas: Replicas, pipeline: PipelineRun
) -> None:
    """One long-running client: its connections predate the third replica, which it only
    reaches because Triton closes them after AGE_MS and the name is resolved again."""
    client = subprocess.Popen(
        infer_command(pipeline, replicas.target, "--requests", "2500"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        start = replicas.inference_counts(MODEL)
        deadline = time.monotonic() + 60
        while sum(replicas.inference_counts(MODEL)) - sum(start) < 50:  # it is sending
            assert client.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        replicas.add()
        added = [*replicas.inference_counts(MODEL)[:2], 0]
        _, stderr = client.communicate(timeout=300)
        assert client.returncode == 0, stderr[-3000:]
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    after = [a - b for a, b in zip(replicas.inference_counts(MODEL), added, strict=True)]
    # Even from the moment it was added, bar the first connection age: about a third.
    assert after[2] >= 0.2 * sum(after), after
