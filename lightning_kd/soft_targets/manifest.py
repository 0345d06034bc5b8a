"""The soft-target store as files: the manifest's schema, and which files of a directory are the store's.

A store is trusted only as far as this module can check it. Opening one validates its manifest
(:func:`validate_manifest`: every key, type and value, plain part names, only the known array
files with the shapes and dtypes the manifest itself implies). Deleting one (:func:`remove_incomplete_store`)
is allowed only for the interrupted build of a store that carries our marker and whose directory
holds nothing but what our writer creates; anything else is left untouched.

Formats:
    3: sequence stores (written by this version for outputs ``(B, S, V)`` with per-position targets):
       one row per valid token, ragged, with an ``offsets`` array per part (see
       :mod:`lightning_kd.soft_targets.sequences`); the marker as in format 2, plus ``positions``,
       ``sampled`` and each part's ``rows``.
    2: ``"kind": "lightning-kd soft-target store"`` and ``"format": 2`` (written by this version): one
       row per sample.
    1: no ``kind`` (earlier versions). Read when complete and valid (the layout is the same as 2); never
       deleted, because without the marker a directory cannot be told apart from a user's own files.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lightning_kd.io import read_json

log = logging.getLogger(__name__)

KIND = "lightning-kd soft-target store"
FORMAT_VERSION = 2  # one row per sample
SEQUENCE_FORMAT = 3  # one row per valid token (lightning_kd.soft_targets.sequences)
READABLE_FORMATS = (1, 2, 3)
WRITTEN_FORMATS = (FORMAT_VERSION, SEQUENCE_FORMAT)  # the formats whose unfinished builds carry our marker
MANIFEST = "manifest.json"
DTYPES = ("float16", "bfloat16", "float32")
ARRAYS = ("logits", "topk_values", "topk_indices", "tail_logsumexp", "params", "writes",
          "offsets", "sample_weights", "sample_indices", "entropy")
# Stored dtype name -> numpy dtype of the file (bfloat16 is kept as its uint16 bit pattern).
NUMPY_DTYPES = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32, "int16": np.int16, "int32": np.int32,
                "int64": np.int64, "uint8": np.uint8}
# A part is a folder of the store: one plain name, no separator, not hidden (so never `.`, `..` or a temp file).
PART_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # always fullmatch: `$` would let a trailing newline in
PART_NAME_RULE = f"plain names matching {PART_NAME.pattern} (no `/`, not `.` or `..`, not {MANIFEST!r}, at most 200 characters)"
_SHA256 = re.compile(r"[0-9a-f]{64}")

StoreState = Literal["missing", "empty", "complete", "incomplete", "foreign"]


def valid_part_name(name: Any) -> bool:
    """Whether ``name`` can be a part: a folder directly inside the store (see ``PART_NAME_RULE``)."""
    return isinstance(name, str) and bool(PART_NAME.fullmatch(name)) and name != MANIFEST and len(name) <= 200


def array_files(spec: dict[str, Any], part: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """The arrays of ``part`` as ``{name: (shape, dtype)}``: what the writer creates and the reader expects."""
    out = tuple(spec["output_shape"])
    if spec.get("format") == SEQUENCE_FORMAT:
        return sequence_files(spec, part)
    lead = (spec["epochs"], spec["parts"][part]["identity"]["length"])
    files: dict[str, tuple[tuple[int, ...], str]] = {"writes": (lead, "uint8")}
    if spec["top_k"] is None:
        files["logits"] = (lead + out, spec["dtype"])
    else:
        k = spec["top_k"]
        files["topk_values"] = (lead + out[:-1] + (k,), spec["dtype"])
        files["topk_indices"] = (lead + out[:-1] + (k,), index_dtype(out[-1]))
        files["tail_logsumexp"] = (lead + out[:-1], "float32")
    if spec["augmentation"] is not None:
        files["params"] = (lead + (spec["augmentation_params"],), "float32")
    return files


def sequence_files(spec: dict[str, Any], part: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """The arrays of a format-3 part as ``{name: (shape, dtype)}``: ``R`` rows, one per valid token (see
    :mod:`lightning_kd.soft_targets.sequences`), and per sample its write count and the offsets of its rows."""
    length, rows = spec["parts"][part]["identity"]["length"], spec["parts"][part]["rows"]
    indices = index_dtype(spec["output_shape"][-1])
    files: dict[str, tuple[tuple[int, ...], str]] = {"writes": ((length,), "uint8"), "offsets": ((length + 1,), "int64")}
    if spec.get("sampled") is not None:
        k = spec["sampled"]["k"]
        files["sample_weights"] = ((rows, k), "float32")
        files["sample_indices"] = ((rows, k), indices)
        files["entropy"] = ((rows,), "float32")
    elif spec["top_k"] is not None:
        files["topk_values"] = ((rows, spec["top_k"]), spec["dtype"])
        files["topk_indices"] = ((rows, spec["top_k"]), indices)
        files["tail_logsumexp"] = ((rows,), "float32")
    else:
        files["logits"] = ((rows, spec["output_shape"][-1]), spec["dtype"])
    return files


def index_dtype(classes: int) -> str:
    """The dtype of stored class indices: int16 up to 32,767 classes, else int32."""
    return "int32" if classes > 32767 else "int16"


def data_bytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * np.dtype(NUMPY_DTYPES[dtype]).itemsize


# ---------------------------------------------------------------------------------- schema
def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


class _Schema:
    """Checks one manifest; every failure is a RuntimeError naming the key and the file."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def fail(self, key: str, expected: str, got: Any) -> None:
        raise RuntimeError(
            f"The soft-target store manifest {str(self.file)!r} is invalid: expected `{key}` to be {expected}, "
            f"but got {got!r}. Rebuild the store."
        )

    def get(self, mapping: dict[str, Any], key: str, where: str = "") -> Any:
        if key not in mapping:
            raise RuntimeError(
                f"The soft-target store manifest {str(self.file)!r} is invalid: the required key `{where}{key}` is "
                "missing. Rebuild the store."
            )
        return mapping[key]

    def typed(self, mapping: dict[str, Any], key: str, kind: str, where: str = "") -> Any:
        value = self.get(mapping, key, where)
        ok = {
            "str": isinstance(value, str),
            "str or null": value is None or isinstance(value, str),
            "an int": _int(value),
            "an int >= 0": _int(value) and value >= 0,
            "an int >= 1": _int(value) and value >= 1,
            "null or an int >= 1": value is None or (_int(value) and value >= 1),
            "a number > 0": _positive(value),
            "null or a number > 0": value is None or _positive(value),
            "null or an object": value is None or isinstance(value, dict),
            "a bool": isinstance(value, bool),
            "an object": isinstance(value, dict),
            "a non-empty object": isinstance(value, dict) and bool(value),
            "a list of ints >= 1": isinstance(value, list) and all(_int(v) and v >= 1 for v in value),
        }[kind]
        if not ok:
            self.fail(where + key, kind, value)
        return value


