"""Train ResNet-18 on MNIST from storage, resumably, and write model.pth, train.log, metrics.json.

The recipe, chosen by measurement on a 2-core CPU (see README): the whole training set
as one in-memory tensor (no per-item transforms), channels-last, fused SGD with Nesterov
momentum under a one-cycle learning rate (warm-up then cosine decay to ~0), light label
smoothing; the last stages' 2x2 and 1x1 maps as matrix products (model.Conv2d). One
epoch reaches ≥ 99% test accuracy; --epochs may be a fraction of one.

Under torchrun the same code is one rank of a data-parallel job (distributed.py,
docs/DISTRIBUTED.md): the global batch is shared out, DDP averages the gradients, rank 0
writes. Alone, it is a world of one and runs exactly as one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import sys
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

from mnist_pipeline import data, distributed, model, settings
from mnist_pipeline.distributed import ONE_PROCESS, World, all_sum, sync_buffers
from mnist_pipeline.storage import (
    PipelineFailure,
    UsageError,
    atomic_open,
    atomic_write_json,
    available_cpus,
    log_error_to,
    read_json,
    run_dir,
    temp_files,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
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

    def __post_init__(self) -> None:
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

    def validate(self) -> None:
        """The CLI's checks (settings.py), for a config built in Python."""
        settings.check_fields(self)
        if not 0 <= self.warmup < 1 or not math.isfinite(self.warmup):
            raise UsageError(f"warmup {self.warmup}: must be >= 0 and < 1")
        if self.limit_train == 1:
            raise UsageError(
                "--limit-train 1 is too small: BatchNorm needs at least 2 images per step; "
                "use --limit-train 2 or more (0: all 60000)"
            )


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
    # No weight decay on BatchNorm and biases: it only fights their scale.
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        # fused: one pass over the 11 M parameters instead of one per operation (5 ms
        # against 14 ms a step on one core of a 2-core AMD EPYC).
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, fused=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.Adam(net.parameters(), lr=cfg.lr)


def resolve_device(name: str, world: World = ONE_PROCESS) -> torch.device:
    """The device of this rank: with CUDA, the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, not {name!r}")
    if name == "cuda":
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


NETWORK_SCOPE = (
    "non-loopback interfaces of this network namespace, every process in it "
    "(the machine, or the pod in Kubernetes)"
)


def network_bytes() -> tuple[int, int]:
    """Bytes received and sent so far through the interfaces NETWORK_SCOPE names (from
    /proc/net/dev): Linux keeps no per-process count, so other processes' traffic is in it."""
    rx = tx = 0
    try:
        lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    except OSError:
        return 0, 0
    for line in lines:
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            continue
        fields = counters.split()
        rx, tx = rx + int(fields[0]), tx + int(fields[8])
    return rx, tx


def default_run_id(cfg: TrainConfig) -> str:
    """A run id that is a function of the settings: training is deterministic for given
    settings, so the same command resumes its interrupted run or reuses its completed one
    instead of training the identical model again under a new id."""
    settings = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    return "cfg-" + hashlib.sha256(settings.encode()).hexdigest()[:12]


def run_state(storage: Path, run_id: str) -> str:
    """What training `run_id` will do, in words, for the user to read before it starts."""
    out = run_dir(storage, run_id)
    try:
        status = read_json(out / "metrics.json").get("status")
    except (OSError, ValueError, AttributeError):
        status = None
    if status == "complete":
        return "completed before: reusing it, not training again"
    if (out / "resume.pth").is_file():
        return "interrupted before: resuming it from its last checkpoint"
    return "new: training it"


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return (
        f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
        if minutes >= 60
        else f"{minutes}:{secs:02d}"
    )


class Progress:
    """A live bar on a terminal; in a Job (no TTY), a plain line every `every_s` seconds.
    Both show elapsed time, speed and the ETA of the whole run (steps are global)."""

    def __init__(
        self, total: int, images_per_step: int, start: int = 0, every_s: float = 15.0
    ) -> None:
        self.total, self.images_per_step, self.start = total, images_per_step, start
        self.every_s = every_s
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.monotonic()

    def timing(self, step: int, now: float) -> str:
        elapsed = now - self.t0
        steps_per_s = (step - self.start) / elapsed if elapsed > 0 else 0.0
        eta = clock((self.total - step) / steps_per_s) if steps_per_s else "?"
        return (
            f"{clock(elapsed)} elapsed, {steps_per_s * self.images_per_step:.0f} images/s, "
            f"ETA {eta}"
        )

    def update(self, step: int, text: str) -> None:
        now = time.monotonic()
        if self.tty:
            filled = int(30 * step / self.total)
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {step}/{self.total}"
            sys.stderr.write(f"\r{bar} {text} {self.timing(step, now)}")
            sys.stderr.flush()
        elif now - self.last >= self.every_s or step == self.total:
            log.info("step %d/%d %s | %s", step, self.total, text, self.timing(step, now))
        if now - self.last >= self.every_s:
            self.last = now

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


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


