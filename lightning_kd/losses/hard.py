"""The hard (ground-truth) term of distillation: cross-entropy or MSE, over labeled positions only.

Unlabeled inputs (Hinton's transfer set) carry ``ignore_index`` (class targets) or NaN
(regression targets); they count in the soft term but not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.losses._reduction import masked_mean

IGNORE_INDEX = -100


def check_class_targets(outputs: Tensor, targets: Tensor, setting: str, *, check_values: bool = True) -> None:
    """Raise a clear error when class-index targets do not fit ``outputs`` of shape (..., C)."""
    num_classes = outputs.shape[-1]
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(
            f"Expected integer class indices as targets for {setting}, but got dtype {targets.dtype}. "
            "Use HardMSELoss for real-valued (regression) targets."
        )
    if targets.shape != outputs.shape[:-1]:
        raise ValueError(
            f"Expected targets of shape {tuple(outputs.shape[:-1])} for outputs of shape "
            f"{tuple(outputs.shape)} ({setting}), but got {tuple(targets.shape)}."
        )
    if check_values and targets.numel():  # one host read: callers on an accelerator check without a sync instead
        valid = targets[targets != IGNORE_INDEX]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
            raise ValueError(
                f"Expected class targets in [0, {num_classes}) or {IGNORE_INDEX} (unlabeled) for outputs "
                f"with {num_classes} classes ({setting}), but got values in "
                f"[{int(valid.min())}, {int(valid.max())}]. Do the labels match the model's number of classes?"
            )


def cross_entropy_loss(outputs: Tensor, targets: Tensor, *, check_values: bool = True) -> Tensor:
    """Cross-entropy over labeled positions (``targets != -100``), float32, (N, C) or (B, S, C).

    A batch without any label gives a graph-connected zero.
    """
    check_class_targets(outputs, targets, "the cross-entropy", check_values=check_values)
    targets = _ignore_invalid(targets, outputs.shape[-1])
    per_position = F.cross_entropy(
        outputs.float().reshape(-1, outputs.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).reshape(targets.shape)
    return masked_mean(per_position, targets != IGNORE_INDEX, outputs)


def mse_loss(outputs: Tensor, targets: Tensor, *, check_values: bool = True) -> Tensor:
    """MSE against one-hot class targets (integer targets) or raw regression targets (float).

    Integer targets of shape ``outputs.shape[:-1]`` become one-hot vectors (the original design's
    choice for classification); float targets must have the outputs' shape, NaN rows are unlabeled.
    """
    if targets.is_floating_point():
        if targets.shape != outputs.shape:
            raise ValueError(
                f"Expected regression targets of shape {tuple(outputs.shape)} (the outputs' shape) for "
                f"the MSE, but got {tuple(targets.shape)}."
            )
        labeled = ~torch.isnan(targets).any(dim=-1)
        diff = outputs.float() - torch.nan_to_num(targets.float())
    else:
        check_class_targets(outputs, targets, "the MSE to one-hot targets", check_values=check_values)
        targets = _ignore_invalid(targets, outputs.shape[-1])
        labeled = targets != IGNORE_INDEX
        one_hot = F.one_hot(targets.clamp(min=0), outputs.shape[-1]).float()
        diff = outputs.float() - one_hot
    return masked_mean(diff.pow(2).mean(dim=-1), labeled, outputs)


def invalid_targets(targets: Tensor, num_classes: int) -> Tensor:
    """Bool mask of class targets outside ``[0, num_classes)`` that are not the ignore index ``-100``."""
    return (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= num_classes))


def _ignore_invalid(targets: Tensor, num_classes: int) -> Tensor:
    """Out-of-range targets as ``-100``: with ``check_values=False`` they were (or will be) refused by the
    caller's own check, and must not crash a CUDA kernel with a device-side assert before it, nor become
    class 0 in a one-hot."""
    return targets.masked_fill(invalid_targets(targets, num_classes), IGNORE_INDEX)


def class_per_position(teacher_logits: Tensor, targets: Tensor | None, loss: str = "the soft loss") -> Tensor:
    """A class for every position, for a loss that needs one (DKD): the label, or the teacher's top-1 where
    the position is unlabeled (``-100``, or no targets at all: a transfer set).

    Raises:
        TypeError: for real-valued (regression) targets.
    """
    top1 = teacher_logits.argmax(dim=-1)
    if targets is None:
        return top1
    if targets.is_floating_point():
        raise TypeError(f"{loss} needs class targets, but got real-valued (regression) targets.")
    return torch.where(targets == IGNORE_INDEX, top1, targets)


class HardCrossEntropyLoss(nn.Module):
    """The hard term as a module: :func:`cross_entropy_loss` over labeled positions (``-100`` = unlabeled).

    ``forward(outputs, targets, *, check_values=True)``; :class:`~lightning_kd.DistillationModule`
    passes ``check_values=False`` because it checks every batch's targets itself without a device sync.

    Example::

        >>> round(HardCrossEntropyLoss()(torch.tensor([[0.0, 0.0]]), torch.tensor([1])).item(), 4)
        0.6931
    """

    def forward(self, outputs: Tensor, targets: Tensor, *, check_values: bool = True) -> Tensor:
        return cross_entropy_loss(outputs, targets, check_values=check_values)


class HardMSELoss(nn.Module):
    """The hard term as a module: :func:`mse_loss`, against one-hot class targets or regression targets (NaN rows unlabeled).

    Example::

        >>> round(HardMSELoss()(torch.tensor([[1.0, 0.0]]), torch.tensor([0])).item(), 4)
        0.0
    """

    def forward(self, outputs: Tensor, targets: Tensor, *, check_values: bool = True) -> Tensor:
        return mse_loss(outputs, targets, check_values=check_values)
