"""ResNet-18 for 1-channel 28x28 digits.

The architecture is torchvision's resnet18 (BasicBlock, [2, 2, 2, 2], 7x7/2 stem and
max-pool) with the same parameter names, so state_dicts move between the two. It is
defined here because torchvision's wheel on PyPI is a CUDA build that does not import
next to CPU torch.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

ARCH = "resnet18"


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
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
    model = build(int(payload["in_channels"]), int(payload["num_classes"]))
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
    return text.splitlines()[0] if text else type(e).__name__
