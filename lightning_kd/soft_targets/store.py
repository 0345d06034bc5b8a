"""The offline soft-target store: a teacher's outputs on a training set, memory-mapped from disk.

Layout of a store directory::

    manifest.json                  ``"kind": "lightning-kd soft-target store"``, ``"format": 2``, what
                                   made it (teacher, data, transform, augmentation, dtype, code
                                   version), every file's shape, size and SHA-256, and
                                   ``"complete": true`` once the build has finished
    <part>/logits.npy              (E, N, *output_shape)   full outputs, or with top-k:
    <part>/topk_values.npy         (E, N, *lead, k)        the k largest logits,
    <part>/topk_indices.npy        (E, N, *lead, k)        their classes,
    <part>/tail_logsumexp.npy      (E, N, *lead)           the log-sum-exp of the others (float32)
    <part>/params.npy              (E, N, P)               augmentation parameters (float32)
    <part>/writes.npy              (E, N)                  how often each row was written (uint8)

``E`` is the number of recorded epochs (1 without augmentation), ``N`` the part's dataset length,
rows are keyed by sample index. A *sequence* store (``"format": 3``, for outputs ``(B, S, V)`` with
per-position targets) holds one row per valid token instead, ragged::

    <part>/offsets.npy             (N + 1,)   int64: sample i's rows are offsets[i]:offsets[i + 1]
    <part>/logits.npy              (R, V)     full logits, or with top-k:
    <part>/topk_values.npy         (R, k)     / topk_indices.npy (R, k) / tail_logsumexp.npy (R,), or sampled:
    <part>/sample_weights.npy      (R, K)     importance weights (float32),
    <part>/sample_indices.npy      (R, K)     the sampled tokens,
    <part>/entropy.npy             (R,)       the teacher's entropy per token (float32)
    <part>/writes.npy              (N,)       how often each sample was written (uint8)

(``R``: the part's valid tokens; see :mod:`lightning_kd.soft_targets.sequences`). A part is one training dataset (``train``, or each loader of a
``CombinedLoader``, e.g. ``labeled`` and ``unlabeled``). Arrays are plain ``.npy`` files (bfloat16
is stored as its uint16 bit pattern): no pickle, no per-sample files, readable with ``np.load``.

Reading needs the sample index of every row of a batch: see :mod:`lightning_kd.soft_targets.batches`.
Building is :mod:`lightning_kd.soft_targets.build`; the manifest's schema, the format versions and which files
of a directory belong to a store (:func:`store_state`, :func:`remove_incomplete_store`) are
:mod:`lightning_kd.soft_targets.manifest`. Every file of a store gets the mode the user's umask gives
(``0o666 & ~umask``), so a store shared through a group-writable umask opens for colleagues.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from lightning_kd.soft_targets.manifest import (
    FORMAT_VERSION,
    KIND,
    MANIFEST,
    NUMPY_DTYPES,
    PART_NAME_RULE,
    SEQUENCE_FORMAT,
    check_format,
    valid_part_name,
    validate_manifest,
)
from lightning_kd.soft_targets.manifest import (  # noqa: F401  (re-exported: where users look for the store's API)
    DTYPES,
    StoreState,
    prepare_store_path,
    remove_incomplete_store,
    require_empty_store_path,
    store_state,
)
from lightning_kd.io import file_sha256, read_json
from lightning_kd.losses.sampled import SampledLogits
from lightning_kd.losses.topk import TopKLogits
from lightning_kd.soft_targets.sequences import LogitSampling, check_offsets, lookup_sequences

_PROBES = 8  # samples fetched twice to detect random augmentation and hashed to identify the data


# ---------------------------------------------------------------------------------- data identity
def _unwrap(dataset: Any) -> Any:
    while hasattr(dataset, "dataset") and not hasattr(dataset, "transform"):
        dataset = dataset.dataset  # Subset, IndexedDataset, ...
    return dataset


def describe_transform(dataset: Any) -> str | None:
    """``repr`` of a dataset's ``transform`` / ``target_transform`` / ``transforms`` (None if it has none)."""
    inner = _unwrap(dataset)
    parts = [f"{name}={getattr(inner, name)!r}" for name in ("transforms", "transform", "target_transform") if getattr(inner, name, None) is not None]
    return "; ".join(parts) or None


