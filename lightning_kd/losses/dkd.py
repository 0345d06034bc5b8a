r"""Decoupled knowledge distillation (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022).

KD's KL splits into a binary part on the target class and a part on the other classes:

.. math::
    \mathrm{KL}(p^t \| p^s) = \underbrace{\mathrm{KL}(b^t \| b^s)}_{\text{TCKD}}
        + (1 - p^t_y)\,\underbrace{\mathrm{KL}(\hat p^t \| \hat p^s)}_{\text{NCKD}}

with :math:`b = (p_y, 1 - p_y)` and :math:`\hat p` the distribution renormalised over the
non-target classes. DKD weights the two freely, :math:`\alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD}`,
removing the :math:`1 - p^t_y` factor that suppresses NCKD exactly when the teacher is confident.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_kd.losses._reduction import (
    Temperature,
    check_mask,
    check_weight,
    empty_safe_logsumexp,
    kl_sum,
    log_prob_pair,
    masked_mean,
    scale_by_temperature,
)
from lightning_kd.losses.base import LogitLoss
from lightning_kd.losses.ctkd import LearnableTemperature
from lightning_kd.losses.hard import IGNORE_INDEX, check_class_targets


def _split(log_p: Tensor, is_target: Tensor) -> tuple[Tensor, Tensor]:
    """``(log b, log p̂)``: the binary target/other log-probabilities ``(..., 2)`` and the non-target
    classes renormalised ``(..., C)`` (``-inf`` at the target), all in log space.

    Where no class but the target has mass (every other class masked with ``-inf``), ``p̂`` stays
    all ``-inf`` instead of ``-inf − (−inf) = NaN``, and its KL is 0.
    """
    log_target = empty_safe_logsumexp(log_p.masked_fill(~is_target, -math.inf))  # log p_y
    others = log_p.masked_fill(is_target, -math.inf)
    log_other = empty_safe_logsumexp(others)  # log(1 - p_y), without cancellation
    renormalised = others - log_other.masked_fill(log_other == -math.inf, 0.0)
    return torch.cat([log_target, log_other], dim=-1), renormalised


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: Temperature = 4.0,
    mask: Tensor | None = None,
    scale_by_t2: bool = True,
    standardize: bool = False,
) -> Tensor:
    r"""Decoupled KD (Zhao et al., CVPR 2022): :math:`T^2 (\alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD})`.

    .. math::
        \mathcal{L} = T^2 \cdot \frac{1}{|M|} \sum_{i \in M}
            \alpha\,\mathrm{KL}(b^t_i \| b^s_i) + \beta\,\mathrm{KL}(\hat p^t_i \| \hat p^s_i)

    where :math:`b = (p_y, 1 - p_y)`, :math:`\hat p_c = p_c / (1 - p_y)` for :math:`c \ne y`, and
    :math:`p = \mathrm{softmax}(z / T)`. The paper's defaults: ``alpha=1``, ``beta=8``, ``T=4``,
    with the whole DKD term warmed up linearly over the first 20 epochs (with
    :class:`~lightning_kd.DistillationModule`, anneal its ``soft_weight``). Positions whose target
    is ``-100`` (unlabeled) are left out, as in the cross-entropy. Classes whose logit is ``-inf``
    in both models (a padded vocabulary) are absent: the loss is that of the unpadded logits, their
    gradient is zero. Float32 math.

    Shape:
        - student_logits, teacher_logits: :math:`(N, C)` or :math:`(B, S, C)`, equal shapes.
        - targets: ``student_logits.shape[:-1]``, class indices (``-100`` = no target).
        - mask: ``student_logits.shape[:-1]``, optional. Output: scalar, float32.

    Args:
        student_logits: the student's logits.
        teacher_logits: the teacher's logits.
        targets: the ground-truth class of each position.
        alpha: weight of TCKD (target-class KD), finite and >= 0.
        beta: weight of NCKD (non-target-class KD), finite and >= 0.
        temperature: :math:`T > 0`, finite, divides both logits.
        mask: positions to average over (besides the unlabeled ones).
        scale_by_t2: multiply by :math:`T^2`.
        standardize: z-score both logit vectors first (logit standardisation).

    Raises:
        ValueError: if the shapes differ, ``temperature`` is not a finite number > 0, ``alpha`` or
            ``beta`` is not a finite number >= 0, a target is out of range, or the mask has the
            wrong shape.
        TypeError: if ``targets`` are not integer class indices.

    Example::

        >>> s, t = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]])
        >>> round(dkd_loss(s, t, torch.tensor([0]), alpha=1.0, beta=0.0, temperature=1.0).item(), 4)
        0.9957
    """
    check_weight("alpha", alpha)
    check_weight("beta", beta)
    log_p_s, log_p_t = log_prob_pair(student_logits, teacher_logits, temperature, standardize)
    check_class_targets(student_logits, targets, "dkd_loss")
    labeled = targets != IGNORE_INDEX
    if mask is not None:
        check_mask(mask, labeled.shape)
    valid = labeled if mask is None else labeled & mask.to(torch.bool)
    classes = torch.arange(student_logits.shape[-1], device=targets.device)
    is_target = targets.clamp(min=0).unsqueeze(-1) == classes  # (..., C); unlabeled rows: any class, masked out
    binary_s, others_s = _split(log_p_s, is_target)
    binary_t, others_t = _split(log_p_t, is_target)
    per_position = alpha * kl_sum(binary_t, binary_s) + beta * kl_sum(others_t, others_s)
    loss = masked_mean(per_position, valid, student_logits)
    return scale_by_temperature(loss, temperature, scale_by_t2)


class DKDLoss(LogitLoss):
    """Decoupled KD as a module: :func:`dkd_loss` with the options fixed at construction.

    Needs a class per position (``needs_targets``): :class:`~lightning_kd.DistillationModule` gives
    unlabeled inputs (a transfer set) the teacher's top-1 class.

    Args:
        temperature: :math:`T`, a finite number > 0, or a :class:`~lightning_kd.losses.LearnableTemperature`.
        alpha: weight of TCKD, finite and >= 0 (the paper's 1).
        beta: weight of NCKD, finite and >= 0 (the paper's 8).
        scale_by_t2: multiply by :math:`T^2`.
        standardize: logit standardisation first.

    Raises:
        ValueError: if ``alpha`` or ``beta`` is not a finite number >= 0, or the temperature is invalid.

    Example::

        >>> loss = DKDLoss(temperature=1.0, beta=0.0)
        >>> s, t = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]])
        >>> round(loss(s, t, torch.tensor([0])).item(), 4)
        0.9957
    """

    needs_targets = True

    def __init__(
        self, temperature: float | LearnableTemperature = 4.0, *, alpha: float = 1.0, beta: float = 8.0,
        scale_by_t2: bool = True, standardize: bool = False,
    ) -> None:
        check_weight("alpha", alpha)
        check_weight("beta", beta)
        super().__init__(temperature, scale_by_t2=scale_by_t2, standardize=standardize)
        self.alpha, self.beta = float(alpha), float(beta)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor | None = None, *, mask: Tensor | None = None) -> Tensor:
        if targets is None:
            raise ValueError("DKDLoss needs a target class per position (`targets`), but got None.")
        return dkd_loss(student_logits, teacher_logits, targets, alpha=self.alpha, beta=self.beta, mask=mask, **self._shared())

    def _options(self) -> dict[str, float]:
        return {"alpha": self.alpha, "beta": self.beta}
