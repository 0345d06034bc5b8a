"""The stage plan of a ``lightning-kd`` run: which stages run, in which order, and what each one is given.

``teacher -> student_scratch -> student_distilled -> student_distilled_transfer``, with a
``soft_targets`` stage before the first distilled one when they read the teacher's outputs from a
store (``soft_targets.offline``). Each stage lives in ``<run_dir>/<stage>/``; a finished one is reused,
an interrupted one resumes (:mod:`lightning_kd.runs` keeps the books).

Hydra instantiates what the config describes; a stage only adds what it alone knows. The ``distill``
group is the module as a partial, called with the stage's teacher(s) and their checkpoints, its
student, its recipe's optimizer and learning-rate schedule, the augmentation, ``speed`` and the opened
store. The teacher and scratch stages call the same class without a teacher and without the distillation-only
arguments (``soft_loss``, ``alpha``, ``features``, ...), keeping ``hard_loss`` and a subclass's own
arguments, so a user's subclass (``distill._target_=...``) trains every stage.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import hydra
import lightning as L
import torch
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_kd import batch as batch_utils
from lightning_kd import export, report, runs
from lightning_kd.callbacks import canonical_path
from lightning_kd.checkpoint import fingerprint
from lightning_kd.io import atomic_write_json, read_json
from lightning_kd.module import DistillationModule
from lightning_kd.sharding import is_sharded, save_full_state_dict
from lightning_kd.soft_targets.batches import SoftTargetDataModule
from lightning_kd.soft_targets.build import build_soft_targets
from lightning_kd.soft_targets.store import SoftTargetStore, prepare_store_path
from lightning_kd.teachers import load_teacher

log = logging.getLogger("lightning_kd")

STUDENT_STAGES = ("student_scratch", "student_distilled", "student_distilled_transfer")
DISTILLED_STAGES = ("student_distilled", "student_distilled_transfer")
# Always distilled from the store at `soft_targets.path` (the others only with `soft_targets.offline=true`), so
# that one run compares online and offline distillation.
STORED_STAGES = ("student_distilled_stored",)
# Distilled on the student's own continuations part of the time (GKD): the module gets `on_policy.generation`
# and `on_policy.soft_loss` (CausalLMDistillation).
ON_POLICY_STAGES = ("student_on_policy",)
MODEL_STAGES = ("teacher", *STUDENT_STAGES)  # the report's rows
# Ships a trained stage's student (`export.stage`, or `export.checkpoint`): its own table in the report.
EXPORT_STAGE = "export"
STAGES = ("teacher", "soft_targets", *STUDENT_STAGES, *STORED_STAGES, *ON_POLICY_STAGES, EXPORT_STAGE)


# ------------------------------------------------------------------------------ the plan


def plan(cfg: DictConfig) -> list[str]:
    """The task's stages, checked; with ``soft_targets.offline``, a ``soft_targets`` stage before the first
    distilled one unless ``soft_targets.path`` already holds a finished store.

    Raises:
        ValueError: for an unknown stage, a non-boolean ``soft_targets.offline``, or a task that distils from
            a saved teacher without ``teacher.checkpoint`` (nor a finished store to distil from).
    """
    stages = list(cfg.task.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"Unknown stage(s) {unknown} in `task.stages`. Expected any of: {', '.join(STAGES)}.")
    offline = cfg.soft_targets.offline
    if not isinstance(offline, bool):
        raise ValueError(f"Expected `soft_targets.offline` to be true or false, but got {offline!r}.")
    distilled = [s for s in stages if s in DISTILLED_STAGES or s in STORED_STAGES or s in ON_POLICY_STAGES]
    readers = [s for s in stages if _reads_store(cfg, s)]
    offline = bool(readers)
    store_exists = offline and SoftTargetStore.is_complete(cfg.soft_targets.path)
    if offline and "soft_targets" not in stages and not store_exists:
        stages.insert(stages.index(readers[0]), "soft_targets")  # build the store the distilled stages read
    has_checkpoint = bool(cfg.teacher.get("checkpoint"))
    requires_checkpoint = bool(cfg.task.get("requires_teacher_checkpoint"))
    if "teacher" in stages and not has_checkpoint and not requires_checkpoint:
        return stages  # the teacher is trained here first
    needs_teacher = "soft_targets" in stages or ((bool(distilled) or requires_checkpoint) and not store_exists)
    if needs_teacher and not has_checkpoint:
        raise ValueError(
            f"`task={cfg.task.name}` needs a saved teacher: set `teacher.checkpoint=PATH` (e.g. the "
            "`teacher/checkpoints/last.ckpt` of a `lightning-kd task=teacher` run), distil from an existing store "
            "(`soft_targets.offline=true soft_targets.path=DIR`), or use `task=pipeline`."
        )
    if not has_checkpoint and "teacher" in stages:
        log.warning("No `teacher.checkpoint`: distilling from the store at %s alone; the report has no teacher row.",
                    cfg.soft_targets.path)
        stages.remove("teacher")
    return stages


def run(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Run the planned stages in ``cfg.run_dir`` and return their report entries (the ``soft_targets`` stage has none)."""
    stages = plan(cfg)
    runs.check_lengths(cfg, stages)
    run_dir = Path(cfg.run_dir)
    entries: dict[str, dict[str, Any]] = {}
    teacher_checkpoint = cfg.teacher.get("checkpoint")
    # Refuse a stage trained under other settings before anything trains (not after the stages before it).
    finished_teacher = None if teacher_checkpoint else runs.read_result(run_dir, "teacher")
    known_teacher = finished_teacher["checkpoint"] if finished_teacher else teacher_checkpoint
    for stage in stages:
        if stage not in ("soft_targets", EXPORT_STAGE):
            runs.check_stage(run_dir / stage, runs.record(cfg, stage, known_teacher))
    store: SoftTargetStore | None = None  # opened (hashed, checked against the teacher) once for all stages
    for stage in stages:
        if stage == "soft_targets":
            store = build_store(cfg, run_dir, teacher_checkpoint)
            continue
        if stage == EXPORT_STAGE:
            run_export(cfg, run_dir)
            continue
        if store is None and _reads_store(cfg, stage) and not (run_dir / stage / runs.RESULT).is_file():
            store = open_store(cfg, teacher_checkpoint)  # builds a teacher to check it: before the stage seeds
        entry, checkpoint = run_stage(cfg, stage, run_dir, teacher_checkpoint, store=store)
        if stage == "teacher":
            teacher_checkpoint = checkpoint
        entries[stage] = entry
    return entries


