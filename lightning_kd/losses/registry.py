"""The logit losses by name, for :class:`~lightning_kd.DistillationModule` and the configs.

One calling convention for all of them, so that the module's temperature, ``T²`` switch and
logit standardisation apply to every loss the same way.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from torch import Tensor

from lightning_kd.losses._reduction import Temperature
from lightning_kd.losses.divergences import jsd_loss, reverse_kl_loss, skew_kl_loss
from lightning_kd.losses.dist import dist_loss
from lightning_kd.losses.dkd import dkd_loss
from lightning_kd.losses.kd import kd_loss, soft_mse_loss

SOFT_LOSSES: dict[str, Callable[..., Tensor]] = {
    "kl": kd_loss,
    "mse": soft_mse_loss,
    "reverse_kl": reverse_kl_loss,
    "jsd": jsd_loss,
    "skew_kl": skew_kl_loss,
    "dkd": dkd_loss,
    "dist": dist_loss,
}
NEEDS_TARGETS = ("dkd",)  # a target class per position
_SHARED = ("student_logits", "teacher_logits", "targets", "temperature", "mask", "scale_by_t2", "standardize")


def soft_loss_options(name: str) -> tuple[str, ...]:
    """The options of soft loss ``name`` beyond the shared ones (e.g. ``("alpha", "beta")`` for ``"dkd"``)."""
    return tuple(p for p in inspect.signature(SOFT_LOSSES[name]).parameters if p not in _SHARED)


def check_soft_loss(name: str, options: Mapping[str, Any]) -> None:
    """Raise a clear error for an unknown loss name or an option that the loss does not take."""
    if name not in SOFT_LOSSES:
        raise ValueError(f"Unknown `soft_loss` {name!r}. Expected one of {', '.join(SOFT_LOSSES)}.")
    allowed = soft_loss_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"Unknown `soft_loss_options` {unknown} for soft_loss={name!r}. Expected any of: {', '.join(allowed) or 'none'}."
        )


def compute_soft_loss(
    name: str,
    student_logits: Tensor,
    teacher_logits: Any,
    targets: Tensor | None = None,
    *,
    temperature: Temperature = 1.0,
    scale_by_t2: bool = True,
    standardize: bool = False,
    options: Mapping[str, Any] | None = None,
) -> Tensor:
    """Soft loss ``name`` with the shared settings; ``mse`` ignores ``temperature`` and ``scale_by_t2``."""
    fn = SOFT_LOSSES[name]
    kwargs = dict(options or {})
    if name != "mse":
        kwargs.update(temperature=temperature, scale_by_t2=scale_by_t2)
    if name in NEEDS_TARGETS:
        if targets is None:
            raise ValueError(f"soft_loss={name!r} needs a target class per position, but the batch has no targets.")
        return fn(student_logits, teacher_logits, targets, standardize=standardize, **kwargs)
    return fn(student_logits, teacher_logits, standardize=standardize, **kwargs)
