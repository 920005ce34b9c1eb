"""Train ResNet-18 on MNIST from storage, resumably, and write model.pth, train.log, metrics.json.

The recipe, chosen by measurement on a 2-core CPU (see README): the whole training set
as one in-memory tensor (no per-item transforms), channels-last, fused SGD with Nesterov
momentum under a one-cycle learning rate (warm-up then cosine decay to ~0), light label
smoothing; the last stages' 2x2 and 1x1 maps as matrix products (model.Conv2d). One
epoch reaches ≥ 99% test accuracy; --epochs may be a fraction of one.

Read from train(): it prepares a Run (Run.start: data, model, optimizer, the saved state
of an interrupted run), fit() is the training loop, finish() checks and writes the model.
What resume.pth holds is declared once, in ResumeState.

Under torchrun the same code is one rank of a data-parallel job (distributed.py,
docs/DISTRIBUTED.md): the global batch is shared out, DDP averages the gradients, rank 0
writes. Alone, it is a world of one and runs exactly as one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mnist_pipeline import data, distributed, interrupts, model, settings
from mnist_pipeline.distributed import ONE_PROCESS, World, all_sum, sync_buffers
from mnist_pipeline.errors import PipelineFailure, UsageError
from mnist_pipeline.progress import NETWORK_SCOPE, NetworkMeter, Progress, run_logging
from mnist_pipeline.storage import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    RESUME_FILE,
    TRAIN_LOCK_FILE,
    RunStatus,
    atomic_open,
    atomic_write_json,
    available_cpus,
    read_metrics,
    run_dir,
    temp_files,
)
from mnist_pipeline.tracking import UNTRACKED, Tracker, Tracking

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig(settings.Settings):
    """What the model is: the run id is derived from these (settings.py declares each)."""

    epochs: float = settings.EPOCHS.field()  # a fraction ends within one pass
    batch_size: int = settings.BATCH_SIZE.field()
    lr: float = settings.LR.field()  # peak learning rate of the one-cycle schedule
    optimizer: str = settings.OPTIMIZER.field()
    schedule: str = settings.SCHEDULE.field()
    warmup: float = 0.15  # fraction of all steps spent warming up
    weight_decay: float = settings.WEIGHT_DECAY.field()
    label_smoothing: float = settings.LABEL_SMOOTHING.field()
    seed: int = settings.SEED.field()
    limit_train: int = settings.LIMIT_TRAIN.field()  # 0: all 60000 images
    limit_test: int = settings.LIMIT_TEST.field()  # 0: all 10000; quick runs evaluate on fewer
    sync_bn: bool = settings.SYNC_BN.field()  # BatchNorm statistics over all ranks (CUDA DDP)
    gradient_compression: str = settings.GRADIENT_COMPRESSION.field()

    def __post_init__(self) -> None:
        super().__post_init__()
        # A limit covering a whole split is the whole split: the same model, so the same
        # run id as 0; said, not silently applied.
        for name, split in (("limit_train", "train"), ("limit_test", "test")):
            total = data.FILES[split, "images"].count
            limit = getattr(self, name)
            if limit >= total:
                flag = "--" + name.replace("_", "-")
                log.info(
                    "%s %d covers all %d %s images: using all (as 0)", flag, limit, total, split
                )
                object.__setattr__(self, name, 0)
        # A whole number of epochs as an int: the run id of `--epochs 3` stays what it was.
        if isinstance(self.epochs, float) and self.epochs.is_integer():
            object.__setattr__(self, "epochs", int(self.epochs))

    def check(self) -> None:
        if not 0 <= self.warmup < 1 or not math.isfinite(self.warmup):
            raise UsageError(f"warmup {self.warmup}: must be >= 0 and < 1")
        if self.limit_train == 1:
            raise UsageError(
                "--limit-train 1 is too small: BatchNorm needs at least 2 images per step; "
                "use --limit-train 2 or more (0: all 60000)"
            )


@dataclass(frozen=True)
class RankConfig(settings.Settings):
    """How each rank trains: not in the run id."""

    device: str = settings.DEVICE.field()
    threads: int = settings.THREADS.field()
    checkpoint_every: int = settings.CHECKPOINT_EVERY.field()  # 0: at epoch ends only
    eval_every: int = settings.EVAL_EVERY.field()
    collective_timeout: float = settings.COLLECTIVE_TIMEOUT.field()  # for a lost rank


def hyperparameters(cfg: TrainConfig) -> dict[str, Any]:
    """The settings as resume.pth and metrics.json keep them and the run id hashes them."""
    return dataclasses.asdict(cfg)


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """One-cycle: linear warm-up to cfg.lr, then cosine decay to 1% of it."""
    if cfg.schedule == "constant":
        return cfg.lr
    warmup = max(1, int(cfg.warmup * total_steps))
    if step < warmup:
        return cfg.lr * (0.04 + 0.96 * step / warmup)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(cfg: TrainConfig, net: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(net.parameters(), lr=cfg.lr)
    # No weight decay on BatchNorm and biases: it only fights their scale.
    groups = [
        {"params": [p for p in net.parameters() if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in net.parameters() if p.ndim <= 1], "weight_decay": 0.0},
    ]
    # fused: one pass over the 11 M parameters instead of one per operation (5 ms against
    # 14 ms a step on one core of a 2-core AMD EPYC).
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, fused=True)


def resolve_device(name: str, world: World = ONE_PROCESS) -> torch.device:
    """The device of this rank: with CUDA, the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA device")
    if name == "cuda":
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def default_run_id(cfg: TrainConfig) -> str:
    """A run id that is a function of the settings: training is deterministic for given
    settings, so the same command resumes its interrupted run or reuses its completed one
    instead of training the identical model again under a new id."""
    described = json.dumps(hyperparameters(cfg), sort_keys=True)
    return "cfg-" + hashlib.sha256(described.encode()).hexdigest()[:12]


