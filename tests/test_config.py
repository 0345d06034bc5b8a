"""Every option of every config group composes and builds what it describes, through the stage plan's own builders.

The options are discovered from the shipped ``lightning_kd.conf`` package, so a new YAML file in
``conf/<group>/`` is covered without touching this file. Configs are composed with
``initialize_config_module`` + ``compose`` (the way ``lightning-kd`` finds them in an installed
wheel); ``compose`` sets no ``HydraConfig``, so ``run_dir`` is overridden with ``tmp_path``.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import operator
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, InstantiationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from lightning_kd import CausalLMDistillation, DistillationAnnealing, DistillationModule, Speed, cli, stages
from lightning_kd.features import FeatureTerm
from lightning_kd.losses import LearnableTemperature, LogitLoss
from lightning_kd.teachers import TeacherEnsemble

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
CHECKED_GROUPS = {
    "augment", "callbacks", "data", "distill", "experiment", "logger", "precision", "schedule", "soft_targets", "speed", "student",
    "task", "teacher", "trainer",
}
# Options that only work with another group's option come as an experiment of the same name (a bundle),
# e.g. `experiment=at` = `distill=at student=cnn1d_small`; such an option is built through its bundle.
BUNDLES = {option for option in GROUPS["experiment"] if option != "smoke"}
# Language-model options work only together (token data, causal LMs, CausalLMDistillation): built inside experiment=lm.
LM_OPTIONS = {("data", "pydoc_bytes"), ("teacher", "gpt"), ("teacher", "hf_gpt2"), ("student", "gpt_small"),
              ("student", "hf_gpt2_small"), ("task", "lm")}


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
    """What `stages.run_stage` builds for each of the task's stages (module, datamodule, trainer), without fitting."""
    given = cfg.teacher.checkpoint  # as in `stages.run`: the teacher stage only loads a given teacher
    for stage in cfg.task.stages:
        if stage in ("soft_targets", stages.EXPORT_STAGE):  # built and run by _check_soft_targets; export: tests/test_export.py
            continue
        # a stored stage reads the store a soft_targets stage writes (run in _check_soft_targets): built online here
        module = stages.build_module(cfg, stage, given if stage == "teacher" else given or _teacher_checkpoint(cfg, tmp_path),
                                     offline=False if stage in stages.STORED_STAGES else None)
        assert isinstance(module, DistillationModule)
        assert type(module) is stages.distill_factory(cfg).func  # every stage is the configured class
        assert isinstance(stages.build_datamodule(cfg, stage), L.LightningDataModule)
        trainer = stages.build_trainer(_on_this_machine(cfg), stage, tmp_path / stage, max_epochs=1)
        assert isinstance(trainer, L.Trainer)


def test_options_are_discovered():
    assert {"task", "data", "teacher", "student", "distill", "schedule", "soft_targets", "speed", "trainer", "precision", "logger",
            "callbacks"} <= set(GROUPS)
    assert {"smoke", "dkd", "ctkd", "at", "kd_at"} <= set(GROUPS["experiment"]) and "ddp_cpu" in GROUPS["trainer"]
    assert "cache" not in GROUPS and "constant" not in GROUPS["schedule"]  # one name for the offline path; no schedule that does not anneal


def test_every_group_is_checked():
    assert set(GROUPS) <= CHECKED_GROUPS, f"add a check for the new group(s) {set(GROUPS) - CHECKED_GROUPS} in {__file__}"


def test_default_config(compose_cfg, tmp_path):
    cfg = compose_cfg()
    assert cfg.run_dir == str(tmp_path)
    assert list(cfg.task.stages) == list(stages.MODEL_STAGES)
    assert cfg.trainer.precision == "32-true"  # the precision group lands inside `trainer`
    assert stages.distill_factory(cfg).func is DistillationModule
    assert "schedule" not in cfg and cfg.soft_targets.offline is False  # no annealing, the teacher online
    assert hydra.utils.instantiate(cfg.speed) == Speed()  # every speed option off
    OmegaConf.resolve(cfg.teacher)  # no dangling interpolation in what the stages instantiate
    OmegaConf.resolve(cfg.student)
    OmegaConf.resolve(cfg.distill)


