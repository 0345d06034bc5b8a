"""Every option of every config group composes and builds what it describes, through the CLI's own builders.

The options are discovered from the shipped ``lightning_kd.conf`` package, so a new YAML file in
``conf/<group>/`` is covered without touching this file. Configs are composed with
``initialize_config_module`` + ``compose`` (the way ``lightning-kd`` finds them in an installed
wheel); ``compose`` sets no ``HydraConfig``, so ``run_dir`` is overridden with ``tmp_path``.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from lightning_kd import DistillationAnnealing, DistillationModule
from lightning_kd import cli

CONFIG_MODULE = "lightning_kd.conf"
CPU_ONLY = not torch.cuda.is_available()


def _discover() -> dict[str, list[str]]:
    """``{group: [options]}`` from the YAML files of the shipped config package (not the repo tree)."""
    root = importlib.resources.files(CONFIG_MODULE)
    groups = {}
    for entry in root.iterdir():
        if entry.is_dir() and not entry.name.startswith(("_", ".")):
            options = sorted(f.name[: -len(".yaml")] for f in entry.iterdir() if f.name.endswith(".yaml"))
            if options:
                groups[entry.name] = options
    return groups


GROUPS = _discover()
OPTIONS = [(group, option) for group, options in sorted(GROUPS.items()) for option in options]
# Groups with a check of their own below; a new group fails test_every_group_is_checked until it gets one.
# Options that need another group's option beside them (each says so in its YAML).
COMPANIONS = {
    ("distill", "at"): ["student=cnn1d_small"],  # attention maps need a convolutional student
    ("distill", "kd_at"): ["student=cnn1d_small"],
    ("distill", "ctkd"): ["schedule=ctkd"],  # the temperature is learned: the schedule must not set it
}
CHECKED_GROUPS = {
    "augment", "cache", "callbacks", "data", "distill", "experiment", "logger", "precision", "schedule", "student", "task", "teacher", "trainer"
}


@pytest.fixture
def compose_cfg(tmp_path):
    """``compose_cfg(*overrides)`` -> the composed config, writing under ``tmp_path``; GlobalHydra is cleared after."""
    GlobalHydra.instance().clear()
    deterministic = torch.are_deterministic_algorithms_enabled()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        yield functools.partial(_compose, run_dir=tmp_path)
    GlobalHydra.instance().clear()
    torch.use_deterministic_algorithms(deterministic)  # Trainer(deterministic=True) sets it process-wide


def _compose(*overrides: str, run_dir: Path) -> DictConfig:
    return compose(config_name="config", overrides=[f"run_dir={run_dir}", *overrides], return_hydra_config=True)


def _on_this_machine(cfg: DictConfig) -> DictConfig:
    """The GPU trainer configs, pointed at one CPU so that they can be instantiated here."""
    if CPU_ONLY and cfg.trainer.accelerator in ("gpu", "cuda"):
        with open_dict(cfg):
            cfg.trainer.accelerator = "cpu"
            cfg.trainer.devices = 1
            if cfg.trainer.strategy in ("ddp", "ddp_spawn"):
                cfg.trainer.strategy = "auto"
    return cfg


def _teacher_checkpoint(cfg: DictConfig, tmp_path: Path) -> str:
    """A state-dict file of the configured teacher architecture (what `teacher.checkpoint` points to)."""
    path = tmp_path / "teacher.pt"
    torch.save(hydra.utils.instantiate(cfg.teacher.model, _convert_="all").state_dict(), path)
    return str(path)


def _build_everything(cfg: DictConfig, tmp_path: Path) -> None:
    """What `cli.run_stage` builds for each of the task's stages (module, datamodule, trainer), without fitting."""
    given = cfg.teacher.checkpoint  # as in `cli.train`: the teacher stage only loads a given teacher
    for stage in cfg.task.stages:
        if stage == "cache":  # built and run by _check_cache
            continue
        module = cli.build_module(cfg, stage, given if stage == "teacher" else given or _teacher_checkpoint(cfg, tmp_path))
        assert isinstance(module, DistillationModule)
        assert isinstance(cli.build_datamodule(cfg, stage), L.LightningDataModule)
        trainer = cli.build_trainer(_on_this_machine(cfg), stage, tmp_path / stage, max_epochs=1)
        assert isinstance(trainer, L.Trainer)


