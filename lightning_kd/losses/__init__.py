"""Distillation losses as pure functions (plain torch) with thin ``nn.Module`` twins."""

from lightning_kd.losses.hard import HARD_LOSSES, IGNORE_INDEX, cross_entropy_loss, get_hard_loss, mse_loss
from lightning_kd.losses.kd import KDLoss, check_teacher, kd_loss, kl_per_position, soft_mse_loss
from lightning_kd.losses.topk import TopKLogits

SOFT_LOSSES = ("kl", "mse")

__all__ = [
    "HARD_LOSSES",
    "IGNORE_INDEX",
    "SOFT_LOSSES",
    "KDLoss",
    "TopKLogits",
    "check_teacher",
    "cross_entropy_loss",
    "get_hard_loss",
    "kd_loss",
    "kl_per_position",
    "mse_loss",
    "soft_mse_loss",
]