def check_format(manifest: Any, file: Path, version: str) -> None:
    """Refuse what is not a store manifest of a format this version reads (``version``: ours, for the message)."""
    if not isinstance(manifest, dict):
        raise RuntimeError(f"The soft-target store manifest {str(file)!r} is invalid: expected a JSON object, but got {type(manifest).__name__}.")
    if "kind" in manifest and manifest["kind"] != KIND:
        raise RuntimeError(f"{str(file)!r} is not a soft-target store manifest: its `kind` is {manifest['kind']!r}, expected {KIND!r}.")
    fmt = manifest.get("format")
    if fmt not in READABLE_FORMATS or isinstance(fmt, bool):
        raise RuntimeError(
            f"Soft-target store {file.parent} has format {fmt!r}, but this lightning-kd ({version}) reads formats "
            "1 and 2. Rebuild it. (Formats 1 and 2 hold one row per sample; sequence stores, one row per valid token, "
            "are format 3, which it reads too.)"
        )
    if fmt >= 2 and manifest.get("kind") != KIND:
        raise RuntimeError(f"The soft-target store manifest {str(file)!r} is invalid: format {fmt} needs `kind` {KIND!r}. Rebuild the store.")


def validate_manifest(manifest: dict[str, Any], file: Path) -> None:
    """Check a complete store's manifest against the schema (call :func:`check_format` first).

    Raises:
        RuntimeError: naming the key and ``file`` for a missing key, a wrong type, a value outside
            its allowed set, a part name that is not a plain name, or files other than the ones the
            manifest's own shapes and dtypes imply.
    """
    s = _Schema(file)
    s.typed(manifest, "complete", "a bool")
    teacher = s.typed(manifest, "teacher", "an object")
    s.typed(teacher, "fingerprint", "str", "teacher.")
    s.typed(teacher, "class", "str", "teacher.")
    s.typed(teacher, "checkpoint", "str or null", "teacher.")
    if s.get(manifest, "dtype") not in DTYPES:
        s.fail("dtype", f"one of {', '.join(DTYPES)}", manifest["dtype"])
    top_k = s.typed(manifest, "top_k", "null or an int >= 1")
    shape = s.typed(manifest, "output_shape", "a list of ints >= 1")
    if top_k is not None and (not shape or top_k > shape[-1]):
        s.fail("top_k", f"at most the last output dimension ({shape[-1] if shape else 'none'})", top_k)
    s.typed(manifest, "epochs", "an int >= 1")
    s.typed(manifest, "augmentation_seed", "an int")
    if s.typed(manifest, "augmentation", "str or null") is None:
        if s.get(manifest, "augmentation_params") is not None:
            s.fail("augmentation_params", "null without augmentation", manifest["augmentation_params"])
    else:
        s.typed(manifest, "augmentation_params", "an int >= 0")
    sequences = manifest.get("format") == SEQUENCE_FORMAT
    if sequences:
        _validate_sequence_keys(s, manifest)
    for name, info in s.typed(manifest, "parts", "a non-empty object").items():
        if not valid_part_name(name):
            s.fail("parts", f"keyed by {PART_NAME_RULE}", name)
        where = f"parts.{name}."
        if not isinstance(info, dict):
            s.fail(where[:-1], "an object", info)
        if sequences:
            s.typed(info, "rows", "an int >= 0", where)
        identity = s.typed(info, "identity", "an object", where)
        s.typed(identity, "length", "an int >= 1", where + "identity.")
        s.typed(identity, "class", "str", where + "identity.")
        s.typed(identity, "content_sha256", "str", where + "identity.")
        s.typed(identity, "transform", "str or null", where + "identity.")
        files = s.typed(info, "files", "an object", where)
        expected = array_files(manifest, name)
        if set(files) != set(expected):
            s.fail(where + "files", f"the arrays {sorted(expected)}", sorted(files))
        for array, (array_shape, dtype) in expected.items():
            meta, at = files[array], f"{where}files.{array}."
            if not isinstance(meta, dict):
                s.fail(at[:-1], "an object", meta)
            if s.get(meta, "shape", at) != list(array_shape):
                source = "the part's length and rows, `output_shape`, `top_k` and `sampled`" if sequences else "`epochs`, the part's length, `output_shape` and `top_k`"
                s.fail(at + "shape", f"{list(array_shape)} (from {source})", meta["shape"])
            if s.get(meta, "dtype", at) != dtype:
                s.fail(at + "dtype", repr(dtype), meta["dtype"])
            if s.typed(meta, "bytes", "an int", at) < data_bytes(array_shape, dtype):
                s.fail(at + "bytes", f">= {data_bytes(array_shape, dtype)} (the array's data alone)", meta["bytes"])
            sha = s.typed(meta, "sha256", "str", at)
            if not _SHA256.fullmatch(sha):
                s.fail(at + "sha256", "64 lowercase hex digits", sha)


