"""Datamodules that the distillation module is given, replayable augmentations, and the soft-target store."""

from lightning_kd.data.mnist1d import MNIST1DDataModule
from lightning_kd.data.indexed import CachedBatch, SoftTargetDataModule, with_soft_targets
from lightning_kd.data.soft_targets import SoftTargetStore

__all__ = ["CachedBatch", "MNIST1DDataModule", "SoftTargetDataModule", "SoftTargetStore", "with_soft_targets"]