@pytest.mark.filterwarnings("ignore:You passed `Trainer\\(accelerator='cpu', precision='16-mixed'\\)`")  # checked below
@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_builds(compose_cfg, tmp_path, monkeypatch, group, option):
    """Each option composes with the defaults of every other group (or, if it has one, through its bundle), and all
    of the task's objects build from it."""
    if (group, option) in LM_OPTIONS and option.startswith("hf_"):
        pytest.importorskip("transformers")
    bundled = group != "experiment" and option in BUNDLES
    lm = ("experiment=lm",) if (group, option) in LM_OPTIONS else ()
    cfg = compose_cfg(*lm, f"experiment={option}" if bundled else f"{group}={option}")
    assert cfg.hydra.runtime.choices[group] == option
    for key, value in cfg.hydra.job.env_set.items():  # what `lightning-kd` sets for the job (logger=mlflow's file store)
        monkeypatch.setenv(key, str(value))
    CHECKS[group](cfg, option, tmp_path)
    if group not in ("trainer", "task"):  # checked on their own below (GPU trainers, task stages)
        _build_everything(cfg, tmp_path)


# ---------------------------------------------------------------------- one check per group


def _check_task(cfg, option, tmp_path):
    assert cfg.task.name == option  # the run directory and error messages use it
    assert len(cfg.task.stages) > 0
    assert set(cfg.task.stages) <= set(stages.STAGES)
    if "teacher" not in cfg.task.stages and set(cfg.task.stages) - {"student_scratch", "soft_targets", stages.EXPORT_STAGE}:
        pytest.fail(f"task={option} distils without a teacher stage")  # the plan would require teacher.checkpoint
    if stages.EXPORT_STAGE in cfg.task.stages and not cfg.export.checkpoint:
        with pytest.raises(ValueError, match=r"Nothing to export: .*Set `export.checkpoint=PATH`"):
            cli.train(cfg)  # an empty run directory has no finished stage to export
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
    if cfg.hydra.runtime.choices.data == "pydoc_bytes":  # a causal LM over the byte vocabulary
        ids = torch.randint(0, 258, (2, cfg.data.seq_len))
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        assert getattr(out, "logits", out).shape == (2, cfg.data.seq_len, 258)
    else:
        num_classes = recipe.model.get("num_classes", 10)
        assert model(torch.randn(2, 40)).shape == (2, num_classes)
    optimizer = hydra.utils.instantiate(recipe.optimizer)  # `_partial_: true`: the module picks the parameters
    assert isinstance(optimizer, functools.partial)
    applied = optimizer(model.parameters())
    assert isinstance(applied, torch.optim.Optimizer)
    assert sum(len(g["params"]) for g in applied.param_groups) == len(list(model.parameters()))
    assert recipe.epochs >= 1