def test_options_are_discovered():
    assert {"task", "data", "teacher", "student", "distill", "schedule", "trainer", "precision", "logger", "callbacks"} <= set(GROUPS)
    assert "smoke" in GROUPS["experiment"] and "ddp_cpu" in GROUPS["trainer"]


def test_every_group_is_checked():
    assert set(GROUPS) <= CHECKED_GROUPS, f"add a check for the new group(s) {set(GROUPS) - CHECKED_GROUPS} in {__file__}"


def test_default_config(compose_cfg, tmp_path):
    cfg = compose_cfg()
    assert cfg.run_dir == str(tmp_path)
    assert list(cfg.task.stages) == list(cli.MODEL_STAGES)
    assert cfg.trainer.precision == "32-true"  # the precision group lands inside `trainer`
    assert cli.module_class(cfg) is DistillationModule
    OmegaConf.resolve(cfg.teacher)  # no dangling interpolation in what the stages instantiate
    OmegaConf.resolve(cfg.student)


@pytest.mark.filterwarnings("ignore:You passed `Trainer\\(accelerator='cpu', precision='16-mixed'\\)`")  # checked below
@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_builds(compose_cfg, tmp_path, group, option):
    """Each option composes with the defaults of every other group, and all of the task's objects build from it."""
    cfg = compose_cfg(f"{group}={option}", *COMPANIONS.get((group, option), ()))
    assert cfg.hydra.runtime.choices[group] == option
    CHECKS[group](cfg, option, tmp_path)
    if group not in ("trainer", "task"):  # checked on their own below (GPU trainers, task stages)
        _build_everything(cfg, tmp_path)


# ---------------------------------------------------------------------- one check per group


def _check_task(cfg, option, tmp_path):
    assert cfg.task.name == option  # the run directory and error messages use it
    assert len(cfg.task.stages) > 0
    assert set(cfg.task.stages) <= set(cli.STAGES)
    if "teacher" not in cfg.task.stages and set(cfg.task.stages) - {"student_scratch", "cache"}:
        pytest.fail(f"task={option} distils without a teacher stage")  # cli.train would require teacher.checkpoint
    if cfg.task.get("requires_teacher_checkpoint"):
        with pytest.raises(ValueError, match=r"set `teacher.checkpoint=PATH`"):
            cli.train(cfg)  # refused before any stage runs
    with open_dict(cfg):
        cfg.teacher.checkpoint = _teacher_checkpoint(cfg, tmp_path)
    _build_everything(cfg, tmp_path)


def _check_data(cfg, option, tmp_path):
    datamodule = hydra.utils.instantiate(cfg.data)
    assert isinstance(datamodule, L.LightningDataModule)


def _check_model(role, cfg, option, tmp_path):
    recipe = cfg[role]
    model = hydra.utils.instantiate(recipe.model, _convert_="all")
    assert isinstance(model, nn.Module)
    num_classes = recipe.model.get("num_classes", 10)
    assert model(torch.randn(2, 40)).shape == (2, num_classes)
    optimizer = hydra.utils.instantiate(recipe.optimizer)  # `_partial_: true`: the module picks the parameters
    assert isinstance(optimizer, functools.partial)
    applied = optimizer(model.parameters())
    assert isinstance(applied, torch.optim.Optimizer)
    assert sum(len(g["params"]) for g in applied.param_groups) == len(list(model.parameters()))
    assert recipe.epochs >= 1


def _check_distill(cfg, option, tmp_path):
    module = cli.build_module(cfg, "student_distilled", _teacher_checkpoint(cfg, tmp_path))
    assert module.teacher is not None
    assert (module.alpha, module.soft_loss, module.standardize) == (cfg.distill.alpha, cfg.distill.soft_loss, cfg.distill.standardize)
    assert module.temperature == pytest.approx(cfg.distill.temperature, rel=1e-6)  # a learned one starts there
    assert module.soft_loss_options == cfg.distill.soft_loss_options
    assert (module.temperature_model is not None) == bool(cfg.distill.learnable_temperature)
    # the optimizer sees the student (and a learned temperature) only: a `trainer.model.parameters()` optimizer
    # would train the teacher too. FitNet's adapters join when they are built, at the start of fit.
    optimizer = module.optimizer_factory(module.trainable_parameters())
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    expected = [*module.student.parameters(), *(module.temperature_model.parameters() if module.temperature_model else [])]
    assert optimized == {id(p) for p in expected}
    assert not any(p.requires_grad for p in module.teacher.parameters())
    features = module.feature_distillation
    assert (features is not None) == bool(cfg.distill.features)
    if features is not None:
        assert [t.key for t in features.terms] == list(cfg.distill.features)
        assert features.teacher_layers == list(cfg.distill.teacher_layers)