def _reads_store(cfg: DictConfig, stage: str) -> bool:
    return stage in STORED_STAGES or (stage in DISTILLED_STAGES and cfg.soft_targets.offline is True)


# ------------------------------------------------------------------------------ the soft-target store


def build_store(cfg: DictConfig, run_dir: Path, teacher_checkpoint: str | None) -> SoftTargetStore:
    """The ``soft_targets`` stage: write the teacher's outputs on the training data (transfer set included)
    to ``soft_targets.path``.

    A finished store there is reused; an interrupted store of ours is removed file by file and rebuilt;
    anything else at ``soft_targets.path`` is refused and left untouched.
    """
    path = Path(cfg.soft_targets.path)
    if SoftTargetStore.is_complete(path):
        log.info("Soft-target store %s already built: reusing it.", path)
        return open_store(cfg, teacher_checkpoint)
    # Every input is validated before anything at `soft_targets.path` is touched.
    if teacher_checkpoint is None:
        raise ValueError("The soft_targets stage needs a teacher: set `teacher.checkpoint=PATH` or run the `teacher` stage first.")
    if not Path(teacher_checkpoint).expanduser().is_file():
        raise FileNotFoundError(
            f"Teacher checkpoint not found: {str(teacher_checkpoint)!r} (`teacher.checkpoint`). Nothing was built or removed."
        )
    hint = (f"[lightning-kd: the store is `soft_targets.path={path}`, built with `soft_targets.dtype`, `.top_k`, "
            "`.epochs` and `.batch_size`; `soft_targets.offline=false` distils online]")
    with _config_hint(hint):  # the library's messages name build_soft_targets' arguments; a CLI user sets config keys
        # Only an interrupted store of our own format, holding only our files, is removed (file by file).
        prepare_store_path(path, remove_incomplete=rank_zero_only.rank == 0)
        L.seed_everything(cfg.seed, workers=True)
        module = build_module(cfg, "student_distilled", teacher_checkpoint, offline=False)  # its hooks, dtype, augmentation
        trainer = build_trainer(cfg, "soft_targets", run_dir / "soft_targets", max_epochs=0)
        started = time.perf_counter()
        settings = cfg.soft_targets
        store = build_soft_targets(module, hydra.utils.instantiate(cfg.data), path, dtype=settings.dtype, top_k=settings.top_k,
                                   sampled=settings.get("sampled"),
                                   epochs=int(settings.epochs), batch_size=settings.batch_size, trainer=trainer,
                                   teacher_checkpoint=str(teacher_checkpoint))
    log.info("Soft-target store %s built in %.1f s: %s", path, time.perf_counter() - started, store)
    return store


