"""What the teacher is: one model or several, its weights, its dtype, frozen. One owner: :func:`load_teacher`.

Plain torch. :class:`~lightning_kd.DistillationModule`, the store builder (through the module) and
the command line all get their teacher from :func:`load_teacher`, so the same settings give the
same teacher (and the same fingerprint) everywhere. Several teachers become a :class:`TeacherEnsemble`
there, so that every teacher-hygiene rule (frozen, eval mode, out of the optimizer and the
checkpoints, fingerprinted) holds for each member through the one ``teacher``.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PathLike = Union[str, "os.PathLike[str]"]
Teachers = Union[nn.Module, Sequence[nn.Module], Mapping[str, nn.Module]]


def load_teacher(
    teacher: Teachers,
    checkpoint: PathLike | Sequence[PathLike | None] | Mapping[str, PathLike | None] | None = None,
    *,
    weights: Sequence[float] | Mapping[str, float] | None = None,
    dtype: str | Mapping[str, str | None] | None = None,
    missing_ok: bool = False,
) -> nn.Module:
    """The frozen teacher: weights loaded, parameters without grad, eval mode, in its own dtype.

    Args:
        teacher: a model, or several (a list, or a dict by name): they become a
            :class:`TeacherEnsemble` whose logits are the (weighted) mean of theirs.
        checkpoint: where the weights come from (a Lightning checkpoint or a state-dict file, read
            with ``weights_only=True`` by :func:`~lightning_kd.load_weights`; NaN/Inf weights are
            refused). For several teachers a list (in order) or a dict (by name), ``None`` for a member
            whose weights are already in place. None: the teacher as given.
        weights: several teachers only: None (the mean) or one weight per teacher.
        dtype: run the teacher in this dtype (``"float32"``, ``"bfloat16"``, ``"float16"``), whatever
            the Trainer's precision: its weights are cast once. For several teachers, one name for
            all or a dict by member name (``{"0": "bfloat16", "1": None}``).
        missing_ok: a checkpoint file that no longer exists is skipped with a warning (the teacher
            is kept as given) instead of raising; for ``load_from_checkpoint``, which checks the
            fingerprint instead.

    Raises:
        TypeError: if a teacher is not an ``nn.Module``.
        ValueError: for ``weights`` or a per-member ``dtype`` with one teacher, checkpoints that do not
            match the teachers, or an unknown dtype name.
        FileNotFoundError: for a missing checkpoint (unless ``missing_ok``).

    Example::

        >>> teacher = load_teacher([nn.Linear(4, 3), nn.Linear(4, 3)], weights=[3, 1])
        >>> type(teacher).__name__, teacher.training, any(p.requires_grad for p in teacher.parameters())
        ('TeacherEnsemble', False, False)
    """
    if isinstance(teacher, (list, tuple, Mapping)):
        members = {str(k): v for k, v in teacher.items()} if isinstance(teacher, Mapping) else {str(i): t for i, t in enumerate(teacher)}
        for name, path in _per_member(checkpoint, list(members)).items():
            if path is not None and isinstance(members[name], nn.Module):
                _load(members[name], path, missing_ok)
        if isinstance(dtype, Mapping):
            dtypes = {str(k): v for k, v in dtype.items()}
        else:
            dtypes = {name: dtype for name in members} if dtype is not None else None
        model: nn.Module = TeacherEnsemble(members, weights=weights, dtypes=dtypes)
    else:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"Expected `teacher` to be an nn.Module, a list/dict of them, or None, but got {type(teacher).__name__}.")
        if weights is not None:
            raise ValueError("`teacher_weights` is for several teachers: pass `teacher` as a list or dict of models.")
        if isinstance(dtype, Mapping):
            raise ValueError("A per-teacher `teacher_dtype` dict needs several teachers; give one teacher a dtype name.")
        if isinstance(checkpoint, (list, tuple, Mapping)):
            raise ValueError("Several teacher checkpoints need several teachers: pass `teacher` as a list or dict of models.")
        if checkpoint is not None:
            _load(teacher, checkpoint, missing_ok)
        if dtype is not None:
            teacher.to(resolve_dtype(dtype))
        model = teacher
    model.requires_grad_(False)
    model.eval()
    return model


def _per_member(checkpoint: Any, names: list[str]) -> dict[str, Any]:
    if checkpoint is None:
        return {}
    if isinstance(checkpoint, Mapping):
        unknown = sorted(set(map(str, checkpoint)) - set(names))
        if unknown:
            raise ValueError(f"`teacher_checkpoint` names teachers {unknown}, but the teachers are {', '.join(names)}.")
        return {str(k): v for k, v in checkpoint.items()}
    if isinstance(checkpoint, (list, tuple)):
        if len(checkpoint) != len(names):
            raise ValueError(f"Expected {len(names)} teacher checkpoints (one per teacher, None to keep one as given), but got {len(checkpoint)}.")
        return dict(zip(names, checkpoint))
    raise ValueError("Several teachers need one checkpoint each: pass `teacher_checkpoint` as a list or dict (None to keep one as given).")


def _load(model: nn.Module, path: PathLike, missing_ok: bool) -> None:
    from lightning_kd.weights import load_weights  # weights -> checkpoint: plain torch, loaded when needed

    if missing_ok and not Path(path).expanduser().is_file():
        warnings.warn(
            f"The teacher checkpoint {str(path)!r} no longer exists; using the teacher as given (its fingerprint is checked).",
            stacklevel=4,
        )
        return
    load_weights(model, path)


def check_not_shared(teacher: Teachers, student: nn.Module) -> None:
    """Refuse a teacher (or a member of several) that is the student or shares parameters with it: freezing
    the teacher would silently freeze those student parameters too, and "distilling" a model into itself
    teaches nothing. Call it before the teacher is frozen or loaded."""
    if isinstance(teacher, (list, tuple, Mapping)):
        for member in (teacher.values() if isinstance(teacher, Mapping) else teacher):
            if isinstance(member, nn.Module):
                check_not_shared(member, student)
        return
    if not isinstance(teacher, nn.Module):
        return  # load_teacher names the wrong type
    if teacher is student:
        raise ValueError("Expected `teacher` and `student` to be two different models, but got the same object twice.")
    teacher_params = {id(p) for p in teacher.parameters()}
    shared = [name for name, p in student.named_parameters(remove_duplicate=False) if id(p) in teacher_params]
    if shared:
        listed = ", ".join(shared[:5]) + (", ..." if len(shared) > 5 else "")
        raise ValueError(
            f"Expected `teacher` and `student` to share no parameters, but {len(shared)} student parameter(s) belong "
            f"to the teacher too: {listed}. The frozen teacher would freeze them; give the student its own copy "
            "(e.g. `copy.deepcopy(layer)`)."
        )


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


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict of keyword inputs (Hugging Face batches: ``input_ids``, ``attention_mask``, ...),
    else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


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
        # a buffer, so that the weights are part of the ensemble's state dict, hence of its fingerprint: a store or
        # checkpoint made with other weights is another teacher
        self.register_buffer("member_weights", torch.tensor([self.weights[name] for name in members], dtype=torch.float64))
        self.dtypes: dict[str, torch.dtype] = {}
        for name, dtype in ({str(k): v for k, v in dtypes.items()} if dtypes else {}).items():
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
                    logits = extract_logits(call_model(member, cast_inputs(inputs, member)))
            else:
                logits = extract_logits(call_model(member, cast_inputs(inputs, member)))
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