def _check_cache(cfg, option, tmp_path):
    """The cache stage writes a store where `cache.path` says, in the configured dtype, that opens and verifies."""
    assert cfg.cache.path == str(tmp_path / "soft_targets")
    cfg = copy.deepcopy(cfg)  # the rest of the test builds the default task from the original
    with open_dict(cfg):
        cfg.data.transfer_samples = 0
        cfg.data.data_dir = str(tmp_path / "data")
    store = cli.build_cache(cfg, tmp_path, _teacher_checkpoint(cfg, tmp_path))
    assert (store.dtype, store.top_k, store.epochs) == (cfg.cache.dtype, cfg.cache.top_k, cfg.cache.epochs)
    assert store.parts == ["train"] and store.manifest["parts"]["train"]["identity"]["length"] == 3500
    assert store.lookup("train", torch.tensor([0, 1]), 0).shape == (2, 10)


def _check_augment(cfg, option, tmp_path):
    augmentation = cli._augmentation(cfg)
    if option == "none":
        assert augmentation is None
        return
    x = torch.randn(6, 40)
    views = augmentation(x, 0, 0, torch.arange(6)), augmentation(x, 0, 1, torch.arange(6))
    assert views[0].shape == x.shape and not torch.equal(views[0], x) and not torch.equal(views[0], views[1])
    assert torch.equal(views[0], augmentation(x, 0, 0, torch.arange(6)))  # a pure function of (seed, epoch, index)
    assert repr(cli.build_module(cfg, "student_scratch", None).augmentation) == repr(augmentation)


def _check_schedule(cfg, option, tmp_path):
    callback = hydra.utils.instantiate(cfg.schedule, _convert_="all")
    assert isinstance(callback, DistillationAnnealing)
    trainer = cli.build_trainer(cfg, "student_distilled", tmp_path / "student_distilled", max_epochs=1)
    assert sum(isinstance(c, DistillationAnnealing) for c in trainer.callbacks) == 1
    trainer = cli.build_trainer(cfg, "student_scratch", tmp_path / "student_scratch", max_epochs=1)
    assert not any(isinstance(c, DistillationAnnealing) for c in trainer.callbacks)  # no teacher, nothing to anneal


def _check_trainer(cfg, option, tmp_path):
    wanted = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert wanted["_target_"] in ("lightning.pytorch.Trainer", "lightning.Trainer")
    assert wanted["precision"] == "32-true"
    needs_gpu = wanted["accelerator"] in ("gpu", "cuda")
    trainer = cli.build_trainer(_on_this_machine(cfg), "teacher", tmp_path / "teacher", max_epochs=1)
    assert isinstance(trainer, L.Trainer)
    assert trainer.max_epochs == 1
    if needs_gpu and CPU_ONLY:  # built on the CPU above; the GPU settings are checked as written
        assert wanted["devices"] in (1, -1)
        assert wanted["strategy"] == ("ddp" if option == "ddp" else "auto")
        return
    assert trainer.num_devices == wanted["devices"]
    if wanted["strategy"] == "ddp":
        assert isinstance(trainer.strategy, DDPStrategy)
    else:
        assert isinstance(trainer.strategy, SingleDeviceStrategy)
    if wanted.get("deterministic"):
        assert torch.are_deterministic_algorithms_enabled()


def _check_precision(cfg, option, tmp_path):
    written = cfg.trainer.precision
    assert written.split("-")[0] == option.split("-")[0]  # `precision=bf16-mixed` -> trainer.precision: bf16-mixed
    trainer = cli.build_trainer(cfg, "teacher", tmp_path / "teacher", max_epochs=1)
    if written == "16-mixed" and CPU_ONLY:
        assert trainer.precision == "bf16-mixed"  # Lightning's CPU fallback (with a warning): fp16 AMP needs a GPU
    else:
        assert trainer.precision == written


