"""Several nodes: `trainer.num_nodes=2` launched the two ways clusters launch it, checked on one machine.

Two "nodes" of one process each on localhost (gloo), through the console script, must train exactly the
student that two processes on one node train: the same global batch, the same data order, the same gradient
average. Launchers:
- ``torchrun --nnodes 2 --nproc-per-node 1 --node-rank R`` (Lightning's TorchElasticEnvironment);
- SLURM, as ``srun --nodes 2 --ntasks-per-node 1`` would start it: the SLURM_* variables that srun sets for each
  task (Lightning's SLURMEnvironment), without a SLURM installation.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_cli import SMOKE, communicate_or_kill, run_command
from test_ddp_equivalence import student_init

from lightning_kd.models import get_model

pytestmark = pytest.mark.slow

STAGES = ("student_scratch", "student_distilled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script() -> str:
    path = shutil.which("lightning-kd", path=os.path.dirname(sys.executable))
    assert path is not None, "the `lightning-kd` console script is not installed next to this Python"
    return path


def run_nodes(commands: list[tuple[list[str], dict[str, str]]], cwd: Path, timeout: float) -> list[str]:
    """Start one process per node at once (they rendezvous with each other) and wait for all of them."""
    base = {**os.environ, "LIGHTNING_KD_DATA": str(Path(os.environ["LIGHTNING_KD_DATA"]).resolve()),
            "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    procs = [subprocess.Popen(args, cwd=cwd, env={**base, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for args, env in commands]
    outputs = [communicate_or_kill(p, timeout) for p in procs]
    for node, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"node {node} exited with {proc.returncode}:\n{out[-3000:]}"
    return outputs


def torchrun_nodes(args: list[str]) -> list[tuple[list[str], dict[str, str]]]:
    port = str(free_port())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--master-addr", "127.0.0.1", "--master-port", port]
    return [([*torchrun, "--node-rank", str(node), script(), *args], {}) for node in range(2)]


def slurm_nodes(args: list[str]) -> list[tuple[list[str], dict[str, str]]]:
    # What `srun --nodes 2 --ntasks-per-node 1` sets for each task (and the job's port: SLURMEnvironment takes
    # MASTER_PORT when it is set, else one derived from the job id).
    job = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lightning-kd", "SLURM_NTASKS": "2",
           "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2", "SLURM_NODELIST": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    return [([script(), *args], {**job, "SLURM_PROCID": str(node), "SLURM_LOCALID": "0", "SLURM_NODEID": str(node)})
            for node in range(2)]


@pytest.mark.parametrize("launcher", [torchrun_nodes, slurm_nodes], ids=["torchrun", "slurm"])
def test_two_nodes_train_what_two_processes_on_one_node_train(tmp_path, launcher):
    teacher = tmp_path / "teacher.pt"
    torch.save(get_model("cnn1d", num_classes=10).state_dict(), teacher)
    common = ["task=distill", f"task.stages=[{','.join(STAGES)}]", f"teacher.checkpoint={teacher}", "seed=42",
              "student.epochs=2", "data.batch_size=64", *SMOKE]
    one_node = tmp_path / "one_node"
    run_command([script(), *common, "trainer=ddp_cpu", f"hydra.run.dir={one_node}"], tmp_path, timeout=420)
    two_nodes = tmp_path / "two_nodes"
    outputs = run_nodes(launcher([*common, "trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2",
                        f"hydra.run.dir={two_nodes}"]), tmp_path, timeout=420)
    for node, out in enumerate(outputs):  # each node joined one world of two (Lightning's own line)
        assert f"GLOBAL_RANK: {node}, MEMBER: {node + 1}/2" in out, out[-3000:]

    init = student_init(common)
    for stage in STAGES:
        one = torch.load(one_node / stage / "model.pt", weights_only=True)
        two = torch.load(two_nodes / stage / "model.pt", weights_only=True)
        assert one.keys() == two.keys() == init.keys()
        diff = max((one[k] - two[k]).abs().max().item() for k in one)
        moved = max((one[k] - init[k]).abs().max().item() for k in one)
        assert diff <= 1e-6, f"{stage}: two nodes and one node differ by {diff:.3g}"
        assert moved > 0.02, f"{stage}: the weights moved {moved:.3g} from their init: nothing was compared"


def test_the_slurm_launcher_config_is_sized_from_the_trainer():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="lightning_kd.conf", version_base="1.3"):
            ours = compose(config_name="config", return_hydra_config=True,
                           overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
            plugin = compose(config_name="config", return_hydra_config=True, overrides=["hydra/launcher=submitit_slurm"])
    finally:
        GlobalHydra.instance().clear()
    launcher = ours.hydra.launcher
    assert launcher._target_ == plugin.hydra.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.max_num_timeout == 3  # requeued after a time limit, resumed from the run directory


def test_a_multirun_through_the_submitit_launcher_trains_what_a_plain_run_trains(tmp_path):
    # submitit's local executor runs each job in its own process the way its SLURM executor does on a node
    # (the pickled task function, the job's own config): the students must equal plain runs' with the same seed.
    teacher = tmp_path / "teacher.pt"
    torch.save(get_model("cnn1d", num_classes=10).state_dict(), teacher)
    common = ["task=distill", "task.stages=[student_distilled]", f"teacher.checkpoint={teacher}", "student.epochs=1",
              *SMOKE]
    sweep = tmp_path / "sweep"
    run_command([script(), "-m", "hydra/launcher=submitit_local", *common, "seed=1,2", f"hydra.sweep.dir={sweep}"],
                tmp_path, timeout=600)
    plain = tmp_path / "plain"
    run_command([script(), *common, "seed=2", f"hydra.run.dir={plain}"], tmp_path, timeout=300)

    one, two = (torch.load(sweep / str(job) / "student_distilled" / "model.pt", weights_only=True) for job in (0, 1))
    reference = torch.load(plain / "student_distilled" / "model.pt", weights_only=True)
    assert two.keys() == reference.keys()
    assert all(torch.equal(two[k], reference[k]) for k in reference)  # job 1 is seed=2, bit for bit (CPU, deterministic)
    assert max((one[k] - two[k]).abs().max().item() for k in one) > 1e-3  # and job 0 really ran seed=1