def _check_distill(cfg, option, tmp_path):
    """The partial, called with real models, builds the module the YAML describes: its class, loss objects, weights."""
    factory = stages.distill_factory(cfg)
    expected = CausalLMDistillation if cfg.hydra.runtime.choices.distill == "lm" else DistillationModule
    assert factory.func is expected and isinstance(factory, functools.partial)
    module = stages.build_module(cfg, "student_distilled", _teacher_checkpoint(cfg, tmp_path))
    assert module.teacher is not None and not any(p.requires_grad for p in module.teacher.parameters())
    described = hydra.utils.instantiate(cfg.distill.soft_loss, _convert_="all")  # what the YAML says, built on its own
    assert isinstance(module.soft_loss, LogitLoss) and repr(module.soft_loss) == repr(described)
    assert type(module.soft_loss).__name__ == cfg.distill.soft_loss._target_.rsplit(".", 1)[-1]
    assert (module.alpha, module.soft_weight) == (cfg.distill.alpha, cfg.distill.soft_weight)
    assert type(module.hard_loss).__name__ == cfg.distill.hard_loss._target_.rsplit(".", 1)[-1]
    temperature = cfg.distill.soft_loss.get("temperature")
    if isinstance(temperature, DictConfig):  # learned (CTKD): it starts where CTKD's code starts
        assert isinstance(module.soft_loss.temperature, LearnableTemperature)
        assert module.temperature == pytest.approx(1 + 20 * torch.sigmoid(torch.tensor(1.0)).item(), rel=1e-6)  # 15.62
    elif temperature is None:
        assert not module.soft_loss.uses_temperature
    else:
        assert module.temperature == temperature
    # the optimizer sees the student (and a learned temperature) only: a `trainer.model.parameters()` optimizer
    # would train the teacher too. FitNet's adapters join when they are built, at the start of fit.
    optimizer = module.optimizer_factory(module.trainable_parameters())
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in [*module.student.parameters(), *module.soft_loss.parameters()]}
    features = module.feature_distillation
    assert (features is not None) == bool(cfg.distill.features)
    if features is not None:
        terms = hydra.utils.instantiate(cfg.distill.features, _convert_="all")
        assert all(isinstance(term, FeatureTerm) for term in terms.values())
        assert features.keys == list(terms) and repr(features.terms) == repr(list(terms.values()))
    # a stage instantiates its own loss objects: the transfer stage must not train on the first one's temperature
    other = stages.build_module(cfg, "student_distilled_transfer", _teacher_checkpoint(cfg, tmp_path))
    assert other.soft_loss is not module.soft_loss


def _check_soft_targets(cfg, option, tmp_path):
    """The soft_targets stage writes a store where `soft_targets.path` says, in the configured dtype, that opens and verifies."""
    assert cfg.soft_targets.path == str(tmp_path / "soft_targets") and cfg.soft_targets.offline is False
    cfg = copy.deepcopy(cfg)  # the rest of the test builds the default task from the original
    with open_dict(cfg):
        cfg.data.transfer_samples = 0
        cfg.data.data_dir = str(tmp_path / "data")
    store = stages.build_store(cfg, tmp_path, _teacher_checkpoint(cfg, tmp_path))
    assert (store.dtype, store.top_k, store.epochs) == (cfg.soft_targets.dtype, cfg.soft_targets.top_k, cfg.soft_targets.epochs)
    assert store.parts == ["train"] and store.manifest["parts"]["train"]["identity"]["length"] == 3500
    assert store.lookup("train", torch.tensor([0, 1]), 0).shape == (2, 10)
    with open_dict(cfg):
        cfg.soft_targets.offline = True
    module = stages.build_module(cfg, "student_distilled", None, store=store)  # no teacher in memory
    assert module.teacher is None and module.soft_targets is store


def _check_speed(cfg, option, tmp_path):
    speed = hydra.utils.instantiate(cfg.speed, _convert_="all")
    assert isinstance(speed, Speed)
    module = stages.build_module(cfg, "student_distilled", _teacher_checkpoint(cfg, tmp_path))
    assert module.speed == speed


def _check_augment(cfg, option, tmp_path):
    augmentation = stages._augmentation(cfg)
    if option == "none":
        assert augmentation is None
        return
    x = torch.randn(6, 40)
    views = augmentation(x, 0, 0, torch.arange(6)), augmentation(x, 0, 1, torch.arange(6))
    assert views[0].shape == x.shape and not torch.equal(views[0], x) and not torch.equal(views[0], views[1])
    assert torch.equal(views[0], augmentation(x, 0, 0, torch.arange(6)))  # a pure function of (seed, epoch, index)
    assert repr(stages.build_module(cfg, "student_scratch", None).augmentation) == repr(augmentation)


