"""Default batch handling: turn what a dataloader yields into ``(inputs, targets)``.

Unlabeled inputs (Hinton's transfer set) get ``targets = -100`` (class indices) or NaN
(regression) so that the hard loss skips them and the soft loss still covers them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning.pytorch.utilities import CombinedLoader
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_kd.soft_targets.batches import SoftTargetBatch
from lightning_kd.losses import IGNORE_INDEX

_INPUT_KEYS = ("inputs", "input", "x", "images", "image", "input_ids")
_TARGET_KEYS = ("targets", "target", "labels", "label", "y")

_FORMATS = (
    "`(inputs, targets)`, `(inputs,)` or a bare tensor of inputs (unlabeled), a dict with an input key "
    f"({', '.join(_INPUT_KEYS)}) and an optional target key ({', '.join(_TARGET_KEYS)}), or a dict of such "
    "batches (e.g. a CombinedLoader of a labeled and an unlabeled loader)"
)


def split_indexed(batch: Any) -> tuple[Any, list[SoftTargetBatch] | None]:
    """Take the sample indices off a batch from :func:`~lightning_kd.soft_targets.store.with_soft_targets`.

    Returns the user's batch as their DataLoader made it (a dict of them for a ``CombinedLoader``)
    and the :class:`SoftTargetBatch` es in the order :func:`unpack` concatenates them; ``None`` for a
    batch without indices.
    """
    if isinstance(batch, SoftTargetBatch):
        return batch.batch, [batch]
    if isinstance(batch, Mapping) and any(isinstance(v, SoftTargetBatch) for v in batch.values()):
        if not all(v is None or isinstance(v, SoftTargetBatch) for v in batch.values()):
            raise TypeError("A combined batch mixes loaders with and without soft targets; wrap all of them.")
        indexed = [v for v in batch.values() if v is not None]
        return {k: (None if v is None else v.batch) for k, v in batch.items()}, indexed
    return batch, None


def unpack(batch: Any) -> tuple[Any, Tensor | None]:
    """Split ``batch`` into ``(inputs, targets)``; ``targets`` is None for unlabeled inputs.

    Raises:
        TypeError: for a batch in none of the supported formats (override
            ``DistillationModule.unpack_batch`` for those).
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
    if isinstance(batch, Mapping):
        input_key = next((k for k in _INPUT_KEYS if k in batch), None)
        if input_key is not None:
            target_key = next((k for k in _TARGET_KEYS if k in batch), None)
            return batch[input_key], (batch[target_key] if target_key is not None else None)
        parts = [v for v in batch.values() if v is not None]  # CombinedLoader "max_size" pads with None
        # A dict of batches has at least one batch that is itself a container; a dict of bare tensors under
        # unknown keys ({"pixel_values": ..., "label": ...}) is one batch whose keys we do not know.
        is_combined = any(isinstance(v, (tuple, list, Mapping)) for v in parts)
        if is_combined and all(isinstance(v, (tuple, list, Tensor, Mapping)) for v in parts):
            return concat([unpack(v) for v in parts])
        if parts and not is_combined:
            raise TypeError(
                f"Cannot unpack a dict batch with keys {sorted(map(str, batch))}: none is an input key "
                f"({', '.join(_INPUT_KEYS)}). Rename the keys in your dataset/collate function, or subclass "
                "DistillationModule and override `unpack_batch(batch) -> (inputs, targets)`. (A CombinedLoader's "
                "batch is a dict of batches: give its unlabeled loader `(inputs,)` batches.)"
            )
    kind = f"{type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise TypeError(
        f"Cannot unpack a batch of type {kind}. Expected {_FORMATS}. For any other format, subclass "
        "DistillationModule and override `unpack_batch(batch) -> (inputs, targets)`."
    )


def concat(parts: list[tuple[Any, Tensor | None]]) -> tuple[Tensor, Tensor | None]:
    """Concatenate ``(inputs, targets)`` pairs along the batch dimension; unlabeled rows get ignore targets."""
    if len(parts) == 1:
        return parts[0]
    if not all(isinstance(x, Tensor) for x, _ in parts):
        raise TypeError(
            "Cannot concatenate non-tensor inputs of a combined batch. Override `unpack_batch` to merge them."
        )
    inputs = torch.cat([x for x, _ in parts])
    labeled = [y for _, y in parts if y is not None]
    if not labeled:
        return inputs, None
    like = labeled[0]
    fill = float("nan") if like.is_floating_point() else IGNORE_INDEX
    targets = [
        y if y is not None else torch.full((len(x), *like.shape[1:]), fill, dtype=like.dtype, device=like.device)
        for x, y in parts
    ]
    return inputs, torch.cat(targets)


def batch_size(inputs: Any) -> int:
    """Number of samples in ``inputs`` (a tensor, or a mapping/sequence of tensors)."""
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    if isinstance(inputs, Mapping):
        return batch_size(next(iter(inputs.values())))
    if isinstance(inputs, (tuple, list)):
        return batch_size(inputs[0])
    raise TypeError(f"Cannot infer the batch size of inputs of type {type(inputs).__name__}.")


def first_training_batch(trainer: Any) -> Any:
    """The first training batch, before the fit loop iterates (for a dry forward in ``setup``).

    From the datamodule when there is one; otherwise the fit loop loads its training dataloaders
    now (``fit_loop.setup_data()``, which it would do a moment later itself and then reuses).
    """
    if trainer.datamodule is not None:
        loader = trainer.datamodule.train_dataloader()
    else:
        trainer.fit_loop.setup_data()
        loader = trainer.train_dataloader
    if isinstance(loader, CombinedLoader):
        loader = loader.flattened[0]
    elif isinstance(loader, Mapping):
        loader = next(iter(loader.values()))
    elif isinstance(loader, (list, tuple)):
        loader = loader[0]
    return next(iter(loader))


def is_empty(inputs: Any) -> bool:
    """Whether ``inputs`` hold no sample (every mean over them would be NaN); False for inputs of a user's own kind."""
    try:
        return batch_size(inputs) == 0
    except (TypeError, IndexError, StopIteration):  # not ours to size
        return False


def to_channels_last(inputs: Any) -> Any:
    """4-D tensors of ``inputs`` in the channels-last memory format (the others as they are)."""
    return apply_to_collection(inputs, Tensor, lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)
