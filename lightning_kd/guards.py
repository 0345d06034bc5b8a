"""Checks on values inside a run (teacher outputs, the loss, class targets) that stop it loudly.

A check needs the value on the host. On the CPU reading it costs nothing more than computing it, so
every check runs at once, on the batch where it fails. On an accelerator a read per step would make
the host wait for the device every step; there each check only records a few numbers on the device
(no sync), and :meth:`ValueGuard.flush` reads all the recorded ones in one transfer every
``every_n_steps`` training steps (the Trainer's ``log_every_n_steps``), at the end of each epoch and
before every checkpoint is saved. The error then names the step and batch where the first bad value
appeared, at most ``every_n_steps`` steps later. Until then the targets that would crash a CUDA
kernel are ignored by the hard loss (so the run reaches the check), and the optimizer has stepped on
a non-finite loss in memory only: no checkpoint is written after it, so ``last.ckpt`` holds the
weights from before it.

Plain torch: no Lightning.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor

from lightning_kd.losses.hard import IGNORE_INDEX, invalid_targets



class NonFiniteError(RuntimeError):
    """A teacher output or a loss that is NaN or infinite: the run stops instead of training on it."""


def nonfinite_parts(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(nan, posinf, dead)`` bool masks of ``logits`` ``(..., C)``: NaN and ``+inf`` values, and the
    positions whose logits are all ``-inf`` (no class left to predict). A ``-inf`` among finite logits is a
    legitimate masked class (a padded vocabulary) and is not flagged."""
    values = logits.detach()
    neginf = torch.isneginf(values)
    dead = neginf.all(dim=-1) if values.dim() > 1 else neginf
    return torch.isnan(values), torch.isposinf(values), dead


def nonfinite_count(logits: Tensor) -> Tensor:
    """How many values of ``logits`` are unusable (see :func:`nonfinite_parts`), as a 0-d tensor on their device."""
    if not logits.is_floating_point():
        return torch.zeros((), dtype=torch.long, device=logits.device)
    nan, posinf, dead = nonfinite_parts(logits)
    width = logits.shape[-1] if logits.dim() > 1 else 1
    return nan.sum() + posinf.sum() + dead.sum() * width


@dataclass
class _Record:
    kind: str  # "teacher" | "student" | "loss" | "targets"
    where: str  # e.g. "training step 12 (batch 3 of epoch 0)"
    values: Tensor  # (3,) on the device: count, then two kind-specific numbers
    total: int
    num_classes: int = 0


