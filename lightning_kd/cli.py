"""The ``lightning-kd`` command: compose ``conf/`` with Hydra, run the task's stages, write the report.

``train(cfg)`` is a plain function (the tests call it); :func:`main` is the thin ``@hydra.main``
wrapper. The flow reads straight: config -> the stage plan (:mod:`lightning_kd.stages`: instantiate
teacher, student, data, module, callbacks, trainer; ``Trainer.fit`` / ``test``) -> report.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lightning_kd import report, runs, stages

log = logging.getLogger("lightning_kd")


def train(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Run every stage of ``cfg.task.stages`` in ``cfg.run_dir`` and write the report; return its model entries
    (an ``export`` stage adds a table of its own to the report)."""
    entries = stages.run(cfg)
    run_dir = Path(cfg.run_dir)
    shipped = stages.exported(run_dir) if stages.EXPORT_STAGE in cfg.task.stages else None
    if entries:
        _write(cfg, run_dir, entries, export=shipped)
    elif shipped is not None:
        _write_export(cfg, run_dir, shipped)
    return entries


@rank_zero_only
def _write_export(cfg: DictConfig, run_dir: Path, shipped: dict[str, Any]) -> None:
    """``task=export``: the export table joins the report already in ``run_dir`` (its rows kept), or starts one."""
    md = report.add_export(run_dir, shipped, plot=bool(cfg.report.plot))
    log.info("Export table written to %s", md)


@rank_zero_only
def _write(cfg: DictConfig, run_dir: Path, entries: dict[str, dict[str, Any]], *, export: dict[str, Any] | None = None) -> None:
    """The report; its meta says what the runs of one experiment share (all but ``seed``), for ``report.summarize``."""
    given = cfg.teacher.get("checkpoint")
    settings = {stage: runs.setting(runs.stage_record(cfg, stage, teacher={} if stage == "teacher" and given else None))
                for stage in entries}
    soft_loss = OmegaConf.to_container(cfg.distill.soft_loss, resolve=True)
    annealed = stages.annealed(cfg)  # an annealed value is its schedule, not the value the config starts from
    meta = {
        "seed": cfg.seed,
        "method": soft_loss.get("_target_"),
        # a learned one: its LearnableTemperature settings
        "temperature": annealed.get("distill.soft_loss.temperature", soft_loss.get("temperature")),
        "alpha": annealed.get("distill.alpha", cfg.distill.alpha),
        "annealed": annealed,
        "teacher": cfg.teacher.model.get("name", cfg.teacher.model.get("_target_")),
        "student": cfg.student.model.get("name", cfg.student.model.get("_target_")),
        "precision": cfg.trainer.get("precision"),
        "teacher_checkpoint": runs.portable(given, run_dir) if given else None,
        "stage_settings": {stage: runs.record_hash(setting)[:16] for stage, setting in settings.items()},
    }
    md = report.write_report(entries, run_dir, meta=meta, plot=bool(cfg.report.plot), settings=settings, export=export)
    report.print_table(entries)
    log.info("Report written to %s", md)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Within this block, drop two messages that Lightning repeats for every stage and that say nothing about the run."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    litlogger = lambda record: "litlogger" not in record.getMessage()  # noqa: E731 (a logging filter)
    rank_zero.addFilter(litlogger)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
            yield
    finally:
        rank_zero.removeFilter(litlogger)


def check_overrides(cfg: DictConfig, overrides: list[str], schedule: str | None) -> None:
    """Refuse a command-line value that the chosen ``schedule`` would replace from the first step.

    Raises:
        ValueError: naming the override, the schedule and how to set its value instead.
    """
    annealed = stages.annealed(cfg)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in annealed:
            raise ValueError(
                f"`{key}` is set on the command line, but `schedule={schedule}` anneals it ({annealed[key]}), "
                "replacing the value from the first step. Drop the override and set the schedule's own values instead "
                "(its `start`/`end` under `schedule.`; `lightning-kd --cfg job` shows them), or choose `schedule=null`."
            )


def _entry_point(fn: Callable[[DictConfig], Any]) -> Callable[[], Any]:
    @hydra.main(version_base="1.3", config_path="pkg://lightning_kd.conf", config_name="config")
    def wrapped(cfg: DictConfig) -> None:
        hydra_cfg = HydraConfig.get()
        check_overrides(cfg, list(hydra_cfg.overrides.task), hydra_cfg.runtime.choices.get("schedule"))
        try:
            with _quiet_lightning(), runs.sigterm_stops_the_run():
                fn(cfg)
        except runs.Interrupted as stop:  # a scheduler's SIGTERM: checkpoints kept, nothing reported, a non-zero exit
            log.error("%s Resume by running the same command again with `hydra.run.dir=%s`.", stop, cfg.run_dir)
            sys.exit(runs.SIGTERM_EXIT_CODE)

    return wrapped


main = _entry_point(train)

if __name__ == "__main__":
    main()
