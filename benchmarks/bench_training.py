"""Training speed and time-to-accuracy of a recipe, through the pipeline's own train(),
against the machine's own yardstick: its fp32 matrix-product rate on the same threads."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from common import load_average
from mnist_pipeline import model
from mnist_pipeline.distributed import ONE_PROCESS
from mnist_pipeline.train import Plan, RankConfig, TrainConfig, train

# The recipe of the original implementation, kept to compare the default against.
ORIGINAL = TrainConfig(
    optimizer="adam",
    schedule="constant",
    lr=1e-3,
    batch_size=64,
    label_smoothing=0.0,
    weight_decay=0.0,
)
# The 0.1.0 recipe: one whole epoch, every convolution through oneDNN.
PREVIOUS_DEFAULT = TrainConfig(epochs=1)


@contextlib.contextmanager
def plain_convolutions() -> Iterator[None]:
    """Training as the 0.1.0 recipe ran it: no matrix products for the tiniest maps."""
    model.Conv2d.tiny_maps_as_matmul = False
    try:
        yield
    finally:
        model.Conv2d.tiny_maps_as_matmul = True


def matmul_flops_per_s(n: int = 2048, rounds: int = 7) -> float:
    """The machine's fp32 matrix-product rate on torch's threads (median of `rounds`
    n×n products): what 'share of matmul' and 'matmul-epochs' divide by."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def flops_per_image() -> float:
    """Forward and backward FLOPs of one training image as the architecture counts them
    (plain convolutions, their padding taps included; torch's FLOP counter)."""
    net = model.build().train()
    x = torch.randn(8, 1, 28, 28)
    with plain_convolutions(), FlopCounterMode(display=False) as counter:
        F.cross_entropy(net(x), torch.zeros(8, dtype=torch.long)).backward()
    return counter.get_total_flops() / 8


def time_to_accuracy(evals: list[dict[str, Any]], target: float) -> float | None:
    """Training seconds at the first evaluation reaching `target`; None if none did."""
    return next((e["train_seconds"] for e in evals if e["test_accuracy"] >= target), None)


def run_recipe(
    storage: Path,
    name: str,
    cfg: TrainConfig,
    eval_images: int,
    plain: bool = False,
    targets: tuple[float, ...] = (0.99, 0.995),
) -> dict[str, Any]:
    """Train `cfg` as run `name`, evaluating on the test set about every `eval_images`
    training images; the figures: images/s, final accuracy, time to each target."""
    eval_every = max(1, eval_images // cfg.batch_size)
    load_before = load_average()
    t0, cpu0 = time.monotonic(), time.process_time()
    with plain_convolutions() if plain else contextlib.nullcontext():
        rank = RankConfig(checkpoint_every=0, eval_every=eval_every)
        metrics = train(storage, cfg, run_id=name, rank=rank)
    wall_s, cpu_s = time.monotonic() - t0, time.process_time() - cpu0
    images = images_trained(cfg)
    return {
        "name": name,
        "config": dataclasses.asdict(cfg),
        "plain_convolutions": plain,
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


def images_trained(cfg: TrainConfig) -> int:
    """Images the run trains on: whole batches only, as train() steps."""
    plan = Plan.of(cfg, cfg.limit_train or 60000, ONE_PROCESS)
    return plan.total_steps * plan.batch