def _check_logger(cfg, option, tmp_path):
    trainer = cli.build_trainer(cfg, "teacher", tmp_path / "teacher", max_epochs=1)
    if not cfg.get("logger"):
        assert option == "none"
        assert trainer.logger is None and trainer.loggers == []
        return
    logger = hydra.utils.instantiate(cfg.logger, name="teacher")
    assert isinstance(logger, Logger)
    assert isinstance(trainer.logger, type(logger))
    # one directory per stage, inside the run directory
    assert Path(trainer.logger.log_dir).resolve() == (tmp_path / "teacher").resolve()


def _check_callbacks(cfg, option, tmp_path):
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values() if c]
    assert callbacks and all(isinstance(c, Callback) for c in callbacks)
    trainer = cli.build_trainer(cfg, "teacher", tmp_path / "teacher", max_epochs=1)
    checkpoints = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert len(checkpoints) == 1  # the crash-resume in `cli.run_stage` relies on it
    assert checkpoints[0].save_last and Path(checkpoints[0].dirpath) == tmp_path / "teacher" / "checkpoints"
    bars = [c for c in callbacks if isinstance(c, ProgressBar)]
    # no progress bar unless the group asks for one (Lightning would add its own)
    assert type(trainer.progress_bar_callback) is (type(bars[0]) if bars else type(None))
    if option == "quiet":
        assert not bars


def _check_experiment(cfg, option, tmp_path):
    default = compose(config_name="config", overrides=[f"run_dir={tmp_path}"])
    assert OmegaConf.masked_copy(cfg, list(default)) != default  # an experiment changes something
    if option == "smoke":
        assert (cfg.teacher.epochs, cfg.student.epochs, cfg.student.transfer_epochs) == (2, 2, 1)
        assert cfg.data.transfer_samples == 1000


CHECKS = {
    "augment": _check_augment,
    "cache": _check_cache,
    "task": _check_task,
    "data": _check_data,
    "teacher": functools.partial(_check_model, "teacher"),
    "student": functools.partial(_check_model, "student"),
    "distill": _check_distill,
    "schedule": _check_schedule,
    "trainer": _check_trainer,
    "precision": _check_precision,
    "logger": _check_logger,
    "callbacks": _check_callbacks,
    "experiment": _check_experiment,
}
assert set(CHECKS) == CHECKED_GROUPS


@pytest.mark.parametrize("precision", GROUPS["precision"])
@pytest.mark.parametrize("trainer", GROUPS["trainer"])
def test_trainer_and_precision_combine(compose_cfg, trainer, precision):
    cfg = compose_cfg(f"trainer={trainer}", f"precision={precision}")
    # `# @package trainer` merges the precision into whichever trainer is chosen, whatever the order
    assert cfg.trainer.precision == compose_cfg(f"precision={precision}").trainer.precision
    assert cfg.trainer.accelerator == compose_cfg(f"trainer={trainer}").trainer.accelerator


# ---------------------------------------------------------------------- errors


def test_zero_temperature_is_refused_when_the_module_is_built(compose_cfg, tmp_path):
    cfg = compose_cfg("distill.temperature=0")
    with pytest.raises(ValueError, match=r"Expected `temperature` to be > 0, but got 0"):
        cli.build_module(cfg, "student_distilled", _teacher_checkpoint(cfg, tmp_path))


def test_alpha_out_of_range_is_refused(compose_cfg, tmp_path):
    cfg = compose_cfg("distill.alpha=1.5")
    with pytest.raises(ValueError, match=r"Expected `alpha` to be in \[0, 1\], but got 1.5"):
        cli.build_module(cfg, "student_distilled", _teacher_checkpoint(cfg, tmp_path))


@pytest.mark.parametrize("group", ["trainer", "precision", "task"])
def test_unknown_option_lists_the_valid_ones(compose_cfg, group):
    with pytest.raises(HydraException, match="Available options") as error:
        compose_cfg(f"{group}=no_such_option")
    assert all(option in str(error.value) for option in GROUPS[group])


def test_unknown_stage_is_refused(compose_cfg):
    cfg = compose_cfg("task.stages=[teacher,student_kd]")
    with pytest.raises(ValueError, match=r"Unknown stage\(s\) \['student_kd'\].*Expected any of: teacher"):
        cli.train(cfg)


def test_module_that_is_not_a_distillation_module_is_refused(compose_cfg):
    cfg = compose_cfg("module=torch.nn.Linear")
    with pytest.raises(TypeError, match="Expected `module` to name DistillationModule or a subclass"):
        cli.module_class(cfg)