@contextlib.contextmanager
def _config_hint(hint: str) -> Iterator[None]:
    """Add ``hint`` (the config keys behind the Python arguments) to a library error, same type, same cause."""
    try:
        yield
    except OSError as err:
        if err.errno is not None and err.strerror:  # e.g. ENOSPC: keep the errno
            raise type(err)(err.errno, f"{err.strerror} {hint}") from err
        raise type(err)(f"{err} {hint}") from err
    except (ValueError, TypeError, RuntimeError) as err:
        try:
            with_hint = type(err)(f"{err} {hint}")
        except TypeError:  # an exception type with its own constructor: keep it as it is
            raise err from None
        raise with_hint from err


def open_store(cfg: DictConfig, teacher_checkpoint: str | None) -> SoftTargetStore:
    """Open ``soft_targets.path``, and check it against the teacher when there is a checkpoint."""
    settings = cfg.soft_targets
    store = SoftTargetStore(settings.path, verify=bool(settings.verify))
    # A store is built once; settings that would build another one are refused, not silently ignored.
    differ = {key: (getattr(store, key), settings[key]) for key in ("dtype", "top_k", "epochs") if getattr(store, key) != settings[key]}
    sampled = None if store.sampled is None else store.sampled.k
    if sampled != settings.get("sampled"):
        differ["sampled"] = (sampled, settings.get("sampled"))
    if differ:
        listed = ", ".join(f"`soft_targets.{key}`: stored {old!r}, configured {new!r}" for key, (old, new) in differ.items())
        raise ValueError(
            f"The soft-target store at {settings.path} was built with other settings than this run's ({listed}). "
            "Set them as stored to use it, or choose another `soft_targets.path` to build a new store."
        )
    if teacher_checkpoint is not None:
        # Loaded only to fingerprint it, then dropped: training from the store keeps no teacher in memory.
        given = teachers(cfg, teacher_checkpoint)
        teacher = load_teacher(given["teacher"], given["teacher_checkpoint"], weights=given["teacher_weights"],
                               dtype=hydra.utils.instantiate(cfg.speed, _convert_="all").teacher_dtype)
        store.check_teacher(fingerprint(teacher))
        del teacher
    return store


# ------------------------------------------------------------------------------ what a stage is given