def run_state(storage: Path, run_id: str) -> str:
    """What training `run_id` will do, in words, for the user to read before it starts."""
    out = run_dir(storage, run_id)
    if (read_metrics(out) or {}).get("status") == RunStatus.COMPLETE:
        return "completed before: reusing it, not training again"
    if (out / RESUME_FILE).is_file():
        return "interrupted before: resuming it from its last checkpoint"
    return "new: training it"


def check_world(cfg: TrainConfig, threads: int, local_size: int, world_size: int) -> None:
    """Refuse what `world_size` ranks, `local_size` of them here, cannot do (each rank checks,
    and the command starting them first): more threads or processes than the CPUs this
    process may use only contend (torch crashes on tens of thousands of threads); the global
    --batch-size gives each rank an equal share of at least 2 images, for BatchNorm."""
    cpus = available_cpus()
    for flag, count in (("--threads", threads), ("--nproc-per-node", local_size)):
        if count > cpus:
            raise UsageError(f"{flag} {count}: this machine has {cpus} CPUs; use at most {cpus}")
    if cfg.batch_size % world_size:
        raise UsageError(
            f"--batch-size {cfg.batch_size} is the global batch and must split evenly over "
            f"{world_size} ranks; use a multiple of {world_size}"
        )
    images = min(cfg.batch_size, cfg.limit_train or data.FILES["train", "images"].count)
    if images // world_size < 2:
        raise UsageError(
            f"with {world_size} ranks each step needs at least {2 * world_size} images "
            "(2 per rank, for BatchNorm): raise --limit-train / --batch-size"
        )
    if cfg.sync_bn and world_size > 1 and not torch.cuda.is_available():
        raise UsageError("--sync-bn needs CUDA: torch's SyncBatchNorm only runs on GPUs")


def differing_settings(before: dict[str, Any], cfg: TrainConfig) -> str:
    """'lr 0.05 -> 0.2, epochs 1 -> 2': what differs from the settings a run was started with."""
    return ", ".join(
        f"{key} {before.get(key)!r} -> {value!r}"
        for key, value in hyperparameters(cfg).items()
        if before.get(key) != value
    )


