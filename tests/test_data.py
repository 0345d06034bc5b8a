"""Tests for the MNIST-1D datamodule: splits, cache, transfer set, loaders, validation."""

from __future__ import annotations

import importlib
import math
import socket
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import requests
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader

from lightning_kd.data import MNIST1DDataModule

mnist1d_module = importlib.import_module("lightning_kd.data.mnist1d")

N_TRANSFER = 205  # not a multiple of 10: exercises the rounding up of num_samples


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache built once for the module; tests that count builds use their own `tmp_path`."""
    path = tmp_path_factory.mktemp("mnist1d")
    MNIST1DDataModule(path, transfer_samples=N_TRANSFER).prepare_data()
    return path


@pytest.fixture
def dm(shared_dir: Path) -> MNIST1DDataModule:
    dm = MNIST1DDataModule(shared_dir, batch_size=64, transfer_samples=N_TRANSFER, transfer_batch_size=32)
    dm.setup("fit")
    return dm


@pytest.fixture
def count_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of `make_dataset` (each list item is the num_samples of one build)."""
    calls: list[int] = []
    original = mnist1d_module.make_dataset

    def counting(args, *a, **kw):
        calls.append(args.num_samples)
        return original(args, *a, **kw)

    monkeypatch.setattr(mnist1d_module, "make_dataset", counting)
    return calls


def _rows(x: torch.Tensor | np.ndarray) -> set[bytes]:
    x = x.numpy() if isinstance(x, torch.Tensor) else x
    return {row.tobytes() for row in np.ascontiguousarray(x)}


# ---------------------------------------------------------------- splits and shapes


def test_sizes_dtypes_and_shapes(shared_dir: Path) -> None:
    dm = MNIST1DDataModule(shared_dir)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (3500, 500, 1000)
    assert dm.transfer_dataset is None
    assert dm.num_classes == 10 and dm.input_shape == (40,)
    for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        x, y = ds.tensors
        assert x.dtype == torch.float32 and x.shape[1:] == (40,)
        assert y.dtype == torch.int64 and y.ndim == 1
        assert int(y.min()) >= 0 and int(y.max()) <= 9
    # all ten classes in every split (the data is class-balanced before the shuffle)
    assert all(len(ds.tensors[1].unique()) == 10 for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset))


def test_split_is_disjoint_and_covers_the_training_set(shared_dir: Path) -> None:
    dm = MNIST1DDataModule(shared_dir, val_size=700)
    dm.setup("fit")
    with np.load(dm.labeled_path) as f:
        all_train = _rows(f["x"])
    assert len(all_train) == 4000  # rows are distinct, so row sets identify samples
    train, val = _rows(dm.train_dataset.tensors[0]), _rows(dm.val_dataset.tensors[0])
    assert (len(train), len(val)) == (3300, 700)
    assert not train & val
    assert train | val == all_train
    assert not (train | val) & _rows(dm.test_dataset.tensors[0])


def test_split_depends_on_split_seed_only(shared_dir: Path) -> None:
    def val_rows(**kw) -> set[bytes]:
        dm = MNIST1DDataModule(shared_dir, **kw)
        dm.setup("fit")
        return _rows(dm.val_dataset.tensors[0])

    assert val_rows(split_seed=0) == val_rows(split_seed=0, batch_size=7)
    assert val_rows(split_seed=0) != val_rows(split_seed=1)


# ---------------------------------------------------------------- determinism and cache


def test_two_builds_are_identical_and_the_cache_is_reused(tmp_path: Path, count_builds: list[int]) -> None:
    a = MNIST1DDataModule(tmp_path / "a", transfer_samples=30)
    a.prepare_data()
    a.setup("fit")
    assert count_builds == [5000, 30]

    b = MNIST1DDataModule(tmp_path / "b", transfer_samples=30)
    b.setup("fit")  # no prepare_data: setup builds the missing files itself
    assert count_builds == [5000, 30, 5000, 30]
    for name in ("train_dataset", "val_dataset", "test_dataset", "transfer_dataset"):
        for ta, tb in zip(getattr(a, name).tensors, getattr(b, name).tensors):
            assert torch.equal(ta, tb), name

    c = MNIST1DDataModule(tmp_path / "a", transfer_samples=30)
    c.prepare_data()
    c.setup("fit")
    assert count_builds == [5000, 30, 5000, 30]  # read back from the files, nothing regenerated
    assert torch.equal(c.train_dataset.tensors[0], a.train_dataset.tensors[0])

    # one file per build, named by the hash of its args; no temporary file left behind
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        [a.labeled_path.name, a.transfer_path.name]
    )
    assert a.labeled_path.name.startswith("mnist1d_") and a.transfer_path.name.startswith("mnist1d_transfer_")


