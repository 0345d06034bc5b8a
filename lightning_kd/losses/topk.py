r"""Top-k teacher targets: the k largest logits, their classes, and the rest of the mass as one bucket.

A cache of full logits costs ``C`` numbers per position, which for a language model (``C`` = the
vocabulary) is the whole problem. :class:`TopKLogits` keeps ``k`` of them plus the log-sum-exp of
the other ``C - k`` ("the tail"), and :func:`kd_loss` accepts it in place of the teacher's logits.

What the loss on top-k targets is: the KL divergence between teacher and student after both are
*collapsed* onto ``k + 1`` buckets (the teacher's top-k classes, one at a time, and "any other
class"). By the chain rule of KL,

.. math::
    \mathrm{KL}(p_t \| p_s) = \mathrm{KL}_{k+1}(p_t \| p_s)
        + p_t(\text{tail}) \, \mathrm{KL}\big(p_t(\cdot \mid \text{tail}) \,\|\, p_s(\cdot \mid \text{tail})\big)

so it is a lower bound of the full loss, exact when ``k = C`` and off by at most the (negligible
for a peaked teacher) tail mass times the within-tail divergence otherwise. Unlike plain top-k
renormalised to sum to one, it keeps the teacher's tail mass and pushes the student's total tail
mass towards it (plain top-k is biased: Anshumann et al., "Sparse Logit Sampling", ACL 2025).

Temperature: the tail is stored at ``T = 1`` (its log-sum-exp). At another ``T`` its mass is
computed as if the ``C - k`` tail logits were equal (to their log-mean-exp): exact at ``T = 1``
and for a flat tail; for ``T > 1`` it overestimates the tail mass slightly (power-mean inequality).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_kd.losses._reduction import Temperature, divide_by_temperature, empty_safe_logsumexp


class TopKLogits(NamedTuple):
    """A teacher's top-k logits, in place of the full ``(..., C)`` tensor.

    Shape:
        - values: ``(..., k)``, the k largest logits in descending order (any float dtype).
        - indices: ``(..., k)``, their classes (any integer dtype).
        - tail_logsumexp: ``(...)``, ``log sum(exp(z_c))`` over the other ``C - k`` classes
          (``-inf`` when ``k == C``).
    """

    values: Tensor
    indices: Tensor
    tail_logsumexp: Tensor

    @classmethod
    def from_logits(cls, logits: Tensor, k: int) -> "TopKLogits":
        """Keep the ``k`` largest of ``logits`` (``(..., C)``) and the log-sum-exp of the rest, in float32."""
        num_classes = logits.shape[-1]
        if not 1 <= k <= num_classes:
            raise ValueError(f"Expected `top_k` in [1, {num_classes}] (the number of classes), but got {k}.")
        values, indices = logits.float().topk(k, dim=-1)
        if k == num_classes:
            tail = torch.full(logits.shape[:-1], -math.inf, device=logits.device)
        else:
            rest = logits.float().scatter(-1, indices, -math.inf)
            tail = torch.logsumexp(rest, dim=-1)
        return cls(values, indices, tail)

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def top1(self) -> Tensor:
        """The teacher's predicted class per position, ``(...)``."""
        return self.indices[..., 0].long()

    def to(self, device: torch.device | str) -> "TopKLogits":  # type: ignore[override]
        return TopKLogits(*(t.to(device) for t in self))


def check_topk_pair(student: Tensor, teacher: TopKLogits) -> None:
    """Raise a clear error when top-k teacher targets do not fit the student's logits."""
    if student.dim() < 2:
        raise ValueError(f"Expected logits of shape (N, C) or (B, S, C), but got shape {tuple(student.shape)}.")
    if teacher.values.shape != teacher.indices.shape or teacher.values.shape[:-1] != student.shape[:-1]:
        raise ValueError(
            f"Expected top-k teacher targets of shape {tuple(student.shape[:-1])} + (k,) for student logits "
            f"{tuple(student.shape)}, but got values {tuple(teacher.values.shape)} and indices "
            f"{tuple(teacher.indices.shape)}."
        )
    if teacher.k > student.shape[-1]:
        raise ValueError(f"Expected at most {student.shape[-1]} top-k teacher classes (the student's), but got {teacher.k}.")


def topk_log_probs(teacher: TopKLogits, num_classes: int, temperature: Temperature) -> Tensor:
    """Float32 log-probabilities of the ``k + 1`` buckets (top-k classes, then the tail), ``(..., k+1)``.

    A ``-inf`` value or tail (classes masked in the teacher) is a bucket of probability zero.
    """
    top = divide_by_temperature(teacher.values.float(), temperature)
    if teacher.k == num_classes:
        return torch.log_softmax(top, dim=-1)
    rest = num_classes - teacher.k
    log_rest = math.log(rest)
    # the tail as `rest` equal logits at their log-mean-exp: exact at T = 1 (see the module docstring)
    tail = log_rest + divide_by_temperature(teacher.tail_logsumexp.float() - log_rest, temperature)
    return torch.log_softmax(torch.cat([top, tail.unsqueeze(-1)], dim=-1), dim=-1)


def collapse_student(log_q: Tensor, indices: Tensor) -> Tensor:
    """The student's float32 log-probabilities ``(..., C)`` collapsed onto the teacher's ``k + 1`` buckets.

    A tail whose classes are all ``-inf`` (a padded vocabulary) is ``-inf``, with a zero gradient.
    """
    indices = indices.long()
    top = log_q.gather(-1, indices)
    if indices.shape[-1] == log_q.shape[-1]:
        return top  # no tail bucket at all
    return torch.cat([top, empty_safe_logsumexp(log_q.scatter(-1, indices, -math.inf))], dim=-1)
