"""The ``lightning-kd`` command: compose ``conf/`` with Hydra, run the task's stages, write the report.

``train(cfg)`` is a plain function (the tests call it); :func:`main` is the thin ``@hydra.main``
wrapper. The flow reads straight: config -> the stage plan (:mod:`lightning_kd.stages`: instantiate
teacher, student, data, module, callbacks, trainer; ``Trainer.fit`` / ``test``) -> report.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_kd import report, runs, stages

log = logging.getLogger("lightning_kd")


def train(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Run every stage of ``cfg.task.stages`` in ``cfg.run_dir`` and write the report; return its model entries
    (an ``export`` stage adds a table of its own to the report)."""
    own_models(cfg)
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


MODEL_GROUPS = ("teacher", "student")


def own_models(cfg: DictConfig) -> None:
    """A ``teacher``/``student`` option whose ``model:`` names a ``_target_`` gets the arguments it lists, no others.

    Hydra merges an option into the option it inherits (``defaults: [mlp]``) key by key, so
    ``model: {_target_: my_project.build_student, width: 128}`` would also pass ``mlp``'s ``name`` and
    ``num_classes`` to ``build_student``. Naming ``_target_`` says which callable builds the model; its
    arguments are then the ones that option's own file lists, plus those set on the command line
    (``student.model.width=64``). The inherited ones are dropped, and logged. A ``model:`` without a
    ``_target_`` (``model: {hidden: [32]}``) changes the inherited model, as Hydra merges it.

    The options and the search path come from the running Hydra app, or from ``cfg.hydra`` (``compose(...,
    return_hydra_config=True)``); without either, ``cfg`` is left as it is.
    """
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else cfg.get("hydra")
    if hydra_cfg is None:
        return
    for group in MODEL_GROUPS:
        choice = hydra_cfg.runtime.choices.get(group)
        own = _option_file(hydra_cfg.runtime.config_sources, f"{group}/{choice}.yaml") if choice else None
        own_model = own.get("model") if own is not None else None
        model = cfg[group].get("model") if group in cfg else None
        if not isinstance(own_model, DictConfig) or "_target_" not in own_model or not isinstance(model, DictConfig):
            continue
        if model.get("_target_") != own_model._target_:
            continue  # an experiment or the command line chose another callable since: not this option's model
        prefix = f"{group}.model."
        on_command_line = {key.removeprefix(prefix).split(".")[0]
                           for key in (override.split("=", 1)[0].lstrip("+~") for override in hydra_cfg.overrides.task)
                           if key.startswith(prefix)}
        inherited = [key for key in model if key not in own_model and key not in on_command_line]
        if inherited:
            with open_dict(model):
                for key in inherited:
                    del model[key]
            log.info("`%s.model` names its `_target_` (%s) in %s/%s.yaml: not passing it the inherited %s.",
                     group, own_model._target_, group, choice, ", ".join(f"`{key}`" for key in inherited))


def _option_file(sources: Any, name: str) -> DictConfig | None:
    """The config file ``name`` as written (before Hydra merges anything into it), from the first search-path entry
    that has it; None for a config that lives elsewhere (a ConfigStore node) or moves itself (``# @package``)."""
    for source in sources:  # Hydra's search path, in the order Hydra looks things up
        if source.schema == "file":
            path: Any = Path(source.path) / name
        elif source.schema == "pkg":
            path = importlib.resources.files(source.path).joinpath(name)
        else:
            continue
        if path.is_file():
            text = path.read_text()
            if any(line.startswith("# @package") and "_group_" not in line for line in text.splitlines()):
                return None
            loaded = OmegaConf.create(text)
            return loaded if isinstance(loaded, DictConfig) else None
    return None


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


def check_objective(cfg: DictConfig) -> None:
    """Refuse, before anything trains, an ``objective`` that does not name a stage of the task.

    Raises:
        ValueError: naming ``objective``, its form and the task's stages.
    """
    name = cfg.get("objective")
    if name is None:
        return
    stage, _, key = str(name).partition(".")
    if stage not in cfg.task.stages or not key:
        raise ValueError(
            f"Expected `objective` to be `<stage>.<report entry key>` with a stage of `task.stages` "
            f"({', '.join(cfg.task.stages)}), e.g. `student_distilled.val_acc`, but got {name!r}."
        )


def objective(cfg: DictConfig, entries: dict[str, dict[str, Any]]) -> float | None:
    """The value of ``cfg.objective`` (``<stage>.<key>``) in the run's report ``entries``; None without an objective.

    Raises:
        ValueError: if the stage's entry has no number under ``key``, listing the ones it has.
    """
    name = cfg.get("objective")
    if name is None:
        return None
    check_objective(cfg)
    stage, _, key = str(name).partition(".")
    entry = entries.get(stage, {})
    value = entry.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        numbers = [k for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        raise ValueError(f"Expected `objective={name}` to name a number of the {stage} entry ({', '.join(numbers)}), but got {value!r}.")
    return float(value)


def _entry_point(fn: Callable[[DictConfig], Any]) -> Callable[[], Any]:
    @hydra.main(version_base="1.3", config_path="pkg://lightning_kd.conf", config_name="config")
    def wrapped(cfg: DictConfig) -> float | None:  # a sweeper (hydra/sweeper=optuna) optimizes the returned value
        hydra_cfg = HydraConfig.get()
        check_overrides(cfg, list(hydra_cfg.overrides.task), hydra_cfg.runtime.choices.get("schedule"))
        check_objective(cfg)
        try:
            with _quiet_lightning(), runs.sigterm_stops_the_run():
                return objective(cfg, fn(cfg))
        except runs.Interrupted as stop:  # a scheduler's SIGTERM: checkpoints kept, nothing reported, a non-zero exit
            log.error("%s Resume by running the same command again with `hydra.run.dir=%s`.", stop, cfg.run_dir)
            sys.exit(runs.SIGTERM_EXIT_CODE)

    return wrapped


def import_from_working_directory() -> None:
    """Put the working directory first on ``sys.path``, as ``python -m`` does, so that a user's
    ``_target_: my_project.build_student`` imports from the folder the command runs in.

    A console script's ``sys.path`` starts with the script's own folder (the environment's ``bin/``), not the
    working directory. Under ``python -P`` / ``PYTHONSAFEPATH``, which ask for the opposite, nothing is added.
    """
    cwd = os.getcwd()
    if not sys.flags.safe_path and "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


_main = _entry_point(train)


def main() -> Any:
    """The ``lightning-kd`` console script."""
    import_from_working_directory()
    return _main()

if __name__ == "__main__":
    main()
