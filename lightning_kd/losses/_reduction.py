"""The pieces every loss shares: float32 log-probabilities, the KL sum, checks and the masked mean.

Plain torch, no Lightning: a user can call the losses in their own training loop.
"""

from __future__ import annotations

import torch
from torch import Tensor


Temperature = float | Tensor  # a Tensor for a learned temperature (CTKD), a 0-d or broadcastable one


def standardize_logits(logits: Tensor) -> Tensor:
    r"""Z-score each logit vector over its classes, in float32 (Sun et al., "Logit Standardization
    in Knowledge Distillation", CVPR 2024): :math:`(z - \bar z) / (\sigma(z) + 10^{-7})`, with the
    unbiased standard deviation as in the paper's code. The student then has to match the shape of
    the teacher's logits, not their scale.
    """
    z = logits.float()
    return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + 1e-7)


def log_probs(logits: Tensor, temperature: Temperature = 1.0, *, standardize: bool = False) -> Tensor:
    """Float32 ``log_softmax(logits / T)`` over the last dimension (of the z-scored logits with ``standardize``).

    Logits are upcast *before* the division: all-bf16 KL can be off by more than 30 %
    (see ``KD_FACTS.md``), and CPU bf16 autocast keeps ``log_softmax`` in bf16 otherwise.
    Every logit loss goes through this one function.
    """
    z = standardize_logits(logits) if standardize else logits.float()
    return torch.log_softmax(z / temperature, dim=-1)


def kl_sum(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)`` over the last dimension, from log-probabilities.

    Classes with ``p_c = 0`` (masked ``-inf`` logits) contribute exactly zero, with finite gradients
    on both sides, instead of ``0 · (−inf) = NaN``.
    """
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(p))
    return (p * diff).sum(dim=-1)


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


def check_temperature(temperature: Temperature) -> None:
    if isinstance(temperature, Tensor):
        return  # a learned temperature is kept > 0 by its parametrisation; checking would sync the device
    if not temperature > 0:
        raise ValueError(f"Expected `temperature` to be > 0, but got {temperature}.")


def check_mask(mask: Tensor, shape: torch.Size) -> None:
    """Raise a clear error when ``mask`` does not have ``shape`` (the logits without their last dimension)."""
    if mask.shape != shape:
        raise ValueError(
            f"Expected `mask` of shape {tuple(shape)} (the logits without their last dimension), but got {tuple(mask.shape)}."
        )


def log_prob_pair(
    student_logits: Tensor, teacher_logits: Tensor, temperature: Temperature, standardize: bool
) -> tuple[Tensor, Tensor]:
    """Checked, float32 ``(log p_s, log p_t)`` at temperature ``T``: the start of every full-logit loss."""
    check_pair(student_logits, teacher_logits)
    check_temperature(temperature)
    return (
        log_probs(student_logits, temperature, standardize=standardize),
        log_probs(teacher_logits, temperature, standardize=standardize),
    )


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
    check_mask(mask, per_position.shape)
    mask = mask.to(torch.bool)
    count = mask.sum()
    total = torch.where(mask, per_position, torch.zeros_like(per_position)).sum()
    # clamp keeps the all-masked case finite; the added zero keeps it on the student's graph
    return total / count.clamp(min=1) + 0.0 * like.float().sum()


def scale_by_temperature(loss: Tensor, temperature: Temperature, enabled: bool) -> Tensor:
    """``T² · loss`` (Hinton et al.: keeps the gradient scale independent of ``T``) when ``enabled``."""
    return loss * (temperature**2) if enabled else loss