def teachers(cfg: DictConfig, checkpoint: str | Path) -> dict[str, Any]:
    """The module's teacher arguments: ``teacher.model`` (and one model per ``teacher.extra`` entry), their
    checkpoint path(s) and ``teacher.weights``. Several teachers are lists, which the module (through
    :func:`~lightning_kd.teachers.load_teacher`) turns into one ensemble.

    Raises:
        ValueError: for an ``extra`` entry that is neither a path nor ``{model, checkpoint}``, ``teacher.weights``
            that do not give one weight per teacher, or a ``speed.teacher_dtype`` per teacher for one teacher.
    """
    models, paths = [hydra.utils.instantiate(cfg.teacher.model, _convert_="all")], [str(checkpoint)]
    extra = cfg.teacher.get("extra") or []
    for i, entry in enumerate(extra):
        if isinstance(entry, str):
            model_cfg, path = cfg.teacher.model, entry
        elif isinstance(entry, DictConfig) and entry.get("checkpoint"):
            model_cfg, path = entry.get("model") or cfg.teacher.model, entry.checkpoint
        else:
            raise ValueError(f"Expected `teacher.extra[{i}]` to be a checkpoint path or {{model: ..., checkpoint: PATH}}, but got {entry!r}.")
        models.append(hydra.utils.instantiate(model_cfg, _convert_="all"))
        paths.append(str(path))
    weights = cfg.teacher.get("weights")
    if weights is not None and (len(models) == 1 or len(weights) != len(models)):
        raise ValueError(
            f"Expected `teacher.weights` to hold one weight per teacher (`teacher.model`, then each of `teacher.extra`: "
            f"{len(models)}), but got {len(weights)}. Set `teacher.weights=null` for their mean (with one teacher, always)."
        )
    several = len(models) > 1
    if not several and isinstance(cfg.speed.get("teacher_dtype"), DictConfig):
        raise ValueError(
            f"Expected `speed.teacher_dtype` to be a dtype name for one teacher, but got one per teacher "
            f"({OmegaConf.to_container(cfg.speed.teacher_dtype)}): add the others with `teacher.extra=[...]`, or give one name."
        )
    return {"teacher": models if several else models[0], "teacher_checkpoint": paths if several else paths[0],
            "teacher_weights": None if weights is None else list(weights)}


def distill_factory(cfg: DictConfig) -> functools.partial:
    """``cfg.distill`` instantiated: a partial of DistillationModule (or a subclass), fresh loss objects included.

    Instantiated once per stage: a stage must not inherit another's learned temperature or FitNet adapters.
    """
    factory = hydra.utils.instantiate(cfg.distill, _convert_="all")
    cls = getattr(factory, "func", None)
    if not (isinstance(factory, functools.partial) and isinstance(cls, type) and issubclass(cls, DistillationModule)):
        raise TypeError(
            "Expected `distill` to be a partial of DistillationModule or a subclass of it (`_target_: ...`, "
            f"`_partial_: true`), but got {factory!r}."
        )
    return factory


def build_module(cfg: DictConfig, stage: str, teacher_checkpoint: str | None, *, store: SoftTargetStore | None = None,
                 offline: bool | None = None) -> DistillationModule:
    """The stage's module. A distilled stage reads its teacher's outputs from ``store`` when ``offline``
    (default ``soft_targets.offline``), else it gets the teacher(s) and their checkpoints."""
    given = {"augmentation": _augmentation(cfg), "augmentation_seed": cfg.seed, "speed": hydra.utils.instantiate(cfg.speed, _convert_="all")}
    if stage == "teacher":
        model = hydra.utils.instantiate(cfg.teacher.model, _convert_="all")
        if teacher_checkpoint is not None:  # evaluate a given teacher: it is the model under test
            model = load_teacher(model, teacher_checkpoint)
        factory = distill_factory(cfg)
        return factory.func(None, model, **{**_without_teacher(factory), **given, **_recipe(cfg.teacher)})
    student = hydra.utils.instantiate(cfg.student.model, _convert_="all")  # before the teachers: the seed gives its init
    if stage == "student_scratch":
        factory = distill_factory(cfg)
        return factory.func(None, student, **{**_without_teacher(factory), **given, **_recipe(cfg.student)})
    if _reads_store(cfg, stage) if offline is None else offline:
        if store is None:
            raise ValueError(f"Stage {stage} distils from stored soft targets but no store was opened (`soft_targets.path`).")
        return distill_factory(cfg)(None, student, soft_targets=store, **given, **_recipe(cfg.student))
    if teacher_checkpoint is None:
        raise ValueError(f"Stage {stage} needs a teacher: set `teacher.checkpoint=PATH` or run the `teacher` stage first.")
    teacher = teachers(cfg, teacher_checkpoint)
    if stage in ON_POLICY_STAGES:
        given.update(_on_policy(cfg))
    return distill_factory(cfg)(teacher["teacher"], student, teacher_checkpoint=teacher["teacher_checkpoint"],
                                teacher_weights=teacher["teacher_weights"], **given, **_recipe(cfg.student))


