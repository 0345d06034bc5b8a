"""The ``lightning-kd`` command: compose ``conf/`` with Hydra, run the task's stages, write the report.

``train(cfg)`` is a plain function (the tests call it); :func:`main` is the thin ``@hydra.main``
wrapper. The flow reads straight: config -> instantiate (teacher, student, data, module, callbacks,
trainer) -> ``Trainer.fit`` / ``test`` -> report. Each stage lives in ``<run_dir>/<stage>/``.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import hydra
import lightning as L
import torch
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_kd import report, runs
from lightning_kd.soft_targets.build import build_soft_targets
from lightning_kd.checkpoint import fingerprint
from lightning_kd.soft_targets.batches import SoftTargetDataModule
from lightning_kd.soft_targets.store import SoftTargetStore, prepare_store_path, store_state
from lightning_kd.io import atomic_write
from lightning_kd.module import DistillationModule
from lightning_kd.teachers import TeacherEnsemble, resolve_dtype
from lightning_kd.weights import load_weights

log = logging.getLogger("lightning_kd")

STUDENT_STAGES = ("student_scratch", "student_distilled", "student_distilled_transfer")
DISTILLED_STAGES = ("student_distilled", "student_distilled_transfer")
MODEL_STAGES = ("teacher", *STUDENT_STAGES)  # the report's rows
STAGES = ("teacher", "cache", *STUDENT_STAGES)
TARGETS = ("online", "cached")
CONFIG_ONLY = ("teacher_layers", "student_layers")  # `distill` keys that the feature terms interpolate, not module arguments


def train(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Run every stage of ``cfg.task.stages`` and write the report; return its entries."""
    stages = _stages(cfg)
    runs.check_lengths(cfg, stages)
    run_dir = Path(cfg.run_dir)
    entries: dict[str, dict[str, Any]] = {}
    teacher_checkpoint = cfg.teacher.get("checkpoint")
    # Refuse a stage trained under other settings before anything trains (not after the stages before it).
    finished_teacher = None if teacher_checkpoint else runs.read_result(run_dir, "teacher")
    known_teacher = finished_teacher["checkpoint"] if finished_teacher else teacher_checkpoint
    for stage in stages:
        if stage != "cache":
            runs.check_stage(run_dir / stage, runs.record(cfg, stage, known_teacher))
    store: SoftTargetStore | None = None  # opened (hashed, checked against the teacher) once for all stages
    for stage in stages:
        if stage == "cache":
            store = build_cache(cfg, run_dir, teacher_checkpoint)
            continue
        if store is None and _reads_store(cfg, stage) and not (run_dir / stage / runs.RESULT).is_file():
            store = _open_store(cfg, teacher_checkpoint)  # builds a teacher to check it: before the stage seeds
        entry, checkpoint = run_stage(cfg, stage, run_dir, teacher_checkpoint, store=store)
        if stage == "teacher":
            teacher_checkpoint = checkpoint
        entries[stage] = entry
    if entries:
        _write(cfg, run_dir, entries)
    return entries


def _stages(cfg: DictConfig) -> list[str]:
    """The task's stages, checked; with cached targets, a ``cache`` stage before the first distilled one."""
    stages = list(cfg.task.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"Unknown stage(s) {unknown} in `task.stages`. Expected any of: {', '.join(STAGES)}.")
    targets = cfg.distill.get("targets", "online")
    if targets not in TARGETS:
        raise ValueError(f"Unknown `distill.targets` {targets!r}. Expected one of: {', '.join(TARGETS)}.")
    distilled = [s for s in stages if s in DISTILLED_STAGES]
    cached = targets == "cached" and bool(distilled)
    store_exists = cached and store_state(Path(cfg.cache.path)) == "complete"
    if cached and "cache" not in stages and not store_exists:
        stages.insert(stages.index(distilled[0]), "cache")  # build the store the distilled stages read
    schedule = cfg.get("schedule") or {}
    if distilled and cfg.distill.get("learnable_temperature") and schedule.get("temperature") is not None:
        raise ValueError(
            "`distill.learnable_temperature` learns the temperature, but the schedule sets it: use `schedule=ctkd` "
            "(or a schedule with `temperature: null`)."
        )
    has_checkpoint = bool(cfg.teacher.get("checkpoint"))
    requires_checkpoint = bool(cfg.task.get("requires_teacher_checkpoint"))
    if "teacher" in stages and not has_checkpoint and not requires_checkpoint:
        return stages  # the teacher is trained here first
    needs_teacher = "cache" in stages or ((bool(distilled) or requires_checkpoint) and not store_exists)
    if needs_teacher and not has_checkpoint:
        raise ValueError(
            f"`task={cfg.task.name}` needs a saved teacher: set `teacher.checkpoint=PATH` (e.g. the "
            "`teacher/checkpoints/last.ckpt` of a `lightning-kd task=teacher` run), distil from an existing store "
            "(`distill.targets=cached cache.path=DIR`), or use `task=pipeline`."
        )
    if not has_checkpoint and "teacher" in stages:
        log.warning("No `teacher.checkpoint`: distilling from the store at %s alone; the report has no teacher row.", cfg.cache.path)
        stages.remove("teacher")
    return stages


