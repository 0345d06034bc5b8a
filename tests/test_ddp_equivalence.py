"""DDP equals one process: W ranks with batch ``b`` see the batches of one process with batch ``W*b``.

The sampler is checked on its own (every rank's k-th batch, for several world sizes, sizes and batch
sizes), inside Lightning's own dataloader processing on a (not launched) DDP Trainer, and end to end:
the ``lightning-kd`` console script on 2 gloo ranks with ``data.batch_size=64`` must train the same
student weights as one process with ``data.batch_size=128``.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import warnings
from collections import Counter

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.trainer.connectors.data_connector import _process_dataloader
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler, TensorDataset

from test_cli import SMOKE, run_command

from lightning_kd import stages
from lightning_kd.data import MNIST1DDataModule
from lightning_kd.data.samplers import EpochShuffleSampler
from lightning_kd.models import get_model


def todays_order(size: int, seed: int, epoch: int, pass_: int) -> list[int]:
    """EpochShuffleSampler's order before the DDP work (commit 8aa8ac5), written out independently."""
    state = np.random.SeedSequence([seed, epoch, pass_]).generate_state(2)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randperm(size, generator=generator).tolist()


def chunks(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def rank_samplers(size: int, seed: int, world: int, epoch: int = 0) -> list[EpochShuffleSampler]:
    samplers = [EpochShuffleSampler(size, seed, num_replicas=world, rank=r) for r in range(world)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return samplers


def ddp_trainer(**kwargs) -> L.Trainer:
    """A 2-process DDP Trainer that is never launched: Lightning's dataloader logic sees a distributed run."""
    return L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


# ---------------------------------------------------------------------- the sampler


@pytest.mark.parametrize("seed", [0, 42, 2**40 + 3])
@pytest.mark.parametrize("size", [0, 1, 5, 3500])
def test_one_process_order_is_unchanged(size, seed):
    sampler = EpochShuffleSampler(size, seed)
    assert (sampler.num_replicas, sampler.rank, len(sampler)) == (1, 0, size)
    for epoch in (0, 1, 7):
        sampler.set_epoch(epoch)
        for pass_ in range(3):  # a CombinedLoader cycles a short loader: each pass has its own order
            assert list(sampler) == todays_order(size, seed, epoch, pass_)


def test_one_process_order_matches_recorded_values():
    """Literal values printed by the sampler of commit 8aa8ac5: the default pipeline's numbers depend on them."""
    sampler = EpochShuffleSampler(3500, 42)
    assert list(sampler)[:8] == [260, 3367, 2150, 2725, 1825, 1760, 1000, 1195]
    assert list(sampler)[:8] == [2691, 86, 1009, 732, 711, 573, 2145, 795]
    sampler.set_epoch(1)
    assert list(sampler)[:8] == [3087, 1226, 402, 624, 2231, 3177, 3479, 1984]
    sampler = EpochShuffleSampler(10, 2**40 + 3)
    sampler.set_epoch(7)
    assert list(sampler) == [9, 8, 0, 1, 2, 5, 6, 7, 4, 3]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 4, 7])
@pytest.mark.parametrize("size", [1, 2, 12, 29, 84, 100, 3500])
def test_ranks_together_see_the_one_process_batches(size, batch, world):
    seed, epoch = 7, 3
    one = EpochShuffleSampler(size, seed)
    one.set_epoch(epoch)
    perm = list(one)
    one_batches = chunks(perm, world * batch)
    ranks = [list(s) for s in rank_samplers(size, seed, world, epoch)]

    per_rank = math.ceil(size / world)
    assert all(len(r) == per_rank for r in ranks)  # same samples, hence same batches, on every rank
    rank_batches = [chunks(r, batch) for r in ranks]
    assert all(len(b) == len(one_batches) for b in rank_batches)  # ceil(ceil(n/W)/b) == ceil(n/(W*b))

    pad = world * per_rank - size
    padded = perm + (perm * world)[:pad]  # DistributedSampler's padding: the first indices again
    for k, one_batch in enumerate(one_batches):
        union = [i for r in range(world) for i in rank_batches[r][k]]
        for r in range(world):  # rank r's k-th batch is perm[k*W*b + r :: W] within the k-th global batch
            assert rank_batches[r][k] == padded[k * world * batch + r : (k + 1) * world * batch : world]
        if k < len(one_batches) - 1 or pad == 0:
            assert Counter(union) == Counter(one_batch)  # exactly the one-process batch, no repeats
        else:  # the documented exception: the last global batch also repeats `pad` (< W) first samples
            assert Counter(union) == Counter(one_batch) + Counter(padded[size:])
            assert 0 < pad < world


