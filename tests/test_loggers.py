"""``logger=csv|tensorboard|mlflow``: one tiny distilled stage per logger (same seed, same numbers), read back from
what each logger wrote: CSV rows, TensorBoard event files, and MLflow's local file store."""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from lightning_kd import cli, stages
from lightning_kd.models import get_model

STAGE = "student_distilled"
STEPS = 4
LOGGERS = ("csv", "tensorboard", "mlflow")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{logger: run_dir}``: the same one-epoch, four-step distilled stage, logged by each logger."""
    root = tmp_path_factory.mktemp("loggers")
    torch.manual_seed(0)
    teacher = root / "teacher.pt"
    torch.save(get_model("cnn1d").state_dict(), teacher)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    monkeypatch = pytest.MonkeyPatch()
    try:
        for logger in LOGGERS:
            run_dir = root / logger
            GlobalHydra.instance().clear()
            with initialize_config_module(config_module="lightning_kd.conf", version_base="1.3"):
                cfg = compose(config_name="config", return_hydra_config=True, overrides=[
                    f"run_dir={run_dir}", "experiment=smoke", "callbacks=quiet", "task=distill", f"teacher.checkpoint={teacher}",
                    f"task.stages=[{STAGE}]", "student.epochs=1", f"+trainer.limit_train_batches={STEPS}",
                    "trainer.log_every_n_steps=1", "report.plot=false", f"logger={logger}",
                ])
            for key, value in cfg.hydra.job.env_set.items():  # what `lightning-kd` sets for the job (MLflow's file store)
                monkeypatch.setenv(key, str(value))
            cli.train(cfg)
        yield {logger: root / logger for logger in LOGGERS}
    finally:
        monkeypatch.undo()
        GlobalHydra.instance().clear()
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def csv_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """``{name: {step: value}}`` from the stage's ``metrics.csv`` (``step`` is a column, not a metric)."""
    with (run_dir / STAGE / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    metrics: dict[str, dict[int, float]] = {}
    for row in rows:
        for name, value in row.items():
            if name != "step" and value:
                metrics.setdefault(name, {})[int(row["step"])] = float(value)
    return metrics


def tensorboard_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / STAGE), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{run_dir}/mlruns")
    experiment = client.get_experiment_by_name("lightning-kd")
    (run,) = client.search_runs([experiment.experiment_id])  # one stage, one run
    return client, run


def mlflow_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    client, run = mlflow_run(run_dir)
    return {name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)} for name in run.data.metrics}


def test_csv_logs_every_step_of_the_stage(runs):
    metrics = csv_metrics(runs["csv"])
    for name in ("train/loss", "train/soft_loss", "train/hard_loss"):
        assert sorted(metrics[name]) == list(range(STEPS)) and all(math.isfinite(v) for v in metrics[name].values())
    # the logged loss is the module's objective of its logged terms: alpha * soft + (1 - alpha) * hard
    alpha = 0.9
    for step in range(STEPS):
        expected = alpha * metrics["train/soft_loss"][step] + (1 - alpha) * metrics["train/hard_loss"][step]
        assert metrics["train/loss"][step] == pytest.approx(expected, rel=1e-6)
    assert {"val/loss", "val/acc", "val/agreement", "test/acc", "test/loss"} <= set(metrics)
    hparams = yaml.safe_load((runs["csv"] / STAGE / "hparams.yaml").read_text())
    assert hparams["alpha"] == alpha and hparams["teacher_checkpoint"].endswith("teacher.pt")


@pytest.mark.parametrize("logger", ["tensorboard", "mlflow"])
def test_every_logger_records_the_csv_values(runs, logger):
    """Same seed, same run: each logger holds the CSV's metric names and values, step by step."""
    expected = csv_metrics(runs["csv"])
    got = tensorboard_metrics(runs[logger]) if logger == "tensorboard" else mlflow_metrics(runs[logger])
    assert set(got) == set(expected)
    for name, values in expected.items():
        assert set(got[name]) == set(values), name
        for step, value in values.items():
            assert got[name][step] == pytest.approx(value, rel=1e-6, abs=1e-7), (name, step)


def test_tensorboard_records_the_hyperparameters(runs):
    log_dir = runs["tensorboard"] / STAGE
    assert list(log_dir.glob("events.out.tfevents.*"))  # one folder per stage, as for the CSV logger
    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    assert hparams == yaml.safe_load((runs["csv"] / STAGE / "hparams.yaml").read_text())


def test_mlflow_records_one_run_per_stage_with_the_hyperparameters(runs):
    client, run = mlflow_run(runs["mlflow"])
    assert run.info.run_name == STAGE and run.info.status == "FINISHED"
    hparams = yaml.safe_load((runs["csv"] / STAGE / "hparams.yaml").read_text())
    params = run.data.params  # MLflow stores parameters as strings
    assert params["alpha"] == str(hparams["alpha"]) and params["teacher_checkpoint"] == hparams["teacher_checkpoint"]
    assert set(params) == set(hparams)
    # the store, artifacts included, lives inside the run directory
    assert Path(urlparse(run.info.artifact_uri).path).is_relative_to(runs["mlflow"] / "mlruns")


def test_each_logger_is_named_after_the_stage(tmp_path):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="lightning_kd.conf", version_base="1.3"):
            for logger, attribute in (("csv", "name"), ("tensorboard", "name"), ("mlflow", "_run_name")):
                cfg = compose(config_name="config", overrides=[f"run_dir={tmp_path}", f"logger={logger}"])
                assert getattr(stages.build_logger(cfg.logger, "teacher"), attribute) == "teacher"
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.slow
def test_the_console_script_logs_to_mlflows_file_store(runs, tmp_path):
    """`lightning-kd logger=mlflow` without MLFLOW_ALLOW_FILE_STORE in the environment: the option sets it for the job."""
    script = shutil.which("lightning-kd", path=os.path.dirname(sys.executable))
    assert script is not None, "the `lightning-kd` console script is not installed next to this Python"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ALLOW_FILE_STORE"} | {"OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [script, "experiment=smoke", "callbacks=quiet", "task=distill", f"teacher.checkpoint={runs['csv'].parent / 'teacher.pt'}",
         f"task.stages=[{STAGE}]", "student.epochs=1", f"+trainer.limit_train_batches={STEPS}", "trainer.log_every_n_steps=1",
         "report.plot=false", "logger=mlflow", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the same stage as the in-process runs: the same numbers, in the run directory's own store
    expected = csv_metrics(runs["csv"])
    got = mlflow_metrics(run_dir)
    assert set(got) == set(expected)
    assert got["train/loss"] == pytest.approx(expected["train/loss"], rel=1e-6)
    assert got["val/loss"] == pytest.approx(expected["val/loss"], rel=1e-6)
