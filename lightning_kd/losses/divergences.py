r"""The other divergences between teacher and student distributions: reverse KL, generalised JSD, skew KL.

The language-model distillation family (GKD, DistiLLM, MiniLLM), where forward KL's mass-covering
behaviour is not always what one wants. Each is a sum over classes per position, averaged over the
(valid) positions with the same float32 log-softmax and masked mean as :func:`kd_loss`.

With :math:`p_t = \mathrm{softmax}(z_t / T)`, :math:`p_s = \mathrm{softmax}(z_s / T)`:

- reverse KL: :math:`\mathrm{KL}(p_s \| p_t)` (mode seeking; infinite where the teacher gives a
  class zero probability and the student does not);
- generalised JSD (Agarwal et al., "On-Policy Distillation of Language Models", ICLR 2024):
  :math:`\beta\,\mathrm{KL}(p_t \| m) + (1 - \beta)\,\mathrm{KL}(p_s \| m)` with
  :math:`m = \beta p_t + (1 - \beta) p_s`; divided by :math:`\beta` it tends to forward KL as
  :math:`\beta \to 0`, divided by :math:`1 - \beta` to reverse KL as :math:`\beta \to 1`. At the
  ends themselves TRL's convention holds: :math:`\beta = 0` *is* forward KL, :math:`\beta = 1`
  reverse KL;
- skew KL (Ko et al., "DistiLLM", ICML 2024): :math:`\mathrm{KL}(p_t \| \lambda p_t + (1 - \lambda) p_s)`,
  forward KL at :math:`\lambda = 0`, bounded by :math:`-\log \lambda` for :math:`\lambda > 0`.

Like :func:`kd_loss` they multiply by :math:`T^2` unless ``scale_by_t2=False`` (no-op at the
default ``T = 1``, the LM recipes' setting), and like it they treat a class whose logit is ``-inf``
in both models (a padded vocabulary) as absent: the value and the other classes' gradients are
those of the unpadded logits, the padded classes' gradient is zero.

Each divergence is also exposed per position, from the float32 log-probabilities
(:func:`reverse_kl_per_position`, :func:`jsd_per_position`, :func:`skew_kl_per_position`): the
losses here and the fused linear loss (:mod:`lightning_kd.losses.fused`) share that code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_kd.losses._reduction import Temperature, kl_sum, log_prob_pair, masked_mean, scale_by_temperature
from lightning_kd.losses.base import LogitLoss
from lightning_kd.losses.ctkd import LearnableTemperature


def _log_mixture(log_p: Tensor, log_q: Tensor, weight: float) -> Tensor:
    """``log(weight · p + (1 − weight) · q)``, stable, exact at ``weight`` 0 and 1.

    ``logaddexp(-inf, -inf)`` has a NaN gradient, so ``-inf`` terms (a class masked in both models,
    or a zero weight) enter as the lowest float instead: clamping passes them a zero gradient and
    leaves every finite value as it is. Where both terms are ``-inf`` the result is that lowest
    float (about ``-3.4e38``), not ``-inf``; :func:`kl_sum` gives such classes zero weight either way.
    """
    log_w = math.log(weight) if weight > 0 else -math.inf
    log_1mw = math.log1p(-weight) if weight < 1 else -math.inf
    lowest = torch.finfo(log_p.dtype).min
    return torch.logaddexp((log_p + log_w).clamp(min=lowest), (log_q + log_1mw).clamp(min=lowest))


def _finish(per_position: Tensor, mask: Tensor | None, like: Tensor, temperature: Temperature, scale_by_t2: bool) -> Tensor:
    return scale_by_temperature(masked_mean(per_position, mask, like), temperature, scale_by_t2)


def _check_unit(name: str, value: float, *, low_open: bool, high_open: bool) -> None:
    # NaN fails both comparisons, inf the upper one: neither gets through
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (low_ok and high_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"Expected `{name}` to be in {interval}, but got {value}.")


def reverse_kl_per_position(log_p_s: Tensor, log_p_t: Tensor) -> Tensor:
    r""":math:`\mathrm{KL}(p_s \| p_t)` per position, from float32 log-probabilities ``(..., C)``; shape ``(...)``."""
    return kl_sum(log_p_s, log_p_t)


def jsd_per_position(log_p_s: Tensor, log_p_t: Tensor, beta: float) -> Tensor:
    r"""The generalised JSD per position, from float32 log-probabilities ``(..., C)``; shape ``(...)``.

    ``beta = 0`` is exactly forward KL :math:`\mathrm{KL}(p_t \| p_s)` and ``beta = 1`` exactly
    reverse KL :math:`\mathrm{KL}(p_s \| p_t)` (TRL's convention); in between, the mixture form.
    ``beta`` is not checked here (the losses check it).
    """
    if beta == 0:
        return kl_sum(log_p_t, log_p_s)
    if beta == 1:
        return kl_sum(log_p_s, log_p_t)
    log_m = _log_mixture(log_p_t, log_p_s, beta)
    return beta * kl_sum(log_p_t, log_m) + (1.0 - beta) * kl_sum(log_p_s, log_m)


def skew_kl_per_position(log_p_s: Tensor, log_p_t: Tensor, skew: float) -> Tensor:
    r""":math:`\mathrm{KL}(p_t \| \lambda p_t + (1 - \lambda) p_s)` per position (``skew`` = :math:`\lambda`, not checked here)."""
    return kl_sum(log_p_t, _log_mixture(log_p_t, log_p_s, skew))


def reverse_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: Temperature = 1.0,
    mask: Tensor | None = None,
    scale_by_t2: bool = True,
    standardize: bool = False,
) -> Tensor:
    r"""Reverse KL, :math:`\mathrm{KL}(p_s \| p_t)`, averaged over the valid positions.

    .. math::
        \mathcal{L} = T^2 \cdot \frac{1}{|M|} \sum_{i \in M} \sum_c p^s_{i,c} \left(\log p^s_{i,c} - \log p^t_{i,c}\right)

    Shape:
        - student_logits, teacher_logits: :math:`(N, C)` or :math:`(B, S, C)`, equal shapes.
        - mask: ``student_logits.shape[:-1]`` (bool, True = counts), optional. Output: scalar, float32.

    Args:
        student_logits: the student's logits (the distribution being trained).
        teacher_logits: the teacher's logits.
        temperature: :math:`T > 0`, finite, divides both logits.
        mask: positions to average over.
        scale_by_t2: multiply by :math:`T^2`.
        standardize: z-score both logit vectors first (logit standardisation).

    Raises:
        ValueError: if the shapes differ, ``temperature`` is not a finite number > 0 or the mask
            has the wrong shape.

    Example::

        >>> s, t = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]])
        >>> round(reverse_kl_loss(s, t).item(), 4)
        1.1504
    """
    log_p_s, log_p_t = log_prob_pair(student_logits, teacher_logits, temperature, standardize)
    return _finish(reverse_kl_per_position(log_p_s, log_p_t), mask, student_logits, temperature, scale_by_t2)


def jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    temperature: Temperature = 1.0,
    mask: Tensor | None = None,
    scale_by_t2: bool = True,
    standardize: bool = False,
) -> Tensor:
    r"""Generalised Jensen-Shannon divergence of GKD (Agarwal et al., ICLR 2024).

    .. math::
        \mathcal{L} = T^2 \cdot \frac{1}{|M|} \sum_{i \in M}
            \beta\,\mathrm{KL}(p^t_i \| m_i) + (1 - \beta)\,\mathrm{KL}(p^s_i \| m_i),
        \qquad m = \beta p^t + (1 - \beta) p^s

    ``beta = 0.5`` is the symmetric JSD. The mixture form vanishes towards both ends: as
    ``beta → 0`` it behaves as ``beta ·`` forward KL, as ``beta → 1`` as ``(1 − beta) ·`` reverse KL.
    The ends themselves follow TRL's convention (TRL ≥ 0.16): ``beta = 0`` is exactly forward KL,
    :math:`\mathrm{KL}(p_t \| p_s)` (:func:`kd_loss` at the same ``T`` and ``scale_by_t2``), and
    ``beta = 1`` exactly reverse KL, :math:`\mathrm{KL}(p_s \| p_t)` (:func:`reverse_kl_loss`). So
    the loss jumps at the ends: ``beta = 1e-6`` gives about ``1e-6 ·`` forward KL, ``beta = 0`` all of it.

    Shape:
        - student_logits, teacher_logits: :math:`(N, C)` or :math:`(B, S, C)`, equal shapes.
        - mask: ``student_logits.shape[:-1]``, optional. Output: scalar, float32.

    Args:
        student_logits: the student's logits.
        teacher_logits: the teacher's logits.
        beta: the teacher's weight in the mixture, in [0, 1]; 0 is forward KL, 1 reverse KL.
        temperature: :math:`T > 0`, finite, divides both logits.
        mask: positions to average over.
        scale_by_t2: multiply by :math:`T^2`.
        standardize: z-score both logit vectors first.

    Raises:
        ValueError: if ``beta`` is not in [0, 1] (NaN included), the shapes differ, ``temperature``
            is not a finite number > 0 or the mask has the wrong shape.

    Example::

        >>> s, t = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]])
        >>> round(jsd_loss(s, t).item(), 4)
        0.2476
    """
    _check_unit("beta", beta, low_open=False, high_open=False)
    log_p_s, log_p_t = log_prob_pair(student_logits, teacher_logits, temperature, standardize)
    return _finish(jsd_per_position(log_p_s, log_p_t, beta), mask, student_logits, temperature, scale_by_t2)


def skew_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    skew: float = 0.1,
    temperature: Temperature = 1.0,
    mask: Tensor | None = None,
    scale_by_t2: bool = True,
    standardize: bool = False,
) -> Tensor:
    r"""Skew KL of DistiLLM (Ko et al., ICML 2024): forward KL against a teacher-student mixture.

    .. math::
        \mathcal{L} = T^2 \cdot \frac{1}{|M|} \sum_{i \in M}
            \mathrm{KL}\big(p^t_i \,\|\, \lambda p^t_i + (1 - \lambda) p^s_i\big)

    ``skew = 0`` is forward KL (:func:`kd_loss` with the same ``T``); a positive ``skew`` bounds
    the loss and its gradients where the student gives a teacher class almost no mass.

    Shape:
        - student_logits, teacher_logits: :math:`(N, C)` or :math:`(B, S, C)`, equal shapes.
        - mask: ``student_logits.shape[:-1]``, optional. Output: scalar, float32.

    Args:
        student_logits: the student's logits.
        teacher_logits: the teacher's logits.
        skew: :math:`\lambda \in [0, 1)`, the teacher's weight in the mixture.
        temperature: :math:`T > 0`, finite, divides both logits.
        mask: positions to average over.
        scale_by_t2: multiply by :math:`T^2`.
        standardize: z-score both logit vectors first.

    Raises:
        ValueError: if ``skew`` is not in [0, 1) (NaN included), the shapes differ, ``temperature``
            is not a finite number > 0 or the mask has the wrong shape.

    Example::

        >>> s, t = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]])
        >>> round(skew_kl_loss(s, t, skew=0.1).item(), 4)
        0.8299
    """
    _check_unit("skew", skew, low_open=False, high_open=True)
    log_p_s, log_p_t = log_prob_pair(student_logits, teacher_logits, temperature, standardize)
    return _finish(skew_kl_per_position(log_p_s, log_p_t, skew), mask, student_logits, temperature, scale_by_t2)


class ReverseKLLoss(LogitLoss):
    """Reverse KL as a module: :func:`reverse_kl_loss` (mode seeking; MiniLLM's objective).

    Example::

        >>> s, t = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]])
        >>> round(ReverseKLLoss()(s, t).item(), 4)
        1.1504
    """

    def __init__(self, temperature: float | LearnableTemperature = 1.0, *, scale_by_t2: bool = True, standardize: bool = False) -> None:
        super().__init__(temperature, scale_by_t2=scale_by_t2, standardize=standardize)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor | None = None, *, mask: Tensor | None = None) -> Tensor:
        return reverse_kl_loss(student_logits, teacher_logits, mask=mask, **self._shared())


class JSDLoss(LogitLoss):
    """The generalised JSD of GKD as a module: :func:`jsd_loss` with ``beta`` fixed at construction.

    ``beta = 0`` is exactly forward KL and ``beta = 1`` exactly reverse KL (TRL's convention).

    Raises:
        ValueError: if ``beta`` is not in [0, 1], or the temperature is invalid.

    Example::

        >>> s, t = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]])
        >>> round(JSDLoss(beta=0.5)(s, t).item(), 4)
        0.2476
    """

    def __init__(
        self, temperature: float | LearnableTemperature = 1.0, *, beta: float = 0.5, scale_by_t2: bool = True, standardize: bool = False
    ) -> None:
        _check_unit("beta", beta, low_open=False, high_open=False)
        super().__init__(temperature, scale_by_t2=scale_by_t2, standardize=standardize)
        self.beta = float(beta)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor | None = None, *, mask: Tensor | None = None) -> Tensor:
        return jsd_loss(student_logits, teacher_logits, beta=self.beta, mask=mask, **self._shared())

    def _options(self) -> dict[str, float]:
        return {"beta": self.beta}


class SkewKLLoss(LogitLoss):
    """The skew KL of DistiLLM as a module: :func:`skew_kl_loss` with ``skew`` fixed at construction.

    Raises:
        ValueError: if ``skew`` is not in [0, 1), or the temperature is invalid.

    Example::

        >>> s, t = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]])
        >>> round(SkewKLLoss(skew=0.1)(s, t).item(), 4)
        0.8299
    """

    def __init__(
        self, temperature: float | LearnableTemperature = 1.0, *, skew: float = 0.1, scale_by_t2: bool = True, standardize: bool = False
    ) -> None:
        _check_unit("skew", skew, low_open=False, high_open=True)
        super().__init__(temperature, scale_by_t2=scale_by_t2, standardize=standardize)
        self.skew = float(skew)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor | None = None, *, mask: Tensor | None = None) -> Tensor:
        return skew_kl_loss(student_logits, teacher_logits, skew=self.skew, mask=mask, **self._shared())

    def _options(self) -> dict[str, float]:
        return {"skew": self.skew}
