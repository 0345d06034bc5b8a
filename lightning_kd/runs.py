"""A run directory's bookkeeping: which stages finished and under which settings, where an interrupted
stage resumes, and how a run stopped by SIGTERM ends.

Each stage lives in ``<run_dir>/<stage>/``:

- ``stage_config.json``, written when the stage starts: what determines its result (:func:`stage_record`);
- ``checkpoints/``: Lightning's ``last.ckpt`` and ``epoch=N-step=M.ckpt`` (and, after a SLURM requeue
  signal, Lightning's ``hpc_ckpt_N.ckpt`` beside the folder);
- ``result.json``, written when the stage has finished: its report entry, its checkpoint (relative to the
  run directory, so that the directory can move) and its ``stage_config``.

A re-run in the same directory reuses a finished stage and resumes an interrupted one, but only under
the settings it was trained with: another configuration is refused (:class:`StageConfigError`), never
reported under the new settings. Which settings matter to which stage (:func:`stage_record`) and which
are refused outright (:func:`check_lengths`) are read from the composed config (OmegaConf; Hydra stays
in ``cli.py``); the rest works on plain dicts and paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import torch
from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_kd.checkpoint import CheckpointError, load_checkpoint
from lightning_kd.soft_targets.store import SoftTargetStore
from lightning_kd.io import atomic_write, atomic_write_json, file_sha256, read_json

log = logging.getLogger("lightning_kd")

RESULT, RECORD = "result.json", "stage_config.json"
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # 143: what a shell reports for a process ended by SIGTERM

# Settings that change where a run writes or what it prints, not what it computes.
_TRAINER_PRESENTATION = frozenset({"max_epochs", "log_every_n_steps", "enable_model_summary", "enable_progress_bar",
                                   "default_root_dir", "num_sanity_val_steps", "logger", "callbacks", "profiler"})
_DATA_LOCATION = frozenset({"data_dir", "num_workers"})
_PASSIVE_CALLBACKS = frozenset({"ModelCheckpoint", "RichProgressBar", "TQDMProgressBar", "LearningRateMonitor",
                                "ModelSummary", "RichModelSummary", "DeviceStatsMonitor"})
EPOCHS = {"teacher": "teacher.epochs", "student_scratch": "student.epochs", "student_distilled": "student.epochs",
          "student_distilled_transfer": "student.transfer_epochs", "student_distilled_stored": "student.epochs",
          "student_on_policy": "student.epochs"}
DISTILLED = ("student_distilled", "student_distilled_transfer", "student_distilled_stored", "student_on_policy")
STORED = ("student_distilled_stored",)  # always read the store (the others with `soft_targets.offline=true`)
# Lightning's run-length limits and the values that mean "no limit": each stage sets its own length.
TRAINER_LIMITS = {"max_epochs": (None,), "min_epochs": (None, 0), "max_steps": (None, -1), "min_steps": (None, 0), "max_time": (None,)}


class StageConfigError(RuntimeError):
    """A stage in the run directory was trained under other settings than the ones given now."""


class Interrupted(Exception):
    """The run was stopped by SIGTERM; what is on disk resumes with the same command in the same directory."""


# ------------------------------------------------------------------------------ what determines a stage


def check_lengths(cfg: DictConfig, stages: list[str]) -> None:
    """Each stage trains for its own epochs: refuse Lightning's trainer-wide limits and epochs that are not >= 1.

    A ``trainer.max_epochs`` would be overridden by every stage (ignored), ``max_steps``/``max_time``
    would end stages early while the report says they trained their epochs, ``min_*`` cannot outlast a
    stage's ``max_epochs``, and Lightning reads ``max_epochs=-1`` as "train forever".

    Raises:
        ValueError: naming the setting, the allowed values and the settings to use instead.
    """
    for key, unset in TRAINER_LIMITS.items():
        value = cfg.trainer.get(key)
        if value not in unset:
            raise ValueError(
                f"Expected `trainer.{key}` to be null, but got {value!r}: each stage trains for its own number of epochs, "
                "`teacher.epochs`, `student.epochs` (scratch and same-data distillation) and `student.transfer_epochs` "
                "(set `student.epochs=...`); `+trainer.limit_train_batches=N` shortens every epoch."
            )
    for stage in stages:
        if stage not in EPOCHS or (stage == "teacher" and cfg.teacher.get("checkpoint")):
            continue  # the soft_targets stage makes one pass; a given teacher is only evaluated
        value = OmegaConf.select(cfg, EPOCHS[stage])
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"Expected `{EPOCHS[stage]}` to be an integer >= 1 (the epochs stage {stage} trains), but got {value!r} "
                f"(set `{EPOCHS[stage]}=...`). To evaluate a saved teacher without training it, set `teacher.checkpoint=PATH`."
            )


def record(cfg: DictConfig, stage: str, teacher_checkpoint: str | None) -> dict[str, Any] | None:
    """:func:`stage_record` with the stage's teacher identity; ``None`` while the teacher is not known yet."""
    teacher: dict[str, Any] | None = None
    if stage == "teacher" and cfg.teacher.get("checkpoint"):
        teacher = {"checkpoint_sha256": _digests(cfg, cfg.teacher.checkpoint)}
    elif stage in STORED or (stage in DISTILLED and cfg.soft_targets.offline):
        if not SoftTargetStore.is_complete(cfg.soft_targets.path):
            return None  # built by this run (and checked against the teacher when opened)
        spec = read_json(Path(cfg.soft_targets.path) / "manifest.json", what="store manifest")
        teacher = {"store": {
            "teacher": (spec.get("teacher") or {}).get("fingerprint"),
            **{k: spec.get(k) for k in ("dtype", "top_k", "epochs", "augmentation", "augmentation_seed", "sampled")},
            "parts": {part: info.get("identity") for part, info in (spec.get("parts") or {}).items()},
        }}
    elif stage in DISTILLED:
        if teacher_checkpoint is None or not Path(teacher_checkpoint).expanduser().is_file():
            return None  # the teacher stage has not run yet (a missing given file: loading it says so)
        teacher = {"checkpoint_sha256": _digests(cfg, teacher_checkpoint)}
    return stage_record(cfg, stage, teacher=teacher)