def build_cache(cfg: DictConfig, run_dir: Path, teacher_checkpoint: str | None) -> SoftTargetStore:
    """The ``cache`` stage: write the teacher's outputs on the training data (transfer set included) to ``cache.path``.

    A finished store there is reused; an interrupted store of ours is removed file by file and rebuilt;
    anything else at ``cache.path`` is refused and left untouched.
    """
    path = Path(cfg.cache.path)
    if store_state(path) == "complete":
        log.info("Soft-target store %s already built: reusing it.", path)
        return _open_store(cfg, teacher_checkpoint)
    # Every input is validated before anything at `cache.path` is touched.
    if teacher_checkpoint is None:
        raise ValueError("The cache stage needs a teacher: set `teacher.checkpoint=PATH` or run the `teacher` stage first.")
    if not Path(teacher_checkpoint).expanduser().is_file():
        raise FileNotFoundError(f"Teacher checkpoint not found: {str(teacher_checkpoint)!r} (`teacher.checkpoint`). Nothing was built or removed.")
    # Only an interrupted store of our own format, holding only our files, is removed (file by file); any other
    # content of `cache.path` is refused and left as it is.
    prepare_store_path(path, remove_incomplete=rank_zero_only.rank == 0)
    L.seed_everything(cfg.seed, workers=True)
    module = build_module(cfg, "student_distilled", teacher_checkpoint, targets="online")
    trainer = build_trainer(cfg, "cache", run_dir / "cache", max_epochs=0)
    started = time.perf_counter()
    store = build_soft_targets(
        module,
        hydra.utils.instantiate(cfg.data),
        path,
        dtype=cfg.cache.dtype,
        top_k=cfg.cache.top_k,
        epochs=int(cfg.cache.epochs),
        batch_size=cfg.cache.batch_size,
        trainer=trainer,
        teacher_checkpoint=str(teacher_checkpoint),
    )
    log.info("Soft-target store %s built in %.1f s: %s", path, time.perf_counter() - started, store)
    return store


def _reads_store(cfg: DictConfig, stage: str) -> bool:
    return stage in DISTILLED_STAGES and cfg.distill.get("targets", "online") == "cached"


def _open_store(cfg: DictConfig, teacher_checkpoint: str | None) -> SoftTargetStore:
    """Open ``cache.path``, and check it against the teacher checkpoint when there is one."""
    store = SoftTargetStore(cfg.cache.path, verify=bool(cfg.cache.verify))
    # A store is built once; settings that would build another one are refused, not silently ignored.
    differ = {key: (getattr(store, key), cfg.cache[key]) for key in ("dtype", "top_k", "epochs") if getattr(store, key) != cfg.cache[key]}
    if differ:
        listed = ", ".join(f"`cache.{key}`: stored {old!r}, configured {new!r}" for key, (old, new) in differ.items())
        raise ValueError(
            f"The soft-target store at {cfg.cache.path} was built with other settings than this run's ({listed}). "
            "Set them as stored to use it, or choose another `cache.path` to build a new store."
        )
    if teacher_checkpoint is not None:
        # Loaded only to fingerprint it, then dropped: training from the store keeps no teacher in memory.
        teacher = build_teacher(cfg, teacher_checkpoint)
        if cfg.speed.get("teacher_dtype"):
            teacher.to(resolve_dtype(cfg.speed.teacher_dtype))
        store.check_teacher(fingerprint(teacher))
        del teacher
    return store


