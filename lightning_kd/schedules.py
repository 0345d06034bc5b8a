"""Schedules for distillation hyper-parameters: pure functions of ``(step, total)``.

A schedule maps an optimizer step (or an epoch) and the run's horizon to a value, with no hidden
state, like nanoGPT's ``get_lr(it)``: whoever evaluates it can resume a run at any step and get the
same trajectory. Schedules are frozen dataclasses, values rather than objects with a life: ``repr``,
``==`` and ``hash`` come for free, and ``dataclasses.replace`` derives a variant. Plain Python on
purpose: no torch, no Lightning, no Hydra.

Every schedule shares the same time axis. With ``H`` the horizon (the schedule's own ``total`` if
given, else the ``total`` passed by the caller) and ``W`` the warm-up length in steps:

.. math::

    v(s) = \\begin{cases}
        v_w + (v_0 - v_w)\\,\\frac{s}{W} & 0 \\le s < W \\quad\\text{(linear warm-up)} \\\\
        f\\!\\left(\\operatorname{clamp}\\!\\left(\\frac{s - W}{H - W}, 0, 1\\right)\\right) & s \\ge W
    \\end{cases}

where ``v_w = warmup_start``, ``v_0 = start`` and ``f`` is the shape of the schedule, with
``f(0) = start`` and ``f(1) = end``. ``end`` is reached at ``step == H`` and held afterwards (as in
PyTorch's and Hugging Face's learning-rate schedules, the last of ``H`` steps, ``H - 1``, is just
short of it).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, fields
from numbers import Real
from typing import Any

__all__ = ["Constant", "Cosine", "Exponential", "Linear", "Schedule", "Step", "as_schedule"]


def _is_real(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _check_real(name: str, x: Any) -> float:
    if not _is_real(x):
        raise TypeError(f"Expected `{name}` to be a real number, but got {x!r} of type {type(x).__name__}")
    if not math.isfinite(x):
        raise ValueError(f"Expected `{name}` to be finite, but got {x!r}")
    return float(x)


def _check_warmup(name: str, warmup: Any) -> int | float:
    # int = a number of steps; float = a fraction of the horizon. `bool` is an int subclass: refuse it.
    if isinstance(warmup, int) and not isinstance(warmup, bool):
        if warmup < 0:
            raise ValueError(f"Expected `{name}` to be an int >= 0 (steps), but got {warmup}")
        return warmup
    if isinstance(warmup, float):
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"Expected `{name}` to be a float in [0, 1) (fraction of the horizon), but got {warmup}")
        return warmup
    raise TypeError(
        f"Expected `{name}` to be an int >= 0 (steps) or a float in [0, 1) (fraction of the horizon),"
        f" but got {warmup!r} of type {type(warmup).__name__}"
    )


def _check_total(name: str, total: Any) -> int | None:
    if total is None:
        return None
    if not isinstance(total, int) or isinstance(total, bool):
        raise TypeError(
            f"Expected `{name}` to be an int >= 1 or None, but got {total!r} of type {type(total).__name__}"
        )
    if total < 1:
        raise ValueError(f"Expected `{name}` to be an int >= 1 or None, but got {total}")
    return total


# The check of each field, by name, shared by every schedule; each also normalises its value (ints
# to floats) so that `Linear(4, 1) == Linear(4.0, 1.0)` and values are floats.
_CHECKS = {
    "value": _check_real,
    "start": _check_real,
    "end": _check_real,
    "warmup": _check_warmup,
    "warmup_start": lambda name, x: None if x is None else _check_real(name, x),
    "total": _check_total,
}


class Schedule(ABC):
    """Base class: a value as a pure function of ``(step, total)``.

    Subclasses are frozen dataclasses with their own fields first (``start, end``; ``value``;
    ``values, milestones``), then these keyword-only ones, and implement :meth:`_shape`, the value at
    a given progress in ``(0, 1)`` after warm-up.

    Attributes:
        start: value when the schedule proper begins (after warm-up).
        end: value reached at the horizon and held afterwards.
        warmup: warm-up length: an int number of steps, or a float fraction in ``[0, 1)`` of the
            horizon (rounded to the nearest step). During warm-up the value ramps linearly from
            ``warmup_start`` to ``start``; the schedule then runs over the rest of the horizon.
        warmup_start: value at step 0 when there is a warm-up. Default ``None``: ``start`` (hold
            ``start``).
        total: the schedule's own horizon in steps, after which it holds ``end``. Default: the
            ``total`` that the caller passes (for :class:`~lightning_kd.DistillationAnnealing`, the
            run's number of optimizer steps or epochs).

    Raises:
        TypeError: if a value is not a real number, ``warmup`` is neither an int nor a float, or
            ``total`` is not an int.
        ValueError: if a value is not finite, ``warmup`` is negative or a fraction outside
            ``[0, 1)``, or ``total < 1``.
    """

    start: float
    end: float
    warmup: int | float
    warmup_start: float | None
    total: int | None

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]  # subclasses are dataclasses
            if f.name in _CHECKS:
                # Frozen: `object.__setattr__` is the dataclass way to normalise in `__post_init__`.
                object.__setattr__(self, f.name, _CHECKS[f.name](f.name, getattr(self, f.name)))

    # -- evaluation ------------------------------------------------------------------------------
    def __call__(self, step: int, total: int | None = None) -> float:
        """The value at ``step`` (an optimizer step or an epoch, from 0) of a run of ``total`` steps.

        ``total`` may be left out when the schedule has its own ``total``, which takes precedence.
        Steps before 0 count as 0; steps past the horizon give ``end``.

        Raises:
            ValueError: if neither the schedule nor the caller gives a finite horizon >= 1.
        """
        horizon = self._horizon(total)
        step = max(step, 0)
        warmup = self.warmup_steps(horizon)
        if step < warmup:
            frac = step / warmup
            return (1.0 - frac) * self._warmup_from + frac * self.start
        span = horizon - warmup
        elapsed = step - warmup
        progress = 1.0 if span <= 0 else min(elapsed / span, 1.0)
        # Exact endpoints, whatever the floating-point error of the shape.
        if progress <= 0.0:
            return self.start
        if progress >= 1.0:
            return self.end
        return self._shape(progress, elapsed, span)

    def warmup_steps(self, total: int | None = None) -> int:
        """The warm-up length in steps for a horizon ``total`` (the schedule's own ``total`` wins)."""
        if isinstance(self.warmup, int):
            return self.warmup
        # Round a fraction to whole steps: 0.3 * 10 is 3.0000000000000004 in floating point.
        return math.floor(self.warmup * self._horizon(total) + 0.5)

    def value_range(self) -> tuple[float, float]:
        """``(min, max)`` of the values the schedule can take, over any horizon.

        All shipped shapes are monotone between ``start`` and ``end`` (or piecewise constant), so the
        range is spanned by the endpoints, plus ``warmup_start`` when there is a warm-up. Use it to
        validate a schedule up front, e.g. that a temperature stays > 0.

        Examples:
            >>> Linear(4.0, 1.0, warmup=5, warmup_start=0.5).value_range()
            (0.5, 4.0)
        """
        values = [*self._values(), *([self._warmup_from] if self.warmup else [])]
        return min(values), max(values)

    # -- for subclasses --------------------------------------------------------------------------
    @abstractmethod
    def _shape(self, progress: float, elapsed: float, span: float) -> float:
        """Value at ``progress`` in ``(0, 1)``; ``elapsed`` steps of ``span`` since warm-up ended."""

    def _values(self) -> list[float]:
        """The values the shape itself can take at its extremes (warm-up aside)."""
        return [self.start, self.end]

    @property
    def _warmup_from(self) -> float:
        return self.start if self.warmup_start is None else self.warmup_start

    def _horizon(self, total: int | float | None) -> int:
        horizon = self.total if self.total is not None else total
        if horizon is None:
            raise ValueError(
                f"Expected a horizon for {type(self).__name__}: pass `total` when calling it, or give the schedule"
                " its own `total`"
            )
        if not _is_real(horizon) or not math.isfinite(horizon) or horizon < 1:
            raise ValueError(
                f"Expected `total` to be a finite number of steps >= 1, but got {horizon!r}. For an endless run,"
                f" give the schedule its own horizon: {type(self).__name__}(..., total=N)"
            )
        return int(horizon)


@dataclass(frozen=True)
class Constant(Schedule):
    """A constant ``value``, optionally reached by a linear warm-up from ``warmup_start``.

    .. math:: f(p) = \\text{value}

    With a warm-up this is the classic linear ramp, e.g. DKD's loss weight warmed up from 0 over the
    first 20 epochs.

    Args:
        value: the value (also ``start`` and ``end``).
        warmup: warm-up length in steps (int) or as a fraction of the horizon (float); see :class:`Schedule`.
        warmup_start: value at step 0 when there is a warm-up (default: ``start``).
        total: the schedule's own horizon in steps (default: the caller's).

    Examples:
        >>> s = Constant(1.0, warmup=4, warmup_start=0.0)
        >>> [s(step, 10) for step in (0, 2, 4, 9)]
        [0.0, 0.5, 1.0, 1.0]
    """

    value: float
    _: KW_ONLY
    warmup: int | float = 0
    warmup_start: float | None = None
    total: int | None = None

    @property
    def start(self) -> float:  # type: ignore[override]
        return self.value

    @property
    def end(self) -> float:  # type: ignore[override]
        return self.value

    def _shape(self, progress: float, elapsed: float, span: float) -> float:
        return self.value


@dataclass(frozen=True)
class _Interpolation(Schedule):
    """A shape from ``start`` to ``end``: the fields of :class:`Linear`, :class:`Cosine`, :class:`Exponential`."""

    start: float
    end: float
    _: KW_ONLY
    warmup: int | float = 0
    warmup_start: float | None = None
    total: int | None = None


@dataclass(frozen=True)
class Linear(_Interpolation):
    """Linear interpolation from ``start`` to ``end``.

    .. math:: f(p) = (1 - p)\\,\\text{start} + p\\,\\text{end}

    Args:
        start: value when the schedule proper begins (after warm-up).
        end: value reached at the horizon and held afterwards.
        warmup: warm-up length in steps (int) or as a fraction of the horizon (float); see :class:`Schedule`.
        warmup_start: value at step 0 when there is a warm-up (default: ``start``).
        total: the schedule's own horizon in steps (default: the caller's).

    Examples:
        >>> s = Linear(4.0, 1.0)
        >>> [s(step, 4) for step in range(6)]
        [4.0, 3.25, 2.5, 1.75, 1.0, 1.0]
    """

    def _shape(self, progress: float, elapsed: float, span: float) -> float:
        return (1.0 - progress) * self.start + progress * self.end


@dataclass(frozen=True)
class Cosine(_Interpolation):
    """Half-cosine from ``start`` to ``end`` (flat at both ends, like ``CosineAnnealingLR``).

    .. math:: f(p) = \\text{end} + (\\text{start} - \\text{end})\\,\\frac{1 + \\cos(\\pi p)}{2}

    Args:
        start: value when the schedule proper begins (after warm-up).
        end: value reached at the horizon and held afterwards.
        warmup: warm-up length in steps (int) or as a fraction of the horizon (float); see :class:`Schedule`.
        warmup_start: value at step 0 when there is a warm-up (default: ``start``).
        total: the schedule's own horizon in steps (default: the caller's).

    Examples:
        >>> s = Cosine(1.0, 0.0)
        >>> [round(s(step, 4), 4) for step in range(5)]
        [1.0, 0.8536, 0.5, 0.1464, 0.0]
    """

    def _shape(self, progress: float, elapsed: float, span: float) -> float:
        weight = 0.5 * (1.0 + math.cos(math.pi * progress))
        return weight * self.start + (1.0 - weight) * self.end


@dataclass(frozen=True)
class Exponential(_Interpolation):
    """Geometric interpolation from ``start`` to ``end`` (a straight line in log space).

    .. math:: f(p) = \\text{start}\\,\\left(\\frac{\\text{end}}{\\text{start}}\\right)^{p}

    Args:
        start: value when the schedule proper begins (after warm-up), > 0.
        end: value reached at the horizon and held afterwards, > 0.
        warmup: warm-up length in steps (int) or as a fraction of the horizon (float); see :class:`Schedule`.
        warmup_start: value at step 0 when there is a warm-up (default: ``start``).
        total: the schedule's own horizon in steps (default: the caller's).

    Raises:
        ValueError: if ``start`` or ``end`` is not > 0.

    Examples:
        >>> s = Exponential(8.0, 1.0)
        >>> [s(step, 3) for step in range(4)]
        [8.0, 4.0, 2.0, 1.0]
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("start", "end"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Expected `{name}` of Exponential to be > 0, but got {getattr(self, name)}")

    def _shape(self, progress: float, elapsed: float, span: float) -> float:
        return self.start * (self.end / self.start) ** progress


@dataclass(frozen=True)
class Step(Schedule):
    """Piecewise constant: ``values[i]`` after the ``i``-th milestone.

    .. math:: f = \\text{values}[\\#\\{m \\in \\text{milestones} : m \\text{ reached}\\}]

    Milestones are counted on the same axis as the other schedules, from the end of the warm-up:
    either all ints (a number of steps after warm-up, ``>= 1``) or all floats in ``(0, 1)`` (a
    fraction of the post-warm-up horizon). They must be strictly increasing. ``start`` is
    ``values[0]`` and ``end`` is ``values[-1]``. Both are stored as tuples (hashable).

    Args:
        values: ``len(milestones) + 1`` values.
        milestones: where the value changes.
        warmup: warm-up length in steps (int) or as a fraction of the horizon (float); see :class:`Schedule`.
        warmup_start: value at step 0 when there is a warm-up (default: ``values[0]``); the warm-up ramps to ``values[0]``.
        total: the schedule's own horizon in steps (default: the caller's).

    Raises:
        TypeError: if ``values`` or ``milestones`` is not a sequence of numbers, or milestones mix
            ints and floats.
        ValueError: if ``len(values) != len(milestones) + 1``, a milestone is out of range, or
            milestones are not strictly increasing; when called, if an int milestone lies beyond
            the post-warm-up horizon (it would never be reached).

    Examples:
        >>> s = Step([4.0, 2.0, 1.0], milestones=[0.5, 0.75])
        >>> [s(step, 8) for step in range(0, 9, 2)]
        [4.0, 4.0, 2.0, 1.0, 1.0]
    """

    values: Sequence[float]
    milestones: Sequence[int | float]
    _: KW_ONLY
    warmup: int | float = 0
    warmup_start: float | None = None
    total: int | None = None

    def __post_init__(self) -> None:
        values, milestones = self.values, self.milestones
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"Expected `values` to be a sequence of numbers, but got {values!r}")
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
            raise TypeError(f"Expected `milestones` to be a sequence of ints or floats, but got {milestones!r}")
        values = tuple(_check_real(f"values[{i}]", v) for i, v in enumerate(values))
        if len(values) != len(milestones) + 1:
            raise ValueError(
                f"Expected `values` to have len(milestones) + 1 = {len(milestones) + 1} entries, but got"
                f" {len(values)}"
            )
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "milestones", _check_milestones(milestones))
        super().__post_init__()

    @property
    def start(self) -> float:  # type: ignore[override]
        return self.values[0]

    @property
    def end(self) -> float:  # type: ignore[override]
        return self.values[-1]

    def __call__(self, step: int, total: int | None = None) -> float:
        if isinstance(self.milestones[0], int):
            horizon = self._horizon(total)
            span = horizon - self.warmup_steps(horizon)
            if self.milestones[-1] > span:
                raise ValueError(
                    f"Expected the int `milestones` to be <= the {span} steps after warm-up, but got"
                    f" {list(self.milestones)}: the last ones would never be reached. Use fractions of the"
                    " horizon (floats in (0, 1)) or a longer `total`"
                )
        return super().__call__(step, total)

    def _shape(self, progress: float, elapsed: float, span: float) -> float:
        if isinstance(self.milestones[0], int):
            reached = sum(elapsed >= m for m in self.milestones)
        else:
            reached = sum(progress >= m for m in self.milestones)
        return self.values[reached]

    def _values(self) -> list[float]:
        return list(self.values)


def _check_milestones(milestones: Sequence[Any]) -> tuple[int, ...] | tuple[float, ...]:
    shape = "all ints >= 1 (steps after warm-up) or all floats in (0, 1) (fractions of the horizon)"
    if not milestones:
        raise ValueError(f"Expected at least one milestone, {shape}, but got {list(milestones)}")
    if all(isinstance(m, int) and not isinstance(m, bool) for m in milestones):
        if any(m < 1 for m in milestones):
            raise ValueError(f"Expected `milestones` to be {shape}, but got {list(milestones)}")
    elif all(isinstance(m, float) for m in milestones):
        if any(not 0.0 < m < 1.0 for m in milestones):
            raise ValueError(f"Expected `milestones` to be {shape}, but got {list(milestones)}")
    else:
        raise TypeError(f"Expected `milestones` to be {shape}, but got {list(milestones)}")
    if any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise ValueError(f"Expected `milestones` to be strictly increasing, but got {list(milestones)}")
    return tuple(milestones)


def as_schedule(value: float | Schedule) -> Schedule:
    """A :class:`Schedule` passes through; a number becomes :class:`Constant`.

    Raises:
        TypeError: for anything else.

    Examples:
        >>> as_schedule(4)
        Constant(value=4.0, warmup=0, warmup_start=None, total=None)
    """
    if isinstance(value, Schedule):
        return value
    if _is_real(value):
        return Constant(value)
    raise TypeError(f"Expected a number or a Schedule, but got {value!r} of type {type(value).__name__}")
