"""The epoch metrics of a distillation run: the student's accuracy (or MSE), its top-1 agreement with
and KL to the teacher, and the teacher's own accuracy, as torchmetrics means (reduced across ranks).

Lightning-free: :class:`~lightning_kd.DistillationModule` updates them in its steps and logs the
metric objects themselves (``self.log(name, metric, on_epoch=True)``): Lightning computes them on
every rank at the same point of the epoch's end (a plain tensor with ``sync_dist=True`` would be
reduced lazily, whenever rank 0's progress bar asks: a collective the other ranks never join).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_kd.losses import IGNORE_INDEX, TopKLogits, check_teacher, kl_per_position

METRIC_NAMES = (
    "loss", "acc", "agreement", "kl", "mse", "teacher_acc", "teacher_mse",
    "ce", "bits_per_token", "teacher_ce", "teacher_bits_per_token",  # sequences: per valid token
)
TRAIN_NAMES = ("loss_epoch", "soft_loss_epoch", "hard_loss_epoch", "acc", "agreement", "mse")

class DistillationMetrics(nn.ModuleDict):
    """``{"<stage>_<name>": MeanMetric}`` for the stages train, val and test."""

    def __init__(self) -> None:
        keys = [f"{stage}_{name}" for stage in ("val", "test") for name in METRIC_NAMES]
        keys += [f"train_{name}" for name in TRAIN_NAMES]
        super().__init__({key: MeanMetric() for key in keys})

    def accumulate(
        self, stage: str, student_out: Tensor, teacher_out: Tensor | TopKLogits | None, targets: Tensor | None, *, compare: bool,
        teacher_metrics: bool = True, mask: Tensor | None = None,
    ) -> list[str]:
        """Accumulate one batch and return the keys of the metrics it updated.

        ``compare``: also agreement and KL with the teacher (its outputs are a distribution);
        ``teacher_metrics``: also the teacher's own accuracy (or MSE); ``mask``: for sequence outputs
        ``(B, S, V)``, the valid token positions ``(B, S)``: every metric is then a mean over valid
        tokens only (of the whole epoch, not a mean of batch means), and the per-token cross-entropy
        (nats) and bits per token (cross-entropy / ln 2) of the student and the teacher are added.
        """
        updated: list[str] = []

        def update(key: str, value: Tensor) -> None:
            self[key].update(value)
            updated.append(key)

        s = student_out.detach().float()
        t = teacher_out
        if isinstance(t, Tensor):
            t = t.detach().float()
        if t is not None:
            check_teacher(s, t)  # before any metric compares them (the sanity check runs validation first)
        top1 = None if t is None else (t.argmax(-1) if isinstance(t, Tensor) else t.top1())  # sparse targets: their top class

        def valid(values: Tensor) -> Tensor:  # padding never counts
            return values.flatten() if mask is None else values[mask]

        if t is not None and compare:
            update(f"{stage}_agreement", valid(s.argmax(-1) == top1).float())
            if stage != "train":
                update(f"{stage}_kl", valid(kl_per_position(s, t, 1.0)))
        teacher = t is not None and stage != "train" and teacher_metrics
        if targets is None:
            return updated
        if mask is not None and stage != "train" and not targets.is_floating_point() and targets.shape == s.shape[:-1]:
            labeled = targets != IGNORE_INDEX
            ce = _token_cross_entropy(s, targets)[labeled]
            update(f"{stage}_ce", ce)
            update(f"{stage}_bits_per_token", ce / math.log(2))
            if teacher and isinstance(t, Tensor):
                teacher_ce = _token_cross_entropy(t, targets)[labeled]
                update(f"{stage}_teacher_ce", teacher_ce)
                update(f"{stage}_teacher_bits_per_token", teacher_ce / math.log(2))
        if targets.is_floating_point():  # regression
            labeled = ~torch.isnan(targets).any(dim=-1)
            update(f"{stage}_mse", (s - targets).pow(2).mean(-1)[labeled])
            if teacher:
                update(f"{stage}_teacher_mse", (t - targets).pow(2).mean(-1)[labeled])
            return updated
        if targets.shape != s.shape[:-1]:
            raise ValueError(
                f"Expected class targets of shape {tuple(s.shape[:-1])} (the outputs without their class dimension) for "
                f"the accuracy metrics, but got {tuple(targets.shape)}. Return them in that shape from `unpack_batch` "
                "(e.g. `targets.squeeze(-1)`)."
            )
        labeled = targets != IGNORE_INDEX
        update(f"{stage}_acc", (s.argmax(-1) == targets)[labeled].float())
        if teacher:
            update(f"{stage}_teacher_acc", (top1 == targets)[labeled].float())
        return updated


def _token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-position cross-entropy in nats, ``(B, S)``, zero where the target is ``-100``."""
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return flat.reshape(targets.shape)
