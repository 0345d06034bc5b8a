"""The speed options of a distillation run: the teacher's dtype, ``torch.compile``, channels-last."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from lightning_kd._checks import check_bool
from lightning_kd.teachers import DTYPES


@dataclass(frozen=True)
class Speed:
    """Speed options of :class:`DistillationModule` (all off by default; measured in ``docs/benchmarks.md``).

    Args:
        teacher_dtype: run the teacher in this dtype (``"float32"``, ``"bfloat16"``, ``"float16"``) whatever
            the Trainer's precision: its weights are cast once and its forward runs outside autocast.
            None: as given (a teacher already in bfloat16 gets its inputs cast). For several teachers,
            a dict gives each its own: ``{"0": "bfloat16", "1": None}``.
        compile_student: ``student.compile()`` in place (checkpoint keys unchanged).
        compile_teacher: ``teacher.compile()`` in place.
        channels_last: conv nets and 4-D inputs in the channels-last memory format.

    Raises:
        ValueError: for an unknown dtype name.
        TypeError: for a switch that is not a bool (``"no"`` would switch it on).
    """

    teacher_dtype: str | Mapping[str, str | None] | None = None
    compile_student: bool = False
    compile_teacher: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        for setting in ("compile_student", "compile_teacher", "channels_last"):
            check_bool(getattr(self, setting), setting)
        names = self.teacher_dtype.values() if isinstance(self.teacher_dtype, Mapping) else [self.teacher_dtype]
        for name in names:
            if name is not None and name not in DTYPES:
                raise ValueError(f"Unknown `teacher_dtype` {name!r}. Expected one of {', '.join(DTYPES)} or None.")

    def apply(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Channels-last memory format and in-place ``compile()`` (parameters and state-dict keys keep their names)."""
        for model in (student, teacher):
            if model is not None and self.channels_last:
                model.to(memory_format=torch.channels_last)
        if self.compile_student:
            student.compile()
        if self.compile_teacher and teacher is not None:
            teacher.compile()
