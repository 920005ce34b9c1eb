"""config.pbtxt: what export writes for the model, and what pin writes for one server.


Export renders the model's config.pbtxt from its settings (the original deployment's
values by default). A server gets that config with its own instance groups, threads,
backend and one version (pod_config): settings of the server, not of the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from mnist_pipeline import settings
from mnist_pipeline.errors import UsageError

PLATFORM = "onnxruntime_onnx"
# Triton's python backend model that serves PLATFORM's model for a server without the
# onnxruntime backend, shipped in the package and placed beside model.onnx by pin.
PYTHON_MODEL_PATH = "python_backend/model.py"
PYTHON_MODEL_FILE = "model.py"
# export --instance-kind → config.pbtxt instance_group kind.
INSTANCE_KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}


@dataclass(frozen=True)
class TritonConfig(settings.Settings):
    """What config.pbtxt says; the defaults are the original deployment's values."""

    name: str = settings.MODEL_NAME.field()
    max_batch_size: int = settings.MAX_BATCH_SIZE.field()
    instance_count: int = settings.INSTANCE_COUNT.field()
    instance_kind: str = settings.INSTANCE_KIND.field()  # cpu or gpu
    preferred_batch_sizes: tuple[int, ...] = settings.PREFERRED_BATCH_SIZES.field()
    pinned_memory: bool = settings.PINNED_MEMORY.field()
    input_name: str = "input"
    input_dims: tuple[int, ...] = (1, 28, 28)
    output_name: str = "output"
    output_dims: tuple[int, ...] = (10,)
    # The CPUs the server gets (the chart's Triton CPU limit): shared out between the
    # instances as ONNX Runtime threads, so that concurrent batches do not oversubscribe.
    server_cpus: int = settings.SERVER_CPUS.field()

    @property
    def intra_op_threads(self) -> int:
        return max(1, self.server_cpus // self.instance_count)

    @property
    def triton_kind(self) -> str:
        return INSTANCE_KINDS[self.instance_kind]

    def check(self) -> None:
        too_big = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if too_big:
            raise UsageError(
                f"preferred batch sizes {too_big} are outside "
                f"1..max batch size {self.max_batch_size}"
            )


def render_config(cfg: TritonConfig) -> str:
    """config.pbtxt in protobuf text format (dims exclude the batch dimension)."""

    def dims(d: Sequence[int]) -> str:
        return ", ".join(str(x) for x in d)

    text = f"""name: "{cfg.name}"
platform: "{PLATFORM}"
max_batch_size: {cfg.max_batch_size}
input [
  {{
    name: "{cfg.input_name}"
    data_type: TYPE_FP32
    dims: [ {dims(cfg.input_dims)} ]
  }}
]
output [
  {{
    name: "{cfg.output_name}"
    data_type: TYPE_FP32
    dims: [ {dims(cfg.output_dims)} ]
  }}
]
instance_group [
  {{
    count: {cfg.instance_count}
    kind: {cfg.triton_kind}
  }}
]
"""
    if cfg.preferred_batch_sizes:
        text += f"""dynamic_batching {{
  preferred_batch_size: [ {dims(cfg.preferred_batch_sizes)} ]
}}
"""
    else:
        text += "dynamic_batching { }\n"
    if cfg.pinned_memory:
        text += """optimization {
  input_pinned_memory { enable: true }
  output_pinned_memory { enable: true }
}
"""
    # Read by Triton's onnxruntime backend; without them every instance starts one thread
    # per core of the node.
    text += f"""parameters {{
  key: "intra_op_thread_count"
  value {{ string_value: "{cfg.intra_op_threads}" }}
}}
parameters {{
  key: "inter_op_thread_count"
  value {{ string_value: "1" }}
}}
"""
    return text


def parse_config(text: str) -> Any:
    """Parse config.pbtxt with Triton's own ModelConfig message (from tritonclient)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def python_model_source() -> str:
    """The model.py of Triton's python backend that runs the model on ONNX Runtime."""
    return resources.files("mnist_pipeline").joinpath(PYTHON_MODEL_PATH).read_text()


def pod_config(config_text: str, cfg: TritonConfig, version: int, backend: str) -> str:
    """The repository's config.pbtxt with this server's backend, instance groups, threads
    and version; every other field (name, batching, tensors) as exported."""
    from google.protobuf import text_format

    config = parse_config(config_text)
    if backend == "python":
        config.platform = ""
        config.backend = "python"
    del config.instance_group[:]
    config.instance_group.add(count=cfg.instance_count, kind=cfg.triton_kind)
    config.parameters["intra_op_thread_count"].string_value = str(cfg.intra_op_threads)
    config.parameters["inter_op_thread_count"].string_value = "1"
    config.version_policy.specific.versions[:] = [version]
    return str(text_format.MessageToString(config))


def config_damage(text: bytes | None, where: str) -> str | None:
    """Why a config.pbtxt cannot be served (None: it parses, or there is none yet)."""
    from google.protobuf import text_format

    if text is None:
        return None
    try:
        parse_config(text.decode())
    except (UnicodeDecodeError, text_format.ParseError) as e:
        return f"{where} does not parse: {' '.join(str(e).split())}"
    return None
