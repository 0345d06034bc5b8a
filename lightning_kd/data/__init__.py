"""Datamodules that the distillation module is given, and replayable augmentations."""

from lightning_kd.data.mnist1d import MNIST1DDataModule
from lightning_kd.data.text import ByteTextDataModule

__all__ = ["ByteTextDataModule", "MNIST1DDataModule"]
