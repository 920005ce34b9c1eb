"""The ONNX model before and after the export's optimisation, under onnxruntime."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bench_serving import inprocess_latency, inprocess_throughput, session
from common import load_average, median_of
from mnist_pipeline.export import load_candidate, torch_export
from mnist_pipeline.storage import available_cpus


def compare(
    checkpoint: Path,
    published: Path,
    workdir: Path,
    x: np.ndarray,
    requests: int,
    repeats: int,
) -> dict[str, Any]:
    """`published` is what the export stage wrote for `checkpoint`; the unoptimised
    model is torch.onnx.export's graph of the same network, before any rewriting."""
    load_before = load_average()
    unoptimised = workdir / "unoptimised.onnx"
    unoptimised.parent.mkdir(parents=True, exist_ok=True)
    program = torch_export(load_candidate(checkpoint).net)
    unoptimised.write_bytes(program.model_proto.SerializeToString())
    threads = available_cpus()
    rows = []
    for label, path in (("torch.onnx.export", unoptimised), ("optimised (published)", published)):
        sess = session(path, threads)
        rows.append(
            {
                "label": label,
                "nodes": len(onnx.load(str(path)).graph.node),
                "bytes": path.stat().st_size,
                **median_of(repeats, partial(inprocess_latency, sess, x, requests)),
                **median_of(repeats, partial(inprocess_throughput, sess, x, requests // 16 or 1)),
            }
        )
    return {
        "rows": rows,
        "threads": threads,
        "requests": requests,
        "repeats": repeats,
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
