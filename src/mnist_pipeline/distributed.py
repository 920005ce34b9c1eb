"""Data-parallel training over several processes: PyTorch DDP, launched by torchrun.

torchrun starts one process per rank and tells each where it stands through the
environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
Without WORLD_SIZE the process is a world of one and nothing here touches
torch.distributed, so single-process training is exactly what it was.

Every collective has a timeout (--collective-timeout): a rank that dies makes the others
fail, never wait forever. Such a failure is the attempt's, not the run's: the ranks record
"retrying" when torchrun (--max-restarts) or the Kubernetes Job will start them again,
each resuming from the last checkpoint (docs/DISTRIBUTED.md, "Lost workers").
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from mnist_pipeline.storage import PipelineFailure, UsageError, available_cpus

log = logging.getLogger(__name__)

# Set by launch() for its ranks: no one starts them again once torchrun's restarts are spent.
LAST_LAUNCHER_ENV = "MNIST_PIPELINE_LAUNCHED_LOCALLY"
ATTEMPTS_KEY = "mnist-pipeline/attempts"  # in torchrun's store: see attempt_store


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # ranks on this machine, which share its CPUs

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def writer(self) -> bool:
        """Rank 0 alone writes the run's files."""
        return self.rank == 0


ONE_PROCESS = World()


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def from_environment() -> World:
    if not launched_by_torchrun():
        return ONE_PROCESS
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    try:
        rank, size, local_rank, local_size = (int(os.environ.get(n, "0")) for n in names)
    except ValueError as e:
        raise UsageError(f"torchrun's environment is not numeric ({e}): {names}") from e
    return World(rank, size, local_rank, max(1, local_size))


def start(world: World, device: torch.device, timeout: float = 300) -> None:
    """Join the process group: NCCL between GPUs, gloo between CPUs. `timeout` (seconds)
    bounds every collective: long enough for rank 0 to write a ~90 MB resume.pth to a slow
    volume while the others wait in the next all-reduce, short enough that a lost rank
    ends the attempt in minutes."""
    if not world.distributed:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    limit = timedelta(seconds=timeout)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
        store = attempt_store(world, limit)
        dist.init_process_group(
            backend, store=store, rank=world.rank, world_size=world.size, timeout=limit
        )
    else:
        dist.init_process_group(backend, timeout=limit)


def attempt_store(world: World, timeout: timedelta) -> dist.Store:
    """The key-value store of this attempt's process group, inside torchrun's.

    torchrun's agent keeps one store across its restarts, and torch puts every attempt's
    keys in it under the same names: a restarted rank read the address a rank of the
    failed attempt had left there, gloo connected to a dead port, and the restart was
    spent (seen in network namespaces, tests/training/test_lost_workers.py). So each
    attempt gets its own prefix. Rank 0 opens a new one each time it starts; every other
    rank waits for one newer than the last it joined, so a rank that restarts more often
    than rank 0 (or less) still meets rank 0's current attempt.
    """
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timeout,
    )
    if world.rank == 0:
        attempt = store.add(ATTEMPTS_KEY, 1)
    else:
        joined = f"{ATTEMPTS_KEY}/joined-by-rank-{world.rank}"
        last = store.add(joined, 0)
        deadline = time.monotonic() + timeout.total_seconds()
        while (attempt := store.add(ATTEMPTS_KEY, 0)) <= last:
            if time.monotonic() > deadline:
                raise dist.DistStoreError(
                    f"rank 0 started no new attempt within {timeout.total_seconds():g} s"
                )
            time.sleep(0.1)
        store.set(joined, str(attempt))
    return dist.PrefixStore(f"{ATTEMPTS_KEY}/{attempt}", store)


# How gloo's RuntimeErrors say a peer went away: most name gloo's source file; a pair closed
# because another operation on it timed out says only this (seen after a cut link).
GLOO_LOST_PEER = ("/gloo/", "Application timeout caused pair closure")


