"""ResNet-18 for 1-channel 28x28 digits.

The architecture is torchvision's resnet18 (BasicBlock, [2, 2, 2, 2], 7x7/2 stem and
max-pool) with the same parameter names, so state_dicts move between the two. It is
defined here because torchvision's wheel on PyPI is a CUDA build that does not import
next to CPU torch.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ARCH = "resnet18"
# For each output pixel, the kernel tap (row, column) joining it to each input pixel.
Taps = tuple[tuple[tuple[int, int], ...], ...]


@functools.cache
def all_seeing_taps(
    height: int, width: int, kernel: tuple[int, ...], stride: tuple[int, ...], padding: Any
) -> tuple[Taps, int, int] | None:
    """For a convolution where every output pixel sees every input pixel: for each output
    pixel, the kernel tap (row, column) that joins it to each input pixel, and the
    output's size. None otherwise."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    pairs = [
        (iy - oy * sh + ph, ix - ox * sw + pw)
        for oy in range(out_h)
        for ox in range(out_w)
        for iy in range(height)
        for ix in range(width)
    ]
    if not all(0 <= ky < kh and 0 <= kx < kw for ky, kx in pairs):
        return None
    per_input = height * width
    taps = tuple(tuple(pairs[i : i + per_input]) for i in range(0, len(pairs), per_input))
    return taps, out_h, out_w


class _AllSeeingConvolution(torch.autograd.Function):
    """A convolution whose every output pixel sees every input pixel, as one matrix
    product: rows (output pixel, output channel), columns (input pixel, input channel).

    Its backward pass writes each block of the dense weight's gradient into the tap it came
    from, in a fixed order: autograd through slices of the kernel would allocate, zero and
    add a kernel-sized gradient per slice (a sixth of the step), and a gather adds in no
    fixed order (runs would no longer be bitwise reproducible, nor resume to the same model).
    """

    @staticmethod
    def forward(ctx: Any, pixels: torch.Tensor, weight: torch.Tensor, taps: Taps) -> torch.Tensor:
        dense = torch.cat([torch.cat([weight[:, :, ky, kx] for ky, kx in row], 1) for row in taps])
        ctx.save_for_backward(pixels, dense, weight)
        ctx.taps = taps
        return F.linear(pixels, dense)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, None]:
        pixels, dense, weight = ctx.saved_tensors
        out_channels, in_channels = weight.shape[:2]
        grad_pixels = grad @ dense if ctx.needs_input_grad[0] else None
        grad_dense = grad.t() @ pixels
        # In the weight's own memory format: a gradient laid out otherwise is copied into
        # it, a transposing copy that cost as much as the product.
        grad_weight = torch.zeros_like(weight)
        for p_out, row in enumerate(ctx.taps):
            rows = slice(p_out * out_channels, (p_out + 1) * out_channels)
            for p_in, (ky, kx) in enumerate(row):
                columns = slice(p_in * in_channels, (p_in + 1) * in_channels)
                grad_weight[:, :, ky, kx] += grad_dense[rows, columns]
        return grad_pixels, grad_weight, None


class Conv2d(nn.Conv2d):
    """nn.Conv2d that trains its tiniest feature maps as one matrix product.

    On 28x28 digits ResNet-18's last stages see 2x2 and 1x1 maps, where most of a 3x3
    kernel's taps fall on zero padding. oneDNN computes them anyway, and its backward pass
    on such maps is slow. When every output pixel sees every input pixel the convolution
    is exactly a dense layer whose weight is made of the kernel's taps, and the matrix
    product does only the arithmetic that matters (docs/BENCHMARKS.md: the training step
    is about 1.3x faster on a 2-core CPU). Same parameters and results, up to float
    rounding; inference (and so the ONNX export) keeps the plain convolution.
    """

    # False: the plain convolution in training too (the benchmark measures both).
    tiny_maps_as_matmul = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = None
        plain = self.bias is not None or self.groups != 1 or self.dilation != (1, 1)
        if self.training and self.tiny_maps_as_matmul and not plain:
            h, w = x.shape[-2:]
            plan = all_seeing_taps(h, w, self.kernel_size, self.stride, self.padding)
        if plan is None:
            return super().forward(x)
        taps, out_h, out_w = plan
        # (pixel, channel) order: channels-last tensors are laid out so, nothing is copied.
        pixels = x.permute(0, 2, 3, 1).reshape(len(x), -1)
        out = _AllSeeingConvolution.apply(pixels, self.weight, taps)
        return out.view(len(x), out_h, out_w, -1).permute(0, 3, 1, 2)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

        # torchvision's initialisation, so a model trained here behaves like one trained there.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build(in_channels: int = 1, num_classes: int = 10) -> ResNet18:
    return ResNet18(in_channels, num_classes)


def checkpoint_payload(model: nn.Module, **info: Any) -> dict[str, Any]:
    """What model.pth holds: weights plus what rebuilds the model, all loadable with
    torch.load(weights_only=True)."""
    return {
        "arch": ARCH,
        "in_channels": model.conv1.in_channels,  # type: ignore[union-attr]
        "num_classes": model.fc.out_features,  # type: ignore[union-attr]
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **info,
    }


def from_checkpoint(payload: dict[str, Any]) -> ResNet18:
    """Rebuild the model from a model.pth payload; raises ValueError if it is not ours."""
    if not isinstance(payload, dict) or payload.get("arch") != ARCH or "state_dict" not in payload:
        raise ValueError(
            f"not a {ARCH} checkpoint of this project (keys: {sorted(payload)[:8]})"
            if isinstance(payload, dict)
            else "not a checkpoint dictionary"
        )
    channels, classes = payload.get("in_channels"), payload.get("num_classes")
    if not (type(channels) is int and type(classes) is int and channels > 0 and classes > 0):
        raise ValueError(
            f"in_channels and num_classes must be positive integers "
            f"(found {channels!r} and {classes!r})"
        )
    model = build(channels, classes)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"weights do not fit {ARCH}: {str(e).splitlines()[0]}") from e
    return model.eval()


def weights_sha256(model: nn.Module) -> str:
    """A digest of the weights alone (names, shapes, values), independent of how the file
    holding them was written: two checkpoints of the same model give the same digest."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def load_error(e: Exception) -> str:
    """Why a weights-only torch.load failed, in one line and without torch's advice to
    retry with weights_only=False: that would run whatever code the file carries."""
    text = str(e).strip()
    if "weights_only" in text or "Weights only load failed" in text:
        # torch's explanation ends with the reason after "WeightsUnpickler error:".
        reason = text.rpartition("WeightsUnpickler error:")[2].strip().splitlines()
        detail = reason[0] if reason and "WeightsUnpickler error:" in text else ""
        return (
            "not a weights-only PyTorch checkpoint"
            + (f" ({detail})" if detail else "")
            + "; it is refused, never loaded unsafely"
        )
    # Bytes that are no checkpoint at all make torch's legacy unpickler fail with whatever
    # it tripped over (KeyError: 101, list index out of range, EOFError): none names the cause.
    if isinstance(e, KeyError | IndexError | EOFError) or type(e).__name__ == "UnpicklingError":
        return "not a PyTorch checkpoint (torch.save writes a zip archive; this file is not one)"
    return text.splitlines()[0] if text else type(e).__name__