def completed_run(out: Path, cfg: TrainConfig, run_id: str) -> dict[str, Any] | None:
    """The metrics of run `run_id` if it is complete with these settings; other settings on
    a complete run are refused rather than silently ignored."""
    previous = read_metrics(out)
    if previous is None or previous.get("status") != RunStatus.COMPLETE:
        return None
    changed = differing_settings(previous.get("hyperparameters", {}), cfg)
    if changed:
        raise UsageError(
            f"run {run_id} is already complete with other settings ({changed}); "
            "pick a new --run-id to train with these"
        )
    log.info(
        "run %s is already complete (test accuracy %.4f); nothing to do",
        run_id,
        previous["test_accuracy"],
    )
    return previous


def train(
    storage: Path,
    cfg: TrainConfig,
    run_id: str | None = None,
    rank: RankConfig = RankConfig(),
    tracking: Tracking = UNTRACKED,
) -> dict[str, Any]:
    """Train (or resume) run `run_id`; return its metrics. Idempotent once the run is complete.

    Every `rank.checkpoint_every` steps a resumable state is saved; every `rank.eval_every`
    steps the test accuracy is measured too (metrics["evals"], for accuracy-against-time
    curves). Under torchrun every rank calls this with the same arguments; rank 0 writes.
    A collective that waits `rank.collective_timeout` seconds for a lost rank fails the
    attempt. With `tracking.uri`, rank 0 mirrors metrics.json into an MLflow run."""
    world = distributed.from_environment()
    check_world(cfg, rank.threads, world.local_size, world.size)
    dev = resolve_device(rank.device, world)
    try:
        distributed.start(world, dev, rank.collective_timeout)
    except Exception as e:
        if not distributed.lost_peer(e):
            raise
        raise PipelineFailure(
            f"rank {world.rank} could not join the other ranks within "
            f"{rank.collective_timeout:g} s ({first_line(e)})"
        ) from e
    try:
        run_id = run_id or default_run_id(cfg)
        out = run_dir(storage, run_id)
        previous = completed_run(out, cfg, run_id)
        if previous is not None:
            return previous
        data.check_present(storage)  # before the run folder exists
        metrics = new_metrics(cfg, run_id, world)
        tracker = Tracker(tracking if world.writer else UNTRACKED, run_id, out)
        with (
            contextlib.closing(tracker),  # train.log's last line in: the run's artifacts
            one_trainer(out, world),
            run_logging(out, world),
            recording_outcome(out, metrics, world, tracker),
        ):
            if world.writer:
                remove_stale_temp_files(out)
            run = Run.start(storage, cfg, run_id, out, dev, world, rank.threads, metrics, tracker)
            network = NetworkMeter()
            fit(run, rank.checkpoint_every, rank.eval_every)
            return finish(run, network.so_far())
    finally:
        distributed.stop(world)


@contextlib.contextmanager
def one_trainer(out: Path, world: World) -> Iterator[None]:
    """Refuse to train a run another process is training: both would write train.log and
    model.pth. The kernel releases the lock when its holder dies, however it dies. Only the
    writer takes it: the ranks of one DDP job are one trainer."""
    if not world.writer:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / TRAIN_LOCK_FILE
    while True:
        lock = open(path, "a+")  # noqa: SIM115 (held across the yield)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise UsageError(
                f"run {out.name} is being trained by {holder}; wait for it to end "
                "(a second trainer would overwrite its checkpoints) or choose another --run-id"
            ) from None
        # The holder removes the file as it ends: a lock taken on a removed file is no lock.
        if path.exists() and path.stat().st_ino == os.fstat(lock.fileno()).st_ino:
            break
        lock.close()
    try:
        lock.truncate(0)
        lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # still locked: nobody can take this file meanwhile
        lock.close()