def _check_schedule(cfg, option, tmp_path):
    callback = hydra.utils.instantiate(cfg.schedule, _convert_="all")
    assert isinstance(callback, DistillationAnnealing)
    module = stages.build_module(cfg, "student_distilled", _teacher_checkpoint(cfg, tmp_path))
    for name in callback.schedules:  # what it anneals exists on the module of the config it comes with
        assert isinstance(operator.attrgetter(name)(module), float), name
    trainer = stages.build_trainer(cfg, "student_distilled", tmp_path / "student_distilled", max_epochs=1)
    assert sum(isinstance(c, DistillationAnnealing) for c in trainer.callbacks) == 1
    trainer = stages.build_trainer(cfg, "student_scratch", tmp_path / "student_scratch", max_epochs=1)
    assert not any(isinstance(c, DistillationAnnealing) for c in trainer.callbacks)  # no teacher, nothing to anneal


def _check_trainer(cfg, option, tmp_path):
    wanted = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert wanted["_target_"] in ("lightning.pytorch.Trainer", "lightning.Trainer")
    assert wanted["precision"] == "32-true"
    needs_gpu = wanted["accelerator"] in ("gpu", "cuda")
    sharded = isinstance(wanted["strategy"], dict)
    if sharded:  # FSDP2: every process a data-parallel rank
        assert wanted["strategy"]["_target_"] == "lightning.pytorch.strategies.ModelParallelStrategy"
        assert (wanted["strategy"]["data_parallel_size"], wanted["strategy"]["tensor_parallel_size"]) == (wanted["devices"], 1)
        assert wanted["strategy"]["save_distributed_checkpoint"] is True
    trainer = stages.build_trainer(_on_this_machine(cfg), "teacher", tmp_path / "teacher", max_epochs=1)
    assert isinstance(trainer, L.Trainer)
    assert trainer.max_epochs == 1
    if needs_gpu and CPU_ONLY:  # built on the CPU above; the GPU settings are checked as written
        if sharded:
            assert isinstance(trainer.strategy, ModelParallelStrategy) and wanted["devices"] == 8  # one node's GPUs
            return
        assert wanted["devices"] in (1, -1)
        assert wanted["strategy"] == ("ddp" if option == "ddp" else "auto")
        return
    assert trainer.num_devices == wanted["devices"]
    if sharded:
        assert isinstance(trainer.strategy, ModelParallelStrategy) and trainer.strategy._data_parallel_size == wanted["devices"] == 2
    elif wanted["strategy"] == "ddp":
        assert isinstance(trainer.strategy, DDPStrategy)
    else:
        assert isinstance(trainer.strategy, SingleDeviceStrategy)
    if wanted.get("deterministic"):
        assert torch.are_deterministic_algorithms_enabled()


def _check_precision(cfg, option, tmp_path):
    written = cfg.trainer.precision
    assert written.split("-")[0] == option.split("-")[0]  # `precision=bf16-mixed` -> trainer.precision: bf16-mixed
    trainer = stages.build_trainer(cfg, "teacher", tmp_path / "teacher", max_epochs=1)
    if written == "16-mixed" and CPU_ONLY:
        assert trainer.precision == "bf16-mixed"  # Lightning's CPU fallback (with a warning): fp16 AMP needs a GPU
    else:
        assert trainer.precision == written


def _check_logger(cfg, option, tmp_path):
    trainer = stages.build_trainer(cfg, "teacher", tmp_path / "teacher", max_epochs=1)
    if not cfg.get("logger"):
        assert option == "none"
        assert trainer.logger is None and trainer.loggers == []
        return
    logger = stages.build_logger(cfg.logger, "teacher")
    assert isinstance(logger, Logger)
    assert isinstance(trainer.logger, type(logger))
    if option == "mlflow":  # one MLflow run per stage, in a file store inside the run directory
        assert trainer.logger._run_name == "teacher"
        assert Path(trainer.logger.save_dir).resolve() == (tmp_path / "mlruns").resolve()
        return
    # one directory per stage, inside the run directory
    assert Path(trainer.logger.log_dir).resolve() == (tmp_path / "teacher").resolve()


