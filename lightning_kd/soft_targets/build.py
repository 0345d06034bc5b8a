"""Build a soft-target store: one pass of the frozen teacher over the training data, written to disk.

The pass is a ``Trainer.predict`` run, so every strategy and precision of the Trainer applies: under
DDP each rank gets its own share of the samples (Lightning's unrepeated distributed sampler: no
padding, no duplicates) and writes its rows into the shared memory-mapped arrays; rank 0 then
checks that every row was written exactly once and seals the manifest.

Sequence outputs ``(B, S, V)`` whose ``unpack_batch`` targets are integer ``(B, S)`` (a
:class:`~lightning_kd.CausalLMDistillation`'s shifted labels) make a sequence store (format 3, see
:mod:`lightning_kd.soft_targets.sequences`): a first pass over the data, without the teacher, counts
each sample's valid tokens (``targets != -100``) to lay the rows out; the teacher pass then writes
the rows of exactly those tokens.

A build that fails (non-finite teacher outputs, a full disk, a crash) leaves the store unsealed
(``"complete": false``): it is refused when opened, and :func:`~lightning_kd.soft_targets.store.remove_incomplete_store`
deletes exactly its files.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from typing_extensions import override

from lightning_kd.checkpoint import fingerprint
from lightning_kd.data.augment import Augmentation
from lightning_kd.module import DistillationModule
from lightning_kd.soft_targets.batches import indexed_loader, loader_parts
from lightning_kd.soft_targets.manifest import require_empty_store_path
from lightning_kd.soft_targets.sequences import LogitSampling, positions_rule, sequence_spec, valid_mask
from lightning_kd.soft_targets.store import DTYPES, SoftTargetStore, store_spec
from lightning_kd.soft_targets.writer import StoreWriter

__all__ = ["StoreWriter", "build_soft_targets"]  # StoreWriter: where it was before it had its own file


# ---------------------------------------------------------------------------------- the teacher pass


class _TeacherPass(L.LightningModule):
    """Runs ``source.teacher_forward`` (the user's hooks included) over indexed batches and stores the outputs."""

    def __init__(
        self, source: DistillationModule, writer: StoreWriter, first_sample: Any, epochs: int, augmentation: Augmentation | None, seed: int,
        *, counting: dict[str, Any] | None = None, sampling: LogitSampling | None = None,
    ) -> None:
        super().__init__()
        self.source = source
        self.writer = writer
        self.first_sample = first_sample
        self.epochs = epochs
        self.augmentation = augmentation
        self.seed = seed
        self.counting = counting or {}  # part -> a sequential indexed loader: the counting pass of a sequence store
        self.sampling = sampling
        self.sequences = False
        self.started = 0.0

    def _views(self, inputs: Any, index: torch.Tensor):
        for epoch in range(self.epochs):
            if self.augmentation is None:
                yield epoch, inputs, None
            else:
                params = self.augmentation.sample(self.seed, epoch, index)
                yield epoch, self.augmentation.apply(inputs, params.to(inputs.device)), params

    @override
    def on_predict_start(self) -> None:
        self.started = time.perf_counter()
        self.source.teacher.eval()
        # The arrays' shape needs one output: every rank computes it (same sample, same shape), rank 0 creates
        # the files, and all ranks open them once they exist.
        inputs, targets = self.source.unpack_batch(self.trainer.strategy.batch_to_device(self.first_sample))
        output = self.source.teacher_forward(inputs)
        self.sequences = valid_mask(targets, output) is not None
        if self.sequences:
            self._lay_out_tokens(output.shape[-1])
        elif self.sampling is not None:
            raise ValueError(
                f"`sampled` targets are drawn per token of a sequence, but the teacher's outputs have shape {tuple(output.shape)} "
                f"with {'no targets' if targets is None else 'targets of shape ' + str(tuple(targets.shape))} from `unpack_batch`: "
                "it needs outputs (B, S, V) and integer (B, S) targets (pass a CausalLMDistillation). Use `top_k` for other outputs."
            )
        else:
            self.writer.spec["output_shape"] = list(output.shape[1:])
        if self.trainer.is_global_zero:
            self.writer.create()
        self.trainer.strategy.barrier("soft_targets_create")
        self.writer.open()

    def _lay_out_tokens(self, vocab: int) -> None:
        """A sequence store: count each sample's valid tokens (no teacher) and turn the spec into a format-3 one."""
        if self.augmentation is not None or self.epochs > 1:
            raise ValueError(
                "A sequence store holds the teacher's outputs on each sample as it is (one row per valid token), but "
                f"`augmentation={self.augmentation!r}` / `epochs={self.epochs}` ask for augmented views: build it without "
                "augmentation and with `epochs=1`, or distil online."
            )
        rows = {}
        for part, loader in self.counting.items():
            counts = np.zeros(len(loader.dataset), dtype=np.int64)
            for batch in loader:
                _, targets = self.source.unpack_batch(batch.batch)
                mask = valid_mask(targets)
                if mask is None:
                    raise ValueError(
                        f"Part {part!r} of a sequence store: `unpack_batch` gave "
                        f"{'no targets' if targets is None else 'targets of shape ' + str(tuple(targets.shape))} for the batch of "
                        f"samples {batch.index[:8].tolist()}, but every batch needs integer (B, S) targets (-100 where a position does not count)."
                    )
                counts[batch.index.numpy()] = mask.sum(dim=1).cpu().numpy()
            self.writer.offsets[part] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            rows[part] = int(self.writer.offsets[part][-1])
        self.writer.spec = sequence_spec(self.writer.spec, rows, vocab, self.sampling, positions_rule(self.source))

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.sequences:
            inputs, targets = self.source.unpack_batch(batch.batch)
            outputs = self.source.teacher_forward(inputs)
            self.writer.write(batch.part, 0, batch.index, outputs, None, batch_idx=batch_idx, mask=valid_mask(targets, outputs))
            return
        inputs, _ = self.source.unpack_batch(batch.batch)
        for epoch, view, params in self._views(inputs, batch.index):
            self.writer.write(batch.part, epoch, batch.index, self.source.teacher_forward(view), params, batch_idx=batch_idx)

    @override
    def on_predict_end(self) -> None:
        self.writer.flush()
        self.trainer.strategy.barrier("soft_targets_written")
        if self.trainer.is_global_zero:
            self.writer.finish(time.perf_counter() - self.started)
        self.trainer.strategy.barrier("soft_targets_sealed")


def build_soft_targets(
    teacher: nn.Module | DistillationModule,
    data: L.LightningDataModule | Any,
    path: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    top_k: int | None = None,
    sampled: int | LogitSampling | None = None,
    epochs: int = 1,
    augmentation: Augmentation | None = None,
    augmentation_seed: int = 0,
    batch_size: int | None = None,
    trainer: L.Trainer | None = None,
    teacher_checkpoint: str | None = None,
) -> SoftTargetStore:
    """Run the frozen teacher once over the training data and store its outputs at ``path``.

    Sequence outputs ``(B, S, V)`` whose ``unpack_batch`` targets are integer ``(B, S)`` make a sequence
    store: one row per valid token (``targets != -100``), variable-length samples stored ragged (see
    :mod:`lightning_kd.soft_targets.sequences`). For a language model pass the
    :class:`~lightning_kd.CausalLMDistillation` you will train: its shifted labels define the valid tokens
    (a bare teacher's default ``unpack_batch`` would not shift them, and training would refuse the store).

    Args:
        teacher: the teacher, or a :class:`DistillationModule` (then its ``unpack_batch`` /
            ``teacher_forward`` overrides, teacher dtype and augmentation are used).
        data: a datamodule (its ``train_dataloader()``: one loader, or each loader of a
            ``CombinedLoader`` as its own part) or training DataLoader(s).
        path: the store directory; must not exist or be empty (nothing there is ever deleted: an
            interrupted build is removed with :func:`~lightning_kd.soft_targets.store.remove_incomplete_store`).
        dtype: storage dtype of the logits: ``"float32"`` (exact: distilling from the store gives the
            same student as online KD), ``"float16"`` (half the space; refused when a logit
            overflows it) or ``"bfloat16"`` (half the space, float32's range).
        top_k: keep only the k largest logits per position and the log-sum-exp of the rest (see
            :mod:`lightning_kd.losses.topk`); None keeps them all.
        sampled: sequence stores: instead of logits, per valid token ``k`` tokens sampled from the
            teacher with importance weights (Sparse Logit Sampling, unbiased; see
            :mod:`lightning_kd.losses.sampled`): an int ``k`` (``LogitSampling(k)``: seed 0, T = 1) or a
            :class:`~lightning_kd.soft_targets.sequences.LogitSampling`. Weights are stored in float32
            whatever ``dtype``; only :class:`~lightning_kd.losses.KDLoss` at the sampling temperature
            distils from them.
        epochs: augmented views to record per sample (``epochs`` > 1 needs ``augmentation``);
            training cycles through them, epoch ``e`` replaying view ``e % epochs``.
        augmentation: a replayable augmentation; its parameters are stored with the outputs.
        augmentation_seed: seed of the augmentation draws.
        batch_size: inference batch size; default the training loader's.
        trainer: the Trainer to run the pass with (strategy, devices, precision); default a
            single-device Trainer on the best available accelerator.
        teacher_checkpoint: where the teacher came from, recorded in the manifest.

    Returns:
        The finished store, opened read-only.

    Raises:
        ValueError: for an unknown ``dtype``, ``top_k < 1``, ``epochs < 1``, or ``epochs > 1``
            without augmentation; ``sampled`` with ``top_k``, with a ``dtype`` other than float32, or
            for outputs that are not sequences; augmentation or ``epochs > 1`` for a sequence store.
        TypeError: if a training dataset is not map-style (an ``IterableDataset``): distil online; for a
            ``sampled`` that is neither an int nor a ``LogitSampling``.
        RuntimeError: if a training dataset augments at random (the store would hold other views), or
            the teacher gives NaN, +inf or an all -inf row (the store is left unsealed).
        FileExistsError: if ``path`` holds files (the message says whether a store, and which).
        OSError: ``ENOSPC`` if the disk has not enough space for the arrays (checked, and the blocks
            allocated, before the teacher runs).
    """
    if dtype not in DTYPES:
        raise ValueError(f"Unknown `dtype` {dtype!r}. Expected one of {', '.join(DTYPES)}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"Expected `top_k` to be None or an int >= 1, but got {top_k!r}.")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"Expected `epochs` to be an int >= 1, but got {epochs!r}.")
    sampling = _sampling(sampled, top_k, dtype)
    if isinstance(teacher, DistillationModule):
        source = teacher
        if augmentation is None:  # the module's own augmentation, if any
            augmentation, augmentation_seed = source.augmentation, source.augmentation_seed
    else:
        source = DistillationModule(teacher, nn.Identity(), augmentation=augmentation, augmentation_seed=augmentation_seed)
    if source.teacher is None:
        raise ValueError("Building soft targets needs a teacher, but the module has none.")
    if epochs > 1 and augmentation is None:
        raise ValueError(
            f"`epochs={epochs}` records several views per sample, which only differ under augmentation: "
            "set an augmentation or use `epochs=1`."
        )
    require_empty_store_path(path)

    if isinstance(data, L.LightningDataModule):
        data.prepare_data()
        data.setup("fit")
        loaders = data.train_dataloader()
    else:
        loaders = data
    parts = loader_parts(loaders)
    trainer = trainer or L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, devices=1)
    spec = store_spec(
        {name: loader.dataset for name, loader in parts.items()},
        teacher_fingerprint=fingerprint(source.teacher),
        teacher_class=f"{type(source.teacher).__module__}.{type(source.teacher).__qualname__}",
        teacher_checkpoint=_where(teacher_checkpoint),
        output_shape=(),  # set from the first output
        dtype=dtype,
        top_k=top_k,
        epochs=epochs,
        augmentation=augmentation,
        augmentation_seed=augmentation_seed,
        world_size=trainer.world_size,
    )
    indexed = [indexed_loader(loader, name, sequential=True, batch_size=batch_size) for name, loader in parts.items()]
    first_loader = next(iter(parts.values()))
    first_sample = indexed[0].collate_fn([(0, first_loader.dataset[0])]).batch
    writer = StoreWriter(path, spec)
    counting = {name: indexed_loader(loader, name, sequential=True, batch_size=batch_size) for name, loader in parts.items()}
    module = _TeacherPass(source, writer, first_sample, epochs, augmentation, augmentation_seed, counting=counting, sampling=sampling)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"predict returned None")  # on purpose: the outputs go to disk
        trainer.predict(module, dataloaders=indexed, return_predictions=False)
    return SoftTargetStore(path, verify=False)  # `finish` has just hashed every file; sizes are still checked


