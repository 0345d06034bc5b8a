"""The optimizer and learning-rate schedule of a distillation run, over the trainable parameters only.

``lr_scheduler`` is one of:

- ``None``: the optimizer's learning rate throughout;
- ``"cosine"``: per-step cosine decay to 0 over the run (``trainer.estimated_stepping_batches``);
- a :class:`~lightning_kd.schedules.Schedule`: the learning rate's multiplier as a function of the
  optimizer step, over the run, e.g. ``Cosine(1.0, 0.0, warmup=0.05, warmup_start=0.0)``: a linear
  warm-up from 0 over 5 % of the steps, then cosine decay to 0 (``end=0.1`` decays to a tenth of the rate);
- a partial ``optimizer -> scheduler`` (Hydra ``_partial_: true``), stepped every epoch, or a Lightning
  scheduler dict whose ``"scheduler"`` is such a partial (``{"scheduler": ..., "interval": "step"}``).

A partial whose run-length parameter (one of :data:`RUN_LENGTH`: ``total_steps``, ``num_training_steps``,
``T_max``) is left unset is told the run's length: the number of times Lightning will step it, that is the
run's optimizer steps, and a bare partial is then stepped every optimizer step (in a scheduler dict its
``interval`` decides: optimizer steps, or ``max_epochs`` for ``"epoch"``). A value given in the partial is
never replaced.
"""

from __future__ import annotations

import inspect
import math
from functools import partial
from typing import Any, Callable, Mapping

import torch

from lightning_kd.schedules import Schedule

# The names schedulers give the number of times they are stepped: torch's OneCycleLR (`total_steps`) and
# CosineAnnealingLR (`T_max`), transformers' get_*_schedule_with_warmup (`num_training_steps`).
RUN_LENGTH = ("total_steps", "num_training_steps", "T_max")
# OneCycleLR's other way to give its length (epochs x steps_per_epoch): a partial that gives it keeps it.
_OWN_LENGTH = ("epochs", "steps_per_epoch")


def check(optimizer: Any, lr_scheduler: Any) -> None:
    """Refuse an ``optimizer`` or ``lr_scheduler`` that :func:`configure` cannot use.

    Raises:
        TypeError: for an optimizer that is not a partial (a string such as ``"adam"``).
        ValueError: for an unknown scheduler, naming the allowed values; a :class:`~lightning_kd.schedules.Schedule`
            that can go below 0 or has a warm-up without ``warmup_start``; a partial with more than one unset
            run-length parameter.
    """
    if optimizer is not None and (isinstance(optimizer, str) or not callable(optimizer)):
        raise TypeError(
            f"Expected `optimizer` to be a partial params -> Optimizer (e.g. functools.partial(torch.optim.SGD, lr=0.1)), "
            f"but got {optimizer!r}."
        )
    if isinstance(lr_scheduler, Schedule):
        if lr_scheduler.warmup and lr_scheduler.warmup_start is None:  # a Schedule's default: hold `start`
            raise ValueError(
                f"Expected the `lr_scheduler` schedule {lr_scheduler!r} to say where its warm-up starts: set "
                "`warmup_start=0.0` for a linear warm-up of the learning rate from 0 (or `warmup_start=1.0` to hold it)."
            )
        lowest = lr_scheduler.value_range()[0]
        if lowest < 0:
            raise ValueError(
                f"Expected the `lr_scheduler` schedule (the learning rate's multiplier) to stay >= 0, but {lr_scheduler!r} "
                f"goes down to {lowest}."
            )
        return
    if lr_scheduler is None or lr_scheduler == "cosine":
        return
    if callable(lr_scheduler) and not isinstance(lr_scheduler, str):
        _unset_run_length(lr_scheduler)
        return
    if isinstance(lr_scheduler, Mapping) and callable(lr_scheduler.get("scheduler")):
        _unset_run_length(lr_scheduler["scheduler"])
        return
    raise ValueError(
        f"Unknown `lr_scheduler` {lr_scheduler!r}. Expected None, 'cosine', a lightning_kd.schedules.Schedule (the "
        "learning rate's multiplier per step), a partial taking the optimizer, or a Lightning scheduler dict whose "
        "'scheduler' is such a partial."
    )


