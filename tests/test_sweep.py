"""Sweeps: a Hydra multirun summarised per config (mean ± std over seeds), the objective a sweeper optimizes,
and an Optuna search of T and alpha (examples/optuna_sweep.yaml) when hydra-optuna-sweeper is installed.

The end-to-end ones run the ``lightning-kd`` console script: ``task=distill`` from a saved (untrained) cnn1d
teacher, one student epoch of 2 batches per job.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from test_cli import run_command

from lightning_kd import cli, report, sweep
from lightning_kd.models import get_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ("student.epochs=1", "+trainer.limit_train_batches=2", "callbacks=quiet", "report.plot=false", "report.latency_batches=2")


def lightning_kd(*args: str, cwd: Path, timeout: float = 240) -> str:
    script = shutil.which("lightning-kd", path=os.path.dirname(sys.executable))
    assert script is not None, "the `lightning-kd` console script is not installed next to this Python"
    return run_command([script, *args], cwd, timeout=timeout).stdout


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(0)
    torch.save(get_model("cnn1d").state_dict(), path)
    return path


def jobs(sweep_dir: Path) -> list[tuple[dict[str, str], Path]]:
    """Each job's overrides (``key: value``) and its directory, read back from what Hydra wrote."""
    found = []
    for job in sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        found.append(({o.split("=", 1)[0].lstrip("+"): o.split("=", 1)[1] for o in overrides}, job))
    return found


def stage_result(job: Path, stage: str) -> dict:
    return json.loads((job / stage / "result.json").read_text())["entry"]


# ---------------------------------------------------------------------- a multirun, summarised per config