def _hash_into(digest: Any, item: Any) -> None:
    if isinstance(item, Tensor):
        digest.update(f"T{item.dtype}{tuple(item.shape)}".encode())
        digest.update(item.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(item, np.ndarray):
        digest.update(f"A{item.dtype}{item.shape}".encode())
        digest.update(np.ascontiguousarray(item).tobytes())
    elif isinstance(item, Mapping):
        for key in sorted(item, key=str):
            digest.update(str(key).encode())
            _hash_into(digest, item[key])
    elif isinstance(item, (tuple, list)):
        digest.update(f"L{len(item)}".encode())
        for value in item:
            _hash_into(digest, value)
    elif hasattr(item, "tobytes"):  # PIL images and the like
        digest.update(item.tobytes())
    else:
        digest.update(repr(item).encode())


def _same(a: Any, b: Any) -> bool:
    da, db = hashlib.sha256(), hashlib.sha256()
    _hash_into(da, a)
    _hash_into(db, b)
    return da.digest() == db.digest()


def require_map_style(dataset: Any, name: str = "train") -> None:
    """Refuse a dataset that cannot be read by sample index (an ``IterableDataset``, or no ``__len__``).

    Raises:
        TypeError: naming the part, and that online distillation (no ``soft_targets``) needs no index.
    """
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        kind = "an IterableDataset" if isinstance(dataset, IterableDataset) else "not map-style"
        raise TypeError(
            f"Stored soft targets are keyed by sample index and need a map-style dataset (with `__getitem__` and "
            f"`__len__`), but training dataset {name!r} is {type(dataset).__name__} ({kind}). Distil online instead "
            "(without `soft_targets`), or give a map-style dataset."
        )


def dataset_identity(dataset: Dataset, name: str = "train") -> dict[str, Any]:
    """Class, length, transform and a content hash of a few samples; checks the samples are deterministic.

    Raises:
        TypeError: for an ``IterableDataset`` (see :func:`require_map_style`).
        RuntimeError: if ``dataset[i]`` differs between two reads (random augmentation): targets
            stored for one view would be silently reused for another.
    """
    require_map_style(dataset, name)
    length = len(dataset)
    if length == 0:
        raise ValueError(f"The training dataset of part {name!r} is empty.")
    digest = hashlib.sha256()
    for i in sorted({int(v) for v in np.linspace(0, length - 1, min(_PROBES, length))}):
        first, second = dataset[i], dataset[i]
        if not _same(first, second):
            raise RuntimeError(
                f"The training dataset of part {name!r} ({type(_unwrap(dataset)).__name__}) returned two different "
                f"samples for index {i}: it augments at random, so teacher outputs stored for one view would be "
                "reused for another. Either remove the random transform from the dataset and pass a replayable "
                "augmentation instead (`DistillationModule(augmentation=...)`, recorded for "
                "`epochs` views), or distil online (without `soft_targets`)."
            )
        _hash_into(digest, first)
    inner = _unwrap(dataset)
    return {
        "class": f"{type(inner).__module__}.{type(inner).__qualname__}",
        "length": length,
        "content_sha256": digest.hexdigest(),
        "transform": describe_transform(dataset),
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lightning-kd")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0.0.0+unknown"


# ---------------------------------------------------------------------------------- reading
class SoftTargetStore:
    """A finished soft-target store, opened read-only (memory-mapped).

    Args:
        path: the store directory (``manifest.json`` and one folder per part).
        verify: check every file's SHA-256 against the manifest (a full read; sizes, shapes and
            the ``complete`` flag are always checked). Format-1 stores (earlier versions, no ``kind``
            marker) are read when complete and valid.

    Raises:
        FileNotFoundError: if there is no store at ``path``.
        RuntimeError: if the store is incomplete (an interrupted build), from another format
            version, truncated, or corrupted, or if its manifest breaks the schema (a missing key,
            a wrong type, a part name that is not a plain folder name, an unknown file: see
            :func:`~lightning_kd.soft_targets.manifest.validate_manifest`).

    Example::

        >>> store = SoftTargetStore("outputs/soft_targets")  # doctest: +SKIP
        >>> store.lookup("train", torch.tensor([0, 5]), epoch=0).shape  # doctest: +SKIP
        torch.Size([2, 10])
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"No soft-target store at {self.path} (no manifest.json). Build one with "
                "`lightning_kd.build_soft_targets(teacher, data, path)`."
            )
        manifest = read_json(manifest_path, what="soft-target store manifest")
        check_format(manifest, manifest_path, _version())
        if manifest.get("complete") is not True:
            raise RuntimeError(
                f"Soft-target store {self.path} is incomplete: its build did not finish. Remove it with "
                "`lightning_kd.soft_targets.store.remove_incomplete_store(path)` and build it again."
            )
        validate_manifest(manifest, manifest_path)  # part names, file names, shapes, dtypes: before any file is opened
        self.manifest = manifest
        self.arrays: dict[str, dict[str, np.ndarray]] = {}
        self.offsets: dict[str, np.ndarray] = {}  # sequence stores: each part's row ranges, in memory
        for part, info in manifest["parts"].items():
            self.arrays[part] = {name: self._open_array(part, name, meta, verify) for name, meta in info["files"].items()}
            if self.sequences:
                self.offsets[part] = np.array(self.arrays[part]["offsets"])
                check_offsets(self.offsets[part], info["rows"], f"{self.path}/{part}")

    @staticmethod
    def is_complete(path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` holds a finished store of ours (cheap: reads the manifest only, hashes nothing).

        An unfinished build, a missing or empty folder, and anything that is not our store are all
        ``False``; :func:`~lightning_kd.soft_targets.manifest.store_state` says which.
        """
        return store_state(path) == "complete"

    def _open_array(self, part: str, name: str, meta: dict[str, Any], verify: bool) -> np.ndarray:
        file = self.path / part / f"{name}.npy"
        if (self.path / part).is_symlink() or file.is_symlink():  # the store itself may be a link; nothing inside it
            raise RuntimeError(
                f"Soft-target store {self.path} is not a plain store: {part}{'' if (self.path / part).is_symlink() else '/' + name + '.npy'} "
                "is a symbolic link, and a store never reads outside its own directory. Rebuild it."
            )
        if not file.is_file() or file.stat().st_size != meta["bytes"]:
            size = file.stat().st_size if file.is_file() else "missing"
            raise RuntimeError(
                f"Soft-target store {self.path} is truncated or damaged: {part}/{name}.npy has "
                f"{size} bytes, the manifest says {meta['bytes']}. Rebuild it."
            )
        if verify and file_sha256(file) != meta["sha256"]:
            raise RuntimeError(
                f"Soft-target store {self.path} is corrupted: the SHA-256 of {part}/{name}.npy does not "
                "match its manifest. Rebuild it."
            )
        try:
            array = np.load(file, mmap_mode="r", allow_pickle=False)  # never pickle, whatever the header says
        except (ValueError, OSError) as err:
            raise RuntimeError(f"Soft-target store {self.path} is damaged: {part}/{name}.npy is not a plain .npy array ({err}). Rebuild it.") from err
        expected = np.dtype(NUMPY_DTYPES[meta["dtype"]])
        if list(array.shape) != meta["shape"] or array.dtype != expected or array.offset + array.nbytes != meta["bytes"]:
            raise RuntimeError(
                f"Soft-target store {self.path} is damaged: {part}/{name}.npy holds {array.dtype} {list(array.shape)} "
                f"in {meta['bytes']} bytes, the manifest says {expected} {meta['shape']}. Rebuild it."
            )
        return array

    def __getstate__(self) -> dict[str, Any]:
        # Pickled (ddp_spawn, DataLoader workers) as its path: a memmap would pickle as a full in-memory copy.
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], verify=False)  # checked when first opened; sizes are checked again

    # -- what the manifest says
    @property
    def parts(self) -> list[str]:
        return list(self.manifest["parts"])

    @property
    def epochs(self) -> int:
        return int(self.manifest["epochs"])

    @property
    def top_k(self) -> int | None:
        return self.manifest["top_k"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def sequences(self) -> bool:
        """Whether this is a sequence store: one row per valid token (format 3; :meth:`lookup` then needs the mask)."""
        return self.manifest["format"] == SEQUENCE_FORMAT

    @property
    def sampled(self) -> LogitSampling | None:
        """How the targets were sampled, for a store of sampled targets (None otherwise)."""
        entry = self.manifest.get("sampled")
        return None if entry is None else LogitSampling.from_manifest(entry)

    @property
    def teacher_fingerprint(self) -> str:
        return self.manifest["teacher"]["fingerprint"]

    def __repr__(self) -> str:
        sizes = {p: i["identity"]["length"] for p, i in self.manifest["parts"].items()}
        if self.sequences:
            tokens = {p: i["rows"] for p, i in self.manifest["parts"].items()}
            return (f"SoftTargetStore({str(self.path)!r}, parts={sizes}, tokens={tokens}, dtype={self.dtype}, top_k={self.top_k}, "
                    f"sampled={self.sampled})")
        return f"SoftTargetStore({str(self.path)!r}, parts={sizes}, epochs={self.epochs}, dtype={self.dtype}, top_k={self.top_k})"

    # -- checks
    def check_teacher(self, fingerprint: str) -> None:
        """Refuse a store made by another teacher (``fingerprint`` from :func:`lightning_kd.checkpoint.fingerprint`)."""
        if fingerprint != self.teacher_fingerprint:
            raise RuntimeError(
                f"Soft-target store {self.path} was made by another teacher: its weights fingerprint is "
                f"{self.teacher_fingerprint[:12]}, the given teacher's is {fingerprint[:12]}. Rebuild the store "
                "for this teacher, or open the store this teacher built."
            )

    def check_augmentation(self, augmentation: Any) -> None:
        """Refuse a store recorded with another augmentation than the one training will replay."""
        recorded, given = self.manifest["augmentation"], None if augmentation is None else repr(augmentation)
        if recorded != given:
            raise RuntimeError(
                f"Soft-target store {self.path} was recorded with augmentation {recorded}, but training uses "
                f"{given}. Teacher outputs of other views would be reused: rebuild the store with this "
                "augmentation or train with the recorded one."
            )

    def match_part(self, name: str, dataset: Dataset) -> str:
        """The store part holding ``dataset``'s targets (the part named ``name``, or the one with the same data).

        Raises:
            RuntimeError: naming what differs (class, length, content, transform) when no part matches.
        """
        identity = dataset_identity(dataset, name)
        parts = self.manifest["parts"]
        for part, info in parts.items():
            if info["identity"] == identity:
                return part
        closest = name if name in parts else (next(iter(parts)) if len(parts) == 1 else None)
        if closest is None:
            raise RuntimeError(
                f"Soft-target store {self.path} holds no targets for training dataset {name!r}: its parts are "
                f"{', '.join(parts)} and none has the same data. Rebuild the store from this datamodule."
            )
        recorded = parts[closest]["identity"]
        diffs = [f"{key}: stored {recorded.get(key)!r}, now {identity.get(key)!r}" for key in identity if identity[key] != recorded.get(key)]
        raise RuntimeError(
            f"Soft-target store {self.path} (part {closest!r}) was built from other data than training dataset "
            f"{name!r}; {'; '.join(diffs)}. Rebuild the store for this data."
        )

    # -- rows
    def _epoch(self, epoch: int) -> int:
        return epoch % self.epochs  # a run longer than the recording replays the recorded views in a cycle

    def lookup(self, part: str, index: Tensor, epoch: int = 0, *, mask: Tensor | None = None) -> Tensor | TopKLogits | SampledLogits:
        """The teacher's outputs for samples ``index`` (``(B,)``) at ``epoch``: a CPU tensor in the stored
        dtype, ``(B, *output_shape)``, or :class:`TopKLogits` for a top-k store.

        A sequence store needs ``mask``, the batch's valid positions ``(B, S)`` (bool; ``targets != -100``),
        and returns ``(B, S, V)`` logits, :class:`TopKLogits` or :class:`SampledLogits` of leading shape
        ``(B, S)``: each sample's rows in its valid positions, in order, and a filler elsewhere
        (:func:`~lightning_kd.soft_targets.sequences.lookup_sequences`). Other stores ignore ``mask``.

        Raises:
            IndexError: for an index outside the part.
            RuntimeError: for a sequence store without ``mask``, or a sample whose valid positions in ``mask``
                are not as many as the rows stored for it (other labels, prompt masks or ``unpack_batch``).
        """
        arrays, e, rows = self._part(part), self._epoch(epoch), self._rows(part, index)
        if self.sequences:
            if mask is None:
                raise RuntimeError(
                    f"Soft-target store {self.path} holds one row per valid token of a sequence: looking samples up needs the "
                    "batch's valid positions (`mask=targets != -100`, (batch, sequence)). DistillationModule passes them for "
                    "integer (batch, sequence) targets from `unpack_batch` (CausalLMDistillation's shifted labels)."
                )
            return lookup_sequences(arrays, self.offsets[part], self.manifest, rows, mask, store=self.path, part=part)
        if self.top_k is None:
            return _from_numpy(arrays["logits"][e][rows], self.dtype)
        return TopKLogits(
            _from_numpy(arrays["topk_values"][e][rows], self.dtype),
            torch.from_numpy(arrays["topk_indices"][e][rows].astype(np.int64)),
            torch.from_numpy(np.asarray(arrays["tail_logsumexp"][e][rows])),
        )

    def augmentation_params(self, part: str, index: Tensor, epoch: int = 0) -> Tensor | None:
        """The recorded augmentation parameters of samples ``index`` at ``epoch`` (None without augmentation)."""
        if "params" not in self._part(part):
            return None
        return torch.from_numpy(np.asarray(self.arrays[part]["params"][self._epoch(epoch)][self._rows(part, index)]))

    def _part(self, part: str) -> dict[str, np.ndarray]:
        if part not in self.arrays:
            raise KeyError(f"Soft-target store {self.path} has no part {part!r}. Expected one of: {', '.join(self.arrays)}.")
        return self.arrays[part]

    def _rows(self, part: str, index: Tensor) -> np.ndarray:
        """``index`` as row numbers, refusing any outside ``[0, N)`` (numpy would wrap a negative one round silently)."""
        rows = index.cpu().numpy()
        length = self.manifest["parts"][part]["identity"]["length"]
        if rows.size and (rows.min() < 0 or rows.max() >= length):
            raise IndexError(
                f"Expected sample indices in [0, {length}) for part {part!r} of soft-target store {self.path}, but got "
                f"values from {rows.min()} to {rows.max()}."
            )
        return rows


def _from_numpy(array: np.ndarray, dtype: str) -> Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def open_store(store: "SoftTargetStore | str | os.PathLike[str]", *, verify: bool = True, recorded: bool = False) -> SoftTargetStore:
    """``store`` itself, or the store at that path. ``recorded``: the path comes from a checkpoint being loaded,
    and a store that is no longer there gets a message that says what to pass instead."""
    if isinstance(store, SoftTargetStore):
        return store
    try:
        return SoftTargetStore(store, verify=verify)
    except FileNotFoundError as err:
        if not recorded:
            raise
        raise FileNotFoundError(
            f"The checkpoint was trained from the soft-target store at {store}, which is no longer there. Pass "
            "`soft_targets=<its new path>` to `load_from_checkpoint` to go on training from it, or `soft_targets=None` "
            "to load the weights (evaluation, export)."
        ) from err


def store_spec(
    parts: Mapping[str, Dataset],
    *,
    teacher_fingerprint: str,
    teacher_class: str,
    teacher_checkpoint: str | None,
    output_shape: Iterable[int],
    dtype: str,
    top_k: int | None,
    epochs: int,
    augmentation: Any,
    augmentation_seed: int,
    world_size: int,
) -> dict[str, Any]:
    """The manifest of a store about to be built (files and checksums are added by :meth:`lightning_kd.soft_targets.build.StoreWriter.finish`).

    Raises:
        ValueError: if a part name (a key of the training loaders) is not a plain folder name.
        TypeError: if a training dataset is not map-style (see :func:`require_map_style`).
    """
    for name in parts:
        if not valid_part_name(name):
            raise ValueError(
                f"Expected the names of the training loaders (the keys of the CombinedLoader or dict: each becomes a "
                f"folder of the store) to be {PART_NAME_RULE}, but got {name!r}."
            )
    return {
        "kind": KIND,
        "format": FORMAT_VERSION,
        "lightning_kd": _version(),
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "teacher": {"fingerprint": teacher_fingerprint, "class": teacher_class, "checkpoint": teacher_checkpoint},
        "output_shape": list(output_shape),
        "dtype": dtype,
        "top_k": top_k,
        "epochs": epochs,
        "augmentation": None if augmentation is None else repr(augmentation),
        "augmentation_params": None if augmentation is None else augmentation.num_params,
        "augmentation_seed": augmentation_seed,
        "world_size": world_size,
        "parts": {name: {"identity": dataset_identity(ds, name)} for name, ds in parts.items()},
    }