def lost_peer(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because another rank went away (died,
    partitioned, timed out): gloo reports a closed or silent connection as a RuntimeError,
    the c10d store as a DistError."""
    if isinstance(e, dist.DistError):
        return True
    return type(e) is RuntimeError and any(sign in str(e) for sign in GLOO_LOST_PEER)


def retried() -> bool:
    """Whether a failed attempt of this rank will be started again: torchrun has restarts
    left, or torchrun was started by something that retries it (the chart's Job); only
    `train --nproc-per-node`, once its torchrun's restarts are spent, is the last word."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    limit = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    return restarts < limit or LAST_LAUNCHER_ENV not in os.environ


def stop(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(t)
    return t


def gather(obj: Any, world: World) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def sync_buffers(net: nn.Module, world: World) -> None:
    """Give every rank rank 0's BatchNorm running statistics: each rank updated its own
    from its own batches, and evaluation and the saved model must be one model."""
    if world.distributed:
        for buffer in net.buffers():
            dist.broadcast(buffer, src=0)


def wrap(
    net: nn.Module, world: World, device: torch.device, sync_bn: bool, compression: str
) -> nn.Module:
    """The module the training step calls: DDP averages gradients over the ranks."""
    if not world.distributed:
        return net
    if sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(net, device_ids=device_ids)
    if compression == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    return ddp


@dataclass(frozen=True)
class Rendezvous:
    """Where the machines of a multi-node job meet: node 0 hosts torchrun's store."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = ""
    master_port: int = 29500
    timeout: float = 600

    def check(self) -> None:
        if self.nnodes > 1 and not self.master_addr:
            raise UsageError("--nnodes > 1 needs --master-addr: the name of node 0")
        if self.node_rank >= self.nnodes:
            raise UsageError(f"--node-rank {self.node_rank}: 0 to {self.nnodes - 1}")

    def torchrun_args(self) -> list[str]:
        if self.nnodes == 1:
            return ["--standalone"]  # torchrun picks a free port itself
        return [
            f"--nnodes={self.nnodes}",
            f"--node-rank={self.node_rank}",
            f"--master-addr={self.master_addr}",
            f"--master-port={self.master_port}",
            f"--rdzv-conf=timeout={self.timeout:g}",
        ]


ALONE = Rendezvous()


def launch(
    nproc_per_node: int,
    argv: list[str],
    max_restarts: int = 0,
    rendezvous: Rendezvous = ALONE,
    finished: Callable[[], bool] = lambda: False,
) -> None:
    """Run `mnist-pipeline ARGV` as `nproc_per_node` ranks on this machine through torchrun,
    alone or as one node of `rendezvous`; torchrun restarts all the ranks up to
    `max_restarts` times after one fails. `finished` says whether the run is complete
    (rank 0 has written the model): from then on nothing torchrun does can lose it.

    A multi-node torchrun can hang between attempts: its agent waits on node 0's store
    over a connection a partition left open, which only the kernel's TCP retransmission
    limit ends (about 15 minutes). So when no rank has run for the rendezvous timeout
    plus a margin, the attempt is ended here, in one line. After its ranks have finished
    the run, torchrun waits for every other node's torchrun to say so too, and a node
    lost at that moment (its pod killed, a replacement started) never does: then it is
    ended after a short grace, and the run is done."""
    command = [
        *(sys.executable, "-m", "torch.distributed.run", *rendezvous.torchrun_args()),
        *(f"--nproc-per-node={nproc_per_node}", f"--max-restarts={max_restarts}"),
        *("-m", "mnist_pipeline", *argv),
    ]
    # Each rank sets its own thread count; set here, OMP_NUM_THREADS also spares us
    # torchrun's warning about it.
    threads = str(max(1, available_cpus() // nproc_per_node))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    if rendezvous.nnodes == 1:
        env[LAST_LAUNCHER_ENV] = "1"  # else the job's scheduler (the chart's Job) retries
    with subprocess.Popen(command, env=env) as launcher:
        try:
            code = supervise(launcher, rendezvous.timeout + STUCK_MARGIN_SECONDS, finished)
        except BaseException:
            # Ctrl-C or SIGTERM here: torchrun stops its ranks on SIGTERM and exits.
            launcher.terminate()
            try:
                launcher.wait(timeout=STUCK_MARGIN_SECONDS)
            except subprocess.TimeoutExpired:
                launcher.kill()
            raise
    if code != 0 and finished():
        log.warning(
            "node %d: torchrun %s after the run was complete (rank 0 wrote the model): "
            "another node was lost at the end; the run is done",
            rendezvous.node_rank,
            "was ended" if code is None else f"exited {code}",
        )
        return
    if code is None:
        raise PipelineFailure(
            f"node {rendezvous.node_rank}: no rank has run for "
            f"{rendezvous.timeout + STUCK_MARGIN_SECONDS:g} s: node 0's rendezvous at "
            f"{rendezvous.master_addr}:{rendezvous.master_port} is out of reach (partitioned, "
            "or gone); this attempt is over"
        )
    if code != 0:
        raise PipelineFailure(
            f"distributed training failed (torchrun exit {code}; its report above names the "
            "rank); run the same command again to resume from the last checkpoint"
        )


STUCK_MARGIN_SECONDS = 30
# How long torchrun may wait for the other nodes once the run is complete: they finish
# within a second of each other unless one was lost.
EXIT_BARRIER_GRACE_SECONDS = 10


def supervise(
    launcher: subprocess.Popen[bytes], idle_limit: float, finished: Callable[[], bool]
) -> int | None:
    """torchrun's exit code, or None after it ran no rank for `idle_limit` seconds, or for
    the exit barrier's grace once the run is finished (it is then killed: stuck in C++, it
    would not handle SIGTERM)."""
    idle_since = time.monotonic()
    while True:
        try:
            return launcher.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        idle = time.monotonic() - idle_since
        if children(launcher.pid):
            idle_since = time.monotonic()
        elif idle > idle_limit or (idle > EXIT_BARRIER_GRACE_SECONDS and finished()):
            launcher.kill()
            launcher.wait()
            return None


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's ranks)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid:
            found.append(int(stat.parent.name))
    return found
