"""A lost worker, between machines: two ranks in their own network namespaces, each with
its own address, joined by a shaped link (tests/harness/netnodes.py), each started by the
chart's command line (`mnist-pipeline train --nnodes 2 --node-rank I --master-addr
<worker 0's name>`, which runs torchrun with a static rendezvous). A rank killed or a link
cut longer than the collective timeout must end in a completed run equal to an
uninterrupted one; a partition that outlasts the restarts must end both machines, each in
one line, in bounded time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.netnodes import Link, Nodes
from harness.pipeline import cli
from harness.processes import parent
from mnist_pipeline.storage import run_dir

SUBSET = "--limit-train 1024 --limit-test 1000 --batch-size 64 --epochs 3".split()
TRAINING = ["--threads", "1", "--checkpoint-every", "4", *SUBSET]
COLLECTIVE_TIMEOUT = 10  # seconds: a cut link ends the attempt soon
LINK = Link(mbit=1000)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, mnist_storage: Path) -> str:
    """The parameters' digest of the same recipe on 2 ranks, never interrupted."""
    storage = tmp_path_factory.mktemp("uninterrupted")
    (storage / "data").symlink_to(mnist_storage / "data")
    args = ["train", "--storage", storage, "--run-id", "ref", "--nproc-per-node", "2", *TRAINING]
    cli(*args, check=True)
    return str(
        json.loads((run_dir(storage, "ref") / "metrics.json").read_text())["parameters_sha256"]
    )


@pytest.fixture
def nodes() -> Iterator[Nodes]:
    # A CPU each, so that a rank's compute does not take the other's turn on the link.
    with Nodes(2, LINK, cpus=["0", "1"]) as made:
        yield made


def start(nodes: Nodes, storage: Path, run_id: str, *args: str) -> list[subprocess.Popen[str]]:
    """Both workers, as the chart's Indexed Job starts them; their output in storage/."""
    return [worker(nodes, storage, run_id, i, *args) for i in range(2)]


def worker(
    nodes: Nodes, storage: Path, run_id: str, i: int, *args: str, log: str = ""
) -> subprocess.Popen[str]:
    command = [
        *(sys.executable, "-m", "mnist_pipeline", "train", "--storage", str(storage)),
        *("--run-id", run_id, "--nnodes", "2", "--node-rank", str(i)),
        *("--master-addr", nodes.name(0), "--collective-timeout", str(COLLECTIVE_TIMEOUT)),
        *TRAINING,
        *args,
    ]
    return nodes.popen(i, command, env={**os.environ}, log=storage / (log or f"worker-{i}.log"))


def logs(storage: Path) -> list[str]:
    return [(storage / f"worker-{i}.log").read_text() for i in range(2)]


def first_checkpoint(storage: Path, run_id: str, workers: list[subprocess.Popen[str]]) -> None:
    deadline = time.monotonic() + 300
    while not (run_dir(storage, run_id) / "resume.pth").exists():
        assert all(w.poll() is None for w in workers), logs(storage)
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def rank_process(nodes: Nodes, node: int) -> int:
    """The training process on `node` (torchrun sets RANK for its ranks only)."""
    for pid in nodes.pids(node):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if any(v.startswith(b"RANK=") for v in environ):
            return pid
    raise AssertionError(f"no rank runs on node {node}")


