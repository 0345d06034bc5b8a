"""A user project, exactly as README.md's "Your own teacher, student and data" tells it.

The YAML files and the command are parsed from the README's code blocks (so this test breaks when the
README's recipe changes), written under ``tmp_path/my_project/conf/`` and run with the ``lightning-kd``
console script from ``tmp_path``, the user's own folder, without ``PYTHONPATH``. Three things are the
user's and the README cannot give them, so the test supplies them: the Python module ``my_project``
(``my_project/__init__.py``), the teacher checkpoint (the README's ``/models/teacher.ckpt``) and a class
count that fits the data (MNIST-1D's 10 for the README's 100); ``trainer=gpu`` becomes ``trainer=cpu``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from test_cli import run_command

from lightning_kd import cli

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "### Your own teacher, student and data"
TEACHER_CHECKPOINT = "/models/teacher.ckpt"  # the README's placeholder

# The user's Python module (the README names it, `my_project.build_teacher` ..., but does not show it).
MY_PROJECT = '''\
import torch
from torch import nn

from lightning_kd import DistillationModule
from lightning_kd.data import MNIST1DDataModule


class MyDataModule(MNIST1DDataModule):
    pass


class MyKD(DistillationModule):
    pass


def build_teacher(num_classes):
    return nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Linear(48, num_classes))


def build_student(width):  # no `name`, no `num_classes`: what student/mlp.yaml's model would pass
    return nn.Sequential(nn.Linear(40, width), nn.ReLU(), nn.Linear(width, 10))
'''


def readme_recipe() -> tuple[dict[str, str], list[str]]:
    """``{path under the project: YAML text}`` and the command's arguments, from the README section."""
    text = README.read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ")]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, flags=re.DOTALL)
    files = {}
    for language, body in blocks:
        first = body.splitlines()[0]
        match = re.match(r"# (my_project/conf/\S+\.yaml)", first)
        if language == "yaml" and match:
            files[match.group(1)] = body
    (command,) = [line for language, body in blocks if language == "bash" for line in body.splitlines() if line.startswith("lightning-kd ")]
    return files, shlex.split(command)[1:]


def write_project(root: Path, teacher_checkpoint: Path) -> list[str]:
    """The README's project under ``root``; returns the README command's arguments (``trainer=gpu`` -> ``cpu``)."""
    files, args = readme_recipe()
    assert set(files) == {"my_project/conf/my_kd.yaml", "my_project/conf/data/my_data.yaml",
                          "my_project/conf/teacher/my_teacher.yaml", "my_project/conf/student/my_student.yaml"}
    for name, body in files.items():
        if name.endswith("my_teacher.yaml"):
            assert TEACHER_CHECKPOINT in body and "num_classes: 100" in body
            body = body.replace(TEACHER_CHECKPOINT, str(teacher_checkpoint)).replace("num_classes: 100", "num_classes: 10")
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(body)
    (root / "my_project" / "__init__.py").write_text(MY_PROJECT)
    assert "trainer=gpu" in args
    return ["trainer=cpu" if arg == "trainer=gpu" else arg for arg in args]


def user_module() -> dict:
    namespace: dict = {}
    exec(compile(MY_PROJECT, "my_project/__init__.py", "exec"), namespace)
    return namespace


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lightning_kd(args: list[str], cwd: Path, timeout: float = 180) -> str:
    script = shutil.which("lightning-kd", path=os.path.dirname(sys.executable))
    assert script is not None, "the `lightning-kd` console script is not installed next to this Python"
    return run_command([script, *args], cwd, timeout=timeout, unset=("PYTHONPATH",)).stdout  # the README never sets it


# ---------------------------------------------------------------------- the README's recipe, end to end


