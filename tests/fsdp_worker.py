"""One fit of DistillationModule on 2 CPU processes (gloo) under Lightning's ModelParallelStrategy (FSDP2).

Run by tests/test_fsdp.py as ``python fsdp_worker.py OUT_DIR TEACHER_SHARDING``; Lightning starts rank 1 by
running this script again. Writes, for the test to check:

- ``OUT_DIR/checkpoints/``: every epoch's sharded checkpoint and ``last.ckpt`` (folders);
- ``OUT_DIR/weights.pt`` (rank 0): the teacher's weights before and after the fit, and the student's, gathered;
- ``OUT_DIR/rank<R>.json``: what the teacher looked like at every optimizer step, and its fingerprints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_kd import DistillationModule
from lightning_kd.checkpoint import fingerprint
from lightning_kd.data import MNIST1DDataModule
from lightning_kd.models import get_model
from lightning_kd.sharding import full_state_dict, is_sharded


class Watch(Callback):
    """The teacher's state at every optimizer step (after its forward and the student's backward)."""

    def __init__(self) -> None:
        self.seen: set[tuple[bool, ...]] = set()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        teacher = pl_module.teacher
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.seen.add((
            any(m.training for m in teacher.modules()),
            any(p.requires_grad for p in teacher.parameters()),
            any(p.grad is not None for p in teacher.parameters()),
            any(id(p) in in_optimizer for p in teacher.parameters()),
            is_sharded(teacher),
            is_sharded(pl_module.student),
        ))


def main(out: Path, teacher_sharding: str) -> None:
    L.seed_everything(0, verbose=False)
    teacher = get_model("cnn1d", num_classes=10)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = DistillationModule(teacher, get_model("mlp"), teacher_sharding=teacher_sharding)
    expected = fingerprint(module.teacher)
    watch = Watch()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=2, deterministic=True, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=-1), watch],
    )
    trainer.fit(module, datamodule=MNIST1DDataModule(batch_size=64, val_size=3600))
    after, student = full_state_dict(module.teacher), full_state_dict(module.student)  # collectives: every rank
    rank = trainer.global_rank
    if rank == 0:
        torch.save({"before": before, "after": after, "student": student}, out / "weights.pt")
    report = {"seen": sorted(list(s) for s in watch.seen), "fingerprint": module.teacher_fingerprint(), "expected": expected}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
