"""One rank of bench_distributed.py's link sweep (run by torchrun, one per network namespace).

Times DDP training steps of the real model (ResNet-18, 44.7 MB of fp32 gradients, DDP's
own buckets overlapped with the backward pass) with and without the gradient
synchronisation (`no_sync`), for each variant given; rank 0 writes the medians as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from mnist_pipeline import model

# bf16_compress_hook is refused without CUDA and NCCL.
HOOKS = {"fp32": None, "fp16": default_hooks.fp16_compress_hook}


def step_seconds(ddp: nn.Module, images: torch.Tensor, labels: torch.Tensor, sync: bool) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    if sync:
        loss = nn.functional.cross_entropy(ddp(images), labels)
        loss.backward()
    else:
        with ddp.no_sync():  # type: ignore[operator]
            loss = nn.functional.cross_entropy(ddp(images), labels)
            loss.backward()
    seconds = time.perf_counter() - t0
    ddp.zero_grad(set_to_none=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="fp32:25", help="hook:bucket_mb,...")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="images per rank and step")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    images = torch.randn(args.batch, 1, 28, 28)
    labels = torch.randint(0, 10, (args.batch,))
    results = []
    for variant in args.variants.split(","):
        hook, bucket = variant.split(":")
        ddp = nn.parallel.DistributedDataParallel(model.build(), bucket_cap_mb=float(bucket))
        if HOOKS[hook] is not None:
            ddp.register_comm_hook(None, HOOKS[hook])
        step_seconds(ddp, images, labels, sync=True)  # warm-up: buckets are rebuilt once
        synced = [step_seconds(ddp, images, labels, sync=True) for _ in range(args.steps)]
        alone = [step_seconds(ddp, images, labels, sync=False) for _ in range(args.steps)]
        results.append(
            {
                "hook": hook,
                "bucket_mb": float(bucket),
                "step_s": statistics.median(synced),
                "compute_s": statistics.median(alone),
            }
        )
    if dist.get_rank() == 0:
        args.out.write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
