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

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mnist_pipeline.storage import PipelineFailure, UsageError, available_cpus

# Set by launch() for its ranks: no one starts them again once torchrun's restarts are spent.
LAST_LAUNCHER_ENV = "MNIST_PIPELINE_LAUNCHED_LOCALLY"


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
    if world.distributed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))


def lost_peer(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because another rank went away (died,
    partitioned, timed out): gloo reports a closed or silent connection as a RuntimeError
    from its sources, the c10d store as a DistError."""
    if isinstance(e, dist.DistError):
        return True
    return type(e) is RuntimeError and "/gloo/" in str(e)


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


def wrap(net: nn.Module, world: World, device: torch.device, sync_bn: bool) -> nn.Module:
    """The module the training step calls: DDP averages gradients over the ranks."""
    if not world.distributed:
        return net
    if sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(net, device_ids=device_ids)


def launch(nproc_per_node: int, argv: list[str], max_restarts: int = 0) -> None:
    """Run `mnist-pipeline ARGV` as `nproc_per_node` ranks on this machine, as torchrun
    --standalone would (it picks a free port itself); torchrun restarts them all up to
    `max_restarts` times after one fails."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc_per_node}",
        f"--max-restarts={max_restarts}",
        "-m",
        "mnist_pipeline",
        *argv,
    ]
    # Each rank sets its own thread count; set here, OMP_NUM_THREADS also spares us
    # torchrun's warning about it.
    threads = str(max(1, available_cpus() // nproc_per_node))
    env = {**os.environ, "OMP_NUM_THREADS": threads, LAST_LAUNCHER_ENV: "1"}
    with subprocess.Popen(command, env=env) as launcher:
        try:
            code = launcher.wait()
        except BaseException:
            # Ctrl-C or SIGTERM here: torchrun stops its ranks on SIGTERM and exits.
            launcher.terminate()
            launcher.wait()
            raise
    if code != 0:
        raise PipelineFailure(
            f"distributed training failed (torchrun exit {code}; its report above names the "
            "rank); run the same command again to resume from the last checkpoint"
        )