def test_the_ranks_cover_the_data_exactly_once_when_it_divides():
    shares = [list(s) for s in rank_samplers(3500, 42, 2)]
    assert sorted(shares[0] + shares[1]) == list(range(3500))
    assert shares[0] == list(EpochShuffleSampler(3500, 42))[0::2]


def test_set_epoch_replays_the_epoch_on_every_rank():
    for world in (1, 2, 3):
        samplers = rank_samplers(100, 5, world, epoch=0)
        epoch0 = [[list(s) for s in samplers] for _ in range(2)]  # passes 0 and 1
        assert epoch0[0] != epoch0[1]  # a second pass is a new order
        for s in samplers:
            s.set_epoch(1)
        epoch1 = [list(s) for s in samplers]
        assert epoch1 != epoch0[0]
        for s in samplers:
            s.set_epoch(0)  # a resumed run: the same epoch gives the same batches
        assert [list(s) for s in samplers] == epoch0[0]
        assert [list(s) for s in rank_samplers(100, 5, world, epoch=1)] == epoch1  # a fresh process, too


def test_combined_loader_cycles_in_step_across_ranks():
    """max_size_cycle re-iterates the short loader: its `_pass` counter must advance alike on every rank."""
    seed, b = 11, 2
    labeled, unlabeled = TensorDataset(torch.arange(60)), TensorDataset(torch.arange(18))

    def epoch_batches(world: int, rank: int, batch: int, epoch: int) -> list[tuple[list[int], list[int]]]:
        loaders = {
            "labeled": DataLoader(labeled, batch_size=batch, sampler=EpochShuffleSampler(60, seed, num_replicas=world, rank=rank)),
            "unlabeled": DataLoader(unlabeled, batch_size=batch, sampler=EpochShuffleSampler(18, seed, num_replicas=world, rank=rank)),
        }
        combined = CombinedLoader(loaders, mode="max_size_cycle")
        out = []
        for e in range(epoch + 1):
            for dl in combined.flattened:
                _set_sampler_epoch(dl, e)  # what Lightning's fit loop does before every epoch
            out = [(batch_["labeled"][0].tolist(), batch_["unlabeled"][0].tolist()) for batch_, _, _ in combined]
        return out

    for world in (2, 3):
        for epoch in (0, 1):
            one = epoch_batches(1, 0, world * b, epoch)
            ranks = [epoch_batches(world, r, b, epoch) for r in range(world)]
            assert all(len(r) == len(one) for r in ranks)
            assert len(one) > math.ceil(18 / (world * b))  # the unlabeled loader really cycles
            for k, (x, u) in enumerate(one):
                assert sorted(i for r in ranks for i in r[k][0]) == sorted(x)
                assert sorted(i for r in ranks for i in r[k][1]) == sorted(u)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_replicas": 0}, ValueError, r"Expected `num_replicas` to be >= 1, but got 0"),
        ({"num_replicas": 2, "rank": 2}, ValueError, r"Expected `rank` to be in \[0, 1\], but got 2"),
        ({"rank": -1}, ValueError, r"Expected `rank` to be >= 0, but got -1"),
        ({"num_replicas": 2.0}, TypeError, r"Expected `num_replicas` to be an int, but got float"),
        ({"rank": True}, TypeError, r"Expected `rank` to be an int, but got bool"),
    ],
)
def test_bad_sharding_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        EpochShuffleSampler(10, 0, **kwargs)


