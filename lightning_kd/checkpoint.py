"""Teacher-free checkpoints: drop the teacher's keys on save, accept their absence on load, and
fingerprint the teacher so that a checkpoint is never paired with the wrong (e.g. random) one.

State-dict hooks rather than a ``state_dict()`` override: they also fire when the module is wrapped
(DDP, FSDP), with the wrapper's prefix.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import zipfile
from contextvars import ContextVar
from functools import partial
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read: empty, truncated, not a torch file, or holding pickled objects."""


def load_checkpoint(path: str | os.PathLike[str], *, what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with one clear error for a bad file.

    ``weights_only=True`` is passed explicitly, so no pickled code runs whatever torch's default or
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` say: only tensors, containers and plain values load.

    Args:
        path: the file.
        what: what the file is, for the messages (``"teacher checkpoint"``, ``"resume checkpoint"``).

    Raises:
        FileNotFoundError: if ``path`` is not a file.
        CheckpointError: if it is empty, truncated or not a torch file, or holds objects other than
            tensors and plain values (a pickled payload is refused, never run).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"The {what} {str(path)!r} does not exist (or is not a file).")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"The {what} {str(path)!r} is empty (0 bytes): was it written to a full disk or copied partially?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path):  # torch writes zip archives: anything else is damaged or not ours
            raise CheckpointError(f"The {what} {str(path)!r} ({size} bytes) is truncated or not a torch checkpoint.") from err
        raise CheckpointError(
            f"The {what} {str(path)!r} holds objects other than tensors and plain values, so it is refused: "
            "lightning-kd loads checkpoints with `weights_only=True` and never unpickles code from a file. "
            f"({str(err).splitlines()[-1] if str(err) else type(err).__name__})"
        ) from err
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as err:
        if isinstance(err, OSError) and err.errno != errno.EINVAL:
            raise  # permissions, I/O errors: the file system's own message says it best
        raise CheckpointError(
            f"The {what} {str(path)!r} ({size} bytes) is truncated or not a torch checkpoint "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'})."
        ) from err


def fingerprint(model: nn.Module) -> str:
    """SHA-256 over a model's state dict (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def drop_teacher_keys(module: Any, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict post-hook: checkpoints hold no teacher weights (works when the module is wrapped)."""
    if module.keep_teacher_in_checkpoint:
        return
    for key in [k for k in state_dict if k.startswith(prefix + "teacher.")]:
        del state_dict[key]


def allow_missing_teacher_keys(module: Any, incompatible_keys: Any) -> None:
    """Load post-hook: missing ``teacher.*`` keys are expected (the teacher comes from its own source and
    its fingerprint is checked in ``on_load_checkpoint``); a missing student key still fails loudly."""
    missing = incompatible_keys.missing_keys
    for key in [k for k in missing if k.startswith("teacher.")]:
        missing.remove(key)


# Set while `load_from_checkpoint` builds the module: a recorded teacher checkpoint may have moved since.
LOADING_CHECKPOINT: ContextVar[bool] = ContextVar("lightning_kd_loading_checkpoint", default=False)


def plain(value: Any) -> Any:
    """A hyperparameter as plain Python (str paths, lists, str-keyed dicts): checkpoints load with ``weights_only=True``."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def objectives(soft_loss: Any, hard_loss: Any, features: Any) -> dict[str, Any]:
    """What a distillation objective is made of, as plain strings (checkpoints record it; loads compare it)."""
    return {"soft_loss": describe(soft_loss), "hard_loss": describe(hard_loss),
            "features": {str(key): describe(term) for key, term in (features or {}).items()}}


def check_objectives(saved: Any, mine: dict[str, Any]) -> None:
    """Refuse a checkpoint trained with another soft loss, hard loss or feature terms than the module has.

    Raises:
        ValueError: showing what was trained and what was given.
    """
    if not isinstance(saved, dict):  # older checkpoints recorded nothing
        return
    differ = [f"{name}: trained with {saved[name]!r}, this module has {value!r}"
              for name, value in mine.items() if name in saved and saved[name] != value]
    if differ:
        raise ValueError(
            "The checkpoint was trained with another objective than this module's:\n  " + "\n  ".join(differ) + "\n"
            "Give the same objects again (e.g. `DistillationModule.load_from_checkpoint(path, soft_loss=DKDLoss(beta=8.0))`, "
            "or the same constructor arguments when resuming with `trainer.fit(..., ckpt_path=path)`). To start a new "
            "run from these weights, load the student's state dict instead."
        )


def describe(obj: Any) -> str:
    """One line that names a loss or feature term the same way in every process (no memory addresses)."""
    if isinstance(obj, partial):
        text = f"partial({describe(obj.func)}, *{obj.args!r}, **{obj.keywords!r})"
    elif hasattr(obj, "__qualname__"):  # a function or class
        text = f"{obj.__module__}.{obj.__qualname__}"
    else:
        text = repr(obj)  # modules and feature terms show their options
    if " at 0x" in text:  # a default repr: the type is all that is stable
        text = f"{type(obj).__module__}.{type(obj).__qualname__}"
    return " ".join(text.split())
