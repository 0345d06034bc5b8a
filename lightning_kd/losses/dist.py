r"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

Match relations, not values: the Pearson correlation between student and teacher probabilities
of each sample over the classes (inter-class relation) and of each class over the batch
(intra-class relation). Invariant to shifts and scales of the probabilities, which is what lets a
small student follow a much stronger teacher.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_kd.losses._reduction import Temperature, check_weight, log_prob_pair, masked_in_both, masked_mean, scale_by_temperature
from lightning_kd.losses.base import LogitLoss
from lightning_kd.losses.ctkd import LearnableTemperature


def pearson(a: Tensor, b: Tensor, eps: float = 1e-8, *, keep: Tensor | None = None) -> Tensor:
    """Pearson correlation of ``a`` and ``b`` along the last dimension (cosine of the centred vectors).

    ``eps`` is added to the product of the norms, as in the authors' code
    (``(a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)``), not clamped per vector as
    ``torch.cosine_similarity`` does: the two differ where the centred probabilities are tiny, which
    is the case over tens of thousands of classes.

    With ``keep`` (bool, same shape), over the kept entries only: the others are set to zero
    after centring, which leaves the cosine of the kept entries.
    """
    if keep is None:
        a = a - a.mean(dim=-1, keepdim=True)
        b = b - b.mean(dim=-1, keepdim=True)
        return _cosine(a, b, eps)
    # the plain mean times n / kept: times exactly 1.0 where every entry is kept. `a` itself goes
    # straight into the subtraction, as above, so that its gradients add up in the same order.
    scale = a.shape[-1] / keep.sum(dim=-1, keepdim=True).clamp(min=1)
    a = torch.where(keep, a - torch.where(keep, a, 0.0).mean(dim=-1, keepdim=True) * scale, 0.0)
    b = torch.where(keep, b - torch.where(keep, b, 0.0).mean(dim=-1, keepdim=True) * scale, 0.0)
    return _cosine(a, b, eps)


def _cosine(a: Tensor, b: Tensor, eps: float) -> Tensor:
    return (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


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

    A class whose logit is ``-inf`` in both models (a padded vocabulary) is left out: of the
    inter-class correlation at each position where it is masked, and of the intra-class mean when
    it is masked at every valid position. The loss is then that of the unpadded logits (with the
    padded classes kept, their zero probabilities would change both correlations), and the padded
    classes get a zero gradient. A batch with no valid position gives a graph-connected zero.

    Shape:
        - student_logits, teacher_logits: :math:`(N, C)` or :math:`(B, S, C)`, equal shapes.
        - mask: ``student_logits.shape[:-1]``, optional. Output: scalar, float32.

    Args:
        student_logits: the student's logits.
        teacher_logits: the teacher's logits.
        beta: weight of the inter-class relation, finite and >= 0.
        gamma: weight of the intra-class relation, finite and >= 0.
        temperature: :math:`T > 0`, finite, divides both logits.
        mask: positions to include.
        scale_by_t2: multiply by :math:`T^2`.
        standardize: z-score both logit vectors first.

    Raises:
        ValueError: if the shapes differ, ``temperature`` is not a finite number > 0, ``beta`` or
            ``gamma`` is not a finite number >= 0, or the mask has the wrong shape.

    Example::

        >>> s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
        >>> t = torch.tensor([[3.0, 2.0, 1.0], [0.0, 2.0, 0.0]])
        >>> round(dist_loss(s, t).item(), 4)
        2.2669
    """
    check_weight("beta", beta)
    check_weight("gamma", gamma)
    log_p_s, log_p_t = log_prob_pair(student_logits, teacher_logits, temperature, standardize)
    present = ~masked_in_both(student_logits, teacher_logits)  # (..., C)
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    inter = masked_mean(1.0 - pearson(p_s, p_t, keep=present), mask, student_logits)
    num_classes = p_s.shape[-1]
    rows_s, rows_t = p_s.reshape(-1, num_classes), p_t.reshape(-1, num_classes)  # (N, C)
    present = present.reshape(-1, num_classes)
    if mask is not None:
        keep = mask.to(torch.bool).reshape(-1)
        rows_s, rows_t, present = rows_s[keep], rows_t[keep], present[keep]
    if rows_s.shape[0]:
        # a class masked at every valid position is constant 0 in both: its correlation is undefined
        counted = present.any(dim=0)  # (C,)
        per_class = torch.where(counted, pearson(rows_s.T, rows_t.T), 0.0)
        # the plain mean times C / counted: times exactly 1.0 without padding
        intra = 1.0 - per_class.mean() * (num_classes / counted.sum().clamp(min=1))
    else:
        intra = inter * 0.0
    loss = beta * inter + gamma * intra
    return scale_by_temperature(loss, temperature, scale_by_t2)


class DISTLoss(LogitLoss):
    """DIST as a module: :func:`dist_loss` with the options fixed at construction.

    Args:
        temperature: :math:`T`, a finite number > 0, or a :class:`~lightning_kd.losses.LearnableTemperature`.
        beta: weight of the inter-class relation, finite and >= 0.
        gamma: weight of the intra-class relation, finite and >= 0.
        scale_by_t2: multiply by :math:`T^2`.
        standardize: logit standardisation first.

    Raises:
        ValueError: if ``beta`` or ``gamma`` is not a finite number >= 0, or the temperature is invalid.

    Example::

        >>> s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
        >>> t = torch.tensor([[3.0, 2.0, 1.0], [0.0, 2.0, 0.0]])
        >>> round(DISTLoss()(s, t).item(), 4)
        2.2669
    """

    def __init__(
        self, temperature: float | LearnableTemperature = 1.0, *, beta: float = 1.0, gamma: float = 1.0,
        scale_by_t2: bool = True, standardize: bool = False,
    ) -> None:
        check_weight("beta", beta)
        check_weight("gamma", gamma)
        super().__init__(temperature, scale_by_t2=scale_by_t2, standardize=standardize)
        self.beta, self.gamma = float(beta), float(gamma)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor | None = None, *, mask: Tensor | None = None) -> Tensor:
        return dist_loss(student_logits, teacher_logits, beta=self.beta, gamma=self.gamma, mask=mask, **self._shared())

    def _options(self) -> dict[str, float]:
        return {"beta": self.beta, "gamma": self.gamma}