@pytest.mark.parametrize(("size", "seed", "match"), [(-1, 0, "`dataset_size` to be >= 0"), (3, -2, "`seed` to be >= 0")])
def test_bad_size_or_seed_raise(size, seed, match):
    with pytest.raises(ValueError, match=match):
        EpochShuffleSampler(size, seed)


# ---------------------------------------------------------------------- inside Lightning


def test_lightning_keeps_the_sampler_under_ddp_and_sets_its_epoch():
    trainer = ddp_trainer()
    assert trainer._accelerator_connector.is_distributed and trainer.distributed_sampler_kwargs == {"num_replicas": 2, "rank": 0}
    # The check this relies on (data_connector.py, `_requires_distributed_sampler`):
    # `not isinstance(dataloader.sampler, DistributedSampler)`. A plain sampler does get replaced here...
    plain = DataLoader(TensorDataset(torch.arange(10)), sampler=RandomSampler(range(10)))
    assert trainer._data_connector._requires_distributed_sampler(plain)

    dm = MNIST1DDataModule(batch_size=64, transfer_samples=500, transfer_batch_size=32)
    dm.trainer = trainer  # what Trainer.fit does
    dm.setup("fit")
    combined = dm.train_dataloader()
    samplers = [dl.sampler for dl in combined.flattened]
    for sampler, dataset in zip(samplers, (dm.train_dataset, dm.transfer_dataset)):
        assert isinstance(sampler, EpochShuffleSampler) and isinstance(sampler, DistributedSampler)
        assert (sampler.num_replicas, sampler.rank, len(sampler)) == (2, 0, math.ceil(len(dataset) / 2))
    # ...but ours is kept, object for object, by the processing the fit loop applies to each loader
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers")  # Lightning's advice, not ours
        processed = [_process_dataloader(trainer, TrainerFn.FITTING, RunningStage.TRAINING, dl) for dl in combined.flattened]
    assert [dl.sampler for dl in processed] == samplers
    assert not any(trainer._data_connector._requires_distributed_sampler(dl) for dl in processed)
    for dl in processed:
        _set_sampler_epoch(dl, 3)  # fit_loop.py, on_advance_start: the call made before every epoch
    assert [s.epoch for s in samplers] == [3, 3]


def test_the_datamodule_shards_by_the_trainer_and_not_without_one():
    dm = MNIST1DDataModule(batch_size=64)
    dm.setup("fit")
    assert (dm.train_dataloader().sampler.num_replicas, dm.train_dataloader().sampler.rank) == (1, 0)
    dm.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    assert dm.train_dataloader().sampler.num_replicas == 1  # single device: no distributed_sampler_kwargs
    dm.trainer = ddp_trainer()
    assert dm.train_dataloader().sampler.num_replicas == 2
    assert isinstance(dm.val_dataloader().sampler, SequentialSampler)  # eval loaders: Lightning shards them


# ---------------------------------------------------------------------- no batch of one


def test_a_last_batch_of_one_sample_is_dropped():
    dm = MNIST1DDataModule(batch_size=100, val_size=499)  # 3,501 training samples = 35 * 100 + 1
    dm.setup("fit")
    loader = dm.train_dataloader()
    sizes = [len(y) for _, y in loader]
    assert loader.drop_last and len(loader) == 35 and set(sizes) == {100}


def test_other_last_batches_are_kept_as_before():
    dm = MNIST1DDataModule(batch_size=128)  # the defaults: 3,500 = 27 * 128 + 44
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert not loader.drop_last and [len(y) for _, y in loader][-1] == 44
    dm = MNIST1DDataModule(batch_size=64, val_size=3998)  # 2 training samples in one batch: kept
    dm.setup("fit")
    assert [len(y) for _, y in dm.train_dataloader()] == [2]