def assert_completed_like(
    storage: Path, run_id: str, workers: list[subprocess.Popen[str]], digest: str
) -> None:
    codes = [w.wait(timeout=600) for w in workers]
    assert codes == [0, 0], "\n\n".join(log[-4000:] for log in logs(storage))
    metrics = json.loads((run_dir(storage, run_id) / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["world_size"] == 2
    # Every rank resumed from the checkpoint; the recipe is deterministic, so the model is
    # the one an uninterrupted run makes, bit for bit.
    for rank, log in enumerate(logs(storage)):
        assert f"rank {rank}: resuming run {run_id} at epoch 1, step 4/16" in log
    assert metrics["parameters_sha256"] == digest


@pytest.mark.slow
def test_a_killed_rank_is_restarted_and_the_model_equals_an_uninterrupted_one(
    nodes: Nodes, storage: Path, uninterrupted: str
) -> None:
    workers = start(nodes, storage, "killed", "--max-restarts", "2")
    first_checkpoint(storage, "killed", workers)
    os.kill(rank_process(nodes, 1), signal.SIGKILL)
    assert_completed_like(storage, "killed", workers, uninterrupted)
    # The survivor's attempt ended in one line, saying it will be retried.
    assert "rank 0 lost contact with the other ranks" in logs(storage)[0]
    assert "being retried" in logs(storage)[0]


@pytest.mark.slow
def test_a_link_cut_longer_than_the_collective_timeout_is_recovered(
    nodes: Nodes, storage: Path, uninterrupted: str
) -> None:
    workers = start(nodes, storage, "cut", "--max-restarts", "3")
    first_checkpoint(storage, "cut", workers)
    nodes.cut(1)
    time.sleep(2.5 * COLLECTIVE_TIMEOUT)  # both ranks give the other up meanwhile
    nodes.cut(1, False)
    assert_completed_like(storage, "cut", workers, uninterrupted)
    # Each rank's own timeout, or the pair gloo closed when another operation on it timed out.
    for rank, log in enumerate(logs(storage)):
        lost = rf"rank {rank} lost contact with the other ranks \((Timed out|Application timeout)"
        assert re.search(lost, log), log[-4000:]


@pytest.mark.slow
def test_a_partition_that_outlasts_the_restarts_ends_both_machines_in_bounded_time(
    nodes: Nodes, storage: Path
) -> None:
    rendezvous_timeout = 20
    workers = start(nodes, storage, "parted", "--max-restarts", "1",
                    "--rendezvous-timeout", str(rendezvous_timeout))  # fmt: skip
    first_checkpoint(storage, "parted", workers)
    nodes.cut(1)
    cut_at = time.monotonic()
    # Each machine: the collective timeout, its restart's own wait, then node 1's torchrun,
    # stuck on the store node 0 took away, is ended after the rendezvous timeout + 30 s.
    bound = 2 * COLLECTIVE_TIMEOUT + rendezvous_timeout + 30 + 30
    codes = [w.wait(timeout=bound + 60) for w in workers]
    took = time.monotonic() - cut_at
    assert codes == [1, 1], logs(storage)
    assert took < bound, f"{took:.0f} s"
    last_lines = [log.strip().splitlines()[-1] for log in logs(storage)]
    assert (
        "distributed training failed: rank 0 exited 1 and torchrun's 1 restart(s) are spent"
        in last_lines[0]
    )
    assert "node 1: no rank has run for 50 s: node 0's rendezvous at" in last_lines[1]
    assert "is out of reach (partitioned, or gone)" in last_lines[1]
    # Nothing is lost: the Job retries the pods, which resume from the checkpoint.
    metrics = json.loads((run_dir(storage, "parted") / "metrics.json").read_text())
    assert metrics["status"] == "retrying", metrics
    assert (run_dir(storage, "parted") / "resume.pth").is_file()


@pytest.mark.slow
def test_a_machine_lost_as_the_run_completes_fails_nothing(
    nodes: Nodes, storage: Path, uninterrupted: str
) -> None:
    """Node 1's torchrun is killed while its rank trains on: what node 0 sees when a pod is
    lost just as the run completes. Node 0's torchrun then waits for a peer that will never
    say it has finished; the run is complete, so node 0 succeeds soon after, and the pod
    the Job starts for index 1 finds the run complete and succeeds at once."""
    workers = start(nodes, storage, "lost-at-end")
    first_checkpoint(storage, "lost-at-end", workers)
    os.kill(parent(rank_process(nodes, 1)), signal.SIGKILL)
    assert workers[1].wait(timeout=60) == 1  # this pod failed: the Job starts another
    assert workers[0].wait(timeout=300) == 0, logs(storage)[0][-4000:]
    metrics = json.loads((run_dir(storage, "lost-at-end") / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["parameters_sha256"] == uninterrupted
    assert "another node was lost at the end; the run is done" in logs(storage)[0]

    replacement = worker(nodes, storage, "lost-at-end", 1, log="replacement.log")
    assert replacement.wait(timeout=120) == 0  # no rendezvous: node 0 is gone
    output = (storage / "replacement.log").read_text()
    assert "run lost-at-end is already complete (test accuracy" in output