def _on_policy(cfg: DictConfig) -> dict[str, Any]:
    """The on-policy stage's ``on_policy`` (an OnPolicy) and, if the config gives one, its own soft loss."""
    settings = cfg.get("on_policy")
    if not settings or not settings.get("generation"):
        raise ValueError("Stage student_on_policy needs `on_policy.generation` (a lightning_kd.OnPolicy), e.g. from experiment=lm.")
    given = {"on_policy": hydra.utils.instantiate(settings.generation, _convert_="all")}
    if settings.get("soft_loss"):
        given["soft_loss"] = hydra.utils.instantiate(settings.soft_loss, _convert_="all")
    return given


# What only a distilled stage uses: the teacher and scratch stages train on the hard loss alone.
_DISTILLATION_ONLY = frozenset({"soft_loss", "alpha", "soft_weight", "features", "soft_targets", "teacher_checkpoint",
                                "teacher_weights", "keep_teacher_in_checkpoint", "teacher_sharding"})


def _without_teacher(factory: functools.partial) -> dict[str, Any]:
    """The ``distill`` arguments a stage without a teacher keeps: ``hard_loss`` and a subclass's own ones."""
    return {key: value for key, value in factory.keywords.items() if key not in _DISTILLATION_ONLY}


def annealed(cfg: DictConfig) -> dict[str, str]:
    """``{config key: schedule}`` for what ``cfg.schedule`` anneals (``{"distill.soft_loss.temperature": "Linear(...)"}``)."""
    if not cfg.get("schedule"):
        return {}
    callback = hydra.utils.instantiate(cfg.schedule, _convert_="all")
    return {"distill." + canonical_path(path, DistillationModule.annealing_aliases): repr(schedule)
            for path, schedule in callback.schedules.items()}


def _augmentation(cfg: DictConfig) -> Any:
    augment = cfg.get("augment")
    return hydra.utils.instantiate(augment, _convert_="all") if augment and augment.get("_target_") else None


def _recipe(recipe: DictConfig) -> dict[str, Any]:
    optimizer = hydra.utils.instantiate(recipe.optimizer) if recipe.get("optimizer") else None
    scheduler = recipe.get("lr_scheduler")
    if isinstance(scheduler, DictConfig):
        scheduler = hydra.utils.instantiate(scheduler, _convert_="all")
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
    """The stage's Trainer: ``trainer`` with the stage's epochs, ``callbacks`` (checkpoints in the stage folder),
    the ``schedule`` for distilled stages, the stage's logger and an atomic checkpoint writer."""
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    for callback in callbacks:
        if isinstance(callback, L.pytorch.callbacks.ModelCheckpoint):
            callback.dirpath = str(stage_dir / "checkpoints")
    if (stage in DISTILLED_STAGES or stage in STORED_STAGES or stage in ON_POLICY_STAGES) and cfg.get("schedule"):
        callbacks.append(hydra.utils.instantiate(cfg.schedule, _convert_="all"))
    logger: Any = False
    if cfg.get("logger"):
        _keep_earlier_metrics(stage_dir)
        logger = build_logger(cfg.logger, stage)
    # The callbacks group chooses the progress bar: without one (callbacks=quiet) Lightning must not add its own.
    no_bar = {} if any(isinstance(c, L.pytorch.callbacks.ProgressBar) for c in callbacks) else {"enable_progress_bar": False}
    plugins = [hydra.utils.instantiate(p) if isinstance(p, DictConfig) else p for p in (cfg.trainer.get("plugins") or [])]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(runs.AtomicCheckpointIO())  # a crash while saving keeps the previous last.ckpt whole
    # default_root_dir: where Lightning's SLURM requeue saves its hpc_ckpt_N.ckpt, one folder per stage.
    trainer = hydra.utils.instantiate(cfg.trainer, max_epochs=max_epochs, callbacks=callbacks, logger=logger, plugins=plugins,
                                      default_root_dir=str(stage_dir), **no_bar)
    if isinstance(trainer.strategy, ModelParallelStrategy):
        # A sharded save bypasses the checkpoint writer and rewrites last.ckpt's shard files in place: a crash halfway
        # would leave shards of two epochs under one index. Lightning's `save_last="link"` makes last.ckpt a link to the
        # newest epoch's folder instead, which is written under a new name and replaces nothing.
        for callback in trainer.checkpoint_callbacks:
            if callback.save_last is True and callback.save_top_k != 0:
                callback.save_last = "link"
    return trainer