class ValueGuard:
    """Records and raises the value checks of a run; see the module docstring for when they run.

    Args:
        every_n_steps: on an accelerator, read the recorded checks this often (training steps).
        deferred: record checks and read them at :meth:`flush` even on the CPU (None: only on an
            accelerator, where reading a value at once would make the host wait for the device).
    """

    def __init__(self, every_n_steps: int = 50, *, deferred: bool | None = None) -> None:
        self.every_n_steps = max(1, int(every_n_steps))
        self.deferred = deferred
        self._pending: list[_Record] = []

    def check_teacher(self, logits: Tensor, where: str) -> None:
        """Refuse teacher outputs with NaN, ``+inf`` or a position that is ``-inf`` everywhere."""
        self._check_outputs("teacher", logits, where)

    def check_student(self, logits: Tensor, where: str) -> None:
        """Refuse student outputs that are unusable in the same way (in evaluation, where no loss would catch them)."""
        self._check_outputs("student", logits, where)

    def _check_outputs(self, model: str, logits: Tensor, where: str) -> None:
        count = nonfinite_count(logits)
        zero = torch.zeros((), device=count.device, dtype=count.dtype)
        self._record(_Record(model, where, torch.stack([count, zero, zero]), logits.numel()), logits.device)

    def check_loss(self, loss: Tensor, where: str) -> None:
        """Refuse a training loss that is NaN or infinite."""
        value = loss.detach().float().reshape(-1)[:1].sum()
        bad = (~torch.isfinite(value)).to(torch.float32)
        self._record(_Record("loss", where, torch.stack([bad, value, torch.zeros_like(value)]), 1), loss.device)

    def check_targets(self, targets: Tensor, num_classes: int, where: str) -> None:
        """Refuse class targets outside ``[0, num_classes)`` other than ``-100``."""
        invalid = invalid_targets(targets, num_classes).reshape(-1)
        flat = targets.reshape(-1).long()
        count = invalid.sum()
        if flat.numel():  # the range of the bad values (sentinels where there is none: never read then)
            low = torch.where(invalid, flat, torch.full_like(flat, 2**62)).amin()
            high = torch.where(invalid, flat, torch.full_like(flat, -(2**62))).amax()
        else:
            low = high = count * 0
        values = torch.stack([count, low, high])
        self._record(_Record("targets", where, values, targets.numel(), num_classes), targets.device)

    def maybe_flush(self, step: int) -> None:
        """Flush every ``every_n_steps`` training steps (call once per step)."""
        if self._pending and step % self.every_n_steps == 0:
            self.flush()

    def flush(self) -> None:
        """Read every recorded check (one device-to-host transfer) and raise for the first that failed."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        values = torch.stack([r.values.to(torch.float64) for r in pending]).cpu()
        for record, (count, a, b) in zip(pending, values.tolist()):
            if count:
                raise _error(record, int(count), a, b)

    def _record(self, record: _Record, device: torch.device) -> None:
        self._pending.append(record)
        if not (device.type != "cpu" if self.deferred is None else self.deferred):
            self.flush()


def _error(record: _Record, count: int, a: float, b: float) -> Exception:
    if record.kind == "teacher":
        return NonFiniteError(
            f"The teacher's outputs at {record.where} hold {count} non-finite value(s) (NaN, +inf, or positions "
            f"that are -inf for every class) of {record.total}. Distilling from them would train the student on "
            "garbage: check the teacher's weights (were they saved from a run that diverged?), its inputs, and "
            "its precision (`teacher_dtype`; float16 overflows above 65504)."
        )
    if record.kind == "student":
        return NonFiniteError(
            f"The student's outputs at {record.where} hold {count} non-finite value(s) (NaN, +inf, or positions that "
            f"are -inf for every class) of {record.total}: its metrics would be meaningless. Check the inputs and the "
            "student's weights (a diverged run?), or its precision."
        )
    if record.kind == "loss":
        return NonFiniteError(
            f"The training loss became non-finite ({a}) at {record.where}; the run is stopped instead of training "
            "on it. Lower the learning rate, add gradient clipping (`gradient_clip_val`), check the inputs, or "
            "use another precision; resume from the last checkpoint saved before this step."
        )
    return ValueError(
        f"Expected class targets in [0, {record.num_classes}) or {IGNORE_INDEX} (unlabeled), but {count} target(s) "
        f"at {record.where} are out of range: {int(a) if a == b else f'values from {int(a)} to {int(b)}'}. Do the labels "
        "match the number of classes of the model's outputs?"
    )


def check_precision(trainer: Any) -> None:
    """Refuse float16 weights on the CPU: Adam's updates underflow/overflow there and the weights turn NaN.

    Raises:
        ValueError: for ``16-true`` on a CPU device, naming the precisions that train there.
    """
    precision = str(trainer.precision)
    if precision in ("16-true", "16") and trainer.strategy.root_device.type == "cpu":
        raise ValueError(
            f"Expected a `precision` that trains on the CPU, but got {precision!r}: float16 weights are not supported "
            "there. Use '32-true', 'bf16-mixed' or 'bf16-true' on the CPU, or train on a GPU."
        )


@contextlib.contextmanager
def batchnorm_batch_of_one() -> Iterator[None]:
    """Turn BatchNorm's error on a training batch of one sample into one that says how to fix it.

    Raises:
        ValueError: naming ``drop_last=True``, when the student's BatchNorm got a single sample.
    """
    try:
        yield
    except ValueError as err:
        if "Expected more than 1 value per channel when training" not in str(err):
            raise
        raise ValueError(
            f"A training batch holds a single sample ({err}), and the student's BatchNorm layers cannot "
            "normalise one value per channel. Set `drop_last=True` on the training DataLoader (or choose a "
            "batch size that does not leave a last batch of 1)."
        ) from err