def _validate_sequence_keys(s: _Schema, manifest: dict[str, Any]) -> None:
    """The keys only a sequence store (format 3) has, and what it cannot have (views, a per-position shape)."""
    s.typed(manifest, "positions", "str")
    if manifest["epochs"] != 1 or manifest["augmentation"] is not None:
        s.fail("epochs", "1 without augmentation in a sequence store", manifest["epochs"])
    if len(manifest["output_shape"]) != 1:
        s.fail("output_shape", "[vocabulary size] in a sequence store", manifest["output_shape"])
    sampled = s.typed(manifest, "sampled", "null or an object")
    if sampled is None:
        return
    if manifest["top_k"] is not None:
        s.fail("top_k", "null in a store of sampled targets", manifest["top_k"])
    s.typed(sampled, "k", "an int >= 1", "sampled.")
    s.typed(sampled, "seed", "an int", "sampled.")
    s.typed(sampled, "temperature", "a number > 0", "sampled.")
    s.typed(sampled, "proposal_temperature", "null or a number > 0", "sampled.")


# ---------------------------------------------------------------------------------- what a directory holds
def _is_temp_manifest(name: str) -> bool:
    return name.startswith(f".{MANIFEST}.") and name.endswith(".tmp")  # io.atomic_write's temporary file