def test_cache_key_follows_the_generation_args(tmp_path: Path) -> None:
    base = MNIST1DDataModule(tmp_path, transfer_samples=100)
    assert MNIST1DDataModule(tmp_path, batch_size=7, val_size=3).labeled_path == base.labeled_path
    assert MNIST1DDataModule(tmp_path, seed=43).labeled_path != base.labeled_path
    # 95 and 100 both generate 100 samples: the same file serves both
    assert MNIST1DDataModule(tmp_path, transfer_samples=95).transfer_path == base.transfer_path
    assert MNIST1DDataModule(tmp_path, transfer_samples=101).transfer_path != base.transfer_path
    assert "url" not in base.labeled_args
    assert base.transfer_args["num_samples"] == 100 and base.transfer_args["train_split"] == 1.0


def test_build_never_touches_the_network_nor_the_global_rng(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(requests.Session, "request", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    np_state = np.random.get_state()
    dm = MNIST1DDataModule(tmp_path, transfer_samples=20)
    dm.prepare_data()
    dm.setup()
    assert len(dm.transfer_dataset) == 20
    # mnist1d reseeds np.random globally; the datamodule restores it
    after = np.random.get_state()
    assert np.array_equal(np_state[1], after[1]) and np_state[2:] == after[2:]


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIGHTNING_KD_DATA", str(tmp_path / "env"))
    assert MNIST1DDataModule().data_dir == tmp_path / "env"
    monkeypatch.delenv("LIGHTNING_KD_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert MNIST1DDataModule().data_dir == tmp_path / ".cache" / "lightning_kd" / "mnist1d"


# ---------------------------------------------------------------- transfer set


def test_transfer_set_size_and_no_overlap(dm: MNIST1DDataModule) -> None:
    (x_u,) = dm.transfer_dataset.tensors
    assert x_u.shape == (N_TRANSFER, 40) and x_u.dtype == torch.float32
    transfer = _rows(x_u)
    assert len(transfer) == N_TRANSFER
    assert not transfer & _rows(dm.test_dataset.tensors[0])
    assert not transfer & _rows(dm.train_dataset.tensors[0])
    assert not transfer & _rows(dm.val_dataset.tensors[0])


def test_transfer_rows_equal_to_labeled_rows_are_dropped(shared_dir: Path, tmp_path: Path) -> None:
    dm = MNIST1DDataModule(tmp_path, transfer_samples=10)
    # plant a transfer cache whose rows 2 and 5 are test rows and row 7 a training row
    with np.load(MNIST1DDataModule(shared_dir).labeled_path) as f:
        np.savez(MNIST1DDataModule(tmp_path).labeled_path, **f)
        x_test, x_train = f["x_test"], f["x"]
    planted = np.random.default_rng(0).standard_normal((10, 40)).astype(np.float32)
    planted[2], planted[5], planted[7] = x_test[0], x_test[1], x_train[3]
    np.savez(dm.transfer_path, x=planted)

    with pytest.warns(UserWarning, match="Dropped 3 transfer rows"):
        dm.setup("fit")
    assert torch.equal(dm.transfer_dataset.tensors[0], torch.from_numpy(np.delete(planted, [2, 5, 7], axis=0)))


def test_transfer_only_loaded_for_fit(shared_dir: Path) -> None:
    dm = MNIST1DDataModule(shared_dir, transfer_samples=N_TRANSFER)
    dm.setup("test")
    assert dm.transfer_dataset is None
    dm.setup("fit")
    assert len(dm.transfer_dataset) == N_TRANSFER


# ---------------------------------------------------------------- loaders


def test_train_loader_without_transfer_yields_x_y(shared_dir: Path) -> None:
    dm = MNIST1DDataModule(shared_dir, batch_size=64)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, DataLoader) and not loader.persistent_workers
    assert len(loader) == math.ceil(3500 / 64)  # drop_last=False
    x, y = next(iter(loader))
    assert x.shape == (64, 40) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64
    # shuffled: the first batch is not the first 64 samples
    assert not torch.equal(x, dm.train_dataset.tensors[0][:64])


def test_combined_loader_yields_labeled_and_unlabeled(dm: MNIST1DDataModule) -> None:
    loader = dm.train_dataloader()
    assert isinstance(loader, CombinedLoader)
    iterator = iter(loader)  # what Lightning's fetcher does; len() is only defined after it
    # max_size_cycle: an epoch is the longer of the two loaders, the shorter one cycles
    assert len(loader) == max(math.ceil(3500 / 64), math.ceil(N_TRANSFER / 32))
    out = next(iterator)
    # Lightning 2.x: iterating a CombinedLoader yields (batch, batch_idx, dataloader_idx);
    # the training loop hands `batch` alone to training_step
    assert isinstance(out, tuple) and len(out) == 3
    batch, batch_idx, dataloader_idx = out
    assert (batch_idx, dataloader_idx) == (0, 0)
    assert isinstance(batch, dict) and set(batch) == {"labeled", "unlabeled"}
    x, y = batch["labeled"]
    (x_u,) = batch["unlabeled"]
    assert x.shape == (64, 40) and y.shape == (64,) and y.dtype == torch.int64
    assert x_u.shape == (32, 40) and x_u.dtype == torch.float32

    # `iter(loader)` returns the loader itself and restarts it, so drain with next(), not a for loop
    n_batches = 1
    while True:
        try:
            next(iterator)
        except StopIteration:
            break
        n_batches += 1
    assert n_batches == len(loader)


def test_eval_loaders_are_fixed_order(dm: MNIST1DDataModule) -> None:
    for loader, ds in ((dm.val_dataloader(), dm.val_dataset), (dm.test_dataloader(), dm.test_dataset)):
        x, y = next(iter(loader))
        assert torch.equal(x, ds.tensors[0][: len(x)]) and torch.equal(y, ds.tensors[1][: len(y)])
    assert len(dm.test_dataloader()) == 1  # 1,000 test samples, eval_batch_size 1000
    (x,) = next(iter(dm.predict_dataloader()))
    assert torch.equal(x, dm.test_dataset.tensors[0])


def test_loaders_before_setup_raise() -> None:
    dm = MNIST1DDataModule("unused")
    for make in (dm.train_dataloader, dm.val_dataloader, dm.test_dataloader, dm.predict_dataloader):
        with pytest.raises(RuntimeError, match="setup"):
            make()


def test_persistent_workers_only_with_workers(shared_dir: Path) -> None:
    dm = MNIST1DDataModule(shared_dir, num_workers=1)
    dm.setup("validate")
    loader = dm.val_dataloader()
    assert loader.num_workers == 1 and loader.persistent_workers


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_trainer_gives_training_step_the_dict(dm: MNIST1DDataModule, tmp_path: Path) -> None:
    seen: list = []

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(40, 10)

        def training_step(self, batch, batch_idx):
            seen.append(batch)
            x, y = batch["labeled"]
            (x_u,) = batch["unlabeled"]
            return torch.nn.functional.cross_entropy(self.layer(x), y) + self.layer(x_u).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(Probe(), datamodule=dm)
    assert len(seen) == 2 and all(set(b) == {"labeled", "unlabeled"} for b in seen)


# ---------------------------------------------------------------- argument validation


def test_hyperparameters_are_saved() -> None:
    dm = MNIST1DDataModule("unused", batch_size=32, transfer_samples=100)
    assert dm.hparams["batch_size"] == 32 and dm.hparams["transfer_samples"] == 100
    assert dm.transfer_batch_size == 32  # defaults to batch_size


def test_transfer_seed_equal_to_seed_raises() -> None:
    with pytest.raises(ValueError, match="`transfer_seed` to differ from `seed`"):
        MNIST1DDataModule("unused", transfer_samples=100, seed=7, transfer_seed=7)
    MNIST1DDataModule("unused", transfer_samples=0, seed=7, transfer_seed=7)  # unused: fine


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("batch_size", 0),
        ("eval_batch_size", 0),
        ("val_size", -1),
        ("val_size", 4000),
        ("transfer_samples", -1),
        ("transfer_batch_size", 0),
        ("seed", -1),
        ("transfer_seed", 2**32),
        ("split_seed", -1),
        ("num_workers", -1),
    ],
)
def test_bad_values_raise_naming_the_setting(name: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"Expected `{name}` to be .*, but got {value}"):
        MNIST1DDataModule("unused", **{name: value})


@pytest.mark.parametrize(("name", "value"), [("batch_size", 1.5), ("batch_size", True), ("val_size", "500")])
def test_bad_types_raise_naming_the_setting(name: str, value: object) -> None:
    with pytest.raises(TypeError, match=f"Expected `{name}` to be an int"):
        MNIST1DDataModule("unused", **{name: value})


def test_bad_data_dir_type_raises() -> None:
    with pytest.raises(TypeError, match="Expected `data_dir` to be a path or None"):
        MNIST1DDataModule(3)