def to_tensors(
    images: np.ndarray, labels: np.ndarray, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(data.normalize(images)).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.from_numpy(labels.astype(np.int64)).to(device)


RESUME_KEYS = frozenset(
    {
        "config",
        "model",
        "optimizer",
        "epoch",
        "step_in_epoch",
        "train_seconds",
        "partial",
        "history",
        "started_at",
    }
)


def unusable_resume_state(path: Path, run_id: str, why: str) -> UsageError:
    return UsageError(
        f"{path}: cannot resume run {run_id} from it ({why}); delete it to train this run "
        "from the start, or pick a new --run-id"
    )


def load_resume_state(path: Path, run_id: str, device: torch.device) -> dict[str, Any]:
    """resume.pth, loaded weights-only; a damaged or foreign file is bad input, not a crash.

    Checkpoints are written atomically, so a damaged one was damaged after the fact (disk,
    copy, a hand edit): resuming from it is never right, and the user decides what to do.
    """
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # whatever the bytes are, the file is unusable
        raise unusable_resume_state(path, run_id, model.load_error(e)) from e
    if not isinstance(state, dict) or not state.keys() >= RESUME_KEYS:
        raise unusable_resume_state(path, run_id, "not a resume checkpoint of this project")
    return state


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
    for name in ("resume.pth", "model.pth", "metrics.json"):
        for tmp in temp_files(out, name):
            log.warning("removing %s, left by an interrupted checkpoint write", tmp)
            tmp.unlink(missing_ok=True)


def check_batch(cfg: TrainConfig, world_size: int) -> None:
    """--batch-size is the global batch: each rank takes an equal share of at least 2
    images, since BatchNorm cannot normalise over a single one."""
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
    """'lr 0.05 -> 0.2, epochs 1 -> 2': what differs from the settings a run was started with
    (a setting the run predates counts as its default)."""
    defaults, now = dataclasses.asdict(TrainConfig()), dataclasses.asdict(cfg)
    return ", ".join(
        f"{key} {before.get(key, defaults[key])!r} -> {value!r}"
        for key, value in now.items()
        if before.get(key, defaults[key]) != value
    )


def completed_run(metrics_path: Path, cfg: TrainConfig, run_id: str) -> dict[str, Any] | None:
    """The metrics of run `run_id` if it is complete with these settings; other settings on
    a complete run are refused rather than silently ignored."""
    if not metrics_path.is_file():
        return None
    previous: dict[str, Any] = read_json(metrics_path)
    if previous.get("status") != "complete":
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
    device: str = "auto",
    threads: int = 0,
    checkpoint_every: int = 200,
    eval_every: int = 0,
) -> dict[str, Any]:
    """Train (or resume) run `run_id`; return its metrics. Idempotent once the run is complete.

    Every `checkpoint_every` steps a resumable state is saved; every `eval_every` steps the
    test accuracy is measured too (metrics["evals"], for accuracy-against-time curves).
    Under torchrun every rank calls this with the same arguments; rank 0 writes."""
    cfg.validate()
    world = distributed.from_environment()
    check_batch(cfg, world.size)
    dev = resolve_device(device, world)
    distributed.start(world, dev)
    try:
        run_id = run_id or default_run_id(cfg)
        out = run_dir(storage, run_id)
        previous = completed_run(out / "metrics.json", cfg, run_id)
        if previous is not None:
            return previous
        data.check_present(storage)  # before the run folder exists
        with run_logging(out, world):
            return _train_recording_failure(
                storage, cfg, run_id, out, dev, world, threads, checkpoint_every, eval_every
            )
    finally:
        distributed.stop(world)


