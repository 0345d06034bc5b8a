"""Build a soft-target store: one pass of the frozen teacher over the training data, written to disk.

The pass is a ``Trainer.predict`` run, so every strategy and precision of the Trainer applies: under
DDP each rank gets its own share of the samples (Lightning's unrepeated distributed sampler: no
padding, no duplicates) and writes its rows into the shared memory-mapped arrays; rank 0 then
checks that every row was written exactly once and seals the manifest.

A build that fails (non-finite teacher outputs, a full disk, a crash) leaves the store unsealed
(``"complete": false``): it is refused when opened, and :func:`~lightning_kd.soft_targets.store.remove_incomplete_store`
deletes exactly its files.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_kd.checkpoint import fingerprint
from lightning_kd.data.augment import Augmentation
from lightning_kd.soft_targets.batches import indexed_loader, loader_parts
from lightning_kd.soft_targets.store import DTYPES, SoftTargetStore, store_spec
from lightning_kd.soft_targets.manifest import MANIFEST, NUMPY_DTYPES, array_files, data_bytes, require_empty_store_path
from lightning_kd.guards import nonfinite_parts
from lightning_kd.io import atomic_write_json, file_sha256
from lightning_kd.losses.topk import TopKLogits
from lightning_kd.module import DistillationModule

_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_MANIFEST_ROOM = 1 << 20  # the sealed manifest (checksums of every file) and file system slack


# ---------------------------------------------------------------------------------- writing
class StoreWriter:
    """Create a store's arrays, fill them (from any number of processes), then seal the manifest.

    Rank 0 calls :meth:`create`; every rank then :meth:`open` s the arrays and :meth:`write` s its
    rows; rank 0 finally calls :meth:`finish`, which refuses gaps or duplicate rows and writes the
    checksums and ``"complete": true`` last (a crash before that leaves a store that is refused).
    """

    def __init__(self, path: str | os.PathLike[str], spec: dict[str, Any]) -> None:
        self.path = Path(path)
        self.spec = spec  # everything of the manifest except the files and `complete`
        self.arrays: dict[str, dict[str, np.memmap]] = {}
        self.failed = False  # a write raised: this writer never seals

    def create(self) -> None:
        """Write the unsealed manifest, then create every array with all its disk blocks allocated.

        The arrays are memory-mapped: a write into a sparse file on a full disk kills the process with
        SIGBUS and no message. Allocating every block here (``posix_fallocate``) turns that into an
        ``ENOSPC`` now. (On copy-on-write file systems such as btrfs or ZFS, a rewrite may still need
        new blocks: leave some room there.)

        Raises:
            FileExistsError: if ``path`` is not missing or empty (nothing is deleted).
            OSError: ``ENOSPC`` "Not enough disk space ..." before anything is written when the free
                space is short, or while allocating (the store is then left unsealed).
        """
        require_empty_store_path(self.path)
        files = {(part, name): (shape, dtype) for part in self.spec["parts"] for name, (shape, dtype) in array_files(self.spec, part).items()}
        needed = sum(_npy_bytes(shape, dtype) for shape, dtype in files.values()) + _MANIFEST_ROOM
        existing = next(p for p in (self.path, *self.path.parents) if p.exists())
        free = shutil.disk_usage(existing).free
        if free < needed:
            raise OSError(errno.ENOSPC, _no_space(self.path, needed, free, created=False))
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / MANIFEST, {**self.spec, "complete": False})  # first: marks the folder as ours
        for part in self.spec["parts"]:
            (self.path / part).mkdir()
        for (part, name), (shape, dtype) in files.items():
            file = self.path / part / f"{name}.npy"
            np.lib.format.open_memmap(file, mode="w+", dtype=NUMPY_DTYPES[dtype], shape=shape)  # header + sparse zeros, unmapped at once
            try:
                _allocate(file, data=data_bytes(shape, dtype))
            except OSError as err:
                if err.errno in _NO_SPACE:
                    raise OSError(err.errno, _no_space(self.path, needed, shutil.disk_usage(self.path).free, created=True)) from err
                raise

    def open(self) -> None:
        self.arrays = {
            part: {name: np.load(self.path / part / f"{name}.npy", mmap_mode="r+", allow_pickle=False) for name in array_files(self.spec, part)}
            for part in self.spec["parts"]
        }

    def write(self, part: str, epoch: int, index: Tensor, outputs: Tensor, params: Tensor | None, *, batch_idx: int | None = None) -> None:
        """Store the teacher's ``outputs`` (``(B, *output_shape)``) for samples ``index`` at ``epoch``.

        Raises:
            RuntimeError: for outputs of another shape, or not finite: any NaN or +inf, or a row (the
                last dimension) that is entirely -inf. A -inf among finite logits is accepted: it is a
                masked class (e.g. a padded vocabulary). Nothing of the batch is written, and this
                writer will not seal the store.
        """
        try:
            self._check(part, epoch, index, outputs, batch_idx)
            arrays = self.arrays[part]
            rows = index.cpu().numpy()
            if self.spec["top_k"] is None:
                arrays["logits"][epoch, rows] = _to_numpy(outputs, self.spec["dtype"])
            else:
                top = TopKLogits.from_logits(outputs, self.spec["top_k"])
                arrays["topk_values"][epoch, rows] = _to_numpy(top.values, self.spec["dtype"])
                arrays["topk_indices"][epoch, rows] = top.indices.cpu().numpy().astype(arrays["topk_indices"].dtype)
                arrays["tail_logsumexp"][epoch, rows] = top.tail_logsumexp.cpu().numpy()
            if params is not None:
                arrays["params"][epoch, rows] = params.cpu().numpy()
            arrays["writes"][epoch, rows] += 1  # last: a row counts as written only once all of it is
        except BaseException:
            self.failed = True
            raise

    def _check(self, part: str, epoch: int, index: Tensor, outputs: Tensor, batch_idx: int | None) -> None:
        where = f"part {part!r}, batch {batch_idx}, epoch {epoch}"
        if list(outputs.shape[1:]) != list(self.spec["output_shape"]) or outputs.shape[0] != index.numel():
            raise RuntimeError(
                f"The teacher's outputs for {where} have shape {tuple(outputs.shape)}, but the store holds "
                f"({index.numel()}, {', '.join(map(str, self.spec['output_shape']))}) for this batch: the teacher must give "
                "every sample an output of the same shape."
            )
        if not outputs.is_floating_point():
            return
        values = outputs.detach()
        nan, posinf, dead = nonfinite_parts(values)  # dead: rows entirely -inf, no distribution at all
        if not bool(nan.any() | posinf.any() | dead.any()):
            return
        per_sample = (nan | posinf).reshape(len(values), -1).any(1) | dead.reshape(len(values), -1).any(1)
        samples = index.cpu()[per_sample.cpu()].tolist()
        shown = ", ".join(map(str, samples[:8])) + (", ..." if len(samples) > 8 else "")
        raise RuntimeError(
            f"The teacher's outputs for {where} are not finite: {int(nan.sum())} NaN, {int(posinf.sum())} +inf and "
            f"{int(dead.sum())} rows entirely -inf, in {len(samples)} of the batch's {len(values)} samples (sample "
            f"indices {shown}). The store at {self.path} is left incomplete (not sealed). Check the teacher (its "
            "checkpoint; an overflow under `teacher_dtype` / `trainer.precision`). A -inf among finite logits is "
            "accepted: a masked class, e.g. a padded vocabulary."
        )

    def flush(self) -> None:
        for arrays in self.arrays.values():
            for arr in arrays.values():
                arr.flush()

    def finish(self, seconds: float) -> None:
        """Check that every row was written exactly once, then write checksums and mark the store complete.

        Raises:
            RuntimeError: if a write of this writer failed, or a row was written zero or several
                times; the store stays unsealed.
        """
        if self.failed:
            raise RuntimeError(f"Soft-target store {self.path}: a write failed during the build, so the store is not sealed.")
        manifest = {**self.spec, "parts": {}}
        for part, info in self.spec["parts"].items():
            writes = np.load(self.path / part / "writes.npy", mmap_mode="r", allow_pickle=False)
            missing, repeated = int((writes == 0).sum()), int((writes > 1).sum())
            if missing or repeated:
                raise RuntimeError(
                    f"Soft-target store {self.path}, part {part!r}: {missing} rows were never written and "
                    f"{repeated} more than once (of {writes.size}). The build is refused."
                )
            files = {}
            for name, (shape, dtype) in array_files(self.spec, part).items():
                file = self.path / part / f"{name}.npy"
                files[name] = {"shape": list(shape), "dtype": dtype, "bytes": file.stat().st_size, "sha256": file_sha256(file)}
            manifest["parts"][part] = {**info, "files": files}
        manifest["build_seconds"] = round(seconds, 3)
        manifest["complete"] = True
        atomic_write_json(self.path / MANIFEST, manifest)


def _npy_bytes(shape: tuple[int, ...], dtype: str) -> int:
    """Size of the ``.npy`` file ``open_memmap`` writes: its header and its data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_2_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(NUMPY_DTYPES[dtype])), "fortran_order": False, "shape": tuple(shape)})
    return buffer.tell() + data_bytes(shape, dtype)  # a 2.0 header: never shorter than the 1.0 one numpy writes for small headers


