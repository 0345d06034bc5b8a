"""The pieces every loss shares: float32 log-probabilities, the KL sum, checks and the masked mean.

Plain torch, no Lightning: a user can call the losses in their own training loop.

Masked classes: a class whose logit is ``-inf`` in *both* models (a padded vocabulary) has
probability zero on both sides, and every loss treats it as absent: the value is the loss on the
other classes, and its gradient is exactly zero. The guards replace ``-inf`` entries *before* an
operation whose gradient would multiply by ``inf`` or NaN (``where`` on its input, ``masked_fill``,
``clamp``): a ``where`` on its output alone still sends ``0 · NaN = NaN`` back through the branch
it dropped.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_kd._checks import check_bool


Temperature = float | Tensor  # a Tensor for a learned temperature (CTKD), a 0-d or broadcastable one


def standardize_logits(logits: Tensor) -> Tensor:
    r"""Z-score each logit vector over its classes, in float32 (Sun et al., "Logit Standardization
    in Knowledge Distillation", CVPR 2024): :math:`(z - \bar z) / (\sigma(z) + 10^{-7})`, with the
    unbiased standard deviation as in the paper's code. The student then has to match the shape of
    the teacher's logits, not their scale.

    ``-inf`` logits (masked classes) stay ``-inf`` and are left out of the mean and the standard
    deviation: a padded vector is standardised as if the padding were not there.
    """
    z = logits.float()
    masked = z == -math.inf
    safe = torch.where(masked, 0.0, z)  # before any arithmetic, so that masked entries get a zero gradient
    count = (~masked).sum(dim=-1, keepdim=True)
    # the plain mean times C / count: times exactly 1.0 in rows without a masked class
    mean = safe.mean(dim=-1, keepdim=True) * (z.shape[-1] / count.clamp(min=1))
    centred = torch.where(masked, 0.0, safe - mean)
    var = centred.pow(2).sum(dim=-1, keepdim=True) / (count - 1).clamp(min=1)
    positive = var > 0  # sqrt'(0) is infinite: a constant row gets a zero gradient, as torch.std gives
    masked_std = torch.where(positive, torch.where(positive, var, 1.0).sqrt(), 0.0)
    # rows without a masked class keep torch.std, bit for bit
    std = torch.where(masked.any(dim=-1, keepdim=True), masked_std, safe.std(dim=-1, keepdim=True))
    return torch.where(masked, z, (safe - mean) / (std + 1e-7))


def divide_by_temperature(z: Tensor, temperature: Temperature) -> Tensor:
    """``z / T``, with a zero (not NaN) gradient for a learned ``T`` from the ``-inf`` entries of ``z``."""
    if isinstance(temperature, Tensor) and temperature.requires_grad:
        masked = z == -math.inf  # d(z/T)/dT = -z/T² would be 0 · inf = NaN there
        return torch.where(masked, z, torch.where(masked, 0.0, z) / temperature)
    return z / temperature


def log_probs(logits: Tensor, temperature: Temperature = 1.0, *, standardize: bool = False) -> Tensor:
    """Float32 ``log_softmax(logits / T)`` over the last dimension (of the z-scored logits with ``standardize``).

    Logits are upcast *before* the division: all-bf16 KL can be off by more than 30 %
    (float32 math on the same bf16 logits stays within ~0.2 %), and CPU bf16 autocast keeps
    ``log_softmax`` in bf16 otherwise.
    Every logit loss goes through this one function. ``-inf`` logits give ``-inf``; a position
    whose logits are *all* ``-inf`` has no distribution and gives NaN.
    """
    z = standardize_logits(logits) if check_bool(standardize, "standardize") else logits.float()
    return torch.log_softmax(divide_by_temperature(z, temperature), dim=-1)


def kl_sum(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)`` over the last dimension, from log-probabilities.

    Classes with ``p_c = 0`` contribute exactly zero with a zero gradient, also where ``log q_c``
    is ``-inf`` too (a class masked in both), instead of ``0 · (−inf) = NaN``. A class with
    ``p_c > 0`` and ``log q_c = -inf`` gives ``+inf``: the divergence is infinite.
    """
    p = log_p.exp()
    # subtraction passes a zero gradient through unchanged, so the unselected -inf - (-inf) = NaN cannot leak
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(p))
    return (p * diff).sum(dim=-1)


def empty_safe_logsumexp(x: Tensor, dim: int = -1) -> Tensor:
    """``torch.logsumexp(x, dim, keepdim=True)`` whose gradient is zero, not NaN, where all of ``x`` is ``-inf``."""
    empty = (x == -math.inf).all(dim=dim, keepdim=True)
    return torch.logsumexp(x.masked_fill(empty, 0.0), dim=dim, keepdim=True).masked_fill(empty, -math.inf)


