"""``python -m lightning_kd.lightning_cli``: the example YAML builds what it says, trains, and logs what it computed."""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_kd import DistillationAnnealing, DistillationModule, load_weights
from lightning_kd.checkpoint import fingerprint
from lightning_kd.data import MNIST1DDataModule
from lightning_kd.losses import DKDLoss, KDLoss
from lightning_kd.models import CNN1D, MLP
from lightning_kd.schedules import Linear

pytest.importorskip("jsonargparse")
from lightning_kd import lightning_cli  # noqa: E402  (needs jsonargparse)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_cli" / "mnist1d_kd.yaml"
STEPS = 3  # training batches of the one-epoch run


@pytest.fixture(autouse=True)
def _restored_determinism():
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic)  # the example's Trainer(deterministic=True) sets it process-wide


@pytest.fixture
def teacher_file(tmp_path):
    """A CNN1D teacher's state dict on disk, its logits scaled up so that its soft targets are far from uniform."""
    torch.manual_seed(0)
    teacher = CNN1D()
    with torch.no_grad():
        teacher.classifier.weight.mul_(30.0)
    path = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_example_builds_the_module_it_describes(tmp_path, teacher_file):
    cli = lightning_cli.main(["--config", str(EXAMPLE), f"--model.teacher_checkpoint={teacher_file}",
                              f"--trainer.logger.init_args.save_dir={tmp_path}"], run=False)
    module = cli.model
    assert type(module) is DistillationModule and isinstance(cli.datamodule, MNIST1DDataModule)
    # the teacher: the architecture from its class path, the weights from the file, frozen
    assert isinstance(module.teacher, CNN1D) and isinstance(module.student, MLP)
    assert fingerprint(module.teacher) == fingerprint(load_weights(CNN1D(), teacher_file))
    assert not module.teacher.training and not any(p.requires_grad for p in module.teacher.parameters())
    assert isinstance(module.soft_loss, KDLoss) and module.temperature == 4.0 and module.alpha == 0.9
    # the module's optimizer gets the student's parameters only
    optimizer = module.optimizer_factory(module.trainable_parameters())
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == 0.003
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.student.parameters()}
    annealing = [c for c in cli.trainer.callbacks if isinstance(c, DistillationAnnealing)]
    assert len(annealing) == 1 and annealing[0].schedules == {"temperature": Linear(4.0, 1.0)}
    # hyperparameters stay plain values (checkpoints load with weights_only=True): no module in them
    assert module.hparams["teacher_checkpoint"] == str(teacher_file)
    assert not any(isinstance(v, torch.nn.Module) for v in module.hparams.values())


def test_several_teachers_a_loss_and_speed_by_class_path(tmp_path, teacher_file):
    torch.manual_seed(1)
    second = tmp_path / "teacher2.pt"
    torch.save(CNN1D().state_dict(), second)
    (tmp_path / "ensemble.yaml").write_text(f"""
model:
  teacher: [{{class_path: lightning_kd.models.CNN1D}}, {{class_path: lightning_kd.models.CNN1D}}]
  teacher_checkpoint: [{teacher_file}, {second}]   # a list, not the string of one
  teacher_weights: [3, 1]
  soft_loss: {{class_path: lightning_kd.losses.DKDLoss, init_args: {{beta: 2.0}}}}
  speed: {{class_path: lightning_kd.Speed, init_args: {{teacher_dtype: bfloat16}}}}
""")
    module = lightning_cli.main(["--config", str(EXAMPLE), "--config", str(tmp_path / "ensemble.yaml")], run=False).model
    assert module.teacher.weights == {"0": 0.75, "1": 0.25}
    for member, path in zip(module.teacher.values(), (teacher_file, second)):
        expected = load_weights(CNN1D(), path).to(torch.bfloat16)
        assert fingerprint(member) == fingerprint(expected)
    assert isinstance(module.soft_loss, DKDLoss) and module.soft_loss.beta == 2.0
    assert module.hparams["teacher_checkpoint"] == [str(teacher_file), str(second)]


