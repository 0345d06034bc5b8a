"""Sharded training (FSDP2 through Lightning's ModelParallelStrategy) on 2 CPU processes with gloo.

- the sharding rule, the `teacher_sharding` setting and the hooks' refusals, in one process;
- one fit per `teacher_sharding` (tests/fsdp_worker.py, 2 processes): the teacher frozen, in eval mode, out of the
  optimizer, bit-identical before and after, absent from every sharded checkpoint; the student the same either way;
- the `lightning-kd` console script with `trainer=fsdp_cpu`: the gathered `model.pt` equals the `trainer=ddp_cpu`
  run's, and a stage stopped after its first epoch resumes from the sharded `last.ckpt` to the uninterrupted result.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint import FileSystemReader

from test_cli import SMOKE, _one_thread_and_restored_globals, communicate_or_kill, make_cfg, run_command  # noqa: F401 (an autouse fixture)
from test_ddp_equivalence import student_init

from lightning_kd import DistillationModule, runs, stages
from lightning_kd.checkpoint import CheckpointError, fingerprint
from lightning_kd.losses import KDLoss, LearnableTemperature
from lightning_kd.models import get_model
from lightning_kd.module import _data_parallel
from lightning_kd.sharding import TEACHER_SHARDING, check_teacher_sharding, full_state_dict, is_sharded, shard_model, shard_units
from lightning_kd.teachers import TeacherEnsemble

HERE = Path(__file__).parent


# ---------------------------------------------------------------------- one process


def test_the_sharding_rule():
    mlp = get_model("mlp")
    assert shard_units(mlp) == [mlp.hidden, mlp.classifier]  # no block list: each child that holds parameters
    gpt = get_model("gpt_student")
    assert shard_units(gpt) == list(gpt.transformer.h)  # the transformer blocks; the rest stays with the root

    class Nested(nn.Module):  # blocks inside blocks: only the outer list's members are units
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(2, 2)
            self.blocks = nn.ModuleList(nn.ModuleList([nn.Linear(2, 2), nn.ReLU()]) for _ in range(3))
            self.empty = nn.ReLU()

    nested = Nested()
    assert shard_units(nested) == list(nested.blocks)
    ensemble = TeacherEnsemble([get_model("mlp"), get_model("mlp")])  # itself a ModuleDict: one unit per member
    assert shard_units(ensemble) == list(ensemble.values())


@pytest.mark.parametrize("value", ["shard", "replicate"])
def test_teacher_sharding_is_kept(value):
    module = DistillationModule(get_model("cnn1d"), get_model("mlp"), teacher_sharding=value)
    assert module.teacher_sharding == value == module.hparams.teacher_sharding
    assert TEACHER_SHARDING == ("shard", "replicate")


@pytest.mark.parametrize("value", ["bogus", "Shard", None, 1])
def test_a_bad_teacher_sharding_is_refused_naming_the_allowed_values(value):
    with pytest.raises(ValueError, match=r"Expected `teacher_sharding` to be one of 'shard', 'replicate', but got"):
        DistillationModule(get_model("cnn1d"), get_model("mlp"), teacher_sharding=value)
    with pytest.raises(ValueError, match="'shard', 'replicate'"):
        check_teacher_sharding(value)


def test_a_bad_teacher_sharding_is_refused_from_the_config(tmp_path):
    teacher = tmp_path / "teacher.pt"
    torch.save(get_model("cnn1d", num_classes=10).state_dict(), teacher)
    cfg = make_cfg(tmp_path / "run", "task=distill", f"teacher.checkpoint={teacher}", "distill.teacher_sharding=everywhere")
    with pytest.raises(ValueError, match=r"`teacher_sharding` to be one of 'shard', 'replicate', but got 'everywhere'"):
        stages.build_module(cfg, "student_distilled", str(teacher))
    cfg = make_cfg(tmp_path / "run", "task=distill", f"teacher.checkpoint={teacher}", "distill.teacher_sharding=replicate")
    assert stages.build_module(cfg, "student_distilled", str(teacher)).teacher_sharding == "replicate"
    assert stages.build_module(cfg, "student_scratch", None).teacher is None  # no teacher, nothing to place


def _attached(module: DistillationModule, trainer: L.Trainer) -> DistillationModule:
    trainer.strategy.connect(module)
    module.trainer = trainer
    return module


def test_configure_model_is_a_no_op_without_model_parallel():
    module = DistillationModule(get_model("cnn1d"), get_model("mlp"))
    module.configure_model()  # no trainer
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    _attached(module, trainer).configure_model()
    assert not is_sharded(module.student) and not is_sharded(module.teacher)
    assert all(type(p) is nn.Parameter for p in module.parameters())


def test_trainable_parameters_outside_the_student_are_refused_under_model_parallel():
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                        logger=False, enable_checkpointing=False)  # never launched: the check comes before any mesh
    module = DistillationModule(get_model("cnn1d"), get_model("mlp"), soft_loss=KDLoss(temperature=LearnableTemperature()))
    with pytest.raises(ValueError, match=r"every trainable parameter to belong to the student.*soft_loss\..*strategy='ddp'"):
        _attached(module, trainer).configure_model()


def test_the_default_rule_refuses_tensor_parallel_meshes():
    class Mesh:  # Lightning's 2-D ("data_parallel", "tensor_parallel") mesh, as the rule sees it
        ndim = 2

        def __init__(self, tensor_parallel: int) -> None:
            self.sizes = {"data_parallel": 2, "tensor_parallel": tensor_parallel}

        def __getitem__(self, name: str):
            return type("Dim", (), {"size": lambda _, n=self.sizes[name]: n, "name": name})()

    assert _data_parallel(Mesh(1)).name == "data_parallel"
    with pytest.raises(ValueError, match=r"Expected `ModelParallelStrategy\(tensor_parallel_size=1\)`, but got 2"):
        _data_parallel(Mesh(2))
    assert _data_parallel(Mesh(2), tensor_parallel_ok=True).name == "data_parallel"  # the teacher: replicated across it


def test_the_hooks_shard_each_model_over_the_mesh(monkeypatch):
    calls = []
    monkeypatch.setattr("lightning_kd.module.shard_model", lambda model, mesh, **kwargs: calls.append((model, mesh, kwargs)))
    module = DistillationModule(get_model("cnn1d"), get_model("mlp"))
    mesh = type("Mesh", (), {"ndim": 1})()  # a 1-D mesh is used as it is
    module.shard_student(mesh)
    module.shard_teacher(mesh)
    # the teacher frees even its root unit's gathered weights after each forward (it has no backward pass)
    assert calls == [(module.student, mesh, {}), (module.teacher, mesh, {"reshard_after_forward": True})]


def test_shard_model_refuses_a_mesh_that_is_not_one_dimensional():
    mesh = type("Mesh", (), {"ndim": 2, "shape": (2, 2)})()
    with pytest.raises(ValueError, match=r"Expected a 1-D device mesh \(the data-parallel ranks\), but got one of shape \(2, 2\)"):
        shard_model(get_model("mlp"), mesh)


def test_full_state_dict_of_an_unsharded_model_is_its_state_dict():
    model = get_model("mlp")
    state = full_state_dict(model)
    assert state.keys() == model.state_dict().keys() and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("trainer", "save_last"), [("fsdp_cpu", "link"), ("cpu", True), ("ddp_cpu", True)])
def test_a_sharded_trainer_links_last_ckpt_instead_of_rewriting_it(tmp_path, trainer, save_last):
    cfg = make_cfg(tmp_path / "run", f"trainer={trainer}")
    built = stages.build_trainer(cfg, "student_distilled", tmp_path / "run" / "student_distilled", max_epochs=1)
    assert built.checkpoint_callback.save_last == save_last and built.checkpoint_callback.save_top_k == 1


def _sharded_checkpoint(path: Path, step: int, *, index: bool = True) -> Path:
    path.mkdir(parents=True)
    torch.save({"global_step": step, "epoch": 0}, path / runs.SHARDED_METADATA)
    if index:
        (path / runs.SHARDED_INDEX).write_bytes(b"index")
    (path / "__0_0.distcp").write_bytes(b"shard")
    return path


def test_resume_checkpoint_reads_sharded_folders(tmp_path, caplog):
    stage = tmp_path / "stage"
    older = _sharded_checkpoint(stage / "checkpoints" / "epoch=0-step=4.ckpt", 4)
    last = _sharded_checkpoint(stage / "checkpoints" / "last.ckpt", 8)
    assert runs.resume_checkpoint(stage) == last
    shutil.rmtree(last)
    _sharded_checkpoint(last, 8, index=False)  # a save that did not finish: no index
    assert runs.resume_checkpoint(stage) == older
    assert "Damaged checkpoint" in caplog.text and "'.metadata' index" in caplog.text
    (older / runs.SHARDED_METADATA).unlink()
    assert runs.resume_checkpoint(stage) is None  # nothing intact: the stage starts over, with a warning
    torch.save({"global_step": 4, "evil": nn.Linear(1, 1)}, older / runs.SHARDED_METADATA)  # pickled code: refused
    with pytest.raises(CheckpointError, match="holds objects other than tensors"):
        runs.resume_checkpoint(stage)


# ---------------------------------------------------------------------- two processes, Lightning directly


def _gathered_after_forward(rank: int, port: int, out: dict) -> None:
    """On 2 gloo ranks: shard a frozen GPT with shard_model, under FSDP2's default and with reshard_after_forward=True,
    run one forward without autograd, and report whether each root unit (embeddings, final norm, head) is still gathered."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_kd.sharding import shard_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        for reshard in (None, True):
            torch.manual_seed(0)
            model = get_model("gpt_student").requires_grad_(False).eval()
            shard_model(model, mesh, reshard_after_forward=reshard)
            with torch.no_grad():
                model(torch.randint(0, 200, (2, 8)))
            out[(rank, reshard)] = model._get_fsdp_state()._fsdp_param_group.is_unsharded
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_sharded_teacher_frees_its_gathered_weights_after_its_forward():
    """FSDP2 keeps a root unit's weights gathered after its forward (for the backward pass); the teacher has no backward
    pass, so `shard_teacher` asks for them to be freed: else the embeddings and the head would stay whole on every rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_gathered_after_forward, args=(port, out), nprocs=2)
        # FSDP2's default (the student's): still gathered; the teacher's setting: freed
        assert dict(out) == {(0, None): True, (1, None): True, (0, True): False, (1, True): False}


def run_worker(out: Path, teacher_sharding: str) -> None:
    out.mkdir(parents=True)
    env = {**os.environ, "LIGHTNING_KD_DATA": str(Path(os.environ["LIGHTNING_KD_DATA"]).resolve()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(HERE / "fsdp_worker.py"), str(out), teacher_sharding], cwd=out, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = communicate_or_kill(proc, 300)
    assert proc.returncode == 0, output[-4000:]


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp_worker")
    for mode in TEACHER_SHARDING:
        run_worker(root / mode, mode)
    return {mode: root / mode for mode in TEACHER_SHARDING}


def checkpoint_keys(path: Path) -> set[str]:
    """Every entry of a sharded checkpoint: the shard index's keys and Lightning's entries in meta.pt."""
    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


@pytest.mark.slow
@pytest.mark.parametrize("mode", TEACHER_SHARDING)
def test_the_teacher_stays_frozen_and_out_of_the_checkpoints(worker_runs, mode):
    out = worker_runs[mode]
    weights = torch.load(out / "weights.pt", weights_only=True)
    before, after = weights["before"], weights["after"]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    for rank in (0, 1):
        report = json.loads((out / f"rank{rank}.json").read_text())
        # at every optimizer step: no module in train mode, no requires_grad, no grad, not in the optimizer;
        # the teacher sharded as asked, the student sharded
        assert report["seen"] == [[False, False, False, False, mode == "shard", True]]
        assert report["fingerprint"] == report["expected"]  # taken before sharding, not from one rank's shards
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "last.ckpt"]
    student_keys = {f"state_dict.student.{k}" for k in weights["student"]}
    for path in checkpoints:
        assert path.is_dir() and {p.name for p in path.iterdir()} == {".metadata", "meta.pt", "__0_0.distcp", "__1_0.distcp"}
        keys = checkpoint_keys(path)
        assert not [k for k in keys if "teacher" in k]
        assert {k for k in keys if k.startswith("state_dict.")} == student_keys  # the student, whole, and nothing else
        meta = torch.load(path / "meta.pt", weights_only=True)
        assert "state_dict" not in meta and meta["teacher_fingerprint"] == report["expected"]
        tensors = [k for k, v in meta.items() if isinstance(v, torch.Tensor)]
        assert not tensors


@pytest.mark.slow
def test_a_replicated_teacher_trains_the_same_student(worker_runs):
    shard, replicate = (torch.load(worker_runs[m] / "weights.pt", weights_only=True)["student"] for m in TEACHER_SHARDING)
    assert shard.keys() == replicate.keys()
    for key in shard:  # the sharded teacher's forward gathers the very same weights: the same logits, the same steps
        torch.testing.assert_close(shard[key], replicate[key], rtol=0, atol=1e-6)
    init = get_model("mlp")  # not compared with nothing: the fits moved the student
    assert max((shard[k] - v).abs().max().item() for k, v in init.state_dict().items()) > 0.01


# ---------------------------------------------------------------------- two processes, the console script


COMMON = ("task=distill", "task.stages=[student_distilled]", "seed=42", "student.epochs=2", "data.val_size=3600",
          "data.batch_size=64", *SMOKE)
STAGE = "student_distilled"


def lightning_kd(run_dir: Path, teacher: Path, *overrides: str) -> str:
    script = shutil.which("lightning-kd", path=os.path.dirname(sys.executable))
    assert script is not None, "the `lightning-kd` console script is not installed next to this Python"
    return run_command([script, *COMMON, f"teacher.checkpoint={teacher}", *overrides, f"hydra.run.dir={run_dir}"],
                       run_dir.parent, timeout=300).stdout


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, Path]:
    """The same distillation on 2 processes (64 samples each per step): sharded with every epoch's checkpoint kept,
    and DDP."""
    root = tmp_path_factory.mktemp("fsdp_cli")
    teacher = root / "teacher.pt"
    torch.manual_seed(0)
    torch.save(get_model("cnn1d", num_classes=10).state_dict(), teacher)
    lightning_kd(root / "fsdp", teacher, "trainer=fsdp_cpu", "callbacks.checkpoint.save_top_k=-1")
    lightning_kd(root / "ddp", teacher, "trainer=ddp_cpu")
    return {"fsdp": root / "fsdp", "ddp": root / "ddp", "teacher": teacher}


def train_losses(stage_dir: Path, name: str = "metrics.csv") -> dict[int, float]:
    with open(stage_dir / name) as f:
        return {int(row["epoch"]): float(row["train/loss_epoch"]) for row in csv.DictReader(f) if row["train/loss_epoch"]}


@pytest.mark.slow
def test_fsdp_trains_the_ddp_student(cli_runs):
    """FSDP2 averages the same gradients as DDP (a reduce-scatter instead of an all-reduce) and Adam works elementwise on
    each shard: the same steps. Measured: bit-identical weights on gloo; the tolerance allows another summation order."""
    fsdp, ddp = (torch.load(cli_runs[r] / STAGE / "model.pt", weights_only=True) for r in ("fsdp", "ddp"))
    init = student_init(list(COMMON))
    assert fsdp.keys() == ddp.keys() == init.keys()
    for key in fsdp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=0, atol=1e-5)
    moved = max((fsdp[k] - init[k]).abs().max().item() for k in init)
    assert 0.01 < moved < 0.2, f"the weights moved {moved:.3g} from their init: nothing was compared"
    losses = train_losses(cli_runs["fsdp"] / STAGE)
    assert sorted(losses) == [0, 1]
    assert losses == pytest.approx(train_losses(cli_runs["ddp"] / STAGE), rel=1e-5)

    student = get_model("mlp")  # the gathered file is a plain state dict: a fresh, unsharded student loads it
    student.load_state_dict(torch.load(cli_runs["fsdp"] / STAGE / "model.pt", weights_only=True))
    result = json.loads((cli_runs["fsdp"] / STAGE / runs.RESULT).read_text())
    assert result["checkpoint"] == f"{STAGE}/model.pt"  # what a later stage would read, not the folder of shards
    report = json.loads((cli_runs["fsdp"] / "report.json").read_text())["entries"][STAGE]
    assert report["test_acc"] == json.loads((cli_runs["ddp"] / "report.json").read_text())["entries"][STAGE]["test_acc"]
    assert report["params"] == sum(p.numel() for p in student.parameters())  # the whole student, not one rank's shard
    last = cli_runs["fsdp"] / STAGE / "checkpoints" / "last.ckpt"
    assert report["checkpoint_bytes"] == sum(f.stat().st_size for f in last.iterdir())
    # never rewritten in place (a sharded save bypasses the atomic writer): a link to the newest epoch's folder
    assert last.is_symlink() and os.readlink(last) == "epoch=1-step=8.ckpt"
    for path in (cli_runs["fsdp"] / STAGE / "checkpoints").iterdir():  # the teacher is in no checkpoint
        assert path.is_dir() and not [k for k in checkpoint_keys(path) if "teacher" in k]


@pytest.mark.slow
def test_a_stage_stopped_after_its_first_epoch_resumes_from_the_sharded_checkpoint(cli_runs, tmp_path):
    """The run directory as a stop after epoch 1 leaves it (kill -9 or SIGTERM once epoch 1's checkpoint is saved):
    the sharded `last.ckpt` of epoch 1, no result, no report. The same command resumes it to the uninterrupted result."""
    run_dir = tmp_path / "stopped"
    shutil.copytree(cli_runs["fsdp"], run_dir)
    stage_dir = run_dir / STAGE
    checkpoints = stage_dir / "checkpoints"
    for path in [stage_dir / runs.RESULT, stage_dir / "model.pt", *run_dir.glob("report.*")]:
        path.unlink()
    shutil.rmtree(checkpoints / "last.ckpt")
    shutil.rmtree(next(checkpoints.glob("epoch=1-*.ckpt")))
    next(checkpoints.glob("epoch=0-*.ckpt")).rename(checkpoints / "last.ckpt")
    assert runs.resume_checkpoint(stage_dir) == checkpoints / "last.ckpt"

    out = lightning_kd(run_dir, cli_runs["teacher"], "trainer=fsdp_cpu", "callbacks.checkpoint.save_top_k=-1")
    assert f"Restoring states from the checkpoint path at {checkpoints / 'last.ckpt'}" in out
    assert sorted(train_losses(stage_dir)) == [1]  # only the second epoch trained again
    assert train_losses(stage_dir, "metrics.1.csv") == train_losses(cli_runs["fsdp"] / STAGE)  # the first run's, kept
    resumed, reference = (torch.load(d / STAGE / "model.pt", weights_only=True) for d in (run_dir, cli_runs["fsdp"]))
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in resumed)
    assert train_losses(stage_dir)[1] == train_losses(cli_runs["fsdp"] / STAGE)[1]


@pytest.mark.slow
def test_a_sharded_teacher_stage_hands_its_gathered_weights_to_the_distilled_stage(tmp_path):
    """`task=pipeline` under FSDP: the teacher stage's last.ckpt is a folder of shards, so it hands on its `model.pt`;
    the distilled stage loads that teacher on both ranks and records its fingerprint."""
    script = shutil.which("lightning-kd", path=os.path.dirname(sys.executable))
    run_dir = tmp_path / "pipeline"
    run_command([script, "task=pipeline", "task.stages=[teacher,student_distilled]", "trainer=fsdp_cpu", "data.val_size=3600",
                 "data.batch_size=64", *SMOKE, f"hydra.run.dir={run_dir}"], tmp_path, timeout=300)
    result = json.loads((run_dir / "teacher" / runs.RESULT).read_text())
    assert result["checkpoint"] == "teacher/model.pt" and (run_dir / "teacher" / "checkpoints" / "last.ckpt").is_dir()
    teacher = get_model("cnn1d", num_classes=10)
    teacher.load_state_dict(torch.load(run_dir / "teacher" / "model.pt", weights_only=True))
    distilled = json.loads((run_dir / STAGE / runs.RESULT).read_text())
    assert distilled["stage_config"]["teacher"]["checkpoint_sha256"] == [runs.file_digest(run_dir / "teacher" / "model.pt")]
    meta = torch.load(run_dir / STAGE / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=True)
    assert meta["teacher_fingerprint"] == fingerprint(teacher.requires_grad_(False))


@pytest.mark.slow
def test_a_sigterm_after_the_first_epoch_resumes_to_the_uninterrupted_result(cli_runs, tmp_path):
    """A real stop: SIGTERM to the console script once epoch 1's sharded last.ckpt is complete. Lightning stops both
    ranks at the end of a batch; the run exits with 143 and no result; the same command finishes the stage with the
    uninterrupted run's weights, bit for bit."""
    from test_faults import finish, start, wait_for

    run_dir = tmp_path / "sigterm"
    args = [*COMMON, f"teacher.checkpoint={cli_runs['teacher']}", "trainer=fsdp_cpu", f"hydra.run.dir={run_dir}"]
    proc = start(*args, cwd=tmp_path)
    wait_for(run_dir / STAGE / "checkpoints" / "last.ckpt" / "meta.pt", proc)  # written after the shards and their index
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == runs.SIGTERM_EXIT_CODE, out[-4000:]
    assert "Stage student_distilled stopped by SIGTERM" in out and not (run_dir / STAGE / runs.RESULT).exists()

    out = lightning_kd(run_dir, cli_runs["teacher"], "trainer=fsdp_cpu")
    assert f"Restoring states from the checkpoint path at {run_dir / STAGE / 'checkpoints' / 'last.ckpt'}" in out
    resumed, reference = (torch.load(d / STAGE / "model.pt", weights_only=True) for d in (run_dir, cli_runs["fsdp"]))
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in resumed)