def check_pair(student: Tensor, teacher: Tensor) -> None:
    """Raise a clear error when student and teacher outputs cannot be compared."""
    if student.shape != teacher.shape:
        raise ValueError(
            "Expected student and teacher outputs of the same shape, but got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}. Both models must predict "
            "the same classes (e.g. the same `num_classes`) on the same inputs."
        )
    if student.dim() < 2:
        raise ValueError(
            f"Expected logits of shape (N, C) or (B, S, C), but got shape {tuple(student.shape)}."
        )


def check_temperature(temperature: Temperature) -> None:
    """Refuse a temperature that is not a finite number > 0.

    A tensor that requires grad (a learned temperature, see :mod:`lightning_kd.losses.ctkd`) is
    not read: its parametrisation keeps it in range, and reading it would stall the device every
    step. Any other tensor is a user's constant and is checked, at the cost of one host read.
    """
    if isinstance(temperature, Tensor):
        if temperature.requires_grad:
            return
        t = temperature.detach()
        ok = torch.isfinite(t) & (t > 0)
        if bool(ok.all()):
            return
        value = t[~ok].flatten()[0].item()
    else:
        value = temperature
        if math.isfinite(value) and value > 0:
            return
    if not math.isfinite(value):
        raise ValueError(f"Expected `temperature` to be a finite number > 0, but got {value}.")
    raise ValueError(f"Expected `temperature` to be > 0, but got {value}.")


def check_weight(name: str, value: float) -> None:
    """Refuse a loss weight (DKD's ``alpha``/``beta``, DIST's ``beta``/``gamma``) that is not finite and >= 0."""
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"Expected `{name}` to be a finite number >= 0, but got {value}.")


def check_mask(mask: Tensor, shape: torch.Size) -> None:
    """Raise a clear error when ``mask`` does not have ``shape`` (the logits without their last dimension)."""
    if mask.shape != shape:
        raise ValueError(
            f"Expected `mask` of shape {tuple(shape)} (the logits without their last dimension), but got {tuple(mask.shape)}."
        )


def log_prob_pair(
    student_logits: Tensor, teacher_logits: Tensor, temperature: Temperature, standardize: bool
) -> tuple[Tensor, Tensor]:
    """Checked, float32 ``(log p_s, log p_t)`` at temperature ``T``: the start of every full-logit loss."""
    check_pair(student_logits, teacher_logits)
    check_temperature(temperature)
    return (
        log_probs(student_logits, temperature, standardize=standardize),
        log_probs(teacher_logits, temperature, standardize=standardize),
    )


def masked_in_both(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Bool ``(..., C)``: the classes that are ``-inf`` in both models (absent from the loss)."""
    return (student_logits == -math.inf) & (teacher_logits == -math.inf)


def masked_mean(per_position: Tensor, mask: Tensor | None, like: Tensor) -> Tensor:
    """Mean of ``per_position`` over the positions where ``mask`` is True.

    Args:
        per_position: a loss per position, shape ``logits.shape[:-1]``.
        mask: bool tensor of the same shape (True = counts), or None for all positions.
        like: a tensor of the graph (the student logits). A batch with no valid position (all
            masked, or zero positions) gives a zero that is connected to the graphs of ``like``
            and ``per_position``: ``backward()`` works and gives zero gradients. It is 0, not NaN,
            whatever ``like`` holds (``-inf`` included), as long as ``per_position`` is not NaN
            at a masked position: masked positions are selected out with ``torch.where``, not multiplied.
    """
    # a sum over no element: on like's graph, but it reads no value, so -inf/NaN in `like` cannot reach it
    zero = like[..., :0].float().sum()
    if mask is None:
        # the mean of no position is 0/0; the sum of none is a graph-connected 0
        return (per_position.mean() if per_position.numel() else per_position.sum()) + zero
    check_mask(mask, per_position.shape)
    mask = mask.to(torch.bool)
    count = mask.sum()
    total = torch.where(mask, per_position, torch.zeros_like(per_position)).sum()
    return total / count.clamp(min=1) + zero


def scale_by_temperature(loss: Tensor, temperature: Temperature, enabled: bool) -> Tensor:
    """``T² · loss`` (Hinton et al.: keeps the gradient scale independent of ``T``) when ``enabled``."""
    return loss * (temperature**2) if check_bool(enabled, "scale_by_t2") else loss
