r"""Feature and relation distillation: FitNet hints, attention transfer, relational KD.

Pure functions on intermediate activations (captured with :class:`lightning_kd.hooks.FeatureHooks`),
argument order ``(student_feature, teacher_feature)``, float32 math. Features are
``(B, C, *spatial)`` maps or ``(B, D)`` vectors.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd._checks import check_number


def _check_batch(student: Tensor, teacher: Tensor, method: str) -> None:
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"Expected student and teacher features with the same batch size for {method}, but got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}."
        )


def fitnet_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    r"""FitNet hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

    .. math::
        \mathcal{L} = \frac{1}{n} \lVert r(f_s) - f_t \rVert_2^2

    the mean squared error over all ``n`` elements, where :math:`r(f_s)` is the student feature
    already passed through its adapter (see :func:`build_adapter`).

    Shape:
        - student_feature, teacher_feature: equal shapes. Output: scalar, float32.

    Raises:
        ValueError: if the shapes differ (build an adapter with :func:`build_adapter`).

    Example::

        >>> round(fitnet_loss(torch.ones(2, 3), torch.zeros(2, 3)).item(), 4)
        1.0
    """
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(
            f"Expected the adapted student feature to have the teacher feature's shape for FitNet, but got "
            f"{tuple(student_feature.shape)} and {tuple(teacher_feature.shape)}. Pass the student feature "
            "through `build_adapter(student_shape, teacher_shape)` first."
        )
    return F.mse_loss(student_feature.float(), teacher_feature.float())


def build_adapter(
    student_shape: Sequence[int], teacher_shape: Sequence[int], kind: Literal["auto", "linear", "conv"] = "auto"
) -> nn.Module:
    """The FitNet regressor from a student feature's shape to a teacher feature's (batch dimension included).

    ``kind="auto"`` (channels first, as conv nets have them):

    - ``(B, Cs)`` -> ``(B, Ct)``: ``Linear(Cs, Ct)``.
    - ``(B, Cs, *S)`` -> ``(B, Ct, *S)`` (1-, 2- or 3-D maps of equal size): a 1×1 convolution.
    - Maps of another size: the 1×1 convolution, then adaptive average pooling to the teacher's size.
    - Features of different ranks (an MLP's vector against a CNN's map): flatten, ``Linear``, and
      reshape to the teacher's shape.

    ``kind="linear"``: ``Linear`` on the **last** dimension, for channels-last features such as a
    transformer's hidden states ``(B, S, Ds)`` -> ``(B, S, Dt)``. ``kind="conv"``: the 1×1 convolution.

    Raises:
        ValueError: for shapes without a batch dimension, an unknown ``kind``, or shapes that ``kind``
            cannot map (``linear`` needs equal leading dimensions, ``conv`` equal ranks of at most 5).
    """
    student_shape, teacher_shape = tuple(student_shape), tuple(teacher_shape)
    if kind not in ("auto", "linear", "conv"):
        raise ValueError(f"Unknown adapter {kind!r}. Expected one of auto, linear, conv.")
    if len(student_shape) < 2 or len(teacher_shape) < 2:
        raise ValueError(f"Expected features with a batch dimension, but got shapes {student_shape} and {teacher_shape}.")
    if kind == "linear" or (kind == "auto" and len(student_shape) == len(teacher_shape) == 2):
        if student_shape[:-1] != teacher_shape[:-1]:
            raise ValueError(
                f"A linear adapter maps the last dimension only, but the features {student_shape} and {teacher_shape} "
                "differ before it. Use adapter: auto or conv."
            )
        return nn.Linear(student_shape[-1], teacher_shape[-1])
    if len(student_shape) == len(teacher_shape) and 3 <= len(student_shape) <= 5:
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(student_shape) - 3](student_shape[1], teacher_shape[1], kernel_size=1)
        if student_shape[2:] == teacher_shape[2:]:
            return conv
        pool = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[len(student_shape) - 3](teacher_shape[2:])
        return nn.Sequential(conv, pool)
    if kind == "conv":
        raise ValueError(f"A conv adapter needs feature maps of equal rank 3 to 5, but got {student_shape} and {teacher_shape}.")
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(student_shape[1:]), math.prod(teacher_shape[1:])), nn.Unflatten(1, teacher_shape[1:])
    )


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention of Zagoruyko & Komodakis: ``normalize(mean_c |f|^p)``, ``(B, C, *S)`` -> ``(B, prod(S))``."""
    return F.normalize(feature.float().abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student_feature: Tensor, teacher_feature: Tensor, *, p: float = 2.0) -> Tensor:
    r"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

    .. math::
        \mathcal{L} = \frac{1}{B\,|S|} \sum_i \Big\lVert \frac{a_s^{(i)}}{\lVert a_s^{(i)} \rVert_2}
            - \frac{a_t^{(i)}}{\lVert a_t^{(i)} \rVert_2} \Big\rVert_2^2,
        \qquad a = \frac{1}{C} \sum_c |f_c|^p

    over the spatial positions :math:`S` (the mean of RepDistiller/mdistiller, whose recipes weigh
    it by 1000). Channel counts may differ; maps of different sizes are average-pooled to the
    smaller one.

    Shape:
        - student_feature: :math:`(B, C_s, *S_s)`; teacher_feature: :math:`(B, C_t, *S_t)`, with at
          least one spatial dimension. Output: scalar, float32.

    Raises:
        ValueError: for features without spatial dimensions (e.g. an MLP's), or of different ranks.

    Example::

        >>> f = torch.rand(2, 4, 8)
        >>> at_loss(f, f).item()
        0.0
    """
    _check_batch(student_feature, teacher_feature, "attention transfer")
    if student_feature.dim() < 3 or student_feature.dim() != teacher_feature.dim():
        raise ValueError(
            "Attention transfer needs spatial feature maps (B, C, *spatial) of the same rank from both models, "
            f"but got {tuple(student_feature.shape)} and {tuple(teacher_feature.shape)}. Choose convolutional "
            "layers (an MLP has no spatial maps) or use `fitnet` / `rkd`."
        )
    s_size, t_size = student_feature.shape[2:], teacher_feature.shape[2:]
    if s_size != t_size:
        smaller = tuple(min(a, b) for a, b in zip(s_size, t_size))
        pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[len(smaller) - 1]
        student_feature, teacher_feature = pool(student_feature, smaller), pool(teacher_feature, smaller)
    return (attention_map(student_feature, p) - attention_map(teacher_feature, p)).pow(2).mean()


def _pairwise_distances(e: Tensor) -> Tensor:
    """Euclidean distances between the rows of ``e`` ``(B, D)``, with a zero diagonal and finite gradients."""
    square = e.pow(2).sum(dim=1)
    d2 = (square.unsqueeze(0) + square.unsqueeze(1) - 2 * e @ e.T).clamp(min=1e-12)
    off = ~torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return torch.where(off, d2.sqrt(), torch.zeros_like(d2))


def _normalized_distances(e: Tensor) -> Tensor:
    d = _pairwise_distances(e)
    positive = d[d > 0]
    return d / positive.mean() if positive.numel() else d


def _angles(e: Tensor) -> Tensor:
    """Cosines of the angles ``∠(e_j − e_i, e_k − e_i)`` for every triplet, ``(B, B, B)``."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # (B, B, D): e_j - e_i
    return diff @ diff.transpose(1, 2)


def rkd_loss(
    student_feature: Tensor, teacher_feature: Tensor, *, distance_weight: float = 25.0, angle_weight: float = 50.0
) -> Tensor:
    r"""Relational KD (Park et al., "Relational Knowledge Distillation", CVPR 2019): distance and angle.

    .. math::
        \mathcal{L} = w_d \sum_{i \ne j} \ell_\delta\!\Big(\frac{\lVert s_i - s_j \rVert}{\mu_s},
            \frac{\lVert t_i - t_j \rVert}{\mu_t}\Big) \Big/ B^2
          + w_a \sum_{i,j,k} \ell_\delta\big(\cos\angle_s(i,j,k), \cos\angle_t(i,j,k)\big) \Big/ B^3

    on the flattened features (any widths: only relations inside the batch are compared), with
    :math:`\mu` the mean off-diagonal distance and :math:`\ell_\delta` the Huber (smooth L1) loss.
    Defaults ``w_d = 25``, ``w_a = 50`` as in the paper. The angle term costs :math:`O(B^2 D)` memory.

    Shape:
        - student_feature: :math:`(B, *)`; teacher_feature: :math:`(B, *)`. Output: scalar, float32.

    Raises:
        ValueError: if the batch sizes differ.

    Example::

        >>> e = torch.randn(5, 3)
        >>> round(rkd_loss(e, 2 * e).item(), 6)  # relations are scale-free
        0.0
    """
    _check_batch(student_feature, teacher_feature, "RKD")
    s, t = student_feature.float().flatten(1), teacher_feature.float().flatten(1)
    loss = 0.0 * s.sum()
    if distance_weight:
        loss = loss + distance_weight * F.smooth_l1_loss(_normalized_distances(s), _normalized_distances(t))
    if angle_weight:
        loss = loss + angle_weight * F.smooth_l1_loss(_angles(s), _angles(t))
    return loss


class FitNetLoss(nn.Module):
    """FitNet's hint loss as a module: :func:`fitnet_loss` on the adapted student feature.

    The adapter itself (from the student feature's shape to the teacher's) is built and trained by
    :class:`~lightning_kd.features.FeatureDistillation` from one dry forward; ``adapter`` chooses its
    kind (see :func:`build_adapter`).

    Args:
        adapter: ``"auto"``, ``"linear"`` (last dimension: hidden states ``(B, S, D)``) or ``"conv"``.

    Raises:
        ValueError: for an unknown ``adapter``.
    """

    needs_adapter = True

    def __init__(self, adapter: Literal["auto", "linear", "conv"] = "auto") -> None:
        super().__init__()
        if adapter not in ("auto", "linear", "conv"):
            raise ValueError(f"Unknown adapter {adapter!r}. Expected one of auto, linear, conv.")
        self.adapter = adapter

    def forward(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        return fitnet_loss(student_feature, teacher_feature)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter!r}"


class ATLoss(nn.Module):
    """Attention transfer as a module: :func:`at_loss` with the exponent ``p`` fixed.

    Example::

        >>> f = torch.rand(2, 4, 8)
        >>> ATLoss(p=2.0)(f, f).item()
        0.0
    """

    needs_adapter = False

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = check_number(p, "p")
        if not (math.isfinite(self.p) and self.p > 0):  # |f|^p with p <= 0 is 1 or infinite where f = 0: no attention
            raise ValueError(f"Expected `p` to be a finite number > 0 (Zagoruyko & Komodakis use 2), but got {p}.")

    def forward(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        return at_loss(student_feature, teacher_feature, p=self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class RKDLoss(nn.Module):
    """Relational KD as a module: :func:`rkd_loss` with its two weights fixed.

    Example::

        >>> e = torch.randn(5, 3)
        >>> round(RKDLoss()(e, 2 * e).item(), 6)
        0.0
    """

    needs_adapter = False

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight, self.angle_weight = check_number(distance_weight, "distance_weight"), check_number(angle_weight, "angle_weight")
        for name, value in (("distance_weight", self.distance_weight), ("angle_weight", self.angle_weight)):
            if not (math.isfinite(value) and value >= 0):  # a negative weight would reward the student for moving away
                raise ValueError(f"Expected `{name}` to be a finite number >= 0 (Park et al. use 25 and 50), but got {value}.")

    def forward(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        return rkd_loss(student_feature, teacher_feature, distance_weight=self.distance_weight, angle_weight=self.angle_weight)

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"