def run_stage(
    cfg: DictConfig, stage: str, run_dir: Path, teacher_checkpoint: str | None, *, store: SoftTargetStore | None = None
) -> tuple[dict[str, Any], str | None]:
    """Train (or, for a given teacher checkpoint, only evaluate) one stage; finished stages are reused.

    A distilled stage with ``distill.targets=cached`` reads ``store`` (opened by :func:`train`). A stage
    trained under other settings is refused (:func:`runs.check_stage`); an interrupted one resumes from
    :func:`runs.resume_checkpoint`; one stopped by SIGTERM raises :class:`runs.Interrupted` and writes no result.
    """
    stage_dir = run_dir / stage
    record = runs.record(cfg, stage, teacher_checkpoint)
    runs.check_stage(stage_dir, record)
    result = runs.read_result(run_dir, stage)
    if result is not None:  # a re-run in the same directory resumes after the last finished stage
        log.info("Stage %s already finished in %s: reusing it.", stage, stage_dir)
        return result["entry"], result["checkpoint"]

    if not _reads_store(cfg, stage):
        store = None
    given_teacher = stage == "teacher" and teacher_checkpoint is not None
    resume = None if given_teacher else runs.resume_checkpoint(stage_dir)
    L.seed_everything(cfg.seed, workers=True)  # before building models: same seed, same init
    module = build_module(cfg, stage, teacher_checkpoint, store=store)
    datamodule = build_datamodule(cfg, stage)
    if store is not None:
        datamodule = SoftTargetDataModule(datamodule, store)
    epochs = 0 if given_teacher else OmegaConf.select(cfg, runs.EPOCHS[stage])  # a given teacher is only evaluated
    trainer = build_trainer(cfg, stage, stage_dir, max_epochs=epochs)
    if record is not None:
        trainer.callbacks.append(runs.RecordStage(stage_dir, record))  # a resume under other settings is then refused
    try:  # Lightning's SIGTERM handler stops fit/test at the end of a batch (SIGTERMException, or only the flag)
        if not given_teacher:
            trainer.fit(module, datamodule=datamodule, ckpt_path=None if resume is None else str(resume), weights_only=True)
        if not trainer.received_sigterm:
            metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    except SIGTERMException:
        pass
    if trainer.received_sigterm:
        last = stage_dir / "checkpoints" / "last.ckpt"
        where = (f"the re-run resumes it from {str(last)!r}, its end-of-epoch checkpoint (the steps after it are repeated)"
                 if last.is_file() else "it had no checkpoint yet, so the re-run starts it over")
        raise runs.Interrupted(f"Stage {stage} stopped by SIGTERM at epoch {trainer.current_epoch}, step {trainer.global_step}: {where}.")
    model = module.student
    checkpoint = str(teacher_checkpoint) if given_teacher else str(stage_dir / "checkpoints" / "last.ckpt")
    entry = {
        "test_acc": _float(metrics.get("test/acc")),
        "params": report.count_parameters(model),
        "weights_bytes": None,
        "checkpoint_bytes": None,
        "latency_ms": None,
        "epochs": int(epochs),
        "agreement_with_teacher": _float(metrics.get("test/agreement")),
        "teacher_test_acc": _float(metrics.get("test/teacher_acc")),
        "checkpoint": runs.portable(checkpoint, run_dir),  # relative inside the run directory: it may move
    }
    _finish_stage(cfg, run_dir, stage, module, datamodule, entry, checkpoint, record)
    return entry, checkpoint


def build_module(
    cfg: DictConfig, stage: str, teacher_checkpoint: str | None, *, store: SoftTargetStore | None = None, targets: str | None = None
) -> DistillationModule:
    """The stage's module; a distilled stage with ``store`` takes its teacher outputs from it (no teacher built)."""
    common = {"augmentation": _augmentation(cfg), "augmentation_seed": cfg.seed, "channels_last": cfg.speed.channels_last,
              "compile_student": cfg.speed.compile_student}
    if stage == "teacher":
        model = hydra.utils.instantiate(cfg.teacher.model, _convert_="all")
        if teacher_checkpoint is not None:  # evaluate a given teacher: load it as the "student" being tested
            load_weights(model, teacher_checkpoint)
        return module_class(cfg)(None, model, **common, **_recipe(cfg.teacher))
    student = hydra.utils.instantiate(cfg.student.model, _convert_="all")
    if stage == "student_scratch":
        return module_class(cfg)(None, student, hard_loss=cfg.distill.hard_loss, **common, **_recipe(cfg.student))
    distill = OmegaConf.to_container(cfg.distill, resolve=True)
    configured = distill.pop("targets", "online")
    for key in CONFIG_ONLY:
        distill.pop(key, None)
    if (targets or configured) == "cached":
        if store is None:
            raise ValueError(f"Stage {stage} distils from cached targets but no store was opened (`cache.path`).")
        return module_class(cfg)(None, student, soft_targets=store, **distill, **common, **_recipe(cfg.student))
    if teacher_checkpoint is None:
        raise ValueError(f"Stage {stage} needs a teacher: set `teacher.checkpoint=PATH` or run the `teacher` stage first.")
    if cfg.teacher.get("extra"):  # several teachers: their weights are loaded here, the module gets the ensemble
        teacher, source = build_teacher(cfg, teacher_checkpoint), {}
    else:  # one teacher: the module loads it and records where from (for `load_from_checkpoint`)
        teacher, source = hydra.utils.instantiate(cfg.teacher.model, _convert_="all"), {"teacher_checkpoint": str(teacher_checkpoint)}
    return module_class(cfg)(
        teacher, student, **source, teacher_dtype=cfg.speed.teacher_dtype, compile_teacher=cfg.speed.compile_teacher,
        **distill, **common, **_recipe(cfg.student),
    )