def build_logger(logger: DictConfig, stage: str) -> Any:
    """The ``logger`` config instantiated for one stage, named after it: ``name`` for Lightning's CSV and TensorBoard
    loggers (their folder, ``<run_dir>/<stage>/``) and most others, ``run_name`` for the MLflow logger (the run)."""
    parameters = inspect.signature(hydra.utils.get_class(logger._target_)).parameters
    key = next((key for key in ("name", "run_name") if key in parameters), None)
    return hydra.utils.instantiate(logger, **({key: stage} if key else {}))


@rank_zero_only
def _keep_earlier_metrics(stage_dir: Path) -> None:
    """Lightning's CSV logger deletes a resumed stage's ``metrics.csv``: keep it as ``metrics.<k>.csv`` first."""
    metrics = stage_dir / "metrics.csv"
    if metrics.is_file():
        k = next(k for k in range(1, 10_000) if not (stage_dir / f"metrics.{k}.csv").exists())
        metrics.rename(stage_dir / f"metrics.{k}.csv")
        log.info("Kept the metrics logged before the resume as %s.", stage_dir / f"metrics.{k}.csv")


# ------------------------------------------------------------------------------ one stage


def run_stage(
    cfg: DictConfig, stage: str, run_dir: Path, teacher_checkpoint: str | None, *, store: SoftTargetStore | None = None
) -> tuple[dict[str, Any], str | None]:
    """Train (or, for a given teacher checkpoint, only evaluate) one stage; finished stages are reused.

    A distilled stage with ``soft_targets.offline`` reads ``store`` (opened by :func:`run`). A stage
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
        val_acc = _float(trainer.callback_metrics.get("val/acc"))  # the last epoch's, before test adds its own metrics
        if not trainer.received_sigterm:
            metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    except SIGTERMException:
        pass
    if trainer.received_sigterm:
        last = stage_dir / "checkpoints" / "last.ckpt"
        where = (f"the re-run resumes it from {str(last)!r}, its end-of-epoch checkpoint (the steps after it are repeated)"
                 if last.exists() else "it had no checkpoint yet, so the re-run starts it over")
        raise runs.Interrupted(f"Stage {stage} stopped by SIGTERM at epoch {trainer.current_epoch}, step {trainer.global_step}: {where}.")
    # The model's whole weights, on every rank: a sharded model is gathered (a collective), rank 0 writes them.
    sharded = is_sharded(module.student)
    weights = stage_dir / "model.pt"
    save_full_state_dict(module.student, weights, rank=trainer.global_rank)
    last = stage_dir / "checkpoints" / "last.ckpt"
    if sharded:
        trainer.strategy.barrier()  # the next stage may read its teacher from this file on every rank
    # A sharded stage hands on its gathered weights: its last.ckpt is a folder of shards, for resuming only.
    checkpoint = str(teacher_checkpoint) if given_teacher else str(weights if sharded else last)
    entry = {
        "test_acc": _float(metrics.get("test/acc")),
        "val_acc": val_acc,  # what a sweep may tune on (`objective=student_distilled.val_acc`), not the test set
        "params": report.count_parameters(module.student),
        "weights_bytes": None,
        # The Lightning checkpoint (weights + optimizer state, no teacher) of a trained stage; a sharded one is a folder.
        "checkpoint_bytes": _size(Path(checkpoint if given_teacher or not sharded else last)),
        "latency_ms": None,
        "epochs": int(epochs),
        "agreement_with_teacher": _float(metrics.get("test/agreement")),
        "teacher_test_acc": _float(metrics.get("test/teacher_acc")),
        # language models: per valid token of the test set
        "test_bits_per_token": _float(metrics.get("test/bits_per_token")),
        "teacher_test_bits_per_token": _float(metrics.get("test/teacher_bits_per_token")),
        "checkpoint": runs.portable(checkpoint, run_dir),  # relative inside the run directory: it may move
    }
    _finish_stage(cfg, run_dir, stage, module, datamodule, entry, checkpoint, record)
    return entry, checkpoint


@rank_zero_only
def _finish_stage(cfg: DictConfig, run_dir: Path, stage: str, module: DistillationModule, datamodule: Any, entry: dict[str, Any],
                  checkpoint: str, record: dict[str, Any] | None) -> None:
    """Time the model on the CPU and mark the stage done (rank 0 only; its weights are in ``model.pt`` by now)."""
    weights = run_dir / stage / "model.pt"
    model: nn.Module = _unsharded(cfg, stage, weights) if is_sharded(module.student) else module.student
    entry["weights_bytes"] = weights.stat().st_size
    batch = next(iter(datamodule.test_dataloader()))
    example, _ = module.unpack_batch(batch)
    entry["latency_ms"] = report.cpu_latency_ms(model, example, repeats=int(cfg.report.latency_batches))
    entry["latency_batch_size"] = batch_utils.batch_size(example) if isinstance(example, (torch.Tensor, dict)) else None
    if entry.get("test_bits_per_token") is not None:  # a language model: its throughput
        tokens = example.get("attention_mask", example.get("input_ids")) if isinstance(example, dict) else example
        if isinstance(tokens, torch.Tensor):  # real tokens per second of the forward timed above (padding not counted)
            count = int(tokens.sum()) if isinstance(example, dict) and "attention_mask" in example else tokens.numel()
            entry["tokens_per_s"] = count / (entry["latency_ms"] / 1e3)
    runs.write_result(run_dir, stage, entry, checkpoint, record)


# ------------------------------------------------------------------------------ the export stage


@rank_zero_only
def run_export(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The ``export`` stage: :func:`~lightning_kd.export.export_student` of ``export.checkpoint`` (or of the finished
    ``export.stage`` of this run) into ``<run_dir>/export/``, checked on the test set, with PyTorch's and onnxruntime's
    CPU latency per test batch. An export of the same checkpoint under the same settings is reused.

    Raises:
        ValueError: without a checkpoint to export, or for an ``export.stage`` that is no model stage.
        FileExistsError: over another export's files without ``export.overwrite=true``.
    """
    settings = cfg.export
    checkpoint = _export_checkpoint(cfg, run_dir)
    out_dir = run_dir / EXPORT_STAGE
    wanted = {"source_sha256": runs.file_digest(checkpoint), "formats": list(settings.formats), "atol": float(settings.atol)}
    done = exported(run_dir)
    if (done is not None and {key: done.get(key) for key in wanted} == wanted
            and all(Path(runs.located(file["path"], run_dir)).is_file() for file in done["files"].values())):
        log.info("Stage export already done in %s for this checkpoint: reusing it.", out_dir)
        return done
    hint = ("[lightning-kd: `export.checkpoint`, `export.stage`, `export.formats`, `export.atol`, `export.overwrite=true`; "
            "without a run's record beside the checkpoint, the architecture is the `student` group's]")
    with _config_hint(hint):
        architecture = export.recorded_architecture(checkpoint)
        log.info("Export: the architecture of %s is %s.", checkpoint, "the one its run recorded" if architecture else "the `student` group's")
        architecture = architecture or OmegaConf.to_container(cfg.student.model, resolve=True)
        student = export.load_student(checkpoint, hydra.utils.instantiate(architecture, _convert_="all"))
        datamodule = build_datamodule(cfg, EXPORT_STAGE)
        datamodule.prepare_data()
        datamodule.setup("test")
        batches = (batch_utils.unpack(batch)[0] for batch in datamodule.test_dataloader())  # one test batch in memory at a time
        example = next(batches, None)  # traces the graph; the rest of the test set is checked
        if example is None:
            raise ValueError("The test set of `data` is empty: the export has nothing to be checked on.")
        files = export.export_student(checkpoint, out_dir, example_input=example, formats=wanted["formats"], student=student,
                                      check_inputs=batches, atol=wanted["atol"], overwrite=settings.overwrite)
    manifest = read_json(files["manifest"], what="export manifest")
    checked = manifest.get("onnx") or {}
    repeats = int(cfg.report.latency_batches)
    latency = {"pytorch": report.cpu_latency_ms(student, example, repeats=repeats)}
    if "onnx" in files:
        session = export.onnx_session(files["onnx"])
        feed = export.onnx_feed(session, example)
        latency["onnxruntime"] = report.mean_ms(lambda: session.run(None, feed), repeats=repeats)
    entry = {
        **wanted,
        "stage": None if settings.get("checkpoint") else settings.stage,
        "checkpoint": runs.portable(checkpoint, run_dir),
        "params": manifest["parameters"],
        "files": {fmt: {"path": runs.portable(files[fmt], run_dir), "bytes": files[fmt].stat().st_size} for fmt in wanted["formats"]},
        "max_abs_diff": checked.get("max_abs_diff"),
        # the checks ran on the test set and on its first batch doubled (another batch size than the traced one)
        "test_samples": checked["checked_samples"] - 2 * batch_utils.batch_size(example) if checked else None,
        "latency_ms": latency,
        "latency_batch_size": batch_utils.batch_size(example),
        "latency_repeats": repeats,
        "threads": torch.get_num_threads(),
    }
    atomic_write_json(out_dir / runs.RESULT, entry)
    shown = ", ".join(f"{runtime} {ms:.3f} ms" for runtime, ms in latency.items())
    log.info("Exported %s to %s (max abs diff vs PyTorch %s; CPU per batch of %d: %s).", checkpoint, out_dir,
             entry["max_abs_diff"], entry["latency_batch_size"], shown)
    return entry