def new_metrics(cfg: TrainConfig, run_id: str, world: World) -> dict[str, Any]:
    """metrics.json of a run that has just started; a resumed run takes back its records."""
    return {
        "run_id": run_id,
        "status": RunStatus.RUNNING,
        "hyperparameters": hyperparameters(cfg),
        "history": [],
        "evals": [],
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "world_size": world.size,
    }


def fit(run: Run, checkpoint_every: int, eval_every: int) -> None:
    """The training loop, from wherever `run` stands to its last step. A checkpoint every
    `checkpoint_every` steps of an epoch, the test accuracy every `eval_every` global steps;
    each epoch ends with a test and a checkpoint (end_epoch)."""
    cfg, plan, at = run.cfg, run.plan, run.at
    with Progress(plan.total_steps, plan.batch, start=run.global_step) as progress:
        while run.global_step < plan.total_steps:
            order = epoch_order(cfg, plan.images, at.epoch, run.device)
            steps = plan.steps_in(at.epoch)
            while at.step < steps:
                t0 = time.monotonic()
                idx = plan.shard(order, at.step, run.world)
                images, labels = run.data.x_train[idx], run.data.y_train[idx]
                for group in run.optimizer.param_groups:
                    group["lr"] = lr_at(cfg, run.global_step, plan.total_steps)
                run.optimizer.zero_grad(set_to_none=True)
                logits = run.ddp(images)
                loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
                loss.backward()  # under DDP, averaging the gradients over the ranks
                run.optimizer.step()
                at.tally.add_step(loss, logits, labels, run.world)
                at.step += 1
                at.train_seconds += time.monotonic() - t0

                progress.update(run.global_step, run.progress_text())
                if at.step == steps:
                    break  # the epoch's end evaluates and checkpoints
                if checkpoint_every and at.step % checkpoint_every == 0:
                    run.save_state()
                if eval_every and run.global_step % eval_every == 0:
                    record_eval(run, run.evaluate()[1])
            end_epoch(run, evals=bool(eval_every))