def build_teacher(cfg: DictConfig, checkpoint: str | Path) -> nn.Module:
    """The trained teacher: ``teacher.model`` with ``checkpoint``'s weights, or, with ``teacher.extra``, the
    ensemble of it and the extra teachers (each a checkpoint path of the same model, or ``{model, checkpoint}``)."""
    main_teacher = load_weights(hydra.utils.instantiate(cfg.teacher.model, _convert_="all"), checkpoint)
    extra = cfg.teacher.get("extra") or []
    if not extra:
        return main_teacher
    teachers = [main_teacher]
    for i, entry in enumerate(extra):
        if isinstance(entry, str):
            model_cfg, path = cfg.teacher.model, entry
        elif isinstance(entry, DictConfig) and entry.get("checkpoint"):
            model_cfg, path = entry.get("model") or cfg.teacher.model, entry.checkpoint
        else:
            raise ValueError(
                f"Expected `teacher.extra[{i}]` to be a checkpoint path or {{model: ..., checkpoint: PATH}}, but got {entry!r}."
            )
        teachers.append(load_weights(hydra.utils.instantiate(model_cfg, _convert_="all"), path))
    weights = cfg.teacher.get("weights")
    return TeacherEnsemble(teachers, weights=None if weights is None else list(weights))


def _augmentation(cfg: DictConfig) -> Any:
    augment = cfg.get("augment")
    return hydra.utils.instantiate(augment, _convert_="all") if augment and augment.get("_target_") else None


def module_class(cfg: DictConfig) -> type[DistillationModule]:
    """``cfg.module``: DistillationModule or a user subclass (e.g. one overriding ``unpack_batch``)."""
    cls = hydra.utils.get_class(cfg.get("module") or "lightning_kd.DistillationModule")
    if not (isinstance(cls, type) and issubclass(cls, DistillationModule)):
        raise TypeError(f"Expected `module` to name DistillationModule or a subclass of it, but got {cfg.module!r}.")
    return cls


def _recipe(recipe: DictConfig) -> dict[str, Any]:
    optimizer = hydra.utils.instantiate(recipe.optimizer) if recipe.get("optimizer") else None
    scheduler = recipe.get("lr_scheduler")
    if isinstance(scheduler, DictConfig):
        scheduler = hydra.utils.instantiate(scheduler)
    return {"optimizer": optimizer, "lr_scheduler": scheduler}


def build_datamodule(cfg: DictConfig, stage: str) -> L.LightningDataModule:
    """The task's datamodule; only the transfer stage sees the unlabeled transfer set."""
    has_transfer = "transfer_samples" in cfg.data
    if stage == "student_distilled_transfer":
        if not has_transfer or not cfg.data.transfer_samples:
            raise ValueError(
                "Stage student_distilled_transfer needs unlabeled inputs: set `data.transfer_samples` > 0 "
                "(a datamodule argument), or drop the stage from `task.stages`."
            )
        return hydra.utils.instantiate(cfg.data)
    return hydra.utils.instantiate(cfg.data, **({"transfer_samples": 0} if has_transfer else {}))


def build_trainer(cfg: DictConfig, stage: str, stage_dir: Path, *, max_epochs: int) -> L.Trainer:
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    for callback in callbacks:
        if isinstance(callback, L.pytorch.callbacks.ModelCheckpoint):
            callback.dirpath = str(stage_dir / "checkpoints")
    if stage in ("student_distilled", "student_distilled_transfer") and cfg.get("schedule"):
        callbacks.append(hydra.utils.instantiate(cfg.schedule, _convert_="all"))
    logger: Any = False
    if cfg.get("logger"):
        _keep_earlier_metrics(stage_dir)
        logger = hydra.utils.instantiate(cfg.logger, name=stage)
    # The callbacks group chooses the progress bar: without one (callbacks=quiet) Lightning must not add its own.
    no_bar = {} if any(isinstance(c, L.pytorch.callbacks.ProgressBar) for c in callbacks) else {"enable_progress_bar": False}
    plugins = [hydra.utils.instantiate(p) if isinstance(p, DictConfig) else p for p in (cfg.trainer.get("plugins") or [])]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(runs.AtomicCheckpointIO())  # a crash while saving keeps the previous last.ckpt whole
    # default_root_dir: where Lightning's SLURM requeue saves its hpc_ckpt_N.ckpt, one folder per stage.
    return hydra.utils.instantiate(cfg.trainer, max_epochs=max_epochs, callbacks=callbacks, logger=logger, plugins=plugins,
                                   default_root_dir=str(stage_dir), **no_bar)


