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

import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
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

from mnist_pipeline import settings
from mnist_pipeline.errors import PipelineFailure, UsageError
from mnist_pipeline.storage import available_cpus
from mnist_pipeline.torchrun import TORCHRUN_FAILURE_ENV

log = logging.getLogger(__name__)

# Set by launch() for its ranks: no one starts them again once torchrun's restarts are spent.
LAST_LAUNCHER_ENV = "MNIST_PIPELINE_LAUNCHED_LOCALLY"
# Set by launch() for its ranks: their settings as the launching command made them (JSON).
RANK_SETTINGS_ENV = "MNIST_PIPELINE_RANK_SETTINGS"
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
        """Refuse what cannot meet, before torchrun starts."""
        if not 0 <= self.node_rank < self.nnodes:
            raise UsageError(
                f"--node-rank {self.node_rank} with --nnodes {self.nnodes}: each machine's "
                f"--node-rank is one of 0 to {self.nnodes - 1}, its own (--nnodes counts the "
                "machines)"
            )
        if self.nnodes > 1 and not self.master_addr:
            raise UsageError("--nnodes > 1 needs --master-addr: the name of node 0")

    @property
    def others(self) -> str:
        """The --node-rank values the other machines have."""
        ranks = [r for r in range(self.nnodes) if r != self.node_rank]
        return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]} to {ranks[-1]}"

    def port_taken(self) -> str:
        return (
            f"node 0: port {self.master_port} on this machine is taken, so node 0 cannot host "
            "the rendezvous there: another node here already runs with --node-rank 0 (each "
            f"node needs its own, 0 to {self.nnodes - 1}), or another program holds the port "
            "(choose a free --master-port, the same on every node)"
        )

    def taken(self) -> str | None:
        """Why this node 0 cannot host the rendezvous, where something already answers at
        --master-addr:--master-port: another node 0, or another program on the port."""
        if not answers(self.master_addr, self.master_port):
            return None
        if names_this_machine(self.master_addr):
            return self.port_taken()
        return (
            f"node 0: {self.master_addr}:{self.master_port} already answers, and "
            f"{self.master_addr} is not this machine: another node already runs there with "
            f"--node-rank 0 (give this one its own --node-rank, {self.others}), or something "
            "else holds that port"
        )

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


@dataclass(frozen=True)
class LaunchConfig(settings.Settings):
    """How the ranks of a training are started (settings.py declares each)."""

    nproc_per_node: int = settings.NPROC_PER_NODE.field()
    nnodes: int = settings.NNODES.field()
    node_rank: int = settings.NODE_RANK.field()
    master_addr: str = settings.MASTER_ADDR.field()
    master_port: int = settings.MASTER_PORT.field()
    rendezvous_timeout: float = settings.RENDEZVOUS_TIMEOUT.field()
    max_restarts: int = settings.MAX_RESTARTS.field()

    def check(self) -> None:
        self.rendezvous.check()  # also alone: --node-rank 1 of 1 machine is a mistake

    @property
    def rendezvous(self) -> Rendezvous:
        return Rendezvous(self.nnodes, self.node_rank, self.master_addr, self.master_port,
                          self.rendezvous_timeout)  # fmt: skip


