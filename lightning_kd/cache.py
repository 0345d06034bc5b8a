"""Build a soft-target store: one pass of the frozen teacher over the training data, written to disk.

The pass is a ``Trainer.predict`` run, so every strategy and precision of the Trainer applies: under
DDP each rank gets its own share of the samples (Lightning's unrepeated distributed sampler: no
padding, no duplicates) and writes its rows into the shared memory-mapped arrays; rank 0 then
checks that every row was written exactly once and seals the manifest.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from lightning_kd.checkpoint import fingerprint
from lightning_kd.data.augment import Augmentation
from lightning_kd.data.indexed import indexed_loader, loader_parts
from lightning_kd.data.soft_targets import DTYPES, SoftTargetStore, StoreWriter, store_spec
from lightning_kd.module import DistillationModule


class _TeacherPass(L.LightningModule):
    """Runs ``source.teacher_forward`` (the user's hooks included) over indexed batches and stores the outputs."""

    def __init__(self, source: DistillationModule, writer: StoreWriter, first_sample: Any, epochs: int, augmentation: Augmentation | None, seed: int) -> None:
        super().__init__()
        self.source = source
        self.writer = writer
        self.first_sample = first_sample
        self.epochs = epochs
        self.augmentation = augmentation
        self.seed = seed
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
        inputs, _ = self.source.unpack_batch(self.trainer.strategy.batch_to_device(self.first_sample))
        output = self.source.teacher_forward(inputs)
        self.writer.spec["output_shape"] = list(output.shape[1:])
        if self.trainer.is_global_zero:
            self.writer.create()
        self.trainer.strategy.barrier("soft_targets_create")
        self.writer.open()

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        inputs, _ = self.source.unpack_batch(batch.batch)
        for epoch, view, params in self._views(inputs, batch.index):
            self.writer.write(batch.part, epoch, batch.index, self.source.teacher_forward(view), params)

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
    epochs: int = 1,
    augmentation: Augmentation | None = None,
    augmentation_seed: int = 0,
    batch_size: int | None = None,
    trainer: L.Trainer | None = None,
    teacher_checkpoint: str | None = None,
) -> SoftTargetStore:
    """Run the frozen teacher once over the training data and store its outputs at ``path``.

    Args:
        teacher: the teacher, or a :class:`DistillationModule` (then its ``unpack_batch`` /
            ``teacher_forward`` overrides, teacher dtype and augmentation are used).
        data: a datamodule (its ``train_dataloader()``: one loader, or each loader of a
            ``CombinedLoader`` as its own part) or training DataLoader(s).
        path: the store directory; must not exist or be empty.
        dtype: storage dtype of the logits: ``"float32"`` (exact: distilling from the store gives the
            same student as online KD), ``"float16"`` (half the space; refused when a logit
            overflows it) or ``"bfloat16"`` (half the space, float32's range).
        top_k: keep only the k largest logits per position and the log-sum-exp of the rest (see
            :mod:`lightning_kd.losses.topk`); None keeps them all.
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
            without augmentation.
        RuntimeError: if a training dataset augments at random (the cache would hold other views).
        FileExistsError: if ``path`` holds files.
    """
    if dtype not in DTYPES:
        raise ValueError(f"Unknown `cache.dtype` {dtype!r}. Expected one of {', '.join(DTYPES)}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"Expected `cache.top_k` to be None or an int >= 1, but got {top_k!r}.")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"Expected `cache.epochs` to be an int >= 1, but got {epochs!r}.")
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
            f"`cache.epochs={epochs}` records several views per sample, which only differ under augmentation: "
            "set an augmentation or use `cache.epochs=1`."
        )
    if Path(path).exists() and any(Path(path).iterdir()):
        raise FileExistsError(f"{path} is not empty: choose another `cache.path` or remove it.")

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
    module = _TeacherPass(source, writer, first_sample, epochs, augmentation, augmentation_seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"predict returned None")  # on purpose: the outputs go to disk
        trainer.predict(module, dataloaders=indexed, return_predictions=False)
    return SoftTargetStore(path, verify=False)  # `finish` has just hashed every file; sizes are still checked


def _where(checkpoint: str | os.PathLike[str] | None) -> str | None:
    """A checkpoint location for the manifest: absolute when it is a local file (the store may be read from elsewhere)."""
    if checkpoint is None:
        return None
    return str(Path(checkpoint).resolve()) if Path(checkpoint).is_file() else str(checkpoint)
