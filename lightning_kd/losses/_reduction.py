"""The pieces every loss shares: float32 log-probabilities, mask checks and the masked mean.

Plain torch, no Lightning: a user can call the losses in their own training loop.
"""

from __future__ import annotations

import torch
from torch import Tensor


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Float32 ``log_softmax(logits / T)`` over the last dimension.

    Logits are upcast *before* the division: all-bf16 KL can be off by more than 30 %
    (see ``KD_FACTS.md``), and CPU bf16 autocast keeps ``log_softmax`` in bf16 otherwise.
    """
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def check_pair(student: Tensor, teacher: Tensor) -> None:
    """Raise a clear error when student and teacher outputs cannot be compared."""
    if student.shape != teacher.shape:
        raise ValueError(
            "Expected student and teacher outputs of the same shape, but got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}. Both models must predict "
            "the same classes (e.g. the same `num_classes`) on the same inputs."
        )
    if student.dim() < 2:
        raise ValueError(
            f"Expected logits of shape (N, C) or (B, S, C), but got shape {tuple(student.shape)}."
        )


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"Expected `temperature` to be > 0, but got {temperature}.")


def masked_mean(per_position: Tensor, mask: Tensor | None, like: Tensor) -> Tensor:
    """Mean of ``per_position`` over the positions where ``mask`` is True.

    Args:
        per_position: a loss per position, shape ``logits.shape[:-1]``.
        mask: bool tensor of the same shape (True = counts), or None for all positions.
        like: a tensor of the graph (the student logits); a batch with no valid position gives
            ``0 * like.sum()``, a zero that is still connected to the graph, never NaN.
    """
    if mask is None:
        return per_position.mean()
    if mask.shape != per_position.shape:
        raise ValueError(
            f"Expected `mask` of shape {tuple(per_position.shape)} (the logits without their last "
            f"dimension), but got {tuple(mask.shape)}."
        )
    mask = mask.to(torch.bool)
    count = mask.sum()
    total = torch.where(mask, per_position, torch.zeros_like(per_position)).sum()
    # clamp keeps the all-masked case finite; the added zero keeps it on the student's graph
    return total / count.clamp(min=1) + 0.0 * like.float().sum()