@pytest.mark.slow
def test_the_readme_recipe_runs_from_the_users_own_folder(tmp_path):
    user = user_module()
    torch.manual_seed(0)
    teacher = user["build_teacher"](10)
    checkpoint = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), checkpoint)
    args = write_project(tmp_path, checkpoint)
    run_dir = tmp_path / "run"
    tiny = ["student.epochs=1", "+trainer.limit_train_batches=2", "callbacks=quiet", "report.latency_batches=2",
            "report.plot=false", f"hydra.run.dir={run_dir}"]
    out = lightning_kd([*args, *tiny], cwd=tmp_path)

    report = json.loads((run_dir / "report.json").read_text())
    assert list(report["entries"]) == ["teacher", "student_distilled"]
    # the user's builders made both models: their parameter counts, and not the zoo's cnn1d (25,258) / mlp (15,210)
    assert report["entries"]["teacher"]["params"] == count(teacher) == 40 * 48 + 48 + 48 * 10 + 10
    assert report["entries"]["student_distilled"]["params"] == count(user["build_student"](128)) == 40 * 128 + 128 + 128 * 10 + 10
    # the leak is gone: build_student got exactly its own arguments, and the rest of mlp's recipe is kept
    stage = json.loads((run_dir / "student_distilled" / "result.json").read_text())["stage_config"]["config"]
    assert stage["student"]["model"] == {"_target_": "my_project.build_student", "width": 128}
    assert stage["student"]["optimizer"]["lr"] == 0.003 and stage["student"]["lr_scheduler"] == "cosine"
    assert stage["distill"]["_target_"] == "my_project.MyKD" and stage["seed"] == 7
    assert "not passing it the inherited `name`, `num_classes`" in out
    # the teacher stage evaluated the given weights: their accuracy, recomputed here on the test split
    data = user["MyDataModule"](os.environ["LIGHTNING_KD_DATA"], batch_size=64, transfer_samples=0)
    data.prepare_data()
    data.setup("test")
    correct = total = 0
    with torch.no_grad():
        for x, y in data.test_dataloader():
            correct += int((teacher(x).argmax(-1) == y).sum())
            total += len(y)
    assert report["entries"]["teacher"]["test_acc"] == pytest.approx(correct / total, abs=1e-6)


# ---------------------------------------------------------------------- the pieces, in-process


@pytest.fixture
def project(tmp_path):
    write_project(tmp_path, tmp_path / "teacher.pt")
    GlobalHydra.instance().clear()
    yield tmp_path / "my_project" / "conf"
    GlobalHydra.instance().clear()


def composed(conf: Path, *overrides: str, student_file: str | None = None):
    if student_file is not None:
        (conf / "student" / "my_student.yaml").write_text(student_file)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("my_kd", overrides=list(overrides), return_hydra_config=True)


def test_hydra_alone_merges_the_inherited_model_into_the_users(project):
    """What the fix is for: Hydra's own composition passes mlp's `name`/`num_classes` on to build_student."""
    cfg = composed(project)
    assert OmegaConf.to_container(cfg.student.model) == {"_target_": "my_project.build_student", "name": "mlp",
                                                          "num_classes": 10, "width": 128}


def test_a_model_that_names_its_target_keeps_its_own_and_the_command_lines_arguments(project):
    cfg = composed(project, "student.model.width=64", "+student.model.depth=2", "teacher.model.num_classes=7")
    cli.own_models(cfg)
    assert OmegaConf.to_container(cfg.student.model) == {"_target_": "my_project.build_student", "width": 64, "depth": 2}
    assert OmegaConf.to_container(cfg.teacher.model) == {"_target_": "my_project.build_teacher", "num_classes": 7}
    assert cfg.student.optimizer.lr == 0.003 and cfg.student.epochs == 30  # the recipe is still inherited


def test_a_model_without_a_target_still_changes_the_inherited_one(project):
    cfg = composed(project, student_file="defaults:\n  - mlp\nmodel:\n  hidden: [32]\n")
    cli.own_models(cfg)
    assert OmegaConf.to_container(cfg.student.model) == {"_target_": "lightning_kd.models.get_model", "name": "mlp",
                                                          "num_classes": 10, "hidden": [32]}


def test_a_target_chosen_on_the_command_line_is_left_to_hydra(project):
    cfg = composed(project, "student.model._target_=my_project.other")
    cli.own_models(cfg)
    assert set(cfg.student.model) == {"_target_", "name", "num_classes", "width"}


def test_our_own_options_are_unchanged(tmp_path):
    """Every student/teacher option we ship lists all of its model's arguments: nothing of theirs is dropped."""
    from hydra import initialize_config_module

    for overrides in (["student=cnn1d_small"], ["student=mlp", "teacher=cnn1d"], ["experiment=lm"]):
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="lightning_kd.conf", version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
        GlobalHydra.instance().clear()
        before = OmegaConf.to_container(cfg.student.model), OmegaConf.to_container(cfg.teacher.model)
        cli.own_models(cfg)
        assert (OmegaConf.to_container(cfg.student.model), OmegaConf.to_container(cfg.teacher.model)) == before


def test_the_console_script_imports_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    cli.import_from_working_directory()
    cli.import_from_working_directory()
    assert sys.path[0] == str(tmp_path) and sys.path.count(str(tmp_path)) == 1


def test_python_safe_path_keeps_the_working_directory_off_sys_path(tmp_path):
    """`python -P` / PYTHONSAFEPATH asks Python not to import from the working directory: the command does not either."""
    probe = "import os, sys; from lightning_kd import cli; cli.import_from_working_directory(); print({'', os.getcwd()} & set(sys.path))"
    out = subprocess.run([sys.executable, "-P", "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "set()"