def _check_callbacks(cfg, option, tmp_path):
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values() if c]
    assert callbacks and all(isinstance(c, Callback) for c in callbacks)
    trainer = stages.build_trainer(cfg, "teacher", tmp_path / "teacher", max_epochs=1)
    checkpoints = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert len(checkpoints) == 1  # the crash-resume in `stages.run_stage` relies on it
    assert checkpoints[0].save_last and Path(checkpoints[0].dirpath) == tmp_path / "teacher" / "checkpoints"
    bars = [c for c in callbacks if isinstance(c, ProgressBar)]
    # no progress bar unless the group asks for one (Lightning would add its own)
    assert type(trainer.progress_bar_callback) is (type(bars[0]) if bars else type(None))
    if option == "quiet":
        assert not bars


# What each bundle chooses: the options that only work (or only match their paper) together.
BUNDLED_CHOICES = {
    "dkd": {"distill": "dkd", "schedule": "dkd_warmup"},  # the paper's 20-epoch warm-up of the DKD term
    "ctkd": {"distill": "ctkd", "schedule": "ctkd"},  # the learned temperature's gradient-reversal curriculum
    "at": {"distill": "at", "student": "cnn1d_small"},  # attention maps need a student with spatial maps
    "kd_at": {"distill": "kd_at", "student": "cnn1d_small"},
    "lm": {"task": "lm", "data": "pydoc_bytes", "teacher": "gpt", "student": "gpt_small", "distill": "lm"},
}


def _check_experiment(cfg, option, tmp_path):
    default = compose(config_name="config", overrides=[f"run_dir={tmp_path}"])
    assert OmegaConf.masked_copy(cfg, list(default)) != default or set(cfg) != set(default)  # an experiment changes something
    if option == "smoke":
        assert (cfg.teacher.epochs, cfg.student.epochs, cfg.student.transfer_epochs) == (2, 2, 1)
        assert cfg.data.transfer_samples == 1000
    else:
        assert {group: cfg.hydra.runtime.choices[group] for group in BUNDLED_CHOICES[option]} == BUNDLED_CHOICES[option]
        _check_distill(cfg, option, tmp_path)
        if cfg.get("schedule"):
            _check_schedule(cfg, option, tmp_path)


