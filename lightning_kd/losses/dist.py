r"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

Match relations, not values: the Pearson correlation between student and teacher probabilities
of each sample over the classes (inter-class relation) and of each class over the batch
(intra-class relation). Invariant to shifts and scales of the probabilities, which is what lets a
small student follow a much stronger teacher.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_kd.losses._reduction import Temperature, log_prob_pair, masked_mean, scale_by_temperature


def pearson(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of ``a`` and ``b`` along the last dimension (cosine of the centred vectors)."""
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    return torch.cosine_similarity(a, b, dim=-1, eps=eps)


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: Temperature = 1.0,
    mask: Tensor | None = None,
    scale_by_t2: bool = True,
    standardize: bool = False,
) -> Tensor:
    r"""DIST (Huang et al., NeurIPS 2022): one minus the Pearson correlations of the probabilities.

    .. math::
        \mathcal{L} = T^2 \Big[\beta \Big(1 - \frac{1}{|M|} \sum_{i \in M} \rho(p^s_{i,:}, p^t_{i,:})\Big)
            + \gamma \Big(1 - \frac{1}{C} \sum_c \rho(p^s_{M,c}, p^t_{M,c})\Big)\Big]

    with :math:`p = \mathrm{softmax}(z / T)` and :math:`\rho` the Pearson correlation: over the
    classes of one position (inter-class), and over the valid positions of the batch for one class
    (intra-class; flattened over batch and sequence). The paper's defaults: ``beta = gamma = 1``,
    ``T = 1`` (ImageNet); its CIFAR recipe uses ``beta = gamma = 2``, ``T = 4``. The intra-class term
    needs at least two valid positions (it is 1, a constant, otherwise). Float32 math.

    Shape:
        - student_logits, teacher_logits: :math:`(N, C)` or :math:`(B, S, C)`, equal shapes.
        - mask: ``student_logits.shape[:-1]``, optional. Output: scalar, float32.

    Args:
        student_logits: the student's logits.
        teacher_logits: the teacher's logits.
        beta: weight of the inter-class relation.
        gamma: weight of the intra-class relation.
        temperature: :math:`T > 0`, divides both logits.
        mask: positions to include.
        scale_by_t2: multiply by :math:`T^2`.
        standardize: z-score both logit vectors first.

    Raises:
        ValueError: if the shapes differ, ``temperature <= 0`` or the mask has the wrong shape.

    Example::

        >>> s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
        >>> t = torch.tensor([[3.0, 2.0, 1.0], [0.0, 2.0, 0.0]])
        >>> round(dist_loss(s, t).item(), 4)
        2.2669
    """
    log_p_s, log_p_t = log_prob_pair(student_logits, teacher_logits, temperature, standardize)
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    inter = masked_mean(1.0 - pearson(p_s, p_t), mask, student_logits)
    rows_s, rows_t = p_s.reshape(-1, p_s.shape[-1]), p_t.reshape(-1, p_t.shape[-1])  # (N, C)
    if mask is not None:
        keep = mask.to(torch.bool).reshape(-1)
        rows_s, rows_t = rows_s[keep], rows_t[keep]
    intra = 1.0 - pearson(rows_s.T, rows_t.T).mean() if rows_s.shape[0] else inter * 0.0
    loss = beta * inter + gamma * intra
    return scale_by_temperature(loss, temperature, scale_by_t2)
