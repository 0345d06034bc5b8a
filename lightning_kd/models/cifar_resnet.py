"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", 2016, Sec. 4.2).

The sizes follow the teacher/student zoo of Tian et al., "Contrastive Representation
Distillation" (ICLR 2020, RepDistiller): ``resnet20``/``resnet56`` with stage widths
16-16-32-64 and the 4x wider ``resnet8x4``/``resnet32x4`` with 32-64-128-256.
Depth ``6n + 2``: a 3x3 stem conv, three stages of ``n`` BasicBlocks, global pooling, a linear
head. Written independently; parameter counts match the published ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_kd.models.registry import register_model

__all__ = ["BasicBlock", "CifarResNet", "resnet8x4", "resnet20", "resnet32x4", "resnet56"]


class BasicBlock(nn.Module):
    """Two 3x3 Conv-BN layers with an identity (or 1x1 Conv-BN projection) shortcut.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: stride of the first conv (and of the projection).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet for 32x32 images: stem, three stages of BasicBlocks, global average pool, linear.

    Submodules, for feature hooks: ``conv1``/``bn1`` (stem), ``layer1``, ``layer2``, ``layer3``
    (stages, at 32x32, 16x16 and 8x8 for a 32x32 input), ``avgpool`` and ``fc``.

    Args:
        depth: total depth ``6n + 2`` (``n`` blocks per stage), e.g. 8, 20, 32, 56.
        widths: four channel counts: the stem, then the three stages.
        num_classes: number of output logits.

    Shape:
        - Input: ``(B, 3, H, W)``, 32x32 for CIFAR (any size works: the pool is adaptive).
        - Output: ``(B, num_classes)``.

    Raises:
        ValueError: if ``depth`` is not of the form ``6n + 2`` with ``n >= 1``, or ``widths``
            does not have four entries.

    Example::

        >>> import torch
        >>> model = CifarResNet(depth=20, widths=(16, 16, 32, 64), num_classes=10)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 100) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"Expected `depth` to be 6n + 2 with n >= 1 (8, 14, 20, ...), but got {depth}")
        widths = tuple(widths)
        if len(widths) != 4:
            raise ValueError(f"Expected `widths` to have 4 entries (stem, 3 stages), but got {widths}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(widths[0], widths[1], blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(widths[1], widths[2], blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(widths[2], widths[3], blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # 8x8 -> 1x1 on CIFAR, as the original AvgPool2d(8)
        self.fc = nn.Linear(widths[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, w0, 32, 32)
        x = self.layer1(x)  # (B, w1, 32, 32)
        x = self.layer2(x)  # (B, w2, 16, 16)
        x = self.layer3(x)  # (B, w3, 8, 8)
        return self.fc(self.avgpool(x).flatten(1))  # (B, num_classes)


_NARROW = (16, 16, 32, 64)
_WIDE_X4 = (32, 64, 128, 256)


@register_model("resnet20")
def resnet20(num_classes: int = 100) -> CifarResNet:
    """ResNet-20 for CIFAR (0.28 M parameters with 100 classes)."""
    return CifarResNet(20, _NARROW, num_classes)


@register_model("resnet56")
def resnet56(num_classes: int = 100) -> CifarResNet:
    """ResNet-56 for CIFAR (0.86 M parameters with 100 classes)."""
    return CifarResNet(56, _NARROW, num_classes)


@register_model("resnet8x4")
def resnet8x4(num_classes: int = 100) -> CifarResNet:
    """ResNet-8 with 4x wider stages, a common student (1.23 M parameters with 100 classes)."""
    return CifarResNet(8, _WIDE_X4, num_classes)


@register_model("resnet32x4")
def resnet32x4(num_classes: int = 100) -> CifarResNet:
    """ResNet-32 with 4x wider stages, a common teacher (7.43 M parameters with 100 classes)."""
    return CifarResNet(32, _WIDE_X4, num_classes)
