"""Teacher-free checkpoints: drop the teacher's keys on save, accept their absence on load, and
fingerprint the teacher so that a checkpoint is never paired with the wrong (e.g. random) one.

State-dict hooks rather than a ``state_dict()`` override: they also fire when the module is wrapped
(DDP, FSDP), with the wrapper's prefix.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn


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
