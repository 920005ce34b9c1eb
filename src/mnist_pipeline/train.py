"""Train ResNet-18 on MNIST from storage, resumably, and write model.pth, train.log, metrics.json.

The recipe, chosen by measurement on a 2-core CPU (see README): the whole training set
as one in-memory tensor (no per-item transforms), channels-last, SGD with Nesterov
momentum under a one-cycle learning rate (warm-up then cosine decay to ~0), light label
smoothing. One epoch reaches ≥ 99% test accuracy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mnist_pipeline import data, model
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

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("onecycle", "constant")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.05  # peak learning rate of the one-cycle schedule
    optimizer: str = "sgd"
    schedule: str = "onecycle"
    warmup: float = 0.15  # fraction of all steps spent warming up
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    seed: int = 0
    limit_train: int = 0  # 0: all 60000 images
    limit_test: int = 0  # 0: all 10000 images; quick runs evaluate on fewer
    channels_last: bool = True

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise UsageError("need epochs >= 1, batch size >= 2 and lr > 0")
        if self.limit_train < 0 or self.limit_test < 0:
            raise UsageError("limits must be >= 0 (0 means the whole split)")
        if self.optimizer not in OPTIMIZERS or self.schedule not in SCHEDULES:
            raise UsageError(f"optimizer must be one of {OPTIMIZERS}, schedule one of {SCHEDULES}")


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
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.Adam(net.parameters(), lr=cfg.lr)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, not {name!r}")
    return torch.device(name)


def network_bytes() -> tuple[int, int]:
    """Bytes received and sent so far by every non-loopback interface (from /proc/net/dev)."""
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


class Progress:
    """A live bar on a terminal; in a Job (no TTY), a plain line every `every_s` seconds."""

    def __init__(self, total: int, every_s: float = 15.0) -> None:
        self.total, self.every_s = total, every_s
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def update(self, step: int, text: str) -> None:
        now = time.monotonic()
        if self.tty:
            filled = int(30 * step / self.total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {step}/{self.total} {text}")
            sys.stderr.flush()
        elif now - self.last >= self.every_s or step == self.total:
            log.info("step %d/%d %s", step, self.total, text)
        if now - self.last >= self.every_s:
            self.last = now

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


@torch.inference_mode()
def evaluate(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000
) -> tuple[float, float]:
    """Mean loss and accuracy of `net` on (x, y)."""
    net.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(x), batch):
        logits = net(x[i : i + batch])
        loss_sum += F.cross_entropy(logits, y[i : i + batch], reduction="sum").item()
        correct += (logits.argmax(1) == y[i : i + batch]).sum().item()
    net.train()
    return loss_sum / len(x), correct / len(x)


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
    test accuracy is measured too (metrics["evals"], for accuracy-against-time curves)."""
    cfg.validate()
    run_id = run_id or default_run_id(cfg)
    out = run_dir(storage, run_id)
    metrics_path, state_path = out / "metrics.json", out / "resume.pth"
    if metrics_path.is_file():
        previous = read_json(metrics_path)
        if previous.get("status") == "complete":
            log.info(
                "run %s is already complete (test accuracy %.4f); nothing to do",
                run_id,
                previous["test_accuracy"],
            )
            return dict(previous)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)

    file_log = logging.FileHandler(out / "train.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("mnist_pipeline").addHandler(file_log)
    metrics: dict[str, Any] = {
        "run_id": run_id,
        "status": "running",
        "hyperparameters": dataclasses.asdict(cfg),
        "history": [],
        "evals": [],
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        return _train(
            storage,
            cfg,
            run_id,
            out,
            metrics,
            metrics_path,
            state_path,
            resolve_device(device),
            threads,
            checkpoint_every,
            eval_every,
        )
    except BaseException as e:
        # A kill leaves status "running" (and resume.pth); an error says what it was.
        if not isinstance(e, KeyboardInterrupt | SystemExit):
            metrics.update(status="failed", error=f"{type(e).__name__}: {e}")
            try:
                atomic_write_json(metrics_path, metrics)
            except OSError as record_error:  # a full volume: the original error matters more
                log.warning("could not record the failure in %s: %s", metrics_path, record_error)
            log_error_to(file_log, log, "training run %s failed: %s", run_id, e)
        raise
    finally:
        logging.getLogger("mnist_pipeline").removeHandler(file_log)
        file_log.close()


def _train(
    storage: Path,
    cfg: TrainConfig,
    run_id: str,
    out: Path,
    metrics: dict[str, Any],
    metrics_path: Path,
    state_path: Path,
    device: torch.device,
    threads: int,
    checkpoint_every: int,
    eval_every: int,
) -> dict[str, Any]:
    if device.type == "cpu":
        torch.set_num_threads(threads or available_cpus())
    torch.manual_seed(cfg.seed)

    train_images, train_labels = data.load(storage, "train")
    test_images, test_labels = data.load(storage, "test")
    if cfg.limit_train:
        train_images, train_labels = (
            train_images[: cfg.limit_train],
            train_labels[: cfg.limit_train],
        )
    if cfg.limit_test:
        test_images, test_labels = test_images[: cfg.limit_test], test_labels[: cfg.limit_test]
    x_train, y_train = to_tensors(train_images, train_labels, device, cfg.channels_last)
    x_test, y_test = to_tensors(test_images, test_labels, device, cfg.channels_last)
    n = len(x_train)
    steps_per_epoch = n // cfg.batch_size if n > cfg.batch_size else 1
    batch_size = min(cfg.batch_size, n)
    total_steps = steps_per_epoch * cfg.epochs

    net = model.build().to(device)
    if cfg.channels_last:
        # Module.to accepts memory_format at run time; torch's stubs do not declare it.
        net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = make_optimizer(cfg, net)
    start_epoch, start_step, train_seconds = 0, 0, 0.0
    partial = {"loss_sum": 0.0, "correct": 0, "seen": 0}

    if state_path.is_file():
        state = load_resume_state(state_path, run_id, device)
        if state["config"] != dataclasses.asdict(cfg):
            raise UsageError(
                f"run {run_id} was started with other settings ({state['config']}); "
                "resume it with those, or start a new --run-id"
            )
        try:
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise unusable_resume_state(state_path, run_id, str(e).splitlines()[0]) from e
        start_epoch, start_step = state["epoch"], state["step_in_epoch"]
        train_seconds, partial = state["train_seconds"], state["partial"]
        metrics.update(
            history=state["history"], evals=state["evals"], started_at=state["started_at"]
        )
        log.info(
            "resuming run %s at epoch %d, step %d/%d (%.0f s trained so far)",
            run_id,
            start_epoch + 1,
            start_step,
            steps_per_epoch,
            train_seconds,
        )
    else:
        log.info(
            "training run %s on %s: %d train images, %d test, %s",
            run_id,
            device,
            n,
            len(x_test),
            dataclasses.asdict(cfg),
        )
    if device.type == "cpu":
        log.info("cpu threads: %d", torch.get_num_threads())
    atomic_write_json(metrics_path, metrics)

    def save_state(epoch: int, step_in_epoch: int) -> None:
        state = {
            "config": dataclasses.asdict(cfg),
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "train_seconds": train_seconds,
            "partial": partial,
            "history": metrics["history"],
            "evals": metrics["evals"],
            "started_at": metrics["started_at"],
        }
        save_checkpoint(state, state_path)

    def record_eval(global_step: int, accuracy: float) -> None:
        metrics["evals"].append(
            {
                "step": global_step,
                "epoch": round(global_step / steps_per_epoch, 3),
                "train_seconds": round(train_seconds, 2),
                "test_accuracy": accuracy,
            }
        )
        log.info(
            "step %d (epoch %.2f): test accuracy %.4f after %.1f s of training",
            global_step,
            global_step / steps_per_epoch,
            accuracy,
            train_seconds,
        )

    rx0, tx0 = network_bytes()
    net.train()
    for epoch in range(start_epoch, cfg.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        order = order.to(device)
        progress = Progress(steps_per_epoch)
        t0 = time.monotonic()
        for step in range(start_step, steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            xb, yb = x_train[idx], y_train[idx]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, epoch * steps_per_epoch + step, total_steps)
            optimizer.zero_grad(set_to_none=True)
            logits = net(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing)
            loss.backward()
            optimizer.step()

            partial["loss_sum"] += loss.item() * len(yb)
            partial["correct"] += int((logits.argmax(1) == yb).sum().item())
            partial["seen"] += len(yb)
            progress.update(
                step + 1,
                f"epoch {epoch + 1}/{cfg.epochs} "
                f"loss {partial['loss_sum'] / partial['seen']:.4f} "
                f"acc {partial['correct'] / partial['seen']:.4f}",
            )
            if (
                checkpoint_every
                and (step + 1) % checkpoint_every == 0
                and step + 1 < steps_per_epoch
            ):
                train_seconds += time.monotonic() - t0
                save_state(epoch, step + 1)
                t0 = time.monotonic()
            global_step = epoch * steps_per_epoch + step + 1
            if eval_every and global_step % eval_every == 0 and step + 1 < steps_per_epoch:
                train_seconds += time.monotonic() - t0
                record_eval(global_step, evaluate(net, x_test, y_test)[1])
                t0 = time.monotonic()
        progress.close()
        train_seconds += time.monotonic() - t0
        epoch_seconds = train_seconds - sum(h["train_seconds"] for h in metrics["history"])

        eval_t0 = time.monotonic()
        test_loss, test_acc = evaluate(net, x_test, y_test)
        record = {
            "epoch": epoch + 1,
            "train_loss": partial["loss_sum"] / max(1, partial["seen"]),
            "train_accuracy": partial["correct"] / max(1, partial["seen"]),
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "train_seconds": round(epoch_seconds, 2),
            "eval_seconds": round(time.monotonic() - eval_t0, 2),
            "lr_end": optimizer.param_groups[0]["lr"],
        }
        metrics["history"].append(record)
        if eval_every:
            record_eval((epoch + 1) * steps_per_epoch, test_acc)
        log.info(
            "epoch %d/%d: train loss %.4f acc %.4f | test loss %.4f acc %.4f | %.1f s",
            epoch + 1,
            cfg.epochs,
            record["train_loss"],
            record["train_accuracy"],
            test_loss,
            test_acc,
            epoch_seconds,
        )
        start_step, partial = 0, {"loss_sum": 0.0, "correct": 0, "seen": 0}
        save_state(epoch + 1, 0)
        atomic_write_json(metrics_path, metrics)

    if not math.isfinite(metrics["history"][-1]["train_loss"]):
        raise PipelineFailure(f"training diverged (loss {metrics['history'][-1]['train_loss']})")
    rx1, tx1 = network_bytes()
    final_acc = metrics["history"][-1]["test_accuracy"]
    payload = model.checkpoint_payload(
        net,
        run_id=run_id,
        test_accuracy=final_acc,
        epochs=cfg.epochs,
        normalize={"mean": data.MEAN, "std": data.STD},
    )
    save_checkpoint(payload, out / "model.pth")
    metrics.update(
        status="complete",
        test_accuracy=final_acc,
        train_seconds=round(train_seconds, 2),
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        network_bytes={"received": rx1 - rx0, "sent": tx1 - tx0},
        checkpoint="model.pth",
    )
    atomic_write_json(metrics_path, metrics)
    state_path.unlink(missing_ok=True)
    log.info(
        "network during training (non-loopback interfaces): received %d B, sent %d B",
        rx1 - rx0,
        tx1 - tx0,
    )
    log.info(
        "final test accuracy %.4f after %d epoch(s), %.1f s of training; checkpoint %s",
        final_acc,
        cfg.epochs,
        train_seconds,
        out / "model.pth",
    )
    return metrics
