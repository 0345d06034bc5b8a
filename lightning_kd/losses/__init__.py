"""Distillation losses: objects whose options are constructor arguments, each with a functional twin.

Plain torch (no Lightning): a user can call them in their own training loop. The logit losses
(:class:`KDLoss`, :class:`DKDLoss`, :class:`DISTLoss`, :class:`ReverseKLLoss`, :class:`JSDLoss`,
:class:`SkewKLLoss`, :class:`SoftMSELoss`) share one float32 log-softmax (:func:`log_probs`, with
optional logit standardisation) and one masked mean, take ``(student, teacher, targets=None, *,
mask=None)`` in that order, and declare what they need on the class (:class:`LogitLoss`). The
feature terms (:class:`FitNetLoss`, :class:`ATLoss`, :class:`RKDLoss`) take ``(student_feature,
teacher_feature)``; the hard terms (:class:`HardCrossEntropyLoss`, :class:`HardMSELoss`)
``(outputs, targets)``.
"""

from lightning_kd.losses._reduction import kl_sum, log_probs, masked_mean, standardize_logits
from lightning_kd.losses.base import LogitLoss
from lightning_kd.losses.ctkd import LearnableTemperature, reverse_gradient
from lightning_kd.losses.dist import DISTLoss, dist_loss
from lightning_kd.losses.divergences import JSDLoss, ReverseKLLoss, SkewKLLoss, jsd_loss, reverse_kl_loss, skew_kl_loss
from lightning_kd.losses.dkd import DKDLoss, dkd_loss
from lightning_kd.losses.feature import ATLoss, FitNetLoss, RKDLoss, at_loss, attention_map, build_adapter, fitnet_loss, rkd_loss
from lightning_kd.losses.fused import FusedLinearKDLoss, fused_linear_distillation_loss, fused_linear_kd_loss
from lightning_kd.losses.hard import IGNORE_INDEX, HardCrossEntropyLoss, HardMSELoss, cross_entropy_loss, mse_loss
from lightning_kd.losses.kd import KDLoss, SoftMSELoss, check_teacher, kd_loss, kl_per_position, soft_mse_loss
from lightning_kd.losses.sampled import SampledLogits
from lightning_kd.losses.topk import TopKLogits

__all__ = [
    "IGNORE_INDEX",
    "ATLoss",
    "DISTLoss",
    "DKDLoss",
    "FitNetLoss",
    "FusedLinearKDLoss",
    "HardCrossEntropyLoss",
    "HardMSELoss",
    "JSDLoss",
    "KDLoss",
    "LearnableTemperature",
    "LogitLoss",
    "RKDLoss",
    "ReverseKLLoss",
    "SampledLogits",
    "SkewKLLoss",
    "SoftMSELoss",
    "TopKLogits",
    "at_loss",
    "attention_map",
    "build_adapter",
    "check_teacher",
    "cross_entropy_loss",
    "dist_loss",
    "dkd_loss",
    "fitnet_loss",
    "fused_linear_distillation_loss",
    "fused_linear_kd_loss",
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
    "soft_mse_loss",
    "standardize_logits",
]