def inspect_store(path: str | os.PathLike[str]) -> tuple[StoreState, str, list[Path]]:
    """What ``path`` holds: its state, why (for messages), and, for an incomplete store of ours, its files.

    ``complete``: a manifest with our marker (or a format-1 store) saying the build finished.
    ``incomplete``: a manifest with our marker and ``"complete": false`` in a directory that holds
    only that manifest, our temporary manifests and the part folders with known array names.
    ``foreign``: anything else that is not missing or empty (user files, a format-1 store whose build
    did not finish, a file instead of a directory, links).
    """
    path = Path(path)
    if not path.exists():  # (a link to a directory is fine: a store often lives on scratch space)
        return ("foreign", "it is a broken symbolic link", []) if path.is_symlink() else ("missing", "it does not exist", [])
    if not path.is_dir():
        return "foreign", "it is not a directory", []
    entries = sorted(path.iterdir())
    if not entries:
        return "empty", "it is empty", []
    manifest_file = path / MANIFEST
    if not manifest_file.is_file() or manifest_file.is_symlink():
        return "foreign", f"it has no {MANIFEST}", []
    try:
        manifest = read_json(manifest_file, what="soft-target store manifest")
    except (OSError, RuntimeError) as err:
        return "foreign", f"its {MANIFEST} is not readable as JSON ({err})", []
    if not isinstance(manifest, dict):
        return "foreign", f"its {MANIFEST} is not a JSON object", []
    ours = manifest.get("kind") == KIND
    legacy = "kind" not in manifest and manifest.get("format") == 1 and isinstance(manifest.get("parts"), dict)
    if not (ours or legacy):
        return "foreign", f"its {MANIFEST} has no `kind: {KIND}` marker", []
    if manifest.get("complete") is True:
        return "complete", "it holds a finished soft-target store", []
    if legacy:
        return "foreign", "it holds the unfinished build of a format-1 store, which carries no marker to prove it is ours", []
    if manifest.get("format") not in WRITTEN_FORMATS:
        return "foreign", f"it holds the unfinished build of a format-{manifest.get('format')!r} store that this version does not know", []
    parts = manifest.get("parts")
    if not isinstance(parts, dict) or not all(valid_part_name(p) for p in parts):
        return "foreign", f"its {MANIFEST} lists part names that are not plain folder names", []
    own, unexpected = [manifest_file], []
    for entry in entries:
        if entry.name == MANIFEST:
            continue
        if _is_temp_manifest(entry.name) and entry.is_file() and not entry.is_symlink():
            own.append(entry)
        elif entry.name in parts and entry.is_dir() and not entry.is_symlink():
            for file in sorted(entry.iterdir()):
                if file.suffix == ".npy" and file.stem in ARRAYS and file.is_file() and not file.is_symlink():
                    own.append(file)
                else:
                    unexpected.append(file)
            own.append(entry)
        else:
            unexpected.append(entry)
    if unexpected:
        shown = ", ".join(str(p.relative_to(path)) for p in unexpected[:10]) + (", ..." if len(unexpected) > 10 else "")
        return "foreign", f"besides an unfinished store it holds files the store's writer does not create: {shown}", []
    return "incomplete", "it holds the unfinished build of a soft-target store (an interrupted build)", own