def test_lightning_clis_own_optimizer_key_is_refused(tmp_path, teacher_file, capsys):
    # its configure_optimizers would give the frozen teacher's parameters to the optimizer too
    with pytest.raises(SystemExit):
        lightning_cli.main(["--config", str(EXAMPLE), f"--model.teacher_checkpoint={teacher_file}",
                            "--optimizer=torch.optim.SGD"], run=False)
    assert "optimizer" in capsys.readouterr().err


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def logged(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key)]


def run_cli(tmp_path: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # LIGHTNING_KD_DATA (conftest): the tests' MNIST-1D cache
    proc = subprocess.run([sys.executable, "-m", "lightning_kd.lightning_cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_the_example_distils_for_one_epoch_and_logs_what_it_computed(tmp_path, teacher_file):
    teacher_hash = sha256(teacher_file)
    common = ["--config", str(EXAMPLE), f"--model.teacher_checkpoint={teacher_file}",
              f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.enable_progress_bar=false"]
    run_cli(tmp_path, "fit", *common, "--trainer.max_epochs=1", f"--trainer.limit_train_batches={STEPS}",
            "--trainer.log_every_n_steps=1")
    version = tmp_path / "runs" / "mnist1d_kd" / "version_0"
    rows = read_csv(version / "metrics.csv")

    # the callback annealed the temperature linearly from 4 to 1 over the run's 3 steps
    assert logged(rows, "kd/temperature") == pytest.approx([4.0 + (1.0 - 4.0) * step / STEPS for step in range(STEPS)])

    # the epoch's validation terms, recomputed in float64 from the saved student and the teacher's file
    ckpt = version / "checkpoints" / "last.ckpt"
    student = load_weights(MLP(), ckpt).double().eval()
    teacher = load_weights(CNN1D(), teacher_file).double().eval()
    data = MNIST1DDataModule()
    data.setup("fit")
    x, y = data.val_dataset.tensors
    with torch.no_grad():
        s, t = student(x.double()), teacher(x.double())
    log_p_s, log_p_t = s.log_softmax(-1), t.log_softmax(-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()  # KL(teacher || student) at T = 1
    val = {key: logged(rows, key)[-1] for key in ("val/loss", "val/kl", "val/agreement", "val/acc", "val/teacher_acc")}
    assert val["val/loss"] == pytest.approx(float(F.cross_entropy(s, y)), rel=1e-5)
    assert val["val/kl"] == pytest.approx(float(kl), rel=1e-4)
    assert kl > 0.01  # the teacher's targets are not uniform: the soft term has something to teach
    assert val["val/agreement"] == pytest.approx(float((s.argmax(-1) == t.argmax(-1)).double().mean()), abs=1e-6)
    assert val["val/acc"] == pytest.approx(float((s.argmax(-1) == y).double().mean()), abs=1e-6)
    assert val["val/teacher_acc"] == pytest.approx(float((t.argmax(-1) == y).double().mean()), abs=1e-6)

    # the teacher was not touched: same file, the checkpoint's fingerprint is the file's, and no teacher weights in it
    assert sha256(teacher_file) == teacher_hash
    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["teacher_fingerprint"] == fingerprint(load_weights(CNN1D(), teacher_file))
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    assert checkpoint["global_step"] == STEPS

    # reloaded for inference with the student alone, it is the trained student
    reloaded = DistillationModule.load_from_checkpoint(ckpt, student=MLP()).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).double(), s, rtol=1e-5, atol=1e-5)

    # `test --ckpt_path`: LightningCLI merges the checkpoint's hyperparameters into the config and tests that student
    run_cli(tmp_path, "test", *common, f"--ckpt_path={ckpt}")
    test_rows = read_csv(tmp_path / "runs" / "mnist1d_kd" / "version_1" / "metrics.csv")
    data.setup("test")
    x_test, y_test = data.test_dataset.tensors
    with torch.no_grad():
        s_test = student(x_test.double())
    assert logged(test_rows, "test/acc") == pytest.approx([float((s_test.argmax(-1) == y_test).double().mean())], abs=1e-6)
    assert logged(test_rows, "test/loss") == pytest.approx([float(F.cross_entropy(s_test, y_test))], rel=1e-5)
