"""lightning-kd: knowledge distillation for PyTorch Lightning.

A frozen teacher, a trainable student, a callback that anneals temperature and alpha, and Hydra
configs that run the whole teacher -> student workflow.

The names below load on first use (PEP 562): ``import lightning_kd.losses`` or
``lightning_kd.schedules`` imports torch (or nothing) but not Lightning.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("lightning-kd")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_EXPORTS = {
    "DistillationAnnealing": "lightning_kd.callbacks",
    "CausalLMDistillation": "lightning_kd.lm",
    "DistillationModule": "lightning_kd.module",
    "Speed": "lightning_kd.speed",
    "SoftTargetDataModule": "lightning_kd.soft_targets.batches",
    "SoftTargetStore": "lightning_kd.soft_targets.store",
    "build_soft_targets": "lightning_kd.soft_targets.build",
    "with_soft_targets": "lightning_kd.soft_targets.batches",
    "KDLoss": "lightning_kd.losses",
    "OnPolicy": "lightning_kd.on_policy",
    "export_student": "lightning_kd.export",
    "kd_loss": "lightning_kd.losses",
    "load_teacher": "lightning_kd.teachers",
    "load_weights": "lightning_kd.weights",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