@pytest.mark.slow
def test_a_multirun_is_summarised_per_config_with_mean_and_std_over_seeds(teacher_checkpoint, tmp_path, capsys):
    sweep_dir = tmp_path / "multirun"
    lightning_kd("-m", "task=distill", f"teacher.checkpoint={teacher_checkpoint}", "distill.soft_loss.temperature=1,4",
                 "distill.alpha=0.5", "seed=1,2", *TINY, f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    ran = jobs(sweep_dir)
    assert len(ran) == 4

    report.main(["--sweep", str(sweep_dir)])
    printed = capsys.readouterr().out
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert (sweep_dir / "sweep_summary.md").read_text() == printed.rstrip("\n") + "\n"
    assert summary["unfinished_jobs"] == []
    assert summary["shared_overrides"]["distill.alpha"] == "0.5" and "seed" not in summary["shared_overrides"]
    assert [c["overrides"] for c in summary["configs"]] == [{"distill.soft_loss.temperature": "1"}, {"distill.soft_loss.temperature": "4"}]
    for config in summary["configs"]:
        temperature = config["overrides"]["distill.soft_loss.temperature"]
        mine = [(o["seed"], job) for o, job in ran if o["distill.soft_loss.temperature"] == temperature]
        assert config["seeds"] == [seed for seed, _ in mine] == ["1", "2"]
        for stage in ("teacher", "student_distilled"):
            values = np.array([stage_result(job, stage)["test_acc"] for _, job in mine], dtype=np.float64)
            mean, std = float(values.mean()), float(values.std(ddof=1))
            got = config["test_acc"][stage]
            assert got["n"] == 2 and got["values"] == pytest.approx(values.tolist(), abs=0)
            assert got["mean"] == pytest.approx(mean, rel=1e-12) and got["std"] == pytest.approx(std, rel=1e-9, abs=1e-15)
            assert f"{100 * mean:.2f} ± {100 * std:.2f} %" in printed
        row = next(line for line in printed.splitlines() if line.startswith(f"| {temperature} | 2 | 1, 2 |"))
        assert row.count("±") == 2  # the teacher's and the student's column
    # the two seeds of one config really differ (the summary is over different runs), the teacher is the same file
    assert summary["configs"][0]["test_acc"]["student_distilled"]["std"] > 0
    assert summary["configs"][0]["test_acc"]["teacher"]["std"] == 0.0

    # what a sweeper would be given: the last epoch's validation accuracy, as the stage logged it
    for _, job in ran:
        rows = list(csv.DictReader((job / "student_distilled" / "metrics.csv").open()))
        logged = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
        assert stage_result(job, "student_distilled")["val_acc"] == pytest.approx(logged[-1], rel=1e-7)


# ---------------------------------------------------------------------- the summary, on hand-written jobs


def fake_job(root: Path, num: int, overrides: list[str], accuracy: dict[str, float] | None) -> None:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if accuracy is not None:
        entries = {stage: {"test_acc": acc, "params": 10} for stage, acc in accuracy.items()}
        (job / "report.json").write_text(json.dumps({"entries": entries, "meta": {}}))


def test_the_summary_groups_by_overrides_without_the_seed(tmp_path):
    accs = {("0.5", "1"): 0.80, ("0.5", "2"): 0.84, ("0.5", "3"): 0.83, ("0.9", "1"): 0.70}
    for num, ((alpha, seed), acc) in enumerate(accs.items()):
        fake_job(tmp_path, num, [f"distill.alpha={alpha}", f"seed={seed}", "student.epochs=1"], {"student_distilled": acc})
    fake_job(tmp_path, 4, ["distill.alpha=0.9", "seed=2", "student.epochs=1"], None)  # still running, or crashed
    configs, shared, unfinished = sweep.summarize_sweep(tmp_path)
    assert shared == {"student.epochs": "1"} and unfinished == [str(tmp_path / "4")]
    assert [c.overrides["distill.alpha"] for c in configs] == ["0.5", "0.9"]
    first = np.array([0.80, 0.84, 0.83])
    assert configs[0].seeds == ("1", "2", "3") and configs[0].accuracy["student_distilled"] == tuple(first)
    assert configs[0].mean("student_distilled") == pytest.approx(first.mean(), rel=1e-15)
    assert configs[0].std("student_distilled") == pytest.approx(first.std(ddof=1), rel=1e-12)
    assert configs[1].std("student_distilled") is None  # one seed: no spread to report
    text = report.sweep_markdown(sweep.as_json(configs, shared, unfinished), "fake")
    assert f"| 0.5 | 3 | 1, 2, 3 | {100 * first.mean():.2f} ± {100 * first.std(ddof=1):.2f} % |" in text
    assert "| 0.9 | 1 | 1 | 70.00 ± – % |" in text and f"left out: {tmp_path / '4'}" in text


def test_a_config_with_a_seed_twice_is_refused(tmp_path):
    fake_job(tmp_path, 0, ["distill.alpha=0.5", "seed=1"], {"student_distilled": 0.8})
    fake_job(tmp_path, 1, ["distill.alpha=0.5", "seed=1"], {"student_distilled": 0.7})
    with pytest.raises(ValueError, match=r"run each seed once, but \['distill.alpha=0.5'\] ran seed\(s\) \['1'\] more than once"):
        sweep.summarize_sweep(tmp_path)


def test_a_directory_without_jobs_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No Hydra job under .*expected the directory of a multirun"):
        sweep.summarize_sweep(tmp_path)


# ---------------------------------------------------------------------- the objective returned to a sweeper


def objective_cfg(objective, stages=("teacher", "student_distilled")):
    return OmegaConf.create({"objective": objective, "task": {"stages": list(stages)}})


def test_the_objective_is_the_named_number_of_the_named_stage():
    entries = {"teacher": {"test_acc": 0.9}, "student_distilled": {"test_acc": 0.8, "val_acc": 0.75, "checkpoint": "x"}}
    assert cli.objective(objective_cfg("student_distilled.val_acc"), entries) == 0.75
    assert cli.objective(objective_cfg(None), entries) is None
    with pytest.raises(ValueError, match=r"`objective=student_distilled.checkpoint` to name a number of the student_distilled "
                                         r"entry \(test_acc, val_acc\), but got 'x'"):
        cli.objective(objective_cfg("student_distilled.checkpoint"), entries)


@pytest.mark.parametrize("objective", ["student_scratch.val_acc", "student_distilled", "val_acc"])
def test_an_objective_outside_the_tasks_stages_is_refused_before_training(objective):
    with pytest.raises(ValueError, match=r"Expected `objective` to be `<stage>.<report entry key>` with a stage of "
                                         r"`task.stages` \(teacher, student_distilled\)"):
        cli.check_objective(objective_cfg(objective))


# ---------------------------------------------------------------------- Optuna (the `sweep` extra)


@pytest.mark.slow
def test_optuna_searches_temperature_and_alpha_on_the_validation_accuracy(teacher_checkpoint, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep_dir = tmp_path / "optuna"
    lightning_kd("-m", "--config-dir", str(EXAMPLES), "--config-name", "optuna_sweep", f"teacher.checkpoint={teacher_checkpoint}",
                 "hydra.sweeper.n_trials=2", *TINY, f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    trials = jobs(sweep_dir)
    assert len(trials) == 2
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    scores = [stage_result(job, "student_distilled")["val_acc"] for _, job in trials]
    best = int(np.argmax(scores))
    assert results["best_value"] == pytest.approx(scores[best], rel=1e-12)
    searched = {k: float(v) for k, v in trials[best][0].items() if k in ("distill.soft_loss.temperature", "distill.alpha")}
    assert results["best_params"] == pytest.approx(searched, rel=1e-12)
    for overrides, job in trials:  # inside the search space, and the run used the trial's values
        temperature, alpha = float(overrides["distill.soft_loss.temperature"]), float(overrides["distill.alpha"])
        assert 1.0 <= temperature <= 8.0 and 0.1 <= alpha <= 0.95
        distill = json.loads((job / "student_distilled" / "result.json").read_text())["stage_config"]["config"]["distill"]
        assert distill["soft_loss"]["temperature"] == pytest.approx(temperature) and distill["alpha"] == pytest.approx(alpha)
    summary, _ = report.write_sweep_summary(sweep_dir)  # one row per trial
    assert [c["seeds"] for c in summary["configs"]] == [["42"], ["42"]]  # not swept: the config's seed, from .hydra/config.yaml