def _digests(cfg: DictConfig, teacher_checkpoint: str) -> list[str | None]:
    """SHA-256 of the teacher checkpoint and of each ``teacher.extra`` one (``None`` for a missing file)."""
    extra = [e if isinstance(e, str) else e.get("checkpoint") for e in (cfg.teacher.get("extra") or [])]
    return [file_digest(p) if p and Path(p).expanduser().is_file() else None for p in (teacher_checkpoint, *extra)]


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def stage_record(cfg: DictConfig, stage: str, *, teacher: dict[str, Any] | None) -> dict[str, Any]:
    """What determines ``stage``'s result: the resolved settings it is built from, and its teacher's identity.

    In: the ``distill`` partial as it resolves (the module class and every loss object's settings; the
    teacher and scratch stages use its class and ``hard_loss`` only), the ``speed`` settings the stage
    uses, ``soft_targets.offline`` and the ``schedule`` of distilled stages, the data, the recipe, the
    trainer and the callbacks that act on training. Left out: where things are written (``run_dir``,
    logger, report, ``soft_targets.path``, ``data.data_dir``), how the run is shown, ``num_workers``,
    and the epochs of the other student stage. A distilled stage's teacher enters through ``teacher``:
    the SHA-256 of its checkpoint file(s) or the store's identity.
    """
    transfer = stage == "student_distilled_transfer"
    data = {k: v for k, v in _plain(cfg.data).items() if k not in _DATA_LOCATION and (transfer or not k.startswith("transfer_"))}
    callbacks = {name: c for name, c in (_plain(cfg.get("callbacks")) or {}).items()
                 if c and str(c.get("_target_", "")).rsplit(".", 1)[-1] not in _PASSIVE_CALLBACKS}
    speed = _plain(cfg.get("speed")) or {}
    config: dict[str, Any] = {
        "seed": cfg.seed,
        "data": data,
        "augment": _plain(cfg.get("augment")),
        "trainer": {k: v for k, v in _plain(cfg.trainer).items() if k not in _TRAINER_PRESENTATION},
        "callbacks": callbacks,
        "speed": {k: speed.get(k) for k in ("compile_student", "channels_last")},
    }
    distill = _plain(cfg.distill)
    if stage == "teacher":
        unused = ("checkpoint", "extra", "weights") + (("epochs", "optimizer", "lr_scheduler") if teacher is not None else ())
        config["teacher"] = {k: v for k, v in _plain(cfg.teacher).items() if k not in unused}
    else:
        config["student"] = {k: v for k, v in _plain(cfg.student).items() if k != ("epochs" if transfer else "transfer_epochs")}
    if stage in ("teacher", "student_scratch"):  # no teacher to distil from: the module class and its hard loss
        config["distill"] = {k: distill.get(k) for k in ("_target_", "hard_loss")}
    else:
        config["distill"] = distill
        config["schedule"] = _plain(cfg.get("schedule"))
        if stage == "student_on_policy":
            config["on_policy"] = _plain(cfg.get("on_policy"))
        offline = stage in STORED or bool(cfg.soft_targets.offline)
        config["soft_targets"] = {"offline": offline}
        if not offline:
            extra = _plain(cfg.teacher.get("extra")) or []
            config["teacher"] = {"model": _plain(cfg.teacher.model), "weights": _plain(cfg.teacher.get("weights")),
                                 "extra_models": [None if isinstance(e, str) else e.get("model") for e in extra]}
            config["speed"].update({k: speed.get(k) for k in ("teacher_dtype", "compile_teacher")})
    return json.loads(json.dumps({"stage": stage, "config": config, "teacher": teacher}, default=str))


