"""Static INT8 quantisation of the exported fp32 ONNX model (`export --precision int8`).

onnxruntime's quantize_static rewrites the optimised fp32 export in QDQ form: every Conv
and Gemm gets per-channel int8 weights and uint8 activations between QuantizeLinear /
DequantizeLinear pairs, standard ONNX ops (opset and IR version unchanged), which
ONNX Runtime fuses into integer kernels when it loads the model, Triton's 1.19.2 included.
Activation ranges come from running the fp32 model on a fixed set of TRAINING images
(MinMax): calibrating on test images would tune the model to the images it is then
measured on. The set is fixed, so the same checkpoint always gives the same model.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from mnist_pipeline import data
from mnist_pipeline.errors import PipelineFailure

# 512 images: activation ranges stop moving well before that (measured on a 93% model:
# 16 images already gave the same test accuracy), and calibration takes a few seconds.
CALIBRATION_IMAGES = 512
# Every 117th of the 60000 training images from the first: spread over the whole split
# (whose order mixes the classes), the same on every export.
CALIBRATION_STRIDE = 60_000 // CALIBRATION_IMAGES
CALIBRATION_SOURCE = (
    f"MNIST train, every {CALIBRATION_STRIDE}th image from the first, MinMax activation ranges"
)
CALIBRATION_BATCH = 64
# A sanity check, not the gate: a model right ~93% of the time has near-tied logits that
# int8 rounding flips without changing its accuracy (3 of 256 for the 5000-image model).
# The accuracy on all 10 000 test images is what refuses a lossy quantisation.
MIN_TOP1_AGREEMENT = 0.95


def calibration_images(storage: Path, count: int = CALIBRATION_IMAGES) -> np.ndarray:
    """The normalised training images the activation ranges are measured on."""
    images, _ = data.load(storage, "train")
    stride = max(1, len(images) // count)
    return data.normalize(images[::stride][:count])


class _Batches(CalibrationDataReader):
    """The calibration images in batches, as quantize_static reads them."""

    def __init__(self, images: np.ndarray) -> None:
        batches = range(0, len(images), CALIBRATION_BATCH)
        self._feeds = iter([{"input": images[i : i + CALIBRATION_BATCH]} for i in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """quantize_static warns on the root logger to run its pre-processing (shape inference
    and graph optimisation): the export is optimised already, the advice only adds noise."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize(fp32_model: bytes, calibration: np.ndarray) -> bytes:
    """The QDQ int8 model of `fp32_model`, calibrated on `calibration`."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="mnist-int8-") as tmp, _quiet_quantizer():
        out = Path(tmp) / "model.onnx"
        try:
            quantize_static(
                onnx.load_from_string(fp32_model),
                out,
                _Batches(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QUInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        except Exception as e:  # whatever the quantizer raises, the stage reports one failure
            raise PipelineFailure(f"INT8 quantisation failed: {type(e).__name__}: {e}") from e
        return out.read_bytes()


def check_agreement(int8_model: bytes, fp32_model: bytes, inputs: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement of the int8 model with its fp32 export on `inputs`, and the largest
    logit difference; raises PipelineFailure below MIN_TOP1_AGREEMENT. The fp32 parity
    check (1e-4 against PyTorch) cannot hold for int8 logits."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    batch = np.ascontiguousarray(inputs, dtype=np.float32)
    logits = [
        ort.InferenceSession(m, options, providers=["CPUExecutionProvider"]).run(
            ["output"], {"input": batch}
        )[0]
        for m in (int8_model, fp32_model)
    ]
    agreement = float(np.mean(logits[0].argmax(1) == logits[1].argmax(1)))
    max_diff = float(np.max(np.abs(logits[0] - logits[1])))
    if not agreement >= MIN_TOP1_AGREEMENT:
        raise PipelineFailure(
            f"int8 parity check failed on {len(inputs)} test images: the int8 model agrees "
            f"with the fp32 export on {agreement:.1%} of predictions (at least "
            f"{MIN_TOP1_AGREEMENT:.0%} needed), max logit difference {max_diff:.3g}"
        )
    return {
        "reference": "the fp32 ONNX export of the same checkpoint",
        "samples": len(inputs),
        "top1_agreement": agreement,
        "min_top1_agreement": MIN_TOP1_AGREEMENT,
        "max_abs_logit_diff": max_diff,
    }