def exported(run_dir: Path) -> dict[str, Any] | None:
    """The export stage's entry of ``run_dir`` (``export/result.json``), or None."""
    path = run_dir / EXPORT_STAGE / runs.RESULT
    return read_json(path, what="export result") if path.is_file() else None


def _export_checkpoint(cfg: DictConfig, run_dir: Path) -> Path:
    given = cfg.export.get("checkpoint")
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint to export not found: {str(given)!r} (`export.checkpoint`).")
        return path
    stage = cfg.export.stage
    stages = (*MODEL_STAGES, *STORED_STAGES, *ON_POLICY_STAGES)
    if stage not in stages:
        raise ValueError(f"Expected `export.stage` to be one of {', '.join(stages)}, but got {stage!r}.")
    result = runs.read_result(run_dir, stage)
    if result is None:
        raise ValueError(
            f"Nothing to export: stage {stage} has not finished in {str(run_dir)!r}. Set `export.checkpoint=PATH` (a stage's "
            "`checkpoints/last.ckpt` or `model.pt`), or run `task=export` in the directory of a finished run "
            "(`hydra.run.dir=DIR`; `export.stage=...` chooses its stage)."
        )
    return Path(result["checkpoint"])


def _unsharded(cfg: DictConfig, stage: str, weights: Path) -> nn.Module:
    """A fresh copy of the stage's model with the gathered weights: a sharded one runs only on all ranks together."""
    model = hydra.utils.instantiate(cfg.teacher.model if stage == "teacher" else cfg.student.model, _convert_="all")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def _size(path: Path) -> int | None:
    """Bytes of a checkpoint file, or of all the files of a sharded checkpoint folder."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.is_file() else None


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
