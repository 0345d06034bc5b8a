"""Callbacks for distillation runs."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from functools import reduce
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_kd.schedules import Schedule, as_schedule

__all__ = ["DistillationAnnealing"]

_INTERVALS = ("step", "epoch")


class DistillationAnnealing(Callback):
    r"""Anneal the distillation temperature, the soft-loss weight ``alpha`` and other module attributes.

    Before every training batch, sets ``pl_module.<path> = schedule(step + count_from, total)`` for
    each annealed attribute, where ``step`` is ``trainer.global_step`` (optimizer steps;
    ``interval="step"``) or ``trainer.current_epoch`` (``interval="epoch"``), and ``total`` is the
    schedule's own ``total`` or else the run's horizon: ``trainer.estimated_stepping_batches`` or
    ``trainer.max_epochs``. The values are a pure function of the step, so nothing is saved in
    checkpoints and a resumed run continues on exactly the same trajectory.

    ``alpha`` weights the **soft** (teacher) term: ``loss = alpha * T² * KL + (1 - alpha) * hard``.

    Args:
        temperature: schedule for ``pl_module.temperature``: a number (constant), a
            :class:`~lightning_kd.schedules.Schedule`, or ``None`` to leave it alone. Must stay > 0.
        alpha: schedule for ``pl_module.alpha``, as above. Must stay within ``[0, 1]``.
        interval: ``"step"`` to advance the schedules every optimizer step, ``"epoch"`` every epoch.
        schedules: other attributes to anneal, ``{path: number or Schedule}``. A path is an attribute
            of the module (``"soft_weight"``, a loss weight that warms up) or a dotted chain of them
            from the module (``"soft_loss.beta"``, ``"soft_loss.temperature.grl_weight"`` for CTKD's
            gradient-reversal ramp): the callback follows it with ``getattr`` and sets the last one.
            A path ending in ``temperature`` must stay > 0, like ``temperature``.
        count_from: the number of the first step (or epoch): the schedules are evaluated at
            ``step + count_from``. Lightning counts from 0; the reference code of DKD (weight
            ``min(epoch / 20, 1)``) and CTKD (the cosine ramp of the reversal weight) counts epochs from
            1, so ``count_from=1`` gives Lightning's epoch 0 the papers' first-epoch value
            (DKD's ``1 / 20``, not 0) and reproduces their trajectory.
        log: log each value as ``kd/<path>`` every step (``pl_module.log(..., on_step=True)``). Loggers
            write it every ``Trainer(log_every_n_steps=...)`` steps.

    Raises:
        ValueError: if no attribute is annealed, an attribute is given twice, ``temperature`` (or a path
            ending in ``.temperature``) can reach a value <= 0, ``alpha`` can leave ``[0, 1]``,
            ``interval`` is not ``"step"`` or ``"epoch"``, or ``count_from`` is negative.
        TypeError: if a schedule is neither a number nor a ``Schedule``, ``schedules`` is not a
            mapping whose keys are identifiers or dotted paths of them, or ``count_from`` is not an int.
        RuntimeError: when training starts, if a part of an annealed path is missing or its last
            attribute is a tensor or a module, if another ``DistillationAnnealing`` anneals the same
            path, or if the run has no finite horizon and a schedule has no ``total`` of its own.

    Example::

        from lightning.pytorch import Trainer
        from lightning_kd import DistillationAnnealing
        from lightning_kd.schedules import Constant, Cosine, Linear

        annealing = DistillationAnnealing(
            temperature=Cosine(8.0, 2.0, warmup=0.1),  # hold 8 for 10 % of the run, then decay to 2
            alpha=0.9,
            schedules={
                "soft_weight": Constant(1.0, warmup=20, warmup_start=0.0),  # DKD's warm-up: 0.05, 0.1, ...
                "soft_loss.beta": Linear(8.0, 2.0),  # an option of the loss, by its path
            },
            interval="epoch",
            count_from=1,  # epochs numbered from 1, as in DKD's code
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
        count_from: int = 0,
        log: bool = True,
    ) -> None:
        if interval not in _INTERVALS:
            raise ValueError(f"Expected `interval` to be one of {list(_INTERVALS)}, but got {interval!r}")
        if schedules is not None and not isinstance(schedules, Mapping):
            raise TypeError(
                f"Expected `schedules` to be a mapping {{attribute path: number or Schedule}}, but got"
                f" {type(schedules).__name__}"
            )
        if not isinstance(count_from, int) or isinstance(count_from, bool):
            raise TypeError(
                f"Expected `count_from` to be an int >= 0 (the number of the first step or epoch), but got"
                f" {count_from!r} of type {type(count_from).__name__}"
            )
        if count_from < 0:
            raise ValueError(
                f"Expected `count_from` to be an int >= 0 (the number of the first step or epoch), but got"
                f" {count_from}"
            )

        self.schedules: dict[str, Schedule] = {}
        named = {"temperature": temperature, "alpha": alpha}
        for path, value in [*((k, v) for k, v in named.items() if v is not None), *(schedules or {}).items()]:
            if not isinstance(path, str) or not all(part.isidentifier() for part in path.split(".")):
                raise TypeError(
                    "Expected the keys of `schedules` to be attribute names or dotted paths of them"
                    f" (e.g. 'soft_loss.beta'), but got {path!r}"
                )
            if path in self.schedules:
                raise ValueError(
                    f"`{path}` is annealed twice: pass it either as the `{path}` argument or in `schedules`, not both"
                )
            self.schedules[path] = as_schedule(value)
        if not self.schedules:
            raise ValueError(
                "Expected at least one of `temperature`, `alpha` or `schedules` to be set: this callback would do"
                " nothing. Either set one or remove the callback"
            )

        for path, schedule in self.schedules.items():
            low, high = schedule.value_range()
            # A temperature anywhere (the module's, or a loss's by its path) divides the logits.
            if path.rpartition(".")[2] == "temperature" and low <= 0:
                raise ValueError(f"Expected `{path}` to stay > 0, but {schedule} goes down to {low}")
            if path == "alpha" and (low < 0 or high > 1):
                raise ValueError(f"Expected `alpha` to stay within [0, 1], but {schedule} spans [{low}, {high}]")

        self.interval = interval
        self.count_from = count_from
        # Not `self.log`: Lightning overwrites `callback.log` with `pl_module.log` when fit starts.
        self.log_values = log
        # Transient, recomputed from the Trainer in `on_train_start` of every fit (resumed or not).
        self._horizons: dict[str, int] = {}

    @property
    @override
    def state_key(self) -> str:
        # Nothing is saved (see `state_dict`), but a key unique per configuration keeps several
        # instances apart should state ever be added, as `EarlyStopping` does.
        return self._generate_state_key(
            attributes=tuple(self.schedules), interval=self.interval, count_from=self.count_from
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        # Values are a pure function of the step: resume is correct by construction.
        return {}

    # -- hooks -----------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not `on_fit_start`: on resume `global_step` is only restored by now.
        self._check_module(pl_module)
        self._check_no_overlap(trainer, pl_module)
        self._horizons = {path: self._horizon(trainer, path, schedule) for path, schedule in self.schedules.items()}
        for path, schedule in self.schedules.items():
            # Evaluate at the horizon once so that a schedule that cannot run on it fails now.
            schedule(self._horizons[path], self._horizons[path])
        # Set the values now too, so that the module is consistent before its first batch.
        self._apply(trainer, pl_module, log=False)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._apply(trainer, pl_module, log=self.log_values)

    # -- public helper ---------------------------------------------------------------------------
    def values(self, trainer: Trainer) -> dict[str, float]:
        """The value of each annealed path at the Trainer's current step (or epoch) plus ``count_from``.

        Raises:
            RuntimeError: if called before training starts (the horizon is not known yet).
        """
        if not self._horizons:
            raise RuntimeError("`DistillationAnnealing.values` needs the run's horizon: call it once training started")
        step = trainer.global_step if self.interval == "step" else trainer.current_epoch
        step += self.count_from
        return {path: schedule(step, self._horizons[path]) for path, schedule in self.schedules.items()}

    # -- internals -------------------------------------------------------------------------------
    def _apply(self, trainer: Trainer, pl_module: LightningModule, *, log: bool) -> None:
        for path, value in self.values(trainer).items():
            *parents, name = path.split(".")
            setattr(reduce(getattr, parents, pl_module), name, value)
            if log:
                # Without a logger the value still reaches `trainer.callback_metrics`; `logger=False`
                # then avoids Lightning's "no logger configured" warning.
                pl_module.log(f"kd/{path}", value, on_step=True, on_epoch=False, logger=bool(trainer.loggers))

    def _check_module(self, pl_module: LightningModule) -> None:
        cls = type(pl_module).__name__
        aliases = getattr(pl_module, "annealing_aliases", {})
        for path in self.schedules:
            parts = canonical_path(path, aliases).split(".")  # the attribute itself, whose owner can say why it is missing
            value: Any = pl_module
            for depth, part in enumerate(parts):
                if not hasattr(value, part):
                    reason = _why_missing(value, part)
                    owner = ".".join([cls, *parts[:depth]])
                    fix = (
                        f"give `{owner}` a float attribute `{part}` that the module reads in `training_step`"
                        if depth == len(parts) - 1
                        else "correct the path (each part an attribute of the one before it, from the module)"
                    )
                    raise RuntimeError(
                        f"`DistillationAnnealing` anneals `{path}`, but `{owner}` has no attribute `{part}`{reason}. Either"
                        f" {fix}, or remove `{path}` from the callback"
                    )
                value = getattr(value, part)
            if isinstance(value, torch.Tensor):
                kind, fix = "a tensor", f"store `{parts[-1]}` as a plain float"
            elif isinstance(value, torch.nn.Module):
                kind, fix = f"a `{type(value).__name__}` module", f"anneal a float attribute of it (`{'.'.join(parts)}.<name>`)"
            else:
                continue
            raise RuntimeError(
                f"`DistillationAnnealing` sets `{path}` to a float, but `{cls}.{path}` is {kind} (a learned or"
                f" registered value would be replaced). Either {fix}, or remove `{path}` from the callback"
            )

    def _check_no_overlap(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A module names its aliases (`DistillationModule.temperature` is `soft_loss.temperature`): two names
        # of one attribute are one attribute, and two schedules would fight over it step by step.
        aliases = getattr(pl_module, "annealing_aliases", {})
        owners: dict[str, str] = {}
        for callback in [self, *(c for c in trainer.callbacks if c is not self and isinstance(c, DistillationAnnealing))]:
            for path in callback.schedules:
                key = canonical_path(path, aliases)
                if key in owners:
                    names = sorted({owners[key], path})
                    where = "in one callback" if callback is self else "in two `DistillationAnnealing` callbacks"
                    raise RuntimeError(
                        f"{' and '.join(f'`{n}`' for n in names)} {'name one attribute' if len(names) > 1 else 'is annealed twice'}"
                        f" {where}: each attribute may have one schedule. Remove one of them"
                    )
                owners[key] = path

    def _horizon(self, trainer: Trainer, path: str, schedule: Schedule) -> int:
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
                f"`DistillationAnnealing` needs a finite horizon for `{path}` with interval={self.interval!r}, but"
                f" {what} is {total}. Either set `Trainer({limit}=...)`, or give the schedule its own horizon:"
                f" {type(schedule).__name__}(..., total=N)"
            )
        return int(total)


def canonical_path(path: str, aliases: Mapping[str, str]) -> str:
    """``path`` with a leading alias replaced by what it names (``temperature`` -> ``soft_loss.temperature``)."""
    for alias, target in aliases.items():
        if path == alias or path.startswith(alias + "."):
            return target + path[len(alias):]
    return path


def _why_missing(owner: Any, name: str) -> str:
    """`` (reason)`` when ``name`` is a property of ``owner`` that raised, else ``""``.

    ``nn.Module.__getattr__`` replaces a property's AttributeError with its own "has no attribute";
    calling the property's getter directly gets the owner's message (``SoftMSELoss has no temperature``).
    """
    descriptor = inspect.getattr_static(type(owner), name, None)
    if not isinstance(descriptor, property) or descriptor.fget is None:
        return ""
    try:
        descriptor.fget(owner)
    except AttributeError as err:
        return f" ({str(err).rstrip('.')})"
    return ""
