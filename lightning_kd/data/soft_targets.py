"""The offline soft-target store: a teacher's outputs on a training set, memory-mapped from disk.

Layout of a store directory::

    manifest.json                  what made it (teacher, data, transform, augmentation, dtype,
                                   code version), every file's shape, size and SHA-256,
                                   and ``"complete": true`` once the build has finished
    <part>/logits.npy              (E, N, *output_shape)   full outputs, or with top-k:
    <part>/topk_values.npy         (E, N, *lead, k)        the k largest logits,
    <part>/topk_indices.npy        (E, N, *lead, k)        their classes,
    <part>/tail_logsumexp.npy      (E, N, *lead)           the log-sum-exp of the others (float32)
    <part>/params.npy              (E, N, P)               augmentation parameters (float32)
    <part>/writes.npy              (E, N)                  how often each row was written (uint8)

``E`` is the number of recorded epochs (1 without augmentation), ``N`` the part's dataset length,
rows are keyed by sample index. A part is one training dataset (``train``, or each loader of a
``CombinedLoader``, e.g. ``labeled`` and ``unlabeled``). Arrays are plain ``.npy`` files (bfloat16
is stored as its uint16 bit pattern): no pickle, no per-sample files, readable with ``np.load``.

Reading needs the sample index of every row of a batch: see :mod:`lightning_kd.data.indexed`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_kd.losses.topk import TopKLogits

FORMAT_VERSION = 1
DTYPES = ("float16", "bfloat16", "float32")
_NUMPY = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}
_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
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


def dataset_identity(dataset: Dataset, name: str = "train") -> dict[str, Any]:
    """Class, length, transform and a content hash of a few samples; checks the samples are deterministic.

    Raises:
        RuntimeError: if ``dataset[i]`` differs between two reads (random augmentation): targets
            cached for one view would be silently reused for another.
    """
    length = len(dataset)
    if length == 0:
        raise ValueError(f"The training dataset of part {name!r} is empty.")
    digest = hashlib.sha256()
    for i in sorted({int(v) for v in np.linspace(0, length - 1, min(_PROBES, length))}):
        first, second = dataset[i], dataset[i]
        if not _same(first, second):
            raise RuntimeError(
                f"The training dataset of part {name!r} ({type(_unwrap(dataset)).__name__}) returned two different "
                f"samples for index {i}: it augments at random, so teacher outputs cached for one view would be "
                "reused for another. Either remove the random transform from the dataset and pass a replayable "
                "augmentation instead (`DistillationModule(augmentation=...)` / `augment=...`, cached for "
                "`cache.epochs` epochs), or distil online (`distill.targets=online`)."
            )
        _hash_into(digest, first)
    inner = _unwrap(dataset)
    return {
        "class": f"{type(inner).__module__}.{type(inner).__qualname__}",
        "length": length,
        "content_sha256": digest.hexdigest(),
        "transform": describe_transform(dataset),
    }


# ---------------------------------------------------------------------------------- files
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _version() -> str:
    from lightning_kd import __version__

    return __version__


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

    def _files(self, part: str) -> dict[str, tuple[tuple[int, ...], str]]:
        spec, info = self.spec, self.spec["parts"][part]
        lead = (spec["epochs"], info["identity"]["length"])
        out = tuple(spec["output_shape"])
        files: dict[str, tuple[tuple[int, ...], str]] = {"writes": (lead, "uint8")}
        if spec["top_k"] is None:
            files["logits"] = (lead + out, spec["dtype"])
        else:
            k = spec["top_k"]
            files["topk_values"] = (lead + out[:-1] + (k,), spec["dtype"])
            files["topk_indices"] = (lead + out[:-1] + (k,), "int32" if out[-1] > 32767 else "int16")
            files["tail_logsumexp"] = (lead + out[:-1], "float32")
        if spec["augmentation"] is not None:
            files["params"] = (lead + (spec["augmentation_params"],), "float32")
        return files

    def create(self) -> None:
        if self.path.exists() and any(self.path.iterdir()):
            raise FileExistsError(f"{self.path} is not empty: choose another `cache.path` or remove it.")
        self.path.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self.path / "manifest.json", {**self.spec, "complete": False})
        for part in self.spec["parts"]:
            (self.path / part).mkdir()
            for name, (shape, dtype) in self._files(part).items():
                arr = np.lib.format.open_memmap(self.path / part / f"{name}.npy", mode="w+", dtype=_NUMPY.get(dtype, dtype), shape=shape)
                del arr  # zero-filled on disk; every process reopens it in r+ mode

    def open(self) -> None:
        self.arrays = {
            part: {name: np.load(self.path / part / f"{name}.npy", mmap_mode="r+") for name in self._files(part)}
            for part in self.spec["parts"]
        }

    def write(self, part: str, epoch: int, index: Tensor, outputs: Tensor, params: Tensor | None) -> None:
        """Store the teacher's ``outputs`` (``(B, *output_shape)``) for samples ``index`` at ``epoch``."""
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
        arrays["writes"][epoch, rows] += 1

    def flush(self) -> None:
        for arrays in self.arrays.values():
            for arr in arrays.values():
                arr.flush()

    def finish(self, seconds: float) -> None:
        """Check that every row was written exactly once, then write checksums and mark the store complete."""
        manifest = {**self.spec, "parts": {}}
        for part, info in self.spec["parts"].items():
            writes = np.load(self.path / part / "writes.npy", mmap_mode="r")
            missing, repeated = int((writes == 0).sum()), int((writes > 1).sum())
            if missing or repeated:
                raise RuntimeError(
                    f"Soft-target store {self.path}, part {part!r}: {missing} rows were never written and "
                    f"{repeated} more than once (of {writes.size}). The build is refused."
                )
            files = {}
            for name, (shape, dtype) in self._files(part).items():
                file = self.path / part / f"{name}.npy"
                files[name] = {"shape": list(shape), "dtype": dtype, "bytes": file.stat().st_size, "sha256": _sha256(file)}
            manifest["parts"][part] = {**info, "files": files}
        manifest["build_seconds"] = round(seconds, 3)
        manifest["complete"] = True
        _write_json_atomic(self.path / "manifest.json", manifest)


