"""Distillation losses as pure functions (plain torch) with thin ``nn.Module`` twins.

Logit losses share one float32 log-softmax (:func:`log_probs`, with optional logit
standardisation) and one masked mean; every one takes ``(student, teacher, ...)`` in that order.
"""

from lightning_kd.losses._reduction import kl_sum, log_probs, masked_mean, standardize_logits
from lightning_kd.losses.ctkd import LearnableTemperature, reverse_gradient
from lightning_kd.losses.dist import dist_loss
from lightning_kd.losses.divergences import jsd_loss, reverse_kl_loss, skew_kl_loss
from lightning_kd.losses.dkd import dkd_loss
from lightning_kd.losses.feature import at_loss, attention_map, build_adapter, fitnet_loss, rkd_loss
from lightning_kd.losses.hard import HARD_LOSSES, IGNORE_INDEX, cross_entropy_loss, get_hard_loss, mse_loss
from lightning_kd.losses.kd import KDLoss, check_teacher, kd_loss, kl_per_position, soft_mse_loss
from lightning_kd.losses.registry import NEEDS_TARGETS, SOFT_LOSSES, check_soft_loss, compute_soft_loss, soft_loss_options
from lightning_kd.losses.topk import TopKLogits

__all__ = [
    "HARD_LOSSES",
    "IGNORE_INDEX",
    "NEEDS_TARGETS",
    "SOFT_LOSSES",
    "KDLoss",
    "LearnableTemperature",
    "TopKLogits",
    "at_loss",
    "attention_map",
    "build_adapter",
    "check_soft_loss",
    "check_teacher",
    "compute_soft_loss",
    "cross_entropy_loss",
    "dist_loss",
    "dkd_loss",
    "fitnet_loss",
    "get_hard_loss",
    "jsd_loss",
    "kd_loss",
    "kl_per_position",
    "kl_sum",
    "log_probs",
    "masked_mean",
    "mse_loss",
    "reverse_gradient",
    "reverse_kl_loss",
    "rkd_loss",
    "skew_kl_loss",
    "soft_loss_options",
    "soft_mse_loss",
    "standardize_logits",
]
