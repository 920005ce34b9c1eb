"""Helpers shared by the benchmark suite: percentiles, medians of repeats, the machine."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np


def percentiles(latencies_ms: list[float]) -> dict[str, float]:
    a = np.asarray(latencies_ms)
    return {f"p{q}_ms": float(np.percentile(a, q)) for q in (50, 90, 99)}


def median_of(repeats: int, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Each key's median over `repeats` rounds of `measure`."""
    rounds = [measure() for _ in range(repeats)]
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages: how busy the (shared) machine was."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def epoch_images() -> int:
    """One epoch of the full training set in whole batches of the default batch size: what
    a matmul-epoch counts (the data module's image count, the training default's batch)."""
    from mnist_pipeline.data import FILES
    from mnist_pipeline.train import TrainConfig

    batch = TrainConfig().batch_size
    return FILES["train", "images"].count // batch * batch


EPOCH_IMAGES = epoch_images()

# The vector extensions that decide how fast convolutions and int8 matrix products run.
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def cpu_identity() -> dict[str, Any]:
    """Family/model and the vector extensions: 'AMD EPYC' names both an AVX2-only
    machine and an AVX-512 one, three times apart in training speed."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return {"family_model": "unknown", "vector_extensions": []}
    flags = set(fields.get("flags", "").split())
    return {
        "family_model": f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}",
        "vector_extensions": [f for f in VECTOR_FLAGS if f in flags],
    }


def machine() -> dict[str, Any]:
    """What the figures were measured on (Triton's version is added once a server answers)."""
    import onnxruntime
    import torch

    from mnist_pipeline.storage import available_cpus

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        **cpu_identity(),
        "logical_cpus": os.cpu_count(),
        "cpus_available": available_cpus(),
        "torch_threads": available_cpus(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "load_average_start": load_average(),
    }
