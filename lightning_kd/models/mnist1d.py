"""Teacher and student for MNIST-1D (Greydanus, "Scaling down Deep Learning", 2020).

A sample is a length-40 signal. Both models take ``(B, 40)`` or ``(B, 1, 40)`` float input
and return logits ``(B, num_classes)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch  # noqa: F401  (the doctests use it)
from torch import Tensor, nn

from lightning_kd.models.registry import register_model

__all__ = ["CNN1D", "MLP"]


def _check_signal(x: Tensor, length: int) -> None:
    if x.ndim == 2 and x.shape[1] == length:
        return
    if x.ndim == 3 and x.shape[1] == 1 and x.shape[2] == length:
        return
    raise ValueError(
        f"Expected input of shape (B, {length}) or (B, 1, {length}), but got {tuple(x.shape)}"
    )


def _conv_block(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    # No conv bias: the BatchNorm shift that follows makes it redundant.
    return nn.Sequential(
        nn.Conv1d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        ),
        nn.BatchNorm1d(out_channels),
        nn.ReLU(inplace=True),
    )


@register_model("cnn1d")
class CNN1D(nn.Module):
    """A small 1-D CNN, the MNIST-1D teacher: four Conv-BN-ReLU blocks and a linear head.

    Blocks (``c = channels``): ``1->c`` (k5, s1), ``c->c`` (k3, s2), ``c->2c`` (k3, s2),
    ``2c->2c`` (k3, s2); the three strides shrink length 40 to 5. With the defaults it has
    25,258 parameters.

    Submodules, for feature hooks: ``features.0`` ... ``features.3`` (the blocks) and
    ``classifier``.

    Args:
        num_classes: number of output logits.
        channels: width ``c`` of the first two blocks; the last two have ``2c``.
        in_length: length of the input signal.

    Shape:
        - Input: ``(B, in_length)`` or ``(B, 1, in_length)``.
        - Output: ``(B, num_classes)``.

    Raises:
        ValueError: if ``num_classes``, ``channels`` or ``in_length`` is not positive, or, in
            ``forward``, if the input has another shape.

    Example::

        >>> model = CNN1D()
        >>> sum(p.numel() for p in model.parameters())
        25258
        >>> model(torch.randn(4, 40)).shape
        torch.Size([4, 10])
    """

    def __init__(self, num_classes: int = 10, channels: int = 32, in_length: int = 40) -> None:
        super().__init__()
        for arg, value in (("num_classes", num_classes), ("channels", channels), ("in_length", in_length)):
            if value < 1:
                raise ValueError(f"Expected `{arg}` to be >= 1, but got {value}")
        self.in_length = in_length
        self.features = nn.Sequential(
            _conv_block(1, channels, kernel_size=5, stride=1),
            _conv_block(channels, channels, kernel_size=3, stride=2),
            _conv_block(channels, 2 * channels, kernel_size=3, stride=2),
            _conv_block(2 * channels, 2 * channels, kernel_size=3, stride=2),
        )
        out_length = in_length
        for _ in range(3):  # each stride-2, k3, p1 conv maps L to ceil(L / 2)
            out_length = (out_length - 1) // 2 + 1
        self.classifier = nn.Linear(2 * channels * out_length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        _check_signal(x, self.in_length)
        if x.ndim == 2:
            x = x.unsqueeze(1)  # (B, 1, L)
        x = self.features(x)  # (B, 2c, L_out)
        return self.classifier(x.flatten(1))  # (B, num_classes)


@register_model("mlp")
class MLP(nn.Module):
    """A fully connected network, the MNIST-1D student: ``Linear+ReLU`` hidden layers, linear head.

    With the defaults (40 -> 100 -> 100 -> 10) it has 15,210 parameters.

    Submodules, for feature hooks: ``hidden.0``, ``hidden.1``, ... (each ``Linear+ReLU``) and
    ``classifier``.

    Args:
        in_features: length of the input signal.
        hidden: widths of the hidden layers; empty gives a linear model.
        num_classes: number of output logits.

    Shape:
        - Input: ``(B, in_features)`` or ``(B, 1, in_features)``.
        - Output: ``(B, num_classes)``.

    Raises:
        ValueError: if ``in_features``, ``num_classes`` or a ``hidden`` width is not positive, or,
            in ``forward``, if the input has another shape.

    Example::

        >>> model = MLP()
        >>> sum(p.numel() for p in model.parameters())
        15210
        >>> model(torch.randn(4, 1, 40)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self, in_features: int = 40, hidden: Sequence[int] = (100, 100), num_classes: int = 10
    ) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"Expected `in_features` to be >= 1, but got {in_features}")
        if num_classes < 1:
            raise ValueError(f"Expected `num_classes` to be >= 1, but got {num_classes}")
        hidden = tuple(hidden)  # Hydra passes ListConfig
        if any(width < 1 for width in hidden):
            raise ValueError(f"Expected every `hidden` width to be >= 1, but got {hidden}")
        self.in_features = in_features
        widths = (in_features, *hidden)
        self.hidden = nn.Sequential(
            *(nn.Sequential(nn.Linear(a, b), nn.ReLU(inplace=True)) for a, b in zip(widths, widths[1:]))
        )
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        _check_signal(x, self.in_features)
        return self.classifier(self.hidden(x.flatten(1)))  # (B, num_classes)