class RankPrefix(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.prefix = f"rank {rank}: "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


@contextlib.contextmanager
def run_logging(out: Path, world: World) -> Iterator[None]:
    """Rank 0 alone writes train.log; on the terminal (or a pod's log) each rank's
    lines say which rank wrote them."""
    out.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = []
    if world.writer:
        remove_stale_temp_files(out)
        file_log = logging.FileHandler(out / "train.log")
        file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("mnist_pipeline").addHandler(file_log)
        handlers.append(file_log)
    prefix = RankPrefix(world.rank)
    console = logging.getLogger().handlers if world.distributed else []
    for handler in console:
        handler.addFilter(prefix)
    try:
        yield
    except Exception as e:
        if world.writer:  # the command line prints the error once, on exit
            log_error_to(handlers[0], log, "training run %s failed: %s", out.name, e)
        raise
    finally:
        for handler in console:
            handler.removeFilter(prefix)
        for handler in handlers:
            logging.getLogger("mnist_pipeline").removeHandler(handler)
            handler.close()


def _train_recording_failure(
    storage: Path,
    cfg: TrainConfig,
    run_id: str,
    out: Path,
    device: torch.device,
    world: World,
    threads: int,
    checkpoint_every: int,
    eval_every: int,
) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "run_id": run_id,
        "status": "running",
        "hyperparameters": dataclasses.asdict(cfg),
        "history": [],
        "evals": [],
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "world_size": world.size,
    }
    try:
        run = Run(storage, cfg, run_id, out, metrics, device, world, checkpoint_every)
        return run.train(threads, eval_every)
    except KeyboardInterrupt:  # Ctrl-C; a kill leaves status "running" (and resume.pth)
        if world.writer:
            record_outcome(out, {**metrics, "status": "interrupted"})
        raise TrainingInterrupted(interrupted_message(out)) from None
    except Exception as e:
        if world.writer:
            record_outcome(
                out, {**metrics, "status": "failed", "error": f"{type(e).__name__}: {e}"}
            )
        raise


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, saying what to do next (the command line exits 130)."""


def interrupted_message(out: Path) -> str:
    if (out / "resume.pth").is_file():
        return (
            f"training run {out.name} interrupted: run the same command again to resume it "
            "from its last checkpoint"
        )
    return (
        f"training run {out.name} interrupted before its first checkpoint: the same command "
        "starts it again"
    )


def record_outcome(out: Path, metrics: dict[str, Any]) -> None:
    try:
        atomic_write_json(out / "metrics.json", metrics)
    except OSError as record_error:  # a full volume: the original error matters
        log.warning("could not record the outcome in metrics.json: %s", record_error)


@dataclass(frozen=True)
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


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
    x_train, y_train = to_tensors(train_images, train_labels, device, True)
    x_test, y_test = to_tensors(test_images, test_labels, device, True)
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


def new_partial() -> dict[str, Any]:
    return {"loss_sum": 0.0, "correct": 0, "seen": 0}


@dataclass
class Loop:
    """Where training stands, in global steps: what resume.pth saves besides the weights."""

    epoch: int = 0
    step: int = 0  # steps done in this epoch
    train_seconds: float = 0.0
    partial: dict[str, Any] = dataclasses.field(default_factory=new_partial)  # all ranks


def parameters_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of every parameter and buffer: equal digests, identical models."""
    digest = hashlib.sha256()
    for key, value in state_dict.items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Run:
    """One training run on one rank: data, model, resume, steps, epoch ends, checkpoints."""

    def __init__(
        self,
        storage: Path,
        cfg: TrainConfig,
        run_id: str,
        out: Path,
        metrics: dict[str, Any],
        device: torch.device,
        world: World,
        checkpoint_every: int,
    ) -> None:
        self.storage, self.cfg, self.run_id, self.out = storage, cfg, run_id, out
        self.metrics, self.device, self.world = metrics, device, world
        self.checkpoint_every = checkpoint_every
        self.metrics_path, self.state_path = out / "metrics.json", out / "resume.pth"
        self.loop = Loop()

    def train(self, threads: int, eval_every: int) -> dict[str, Any]:
        self.setup(threads)
        progress = Progress(self.plan.total_steps, self.plan.batch, start=self.global_step)
        rx0, tx0 = network_bytes()
        try:
            while self.global_step < self.plan.total_steps:
                self.epoch(progress, eval_every)
        finally:  # ends the bar's line, so that an error is printed on a line of its own
            progress.close()
        rx1, tx1 = network_bytes()
        return self.finish(received=rx1 - rx0, sent=tx1 - tx0)

    def epoch(self, progress: Progress, eval_every: int) -> None:
        order = epoch_order(self.cfg, self.plan.images, self.loop.epoch, self.device)
        steps = self.plan.steps_in(self.loop.epoch)
        while self.loop.step < steps:
            self.step(order)
            progress.update(self.global_step, self.progress_text())
            if self.loop.step == steps:
                break  # the epoch end checkpoints and evaluates
            if self.checkpoint_every and self.loop.step % self.checkpoint_every == 0:
                self.save_state()
            if eval_every and self.global_step % eval_every == 0:
                self.record_eval(
                    evaluate(self.net, self.data.x_test, self.data.y_test, self.world)[1]
                )
        self.end_epoch(record_eval=bool(eval_every))

    @property
    def global_step(self) -> int:
        return self.loop.epoch * self.plan.steps_per_epoch + self.loop.step

    def setup(self, threads: int) -> None:
        """Threads, data, model and optimizer; the saved state if the run was interrupted."""
        cfg, world = self.cfg, self.world
        if self.device.type == "cpu":
            # Ranks on one machine share its CPUs.
            torch.set_num_threads(threads or max(1, available_cpus() // world.local_size))
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.data = load_data(self.storage, cfg, self.device)
        self.plan = Plan.of(cfg, len(self.data.x_train), world)
        self.net = model.build().to(self.device)
        if True:
            # Module.to accepts memory_format at run time; torch's stubs do not declare it.
            self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.optimizer = make_optimizer(cfg, self.net)
        if self.state_path.is_file():
            self.resume()
        else:
            log.info(
                "training run %s on %s, world size %d: %d train images (%d per rank and "
                "step), %d test, %s",
                self.run_id,
                self.device,
                world.size,
                self.plan.images,
                self.plan.local,
                len(self.data.x_test),
                dataclasses.asdict(cfg),
            )
        if self.device.type == "cpu":
            log.info("cpu threads: %d", torch.get_num_threads())
        if world.writer:
            atomic_write_json(self.metrics_path, self.metrics)
        # Wrapped after loading the state: DDP starts from rank 0's weights.
        self.ddp = distributed.wrap(self.net, world, self.device, cfg.sync_bn)

    def resume(self) -> None:
        """Continue from resume.pth. Its state is global (steps of the global batch), so a
        run may resume at another world size."""
        state = load_resume_state(self.state_path, self.run_id, self.device)
        if state["config"] != dataclasses.asdict(self.cfg):
            raise UsageError(
                f"run {self.run_id} was started with other settings "
                f"({differing_settings(state['config'], self.cfg)}); "
                "resume it with those, or start a new --run-id"
            )
        try:
            self.net.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise unusable_resume_state(self.state_path, self.run_id, str(e).splitlines()[0]) from e
        self.loop = Loop(
            state["epoch"], state["step_in_epoch"], state["train_seconds"], state["partial"]
        )
        self.metrics.update(
            history=state["history"], evals=state["evals"], started_at=state["started_at"]
        )
        log.info(
            "resuming run %s at epoch %d, step %d/%d (%.0f s trained so far), world size %d",
            self.run_id,
            self.loop.epoch + 1,
            self.loop.step,
            self.plan.steps_per_epoch,
            self.loop.train_seconds,
            self.world.size,
        )

    def step(self, order: torch.Tensor) -> None:
        """One optimizer step on this rank's share of the global batch; DDP averages the
        gradients, and the loss and accuracy tallies are summed over the ranks."""
        t0 = time.monotonic()
        idx = self.plan.shard(order, self.loop.step, self.world)
        xb, yb = self.data.x_train[idx], self.data.y_train[idx]
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.cfg, self.global_step, self.plan.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.ddp(xb)
        loss = F.cross_entropy(logits, yb, label_smoothing=self.cfg.label_smoothing)
        loss.backward()
        self.optimizer.step()

        correct = (logits.argmax(1) == yb).sum().item()
        tally = torch.tensor([loss.item() * len(yb), correct, len(yb)], dtype=torch.float64)
        loss_sum, correct, seen = all_sum(tally.to(self.device), self.world).tolist()
        partial = self.loop.partial
        partial["loss_sum"] += loss_sum
        partial["correct"] += int(correct)
        partial["seen"] += int(seen)
        self.loop.step += 1
        self.loop.train_seconds += time.monotonic() - t0

    def progress_text(self) -> str:
        partial = self.loop.partial
        return (
            f"epoch {self.loop.epoch + 1}/{math.ceil(self.cfg.epochs)} "
            f"loss {partial['loss_sum'] / partial['seen']:.4f} "
            f"acc {partial['correct'] / partial['seen']:.4f}"
        )

    def record_eval(self, accuracy: float) -> None:
        epoch = self.global_step / self.plan.steps_per_epoch
        self.metrics["evals"].append(
            {
                "step": self.global_step,
                "epoch": round(epoch, 3),
                "train_seconds": round(self.loop.train_seconds, 2),
                "test_accuracy": accuracy,
            }
        )
        log.info(
            "step %d (epoch %.2f): test accuracy %.4f after %.1f s of training",
            self.global_step,
            epoch,
            accuracy,
            self.loop.train_seconds,
        )

    def end_epoch(self, record_eval: bool) -> None:
        """Test accuracy, the epoch's record (with every rank's speed), a checkpoint."""
        loop, history = self.loop, self.metrics["history"]
        epoch_seconds = loop.train_seconds - sum(h["train_seconds"] for h in history)
        eval_t0 = time.monotonic()
        test_loss, test_acc = evaluate(self.net, self.data.x_test, self.data.y_test, self.world)
        epoch_images = self.plan.steps_in(loop.epoch) * self.plan.local
        rank_rates = distributed.gather(round(epoch_images / epoch_seconds, 1), self.world)
        record = {
            "epoch": loop.epoch + 1,
            "train_loss": loop.partial["loss_sum"] / max(1, loop.partial["seen"]),
            "train_accuracy": loop.partial["correct"] / max(1, loop.partial["seen"]),
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "train_seconds": round(epoch_seconds, 2),
            "eval_seconds": round(time.monotonic() - eval_t0, 2),
            "lr_end": self.optimizer.param_groups[0]["lr"],
            "images_per_s": round(epoch_images * self.world.size / epoch_seconds, 1),
            "rank_images_per_s": rank_rates,
        }
        history.append(record)
        if record_eval:
            self.record_eval(test_acc)
        log.info(
            "epoch %d/%d: train loss %.4f acc %.4f | test loss %.4f acc %.4f | %.1f s, "
            "%.0f images/s (per rank: %s)",
            loop.epoch + 1,
            math.ceil(self.cfg.epochs),
            record["train_loss"],
            record["train_accuracy"],
            test_loss,
            test_acc,
            epoch_seconds,
            record["images_per_s"],
            ", ".join(f"{rate:.0f}" for rate in rank_rates),
        )
        self.loop = Loop(loop.epoch + 1, 0, loop.train_seconds)
        self.save_state()
        if self.world.writer:
            atomic_write_json(self.metrics_path, self.metrics)

    def save_state(self) -> None:
        if not self.world.writer:
            return
        state = {
            "config": dataclasses.asdict(self.cfg),
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.loop.epoch,
            "step_in_epoch": self.loop.step,
            "train_seconds": self.loop.train_seconds,
            "partial": self.loop.partial,
            "history": self.metrics["history"],
            "evals": self.metrics["evals"],
            "started_at": self.metrics["started_at"],
        }
        save_checkpoint(state, self.state_path)

    def finish(self, received: int, sent: int) -> dict[str, Any]:
        """Check that all ranks hold one model; rank 0 writes model.pth and the metrics."""
        metrics, history = self.metrics, self.metrics["history"]
        if not math.isfinite(history[-1]["train_loss"]):
            raise PipelineFailure(f"training diverged (loss {history[-1]['train_loss']})")
        digests = distributed.gather(parameters_digest(self.net.state_dict()), self.world)
        if len(set(digests)) != 1:
            raise PipelineFailure(f"the ranks ended with different models: {digests}")
        if self.world.distributed:
            log.info("parameters sha256 %s, identical on all %d ranks", digests[0], len(digests))
        final_acc = history[-1]["test_accuracy"]
        metrics.update(
            status="complete",
            test_accuracy=final_acc,
            train_seconds=round(self.loop.train_seconds, 2),
            finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
            network_bytes={"received": received, "sent": sent},
            network_bytes_scope=NETWORK_SCOPE,
            parameters_sha256=digests[0],
            checkpoint="model.pth",
        )
        if self.world.writer:
            payload = model.checkpoint_payload(
                self.net,
                run_id=self.run_id,
                test_accuracy=final_acc,
                epochs=self.cfg.epochs,
                normalize={"mean": data.MEAN, "std": data.STD},
            )
            save_checkpoint(payload, self.out / "model.pth")
            atomic_write_json(self.metrics_path, metrics)
            self.state_path.unlink(missing_ok=True)
        # No rank reports success before model.pth is in place.
        distributed.barrier(self.world)
        log.info(
            "network during training, %s: received %d B, sent %d B", NETWORK_SCOPE, received, sent
        )
        if not self.world.writer:
            log.info("done; rank 0 wrote %s", self.out / "model.pth")
            return metrics
        log.info(
            "final test accuracy %.4f after %g epoch(s), %.1f s of training; checkpoint %s",
            final_acc,
            self.cfg.epochs,
            self.loop.train_seconds,
            self.out / "model.pth",
        )
        return metrics