def test_a_last_batch_of_one_sample_per_rank_is_dropped_under_ddp():
    dm = MNIST1DDataModule(batch_size=50, val_size=498, transfer_samples=500)  # 3,502 = 2 ranks * (35 * 50 + 1)
    dm.trainer = ddp_trainer()
    dm.setup("fit")
    n_u = math.ceil(len(dm.transfer_dataset) / 2)
    dm.transfer_batch_size = n_u - 1  # each rank: one full unlabeled batch and one sample left over
    labeled, unlabeled = dm.train_dataloader().flattened
    assert labeled.drop_last and len(labeled) == 35 and {len(y) for _, y in labeled} == {50}
    assert unlabeled.drop_last and [len(x) for (x,) in unlabeled] == [n_u - 1]


# ---------------------------------------------------------------------- the cache file


def test_the_cached_npz_gets_the_umask_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        MNIST1DDataModule(tmp_path).prepare_data()
    finally:
        os.umask(previous)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temporary file left behind
    assert files[0].stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------- end to end


def student_init(overrides: list[str]) -> dict[str, torch.Tensor]:
    """The student's initial weights, built as the stage plan builds them (seed, then the student first)."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="lightning_kd.conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=["run_dir=unused", *overrides])
    finally:
        GlobalHydra.instance().clear()
    L.seed_everything(cfg.seed, verbose=False, workers=True)
    return {k: v.clone() for k, v in stages.build_module(cfg, "student_scratch", None).student.state_dict().items()}


STAGES = ("student_scratch", "student_distilled", "student_distilled_transfer")


@pytest.mark.slow
def test_ddp_equals_one_process_through_the_console_script(tmp_path):
    script = shutil.which("lightning-kd", path=os.path.dirname(sys.executable))
    assert script is not None, "the `lightning-kd` console script is not installed next to this Python"
    # Any teacher works here (the claim is about the data order and the gradient averaging): a random one.
    teacher = tmp_path / "teacher.pt"
    torch.save(get_model("cnn1d", num_classes=10).state_dict(), teacher)
    # Two epochs: the second one only matches if Lightning calls set_epoch on the DDP ranks' samplers too.
    common = ["task=distill", f"task.stages=[{','.join(STAGES)}]", f"teacher.checkpoint={teacher}", "seed=42",
              "student.epochs=2", "student.transfer_epochs=2", "data.transfer_samples=500", *SMOKE]
    runs = {
        "one": ["data.batch_size=128", "data.transfer_batch_size=128"],
        "ddp": ["trainer=ddp_cpu", "data.batch_size=64", "data.transfer_batch_size=64"],
    }
    weights = {}
    for name, overrides in runs.items():
        run_dir = tmp_path / name
        run_command([script, *common, *overrides, f"hydra.run.dir={run_dir}"], tmp_path, timeout=420)
        weights[name] = {s: torch.load(run_dir / s / "model.pt", weights_only=True) for s in STAGES}

    init = student_init(common)
    for stage in STAGES:
        one, ddp = weights["one"][stage], weights["ddp"][stage]
        assert one.keys() == ddp.keys() == init.keys()
        diff = max((one[k] - ddp[k]).abs().max().item() for k in one)
        moved = max((one[k] - init[k]).abs().max().item() for k in one)
        assert diff <= 1e-4, f"{stage}: DDP and one process differ by {diff:.3g}"
        # Trained for real (measured: 0.07-0.09, i.e. ~1000x the tolerance), and from this very init: AdamW moves
        # a weight by about lr=0.003 per step at most over these 56 steps (another random init is ~0.35 away).
        assert 0.02 < moved < 0.2, f"{stage}: the weights moved {moved:.3g} from their init: nothing was compared"
