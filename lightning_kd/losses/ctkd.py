r"""Curriculum temperature (Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023).

The temperature becomes a parameter, :math:`T = T_{\min} + T_{\text{range}} \cdot \sigma(\theta)`,
trained *adversarially*: a gradient-reversal layer (Ganin & Lempitsky, 2015) flips the sign of its
gradient, so that the student minimises the distillation loss while :math:`T` moves to make it
harder. The reversal weight :math:`\lambda` ramps up from 0 (a curriculum: easy first), which the
annealing callback does by scheduling the module's ``grl_weight``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: float) -> Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.weight * grad, None


def reverse_gradient(x: Tensor, weight: float = 1.0) -> Tensor:
    """Identity forward; the gradient is multiplied by ``-weight`` on the way back."""
    return _GradientReversal.apply(x, float(weight))


class LearnableTemperature(nn.Module):
    r"""A global temperature :math:`T = T_{\min} + T_{\text{range}} \cdot \sigma(\theta)`, learned through gradient reversal.

    ``forward()`` returns :math:`T` as a 0-d tensor whose gradient reaches :math:`\theta` multiplied
    by ``-grl_weight``: the optimizer that minimises the distillation loss maximises it in :math:`T`.
    Give it to a loss as its temperature (``KDLoss(temperature=LearnableTemperature())``): it is then
    a submodule of the loss, and :math:`\theta` trains with the student. The curriculum ramps
    ``grl_weight`` from 0 to 1 (``DistillationAnnealing(schedules={"soft_loss.temperature.grl_weight": ...})``).

    The parametrisation keeps :math:`T` in :math:`[T_{\min}, T_{\min} + T_{\text{range}}]`, so the
    losses do not read its value (that would stall the device every step): they check a
    temperature tensor only when it does not require grad. ``-inf`` logits (masked classes) send a
    zero, not NaN, gradient to :math:`\theta`.

    Args:
        initial: the starting temperature, in ``(t_min, t_min + t_range)``. None: CTKD's own start,
            :math:`\theta = 1`, i.e. :math:`T = 1 + 20\,\sigma(1) \approx 15.62` with the defaults (the
            authors' code initialises the parameter to one).
        t_min: the lowest reachable temperature (> 0). CTKD's default: 1.
        t_range: the width of the reachable range. CTKD's default: 20.
        grl_weight: the gradient-reversal weight :math:`\lambda \ge 0` (annealed 0 -> 1 by CTKD's curriculum).

    Raises:
        ValueError: if ``t_min`` or ``t_range`` is not a finite number > 0, ``initial`` is outside the
            open range (NaN included), or ``grl_weight`` is not a finite number >= 0.

    Example::

        >>> round(LearnableTemperature(initial=4.0)().item(), 4)
        4.0
        >>> round(LearnableTemperature()().item(), 2)  # CTKD's start
        15.62
    """

    def __init__(self, initial: float | None = None, *, t_min: float = 1.0, t_range: float = 20.0, grl_weight: float = 1.0) -> None:
        super().__init__()
        for name, value in (("t_min", t_min), ("t_range", t_range)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"Expected `{name}` to be a finite number > 0, but got {value}.")
        self.t_min, self.t_range = float(t_min), float(t_range)
        if initial is None:
            theta = 1.0
        elif not t_min < initial < t_min + t_range:
            raise ValueError(
                f"Expected the initial temperature to be in ({t_min}, {t_min + t_range}) (`t_min`, `t_min + t_range`), "
                f"but got {initial}."
            )
        else:
            fraction = (initial - t_min) / t_range
            theta = math.log(fraction / (1.0 - fraction))
        self.theta = nn.Parameter(torch.tensor(theta))
        self.grl_weight = grl_weight

    @property
    def grl_weight(self) -> float:
        return self._grl_weight

    @grl_weight.setter
    def grl_weight(self, value: float) -> None:
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"Expected `grl_weight` to be a finite number >= 0, but got {value}.")
        self._grl_weight = float(value)

    def forward(self) -> Tensor:
        return self.t_min + self.t_range * torch.sigmoid(reverse_gradient(self.theta, self._grl_weight))

    def extra_repr(self) -> str:
        return f"t_min={self.t_min}, t_range={self.t_range}, grl_weight={self._grl_weight}"
