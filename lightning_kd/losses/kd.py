"""Hinton's knowledge-distillation loss and its high-temperature limit, as pure functions.

Argument order everywhere: ``(student, teacher, ...)``. Note that ``F.kl_div(input, target)``
and torchmetrics' KL take the two distributions in opposite orders; these functions do not.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_kd._checks import check_bool
from lightning_kd.losses._reduction import (
    Temperature,
    check_pair,
    check_temperature,
    kl_sum,
    log_probs,
    masked_in_both,
    masked_mean,
    scale_by_temperature,
    standardize_logits,
)
from lightning_kd.losses.base import LogitLoss
from lightning_kd.losses.ctkd import LearnableTemperature
from lightning_kd.losses.sampled import SampledLogits, check_sampled_pair, sampled_kl_per_position
from lightning_kd.losses.topk import TopKLogits, check_topk_pair, collapse_student, topk_log_probs

Teacher = Tensor | TopKLogits | SampledLogits


def check_teacher(student_logits: Tensor, teacher: Teacher) -> None:
    """Shape checks for full (``(..., C)``), top-k or sampled teacher targets."""
    if isinstance(teacher, SampledLogits):
        check_sampled_pair(student_logits, teacher, teacher.temperature)
    elif isinstance(teacher, TopKLogits):
        check_topk_pair(student_logits, teacher)
    else:
        check_pair(student_logits, teacher)


def kl_per_position(
    student_logits: Tensor, teacher_logits: Teacher, temperature: Temperature, *, standardize: bool = False
) -> Tensor:
    """``KL(softmax(t/T) ‖ softmax(s/T))`` summed over classes, one value per position (float32).

    Classes where the teacher's probability is exactly zero contribute zero, with a zero gradient,
    also when the student's logit is ``-inf`` too (a class masked in both); a class the teacher
    gives mass and the student ``-inf`` makes the KL ``+inf``. With :class:`TopKLogits` the sum
    runs over the ``k + 1`` buckets of :mod:`lightning_kd.losses.topk` (top-k classes and the tail);
    with :class:`SampledLogits` it is the unbiased estimate of :mod:`lightning_kd.losses.sampled`.
    """
    if isinstance(teacher_logits, SampledLogits):
        if check_bool(standardize, "standardize"):
            raise ValueError("`standardize=True` needs the teacher's full logits, but got sampled teacher targets.")
        check_sampled_pair(student_logits, teacher_logits, temperature)
        return sampled_kl_per_position(student_logits, teacher_logits, temperature)
    log_p_s = log_probs(student_logits, temperature, standardize=standardize)
    if isinstance(teacher_logits, TopKLogits):
        if check_bool(standardize, "standardize"):
            raise ValueError("`standardize=True` needs the teacher's full logits, but got top-k teacher targets.")
        log_p_t = topk_log_probs(teacher_logits, student_logits.shape[-1], temperature)
        log_p_s = collapse_student(log_p_s, teacher_logits.indices)
    else:
        log_p_t = log_probs(teacher_logits, temperature, standardize=standardize)
    return kl_sum(log_p_t, log_p_s)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Teacher,
    temperature: Temperature = 4.0,
    *,
    mask: Tensor | None = None,
    scale_by_t2: bool = True,
    standardize: bool = False,
) -> Tensor:
    r"""Knowledge-distillation loss of Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015).

    Forward KL from the teacher's tempered distribution to the student's:

    .. math::
        \mathcal{L} = T^2 \cdot \frac{1}{|M|} \sum_{i \in M} \sum_c
            p^t_{i,c} \left(\log p^t_{i,c} - \log p^s_{i,c}\right),
        \qquad p = \mathrm{softmax}(z / T)

    where :math:`M` is the set of valid positions (all of them without a mask). Classes whose
    logit is ``-inf`` in both models (a padded vocabulary) are absent: the loss and the gradients
    on the other classes are those of the unpadded logits, their own gradient is zero. The
    :math:`T^2` factor keeps the gradient scale independent of :math:`T` (Hinton et al.); switch it off with
    ``scale_by_t2=False`` (LM recipes such as GKD run at T=1 without it). The math runs in float32
    whatever the input dtype.

    Shape:
        - student_logits: :math:`(N, C)` or :math:`(B, S, C)`.
        - teacher_logits: same shape as ``student_logits``, or a :class:`TopKLogits` of the same
          leading shape (a top-k cache: the loss is then the KL over the teacher's top-k classes
          plus one tail bucket, see :mod:`lightning_kd.losses.topk`), or a :class:`SampledLogits`
          of the same leading shape (sampled tokens: the per-position KL is then replaced by its
          unbiased importance-weighted estimate, see :mod:`lightning_kd.losses.sampled`; the loss
          then runs at the targets' temperature only).
        - mask: ``student_logits.shape[:-1]`` (bool, True = position counts), optional.
        - Output: scalar, float32.

    Args:
        student_logits: the student's logits (the distribution being trained).
        teacher_logits: the teacher's logits (the target distribution).
        temperature: :math:`T > 0`, finite, divides both logits before the softmax.
        mask: positions to average over; a batch with no valid position (or no position at
            all) gives a zero loss that is still connected to the graph.
        scale_by_t2: multiply by :math:`T^2`.
        standardize: z-score both logit vectors before the temperature (logit standardisation,
            Sun et al., CVPR 2024; see :func:`~lightning_kd.losses.standardize_logits`).

    Raises:
        ValueError: if the shapes differ, ``temperature`` is not a finite number > 0 or the mask
            has the wrong shape; for sampled targets, a temperature other than theirs.

    Example::

        >>> s = torch.tensor([[1.0, 2.0, 3.0]])
        >>> t = torch.tensor([[3.0, 2.0, 1.0]])
        >>> round(kd_loss(s, t, temperature=1.0).item(), 4)
        1.1504
    """
    check_teacher(student_logits, teacher_logits)
    check_temperature(temperature)
    per_position = kl_per_position(student_logits, teacher_logits, temperature, standardize=standardize)
    loss = masked_mean(per_position, mask, student_logits)
    return scale_by_temperature(loss, temperature, scale_by_t2)


def soft_mse_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    standardize: bool = False,
) -> Tensor:
    r"""Mean squared error between student and teacher outputs, averaged over valid positions.

    .. math::
        \mathcal{L} = \frac{1}{|M|} \sum_{i \in M} \frac{1}{C} \sum_c (z^s_{i,c} - z^t_{i,c})^2

    The soft loss for regression teachers, and Hinton's high-temperature limit of KD on
    (zero-mean) logits: :math:`T^2 \mathrm{KL} \to \frac{1}{2C}\sum_c (z^s_c - z^t_c)^2` as
    :math:`T \to \infty`. Temperature does not apply. Float32 math.

    A class whose logit is ``-inf`` in both models (a padded vocabulary) is left out: :math:`C`
    counts the other classes, the loss equals the loss on the unpadded logits, and the padded
    classes get a zero gradient. A class that is ``-inf`` in only one model is infinitely far
    from the other: the loss is ``+inf``, loudly, rather than a number that ignores it.

    Shape:
        - student_logits, teacher_logits: :math:`(N, C)` or :math:`(B, S, C)`, equal shapes.
        - mask: ``student_logits.shape[:-1]``, optional. Output: scalar.

    Example::

        >>> round(soft_mse_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])).item(), 4)
        2.5
    """
    check_pair(student_logits, teacher_logits)
    absent = masked_in_both(student_logits, teacher_logits)
    if check_bool(standardize, "standardize"):  # compare the z-scored logits (logit standardisation)
        student_logits, teacher_logits = standardize_logits(student_logits), standardize_logits(teacher_logits)
    diff = torch.where(absent, 0.0, student_logits.float() - teacher_logits.float())
    present = (~absent).sum(dim=-1).clamp(min=1)
    # the mean over all C times C / present: times exactly 1.0 without padding
    per_position = diff.pow(2).mean(dim=-1) * (student_logits.shape[-1] / present)
    return masked_mean(per_position, mask, student_logits)


class KDLoss(LogitLoss):
    r"""Hinton's KD loss as a module: :func:`kd_loss` with the options fixed at construction.

    ``forward(student_logits, teacher_logits, targets=None, *, mask=None)``; ``targets`` are not used.
    Accepts :class:`TopKLogits` teacher targets (a top-k store) and :class:`SampledLogits` (a
    sampled store, at the temperature it was sampled for).

    Args:
        temperature: :math:`T`, a finite number > 0, or a :class:`~lightning_kd.losses.LearnableTemperature` (CTKD).
        scale_by_t2: multiply by :math:`T^2`.
        standardize: logit standardisation of both logit vectors first.

    Example::

        >>> loss = KDLoss(temperature=1.0)
        >>> round(loss(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]])).item(), 4)
        1.1504
    """

    accepts_topk = True
    #: The teacher may be :class:`SampledLogits` (a sampled store): the only loss with an unbiased estimate for them.
    accepts_sampled = True

    def __init__(self, temperature: float | LearnableTemperature = 4.0, *, scale_by_t2: bool = True, standardize: bool = False) -> None:
        super().__init__(temperature, scale_by_t2=scale_by_t2, standardize=standardize)

    def forward(self, student_logits: Tensor, teacher_logits: Teacher, targets: Tensor | None = None, *, mask: Tensor | None = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, mask=mask, **self._shared())


class SoftMSELoss(LogitLoss):
    """Mean squared error between the logits as a module: :func:`soft_mse_loss` (no temperature).

    The soft loss for regression teachers, and the high-temperature limit of KD. Its outputs are not
    compared as distributions (no agreement / KL metrics).

    Example::

        >>> round(SoftMSELoss()(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])).item(), 4)
        2.5
    """

    uses_temperature = False
    compares_distributions = False

    def __init__(self, *, standardize: bool = False) -> None:
        super().__init__(standardize=standardize)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor | None = None, *, mask: Tensor | None = None) -> Tensor:
        return soft_mse_loss(student_logits, teacher_logits, mask=mask, standardize=self.standardize)
