"""Write a soft-target store: create its arrays, fill them from any number of processes, then seal the manifest.

:class:`StoreWriter` is the file side of :func:`~lightning_kd.soft_targets.build.build_soft_targets`
(which runs the teacher): disk space checked and allocated up front, rows written into memory-mapped
``.npy`` arrays (one row per sample, or per valid token of a sequence store), non-finite outputs refused,
and the checksums and ``"complete": true`` written last. No Lightning.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_kd.guards import nonfinite_parts
from lightning_kd.io import atomic_write_json, file_sha256
from lightning_kd.losses.topk import TopKLogits
from lightning_kd.soft_targets.manifest import DTYPES, MANIFEST, NUMPY_DTYPES, SEQUENCE_FORMAT, array_files, data_bytes, require_empty_store_path
from lightning_kd.soft_targets.sequences import LogitSampling, row_ids, row_positions

_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_MANIFEST_ROOM = 1 << 20  # the sealed manifest (checksums of every file) and file system slack


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
        self.offsets: dict[str, np.ndarray] = {}  # sequence stores: each part's row ranges, (N + 1,) int64
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
        for part, offsets in self.offsets.items():
            stored = np.load(self.path / part / "offsets.npy", mmap_mode="r+", allow_pickle=False)
            stored[:] = offsets
            stored.flush()
            del stored

    def open(self) -> None:
        self.arrays = {
            part: {name: np.load(self.path / part / f"{name}.npy", mmap_mode="r+", allow_pickle=False) for name in array_files(self.spec, part)}
            for part in self.spec["parts"]
        }

    def write(
        self, part: str, epoch: int, index: Tensor, outputs: Tensor, params: Tensor | None, *, batch_idx: int | None = None,
        mask: Tensor | None = None,
    ) -> None:
        """Store the teacher's ``outputs`` (``(B, *output_shape)``) for samples ``index`` at ``epoch``.

        A sequence store takes ``(B, S, V)`` outputs and ``mask`` ``(B, S)``, the valid positions, and
        writes the rows of those positions only (padding is neither checked nor stored).

        Raises:
            RuntimeError: for outputs of another shape, or not finite: any NaN or +inf, or a row (the
                last dimension) that is entirely -inf. A -inf among finite logits is accepted: it is a
                masked class (e.g. a padded vocabulary). Nothing of the batch is written, and this
                writer will not seal the store. A sequence store also refuses a sample with another
                number of valid positions than the first pass counted.
        """
        try:
            if self.spec["format"] == SEQUENCE_FORMAT:
                self._write_tokens(part, index, outputs, mask, batch_idx)
                return
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
        if outputs.is_floating_point():
            self._refuse_nonfinite(outputs, index, index, where)

    def _refuse_nonfinite(self, values: Tensor, owner: Tensor, index: Tensor, where: str) -> None:
        """Raise if ``values`` (``(n, ...)``; row ``r`` belongs to sample ``owner[r]``) are not all usable."""
        values = values.detach()
        nan, posinf, dead = nonfinite_parts(values)  # dead: rows entirely -inf, no distribution at all
        if not bool(nan.any() | posinf.any() | dead.any()):
            return
        per_row = (nan | posinf).reshape(len(values), -1).any(1) | dead.reshape(len(values), -1).any(1)
        samples = sorted(set(owner.cpu()[per_row.cpu()].tolist()))
        shown = ", ".join(map(str, samples[:8])) + (", ..." if len(samples) > 8 else "")
        raise RuntimeError(
            f"The teacher's outputs for {where} are not finite: {int(nan.sum())} NaN, {int(posinf.sum())} +inf and "
            f"{int(dead.sum())} rows entirely -inf, in {len(samples)} of the batch's {index.numel()} samples (sample "
            f"indices {shown}). The store at {self.path} is left incomplete (not sealed). Check the teacher (its "
            "checkpoint; an overflow under `teacher_dtype` / `trainer.precision`). A -inf among finite logits is "
            "accepted: a masked class, e.g. a padded vocabulary."
        )

    def _write_tokens(self, part: str, index: Tensor, outputs: Tensor, mask: Tensor | None, batch_idx: int | None) -> None:
        """A sequence store's rows: the outputs at the valid positions of ``mask``, sample by sample."""
        where = f"part {part!r}, batch {batch_idx}"
        vocab = self.spec["output_shape"][-1]
        if mask is None or outputs.dim() != 3 or outputs.shape[-1] != vocab or tuple(mask.shape) != tuple(outputs.shape[:-1]) or len(mask) != index.numel():
            raise RuntimeError(
                f"The teacher's outputs for {where} have shape {tuple(outputs.shape)} and valid positions "
                f"{None if mask is None else tuple(mask.shape)}, but a sequence store of vocabulary {vocab} needs outputs "
                f"({index.numel()}, S, {vocab}) and integer ({index.numel()}, S) targets from `unpack_batch`."
            )
        samples = index.cpu().numpy()
        counts = mask.sum(dim=1)
        offsets = self.offsets[part]
        expected = offsets[samples + 1] - offsets[samples]
        if not np.array_equal(counts.cpu().numpy(), expected):
            raise RuntimeError(
                f"The valid positions of {where} changed between the counting pass and the teacher pass (samples "
                f"{samples.tolist()}: {counts.tolist()} now, {expected.tolist()} counted): `unpack_batch` must give the same "
                "targets every time it sees a batch."
            )
        rows = outputs[mask]  # (R_b, V): sample after sample, each in the order of its positions
        owner = index.to(counts.device).repeat_interleave(counts)
        self._refuse_nonfinite(rows, owner, index, where + ", valid tokens")
        ids = row_ids(offsets, samples)
        arrays = self.arrays[part]
        if self.spec["sampled"] is not None:
            draw = LogitSampling.from_manifest(self.spec["sampled"]).draw(rows, owner, row_positions(counts))
            arrays["sample_weights"][ids] = draw.weights.cpu().numpy()
            arrays["sample_indices"][ids] = draw.indices.cpu().numpy().astype(arrays["sample_indices"].dtype)
            arrays["entropy"][ids] = draw.entropy.cpu().numpy()
        elif self.spec["top_k"] is not None:
            top = TopKLogits.from_logits(rows, self.spec["top_k"])
            arrays["topk_values"][ids] = _to_numpy(top.values, self.spec["dtype"])
            arrays["topk_indices"][ids] = top.indices.cpu().numpy().astype(arrays["topk_indices"].dtype)
            arrays["tail_logsumexp"][ids] = top.tail_logsumexp.cpu().numpy()
        else:
            arrays["logits"][ids] = _to_numpy(rows, self.spec["dtype"])
        arrays["writes"][samples] += 1  # last: a sample counts as written only once all of its rows are

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