def answers(host: str, port: int, timeout: float = 2) -> bool:
    """Whether something accepts connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def addresses(host: str) -> list[tuple[Any, ...]]:
    """(family, address) of each address `host` resolves to; none if it does not resolve."""
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return [(family, address) for family, _, _, _, address in found]


def names_this_machine(host: str) -> bool:
    """Whether `host` is an address of this machine (of this network namespace): one
    that a socket can be bound to here."""
    for family, address in addresses(host):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((address[0], 0, *address[2:]))
            return True
        except OSError:
            continue
    return False


def launch(
    how: LaunchConfig,
    argv: list[str],
    settings_json: str = "{}",
    finished: Callable[[], bool] = lambda: False,
    checkpoint: Path | None = None,
) -> None:
    """Run `mnist-pipeline ARGV` as `how.nproc_per_node` ranks here through torchrun, alone
    or as one node of its rendezvous, each given `settings_json` (RANK_SETTINGS_ENV);
    torchrun restarts all the ranks up to `how.max_restarts` times after one fails.
    `finished` says whether the run is complete (rank 0 has written the model): from then
    on nothing torchrun does can lose it. A failure ends in one line naming its cause; it
    says the same command resumes only where `checkpoint` (the run's resume.pth) exists.

    A multi-node torchrun can hang between attempts: its agent waits on node 0's store
    over a connection a partition left open, which only the kernel's TCP retransmission
    limit ends (about 15 minutes). So when no rank has run for the rendezvous timeout
    plus a margin, the attempt is ended here, in one line. After its ranks have finished
    the run, torchrun waits for every other node's torchrun to say so too, and a node
    lost at that moment (its pod killed, a replacement started) never does: then it is
    ended after a short grace, and the run is done."""
    rendezvous, nproc_per_node, max_restarts = how.rendezvous, how.nproc_per_node, how.max_restarts
    if rendezvous.nnodes > 1 and rendezvous.node_rank == 0:
        taken = rendezvous.taken()  # another node 0 would only be found out at the timeout
        if taken is not None:
            raise PipelineFailure(taken)
    command = [
        *(sys.executable, "-m", "mnist_pipeline.torchrun", *rendezvous.torchrun_args()),
        *(f"--nproc-per-node={nproc_per_node}", f"--max-restarts={max_restarts}"),
        *("-m", "mnist_pipeline", *argv),
    ]
    # Each rank sets its own; OMP_NUM_THREADS also spares us torchrun's warning about it.
    threads = str(max(1, available_cpus() // nproc_per_node))
    env = {**os.environ, "OMP_NUM_THREADS": threads, RANK_SETTINGS_ENV: settings_json}
    if rendezvous.nnodes == 1:
        env[LAST_LAUNCHER_ENV] = "1"  # else the job's scheduler (the chart's Job) retries
    with tempfile.TemporaryDirectory(prefix="mnist-pipeline-torchrun-") as folder:
        failure_file = Path(folder) / "failure.json"
        env[TORCHRUN_FAILURE_ENV] = str(failure_file)
        code = run_torchrun(command, env, rendezvous.timeout + STUCK_MARGIN_SECONDS, finished)
        failure = read_failure(failure_file)
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
        log.debug("torchrun failed: %s", failure.get("traceback", failure))
        resume = checkpoint if checkpoint is not None and checkpoint.is_file() else None
        raise PipelineFailure(failure_message(failure, code, max_restarts, rendezvous, resume))


def run_torchrun(
    command: list[str], env: dict[str, str], idle_limit: float, finished: Callable[[], bool]
) -> int | None:
    """torchrun's exit code, or None where supervise() ended it."""
    with subprocess.Popen(command, env=env) as launcher:
        try:
            return supervise(launcher, idle_limit, finished)
        except BaseException:
            # Ctrl-C or SIGTERM here: torchrun stops its ranks on SIGTERM and exits.
            launcher.terminate()
            try:
                launcher.wait(timeout=STUCK_MARGIN_SECONDS)
            except subprocess.TimeoutExpired:
                launcher.kill()
            raise


def read_failure(path: Path) -> dict[str, Any]:
    """What mnist_pipeline.torchrun wrote of its failure; empty if nothing (it was killed)."""
    try:
        failure = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return failure if isinstance(failure, dict) else {}


def failure_message(
    failure: dict[str, Any],
    code: int,
    max_restarts: int,
    rendezvous: Rendezvous,
    resume: Path | None,
) -> str:
    """One line: why torchrun failed, and what to do; `resume`: the checkpoint to resume."""
    if "rank" in failure:
        signal = failure.get("signal")
        how = f"was killed by {signal}" if signal else f"exited {failure.get('exitcode')}"
        spent = f" and torchrun's {max_restarts} restart(s) are spent" if max_restarts else ""
        again = f"resume from the last checkpoint, {resume}" if resume else "start over"
        return (
            f"distributed training failed: rank {failure['rank']} {how}{spent} (torchrun's "
            f"report above); run the same command again to {again}"
        )
    message = str(failure.get("message", ""))
    cause = rendezvous_failure(message, rendezvous)
    if cause is None:
        said = message.strip().splitlines()[0] if message.strip() else "its output is above"
        cause = f"distributed training failed: torchrun exit {code} ({said})"
    if resume is not None:
        cause += f"; then the same command resumes from the last checkpoint, {resume}"
    return cause


def rendezvous_failure(message: str, rendezvous: Rendezvous) -> str | None:
    """What torchrun's own failure `message` (torch's words) means for this node, in the
    words of its settings; None where it is not a failure to meet the other nodes."""
    node, nnodes, port = rendezvous.node_rank, rendezvous.nnodes, rendezvous.master_port
    within = f"within {rendezvous.timeout:g} s (--rendezvous-timeout)"
    joined = re.search(r"(\d+)/\d+ clients joined", message)
    if "EADDRINUSE" in message:
        return rendezvous.port_taken()
    if joined:
        return rendezvous.taken() or (
            f"node 0: {int(joined[1]) - 1} of the other {nnodes - 1} node(s) came to the "
            f"rendezvous at port {port} {within}: start each with --master-addr naming this "
            f"machine, --master-port {port} and its --node-rank ({rendezvous.others}), or "
            "raise --rendezvous-timeout if they start later"
        )
    if "trying to connect to" in message:
        where = f"{rendezvous.master_addr}:{port}"
        unresolved = "" if addresses(rendezvous.master_addr) else " (the name does not resolve)"
        return (
            f"node {node}: node 0's rendezvous at {where}{unresolved} did not answer {within}: "
            "start node 0 (--node-rank 0) there, check --master-addr and --master-port (the "
            "same on every node) and that the port is open to this machine, or raise "
            "--rendezvous-timeout"
        )
    # Node 0 waits for every node to report its rank; the others wait for node 0's answer.
    if "torchelastic/role_info/" in message or "torchelastic/assigned_ranks/" in message:
        what = (
            f"the nodes came, but not one of each --node-rank 0 to {nnodes - 1}"
            if node == 0
            else "node 0 did not give this node its ranks"
        )
        return (
            f"node {node}: {what} {within}: two nodes share a --node-rank, or their --nnodes "
            "differ; give each node its own --node-rank and the same --nnodes"
        )
    return None


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
