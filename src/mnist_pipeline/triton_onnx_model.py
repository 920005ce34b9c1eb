"""Triton python-backend model that runs one version's model.onnx with onnxruntime.

`mnist_pipeline.serve` copies this file as `<model>/<version>/model.py` into the local
repository it derives, because the Triton binary available locally has no onnxruntime
backend. It stands in for that backend: it reads the same config (inputs, outputs,
max_batch_size) and answers with the same tensors. It runs inside Triton's Python stub
process, so it imports nothing from mnist_pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        onnx_path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"

        if not onnx_path.is_file():
            raise pb_utils.TritonModelException(f"{onnx_path}: missing")

        options = ort.SessionOptions()
        # Triton runs one of these per instance: the threads are shared out between instances
        # (the derivation sets how many) so that concurrent batches do not oversubscribe cores.
        options.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )

        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.inputs = [
            (t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["input"]
        ]
        self.outputs = [
            (t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["output"]
        ]
        onnx_inputs = {i.name for i in self.session.get_inputs()}
        onnx_outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n, _ in self.inputs if n not in onnx_inputs] + [
            n for n, _ in self.outputs if n not in onnx_outputs
        ]
        if missing:
            raise pb_utils.TritonModelException(
                f"{onnx_path}: config.pbtxt names tensors {missing} that the ONNX graph lacks "
                f"(graph inputs {sorted(onnx_inputs)}, outputs {sorted(onnx_outputs)})"
            )

    def execute(self, requests: list[Any]) -> list[Any]:
        if not self.batched:
            return [self._run([request])[0] for request in requests]
        return self._run(requests)

    def _run(self, requests: list[Any]) -> list[Any]:
        """Run the requests the dynamic batcher gathered as one batch, then split the answers."""
        try:
            per_request = [
                [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name, _ in self.inputs]
                for r in requests
            ]
            sizes = [tensors[0].shape[0] for tensors in per_request] if self.batched else [0]
            feed = {
                name: np.ascontiguousarray(
                    np.concatenate([t[i] for t in per_request])
                    if len(per_request) > 1
                    else per_request[0][i],
                    dtype=dtype,
                )
                for i, (name, dtype) in enumerate(self.inputs)
            }
            results = self.session.run([name for name, _ in self.outputs], feed)
        except Exception as e:  # every request of the batch gets the error, not a dead stub
            error = pb_utils.TritonError(f"onnxruntime: {e}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]

        responses = []
        start = 0
        for size in sizes:
            stop = start + size
            tensors = [
                pb_utils.Tensor(
                    name, (out[start:stop] if self.batched else out).astype(dtype, copy=False)
                )
                for (name, dtype), out in zip(self.outputs, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start = stop
        return responses