@dataclass(frozen=True)
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def to_tensors(
    images: np.ndarray, labels: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # Channels-last: oneDNN's convolutions run faster on it, and model.Conv2d's matrix
    # products read it without a copy.
    x = torch.from_numpy(data.normalize(images)).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.from_numpy(labels.astype(np.int64)).to(device)


def load_data(storage: Path, cfg: TrainConfig, device: torch.device) -> Data:
    """The (limited) splits as in-memory tensors; every rank holds all of them."""
    train_images, train_labels = data.load(storage, "train")
    test_images, test_labels = data.load(storage, "test")
    if cfg.limit_train:
        train_images, train_labels = (
            train_images[: cfg.limit_train],
            train_labels[: cfg.limit_train],
        )
    if cfg.limit_test:
        test_images, test_labels = test_images[: cfg.limit_test], test_labels[: cfg.limit_test]
    x_train, y_train = to_tensors(train_images, train_labels, device)
    x_test, y_test = to_tensors(test_images, test_labels, device)
    return Data(x_train, y_train, x_test, y_test)


@dataclass(frozen=True)
class Plan:
    """How each epoch's permutation is cut: global batches of `batch` images (whole ones
    only), each rank taking its own consecutive `local` images of every batch."""

    images: int
    batch: int
    local: int
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def of(cls, cfg: TrainConfig, images: int, world: World) -> Plan:
        steps = images // cfg.batch_size if images > cfg.batch_size else 1
        local = min(cfg.batch_size, images) // world.size
        total = max(1, round(steps * cfg.epochs))
        return cls(images, local * world.size, local, steps, total)

    def steps_in(self, epoch: int) -> int:
        """Steps of epoch `epoch`: all but in the last one of a fractional --epochs."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def shard(self, order: torch.Tensor, step: int, world: World) -> torch.Tensor:
        start = step * self.batch + world.rank * self.local
        return order[start : start + self.local]


def epoch_order(cfg: TrainConfig, images: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The epoch's permutation: a function of seed and epoch alone, so every rank (and a
    resumed run) cuts the same one."""
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    return torch.randperm(images, generator=generator).to(device)


@dataclass
class Tally:
    """The epoch's training loss and accuracy so far, summed over the ranks."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0

    def add_step(
        self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, world: World
    ) -> None:
        correct = (logits.argmax(1) == labels).sum().item()
        counts = torch.tensor(
            [loss.item() * len(labels), correct, len(labels)], dtype=torch.float64
        )
        loss_sum, correct, seen = all_sum(counts.to(logits.device), world).tolist()
        self.loss_sum += loss_sum
        self.correct += int(correct)
        self.seen += int(seen)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.seen)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.seen)


@dataclass
class Position:
    """Where training stands, in global steps (so a run may resume at another world size)."""

    epoch: int = 0
    step: int = 0  # steps done in this epoch
    train_seconds: float = 0.0
    tally: Tally = dataclasses.field(default_factory=Tally)

    def next_epoch(self) -> None:
        self.epoch, self.step, self.tally = self.epoch + 1, 0, Tally()


@dataclass
class ResumeState:
    """What resume.pth holds, declared here alone: saving, loading and checking it all go
    by these fields. Plain tensors, numbers, strings, lists and dicts, so that it loads
    weights-only."""

    config: dict[str, Any]  # hyperparameters of the run's TrainConfig
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    epoch: int
    step_in_epoch: int
    train_seconds: float
    partial: dict[str, Any]  # the epoch's Tally
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    started_at: str

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies every value, the weights included.
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, state: object, path: Path, run_id: str) -> ResumeState:
        """The state in `state`, loaded from `path`; a UsageError if any field is missing."""
        if not isinstance(state, dict):
            raise unusable_resume_state(path, run_id, "not a resume checkpoint of this project")
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [name for name in names if name not in state]
        if missing:
            why = f"not a resume checkpoint of this version: no {', '.join(missing)}"
            raise unusable_resume_state(path, run_id, why)
        return cls(**{name: state[name] for name in names})

    @classmethod
    def load(cls, path: Path, run_id: str, device: torch.device) -> ResumeState:
        """resume.pth, loaded weights-only; a damaged or foreign file is bad input, not a crash.

        Checkpoints are written atomically, so a damaged one was damaged after the fact
        (disk, copy, a hand edit): resuming from it is never right, and the user decides."""
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as e:  # whatever the bytes are, the file is unusable
            raise unusable_resume_state(path, run_id, model.load_error(e)) from e
        return cls.from_dict(state, path, run_id)


def unusable_resume_state(path: Path, run_id: str, why: str) -> UsageError:
    return UsageError(
        f"{path}: cannot resume run {run_id} from it ({why}); delete it to train this run "
        "from the start, or pick a new --run-id"
    )


@dataclass
class Run:
    """One training run on one rank, ready to step: its data, model and optimizer, how its
    epochs are cut, where it stands, and the metrics it records (Run.start makes one)."""

    cfg: TrainConfig
    run_id: str
    out: Path
    world: World
    device: torch.device
    data: Data
    plan: Plan
    net: nn.Module
    ddp: nn.Module  # what a step calls: DDP around `net` in a world of several ranks
    optimizer: torch.optim.Optimizer
    metrics: dict[str, Any]
    tracker: Tracker
    at: Position = dataclasses.field(default_factory=Position)

    @classmethod
    def start(
        cls,
        storage: Path,
        cfg: TrainConfig,
        run_id: str,
        out: Path,
        device: torch.device,
        world: World,
        threads: int,
        metrics: dict[str, Any],
        tracker: Tracker,
    ) -> Run:
        """Threads, data, model and optimizer; the saved state if the run was interrupted."""
        if device.type == "cpu":
            # Ranks on one machine share its CPUs.
            torch.set_num_threads(threads or max(1, available_cpus() // world.local_size))
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        tensors = load_data(storage, cfg, device)
        plan = Plan.of(cfg, len(tensors.x_train), world)
        net = model.build().to(device)
        # Module.to accepts memory_format at run time; torch's stubs do not declare it.
        net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        optimizer = make_optimizer(cfg, net)
        run = cls(cfg, run_id, out, world, device, tensors, plan, net, net, optimizer, metrics,
                  tracker)  # fmt: skip
        if run.state_path.is_file():
            run.resume()
        else:
            log.info(
                "training run %s on %s, world size %d: %d train images (%d per rank and "
                "step), %d test, %s",
                *(run_id, device, world.size, plan.images, plan.local),
                *(len(tensors.x_test), hyperparameters(cfg)),
            )
        if device.type == "cpu":
            log.info("cpu threads: %d", torch.get_num_threads())
        run.write_metrics()
        # Wrapped after loading the state: DDP starts from rank 0's weights.
        run.ddp = distributed.wrap(net, world, device, cfg.sync_bn, cfg.gradient_compression)
        return run

    @property
    def state_path(self) -> Path:
        return self.out / RESUME_FILE

    @property
    def global_step(self) -> int:
        return self.at.epoch * self.plan.steps_per_epoch + self.at.step

    def resume(self) -> None:
        """Continue from resume.pth, whatever world size wrote it."""
        state = ResumeState.load(self.state_path, self.run_id, self.device)
        changed = differing_settings(state.config, self.cfg)
        if changed:
            raise UsageError(
                f"run {self.run_id} was started with other settings ({changed}); "
                "resume it with those, or start a new --run-id"
            )
        try:
            self.net.load_state_dict(state.model)
            self.optimizer.load_state_dict(state.optimizer)
            tally = Tally(**state.partial)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise unusable_resume_state(self.state_path, self.run_id, str(e).splitlines()[0]) from e
        self.at = Position(state.epoch, state.step_in_epoch, state.train_seconds, tally)
        self.metrics.update(history=state.history, evals=state.evals, started_at=state.started_at)
        log.info(
            "resuming run %s at epoch %d, step %d/%d (%.0f s trained so far), world size %d",
            *(self.run_id, self.at.epoch + 1, self.at.step, self.plan.steps_per_epoch),
            *(self.at.train_seconds, self.world.size),
        )

    def resume_state(self) -> ResumeState:
        return ResumeState(
            config=hyperparameters(self.cfg),
            model=self.net.state_dict(),
            optimizer=self.optimizer.state_dict(),
            epoch=self.at.epoch,
            step_in_epoch=self.at.step,
            train_seconds=self.at.train_seconds,
            partial=dataclasses.asdict(self.at.tally),
            history=self.metrics["history"],
            evals=self.metrics["evals"],
            started_at=self.metrics["started_at"],
        )

    def save_state(self) -> None:
        if self.world.writer:
            save_checkpoint(self.resume_state().to_dict(), self.state_path)

    def write_metrics(self) -> None:
        if self.world.writer:
            atomic_write_json(self.out / METRICS_FILE, self.metrics)
            self.tracker.mirror(self.metrics)

    def evaluate(self) -> tuple[float, float]:
        return evaluate(self.net, self.data.x_test, self.data.y_test, self.world)

    def progress_text(self) -> str:
        return (
            f"epoch {self.at.epoch + 1}/{math.ceil(self.cfg.epochs)} "
            f"loss {self.at.tally.loss:.4f} acc {self.at.tally.accuracy:.4f}"
        )


@torch.inference_mode()
def evaluate(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, world: World = ONE_PROCESS, batch: int = 1000
) -> tuple[float, float]:
    """Mean loss and accuracy of `net` on (x, y); each rank measures its share."""
    sync_buffers(net, world)
    lo, hi = len(x) * world.rank // world.size, len(x) * (world.rank + 1) // world.size
    net.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=x.device)  # loss, correct, images
    for i in range(lo, hi, batch):
        xb, yb = x[i : min(i + batch, hi)], y[i : min(i + batch, hi)]
        logits = net(xb)
        sums[0] += F.cross_entropy(logits, yb, reduction="sum").item()
        sums[1] += (logits.argmax(1) == yb).sum().item()
        sums[2] += len(yb)
    net.train()
    loss_sum, correct, count = all_sum(sums, world).tolist()
    return loss_sum / count, correct / count


def record_eval(run: Run, accuracy: float) -> None:
    """metrics["evals"]: test accuracy against steps and seconds of training."""
    epoch = run.global_step / run.plan.steps_per_epoch
    run.metrics["evals"].append(
        {
            "step": run.global_step,
            "epoch": round(epoch, 3),
            "train_seconds": round(run.at.train_seconds, 2),
            "test_accuracy": accuracy,
        }
    )
    log.info(
        "step %d (epoch %.2f): test accuracy %.4f after %.1f s of training",
        *(run.global_step, epoch, accuracy, run.at.train_seconds),
    )


def end_epoch(run: Run, evals: bool) -> None:
    """Test accuracy, the epoch's record (with every rank's speed), a checkpoint."""
    at, history = run.at, run.metrics["history"]
    epoch_seconds = at.train_seconds - sum(h["train_seconds"] for h in history)
    eval_t0 = time.monotonic()
    test_loss, test_acc = run.evaluate()
    epoch_images = run.plan.steps_in(at.epoch) * run.plan.local
    rank_rates = distributed.gather(round(epoch_images / epoch_seconds, 1), run.world)
    record = {
        "epoch": at.epoch + 1,
        "train_loss": at.tally.loss,
        "train_accuracy": at.tally.accuracy,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "train_seconds": round(epoch_seconds, 2),
        "eval_seconds": round(time.monotonic() - eval_t0, 2),
        "lr_end": run.optimizer.param_groups[0]["lr"],
        "images_per_s": round(epoch_images * run.world.size / epoch_seconds, 1),
        "rank_images_per_s": rank_rates,
    }
    history.append(record)
    if evals:
        record_eval(run, test_acc)
    log.info(
        "epoch %d/%d: train loss %.4f acc %.4f | test loss %.4f acc %.4f | %.1f s, "
        "%.0f images/s (per rank: %s)",
        *(at.epoch + 1, math.ceil(run.cfg.epochs), record["train_loss"]),
        *(record["train_accuracy"], test_loss, test_acc, epoch_seconds),
        *(record["images_per_s"], ", ".join(f"{rate:.0f}" for rate in rank_rates)),
    )
    at.next_epoch()
    run.save_state()
    run.write_metrics()


def parameters_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of every parameter and buffer: equal digests, identical models."""
    digest = hashlib.sha256()
    for key, value in state_dict.items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def finish(run: Run, network: dict[str, int]) -> dict[str, Any]:
    """Check that all ranks hold one model; rank 0 writes model.pth and the metrics."""
    metrics, last = run.metrics, run.metrics["history"][-1]
    if not math.isfinite(last["train_loss"]):
        raise PipelineFailure(f"training diverged (loss {last['train_loss']})")
    digests = distributed.gather(parameters_digest(run.net.state_dict()), run.world)
    if len(set(digests)) != 1:
        raise PipelineFailure(f"the ranks ended with different models: {digests}")
    if run.world.distributed:
        log.info("parameters sha256 %s, identical on all %d ranks", digests[0], len(digests))
    metrics.update(
        status=RunStatus.COMPLETE,
        test_accuracy=last["test_accuracy"],
        train_seconds=round(run.at.train_seconds, 2),
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        network_bytes=network,
        network_bytes_scope=NETWORK_SCOPE,
        parameters_sha256=digests[0],
        checkpoint=CHECKPOINT_FILE,
    )
    model_path = run.out / CHECKPOINT_FILE
    if run.world.writer:
        payload = model.checkpoint_payload(
            run.net,
            run_id=run.run_id,
            test_accuracy=last["test_accuracy"],
            epochs=run.cfg.epochs,
            normalize={"mean": data.MEAN, "std": data.STD},
        )
        save_checkpoint(payload, model_path)
        run.write_metrics()
        run.state_path.unlink(missing_ok=True)
    # No rank reports success before model.pth is in place.
    distributed.barrier(run.world)
    log.info(
        "network during training, %s: received %d B, sent %d B",
        *(NETWORK_SCOPE, network["received"], network["sent"]),
    )
    if not run.world.writer:
        log.info("done; rank 0 wrote %s", model_path)
        return metrics
    log.info(
        "final test accuracy %.4f after %g epoch(s), %.1f s of training; checkpoint %s",
        *(last["test_accuracy"], run.cfg.epochs, run.at.train_seconds, model_path),
    )
    return metrics