def _to_numpy(values: Tensor, dtype: str) -> np.ndarray:
    source = values.detach()
    stored = source.to(_TORCH[dtype])
    if dtype != "float32" and bool((torch.isfinite(source) & ~torch.isfinite(stored)).any()):
        raise ValueError(
            f"Teacher outputs of magnitude up to {source.abs().max().item():.3g} overflow `cache.dtype` "
            f"{dtype!r}. Use one of: {', '.join(d for d in DTYPES if d != dtype)} (bfloat16 or float32 keep the range)."
        )
    array = stored.cpu()
    return array.view(torch.uint16).numpy() if dtype == "bfloat16" else array.numpy()


# ---------------------------------------------------------------------------------- reading
class SoftTargetStore:
    """A finished soft-target store, opened read-only (memory-mapped).

    Args:
        path: the store directory (``manifest.json`` and one folder per part).
        verify: check every file's SHA-256 against the manifest (a full read; sizes, shapes and
            the ``complete`` flag are always checked).

    Raises:
        FileNotFoundError: if there is no store at ``path``.
        RuntimeError: if the store is incomplete (an interrupted build), from another format
            version, truncated, or corrupted.

    Example::

        >>> store = SoftTargetStore("outputs/soft_targets")  # doctest: +SKIP
        >>> store.lookup("train", torch.tensor([0, 5]), epoch=0).shape  # doctest: +SKIP
        torch.Size([2, 10])
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True) -> None:
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"No soft-target store at {self.path} (no manifest.json). Build one with `lightning-kd task=cache "
                "teacher.checkpoint=PATH cache.path=...` or `lightning_kd.build_soft_targets(...)`."
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise RuntimeError(f"The manifest of soft-target store {self.path} is corrupted: {err}.") from err
        if manifest.get("format") != FORMAT_VERSION:
            raise RuntimeError(
                f"Soft-target store {self.path} has format {manifest.get('format')!r}, but this lightning-kd "
                f"({_version()}) reads format {FORMAT_VERSION}. Rebuild it."
            )
        if not manifest.get("complete"):
            raise RuntimeError(
                f"Soft-target store {self.path} is incomplete: its build did not finish. Remove it and build it again."
            )
        self.manifest = manifest
        self.arrays: dict[str, dict[str, np.ndarray]] = {}
        for part, info in manifest["parts"].items():
            self.arrays[part] = {}
            for name, meta in info["files"].items():
                file = self.path / part / f"{name}.npy"
                if not file.is_file() or file.stat().st_size != meta["bytes"]:
                    size = file.stat().st_size if file.is_file() else "missing"
                    raise RuntimeError(
                        f"Soft-target store {self.path} is truncated or damaged: {part}/{name}.npy has "
                        f"{size} bytes, the manifest says {meta['bytes']}. Rebuild it."
                    )
                if verify and _sha256(file) != meta["sha256"]:
                    raise RuntimeError(
                        f"Soft-target store {self.path} is corrupted: the SHA-256 of {part}/{name}.npy does not "
                        "match its manifest. Rebuild it."
                    )
                array = np.load(file, mmap_mode="r")
                if list(array.shape) != meta["shape"]:
                    raise RuntimeError(f"Soft-target store {self.path}: {part}/{name}.npy has shape {array.shape}, expected {meta['shape']}.")
                self.arrays[part][name] = array

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
    def teacher_fingerprint(self) -> str:
        return self.manifest["teacher"]["fingerprint"]

    def __repr__(self) -> str:
        sizes = {p: i["identity"]["length"] for p, i in self.manifest["parts"].items()}
        return f"SoftTargetStore({str(self.path)!r}, parts={sizes}, epochs={self.epochs}, dtype={self.dtype}, top_k={self.top_k})"

    # -- checks
    def check_teacher(self, fingerprint: str) -> None:
        """Refuse a store made by another teacher (``fingerprint`` from :func:`lightning_kd.checkpoint.fingerprint`)."""
        if fingerprint != self.teacher_fingerprint:
            raise RuntimeError(
                f"Soft-target store {self.path} was made by another teacher: its weights fingerprint is "
                f"{self.teacher_fingerprint[:12]}, the given teacher's is {fingerprint[:12]}. Rebuild the cache "
                "for this teacher (`lightning-kd task=cache ...`) or point `cache.path` at the right one."
            )

    def check_augmentation(self, augmentation: Any) -> None:
        """Refuse a store recorded with another augmentation than the one training will replay."""
        recorded, given = self.manifest["augmentation"], None if augmentation is None else repr(augmentation)
        if recorded != given:
            raise RuntimeError(
                f"Soft-target store {self.path} was recorded with augmentation {recorded}, but training uses "
                f"{given}. Teacher outputs of other views would be reused: rebuild the cache with this "
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
                f"{', '.join(parts)} and none has the same data. Rebuild the cache from this datamodule."
            )
        recorded = parts[closest]["identity"]
        diffs = [f"{key}: cached {recorded.get(key)!r}, now {identity.get(key)!r}" for key in identity if identity[key] != recorded.get(key)]
        raise RuntimeError(
            f"Soft-target store {self.path} (part {closest!r}) was built from other data than training dataset "
            f"{name!r}; {'; '.join(diffs)}. Rebuild the cache for this data."
        )

    # -- rows
    def _epoch(self, epoch: int) -> int:
        return epoch % self.epochs  # a run longer than the recording replays the recorded views in a cycle

    def lookup(self, part: str, index: Tensor, epoch: int = 0) -> Tensor | TopKLogits:
        """The teacher's outputs for samples ``index`` (``(B,)``) at ``epoch``: a CPU tensor in the stored
        dtype, ``(B, *output_shape)``, or :class:`TopKLogits` for a top-k store."""
        arrays, e, rows = self.arrays[part], self._epoch(epoch), index.cpu().numpy()
        if self.top_k is None:
            return _from_numpy(arrays["logits"][e][rows], self.dtype)
        return TopKLogits(
            _from_numpy(arrays["topk_values"][e][rows], self.dtype),
            torch.from_numpy(arrays["topk_indices"][e][rows].astype(np.int64)),
            torch.from_numpy(np.asarray(arrays["tail_logsumexp"][e][rows])),
        )

    def augmentation_params(self, part: str, index: Tensor, epoch: int = 0) -> Tensor | None:
        """The recorded augmentation parameters of samples ``index`` at ``epoch`` (None without augmentation)."""
        if "params" not in self.arrays[part]:
            return None
        return torch.from_numpy(np.asarray(self.arrays[part]["params"][self._epoch(epoch)][index.cpu().numpy()]))


def _from_numpy(array: np.ndarray, dtype: str) -> Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def open_store(store: "SoftTargetStore | str | os.PathLike[str]", *, verify: bool = True) -> SoftTargetStore:
    return store if isinstance(store, SoftTargetStore) else SoftTargetStore(store, verify=verify)


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
    """The manifest of a store about to be built (files and checksums are added by :meth:`StoreWriter.finish`)."""
    return {
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
