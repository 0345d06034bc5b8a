"""Faults a run meets in real life, through the ``lightning-kd`` console script where it matters: SIGTERM
and kill -9 mid-stage, a moved run directory, a truncated or booby-trapped ``last.ckpt``, a re-run
under other settings; and settings that would be ignored (trainer-wide limits, negative epochs).

No test depends on the machine's speed: a process is signalled once a file it writes has appeared.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from test_cli import SMOKE, _one_thread_and_restored_globals, communicate_or_kill, make_cfg, read_report  # noqa: F401 (an autouse fixture)

from lightning_kd import cli, report, runs, stages
from lightning_kd.checkpoint import CheckpointError

SCRATCH = ("task=scratch", *SMOKE, "student.epochs=3")  # 3 epochs: a stop after the first one leaves two to resume
DISTILL = ("task.stages=[teacher,student_distilled]", *SMOKE)




def start(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``lightning-kd ARGS`` in its own process group, output captured."""
    script = shutil.which("lightning-kd", path=os.path.dirname(sys.executable))
    assert script is not None, "the `lightning-kd` console script is not installed next to this Python"
    env = {**os.environ, "LIGHTNING_KD_DATA": str(Path(os.environ["LIGHTNING_KD_DATA"]).resolve()), "OMP_NUM_THREADS": "1",
           **(env or {})}
    return subprocess.Popen([script, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, *, timeout: float = 240) -> tuple[int, str]:
    out = communicate_or_kill(proc, timeout)
    return proc.returncode, out


def kd(*args: str, cwd: Path, env: dict[str, str] | None = None, ok: bool = True) -> str:
    """Run ``lightning-kd ARGS`` to its end; with ``ok`` it must succeed, else it must fail."""
    code, out = finish(start(*args, cwd=cwd, env=env))
    assert (code == 0) == ok, f"lightning-kd {' '.join(args)} exited with {code}:\n{out[-4000:]}"
    return out


def wait_for(path: Path, proc: subprocess.Popen, *, timeout: float = 240) -> None:
    """Poll until ``path`` exists; fail if the process ends first (it was meant to be interrupted)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) before {path} appeared:\n{proc.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.02)


def same_result(run_dir: Path, reference: Path, stage: str) -> None:
    """Same accuracy and bit-identical exported weights as the reference run's stage."""
    assert read_report(run_dir)["entries"][stage]["test_acc"] == read_report(reference)["entries"][stage]["test_acc"]
    a, b = (torch.load(d / stage / "model.pt", weights_only=True) for d in (run_dir, reference))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def copy_unfinished(source: Path, target: Path, stage: str) -> Path:
    """A copy of a finished run whose ``stage`` looks interrupted after its last epoch (checkpoints, no result)."""
    shutil.copytree(source, target)
    (target / stage / runs.RESULT).unlink()
    for name in ("report.json", "report.md", "report.png"):
        (target / name).unlink()
    return target


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("faults") / "scratch"
    kd(*SCRATCH, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    return run_dir


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("faults") / "distill"
    kd(*DISTILL, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    return run_dir


# ---------------------------------------------------------------------- stopped mid-stage


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_a_run_stopped_mid_stage_resumes_to_the_uninterrupted_result(scratch_run, tmp_path, sig):
    """SIGTERM (a scheduler) exits with 143 after keeping the checkpoints; kill -9 leaves them too. Either way no
    result or report is written, and the same command finishes the stage with the uninterrupted run's weights."""
    run_dir = tmp_path / "run"
    proc = start(*SCRATCH, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    last = run_dir / "student_scratch" / "checkpoints" / "last.ckpt"
    wait_for(last, proc)  # the first epoch has finished and was checkpointed: two remain
    os.kill(proc.pid, sig)
    code, out = finish(proc)

    if sig == signal.SIGTERM:
        assert code == runs.SIGTERM_EXIT_CODE == 143, out[-4000:]
        assert "Stage student_scratch stopped by SIGTERM" in out and f"hydra.run.dir={run_dir}" in out
    else:
        assert code == -signal.SIGKILL
    assert last.is_file() and not (run_dir / "student_scratch" / runs.RESULT).exists()
    assert not (run_dir / "report.json").exists()
    assert torch.load(last, weights_only=True)["epoch"] < 2  # stopped before the end
    metrics = run_dir / "student_scratch" / "metrics.csv"
    logged = metrics.read_text() if metrics.is_file() else None  # SIGTERM's teardown flushes it; kill -9 may not
    if sig == signal.SIGTERM:
        assert logged is not None

    kd(*SCRATCH, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    same_result(run_dir, scratch_run, "student_scratch")
    if logged is not None:  # Lightning's CSV logger deletes a resumed stage's metrics.csv: ours was kept aside
        assert (metrics.parent / "metrics.1.csv").read_text() == logged and metrics.is_file()


# ---------------------------------------------------------------------- damaged or foreign checkpoints


@pytest.mark.slow
def test_a_truncated_last_ckpt_falls_back_to_the_newest_intact_checkpoint(scratch_run, tmp_path):
    run_dir = copy_unfinished(scratch_run, tmp_path / "run", "student_scratch")
    last = run_dir / "student_scratch" / "checkpoints" / "last.ckpt"
    with last.open("r+b") as f:  # a full disk: the second half never reached it
        f.truncate(last.stat().st_size // 2)

    out = kd(*SCRATCH, f"hydra.run.dir={run_dir}", cwd=tmp_path)

    assert "last.ckpt" in out and "truncated" in out and "Resuming from" in out and "epoch=2-step=84.ckpt" in out
    same_result(run_dir, scratch_run, "student_scratch")


@pytest.mark.slow
def test_a_pickled_payload_in_last_ckpt_is_never_run(scratch_run, tmp_path):
    """Even with torch's escape hatch TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 set, the payload does not run."""
    run_dir = copy_unfinished(scratch_run, tmp_path / "run", "student_scratch")
    marker = tmp_path / "payload-ran"
    plant_payload(run_dir / "student_scratch" / "checkpoints" / "last.ckpt", marker)

    out = kd(*SCRATCH, f"hydra.run.dir={run_dir}", cwd=tmp_path, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}, ok=False)

    assert not marker.exists()
    assert "holds objects other than tensors and plain values, so it is refused" in out and "Delete it" in out
    assert not (run_dir / "student_scratch" / runs.RESULT).exists()


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # what unpickling would run: create the marker file


def plant_payload(path: Path, marker: Path) -> None:
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["payload"] = Payload(marker)
    torch.save(checkpoint, path)


@pytest.mark.slow
def test_lightning_resumes_with_weights_only(scratch_run, tmp_path, monkeypatch):
    """Past our own check of the resume checkpoint, `Trainer.fit` itself loads it with weights_only=True."""
    run_dir = copy_unfinished(scratch_run, tmp_path / "run", "student_scratch")
    last = run_dir / "student_scratch" / "checkpoints" / "last.ckpt"
    marker = tmp_path / "payload-ran"
    plant_payload(last, marker)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setattr(runs, "resume_checkpoint", lambda stage_dir: last)  # skip our check
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        cli.train(make_cfg(run_dir, "task=scratch", "student.epochs=3"))
    assert not marker.exists()


def _checkpoint(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {"w": torch.ones(64)}}, path)
    return path


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_resume_checkpoint_choice(tmp_path, caplog):
    stage = tmp_path / "student_scratch"
    folder = stage / "checkpoints"
    assert runs.resume_checkpoint(stage) is None  # nothing yet: train from the start
    last, epoch = _checkpoint(folder / "last.ckpt", 56), _checkpoint(folder / "epoch=1-step=56.ckpt", 56)
    _checkpoint(folder / "epoch=0-step=28.ckpt", 28)
    assert runs.resume_checkpoint(stage) == last

    _truncate(last)
    with caplog.at_level(logging.WARNING, logger="lightning_kd"):
        assert runs.resume_checkpoint(stage) == epoch
    assert "last.ckpt" in caplog.text and "truncated" in caplog.text and "epoch=1-step=56.ckpt" in caplog.text

    caplog.clear()
    _truncate(epoch)
    (folder / "epoch=0-step=28.ckpt").write_bytes(b"")  # empty
    with caplog.at_level(logging.WARNING, logger="lightning_kd"):
        assert runs.resume_checkpoint(stage) is None  # none intact: the stage starts over
    assert "No intact checkpoint" in caplog.text and "from the start" in caplog.text

    hpc = _checkpoint(stage / "hpc_ckpt_1.ckpt", 70)  # Lightning's SLURM requeue save, later than last.ckpt
    _checkpoint(last, 56)
    assert runs.resume_checkpoint(stage) == hpc

    marker = tmp_path / "payload-ran"
    plant_payload(last, marker)
    with pytest.raises(CheckpointError, match="so it is refused.*Delete it"):
        runs.resume_checkpoint(stage)
    assert not marker.exists()


def test_checkpoints_are_written_atomically(tmp_path):
    """A save that fails halfway (a full disk) leaves the previous checkpoint whole and no temporary file."""
    io, path = runs.AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    with pytest.raises(Exception):
        io.save_checkpoint({"global_step": 2, "unpicklable": lambda: None}, path)
    assert torch.load(path, weights_only=True) == {"global_step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    trainer = stages.build_trainer(make_cfg(tmp_path), "student_scratch", tmp_path / "student_scratch", max_epochs=1)
    assert isinstance(trainer.strategy.checkpoint_io, runs.AtomicCheckpointIO)
    assert trainer.default_root_dir == str(tmp_path / "student_scratch")  # where Lightning's hpc_ckpt_N.ckpt go


# ---------------------------------------------------------------------- the run directory moves or the settings change


@pytest.mark.slow
def test_a_moved_run_directory_resumes_and_its_paths_resolve(distill_run, tmp_path):
    moved = tmp_path / "moved"
    os.rename(copy_unfinished(distill_run, tmp_path / "original", "student_distilled"), moved)  # `mv`: the original is gone

    kd(*DISTILL, f"hydra.run.dir={moved}", cwd=tmp_path)

    entries = read_report(moved)["entries"]
    for stage in ("teacher", "student_distilled"):
        assert entries[stage]["checkpoint"] == f"{stage}/checkpoints/last.ckpt"  # relative to the report
        assert (moved / entries[stage]["checkpoint"]).is_file()
        assert json.loads((moved / stage / runs.RESULT).read_text())["checkpoint"] == f"{stage}/checkpoints/last.ckpt"
    same_result(moved, distill_run, "student_distilled")


def test_a_given_teacher_outside_the_run_directory_stays_absolute_and_another_is_refused(tmp_path):
    teacher = tmp_path / "teacher.pt"
    torch.save(hydra.utils.instantiate(make_cfg(tmp_path).teacher.model).state_dict(), teacher)
    run_dir = tmp_path / "run"
    evaluated = ("task=distill", "task.stages=[teacher]")  # the given teacher is only evaluated: seconds
    entries = cli.train(make_cfg(run_dir, *evaluated, f"teacher.checkpoint={teacher}"))
    assert entries["teacher"]["checkpoint"] == str(teacher.resolve())
    assert read_report(run_dir)["meta"]["teacher_checkpoint"] == str(teacher.resolve())

    other = tmp_path / "other.pt"
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in torch.load(teacher).items()}, other)
    with pytest.raises(runs.StageConfigError, match=r"Stage `teacher` .* was finished under other settings: teacher\.checkpoint_sha256"):
        cli.train(make_cfg(run_dir, *evaluated, f"teacher.checkpoint={other}"))


@pytest.mark.slow
def test_a_rerun_under_other_settings_is_refused(distill_run, tmp_path):
    """Trained at T=4, re-run at T=1: refused (not reused and reported as T=1), finished or interrupted."""
    run_dir = tmp_path / "run"
    shutil.copytree(distill_run, run_dir)
    before = (run_dir / "report.json").read_text()

    out = kd(*DISTILL, "distill.soft_loss.temperature=1", f"hydra.run.dir={run_dir}", cwd=tmp_path, ok=False)

    assert "Stage `student_distilled`" in out and "was finished under other settings" in out
    assert "distill.soft_loss.temperature: 4.0 → 1" in out
    assert "hydra.run.dir=" in out and "delete" in out
    assert (run_dir / "report.json").read_text() == before

    (run_dir / "student_distilled" / runs.RESULT).unlink()  # interrupted: a checkpoint and the settings it started with
    out = kd(*DISTILL, "distill.soft_loss.temperature=1", f"hydra.run.dir={run_dir}", cwd=tmp_path, ok=False)
    assert "was started (it has a checkpoint) under other settings: distill.soft_loss.temperature: 4.0 → 1" in out


def test_stage_settings_leave_out_where_things_are_written(tmp_path):
    a = runs.stage_record(make_cfg(tmp_path / "a"), "student_distilled", teacher=None)
    b = runs.stage_record(make_cfg(tmp_path / "b", "logger=none", "report.latency_batches=7", "data.num_workers=1",
                                   f"soft_targets.path={tmp_path / 'store'}"), "student_distilled", teacher=None)
    assert a == b
    c = runs.stage_record(make_cfg(tmp_path / "a", "distill.soft_loss.temperature=2", "student.transfer_epochs=5"), "student_distilled",
                          teacher=None)
    assert [k for k, _, _ in runs.differences(a, c)] == ["distill.soft_loss.temperature"]
    assert runs.record_hash(make_record(4)) == runs.record_hash(make_record(4.0))  # `temperature=4` is `4.0`


def make_record(temperature):
    return {"stage": "student_distilled", "config": {"distill": {"temperature": temperature}}, "teacher": None}


# ---------------------------------------------------------------------- settings honoured or refused


@pytest.mark.parametrize("override", ["trainer.max_epochs=1", "+trainer.max_steps=10", "+trainer.min_epochs=3",
                                      "+trainer.min_steps=5", "+trainer.max_time='00:00:10:00'"])
def test_trainer_wide_limits_are_refused(tmp_path, override):
    key = override.lstrip("+").split("=")[0]
    match = rf"Expected `{key}` to be null, but got .*`teacher.epochs`, `student.epochs` .* `student.transfer_epochs`"
    with pytest.raises(ValueError, match=match):
        cli.train(make_cfg(tmp_path, override))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before anything ran


@pytest.mark.parametrize("override", ["student.epochs=-1", "student.epochs=0", "student.epochs=2.5", "teacher.epochs=true",
                                      "student.transfer_epochs=-1"])
def test_epochs_must_be_an_integer_of_at_least_one(tmp_path, override):
    key, value = override.split("=")
    with pytest.raises(ValueError, match=rf"Expected `{key}` to be an integer >= 1 .*but got {value.title() if value == 'true' else value}"):
        cli.train(make_cfg(tmp_path, override, "student.lr_scheduler=null"))  # -1 with no scheduler: train forever


def test_a_given_teacher_needs_no_epochs(tmp_path):
    cfg = make_cfg(tmp_path, "task=distill", "teacher.checkpoint=t.ckpt", "teacher.epochs=0")
    runs.check_lengths(cfg, ["teacher", "student_distilled"])  # evaluated only: no error


# ---------------------------------------------------------------------- SLURM and SIGTERM handlers


SLURM = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "kd", "SLURM_JOB_ID": "123", "SLURM_NODELIST": "node1", "SLURM_LOCALID": "0",
         "SLURM_PROCID": "0", "SLURM_NODEID": "0"}


def test_on_slurm_lightning_requeues_and_our_sigterm_handler_only_chains(tmp_path, monkeypatch):
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    trainer = stages.build_trainer(make_cfg(tmp_path), "student_scratch", tmp_path / "student_scratch", max_epochs=1)
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue

    with runs.sigterm_stops_the_run():
        ours = signal.getsignal(signal.SIGTERM)
        with pytest.raises(runs.Interrupted, match="Stopped by SIGTERM"):
            ours(signal.SIGTERM, None)  # outside Lightning's loops: stop at once
        connector = trainer._signal_connector
        connector.register_signal_handlers()  # what fit/test do
        try:
            composed = signal.getsignal(signal.SIGTERM)
            names = [getattr(h, "__name__", type(h).__name__) for h in composed.signal_handlers]
            assert names == ["_sigterm_notifier_fn", "_sigterm_handler_fn", "_StopOnSigterm"]  # Lightning's first
            assert type(signal.getsignal(environment.requeue_signal)).__name__ == "_HandlersCompose"  # hpc save + requeue
            composed(signal.SIGTERM, None)  # Lightning notes it (and stops at the end of the batch); ours does not raise
            assert trainer.received_sigterm
        finally:
            connector.teardown()
        assert signal.getsignal(signal.SIGTERM) is ours  # restored after the loop
    assert signal.getsignal(signal.SIGTERM) is not ours


# ---------------------------------------------------------------------- summaries group runs by their settings


def _report(root: Path, name: str, seed: int, temperature: float, acc: float) -> None:
    settings = {"student_distilled": {"distill": {"temperature": temperature}}}
    meta = {"seed": seed, "temperature": temperature, "stage_settings": {"student_distilled": str(temperature)}}
    report.write_report({"student_distilled": {"test_acc": acc, "params": 10, "latency_ms": 1.0}}, root / name, meta=meta,
                        plot=False, settings=settings)


def test_summaries_never_average_over_different_settings(tmp_path, capsys):
    for name, seed, temperature, acc in [("t4s1", 1, 4.0, 0.8), ("t4s2", 2, 4.0, 0.7), ("t1s1", 1, 1.0, 0.6)]:
        _report(tmp_path, name, seed, temperature, acc)
    with pytest.raises(ValueError, match=r"differ only in their seed, but they form 2 groups .*temperature: 1.0, 4.0"):
        report.summarize([tmp_path])
    groups = report.summarize_groups([tmp_path])
    assert sorted((settings["distill.temperature"], table["student_distilled"]["test_acc"]) for settings, table, _ in groups) == [
        (1.0, [0.6]), (4.0, [0.8, 0.7])]
    report.main([str(tmp_path)])
    printed = capsys.readouterr().out
    assert printed.count("| model | runs |") == 2 and "distill.temperature=4.0" in printed

    table, text = report.summarize([tmp_path / "t4s1", tmp_path / "t4s2"])  # seeds only: one table, as before
    assert table["student_distilled"]["test_acc"] == [0.8, 0.7] and "| student_distilled | 2 | 75.0 ± 7.1 %" in text


@pytest.mark.parametrize("teacher", ["missing", "given"])
def test_a_soft_targets_path_holding_user_files_is_never_deleted(scratch_run, tmp_path, teacher):
    """`task=soft_targets soft_targets.path=DIR` where DIR holds the user's files and a manifest.json of theirs (the issue's rmtree)."""
    folder = tmp_path / "my_folder"
    folder.mkdir()
    files = {"manifest.json": json.dumps({"project": "mine", "complete": False}), "notes.txt": "keep me", "data.csv": "1,2\n"}
    for name, text in files.items():
        (folder / name).write_text(text)
    checkpoint = scratch_run / "student_scratch" / "checkpoints" / "last.ckpt" if teacher == "given" else tmp_path / "nowhere.ckpt"
    cfg = make_cfg(tmp_path / "run", "task=soft_targets", f"teacher.checkpoint={checkpoint}", f"soft_targets.path={folder}",
                   "teacher.model.name=mlp", "data.transfer_samples=0")
    expected = (FileNotFoundError, r"nowhere\.ckpt") if teacher == "missing" else (FileExistsError, r"Nothing was deleted")
    with pytest.raises(expected[0], match=expected[1]):
        cli.train(cfg)
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    assert all((folder / name).read_text() == text for name, text in files.items())


@pytest.mark.parametrize("override", ["soft_targets.dtype=bfloat16", "soft_targets.top_k=3"])
def test_an_existing_store_built_with_other_soft_targets_settings_is_refused(scratch_run, tmp_path, override):
    """Reusing a finished store must not silently ignore `soft_targets.*` settings that would build another one."""
    teacher = scratch_run / "student_scratch" / "checkpoints" / "last.ckpt"
    common = ("task=soft_targets", f"teacher.checkpoint={teacher}", "teacher.model.name=mlp", "data.transfer_samples=0",
              f"soft_targets.path={tmp_path / 'store'}")
    cli.train(make_cfg(tmp_path / "build", *common, "soft_targets.dtype=float32"))
    key, value = override.split("=")
    with pytest.raises(ValueError, match=rf"`{key}`: stored .*, configured '?{value}'?.*another `soft_targets.path`"):
        cli.train(make_cfg(tmp_path / "reuse", *common, override))
