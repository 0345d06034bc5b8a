"""Wide ResNets for CIFAR (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

``wrn_40_2`` and ``wrn_16_2`` are the teacher/student pair of Tian et al., "Contrastive
Representation Distillation" (ICLR 2020, RepDistiller). Pre-activation blocks, depth
``6n + 4``, stage widths ``16k, 32k, 64k`` for widen factor ``k``. Written independently;
parameter counts match the published ones.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_kd.models.registry import register_model

__all__ = ["WideBasicBlock", "WideResNet", "wrn_16_2", "wrn_40_2"]


class WideBasicBlock(nn.Module):
    """Pre-activation block: ``BN-ReLU-Conv3x3-BN-ReLU-[Dropout]-Conv3x3`` plus a shortcut.

    When the shape changes, the shortcut is a 1x1 conv applied to the *activated* input (as in
    the original WRN code), so the first BN-ReLU is shared by both branches.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: stride of the first conv (and of the projection).
        dropout: dropout probability between the two convs.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu1(self.bn1(x))  # in place on BN's output, so `x` is kept intact
        identity = x if self.shortcut is None else self.shortcut(activated)
        out = self.relu2(self.bn2(self.conv1(activated)))
        out = self.conv2(self.dropout(out))
        return out + identity


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32x32 images.

    Submodules, for feature hooks: ``conv1`` (stem), ``block1``, ``block2``, ``block3``
    (stages, at 32x32, 16x16 and 8x8 for a 32x32 input), ``bn1`` (final BN, followed by ReLU),
    ``avgpool`` and ``fc``.

    Args:
        depth: total depth ``6n + 4`` (``n`` blocks per stage), e.g. 16, 28, 40.
        widen_factor: multiplier ``k`` of the stage widths ``16k, 32k, 64k``.
        num_classes: number of output logits.
        dropout: dropout probability inside each block.

    Shape:
        - Input: ``(B, 3, H, W)``, 32x32 for CIFAR (any size works: the pool is adaptive).
        - Output: ``(B, num_classes)``.

    Raises:
        ValueError: if ``depth`` is not of the form ``6n + 4`` with ``n >= 1``, ``widen_factor``
            is not positive, or ``dropout`` is outside ``[0, 1)``.

    Example::

        >>> import torch
        >>> model = WideResNet(depth=10, widen_factor=1, num_classes=10)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, dropout: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"Expected `depth` to be 6n + 4 with n >= 1 (10, 16, 22, ...), but got {depth}")
        if widen_factor < 1:
            raise ValueError(f"Expected `widen_factor` to be >= 1, but got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Expected `dropout` to be in [0, 1), but got {dropout}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = self._make_stage(widths[0], widths[1], n, stride=1, dropout=dropout)
        self.block2 = self._make_stage(widths[1], widths[2], n, stride=2, dropout=dropout)
        self.block3 = self._make_stage(widths[2], widths[3], n, stride=2, dropout=dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_stage(
        in_channels: int, out_channels: int, blocks: int, stride: int, dropout: float
    ) -> nn.Sequential:
        layers = [WideBasicBlock(in_channels, out_channels, stride, dropout)]
        layers += [WideBasicBlock(out_channels, out_channels, 1, dropout) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)  # (B, 16, 32, 32)
        x = self.block1(x)  # (B, 16k, 32, 32)
        x = self.block2(x)  # (B, 32k, 16, 16)
        x = self.block3(x)  # (B, 64k, 8, 8)
        x = self.relu(self.bn1(x))
        return self.fc(self.avgpool(x).flatten(1))  # (B, num_classes)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int = 100) -> WideResNet:
    """WRN-40-2, a common teacher (2.26 M parameters with 100 classes)."""
    return WideResNet(40, 2, num_classes)


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int = 100) -> WideResNet:
    """WRN-16-2, a common student (0.70 M parameters with 100 classes)."""
    return WideResNet(16, 2, num_classes)