def record_hash(record: Any) -> str:
    """SHA-256 of a record; ints hash as floats (``distill.soft_loss.temperature=4`` and ``4.0`` are one setting)."""

    def canonical(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: canonical(v) for k, v in value.items()}
        if isinstance(value, list):
            return [canonical(v) for v in value]
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    return hashlib.sha256(json.dumps(canonical(record), sort_keys=True, default=str).encode()).hexdigest()


def setting(record: dict[str, Any]) -> dict[str, Any]:
    """A stage's settings without its seed and teacher identity: what runs of one experiment (seeds) share."""
    return {k: v for k, v in record["config"].items() if k != "seed"}


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (memoised per path, size and mtime: a teacher is hashed once per run)."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(path)
    return _DIGESTS[key]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every setting of two records that differs (``4 == 4.0``), keyed as on
    the command line (``distill.soft_loss.temperature``; the teacher's identity as ``teacher.checkpoint_sha256``)."""
    a, b = _flatten(old), _flatten(new)
    return [(k.removeprefix("config."), a.get(k, "<unset>"), b.get(k, "<unset>"))
            for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]


def _shown(value: Any) -> str:
    return re.sub(r"\b([0-9a-f]{12})[0-9a-f]{52}\b", r"\1…", repr(value))  # SHA-256s shortened


def check_stage(stage_dir: Path, record: dict[str, Any] | None) -> None:
    """Refuse to reuse or resume ``stage_dir`` if it was trained under other settings than ``record``'s.

    The settings recorded in ``result.json`` (a finished stage) or, when a checkpoint exists, in
    ``stage_config.json`` (an interrupted one) must equal ``record``. ``None`` (a teacher not known
    yet) checks nothing.

    Raises:
        StageConfigError: naming the stage, the settings that differ (old -> new) and how to proceed.
    """
    if record is None:
        return
    result, started = stage_dir / RESULT, stage_dir / RECORD
    if result.is_file():
        recorded, what = read_json(result, what="stage result").get("stage_config"), "finished"
    elif _has_checkpoint(stage_dir) and started.is_file():
        recorded, what = read_json(started, what="stage record"), "started (it has a checkpoint)"
    elif _has_checkpoint(stage_dir):
        recorded, what = None, "started"
    else:
        return
    if recorded is None:
        log.warning("Stage %s in %s was %s before lightning-kd recorded stage settings: reusing it unchecked.", record["stage"], stage_dir, what)
        return
    diffs = differences(recorded, record)
    if diffs:
        shown = ", ".join(f"{k}: {_shown(a)} → {_shown(b)}" for k, a, b in diffs[:5])
        more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
        raise StageConfigError(
            f"Stage `{record['stage']}` in {str(stage_dir)!r} was {what} under other settings: {shown}{more}. Its result "
            f"would be reported under the new ones, so it is refused. Either run the new settings in a new directory "
            f"(`hydra.run.dir=...`), or delete {str(stage_dir)!r} to train that stage again (the other stages are kept)."
        )


class RecordStage(Callback):
    """Writes ``stage_config.json`` when the fit starts, before any checkpoint (and after the CSV logger
    has looked at the stage folder: a file there before would make it warn of old logs)."""

    def __init__(self, stage_dir: Path, record: dict[str, Any]) -> None:
        self.stage_dir, self.record = stage_dir, record

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero:
            atomic_write_json(self.stage_dir / RECORD, self.record)


# ------------------------------------------------------------------------------ finished stages


def portable(path: str | os.PathLike[str], run_dir: Path) -> str:
    """``path`` relative to ``run_dir`` if it lies inside it (the directory may move), else absolute."""
    path = Path(path).expanduser().resolve()
    try:
        return path.relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return str(path)


def located(path: str, run_dir: Path) -> str:
    """The inverse of :func:`portable`: a path relative to the run directory made usable."""
    return str(Path(path) if Path(path).is_absolute() else run_dir / path)


def read_result(run_dir: Path, stage: str) -> dict[str, Any] | None:
    """A finished stage's ``result.json`` with its checkpoint located, or ``None``."""
    path = run_dir / stage / RESULT
    if not path.is_file():
        return None
    result = read_json(path, what="stage result")
    result["checkpoint"] = located(result["checkpoint"], run_dir)
    return result


def write_result(run_dir: Path, stage: str, entry: dict[str, Any], checkpoint: str, record: dict[str, Any]) -> None:
    """Mark ``stage`` finished (atomically: a crash leaves no half-written result)."""
    atomic_write_json(run_dir / stage / RESULT, {
        "entry": entry, "checkpoint": portable(checkpoint, run_dir),
        "stage_config_hash": record_hash(record), "stage_config": record,
    })


# ------------------------------------------------------------------------------ interrupted stages


def _has_checkpoint(stage_dir: Path) -> bool:
    return any((stage_dir / "checkpoints").glob("*.ckpt")) or any(stage_dir.glob("hpc_ckpt_*.ckpt"))


def _step_in_name(path: Path) -> int:
    found = re.search(r"step=(\d+)", path.name)
    return int(found.group(1)) if found else -1


def resume_checkpoint(stage_dir: Path) -> Path | None:
    """The checkpoint an interrupted stage resumes from, or ``None`` to train it from the start.

    ``checkpoints/last.ckpt`` (a file, or the folder of per-rank shards that a sharded run writes) if it
    loads, unless Lightning's SLURM requeue saved a later ``hpc_ckpt_N.ckpt``. A damaged ``last.ckpt`` (a full
    disk, a partial copy, a shard folder without its index) falls back to the newest intact checkpoint of the
    stage, and without one the stage starts over, each with a warning.

    Raises:
        CheckpointError: if a checkpoint holds pickled objects (refused, never run, and no fallback:
            a file that is not what lightning-kd writes is a question for its owner).
    """
    last = stage_dir / "checkpoints" / "last.ckpt"
    hpc = sorted(stage_dir.glob("hpc_ckpt_*.ckpt"))
    others = sorted((p for p in (stage_dir / "checkpoints").glob("*.ckpt") if p != last), key=_step_in_name, reverse=True)
    damaged: list[str] = []

    def step(path: Path) -> int | None:
        try:
            checkpoint = _read_checkpoint_metadata(path)
        except CheckpointError as err:
            if isinstance(err.__cause__, pickle.UnpicklingError):
                raise CheckpointError(f"{err} Delete it to resume from the stage's other checkpoints, or to train the stage again.") from err
            damaged.append(f"{path.name} ({err})")
            return None
        return int(checkpoint.get("global_step", -1)) if isinstance(checkpoint, dict) else -1

    found = {path: s for path in ([last] if last.exists() else []) + hpc if (s := step(path)) is not None}
    if not found:
        for path in others:  # newest first: the first one that loads
            if (s := step(path)) is not None:
                found[path] = s
                break
    if not found:
        if damaged:
            log.warning("No intact checkpoint in %s (damaged: %s): training stage %s from the start.", stage_dir, "; ".join(damaged), stage_dir.name)
        return None
    chosen = max(found, key=lambda p: found[p])  # ties: last.ckpt, listed first
    if damaged:
        log.warning("Damaged checkpoint in %s: %s. Resuming from %s (step %d) instead.", stage_dir, "; ".join(damaged), chosen, found[chosen])
    return chosen


# A sharded checkpoint (Lightning's ModelParallelStrategy): a folder with torch.distributed.checkpoint's shards and
# index, and Lightning's own entries (epoch, step, loops, hyperparameters) in a torch file beside them.
SHARDED_METADATA, SHARDED_INDEX = "meta.pt", ".metadata"


def _read_checkpoint_metadata(path: Path) -> Any:
    """A checkpoint file's contents, or a sharded checkpoint folder's Lightning entries (``meta.pt``), read with
    ``weights_only=True``; a folder without its shard index is damaged (its save did not finish).

    Raises:
        CheckpointError: for a damaged file or folder, or one holding pickled objects.
    """
    if not path.is_dir():
        return load_checkpoint(path, what="resume checkpoint")
    if not (path / SHARDED_INDEX).is_file():
        raise CheckpointError(f"The sharded resume checkpoint {str(path)!r} has no {SHARDED_INDEX!r} index: its save did not finish.")
    try:
        return load_checkpoint(path / SHARDED_METADATA, what="resume checkpoint")
    except FileNotFoundError as err:
        raise CheckpointError(f"The sharded resume checkpoint {str(path)!r} has no {SHARDED_METADATA!r}: its save did not finish.") from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but through a temporary file and a rename: a crash or a full disk
    while saving leaves the previous ``last.ckpt`` whole instead of a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        atomic_write(path, lambda f: torch.save(checkpoint, f))


# ------------------------------------------------------------------------------ SIGTERM


class _StopOnSigterm:
    """SIGTERM outside Lightning's loops stops the run at once with :class:`Interrupted`.

    Inside ``fit``/``test`` Lightning installs its own handler (it stops the loop at the end of the
    batch, and on SLURM with auto-requeue also bypasses the signal) and calls this one after its own:
    then it is not the installed handler and leaves the stop to Lightning.
    """

    def __call__(self, signum: int, frame: Any) -> None:
        if signal.getsignal(signal.SIGTERM) is self:
            raise Interrupted("Stopped by SIGTERM between training loops: no stage was marked finished after the last one that completed.")


@contextlib.contextmanager
def sigterm_stops_the_run() -> Iterator[None]:
    """Within this block, SIGTERM ends the run with :class:`Interrupted` (the CLI exits with 143)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _StopOnSigterm())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
