r"""Feature and relation distillation: FitNet hints, attention transfer, relational KD.

Pure functions on intermediate activations (captured with :class:`lightning_kd.hooks.FeatureHooks`),
argument order ``(student_feature, teacher_feature, *, options)``, float32 math. Features are
``(B, C, *spatial)`` maps or ``(B, D)`` vectors, or, when a token ``mask`` is given, a transformer's
hidden states ``(B, S, D)``.

Sequences: ``mask`` is a ``(B, S)`` tensor, True (or nonzero) at the valid tokens, and giving it is
what says that the features are sequences ``(B, S, D)`` (channels last). Each loss then sees the
valid tokens only: its value on a padded batch is the value on the same sequences without padding,
whatever the padded positions hold (even ``inf``), and a batch without a valid token gives a zero
connected to the graph. Padded positions are selected out with ``torch.where`` before any
arithmetic, so their gradient is exactly zero. Without ``mask`` every loss is what it was.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, Sequence

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


def sequence_mask(mask: Tensor, feature: Tensor, *, name: str = "feature", method: str = "feature distillation") -> Tensor:
    """``mask`` as a bool ``(B, S)`` tensor on ``feature``'s device, checked against the sequence feature ``(B, S, D)``.

    Raises:
        TypeError: if ``mask`` is not a bool or integer tensor.
        ValueError: if ``feature`` is not ``(B, S, D)`` with ``(B, S)`` the mask's shape.
    """
    if not isinstance(mask, Tensor) or mask.is_floating_point() or mask.is_complex():
        what = f"a {mask.dtype} tensor" if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"Expected `mask` to be a bool tensor (B, S), True at the valid tokens, but got {what}.")
    if feature.dim() != 3 or feature.shape[:2] != mask.shape:
        raise ValueError(
            f"Expected {method} on sequence features (B, S, D) whose (B, S) is the mask's shape {tuple(mask.shape)}, but "
            f"got the {name} feature {tuple(feature.shape)}. Pass the token mask of the inputs that made the features "
            "(before any causal shift), or no mask for feature maps (B, C, *spatial)."
        )
    return mask.to(device=feature.device, dtype=torch.bool)


def _graph_zero(feature: Tensor) -> Tensor:
    """A float32 zero on the graph of ``feature`` that reads none of its values (``inf`` padding cannot reach it)."""
    return feature[..., :0].float().sum()


def fitnet_loss(student_feature: Tensor, teacher_feature: Tensor, *, mask: Tensor | None = None) -> Tensor:
    r"""FitNet hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

    .. math::
        \mathcal{L} = \frac{1}{n} \lVert r(f_s) - f_t \rVert_2^2

    the mean squared error over all ``n`` elements, where :math:`r(f_s)` is the student feature
    already passed through its adapter (see :func:`build_adapter`). With a token ``mask``, the
    mean runs over the valid tokens and the hidden dimension only: :math:`n = N_{valid} \cdot D`.

    Args:
        student_feature: the adapted student feature :math:`r(f_s)`.
        teacher_feature: the teacher feature :math:`f_t`.
        mask: ``(B, S)``, True at the valid tokens: the features are sequences ``(B, S, D)``.

    Shape:
        - student_feature, teacher_feature: equal shapes, ``(B, S, D)`` with a mask.
        - mask: :math:`(B, S)`. Output: scalar, float32.

    Raises:
        ValueError: if the shapes differ (build an adapter with :func:`build_adapter`), or do not
            match ``mask``.
        TypeError: for a ``mask`` that is not a bool or integer tensor.

    Example::

        >>> round(fitnet_loss(torch.ones(2, 3), torch.zeros(2, 3)).item(), 4)
        1.0
        >>> s, t = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
        >>> s[0, 2] = 1e30  # a padded position: ignored
        >>> fitnet_loss(s, t, mask=torch.tensor([[True, True, False], [True, True, True]])).item()
        1.0
    """
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(
            f"Expected the adapted student feature to have the teacher feature's shape for FitNet, but got "
            f"{tuple(student_feature.shape)} and {tuple(teacher_feature.shape)}. Pass the student feature "
            "through `build_adapter(student_shape, teacher_shape)` first."
        )
    if mask is None:
        return F.mse_loss(student_feature.float(), teacher_feature.float())
    valid = sequence_mask(mask, student_feature, name="student", method="FitNet").unsqueeze(-1)  # (B, S, 1)
    # padded positions to 0 before any arithmetic: inf - inf would be NaN, and so would its gradient
    s, t = torch.where(valid, student_feature.float(), 0.0), torch.where(valid, teacher_feature.float(), 0.0)  # (B, S, D)
    count = valid.sum() * student_feature.shape[-1]
    return (s - t).pow(2).sum() / count.clamp(min=1)


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


def attention_map(feature: Tensor, p: float = 2.0, *, mask: Tensor | None = None, name: str = "feature") -> Tensor:
    """Spatial attention of Zagoruyko & Komodakis: ``normalize(mean_c |f|^p)``, ``(B, C, *S)`` -> ``(B, prod(S))``.

    With a token ``mask`` ``(B, S)``, ``feature`` holds hidden states ``(B, S, D)`` and the map is over
    the tokens: ``mean_d |f|^p`` at each valid token, L2-normalised over the valid tokens of its
    sequence, and 0 at the padded ones, ``(B, S, D)`` -> ``(B, S)``.
    """
    if mask is None:
        return F.normalize(feature.float().abs().pow(p).mean(dim=1).flatten(1), dim=1)
    valid = sequence_mask(mask, feature, name=name, method="attention transfer")
    safe = torch.where(valid.unsqueeze(-1), feature.float(), 0.0)  # before |f|^p: padded garbage never enters
    return F.normalize(safe.abs().pow(p).mean(dim=-1), dim=1)  # padded tokens are 0: they add nothing to the norm


def at_loss(student_feature: Tensor, teacher_feature: Tensor, *, p: float = 2.0, mask: Tensor | None = None) -> Tensor:
    r"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

    .. math::
        \mathcal{L} = \frac{1}{B\,|S|} \sum_i \Big\lVert \frac{a_s^{(i)}}{\lVert a_s^{(i)} \rVert_2}
            - \frac{a_t^{(i)}}{\lVert a_t^{(i)} \rVert_2} \Big\rVert_2^2,
        \qquad a = \frac{1}{C} \sum_c |f_c|^p

    over the spatial positions :math:`S` (the mean of RepDistiller/mdistiller, whose recipes weigh
    it by 1000). Channel counts may differ; maps of different sizes are average-pooled to the
    smaller one.

    Sequences (a token ``mask``): the positions are the tokens and the channels the hidden
    dimension, :math:`a_i = \frac{1}{D} \sum_d |f_{i,d}|^p` at each valid token :math:`i`,
    normalised over the valid tokens of its sequence; the squared distances are summed over the
    valid tokens and divided by their number :math:`N_{valid}` (in place of :math:`B\,|S|`).
    Without padding this is :func:`at_loss` on the transposed features ``(B, D, S)``. Hidden sizes
    may differ; the sequence lengths are the mask's.

    Args:
        student_feature: the student's feature (no adapter: channel counts and hidden sizes may differ).
        teacher_feature: the teacher's.
        p: the exponent of the activations, > 0 (2 in the paper).
        mask: ``(B, S)``, True at the valid tokens: the features are sequences ``(B, S, D)``.

    Shape:
        - student_feature: :math:`(B, C_s, *S_s)`; teacher_feature: :math:`(B, C_t, *S_t)`, with at
          least one spatial dimension. With a mask: :math:`(B, S, D_s)` and :math:`(B, S, D_t)`.
        - mask: :math:`(B, S)`. Output: scalar, float32.

    Raises:
        ValueError: for features without spatial dimensions (e.g. an MLP's), or of different ranks;
            with a mask, for features that are not ``(B, S, D)`` with the mask's ``(B, S)``.
        TypeError: for a ``mask`` that is not a bool or integer tensor.

    Example::

        >>> f = torch.rand(2, 4, 8)
        >>> at_loss(f, f).item()
        0.0
        >>> mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
        >>> g = f.clone()
        >>> g[0, 2:] = 1e30  # padded tokens: ignored
        >>> at_loss(g, f, mask=mask).item()
        0.0
    """
    _check_batch(student_feature, teacher_feature, "attention transfer")
    if mask is not None:
        a_s = attention_map(student_feature, p, mask=mask, name="student")  # (B, S)
        a_t = attention_map(teacher_feature, p, mask=mask, name="teacher")
        count = sequence_mask(mask, student_feature).sum()
        # padded tokens are 0 in both maps: they add 0 to the sum
        return (a_s - a_t).pow(2).sum() / count.clamp(min=1)
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


