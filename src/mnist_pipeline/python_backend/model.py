"""Triton's python backend serving the exported ONNX model with ONNX Runtime.

`mnist-pipeline pin --triton-backend python` (and `serve`, which pins first) places this
file beside model.onnx for a tritonserver without the onnxruntime backend: the one of the
nvidia-pytriton wheel and the project's CPU image. It honours what config.pbtxt says: the
input and output names, the ONNX Runtime threads (intra_op_thread_count,
inter_op_thread_count) and dynamic batching: the requests of one `execute` are one
ONNX Runtime call.
"""

import json
import os
import sys

# The backend's stub embeds an interpreter that ignores PYTHONPATH, though the variable
# reaches it: the server's environment names where onnxruntime is installed this way.
for _path in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
    if _path and _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


def check_shape(tensor: dict, onnx_tensors: list, what: str) -> None:
    """Refuse the model when config.pbtxt's tensor is not the ONNX model's (as Triton's
    onnxruntime backend does when it loads it): both shapes, batch dimension first."""
    config_shape = [-1, *(int(d) for d in tensor["dims"])]
    for onnx in onnx_tensors:
        if onnx.name == tensor["name"]:
            model_shape = [d if isinstance(d, int) else -1 for d in onnx.shape]
            if model_shape != config_shape:
                raise pb_utils.TritonModelException(
                    f"{what} '{onnx.name}': model.onnx has shape {shape(model_shape)}, "
                    f"config.pbtxt {shape(config_shape)}"
                )
            return
    names = ", ".join(t.name for t in onnx_tensors)
    raise pb_utils.TritonModelException(
        f"config.pbtxt names {what} '{tensor['name']}', model.onnx has {names}"
    )


def shape(dims: list) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_thread_count", "1"))
        options.inter_op_num_threads = int(parameters.get("inter_op_thread_count", "1"))
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = onnxruntime.InferenceSession(
            path, options, providers=["CPUExecutionProvider"]
        )
        (tensor_in,), (tensor_out,) = config["input"], config["output"]
        check_shape(tensor_in, self.session.get_inputs(), "input")
        check_shape(tensor_out, self.session.get_outputs(), "output")
        self.input_name, self.output_name = tensor_in["name"], tensor_out["name"]

    def execute(self, requests: list) -> list:
        batches = [
            pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            for request in requests
        ]
        feed = {self.input_name: np.concatenate(batches)}
        try:
            (outputs,) = self.session.run([self.output_name], feed)
        except Exception as e:
            # Raised, not answered: every request of the batch gets ONNX Runtime's message and
            # counts as a backend failure in Triton's metrics (an error response would count
            # as a success), as with NVIDIA's onnxruntime backend.
            raise pb_utils.TritonModelException(f"onnx runtime error: {e}") from None
        ends = np.cumsum([len(batch) for batch in batches])[:-1]
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, part)])
            for part in np.split(outputs, ends)
        ]
