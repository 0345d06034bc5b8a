"""Load a model's weights from a Lightning checkpoint or a plain state-dict file, safely."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import torch

from torch import nn

from lightning_kd.checkpoint import load_checkpoint

M = TypeVar("M", bound=nn.Module)

# Where a model's keys live inside our own checkpoints, most likely first.
_PREFIXES = ("student.", "model.", "teacher.", "")


def load_weights(model: M, path: str | os.PathLike, *, prefix: str | None = None, exact: bool = False) -> M:
    """Load ``model``'s weights from ``path`` in place and return it.

    ``path`` is a Lightning checkpoint (its ``state_dict``) or a file holding a state dict, loaded
    with ``torch.load(..., weights_only=True)`` (no pickled code runs). The keys of ``model`` are
    looked up under ``prefix``; by default the first of ``student.``, ``model.``, ``teacher.`` or no
    prefix that holds all of them, so the checkpoint of a teacher trained with ``lightning-kd
    task=teacher`` (keys ``student.*``) loads directly into the bare architecture. With ``exact``, the
    prefix must hold no other keys either: a model with fewer layers than the checkpoint's (a GPT with 2
    of its 4 blocks) is refused instead of loading a truncated copy.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointError: if the file is empty, truncated, not a torch file or holds pickled objects.
        ValueError: if a weight or buffer holds NaN or Inf (a diverged run's checkpoint).
        RuntimeError: if no prefix holds all of the model's keys (listing what is missing), shapes differ,
            or, with ``exact``, the prefix holds keys the model does not have.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Teacher/model checkpoint not found: {str(path)!r}. Expected a Lightning checkpoint or a state-dict "
            "file (e.g. a run's `checkpoints/last.ckpt`)."
        )
    checkpoint = load_checkpoint(path, what="model checkpoint")
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise RuntimeError(f"Expected {str(path)!r} to hold a state dict or a Lightning checkpoint, but got {type(checkpoint).__name__}.")
    wanted = list(model.state_dict())
    candidates = (prefix,) if prefix is not None else _PREFIXES
    for candidate in candidates:
        if all(candidate + key in state for key in wanted):
            if exact:
                _check_no_extra_keys(state, candidate, wanted, path)
            weights = {key: state[candidate + key] for key in wanted}
            _check_finite(weights, path)
            model.load_state_dict(weights)
            return model
    sample = ", ".join(list(state)[:5])
    raise RuntimeError(
        f"The checkpoint {str(path)!r} does not fit this model: none of the prefixes {candidates} holds all of its "
        f"{len(wanted)} keys (first model key: {wanted[0]!r}; checkpoint keys start with: {sample}). Is it the right "
        "architecture? Pass `prefix=` if the weights live under another name."
    )


def _check_no_extra_keys(state: dict[str, Any], prefix: str, wanted: list[str], path: Path) -> None:
    known = set(wanted)
    extra = [key for key in state if key.startswith(prefix) and key[len(prefix):] not in known]
    if extra:
        raise RuntimeError(
            f"The checkpoint {str(path)!r} holds {len(extra)} key(s) under the prefix {prefix!r} that this model does not "
            f"have ({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}): it was trained with another (larger) "
            "architecture, whose weights would be loaded cut. Give the model it was trained with."
        )


def _check_finite(weights: dict[str, Any], path: Path) -> None:
    """Refuse weights with NaN/Inf: a model that outputs NaN would otherwise "teach" NaN without a word."""
    bad = {
        key: int((~torch.isfinite(value)).sum())
        for key, value in weights.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    }
    if bad:
        listed = ", ".join(f"{key} ({count})" for key, count in list(bad.items())[:5])
        raise ValueError(
            f"The checkpoint {str(path)!r} holds non-finite (NaN/Inf) values in {len(bad)} tensor(s): {listed}. "
            "It comes from a run that diverged; use an earlier checkpoint of that run."
        )
