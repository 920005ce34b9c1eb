"""Training speed and time-to-accuracy of a recipe, through the pipeline's own train()."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from common import load_average
from mnist_pipeline.train import TrainConfig, train

# The recipe of the original implementation, kept to compare the default against.
ORIGINAL = TrainConfig(
    optimizer="adam",
    schedule="constant",
    lr=1e-3,
    batch_size=64,
    label_smoothing=0.0,
    weight_decay=0.0,
)


def time_to_accuracy(evals: list[dict[str, Any]], target: float) -> float | None:
    """Training seconds at the first evaluation reaching `target`; None if none did."""
    return next((e["train_seconds"] for e in evals if e["test_accuracy"] >= target), None)


def run_recipe(
    storage: Path,
    name: str,
    cfg: TrainConfig,
    eval_images: int,
    targets: tuple[float, ...] = (0.99, 0.995),
) -> dict[str, Any]:
    """Train `cfg` as run `name`, evaluating on the test set about every `eval_images`
    training images; the figures: images/s, final accuracy, time to each target."""
    eval_every = max(1, eval_images // cfg.batch_size)
    load_before = load_average()
    t0, cpu0 = time.monotonic(), time.process_time()
    metrics = train(storage, cfg, run_id=name, checkpoint_every=0, eval_every=eval_every)
    wall_s, cpu_s = time.monotonic() - t0, time.process_time() - cpu0
    images = cfg.epochs * epoch_images(cfg)
    return {
        "name": name,
        "config": dataclasses.asdict(cfg),
        "eval_every_steps": eval_every,
        "train_images_seen": images,
        "train_seconds": metrics["train_seconds"],
        "wall_seconds": round(wall_s, 2),
        # CPU seconds this process got per wall second, out of `threads`: below the thread
        # count, other processes were using the cores.
        "cpu_seconds": round(cpu_s, 2),
        "threads": torch.get_num_threads(),
        "cpu_share": cpu_s / wall_s / torch.get_num_threads(),
        "images_per_s": images / metrics["train_seconds"],
        "test_accuracy": metrics["test_accuracy"],
        "test_images": cfg.limit_test or 10000,
        "evals": metrics["evals"],
        "history": metrics["history"],
        "time_to_accuracy_s": {str(t): time_to_accuracy(metrics["evals"], t) for t in targets},
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def epoch_images(cfg: TrainConfig) -> int:
    """Images one epoch trains on: whole batches only, as train() steps."""
    n = cfg.limit_train or 60000
    steps = n // cfg.batch_size if n > cfg.batch_size else 1
    return steps * min(cfg.batch_size, n)