def save_checkpoint(obj: dict[str, Any], path: Path) -> None:
    """torch.save through atomic_open: `path` is the old file or the new one, never half.

    torch's zip writer reports a failed write (ENOSPC, EIO) as a RuntimeError about file
    positions; the OSError behind it, naming `path`, is what the user needs to read.
    """
    with atomic_open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            cause = e.__cause__ or e.__context__
            if isinstance(cause, OSError) and cause.errno is not None:
                raise OSError(cause.errno, cause.strerror, str(path)) from e
            raise


def remove_stale_temp_files(out: Path) -> None:
    """Drop the temporary files a killed run left while writing a checkpoint: they are
    never read (only complete files are renamed into place) but hold up to ~90 MB each."""
    for name in (RESUME_FILE, CHECKPOINT_FILE, METRICS_FILE):
        for tmp in temp_files(out, name):
            log.warning("removing %s, left by an interrupted checkpoint write", tmp)
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def recording_outcome(
    out: Path, metrics: dict[str, Any], world: World, tracker: Tracker
) -> Iterator[None]:
    """metrics.json says "failed" (with the error) or, after Ctrl-C or SIGTERM at any
    moment (Interrupted), "interrupted". A rank lost to the others ends the attempt
    "retrying" when it will be started again (distributed.retried), else "failed", in one
    line. SIGKILL leaves "running"; every case keeps resume.pth, for the same command to go
    on from."""
    try:
        yield
    except SystemExit:
        raise
    except BaseException as e:
        interrupt = interrupts.as_interrupt(e)
        if interrupt is not None:
            if world.writer:
                record_outcome(out, {**metrics, "status": RunStatus.INTERRUPTED}, tracker)
            raise interrupt.saying(interrupted_message(out)) from None
        if isinstance(e, Exception):
            record_failure(out, metrics, world, e, tracker)
        raise