CHECKS = {
    "augment": _check_augment,
    "soft_targets": _check_soft_targets,
    "speed": _check_speed,
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


def test_zero_temperature_is_refused_when_the_loss_is_built(compose_cfg, tmp_path):
    cfg = compose_cfg("distill.soft_loss.temperature=0")
    with pytest.raises(InstantiationException, match=r"(?s)Expected `temperature` to be > 0, but got 0.*full_key: distill.soft_loss"):
        stages.build_module(cfg, "student_distilled", _teacher_checkpoint(cfg, tmp_path))


def test_alpha_out_of_range_is_refused(compose_cfg, tmp_path):
    cfg = compose_cfg("distill.alpha=1.5")
    with pytest.raises(ValueError, match=r"Expected `alpha` to be in \[0, 1\], but got 1.5"):
        stages.build_module(cfg, "student_distilled", _teacher_checkpoint(cfg, tmp_path))


def test_an_option_outside_its_bundle_is_refused_naming_what_is_missing(compose_cfg, tmp_path):
    """`distill=at` with the default MLP student: the layers it hooks do not exist; `experiment=at` brings the CNN student."""
    cfg = compose_cfg("distill=at")
    with pytest.raises(ValueError, match=r"Unknown student layer 'features.1': MLP has no submodule of that name.*hidden.1"):
        stages.build_module(cfg, "student_distilled", _teacher_checkpoint(cfg, tmp_path))


@pytest.mark.parametrize("group", ["trainer", "precision", "task"])
def test_unknown_option_lists_the_valid_ones(compose_cfg, group):
    with pytest.raises(HydraException, match="Available options") as error:
        compose_cfg(f"{group}=no_such_option")
    assert all(option in str(error.value) for option in GROUPS[group])


def test_unknown_stage_is_refused(compose_cfg):
    cfg = compose_cfg("task.stages=[teacher,student_kd]")
    with pytest.raises(ValueError, match=r"Unknown stage\(s\) \['student_kd'\].*Expected any of: teacher"):
        cli.train(cfg)


class MyModule(DistillationModule):
    """A user's subclass (e.g. one overriding `unpack_batch`), named by `distill._target_`."""


def test_a_user_subclass_trains_every_stage(compose_cfg, tmp_path):
    cfg = compose_cfg(f"distill._target_={__name__}.MyModule")
    checkpoint = _teacher_checkpoint(cfg, tmp_path)
    built = {stage: stages.build_module(cfg, stage, checkpoint if stage != "student_scratch" else None) for stage in stages.MODEL_STAGES}
    assert all(type(module) is MyModule for module in built.values())
    assert built["student_distilled"].teacher is not None and built["student_scratch"].teacher is None


def test_a_distill_target_that_is_not_a_distillation_module_is_refused(compose_cfg):
    cfg = compose_cfg("distill._target_=torch.nn.Linear")
    with pytest.raises(TypeError, match=r"Expected `distill` to be a partial of DistillationModule or a subclass of it"):
        stages.distill_factory(cfg)


def test_a_dtype_per_teacher_with_extra_teachers_builds_and_fingerprints_one_ensemble(compose_cfg, tmp_path):
    """`speed.teacher_dtype={0: bfloat16}` with `teacher.extra` was refused ("needs several teachers"): the module
    now gets the teachers as a list and builds the ensemble; the store check fingerprints the same ensemble."""
    checkpoint = _teacher_checkpoint(compose_cfg(), tmp_path)
    teachers = (f"teacher.extra=[{checkpoint}]", "teacher.weights=[3,1]", "data.transfer_samples=0", f"data.data_dir={tmp_path / 'data'}")
    cfg = compose_cfg(*teachers, "speed.teacher_dtype={0:bfloat16}")
    module = stages.build_module(cfg, "student_distilled", checkpoint)
    assert isinstance(module.teacher, TeacherEnsemble) and module.teacher.weights == {"0": 0.75, "1": 0.25}
    assert {name: next(member.parameters()).dtype for name, member in module.teacher.items()} == {"0": torch.bfloat16, "1": torch.float32}
    stages.build_store(cfg, tmp_path, checkpoint)  # the module's ensemble made it
    stages.open_store(cfg, checkpoint)  # the same settings: the same ensemble, accepted
    with pytest.raises(RuntimeError, match="was made by another teacher"):
        stages.open_store(compose_cfg(*teachers), checkpoint)  # both members in float32: another teacher


@pytest.mark.parametrize(("overrides", "count"), [(("teacher.weights=[1]",), 1), (("teacher.extra=[t.ckpt]", "teacher.weights=[1,2,3]"), 3)])
def test_teacher_weights_that_do_not_fit_the_teachers_are_refused(compose_cfg, tmp_path, overrides, count):
    cfg = compose_cfg(*overrides)
    with pytest.raises(ValueError, match=rf"Expected `teacher.weights` to hold one weight per teacher .*but got {count}\. Set `teacher.weights=null`"):
        stages.build_module(cfg, "student_distilled", _teacher_checkpoint(cfg, tmp_path))


def test_a_dtype_per_teacher_for_one_teacher_is_refused_naming_the_config_keys(compose_cfg, tmp_path):
    cfg = compose_cfg("speed.teacher_dtype={0:bfloat16}")
    with pytest.raises(ValueError, match=r"Expected `speed.teacher_dtype` to be a dtype name for one teacher.*`teacher.extra=\[...\]`"):
        stages.build_module(cfg, "student_distilled", _teacher_checkpoint(cfg, tmp_path))
