"""The optimizer and learning-rate schedule of a distillation run, over the trainable parameters only."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping

import torch


def check(optimizer: Any, lr_scheduler: Any) -> None:
    """Refuse an ``optimizer`` or ``lr_scheduler`` that :func:`configure` cannot use.

    Raises:
        TypeError: for an optimizer that is not a partial (a string such as ``"adam"``).
        ValueError: for an unknown scheduler, naming the allowed values.
    """
    if optimizer is not None and (isinstance(optimizer, str) or not callable(optimizer)):
        raise TypeError(
            f"Expected `optimizer` to be a partial params -> Optimizer (e.g. functools.partial(torch.optim.SGD, lr=0.1)), "
            f"but got {optimizer!r}."
        )
    if lr_scheduler is None or lr_scheduler == "cosine" or (callable(lr_scheduler) and not isinstance(lr_scheduler, str)):
        return
    if isinstance(lr_scheduler, Mapping) and callable(lr_scheduler.get("scheduler")):
        return
    raise ValueError(
        f"Unknown `lr_scheduler` {lr_scheduler!r}. Expected None, 'cosine', a partial taking the optimizer, or a "
        "Lightning scheduler dict whose 'scheduler' is such a partial."
    )


def configure(params: list[torch.nn.Parameter], optimizer: Callable[[Any], torch.optim.Optimizer] | None,
              lr_scheduler: Any, trainer: Any) -> Any:
    """What ``configure_optimizers`` returns: ``optimizer(params)`` (default ``Adam(lr=1e-3)``) and its schedule.

    ``lr_scheduler``: None; ``"cosine"`` (per-step cosine decay over ``trainer.estimated_stepping_batches``);
    a partial ``optimizer -> scheduler`` (stepped every epoch; a partial that returns a Lightning
    scheduler dict keeps its own keys); or a Lightning scheduler dict whose ``"scheduler"`` is such a partial.

    Raises:
        RuntimeError: for ``"cosine"`` on an endless run.
    """
    optimizer = (optimizer or partial(torch.optim.Adam, lr=1e-3))(params)
    if lr_scheduler is None:
        return optimizer
    if lr_scheduler == "cosine":
        if trainer is None:
            raise RuntimeError("lr_scheduler='cosine' needs the Trainer's run length: call `configure_optimizers` from a fit.")
        total = trainer.estimated_stepping_batches
        if total == float("inf"):
            raise RuntimeError("lr_scheduler='cosine' needs a finite run: set `max_epochs` or `max_steps`.")
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(total)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
    if isinstance(lr_scheduler, Mapping):
        config = dict(lr_scheduler)
        return {"optimizer": optimizer, "lr_scheduler": {**config, "scheduler": config["scheduler"](optimizer)}}
    scheduler = lr_scheduler(optimizer)
    if isinstance(scheduler, Mapping):
        return {"optimizer": optimizer, "lr_scheduler": dict(scheduler)}
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
