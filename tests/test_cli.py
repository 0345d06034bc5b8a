"""End to end: ``train(cfg)`` in-process, and the ``lightning-kd`` console script in subprocesses.

All runs use ``experiment=smoke`` (2 teacher / 2 student / 1 transfer epochs). They run with one
torch thread (``OMP_NUM_THREADS=1``): on a shared 2-core machine torch's default two intra-op
threads spin against the other processes and make these tiny networks ~30x slower.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from lightning_kd import DistillationModule, cli, stages
from lightning_kd.soft_targets.store import SoftTargetStore
from lightning_kd.teachers import load_teacher

ENTRY_KEYS = {"test_acc", "params", "weights_bytes", "checkpoint_bytes", "latency_ms"}
TEACHER_PARAMS, STUDENT_PARAMS = 25_258, 15_210  # cnn1d; mlp 40 -> 100 -> 100 -> 10
TINY_STUDENT_PARAMS = 40 * 32 + 32 + 32 * 10 + 10  # mlp 40 -> 32 -> 10
SMOKE = ("experiment=smoke", "callbacks=quiet")


# ---------------------------------------------------------------------- helpers


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_restored_globals():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)  # Trainer(deterministic=True) sets it process-wide


def make_cfg(run_dir: Path, *overrides: str) -> DictConfig:
    """The smoke config (``experiment=smoke``; a later ``experiment=[smoke,...]`` adds a bundle to it)."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="lightning_kd.conf", version_base="1.3"):
            return compose(config_name="config", overrides=[f"run_dir={run_dir}", *SMOKE, *overrides], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def read_report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def accuracies(entries: dict) -> dict[str, float]:
    return {name: entry["test_acc"] for name, entry in entries.items()}


def communicate_or_kill(proc: subprocess.Popen, timeout: float) -> str:
    """``proc``'s output once it ends; on a timeout kill its whole process group (DDP's rank 1 included) and re-raise."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        print(out[-6000:])
        raise
    return out


def run_command(args: list[str], cwd: Path, *, timeout: float, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``args`` in its own process group; on a timeout kill the whole group (DDP's rank 1 included).
    ``unset``: environment variables the command must not see (e.g. PYTHONPATH, which a README never sets)."""
    env = {
        **{key: value for key, value in os.environ.items() if key not in unset},
        "LIGHTNING_KD_DATA": str(Path(os.environ["LIGHTNING_KD_DATA"]).resolve()),  # set by conftest.py
        "OMP_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "1",
    }
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = communicate_or_kill(proc, timeout)
    if proc.returncode != 0:
        print(out[-6000:])
    assert proc.returncode == 0, f"{' '.join(args)} exited with {proc.returncode}:\n{out[-3000:]}"
    return subprocess.CompletedProcess(args, proc.returncode, out)


def lightning_kd(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    script = shutil.which("lightning-kd", path=os.path.dirname(sys.executable))
    assert script is not None, "the `lightning-kd` console script is not installed next to this Python"
    return run_command([script, *args], cwd, timeout=timeout)


class Crash(L.Callback):
    """Simulates a crash (OOM, pre-emption) when the second epoch starts, after epoch 0 was checkpointed."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


class FitSpy(L.Callback):
    """Records where each fit starts: (stage dir, global_step at on_train_start)."""

    def __init__(self, starts: list):
        self.starts = starts

    def on_train_start(self, trainer, pl_module):
        self.starts.append((Path(trainer.checkpoint_callback.dirpath).parent.name, trainer.global_step))


@pytest.fixture
def spy(monkeypatch):
    return install_spy(monkeypatch)


def install_spy(monkeypatch) -> dict:
    """Records the stages that build a module, the ``ckpt_path`` of every fit, and the step each fit starts at."""
    record = {"built": [], "ckpt_path": {}, "start_step": [], "extra_callbacks": []}
    build_module, build_trainer, fit = stages.build_module, stages.build_trainer, L.Trainer.fit

    def spy_build_module(cfg, stage, teacher_checkpoint, **kwargs):
        record["built"].append(stage)
        return build_module(cfg, stage, teacher_checkpoint, **kwargs)

    def spy_build_trainer(cfg, stage, stage_dir, **kwargs):
        trainer = build_trainer(cfg, stage, stage_dir, **kwargs)
        trainer.callbacks.extend([FitSpy(record["start_step"]), *record["extra_callbacks"]])
        return trainer

    def spy_fit(self, *args, **kwargs):
        record["ckpt_path"][Path(self.checkpoint_callback.dirpath).parent.name] = kwargs.get("ckpt_path")
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(stages, "build_module", spy_build_module)
    monkeypatch.setattr(stages, "build_trainer", spy_build_trainer)
    monkeypatch.setattr(L.Trainer, "fit", spy_fit)
    return record


# ---------------------------------------------------------------------- in-process: the whole pipeline


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke")
    cfg = make_cfg(run_dir)
    return cfg, run_dir, cli.train(cfg)


@pytest.fixture(scope="module")
def smoke_run_again(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke_again")
    return run_dir, cli.train(make_cfg(run_dir))


@pytest.mark.slow
def test_pipeline_report(smoke_run):
    _, run_dir, entries = smoke_run
    report = read_report(run_dir)
    assert list(report["entries"]) == list(stages.MODEL_STAGES) == list(entries)
    for name, entry in report["entries"].items():
        assert ENTRY_KEYS <= set(entry), name
        assert 0.0 <= entry["test_acc"] <= 1.0
        assert entry["weights_bytes"] > 0 and entry["latency_ms"] > 0
        assert entry["weights_bytes"] == (run_dir / name / "model.pt").stat().st_size
        assert entry["checkpoint_bytes"] == (run_dir / name / "checkpoints" / "last.ckpt").stat().st_size
    assert report["entries"]["teacher"]["params"] == TEACHER_PARAMS
    assert all(report["entries"][s]["params"] == STUDENT_PARAMS for s in stages.STUDENT_STAGES)
    assert [report["entries"][s]["epochs"] for s in stages.MODEL_STAGES] == [2, 2, 2, 1]  # experiment=smoke
    assert report["meta"]["precision"] == "32-true" and report["meta"]["seed"] == 42

    md = (run_dir / "report.md").read_text()
    assert "| model |" in md and "|---|" in md
    assert all(f"| {name} |" in md for name in stages.MODEL_STAGES)
    assert (run_dir / "report.png").stat().st_size > 0
    for stage in stages.MODEL_STAGES:
        assert (run_dir / stage / "metrics.csv").is_file()  # logger=csv: one directory per stage
        assert json.loads((run_dir / stage / "result.json").read_text())["entry"] == entries[stage]


@pytest.mark.slow
def test_checkpoints_are_safe_and_hold_no_teacher(smoke_run):
    _, run_dir, _ = smoke_run
    for stage in stages.MODEL_STAGES:
        checkpoint = torch.load(run_dir / stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        keys = list(checkpoint["state_dict"])
        assert keys and all(k.startswith(("student.", "metrics.")) for k in keys), stage
        assert not any(k.startswith("teacher.") for k in keys), stage
        weights = torch.load(run_dir / stage / "model.pt", weights_only=True)
        assert set(weights) == {k[len("student."):] for k in keys if k.startswith("student.")}


@pytest.mark.slow
def test_same_seed_same_results(smoke_run, smoke_run_again):
    _, run_dir, entries = smoke_run
    run_dir_2, entries_2 = smoke_run_again
    assert accuracies(entries_2) == accuracies(entries)
    for stage in stages.MODEL_STAGES:
        a = torch.load(run_dir / stage / "model.pt", weights_only=True)
        b = torch.load(run_dir_2 / stage / "model.pt", weights_only=True)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), stage


@pytest.mark.slow
def test_rerun_reuses_finished_stages_and_resumes_the_unfinished_one(smoke_run, tmp_path, spy):
    """A crash after the distilled stage's last epoch (before its export): the re-run skips what is done."""
    _, run_dir, entries = smoke_run
    shutil.copytree(run_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "student_distilled" / "result.json").unlink()  # its last.ckpt stays
    shutil.rmtree(tmp_path / "student_distilled_transfer")  # never started
    (tmp_path / "report.json").unlink()

    resumed = cli.train(make_cfg(tmp_path))

    assert spy["built"] == ["student_distilled", "student_distilled_transfer"]  # teacher and scratch reused
    last = tmp_path / "student_distilled" / "checkpoints" / "last.ckpt"
    assert spy["ckpt_path"] == {"student_distilled": str(last), "student_distilled_transfer": None}
    assert resumed["teacher"] == entries["teacher"] and resumed["student_scratch"] == entries["student_scratch"]
    assert accuracies(resumed) == accuracies(entries)
    assert list(read_report(tmp_path)["entries"]) == list(stages.MODEL_STAGES)


@pytest.fixture(scope="module")
def crashed_and_resumed(tmp_path_factory):
    """`task=scratch`: crash at the start of epoch 2 of 2, then re-run the same command in the same directory."""
    run_dir = tmp_path_factory.mktemp("crash")
    cfg = make_cfg(run_dir, "task=scratch")
    with pytest.MonkeyPatch.context() as mp:
        record = install_spy(mp)
        record["extra_callbacks"].append(Crash())
        with pytest.raises(RuntimeError, match="simulated crash"):
            cli.train(cfg)
        assert record["start_step"] == [("student_scratch", 0)]
        checkpoint_after_crash = torch.load(run_dir / "student_scratch" / "checkpoints" / "last.ckpt", weights_only=True)
    with pytest.MonkeyPatch.context() as mp:
        record = install_spy(mp)
        entries = cli.train(cfg)
    return run_dir, checkpoint_after_crash, record, entries


@pytest.mark.slow
def test_crash_resumes_from_last_checkpoint(crashed_and_resumed):
    run_dir, checkpoint_after_crash, record, entries = crashed_and_resumed
    steps_per_epoch = 28  # 3,500 training samples at batch 128
    assert (checkpoint_after_crash["epoch"], checkpoint_after_crash["global_step"]) == (0, steps_per_epoch)
    assert record["ckpt_path"] == {"student_scratch": str(run_dir / "student_scratch" / "checkpoints" / "last.ckpt")}
    assert record["start_step"] == [("student_scratch", steps_per_epoch)]  # epoch 1 only, not from scratch
    assert torch.load(run_dir / "student_scratch" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2 * steps_per_epoch
    assert list(entries) == ["student_scratch"]


@pytest.mark.slow
def test_crash_resume_gives_the_uninterrupted_result(crashed_and_resumed, smoke_run):
    _, _, _, entries = crashed_and_resumed
    assert entries["student_scratch"]["test_acc"] == smoke_run[2]["student_scratch"]["test_acc"]


@pytest.mark.slow
def test_distill_from_a_saved_teacher(smoke_run, tmp_path, spy):
    _, run_dir, entries = smoke_run
    teacher = run_dir / "teacher" / "checkpoints" / "last.ckpt"
    result = cli.train(make_cfg(tmp_path, "task=distill", f"teacher.checkpoint={teacher}"))

    assert list(read_report(tmp_path)["entries"]) == ["teacher", "student_distilled"]
    assert spy["ckpt_path"] == {"student_distilled": None}  # the given teacher is evaluated, not trained
    assert result["teacher"]["epochs"] == 0
    assert result["teacher"]["test_acc"] == entries["teacher"]["test_acc"]
    assert result["teacher"]["params"] == TEACHER_PARAMS
    # same seed, same teacher weights: the same student as the pipeline's distilled one
    assert result["student_distilled"]["test_acc"] == entries["student_distilled"]["test_acc"]


def test_distill_without_a_teacher_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`task=distill` needs a saved teacher: set `teacher.checkpoint=PATH`"):
        cli.train(make_cfg(tmp_path, "task=distill"))
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_missing_teacher_checkpoint_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="Teacher/model checkpoint not found"):
        cli.train(make_cfg(tmp_path, "task=distill", f"teacher.checkpoint={tmp_path / 'nope.ckpt'}"))


# ---------------------------------------------------------------------- offline soft targets


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """The smoke pipeline distilling from a float32 store (built after the teacher stage)."""
    run_dir = tmp_path_factory.mktemp("offline")
    return run_dir, cli.train(make_cfg(run_dir, "soft_targets.offline=true", "soft_targets.dtype=float32"))


@pytest.mark.slow
def test_pipeline_with_stored_soft_targets_matches_online(offline_run, smoke_run):
    run_dir, entries = offline_run
    _, _, online = smoke_run
    store = SoftTargetStore(run_dir / "soft_targets")
    assert store.parts == ["labeled", "unlabeled"] and store.dtype == "float32"
    assert store.manifest["teacher"]["checkpoint"] == str(run_dir / "teacher" / "checkpoints" / "last.ckpt")
    assert list(entries) == list(stages.MODEL_STAGES)  # the soft_targets stage is no row of the report
    assert entries["teacher"] == {**online["teacher"], "latency_ms": entries["teacher"]["latency_ms"]}
    for stage in stages.DISTILLED_STAGES:  # same seed, same teacher outputs, same loss: the same student
        assert entries[stage]["test_acc"] == online[stage]["test_acc"]
        assert entries[stage]["agreement_with_teacher"] is None  # no teacher in memory, none to agree with


@pytest.mark.slow
def test_soft_targets_then_distill_from_the_store_alone(offline_run, smoke_run, tmp_path):
    run_dir, entries = offline_run
    store = run_dir / "soft_targets"
    result = cli.train(make_cfg(tmp_path, "task=distill", "soft_targets.offline=true", f"soft_targets.path={store}"))
    assert list(result) == ["student_distilled"]  # no teacher.checkpoint: no teacher row
    assert result["student_distilled"]["test_acc"] == entries["student_distilled"]["test_acc"]
    # with a teacher checkpoint it is checked against the store: another teacher is refused
    _, online_dir, _ = smoke_run
    other = tmp_path / "other.pt"
    torch.save({k: v + 1 for k, v in torch.load(online_dir / "teacher" / "model.pt").items()}, other)
    with pytest.raises(RuntimeError, match="was made by another teacher"):
        cli.train(make_cfg(tmp_path / "x", "task=distill", "soft_targets.offline=true", f"soft_targets.path={store}",
                           f"teacher.checkpoint={other}"))


@pytest.mark.slow
def test_pipeline_with_replayed_augmented_views(tmp_path):
    """`augment=shift_noise soft_targets.epochs=2`: the store records 2 views per sample and the distilled stages replay them."""
    entries = cli.train(make_cfg(tmp_path, "soft_targets.offline=true", "augment=shift_noise", "soft_targets.epochs=2"))
    store = SoftTargetStore(tmp_path / "soft_targets")
    assert store.epochs == 2 and store.manifest["augmentation"].startswith("Compose([RandomShift(max_shift=3")
    params = store.augmentation_params("labeled", torch.arange(3500), 0)
    assert params.shape == (3500, 2) and not torch.equal(params, store.augmentation_params("labeled", torch.arange(3500), 1))
    assert list(entries) == list(stages.MODEL_STAGES)
    assert all(0.0 <= e["test_acc"] <= 1.0 for e in entries.values())


def test_the_store_is_opened_once_for_all_distilled_stages(offline_run, tmp_path, monkeypatch):
    """Opening hashes every file and fingerprints the teacher: once per run, not once per stage."""
    run_dir, entries = offline_run
    opened = []
    monkeypatch.setattr(stages, "open_store", lambda *args, _open=stages.open_store: opened.append(args) or _open(*args))
    result = cli.train(make_cfg(tmp_path, "task=distill", "soft_targets.offline=true", f"soft_targets.path={run_dir / 'soft_targets'}",
                                "task.stages=[student_distilled,student_distilled_transfer]"))
    assert len(opened) == 1
    assert accuracies(result) == {s: entries[s]["test_acc"] for s in stages.DISTILLED_STAGES}


def test_an_interrupted_store_build_is_rebuilt(smoke_run, tmp_path):
    _, run_dir, _ = smoke_run
    teacher = str(run_dir / "teacher" / "checkpoints" / "last.ckpt")
    cfg = make_cfg(tmp_path, "task=soft_targets", f"teacher.checkpoint={teacher}", "data.transfer_samples=0")
    (tmp_path / "soft_targets" / "train").mkdir(parents=True)
    unfinished = {"kind": "lightning-kd soft-target store", "format": 2, "complete": False, "parts": {"train": {}}}
    (tmp_path / "soft_targets" / "manifest.json").write_text(json.dumps(unfinished))  # ours, interrupted
    assert cli.train(cfg) == {}  # no model trained: no report rows
    store = SoftTargetStore(tmp_path / "soft_targets")
    assert store.parts == ["train"] and store.teacher_fingerprint == store.manifest["teacher"]["fingerprint"]
    mtime = (tmp_path / "soft_targets" / "manifest.json").stat().st_mtime_ns
    cli.train(cfg)  # a finished store is reused, not rebuilt
    assert (tmp_path / "soft_targets" / "manifest.json").stat().st_mtime_ns == mtime


def test_a_pipeline_that_crashed_while_building_the_store_rebuilds_it(offline_run, tmp_path, spy):
    """A re-run in the same directory after a crash in the soft_targets stage: finished stages reused, the store rebuilt."""
    run_dir, entries = offline_run
    shutil.copytree(run_dir, tmp_path, dirs_exist_ok=True)
    for stage in stages.DISTILLED_STAGES:
        shutil.rmtree(tmp_path / stage)
    manifest = tmp_path / "soft_targets" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"complete": true', '"complete": false'))
    (tmp_path / "report.json").unlink()
    resumed = cli.train(make_cfg(tmp_path, "soft_targets.offline=true", "soft_targets.dtype=float32"))
    assert spy["built"] == ["student_distilled", "student_distilled", "student_distilled_transfer"]  # the soft_targets stage builds one too
    assert SoftTargetStore(tmp_path / "soft_targets").manifest["complete"]
    assert accuracies(resumed) == accuracies(entries)


def test_soft_targets_offline_must_be_true_or_false(tmp_path):
    with pytest.raises(ValueError, match=r"Expected `soft_targets.offline` to be true or false, but got 'disk'"):
        cli.train(make_cfg(tmp_path, "soft_targets.offline=disk"))
    assert not any(tmp_path.iterdir())  # refused before anything ran


@pytest.mark.slow
def test_console_script_ddp_cpu_soft_targets_build_and_read(smoke_run, tmp_path):
    """Build the store on 2 gloo processes (each rank writes its own rows), then distil from it under DDP."""
    _, run_dir, online = smoke_run
    teacher = run_dir / "teacher" / "checkpoints" / "last.ckpt"
    store_dir = tmp_path / "store"
    lightning_kd("task=soft_targets", "trainer=ddp_cpu", "soft_targets.dtype=float32", f"teacher.checkpoint={teacher}",
                 f"soft_targets.path={store_dir}", *SMOKE, f"hydra.run.dir={tmp_path / 'store_run'}", cwd=tmp_path, timeout=120)
    ddp = SoftTargetStore(store_dir)
    assert ddp.manifest["world_size"] == 2 and ddp.parts == ["labeled", "unlabeled"]
    for part in ddp.parts:  # complete, no duplicates (the manifest is only sealed then), and the right rows
        assert np.all(np.load(store_dir / part / "writes.npy") == 1)
    cfg = make_cfg(tmp_path / "single", "task=soft_targets", "soft_targets.dtype=float32", f"teacher.checkpoint={teacher}")
    single = stages.build_store(cfg, tmp_path / "single", str(teacher))
    for part in ddp.parts:
        n = ddp.manifest["parts"][part]["identity"]["length"]
        torch.testing.assert_close(ddp.lookup(part, torch.arange(n)), single.lookup(part, torch.arange(n)), rtol=1e-5, atol=1e-5)

    lightning_kd("task=distill", "trainer=ddp_cpu", "soft_targets.offline=true", f"soft_targets.path={store_dir}", f"teacher.checkpoint={teacher}",
                 "task.stages=[teacher,student_distilled_transfer]", *SMOKE, f"hydra.run.dir={tmp_path / 'read'}", cwd=tmp_path, timeout=120)
    report = read_report(tmp_path / "read")
    assert list(report["entries"]) == ["teacher", "student_distilled_transfer"]
    assert 0.1 < report["entries"]["student_distilled_transfer"]["test_acc"] <= 1.0


# ---------------------------------------------------------------------- the console script


@pytest.mark.slow
def test_console_script_ddp_cpu(tmp_path):
    """Two gloo processes; Lightning re-runs the command as rank 1 with Hydra's run dir."""
    run_dir = tmp_path / "run"
    lightning_kd("trainer=ddp_cpu", *SMOKE, f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=120)
    report = read_report(run_dir)
    assert list(report["entries"]) == list(stages.MODEL_STAGES)
    assert all(ENTRY_KEYS <= set(entry) for entry in report["entries"].values())
    assert [report["entries"][s]["params"] for s in stages.MODEL_STAGES] == [TEACHER_PARAMS] + [STUDENT_PARAMS] * 3


@pytest.mark.slow
def test_console_script_ddp_cpu_with_the_progress_bar(tmp_path):
    """`callbacks=default` (the rich progress bar on rank 0 only), one teacher epoch, without a deadlock.

    The deadlock this guards against: a `sync_dist` epoch value that the progress bar reads on rank 0 only, so
    rank 0 enters a collective the other rank never joins. A timeout on the whole run cannot tell that hang from
    a slow, loaded machine (60 s failed under load). So the process group's own timeout detects it instead: a
    collective that waits 300 s for the other rank fails the run with gloo's "Timed out waiting ... for recv".
    That bound is on how long one rank waits for the other at one collective (under a second here), not on how
    long the run takes, so a slow machine does not trip it. (`TORCH_DISTRIBUTED_DEBUG=DETAIL` would name the mismatched
    collectives at once, but torch 2.13's DistributedDataParallel segfaults while it is being built under it.)
    The run's own timeout is only a safety net for a hang of another kind.
    """
    run_dir = tmp_path / "run"
    per_collective = "{_target_:lightning.pytorch.strategies.DDPStrategy,timeout:{_target_:datetime.timedelta,seconds:300}}"
    lightning_kd("trainer=ddp_cpu", f"trainer.strategy={per_collective}", "task=teacher", "teacher.epochs=1", f"hydra.run.dir={run_dir}",
                 cwd=tmp_path, timeout=1200)
    assert list(read_report(run_dir)["entries"]) == ["teacher"]


@pytest.mark.slow
def test_console_script_bf16_mixed(tmp_path):
    run_dir = tmp_path / "run"
    lightning_kd("precision=bf16-mixed", *SMOKE, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    report = read_report(run_dir)
    assert report["meta"]["precision"] == "bf16-mixed"
    assert list(report["entries"]) == list(stages.MODEL_STAGES)
    assert all(0.0 <= entry["test_acc"] <= 1.0 for entry in report["entries"].values())


@pytest.mark.slow
def test_console_script_task_teacher_with_the_default_run_dir(tmp_path):
    """The plain command, default callbacks (rich progress bar) and Hydra's default `outputs/<task>/<time>/`."""
    lightning_kd("task=teacher", "teacher.epochs=1", cwd=tmp_path)
    (run_dir,) = (tmp_path / "outputs" / "teacher").iterdir()
    assert (run_dir / "teacher" / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert list(read_report(run_dir)["entries"]) == ["teacher"]


# ---------------------------------------------------------------------- a user project reusing our configs

USER_CONFIG = """\
# A user project's primary config: lightning-kd's `config`, then this project's own choices.
defaults:
  - config                      # lightning-kd's primary config, found through hydra.searchpath below
  - override student: mlp_tiny  # an option this project adds to lightning-kd's `student` group
  - override task: scratch      # any lightning-kd group can be re-chosen here...
  - override experiment: smoke
  - _self_                      # ...and the values below win over all of the above

hydra:
  searchpath:
    - pkg://lightning_kd.conf

seed: 7
callbacks:
  progress: null
"""
USER_STUDENT = """\
defaults:
  - mlp                         # lightning-kd's student/mlp.yaml, with a narrower hidden layer
model:
  hidden: [32]
"""
USER_SCRIPT = """\
import hydra

from lightning_kd.cli import train


@hydra.main(version_base="1.3", config_path="conf", config_name="my_config")
def main(cfg):
    train(cfg)


if __name__ == "__main__":
    main()
"""


@pytest.fixture
def user_project(tmp_path):
    project = tmp_path / "project"
    (project / "conf" / "student").mkdir(parents=True)
    (project / "conf" / "my_config.yaml").write_text(USER_CONFIG)
    (project / "conf" / "student" / "mlp_tiny.yaml").write_text(USER_STUDENT)
    (project / "my_train.py").write_text(USER_SCRIPT)
    return project


def _check_user_config(cfg: DictConfig) -> None:
    assert list(cfg.student.model.hidden) == [32]
    assert cfg.student.model.name == "mlp" and cfg.student.optimizer.lr == 0.003  # inherited from student/mlp
    assert cfg.task.name == "scratch" and cfg.seed == 7 and cfg.student.epochs == 2


def test_user_config_composes_through_the_searchpath(user_project):
    from hydra import initialize_config_dir

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(user_project / "conf"), version_base="1.3"):
            _check_user_config(compose(config_name="my_config"))
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.slow
def test_user_project_trains_with_our_configs(user_project, tmp_path):
    run_dir = tmp_path / "run"
    run_command([sys.executable, "my_train.py", f"hydra.run.dir={run_dir}"], user_project, timeout=180)
    report = read_report(run_dir)
    assert list(report["entries"]) == ["student_scratch"]
    assert report["entries"]["student_scratch"]["params"] == TINY_STUDENT_PARAMS
    assert report["meta"]["seed"] == 7


@pytest.mark.slow
def test_console_script_with_a_user_config_dir(user_project):
    """`lightning-kd --config-dir DIR --config-name NAME` runs a user's primary config too (here: print it)."""
    out = lightning_kd("--config-dir", str(user_project / "conf"), "--config-name", "my_config", "--cfg", "job", cwd=user_project).stdout
    _check_user_config(OmegaConf.create(out[out.index("seed:") :]))


# ---------------------------------------------------------------------- every method through the CLI

# distill=lm (CausalLMDistillation) needs token data and causal LMs: tests/test_lm_cli.py runs it through the CLI.
DISTILL_OPTIONS = sorted(f.name[: -len(".yaml")] for f in (importlib.resources.files("lightning_kd.conf") / "distill").iterdir()
                         if f.name.endswith(".yaml") and f.name != "lm.yaml")
# A method with an experiment of its name (a bundle: DKD's and CTKD's schedules, AT's convolutional student) runs in it.
BUNDLES = {f.name[: -len(".yaml")] for f in (importlib.resources.files("lightning_kd.conf") / "experiment").iterdir()} - {"smoke.yaml"}
# what each method adds to the logged training metrics, besides the soft and hard losses
LOGGED = {"ctkd": ["train/temperature"], "fitnet": ["train/feature_fitnet"], "at": ["train/feature_at"],
          "kd_at": ["train/feature_at"], "rkd": ["train/feature_rkd"]}
FEW_STEPS = ("task.stages=[student_distilled]", "student.epochs=1", "+trainer.limit_train_batches=4", "trainer.log_every_n_steps=1")


def step_metrics(stage_dir: Path) -> dict[str, list[float]]:
    import csv

    rows = list(csv.DictReader((stage_dir / "metrics.csv").open()))
    return {k: [float(r[k]) for r in rows if r.get(k)] for k in rows[0]}


@pytest.mark.slow
@pytest.mark.parametrize("option", DISTILL_OPTIONS)
def test_every_distill_config_runs_a_few_steps_through_the_cli(smoke_run, tmp_path, option):
    teacher = smoke_run[1] / "teacher" / "checkpoints" / "last.ckpt"
    method = f"experiment=[smoke,{option}]" if option in BUNDLES else f"distill={option}"
    cfg = make_cfg(tmp_path, "task=distill", f"teacher.checkpoint={teacher}", method, *FEW_STEPS)
    assert cfg.hydra.runtime.choices.distill == option
    entries = cli.train(cfg)
    entry = entries["student_distilled"]
    stage = tmp_path / "student_distilled"
    metrics = step_metrics(stage)
    for name in ("train/loss", "train/soft_loss", "train/hard_loss", *LOGGED.get(option, [])):
        assert len(metrics[name]) == 4 and all(math.isfinite(v) for v in metrics[name]), name
    if cfg.distill.alpha > 0:
        assert any(v != 0 for v in metrics["train/soft_loss"])
    # the exported student is the student alone: no adapter, no learned temperature
    student = hydra_model(cfg.student.model)
    assert set(torch.load(stage / "model.pt", weights_only=True)) == set(student.state_dict())
    assert entry["params"] == sum(p.numel() for p in student.parameters())
    state = torch.load(stage / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith("teacher.") for k in state)
    assert any(k.startswith("feature_distillation.adapters.") for k in state) == (option == "fitnet")
    assert any(k.startswith("soft_loss.temperature.") for k in state) == (option == "ctkd")  # the learned temperature


def hydra_model(model_cfg):
    import hydra

    return hydra.utils.instantiate(model_cfg, _convert_="all")


def test_a_schedule_that_sets_a_learned_temperature_is_refused_by_the_module(tmp_path):
    """No cross-check in the CLI: the loss itself refuses to have a learned temperature set (`experiment=ctkd` is the bundle)."""
    teacher = tmp_path / "teacher.pt"
    torch.save(hydra_model(make_cfg(tmp_path).teacher.model).state_dict(), teacher)
    cfg = make_cfg(tmp_path / "run", "task=distill", f"teacher.checkpoint={teacher}", "distill=ctkd", "schedule=anneal_temperature", *FEW_STEPS)
    with pytest.raises(RuntimeError, match=r"sets `temperature` to a float, but `DistillationModule.temperature` is a `LearnableTemperature` "
                                           r"module .* anneal a float attribute of it \(`soft_loss.temperature.<name>`\)"):
        cli.train(cfg)
    assert not (tmp_path / "run" / "student_distilled" / "result.json").exists()


@pytest.mark.slow
def test_two_teachers_through_the_cli(smoke_run, tmp_path):
    teacher = smoke_run[1] / "teacher" / "checkpoints" / "last.ckpt"
    cfg = make_cfg(tmp_path, "task=distill", f"teacher.checkpoint={teacher}", f"teacher.extra=[{teacher}]", "teacher.weights=[3,1]",
                   *FEW_STEPS)
    module = stages.build_module(cfg, "student_distilled", str(teacher))
    assert list(module.teacher) == ["0", "1"] and module.teacher.weights == {"0": 0.75, "1": 0.25}
    x = torch.randn(3, 40)
    single = load_teacher(hydra_model(cfg.teacher.model), teacher)
    torch.testing.assert_close(module.teacher_forward(x), single(x))  # the same teacher twice = that teacher
    entries = cli.train(cfg)
    assert entries["student_distilled"]["params"] == STUDENT_PARAMS


@pytest.mark.slow
def test_feature_distillation_with_a_compiled_student_equals_eager(smoke_run, tmp_path):
    teacher = smoke_run[1] / "teacher" / "checkpoints" / "last.ckpt"
    runs = {}
    for compiled in (False, True):
        run_dir = tmp_path / str(compiled)
        cli.train(make_cfg(run_dir, "task=distill", f"teacher.checkpoint={teacher}", "distill=fitnet", f"speed.compile_student={compiled}",
                           *FEW_STEPS))
        runs[compiled] = step_metrics(run_dir / "student_distilled")
    np.testing.assert_allclose(runs[True]["train/feature_fitnet"], runs[False]["train/feature_fitnet"], rtol=1e-4)
    np.testing.assert_allclose(runs[True]["train/loss"], runs[False]["train/loss"], rtol=1e-4)


@pytest.mark.slow
def test_console_script_ddp_cpu_feature_distillation(smoke_run, tmp_path):
    """FitNet under 2 gloo processes: hooks behind DDP's wrapper, adapters built before it wraps the module."""
    teacher = smoke_run[1] / "teacher" / "checkpoints" / "last.ckpt"
    run_dir = tmp_path / "run"
    lightning_kd("task=distill", "trainer=ddp_cpu", "distill=fitnet", f"teacher.checkpoint={teacher}", *SMOKE, *FEW_STEPS,
                 f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=180)
    metrics = step_metrics(run_dir / "student_distilled")
    assert len(metrics["train/feature_fitnet"]) == 4  # `limit_train_batches` counts per rank; rank 0 logs its steps
    assert all(math.isfinite(v) and v > 0 for v in metrics["train/feature_fitnet"])
    state = torch.load(run_dir / "student_distilled" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert "feature_distillation.adapters.fitnet_0.1.weight" in state


# ---------------------------------------------------------------------- a schedule replaces what it anneals
def test_a_command_line_value_that_the_schedule_replaces_is_refused(tmp_path):
    """Before: `distill.soft_loss.temperature=2 schedule=anneal_temperature` trained at 8 -> 2 and the report said 2."""
    cfg = make_cfg(tmp_path, "schedule=anneal_temperature")
    assert stages.annealed(cfg) == {"distill.soft_loss.temperature": "Linear(start=8.0, end=2.0, warmup=0, warmup_start=None, total=None)"}
    with pytest.raises(ValueError, match=r"`distill.soft_loss.temperature` is set on the command line, but `schedule=anneal_temperature` "
                                         r"anneals it \(Linear\(start=8.0, end=2.0.*or choose `schedule=null`"):
        cli.check_overrides(cfg, ["seed=1", "distill.soft_loss.temperature=2"], "anneal_temperature")
    cli.check_overrides(cfg, ["distill.alpha=0.5", "schedule.temperature.start=4"], "anneal_temperature")  # not annealed; the schedule's own
    cfg = make_cfg(tmp_path, "experiment=ctkd")
    assert list(stages.annealed(cfg)) == ["distill.soft_loss.temperature.grl_weight"]
    with pytest.raises(ValueError, match=r"`distill.soft_loss.temperature.grl_weight` is set on the command line"):
        cli.check_overrides(cfg, ["++distill.soft_loss.temperature.grl_weight=0.5"], "ctkd")


@pytest.mark.slow
def test_the_console_script_refuses_an_override_that_the_schedule_replaces(tmp_path):
    script = shutil.which("lightning-kd", path=os.path.dirname(sys.executable))
    out = subprocess.run([script, *SMOKE, "schedule=anneal_alpha", "distill.alpha=0.3", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    assert "`distill.alpha` is set on the command line, but `schedule=anneal_alpha` anneals it (Cosine(start=0.9, end=0.1" in out.stderr
    assert not (tmp_path / "run" / "teacher").exists()  # refused before any stage ran


@pytest.mark.slow
def test_the_report_names_the_schedule_of_an_annealed_value(smoke_run, tmp_path):
    teacher = smoke_run[1] / "teacher" / "checkpoints" / "last.ckpt"
    run_dir = tmp_path / "run"
    cli.train(make_cfg(run_dir, "task=distill", f"teacher.checkpoint={teacher}", "schedule=anneal_alpha", *FEW_STEPS))
    meta = read_report(run_dir)["meta"]
    schedule = "Cosine(start=0.9, end=0.1, warmup=0, warmup_start=None, total=None)"
    assert meta["alpha"] == schedule and meta["annealed"] == {"distill.alpha": schedule}
    assert meta["temperature"] == 4.0  # not annealed: the loss's own
    # what ran: alpha along the half cosine over the 4 steps, 0.5 (1 + cos(pi s / 4)) scaled to [0.1, 0.9]
    expected = [0.1 + 0.8 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]
    np.testing.assert_allclose(step_metrics(run_dir / "student_distilled")["kd/alpha"], expected, rtol=1e-6)


# ---------------------------------------------------------------------- a user's subclass in every stage
class SmoothedLabels(DistillationModule):
    """A user's subclass with an argument of its own: label smoothing in the hard loss of every stage."""

    def __init__(self, *args, label_smoothing: float = 0.0, **kwargs):
        kwargs["hard_loss"] = functools.partial(torch.nn.functional.cross_entropy, label_smoothing=label_smoothing)
        super().__init__(*args, **kwargs)
        self.label_smoothing = label_smoothing


def test_the_teacher_and_scratch_stages_keep_a_subclass_argument(tmp_path):
    """Before: they were built with `hard_loss` alone, so `label_smoothing` trained only the distilled stage."""
    cfg = make_cfg(tmp_path, f"distill._target_={__name__}.SmoothedLabels", "+distill.label_smoothing=0.2", "distill.alpha=0.7")
    for stage in ("teacher", "student_scratch"):
        module = stages.build_module(cfg, stage, None)
        assert type(module) is SmoothedLabels and module.label_smoothing == 0.2 and module.teacher is None
        logits, targets = torch.randn(5, 10, dtype=torch.float64), torch.tensor([0, 3, 9, 2, 2])
        # float64 reference: (1 - eps) * NLL + eps * mean over classes of -log p
        log_p = torch.log_softmax(logits, dim=-1)
        reference = (0.8 * -log_p[torch.arange(5), targets] + 0.2 * -log_p.mean(-1)).mean()
        loss = module.distillation_loss(logits.float(), None, targets)["loss"]
        assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
        assert module.alpha == 0.9  # a distillation-only setting stays at its default without a teacher
