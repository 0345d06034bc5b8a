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

_INPUT_KEYS = ("inputs", "input", "x", "images", "image", "input_ids", "inputs_embeds")
_TARGET_KEYS = ("targets", "target", "labels", "label", "y")
# Hugging Face-style batches: the model takes the whole dict (attention mask, position ids, ...) as keyword arguments
_KEYWORD_INPUT_KEYS = ("input_ids", "inputs_embeds")

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
            targets = batch[target_key] if target_key is not None else None
            if input_key in _KEYWORD_INPUT_KEYS:  # every other key (attention_mask, ...) goes to the model too
                return {k: v for k, v in batch.items() if k != target_key}, targets
            return batch[input_key], targets
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


def causal_lm_targets(inputs: Any, labels: Tensor | None) -> Tensor:
    """The next-token targets of a causal LM, aligned with its logits: the causal shift, done here once.

    Position ``i`` of the logits predicts token ``i + 1``, so the target of position ``i`` is
    ``labels[:, i + 1]`` and the last position has none (``-100``); the logits are never sliced. Without
    ``labels`` the targets are the ``input_ids`` themselves (the Hugging Face convention for plain text).
    Positions that are padding (``attention_mask == 0``), or whose *next* token is padding or ``-100`` (a
    prompt, padding), are ``-100``: they count in no term and no metric. Left padding needs no special case: the mask decides,
    never a prompt length.

    Args:
        inputs: the model's keyword inputs (a dict with ``input_ids`` and optionally ``attention_mask``),
            or a ``(B, S)`` tensor of token ids.
        labels: ``(B, S)`` token ids with ``-100`` where no loss is wanted, unshifted (as Hugging Face
            collators make them), or None.

    Returns:
        ``(B, S)`` int64 targets.

    Raises:
        ValueError: if there are neither labels nor ``input_ids``, or the shapes disagree.
    """
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
    attention = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    source = labels if labels is not None else ids
    if not isinstance(source, Tensor) or source.dim() != 2:
        raise ValueError(
            "A causal LM batch needs `labels` or `input_ids` of shape (batch, sequence), but got "
            f"{type(source).__name__ if not isinstance(source, Tensor) else tuple(source.shape)}."
        )
    source = source.long()
    if attention is not None:
        if attention.shape != source.shape:
            raise ValueError(
                f"Expected `attention_mask` of the shape of the tokens {tuple(source.shape)}, but got {tuple(attention.shape)}."
            )
        source = source.masked_fill(attention == 0, IGNORE_INDEX)
    last = torch.full_like(source[:, :1], IGNORE_INDEX)
    targets = torch.cat([source[:, 1:], last], dim=1)
    if attention is not None:  # a padding position predicts nothing (left padding: the one before the first token)
        targets = targets.masked_fill(attention == 0, IGNORE_INDEX)
    return targets


def valid_positions(inputs: Any, targets: Tensor | None, outputs: Tensor) -> Tensor | None:
    """Bool ``(B, S)``: the positions of sequence outputs ``(B, S, V)`` that count; None for ``(N, C)`` outputs.

    A position counts where its target is not ``-100`` (padding, a prompt, the causal shift's last
    position); without per-position targets, where the ``attention_mask`` is 1; with neither, everywhere.
    Classification outputs return None: there an unlabeled (``-100``) sample still counts in the soft
    term (Hinton's transfer set).
    """
    if outputs.dim() < 3:
        return None
    if isinstance(targets, Tensor) and not targets.is_floating_point() and targets.shape == outputs.shape[:-1]:
        return targets != IGNORE_INDEX
    attention = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if isinstance(attention, Tensor) and attention.shape == outputs.shape[:-1]:
        return attention != 0
    return None


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
