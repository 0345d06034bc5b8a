"""The offline path: a teacher's outputs on the training data, written once to disk and read by index.

- :mod:`~lightning_kd.soft_targets.store`: :class:`SoftTargetStore`, the memory-mapped store (and
  :meth:`SoftTargetStore.is_complete`, which says whether a folder holds a finished one);
- :mod:`~lightning_kd.soft_targets.build`: :func:`build_soft_targets`, one pass of the frozen teacher;
- :mod:`~lightning_kd.soft_targets.batches`: training batches that carry their sample indices
  (:func:`with_soft_targets`, :class:`SoftTargetDataModule`);
- :mod:`~lightning_kd.soft_targets.sequences`: sequence stores (one row per valid token, ragged) and
  :class:`LogitSampling`, the sampled targets of Sparse Logit Sampling;
- :mod:`~lightning_kd.soft_targets.writer`: :class:`~lightning_kd.soft_targets.writer.StoreWriter`, the files of a build;
- :mod:`~lightning_kd.soft_targets.manifest`: the manifest's schema and which files are the store's.

Names load on first use (PEP 562), so ``import lightning_kd.soft_targets.store`` needs no Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SoftTargetStore": "lightning_kd.soft_targets.store",
    "build_soft_targets": "lightning_kd.soft_targets.build",
    "LogitSampling": "lightning_kd.soft_targets.sequences",
    "SoftTargetBatch": "lightning_kd.soft_targets.batches",
    "SoftTargetDataModule": "lightning_kd.soft_targets.batches",
    "with_soft_targets": "lightning_kd.soft_targets.batches",
    "remove_incomplete_store": "lightning_kd.soft_targets.manifest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
