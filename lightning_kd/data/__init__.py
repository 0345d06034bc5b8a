"""Datamodules that the distillation module is given, and replayable augmentations."""

from lightning_kd.data.mnist1d import MNIST1DDataModule

__all__ = ["MNIST1DDataModule"]