def record_failure(
    out: Path, metrics: dict[str, Any], world: World, e: Exception, tracker: Tracker
) -> None:
    """Record `e` as the attempt's end; a lost peer becomes one line (PipelineFailure)."""
    lost = world.distributed and distributed.lost_peer(e)
    status = RunStatus.RETRYING if lost and distributed.retried() else RunStatus.FAILED
    error = f"{type(e).__name__}: {e}"
    if lost:
        error = f"rank {world.rank} lost contact with the other ranks ({first_line(e)})"
    if world.writer:
        record_outcome(out, {**metrics, "status": status, "error": error}, tracker)
    if lost:
        then = "being retried" if status == RunStatus.RETRYING else "no retries left"
        raise PipelineFailure(
            f"training attempt failed: {error}; {then}: the same command resumes from "
            "the last checkpoint"
        ) from e


def first_line(e: BaseException) -> str:
    """gloo's message without its source location or the C++ stack torch appends."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[^\]]*\] ", "", line)


def interrupted_message(out: Path) -> str:
    if (out / RESUME_FILE).is_file():
        return (
            f"training run {out.name} interrupted: run the same command again to resume it "
            "from its last checkpoint"
        )
    return (
        f"training run {out.name} interrupted before its first checkpoint: the same command "
        "starts it again"
    )


def record_outcome(out: Path, metrics: dict[str, Any], tracker: Tracker) -> None:
    try:
        atomic_write_json(out / METRICS_FILE, metrics)
    except OSError as record_error:  # a full volume: the original error matters
        log.warning("could not record the outcome in metrics.json: %s", record_error)
    tracker.mirror(metrics)
