r"""Sampled teacher targets: K tokens drawn from the teacher per position, with importance weights.

Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs" (ACL 2025).
A top-k cache is biased (:mod:`lightning_kd.losses.topk`): nothing tells the student how the
teacher's mass is spread outside the k kept tokens. Sampling is not. Draw
:math:`x_1, \dots, x_K \sim r` (the proposal: the teacher's own distribution :math:`p` at the
target temperature, or the teacher at another temperature), merge repeated tokens, and keep for
each distinct token :math:`x_j` its importance weight

.. math::
    w_j = \frac{n_j}{K} \, \frac{p(x_j)}{r(x_j)} \qquad (n_j = \text{how often } x_j \text{ was drawn})

so that :math:`\mathbb{E}\big[\sum_j w_j f(x_j)\big] = \sum_x p(x) f(x)` for every :math:`f`. With
:math:`r = p` the weights are the counts over K and sum to one.

The loss (:func:`sampled_kl_per_position`) at one position, with student log-probabilities
:math:`\log q = \mathrm{log\_softmax}(z_s / T)` and :math:`H(p)` the teacher's exact entropy
(stored beside the samples):

.. math::
    \ell = \sum_j w_j \big(-\log q(x_j)\big) - H(p), \qquad
    \mathbb{E}[\ell] = \mathrm{CE}(p, q) - H(p) = \mathrm{KL}(p \,\|\, q)

.. math::
    \frac{\partial \ell}{\partial z_s} = \frac{1}{T} \sum_j w_j \big(q - e_{x_j}\big), \qquad
    \mathbb{E}\Big[\frac{\partial \ell}{\partial z_s}\Big] = \frac{1}{T} (q - p)
        = \frac{\partial\, \mathrm{KL}(p \,\|\, q)}{\partial z_s}

Both the value and the gradient are unbiased estimates of forward KL's; one draw can be below
zero (the cross-entropy term is random, the entropy exact). The variance shrinks as 1/K.

Temperature: :math:`p` is the teacher at the temperature the samples were drawn for
(:attr:`SampledLogits.temperature`, recorded by the store). The weights estimate expectations
under that distribution only, so the loss runs at that temperature and refuses any other (and a
learned one): at another :math:`T` the weights :math:`p_T(x_j)/r(x_j)` would need the teacher's
full logits again.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_kd.losses._reduction import Temperature, divide_by_temperature


class SampledLogits(NamedTuple):
    """K tokens sampled from the teacher per position, in place of the full ``(..., C)`` logits.

    Slots are sorted by weight, largest first; a position whose draws repeat holds fewer distinct
    tokens than K, and its remaining slots have weight 0 (and token 0).

    Shape:
        - weights: ``(..., K)``, float, the importance weights :math:`w_j \\ge 0` (see the module docstring).
        - indices: ``(..., K)``, any integer dtype, the sampled tokens.
        - entropy: ``(...)``, float, the teacher's exact entropy :math:`H(p)` in nats at ``temperature``.
        - temperature: a float, the temperature of the teacher distribution :math:`p` the weights are for.
    """

    weights: Tensor
    indices: Tensor
    entropy: Tensor
    temperature: float = 1.0

    @property
    def k(self) -> int:
        return self.weights.shape[-1]

    def top1(self) -> Tensor:
        """The most heavily weighted sampled token per position, ``(...)``: an estimate of the teacher's top-1."""
        return self.indices[..., 0].long()

    def argmax(self, dim: int = -1) -> Tensor:
        """:meth:`top1`, under the name code written for logit tensors calls (``teacher.argmax(-1)``)."""
        if dim not in (-1, self.weights.dim() - 1):
            raise ValueError(f"SampledLogits has an argmax over its last (class) dimension only, but got dim={dim}.")
        return self.top1()

    def to(self, device: torch.device | str) -> "SampledLogits":  # type: ignore[override]
        return SampledLogits(self.weights.to(device), self.indices.to(device), self.entropy.to(device), self.temperature)


def check_sampled_pair(student: Tensor, teacher: SampledLogits, temperature: Temperature) -> None:
    """Raise a clear error when sampled teacher targets do not fit the student's logits or the temperature.

    Raises:
        ValueError: for other leading shapes, weights and indices of different shapes, or a temperature
            other than the one the samples were drawn for (a learned one included).
    """
    if student.dim() < 2:
        raise ValueError(f"Expected logits of shape (N, C) or (B, S, C), but got shape {tuple(student.shape)}.")
    if teacher.weights.shape != teacher.indices.shape or teacher.weights.shape[:-1] != student.shape[:-1] or teacher.entropy.shape != student.shape[:-1]:
        raise ValueError(
            f"Expected sampled teacher targets of shape {tuple(student.shape[:-1])} + (K,) for student logits "
            f"{tuple(student.shape)}, but got weights {tuple(teacher.weights.shape)}, indices {tuple(teacher.indices.shape)} "
            f"and entropy {tuple(teacher.entropy.shape)}."
        )
    if isinstance(temperature, Tensor) and temperature.requires_grad:
        raise ValueError(
            f"Sampled teacher targets estimate the teacher's distribution at T={teacher.temperature}, so the loss must run at "
            "that fixed temperature, but got a learned one: learn the temperature from full or top-k targets instead."
        )
    given = float(temperature)
    if not math.isclose(given, teacher.temperature, rel_tol=1e-6):
        raise ValueError(
            f"Expected `temperature` {teacher.temperature} (the sampled targets' weights are for the teacher at that "
            f"temperature), but got {given}. Set the loss's temperature to {teacher.temperature}, or build another store "
            "with `LogitSampling(temperature=...)`."
        )


def sampled_kl_per_position(student_logits: Tensor, teacher: SampledLogits, temperature: Temperature) -> Tensor:
    """The unbiased estimate :math:`\\ell` of ``KL(p_T ‖ softmax(z_s / T))`` per position (float32), see the module docstring.

    A slot of weight 0 (an empty slot) contributes exactly 0 with a zero gradient, also where the
    student's logit is ``-inf``; a sampled token the student gives ``-inf`` makes the loss ``+inf``.
    """
    log_q = torch.log_softmax(divide_by_temperature(student_logits.float(), temperature), dim=-1)
    weights = teacher.weights.float()
    picked = log_q.gather(-1, teacher.indices.long())
    # `where` on the product's input: 0 · (−inf) would be NaN, and its gradient too
    cross = -weights * torch.where(weights > 0, picked, torch.zeros_like(picked))
    return cross.sum(dim=-1) - teacher.entropy.float()