def _allocate(file: Path, *, data: int) -> None:
    """Give ``file`` real disk blocks for its whole size (its data region written as zeros where fallocate is missing)."""
    fd = os.open(file, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except AttributeError:  # no posix_fallocate (macOS)
            pass
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        chunk, offset = bytes(1 << 20), size - data  # the header stays
        while offset < size:
            offset += os.pwrite(fd, chunk[: size - offset], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_space(path: Path, needed: int, free: int, *, created: bool) -> str:
    left = (
        "The store there is left incomplete (not sealed): `remove_incomplete_store(path)` deletes it, and a new "
        "build replaces it."
        if created else "Nothing was written."
    )
    return (
        f"Not enough disk space for the soft-target store at {path}: it needs {needed} bytes, {free} free "
        "(`build_soft_targets(path=...)`). Free some space or choose another path; `top_k` or "
        f"`dtype='bfloat16'` make a smaller store. {left}"
    )


def _to_numpy(values: Tensor, dtype: str) -> np.ndarray:
    source = values.detach()
    stored = source.to(_TORCH[dtype])
    if dtype != "float32" and bool((torch.isfinite(source) & ~torch.isfinite(stored)).any()):
        raise ValueError(
            f"Teacher outputs of magnitude up to {source[torch.isfinite(source)].abs().max().item():.3g} overflow `dtype` "
            f"{dtype!r}. Use one of: {', '.join(d for d in DTYPES if d != dtype)} (bfloat16 or float32 keep the range)."
        )
    array = stored.cpu()
    return array.view(torch.uint16).numpy() if dtype == "bfloat16" else array.numpy()


# ---------------------------------------------------------------------------------- the teacher pass


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
        path: the store directory; must not exist or be empty (nothing there is ever deleted: an
            interrupted build is removed with :func:`~lightning_kd.soft_targets.store.remove_incomplete_store`).
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
        TypeError: if a training dataset is not map-style (an ``IterableDataset``): distil online.
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
