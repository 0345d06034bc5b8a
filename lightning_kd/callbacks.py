"""Callbacks for distillation runs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_kd.schedules import Schedule, as_schedule

__all__ = ["DistillationAnnealing"]

_INTERVALS = ("step", "epoch")


class DistillationAnnealing(Callback):
    r"""Anneal the distillation temperature, the soft-loss weight ``alpha`` and other module attributes.

    Before every training batch, sets ``pl_module.<name> = schedule(step, total)`` for each annealed
    attribute, where ``step`` is ``trainer.global_step`` (optimizer steps; ``interval="step"``) or
    ``trainer.current_epoch`` (``interval="epoch"``), and ``total`` is the schedule's own ``total``
    or else the run's horizon: ``trainer.estimated_stepping_batches`` or ``trainer.max_epochs``.
    The values are a pure function of the step, so nothing is saved in checkpoints and a resumed run
    continues on exactly the same trajectory.

    ``alpha`` weights the **soft** (teacher) term: ``loss = alpha * T² * KL + (1 - alpha) * hard``.

    Args:
        temperature: schedule for ``pl_module.temperature``: a number (constant), a
            :class:`~lightning_kd.schedules.Schedule`, or ``None`` to leave it alone. Must stay > 0.
        alpha: schedule for ``pl_module.alpha``, as above. Must stay within ``[0, 1]``.
        interval: ``"step"`` to advance the schedules every optimizer step, ``"epoch"`` every epoch.
        schedules: other attributes of the module to anneal, ``{attribute_name: number or Schedule}``,
            e.g. a loss weight that warms up.
        log: log each value as ``kd/<name>`` every step (``pl_module.log(..., on_step=True)``). Loggers
            write it every ``Trainer(log_every_n_steps=...)`` steps.

    Raises:
        ValueError: if no attribute is annealed, an attribute is given twice, ``temperature`` can reach
            a value <= 0, ``alpha`` can leave ``[0, 1]``, or ``interval`` is not ``"step"`` or ``"epoch"``.
        TypeError: if a schedule is neither a number nor a ``Schedule``, or ``schedules`` is not a
            mapping with identifier keys.
        RuntimeError: when training starts, if the module lacks an annealed attribute or holds it as a
            tensor, if another ``DistillationAnnealing`` anneals the same attribute, or if the run has no
            finite horizon and a schedule has no ``total`` of its own.

    Example::

        from lightning.pytorch import Trainer
        from lightning_kd import DistillationAnnealing
        from lightning_kd.schedules import Constant, Cosine

        annealing = DistillationAnnealing(
            temperature=Cosine(8.0, 2.0, warmup=0.1),  # hold 8 for 10 % of the run, then decay to 2
            alpha=0.9,
            schedules={"soft_weight": Constant(1.0, warmup=20, warmup_start=0.0)},  # DKD's warm-up
            interval="epoch",
        )
        trainer = Trainer(max_epochs=240, callbacks=[annealing])
    """

    def __init__(
        self,
        temperature: float | Schedule | None = None,
        alpha: float | Schedule | None = None,
        *,
        interval: Literal["step", "epoch"] = "step",
        schedules: Mapping[str, float | Schedule] | None = None,
        log: bool = True,
    ) -> None:
        if interval not in _INTERVALS:
            raise ValueError(f"Expected `interval` to be one of {list(_INTERVALS)}, but got {interval!r}")
        if schedules is not None and not isinstance(schedules, Mapping):
            raise TypeError(
                f"Expected `schedules` to be a mapping {{attribute_name: number or Schedule}}, but got"
                f" {type(schedules).__name__}"
            )

        self.schedules: dict[str, Schedule] = {}
        named = {"temperature": temperature, "alpha": alpha}
        for name, value in [*((k, v) for k, v in named.items() if v is not None), *(schedules or {}).items()]:
            if not isinstance(name, str) or not name.isidentifier():
                raise TypeError(f"Expected the keys of `schedules` to be attribute names, but got {name!r}")
            if name in self.schedules:
                raise ValueError(
                    f"`{name}` is annealed twice: pass it either as the `{name}` argument or in `schedules`, not both"
                )
            self.schedules[name] = as_schedule(value)
        if not self.schedules:
            raise ValueError(
                "Expected at least one of `temperature`, `alpha` or `schedules` to be set: this callback would do"
                " nothing. Either set one or remove the callback"
            )

        if "temperature" in self.schedules:
            low, _ = self.schedules["temperature"].value_range()
            if low <= 0:
                raise ValueError(
                    f"Expected `temperature` to stay > 0, but {self.schedules['temperature']} goes down to {low}"
                )
        if "alpha" in self.schedules:
            low, high = self.schedules["alpha"].value_range()
            if low < 0 or high > 1:
                raise ValueError(
                    f"Expected `alpha` to stay within [0, 1], but {self.schedules['alpha']} spans [{low}, {high}]"
                )

        self.interval = interval
        # Not `self.log`: Lightning overwrites `callback.log` with `pl_module.log` when fit starts.
        self.log_values = log
        # Transient, recomputed from the Trainer in `on_train_start` of every fit (resumed or not).
        self._horizons: dict[str, int] = {}

    @property
    @override
    def state_key(self) -> str:
        # Nothing is saved (see `state_dict`), but a key unique per configuration keeps several
        # instances apart should state ever be added, as `EarlyStopping` does.
        return self._generate_state_key(attributes=tuple(self.schedules), interval=self.interval)

    @override
    def state_dict(self) -> dict[str, Any]:
        # Values are a pure function of the step: resume is correct by construction.
        return {}

    # -- hooks -----------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not `on_fit_start`: on resume `global_step` is only restored by now.
        self._check_module(pl_module)
        self._check_no_overlap(trainer)
        self._horizons = {name: self._horizon(trainer, name, schedule) for name, schedule in self.schedules.items()}
        for name, schedule in self.schedules.items():
            # Evaluate at the horizon once so that a schedule that cannot run on it fails now.
            schedule(self._horizons[name], self._horizons[name])
        # Set the values now too, so that the module is consistent before its first batch.
        self._apply(trainer, pl_module, log=False)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._apply(trainer, pl_module, log=self.log_values)

    # -- public helper ---------------------------------------------------------------------------
    def values(self, trainer: Trainer) -> dict[str, float]:
        """The value of each annealed attribute at the Trainer's current step (or epoch).

        Raises:
            RuntimeError: if called before training starts (the horizon is not known yet).
        """
        if not self._horizons:
            raise RuntimeError("`DistillationAnnealing.values` needs the run's horizon: call it once training started")
        step = trainer.global_step if self.interval == "step" else trainer.current_epoch
        return {name: schedule(step, self._horizons[name]) for name, schedule in self.schedules.items()}

    # -- internals -------------------------------------------------------------------------------
    def _apply(self, trainer: Trainer, pl_module: LightningModule, *, log: bool) -> None:
        for name, value in self.values(trainer).items():
            setattr(pl_module, name, value)
            if log:
                # Without a logger the value still reaches `trainer.callback_metrics`; `logger=False`
                # then avoids Lightning's "no logger configured" warning.
                pl_module.log(f"kd/{name}", value, on_step=True, on_epoch=False, logger=bool(trainer.loggers))

    def _check_module(self, pl_module: LightningModule) -> None:
        cls = type(pl_module).__name__
        for name in self.schedules:
            if not hasattr(pl_module, name):
                raise RuntimeError(
                    f"`DistillationAnnealing` anneals `{name}`, but `{cls}` has no attribute `{name}`. Either give"
                    f" the module a float attribute `{name}` that it reads in `training_step`, or remove `{name}`"
                    " from the callback"
                )
            if isinstance(getattr(pl_module, name), torch.Tensor):
                raise RuntimeError(
                    f"`DistillationAnnealing` sets `{name}` to a float, but `{cls}.{name}` is a tensor (a learned"
                    f" or registered value would be replaced). Either store `{name}` as a plain float, or remove"
                    f" `{name}` from the callback"
                )

    def _check_no_overlap(self, trainer: Trainer) -> None:
        mine = set(self.schedules)
        for callback in trainer.callbacks:
            if callback is self or not isinstance(callback, DistillationAnnealing):
                continue
            shared = sorted(mine & set(callback.schedules))
            if shared:
                raise RuntimeError(
                    f"Two `DistillationAnnealing` callbacks anneal {shared}: each attribute may have one schedule."
                    " Remove it from one of them"
                )

    def _horizon(self, trainer: Trainer, name: str, schedule: Schedule) -> int:
        if schedule.total is not None:
            return schedule.total
        if self.interval == "step":
            total, what = trainer.estimated_stepping_batches, "`trainer.estimated_stepping_batches`"
        else:
            total, what = trainer.max_epochs, "`trainer.max_epochs`"
        # inf for endless runs, -1 / None for `max_epochs` without a limit, -1 for an iterable
        # dataset with no `max_steps`.
        if total is None or not math.isfinite(total) or total < 1:
            limit = "max_steps" if self.interval == "step" else "max_epochs"
            raise RuntimeError(
                f"`DistillationAnnealing` needs a finite horizon for `{name}` with interval={self.interval!r}, but"
                f" {what} is {total}. Either set `Trainer({limit}=...)`, or give the schedule its own horizon:"
                f" {type(schedule).__name__}(..., total=N)"
            )
        return int(total)