def sequence_embeddings(feature: Tensor, mask: Tensor, *, name: str = "feature") -> Tensor:
    """The mean of the hidden states ``(B, S, D)`` over each sequence's valid tokens, ``(B', D)`` float32.

    Sequences without a valid token have no embedding: they are left out (``B' <= B``).
    """
    valid = sequence_mask(mask, feature, name=name, method="RKD").unsqueeze(-1)  # (B, S, 1)
    total = torch.where(valid, feature.float(), 0.0).sum(dim=1)  # (B, D)
    count = valid.sum(dim=1)  # (B, 1)
    keep = count.squeeze(1) > 0
    return (total / count.clamp(min=1))[keep]


def rkd_loss(
    student_feature: Tensor, teacher_feature: Tensor, *, distance_weight: float = 25.0, angle_weight: float = 50.0,
    mask: Tensor | None = None,
) -> Tensor:
    r"""Relational KD (Park et al., "Relational Knowledge Distillation", CVPR 2019): distance and angle.

    .. math::
        \mathcal{L} = w_d \sum_{i \ne j} \ell_\delta\!\Big(\frac{\lVert s_i - s_j \rVert}{\mu_s},
            \frac{\lVert t_i - t_j \rVert}{\mu_t}\Big) \Big/ B^2
          + w_a \sum_{i,j,k} \ell_\delta\big(\cos\angle_s(i,j,k), \cos\angle_t(i,j,k)\big) \Big/ B^3

    on the flattened features (any widths: only relations inside the batch are compared), with
    :math:`\mu` the mean off-diagonal distance and :math:`\ell_\delta` the Huber (smooth L1) loss.
    Defaults ``w_d = 25``, ``w_a = 50`` as in the paper. The angle term costs :math:`O(B^2 D)` memory.

    Sequences (a token ``mask``): the relations are between the sequences of the batch, as Park et
    al.'s are between samples, each sequence embedded as the mean of its hidden states over its
    valid tokens (:func:`sequence_embeddings`); a sequence without a valid token is left out of the
    batch. (Relations between tokens would cost :math:`O((BS)^3)` for the angles.)

    Args:
        student_feature: the student's feature (no adapter: widths may differ).
        teacher_feature: the teacher's.
        distance_weight: :math:`w_d \ge 0`.
        angle_weight: :math:`w_a \ge 0`.
        mask: ``(B, S)``, True at the valid tokens: the features are sequences ``(B, S, D)``.

    Shape:
        - student_feature: :math:`(B, *)`; teacher_feature: :math:`(B, *)`. With a mask:
          :math:`(B, S, D_s)` and :math:`(B, S, D_t)`.
        - mask: :math:`(B, S)`. Output: scalar, float32.

    Raises:
        ValueError: if the batch sizes differ; with a mask, for features that are not ``(B, S, D)``
            with the mask's ``(B, S)``.
        TypeError: for a ``mask`` that is not a bool or integer tensor.

    Example::

        >>> e = torch.randn(5, 3)
        >>> round(rkd_loss(e, 2 * e).item(), 6)  # relations are scale-free
        0.0
    """
    _check_batch(student_feature, teacher_feature, "RKD")
    if mask is None:
        s, t = student_feature.float().flatten(1), teacher_feature.float().flatten(1)
    else:
        s, t = sequence_embeddings(student_feature, mask, name="student"), sequence_embeddings(teacher_feature, mask, name="teacher")
        if s.shape[0] == 0:  # no valid token: no relation (and the mean of none is NaN)
            return _graph_zero(student_feature)
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
    kind (see :func:`build_adapter`). Sequence features (a token mask, see
    :func:`~lightning_kd.features.feature_layout`) always get a ``Linear`` on their last dimension.

    Args:
        adapter: ``"auto"``, ``"linear"`` (last dimension: hidden states ``(B, S, D)``) or ``"conv"``
            (refused for sequence features).

    Raises:
        ValueError: for an unknown ``adapter``.
    """

    needs_adapter: ClassVar[bool] = True
    accepts_mask: ClassVar[bool] = True

    def __init__(self, adapter: Literal["auto", "linear", "conv"] = "auto") -> None:
        super().__init__()
        if adapter not in ("auto", "linear", "conv"):
            raise ValueError(f"Unknown adapter {adapter!r}. Expected one of auto, linear, conv.")
        self.adapter = adapter

    def forward(self, student_feature: Tensor, teacher_feature: Tensor, *, mask: Tensor | None = None) -> Tensor:
        return fitnet_loss(student_feature, teacher_feature, mask=mask)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter!r}"


class ATLoss(nn.Module):
    """Attention transfer as a module: :func:`at_loss` with the exponent ``p`` fixed.

    Example::

        >>> f = torch.rand(2, 4, 8)
        >>> ATLoss(p=2.0)(f, f).item()
        0.0
    """

    needs_adapter: ClassVar[bool] = False
    accepts_mask: ClassVar[bool] = True

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = check_number(p, "p")
        if not (math.isfinite(self.p) and self.p > 0):  # |f|^p with p <= 0 is 1 or infinite where f = 0: no attention
            raise ValueError(f"Expected `p` to be a finite number > 0 (Zagoruyko & Komodakis use 2), but got {p}.")

    def forward(self, student_feature: Tensor, teacher_feature: Tensor, *, mask: Tensor | None = None) -> Tensor:
        return at_loss(student_feature, teacher_feature, p=self.p, mask=mask)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class RKDLoss(nn.Module):
    """Relational KD as a module: :func:`rkd_loss` with its two weights fixed.

    Example::

        >>> e = torch.randn(5, 3)
        >>> round(RKDLoss()(e, 2 * e).item(), 6)
        0.0
    """

    needs_adapter: ClassVar[bool] = False
    accepts_mask: ClassVar[bool] = True

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight, self.angle_weight = check_number(distance_weight, "distance_weight"), check_number(angle_weight, "angle_weight")
        for name, value in (("distance_weight", self.distance_weight), ("angle_weight", self.angle_weight)):
            if not (math.isfinite(value) and value >= 0):  # a negative weight would reward the student for moving away
                raise ValueError(f"Expected `{name}` to be a finite number >= 0 (Park et al. use 25 and 50), but got {value}.")

    def forward(self, student_feature: Tensor, teacher_feature: Tensor, *, mask: Tensor | None = None) -> Tensor:
        return rkd_loss(student_feature, teacher_feature, distance_weight=self.distance_weight, angle_weight=self.angle_weight, mask=mask)

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"