@rank_zero_only
def _keep_earlier_metrics(stage_dir: Path) -> None:
    """Lightning's CSV logger deletes a resumed stage's ``metrics.csv``: keep it as ``metrics.<k>.csv`` first."""
    metrics = stage_dir / "metrics.csv"
    if metrics.is_file():
        k = next(k for k in range(1, 10_000) if not (stage_dir / f"metrics.{k}.csv").exists())
        metrics.rename(stage_dir / f"metrics.{k}.csv")
        log.info("Kept the metrics logged before the resume as %s.", stage_dir / f"metrics.{k}.csv")


@rank_zero_only
def _finish_stage(cfg: DictConfig, run_dir: Path, stage: str, module: DistillationModule, datamodule: Any, entry: dict[str, Any],
                  checkpoint: str, record: dict[str, Any] | None) -> None:
    """Export the model's weights, time it on the CPU, and mark the stage done (rank 0 only)."""
    stage_dir = run_dir / stage
    model = module.student
    weights = stage_dir / "model.pt"
    atomic_write(weights, lambda f: torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, f))
    entry["weights_bytes"] = weights.stat().st_size
    # The Lightning checkpoint (weights + optimizer state, no teacher) of a trained stage.
    entry["checkpoint_bytes"] = Path(checkpoint).stat().st_size if Path(checkpoint).is_file() else None
    example, _ = module.unpack_batch(next(iter(datamodule.test_dataloader())))
    entry["latency_ms"] = report.cpu_latency_ms(model, example, repeats=int(cfg.report.latency_batches))
    entry["latency_batch_size"] = int(example.shape[0]) if isinstance(example, torch.Tensor) else None
    runs.write_result(run_dir, stage, entry, checkpoint, record)


@rank_zero_only
def _write(cfg: DictConfig, run_dir: Path, entries: dict[str, dict[str, Any]]) -> None:
    """The report; its meta says what the runs of one experiment share (all but ``seed``), for ``report.summarize``."""
    given = cfg.teacher.get("checkpoint")
    settings = {stage: runs.setting(runs.stage_record(cfg, stage, teacher={} if stage == "teacher" and given else None))
                for stage in entries}
    meta = {
        "seed": cfg.seed,
        "method": cfg.distill.get("soft_loss"),
        "temperature": cfg.distill.temperature,
        "alpha": cfg.distill.alpha,
        "teacher": cfg.teacher.model.get("name", cfg.teacher.model.get("_target_")),
        "student": cfg.student.model.get("name", cfg.student.model.get("_target_")),
        "precision": cfg.trainer.get("precision"),
        "teacher_checkpoint": runs.portable(given, run_dir) if given else None,
        "stage_settings": {stage: runs.record_hash(setting)[:16] for stage, setting in settings.items()},
    }
    md = report.write_report(entries, run_dir, meta=meta, plot=bool(cfg.report.plot), settings=settings)
    report.print_table(entries)
    log.info("Report written to %s", md)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _quiet_lightning() -> None:
    """Drop two messages that Lightning repeats for every stage and that say nothing about the run."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())


def _entry_point(fn: Callable[[DictConfig], Any]) -> Callable[[], Any]:
    @hydra.main(version_base="1.3", config_path="pkg://lightning_kd.conf", config_name="config")
    def wrapped(cfg: DictConfig) -> None:
        _quiet_lightning()
        try:
            with runs.sigterm_stops_the_run():
                fn(cfg)
        except runs.Interrupted as stop:  # a scheduler's SIGTERM: checkpoints kept, nothing reported, a non-zero exit
            log.error("%s Resume by running the same command again with `hydra.run.dir=%s`.", stop, cfg.run_dir)
            sys.exit(runs.SIGTERM_EXIT_CODE)

    return wrapped


main = _entry_point(train)

if __name__ == "__main__":
    main()
