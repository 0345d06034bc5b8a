"""VGG with BatchNorm for CIFAR (Simonyan & Zisserman, "Very Deep Convolutional Networks", 2015).

The CIFAR variant of Tian et al., "Contrastive Representation Distillation" (ICLR 2020,
RepDistiller): five conv stages, max pooling after the first three, global average pooling and
a single ``Linear(512, num_classes)`` head. ``vgg13`` is the usual teacher, ``vgg8`` (one conv
per stage) the student. Written independently; parameter counts match the published ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.models.registry import register_model

__all__ = ["CifarVGG", "vgg8", "vgg13"]

# Output channels of each conv, stage by stage.
_STAGES: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _make_stage(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    # The last ReLU is applied in `forward`, so a hook on the stage sees pre-activation features.
    return nn.Sequential(*layers[:-1])


class CifarVGG(nn.Module):
    """VGG-BN for 32x32 images (64x64 also works, with an extra pool before the last stage).

    Submodules, for feature hooks: ``block0`` ... ``block4`` (the stages; their outputs are
    *pre*-activation, ReLU follows in ``forward``; at 32, 16, 8, 4, 4 pixels for a 32x32
    input), ``pool0`` ... ``pool4`` and ``classifier``.

    Args:
        stages: output channels of each conv, one tuple per stage (five stages).
        num_classes: number of output logits.

    Shape:
        - Input: ``(B, 3, 32, 32)`` (or ``(B, 3, 64, 64)``).
        - Output: ``(B, num_classes)``.

    Raises:
        ValueError: if ``stages`` does not have five non-empty stages.

    Example::

        >>> import torch
        >>> model = CifarVGG(((8,), (8,), (8,), (8,), (16,)), num_classes=10)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, stages: Sequence[Sequence[int]], num_classes: int = 100) -> None:
        super().__init__()
        stages = tuple(tuple(stage) for stage in stages)
        if len(stages) != 5 or not all(stages):
            raise ValueError(f"Expected `stages` to have 5 non-empty stages, but got {stages}")
        in_channels = 3
        for i, widths in enumerate(stages):
            setattr(self, f"block{i}", _make_stage(in_channels, widths))
            in_channels = widths[-1]
        self.pool0 = nn.MaxPool2d(2)
        self.pool1 = nn.MaxPool2d(2)
        self.pool2 = nn.MaxPool2d(2)
        self.pool3 = nn.MaxPool2d(2)  # only for 64x64 input, so that block4 always runs at 4x4
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[2]
        x = self.pool0(F.relu(self.block0(x)))  # (B, c0, 16, 16)
        x = self.pool1(F.relu(self.block1(x)))  # (B, c1, 8, 8)
        x = self.pool2(F.relu(self.block2(x)))  # (B, c2, 4, 4)
        x = F.relu(self.block3(x))  # (B, c3, 4, 4)
        if height == 64:
            x = self.pool3(x)
        x = self.pool4(F.relu(self.block4(x)))  # (B, c4, 1, 1)
        return self.classifier(x.flatten(1))  # (B, num_classes)


@register_model("vgg8")
def vgg8(num_classes: int = 100) -> CifarVGG:
    """VGG-8 with BatchNorm, a common student (3.96 M parameters with 100 classes)."""
    return CifarVGG(_STAGES["vgg8"], num_classes)


@register_model("vgg13")
def vgg13(num_classes: int = 100) -> CifarVGG:
    """VGG-13 with BatchNorm, a common teacher (9.46 M parameters with 100 classes)."""
    return CifarVGG(_STAGES["vgg13"], num_classes)
