"""Training batches that carry their sample indices, so that a soft-target store can be read by index.

:func:`with_soft_targets` rebuilds a DataLoader (keeping its sampler, batch size, workers and
collate function) so that it yields :class:`SoftTargetBatch` es: the user's batch, untouched, plus the
index of each row. :class:`SoftTargetDataModule` does it for a whole datamodule.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import lightning as L
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_kd.soft_targets.store import SoftTargetStore, open_store, require_map_style


@dataclass
class SoftTargetBatch:
    """A training batch as the user's DataLoader made it, plus the sample index of each row.

    Attributes:
        part: the store part (training dataset) the rows come from.
        index: ``(B,)`` int64 indices into that dataset.
        batch: the user's batch, as their ``collate_fn`` made it.
    """

    part: str
    index: Tensor
    batch: Any


class IndexedDataset(Dataset):
    """``dataset[i]`` as ``(i, dataset[i])``.

    Raises:
        TypeError: for an ``IterableDataset`` (no index to key the targets by): the same message as
            every entry point gives (:func:`~lightning_kd.soft_targets.store.require_map_style`).
    """

    def __init__(self, dataset: Dataset, part: str = "train") -> None:
        require_map_style(dataset, part)
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class IndexedCollate:
    """The user's ``collate_fn`` on the samples, wrapped in a :class:`SoftTargetBatch` with their indices."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any], part: str) -> None:
        self.collate_fn = collate_fn
        self.part = part

    def __call__(self, items: list[tuple[int, Any]]) -> SoftTargetBatch:
        indices = torch.tensor([i for i, _ in items], dtype=torch.int64)
        return SoftTargetBatch(self.part, indices, self.collate_fn([sample for _, sample in items]))


def indexed_loader(loader: DataLoader, part: str, *, sequential: bool = False, batch_size: int | None = None) -> DataLoader:
    """A copy of ``loader`` whose batches are :class:`SoftTargetBatch` es of ``part``.

    Sampler, batch size, workers and collate function are kept (``sequential=True`` instead visits
    every sample once, in order, as a store build needs).
    """
    if not isinstance(loader, DataLoader):
        raise TypeError(f"Expected a torch DataLoader for part {part!r}, but got {type(loader).__name__}.")
    dataset = IndexedDataset(loader.dataset, part)
    common: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": IndexedCollate(loader.collate_fn, part),
        "pin_memory": loader.pin_memory,
        "worker_init_fn": loader.worker_init_fn,
        "persistent_workers": loader.persistent_workers,
        "timeout": loader.timeout,
        "multiprocessing_context": loader.multiprocessing_context,
    }
    if loader.num_workers > 0:
        common["prefetch_factor"] = loader.prefetch_factor
    if sequential:
        size = batch_size or loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 64
        return DataLoader(dataset, batch_size=size, shuffle=False, drop_last=False, **common)
    if loader.batch_size is None:  # the user gave a batch_sampler
        return DataLoader(dataset, batch_sampler=loader.batch_sampler, **common)
    return DataLoader(
        dataset, batch_size=loader.batch_size, sampler=loader.sampler, drop_last=loader.drop_last,
        generator=loader.generator, **common,
    )


def loader_parts(loaders: Any) -> dict[str, DataLoader]:
    """Name the training DataLoaders: ``train`` for one, the keys of a dict / CombinedLoader, or ``train_<i>``."""
    if isinstance(loaders, CombinedLoader):
        loaders = loaders.iterables
    if isinstance(loaders, DataLoader):
        return {"train": loaders}
    if isinstance(loaders, Mapping):
        return {str(k): v for k, v in loaders.items()}
    if isinstance(loaders, (list, tuple)):
        return {f"train_{i}": v for i, v in enumerate(loaders)}
    raise TypeError(
        f"Expected a DataLoader, a CombinedLoader, or a dict/list of DataLoaders, but got {type(loaders).__name__}."
    )


def with_soft_targets(loaders: Any, store: SoftTargetStore) -> Any:
    """Make training ``loaders`` yield :class:`SoftTargetBatch` es that ``store`` has targets for.

    Each loader's dataset is checked against the store (same data, no random augmentation), then
    the loader is rebuilt around it, keeping its sampler (a sampler that is already a
    ``DistributedSampler``, like MNIST-1D's, is kept under DDP; any other gets Lightning's as usual). A ``CombinedLoader`` keeps its mode.

    Raises:
        TypeError: if a dataset is not map-style (an ``IterableDataset``): distil online
            (without ``soft_targets``).
        RuntimeError: if a dataset is not the one the store was built from (the message says what
            differs), or returns random views.
    """
    parts = loader_parts(loaders)
    wrapped = {}
    for name, loader in parts.items():
        part = store.match_part(name, loader.dataset)
        wrapped[name] = indexed_loader(loader, part)
    if isinstance(loaders, DataLoader):
        return wrapped["train"]
    if isinstance(loaders, CombinedLoader):
        # a copy with the wrapped loaders in place of the user's (public `flattened` setter): same mode, same keys
        combined = copy.copy(loaders)
        by_part = list(wrapped.values())  # `loader_parts` keeps the CombinedLoader's order
        combined.flattened = by_part
        return combined
    if isinstance(loaders, Mapping):
        return wrapped
    return [wrapped[f"train_{i}"] for i in range(len(loaders))]


class SoftTargetDataModule(L.LightningDataModule):
    """A datamodule whose training batches carry sample indices for a :class:`SoftTargetStore`.

    Everything but ``train_dataloader`` is the wrapped ``datamodule``'s own (setup, validation,
    test, state); training loaders are checked against the store and rebuilt by
    :func:`with_soft_targets` (which raises ``TypeError`` for an ``IterableDataset`` training set).

    Example::

        >>> store = SoftTargetStore("outputs/soft_targets")  # doctest: +SKIP
        >>> module = DistillationModule(None, student, soft_targets=store)  # doctest: +SKIP
        >>> trainer.fit(module, datamodule=SoftTargetDataModule(MNIST1DDataModule(), store))  # doctest: +SKIP
    """

    def __init__(self, datamodule: L.LightningDataModule, store: SoftTargetStore | str | os.PathLike[str]) -> None:
        super().__init__()
        self.datamodule = datamodule
        self.store = open_store(store)

    @override
    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    @override
    def setup(self, stage: str) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)

    @override
    def teardown(self, stage: str) -> None:
        self.datamodule.teardown(stage)

    @override
    def train_dataloader(self) -> Any:
        return with_soft_targets(self.datamodule.train_dataloader(), self.store)

    @override
    def val_dataloader(self) -> Any:
        return self.datamodule.val_dataloader()

    @override
    def test_dataloader(self) -> Any:
        return self.datamodule.test_dataloader()

    @override
    def predict_dataloader(self) -> Any:
        return self.datamodule.predict_dataloader()

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.datamodule.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: the wrapped datamodule's attributes (num_classes, ...) read through
        if name == "datamodule":
            raise AttributeError(name)
        return getattr(self.datamodule, name)
