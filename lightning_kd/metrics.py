"""The epoch metrics of a distillation run: the student's accuracy (or MSE), its top-1 agreement with
and KL to the teacher, and the teacher's own accuracy, as torchmetrics means (reduced across ranks).

Lightning-free: :class:`~lightning_kd.DistillationModule` updates them in its steps and logs what
:meth:`DistillationMetrics.compute` returns (inside :func:`quiet_epoch_metric_warnings`).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_kd.losses import IGNORE_INDEX, TopKLogits, check_teacher, kl_per_position

METRIC_NAMES = ("loss", "acc", "agreement", "kl", "mse", "teacher_acc", "teacher_mse")
TRAIN_NAMES = ("loss_epoch", "soft_loss_epoch", "hard_loss_epoch", "acc", "agreement", "mse")

_SYNC_DIST_WARNING = r"It is recommended to use `self.log\('(train|val|test)/(" + "|".join(METRIC_NAMES) + r"|(soft_|hard_)?loss_epoch)'"


@contextlib.contextmanager
def quiet_epoch_metric_warnings() -> Iterator[None]:
    """Silence, while the epoch metrics are logged, Lightning's advice to pass ``sync_dist=True`` for exactly their names.

    They are torchmetrics, computed (and reduced across ranks) by every rank at the same point in
    the epoch-end hooks, then logged as plain tensors; ``sync_dist=True`` would reduce them again,
    lazily, whenever rank 0's progress bar asks: a collective the other ranks never join (a deadlock).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SYNC_DIST_WARNING)
        yield


class DistillationMetrics(nn.ModuleDict):
    """``{"<stage>_<name>": MeanMetric}`` for the stages train, val and test."""

    def __init__(self) -> None:
        keys = [f"{stage}_{name}" for stage in ("val", "test") for name in METRIC_NAMES]
        keys += [f"train_{name}" for name in TRAIN_NAMES]
        super().__init__({key: MeanMetric() for key in keys})

    def accumulate(
        self, stage: str, student_out: Tensor, teacher_out: Tensor | TopKLogits | None, targets: Tensor | None, *, compare: bool
    ) -> None:
        """Accumulate one batch; ``compare``: also agreement and KL with the teacher (its outputs are a distribution)."""
        s = student_out.detach().float()
        t = teacher_out
        if isinstance(t, Tensor):
            t = t.detach().float()
        if t is not None:
            check_teacher(s, t)  # before any metric compares them (the sanity check runs validation first)
        top1 = None if t is None else (t.top1() if isinstance(t, TopKLogits) else t.argmax(-1))
        if t is not None and compare:
            self[f"{stage}_agreement"].update((s.argmax(-1) == top1).float().flatten())
            if stage != "train":
                self[f"{stage}_kl"].update(kl_per_position(s, t, 1.0).flatten())
        if targets is None:
            return
        if targets.is_floating_point():  # regression
            labeled = ~torch.isnan(targets).any(dim=-1)
            self[f"{stage}_mse"].update((s - targets).pow(2).mean(-1)[labeled])
            if t is not None and stage != "train":
                self[f"{stage}_teacher_mse"].update((t - targets).pow(2).mean(-1)[labeled])
            return
        if targets.shape != s.shape[:-1]:
            raise ValueError(
                f"Expected class targets of shape {tuple(s.shape[:-1])} (the outputs without their class dimension) for "
                f"the accuracy metrics, but got {tuple(targets.shape)}. Return them in that shape from `unpack_batch` "
                "(e.g. `targets.squeeze(-1)`)."
            )
        labeled = targets != IGNORE_INDEX
        self[f"{stage}_acc"].update((s.argmax(-1) == targets)[labeled].float())
        if t is not None and stage != "train":
            self[f"{stage}_teacher_acc"].update((top1 == targets)[labeled].float())

    def compute(self, stage: str, *, skip_teacher: bool = False) -> dict[str, Tensor]:
        """``{name: value}`` of the stage's updated metrics, then reset; ``skip_teacher`` resets ``teacher_*`` unread."""
        values = {}
        for key, metric in self.items():
            prefix, name = key.split("_", 1)
            if prefix != stage or metric.update_count == 0:
                continue
            if not (skip_teacher and name.startswith("teacher_")):
                values[name] = metric.compute()
            metric.reset()
        return values