def _sampling(sampled: int | LogitSampling | None, top_k: int | None, dtype: str) -> LogitSampling | None:
    """``sampled`` as a :class:`LogitSampling` (None: no sampling), refusing what cannot go with it."""
    if sampled is None:
        return None
    if isinstance(sampled, bool) or not isinstance(sampled, (int, LogitSampling)):
        raise TypeError(f"Expected `sampled` to be None, an int k or a LogitSampling, but got {type(sampled).__name__}.")
    sampling = LogitSampling(k=sampled) if isinstance(sampled, int) else sampled
    if top_k is not None:
        raise ValueError(f"Got `top_k={top_k}` and `sampled={sampled!r}`: a store holds either the top-k logits or sampled tokens; choose one.")
    if dtype != "float32":
        raise ValueError(
            f"Sampled targets are stored as float32 weights (rounding them would bias the estimate), but got `dtype={dtype!r}`: "
            "leave `dtype` at float32."
        )
    return sampling


def _where(checkpoint: str | os.PathLike[str] | None) -> str | None:
    """A checkpoint location for the manifest: absolute when it is a local file (the store may be read from elsewhere)."""
    if checkpoint is None:
        return None
    return str(Path(checkpoint).resolve()) if Path(checkpoint).is_file() else str(checkpoint)