def configure(params: list[torch.nn.Parameter], optimizer: Callable[[Any], torch.optim.Optimizer] | None,
              lr_scheduler: Any, trainer: Any) -> Any:
    """What ``configure_optimizers`` returns: ``optimizer(params)`` (default ``Adam(lr=1e-3)``) and its schedule
    (see the module's docstring for the values of ``lr_scheduler``).

    Raises:
        RuntimeError: for a schedule over the run (``"cosine"``, a Schedule, a partial told the run's length)
            without a Trainer or on an endless run.
        ValueError: for a scheduler dict told the run's length with a ``frequency`` other than 1.
    """
    optimizer = (optimizer or partial(torch.optim.Adam, lr=1e-3))(params)
    if lr_scheduler is None:
        return optimizer
    if lr_scheduler == "cosine":
        total = _run_steps(trainer, "lr_scheduler='cosine'")
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
    if isinstance(lr_scheduler, Schedule):
        total = _run_steps(trainer, f"lr_scheduler={lr_scheduler!r}")
        # A pure function of the step: a resumed run restores the step count and gets the same rates.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_scheduler(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
    if isinstance(lr_scheduler, Mapping):
        config = dict(lr_scheduler)
        factory = config["scheduler"]
        name = _unset_run_length(factory)
        if name is not None:
            if config.get("frequency", 1) != 1:
                raise ValueError(
                    f"Expected the scheduler dict's `frequency` to be 1 when its scheduler is told the run's length "
                    f"(`{name}` unset), but got {config['frequency']!r}. Set `{name}` in the partial yourself."
                )
            if config.get("interval", "epoch") == "step":
                length = _run_steps(trainer, f"`{name}` of the lr_scheduler")
            else:
                length = _run_epochs(trainer, name)
            factory = partial(factory, **{name: length})
        return {"optimizer": optimizer, "lr_scheduler": {**config, "scheduler": factory(optimizer)}}
    name = _unset_run_length(lr_scheduler)
    if name is not None:  # told the run's length in optimizer steps, so stepped at every one of them
        scheduler = partial(lr_scheduler, **{name: _run_steps(trainer, f"`{name}` of the lr_scheduler")})(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
    scheduler = lr_scheduler(optimizer)
    if isinstance(scheduler, Mapping):
        return {"optimizer": optimizer, "lr_scheduler": dict(scheduler)}
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def _unset_run_length(factory: Callable[..., Any]) -> str | None:
    """The run-length parameter (:data:`RUN_LENGTH`) of ``factory`` that it leaves unset, or None.

    Unset: not given by the partial (nor its positional arguments), and required or defaulting to None.
    A partial that gives OneCycleLR's ``epochs``/``steps_per_epoch`` has its own length.

    Raises:
        ValueError: if several run-length parameters are unset: which one is the run's length is ambiguous.
    """
    func, args, keywords = factory, (), {}
    while isinstance(func, partial):
        args, keywords = (*func.args, *args), {**func.keywords, **keywords}
        func = func.func
    try:
        parameters = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable without a signature: nothing to fill
        return None
    given = set(keywords) | {p.name for p in parameters[: len(args)]}
    if given & set(_OWN_LENGTH):
        return None
    unset = [p.name for p in parameters if p.name in RUN_LENGTH and p.name not in given
             and (p.default is inspect.Parameter.empty or p.default is None)]
    if len(unset) > 1:
        raise ValueError(
            f"The lr_scheduler {factory!r} leaves several run-length parameters unset ({', '.join(unset)}): which one is "
            f"the run's length is ambiguous. Give all but one of them in the partial."
        )
    return unset[0] if unset else None


def _run_steps(trainer: Any, what: str) -> int:
    """The run's optimizer steps (``trainer.estimated_stepping_batches``), at least 1."""
    if trainer is None:
        raise RuntimeError(f"{what} needs the Trainer's run length: call `configure_optimizers` from a fit.")
    total = trainer.estimated_stepping_batches
    if total == float("inf"):
        raise RuntimeError(f"{what} needs a finite run: set `max_epochs` or `max_steps`.")
    return max(1, int(total))


def _run_epochs(trainer: Any, name: str) -> int:
    """The run's epochs (``trainer.max_epochs``), for a scheduler stepped once an epoch."""
    if trainer is None:
        raise RuntimeError(f"`{name}` of the lr_scheduler needs the Trainer's run length: call `configure_optimizers` from a fit.")
    epochs = trainer.max_epochs
    if epochs is None or epochs < 0 or not math.isfinite(epochs):
        raise RuntimeError(f"`{name}` of the lr_scheduler, stepped every epoch, needs `max_epochs`: set it, or set `{name}` yourself.")
    return max(1, int(epochs))
