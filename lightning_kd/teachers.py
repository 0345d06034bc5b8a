"""Several frozen teachers behind one forward: their logits combine by mean or by weights.

Plain torch. :class:`~lightning_kd.DistillationModule` wraps a list or dict of teachers in a
:class:`TeacherEnsemble`, so that every teacher-hygiene rule (frozen, eval mode, out of the
optimizer and the checkpoints, fingerprinted) holds for each member through the one ``teacher``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, setting: str = "teacher_dtype") -> torch.dtype:
    """The torch dtype of a dtype name.

    Raises:
        ValueError: for a name that is not one of ``DTYPES``.
    """
    if name not in DTYPES:
        raise ValueError(f"Unknown `{setting}` {name!r}. Expected one of {', '.join(DTYPES)} or None.")
    return DTYPES[name]


def extract_logits(output: Any) -> Tensor:
    """Logits from a model output: a tensor, an object with ``.logits`` (Hugging Face), or a tuple's first item."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"Expected the model to return logits (a tensor, `.logits`, or a tuple starting with them), but got "
        f"{type(output).__name__}. Override `teacher_forward` / `student_forward` to extract them."
    )


def floating_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of a model's floating parameters, if they all share one."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def cast_inputs(inputs: Any, model: nn.Module) -> Any:
    """Floating input tensors cast to the model's dtype (e.g. a bfloat16 teacher beside a float32 student)."""
    dtype = floating_dtype(model)
    if dtype is None:
        return inputs
    return apply_to_collection(inputs, Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t)


class TeacherEnsemble(nn.ModuleDict):
    r"""Teachers whose logits are averaged: :math:`z = \sum_k w_k z_k` with :math:`\sum_k w_k = 1`.

    The combined *logits* then go through the distillation loss like one teacher's (the temperature
    applies to the average). Members keep their own dtype: ``dtypes`` casts a member once and runs
    it outside autocast, in its own precision; a member given in bfloat16 gets its inputs cast.
    Feature hooks name a member's layers ``<member>.<layer>`` (e.g. ``0.features.2``).

    Args:
        teachers: a list (members named ``"0"``, ``"1"``, ...) or a dict of teachers.
        weights: None for the mean, or one non-negative weight per teacher (a list in order, or a dict
            by name), normalised to sum to one.
        dtypes: None, or ``{name: "float32" | "bfloat16" | "float16"}`` for members with their own precision.

    Raises:
        ValueError: for fewer than one teacher, weights that do not match the teachers or sum to zero,
            or an unknown dtype name.
        TypeError: if a member is not an ``nn.Module``.

    Example::

        >>> ensemble = TeacherEnsemble([nn.Linear(4, 3), nn.Linear(4, 3)], weights=[3, 1])
        >>> ensemble.weights
        {'0': 0.75, '1': 0.25}
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module] | Mapping[str, nn.Module],
        *,
        weights: Sequence[float] | Mapping[str, float] | None = None,
        dtypes: Mapping[str, str] | None = None,
    ) -> None:
        members = dict(teachers) if isinstance(teachers, Mapping) else {str(i): t for i, t in enumerate(teachers)}
        if not members:
            raise ValueError("Expected at least one teacher, but got none.")
        for name, member in members.items():
            if not isinstance(member, nn.Module):
                raise TypeError(f"Expected teacher {name!r} to be an nn.Module, but got {type(member).__name__}.")
        super().__init__(members)
        self.weights = _normalised_weights(list(members), weights)
        self.dtypes: dict[str, torch.dtype] = {}
        for name, dtype in (dtypes or {}).items():
            if name not in members:
                raise ValueError(f"`teacher_dtype` names teacher {name!r}, but the teachers are {', '.join(members)}.")
            if dtype is not None:
                self.dtypes[name] = resolve_dtype(dtype)
                members[name].to(self.dtypes[name])

    def forward(self, inputs: Any) -> Tensor:
        combined: Tensor | None = None
        for name, member in self.items():
            if name in self.dtypes:
                device = next(iter(member.parameters()), torch.empty(0)).device
                with torch.autocast(device_type=device.type, enabled=False):
                    logits = extract_logits(member(cast_inputs(inputs, member)))
            else:
                logits = extract_logits(member(cast_inputs(inputs, member)))
            term = self.weights[name] * logits.float()
            combined = term if combined is None else combined + term
        return combined

    def extra_repr(self) -> str:
        return f"weights={self.weights}"


def _normalised_weights(names: list[str], weights: Sequence[float] | Mapping[str, float] | None) -> dict[str, float]:
    if weights is None:
        return {name: 1.0 / len(names) for name in names}
    if isinstance(weights, Mapping):
        if set(weights) != set(names):
            raise ValueError(f"Expected `teacher_weights` for exactly the teachers {names}, but got {sorted(weights)}.")
        values = [float(weights[name]) for name in names]
    else:
        values = [float(w) for w in weights]
        if len(values) != len(names):
            raise ValueError(f"Expected {len(names)} `teacher_weights` (one per teacher), but got {len(values)}.")
    if not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"Expected finite, non-negative `teacher_weights` with a positive sum, but got {values}.")
    total = sum(values)
    return {name: v / total for name, v in zip(names, values)}