def store_state(path: str | os.PathLike[str]) -> StoreState:
    """``"missing"``, ``"empty"``, ``"complete"``, ``"incomplete"`` (ours, removable) or ``"foreign"`` (see :func:`inspect_store`)."""
    return inspect_store(path)[0]


def remove_incomplete_store(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the interrupted build of a store at ``path``: exactly its own files and then-empty part folders.

    ``path`` itself is kept (it may be the user's directory), empty. Files are unlinked one by one and
    folders removed with ``rmdir`` (never ``rmtree``), the manifest last, so that an interruption leaves
    a store this function still recognises. Nothing happens for a missing or empty ``path``.

    Returns:
        The removed paths.

    Raises:
        RuntimeError: if ``path`` holds a finished store, or anything that is not an incomplete store of
            ours (the message names the unexpected files); nothing is deleted then.
    """
    state, why, own = inspect_store(path)
    if state in ("missing", "empty"):
        return []
    if state != "incomplete":
        raise RuntimeError(f"Refusing to remove {path}: {why}. `remove_incomplete_store` deletes only an unfinished soft-target store; nothing was deleted.")
    manifest, rest = own[0], own[1:]
    for item in sorted(rest, key=lambda p: len(p.parts), reverse=True):  # files before their folders
        item.rmdir() if item.is_dir() else item.unlink()
    manifest.unlink()
    return rest + [manifest]


def _where(path: str | os.PathLike[str]) -> str:
    return f"The store path {path} (`build_soft_targets(path=...)`)"


def foreign_path_message(path: str | os.PathLike[str], why: str) -> str:
    return (
        f"{_where(path)} is not empty and is not a soft-target store this version may replace: {why}. Nothing was "
        "deleted. Choose another path, or move those files away yourself."
    )


def require_empty_store_path(path: str | os.PathLike[str]) -> None:
    """Refuse to build at ``path`` unless it is missing or an empty directory.

    Raises:
        FileExistsError: saying what ``path`` holds (a finished store, an unfinished one and how to
            remove it, or other files) and that nothing was deleted.
    """
    state, why, _ = inspect_store(path)
    if state in ("missing", "empty"):
        return
    if state == "complete":
        hint = "it holds a finished soft-target store. Open it with `SoftTargetStore(path)`, or choose another path."
    elif state == "incomplete":
        hint = (f"{why}. Remove it with `lightning_kd.soft_targets.store.remove_incomplete_store(path)` (it deletes only the "
                "store's own files) and build again, or choose another path.")
    else:
        raise FileExistsError(foreign_path_message(path, why))
    raise FileExistsError(f"{_where(path)} is not empty: {hint} Nothing was deleted.")


def prepare_store_path(path: str | os.PathLike[str], *, remove_incomplete: bool = True) -> bool:
    """Get ``path`` ready for a store build: True if it holds a finished store to reuse, else False (build it).

    An unfinished store of ours is removed with :func:`remove_incomplete_store` when ``remove_incomplete``
    (pass ``False`` on every process but the one that builds, e.g. ranks > 0).

    Raises:
        FileExistsError: if ``path`` holds anything else (user files, a foreign ``manifest.json``, an
            unfinished format-1 store); nothing is deleted.
    """
    state, why, _ = inspect_store(path)
    if state == "complete":
        return True
    if state == "foreign":
        raise FileExistsError(foreign_path_message(path, why))
    if state == "incomplete" and remove_incomplete:
        log.warning("Soft-target store %s is incomplete (an interrupted build): removing its files to rebuild it.", path)
        remove_incomplete_store(path)
    return False
