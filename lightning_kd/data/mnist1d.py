"""MNIST-1D as a LightningDataModule, with an optional unlabeled transfer set for distillation."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from mnist1d.data import get_dataset_args, make_dataset
from mnist1d.utils import ObjectView
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_kd.data.samplers import EpochShuffleSampler
from lightning_kd.io import atomic_write

# Bump when the layout of the cached files changes, so that old caches are not read back.
_CACHE_VERSION = 1
_NUM_TRAIN = 4000  # 5,000 samples x train_split 0.8 in the published default
_MAX_SEED = 2**32 - 1  # numpy's legacy seeding, which mnist1d uses, accepts 0 .. 2**32 - 1


def _default_data_dir() -> Path:
    env = os.environ.get("LIGHTNING_KD_DATA")
    return Path(env) if env else Path.home() / ".cache" / "lightning_kd" / "mnist1d"


def _check_int(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> None:
    # bool is an int subclass; `batch_size=True` is a bug, not a batch size of 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be an int, but got {type(value).__name__}: {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"Expected `{name}` to be {bounds}, but got {value}")


def _make_args(seed: int, **overrides: Any) -> dict[str, Any]:
    args = get_dataset_args(as_dict=True)
    args.pop("url")  # never needed: we only generate, and it must not change the cache key
    args.update(seed=seed, **overrides)
    return args


def _cache_key(args: dict[str, Any]) -> str:
    blob = json.dumps({"version": _CACHE_VERSION, **args}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _generate(args: dict[str, Any]) -> dict[str, np.ndarray]:
    # mnist1d reseeds the global `random` and `np.random` states; put them back afterwards so
    # that building the data does not silently change the user's seeded run.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(ObjectView(dict(args)))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "x": np.asarray(data["x"], dtype=np.float32),
        "y": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.asarray(data["x_test"], dtype=np.float32),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }


def _load_or_build(path: Path, args: dict[str, Any], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in keys}
    arrays = {k: v for k, v in _generate(args).items() if k in keys}
    # Atomic (a concurrent reader, another DDP rank or job, sees no file or the whole file) and with
    # the umask's mode, so that a shared data directory stays readable for colleagues.
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return arrays


def _row_keys(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in np.ascontiguousarray(x)}


class MNIST1DDataModule(L.LightningDataModule):
    """MNIST-1D (Greydanus & Kobak, "Scaling Down Deep Learning with MNIST-1D", ICML 2024).

    MNIST-1D renders the ten digit templates as 1-D signals of length 40, then pads, translates,
    scales, shears and adds correlated and i.i.d. noise. It is tiny (a CPU trains a CNN on it in
    seconds) yet separates model families clearly: the published test accuracies are 32 % for
    logistic regression, 68 % for an MLP and 94 % for a CNN. That gap is where distillation shows:
    a small MLP cannot find the translation-invariant features by itself, but it can imitate a CNN
    teacher's soft outputs.

    The labeled data is the published default, ``mnist1d.data.make_dataset(get_dataset_args())``
    with ``seed``: 4,000 train and 1,000 test samples. ``val_size`` samples of the 4,000 are held
    out for validation (a fixed permutation from ``split_seed``); the test split is the 1,000 test
    samples. The package's ``get_dataset`` (which downloads) is never called: everything is
    generated locally and cached as ``.npz`` files in ``data_dir``, one per build, named after a
    hash of the generation arguments and written atomically (safe under DDP) with the mode the umask
    gives any new file (0644 under the usual umask 022).

    With ``transfer_samples=N`` it also builds a *transfer set* (Hinton et al., 2015): ``N`` extra
    unlabeled inputs from the same generator with ``transfer_seed``, which the teacher labels
    with its soft targets. Rows equal to any labeled (train, val or test) row are dropped, so
    the transfer set never leaks the test set. Note that mnist1d standardises each build by its
    own mean and std; for a transfer set of thousands of samples these match the labeled ones
    closely.

    Batches: without a transfer set, ``train_dataloader`` yields ``[x, y]`` with ``x`` of shape
    ``(B, 40)`` float32 and ``y`` of shape ``(B,)`` int64. With one, it is a ``CombinedLoader`` in
    ``"max_size_cycle"`` mode whose batches (as ``training_step`` receives them) are
    ``{"labeled": [x, y], "unlabeled": [x_u]}``; an epoch lasts as long as the longer loader and
    the shorter one cycles.

    Training order and DDP: the training loaders shuffle with :class:`EpochShuffleSampler`, a function
    of (``shuffle_seed``, epoch), so that a resumed run sees the same batches. Under DDP each rank
    takes its interleaved share of the *same* order (the sampler gets the Trainer's data-parallel
    rank and world size; Lightning keeps it, as it is a ``DistributedSampler``), so ``W`` processes
    with ``batch_size=b`` see exactly the batches of one process with ``batch_size=W*b`` and train
    the same weights to float rounding. Only when a training set's size is not a multiple of ``W``
    does the last global batch differ: it is padded with repeated samples so that every rank has as
    many batches.

    A last training batch of a single sample is dropped (BatchNorm cannot train on it): when a
    training loader's per-rank size leaves a remainder of exactly 1 after whole batches, that one
    sample is skipped for the epoch (it is another sample each epoch). Other remainders are kept.

    Args:
        data_dir: Where the ``.npz`` caches live. Defaults to ``$LIGHTNING_KD_DATA`` or
            ``~/.cache/lightning_kd/mnist1d``.
        batch_size: Labeled training batch size (per process under DDP).
        eval_batch_size: Batch size of the validation, test and predict loaders.
        val_size: Samples held out of the 4,000 training samples for validation (0 disables it).
        transfer_samples: Size of the unlabeled transfer set (0: none).
        transfer_batch_size: Batch size of the transfer loader (per process under DDP). Defaults to
            ``batch_size``.
        seed: Generation seed of the labeled data (42 is the published dataset).
        transfer_seed: Generation seed of the transfer set; must differ from ``seed``.
        split_seed: Seed of the train/validation split.
        shuffle_seed: Seed of the training order (a function of this seed and the epoch, so that a
            resumed run sees the same batches). Default: ``torch.initial_seed()`` when the loader is
            built, i.e. the run's ``seed_everything`` seed. Under DDP it must be the same on every rank
            (``seed_everything`` with one seed is; ``seed + rank`` is not).
        num_workers: DataLoader workers.

    Raises:
        TypeError: If an integer setting is not an int, or ``data_dir`` is not a path.
        ValueError: If an integer setting is out of range, or ``transfer_seed == seed`` while
            ``transfer_samples > 0``.

    Example::

        >>> import tempfile
        >>> dm = MNIST1DDataModule(tempfile.mkdtemp(), batch_size=64, transfer_samples=1000)
        >>> dm.prepare_data()
        >>> dm.setup("fit")
        >>> len(dm.train_dataset), len(dm.val_dataset), len(dm.transfer_dataset)
        (3500, 500, 1000)
        >>> batch, batch_idx, dataloader_idx = next(iter(dm.train_dataloader()))
        >>> batch["labeled"][0].shape, batch["labeled"][1].shape, batch["unlabeled"][0].shape
        (torch.Size([64, 40]), torch.Size([64]), torch.Size([64, 40]))
    """

    num_classes = 10
    input_shape = (40,)

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int = 500,
        transfer_samples: int = 0,
        transfer_batch_size: int | None = None,
        seed: int = 42,
        transfer_seed: int = 1234,
        split_seed: int = 0,
        shuffle_seed: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
            raise TypeError(f"Expected `data_dir` to be a path or None, but got {type(data_dir).__name__}")
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("eval_batch_size", eval_batch_size, minimum=1)
        _check_int("val_size", val_size, minimum=0, maximum=_NUM_TRAIN - 1)
        _check_int("transfer_samples", transfer_samples, minimum=0)
        if transfer_batch_size is not None:
            _check_int("transfer_batch_size", transfer_batch_size, minimum=1)
        for name, value in (("seed", seed), ("transfer_seed", transfer_seed), ("split_seed", split_seed)):
            _check_int(name, value, minimum=0, maximum=_MAX_SEED)
        _check_int("num_workers", num_workers, minimum=0)
        if shuffle_seed is not None:
            _check_int("shuffle_seed", shuffle_seed, minimum=0)
        if transfer_samples > 0 and transfer_seed == seed:
            # The generator draws samples class by class from the seed, so the same seed would
            # reproduce the labeled samples (test set included) instead of new ones.
            raise ValueError(
                f"Expected `transfer_seed` to differ from `seed`, but both are {seed}. "
                "Choose another `transfer_seed` or set `transfer_samples=0`."
            )
        self.save_hyperparameters()

        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else _default_data_dir()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_size = val_size
        self.transfer_samples = transfer_samples
        self.transfer_batch_size = transfer_batch_size if transfer_batch_size is not None else batch_size
        self.seed = seed
        self.transfer_seed = transfer_seed
        self.split_seed = split_seed
        self.shuffle_seed = shuffle_seed
        self.num_workers = num_workers

        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None
        self.transfer_dataset: TensorDataset | None = None
        self._labeled_x: np.ndarray | None = None  # (5000, 40) train + test inputs, for the overlap check

    # ------------------------------------------------------------------ files

    @property
    def labeled_args(self) -> dict[str, Any]:
        """The ``make_dataset`` arguments of the labeled data (the published default with ``seed``)."""
        return _make_args(self.seed)

    @property
    def transfer_args(self) -> dict[str, Any]:
        """The ``make_dataset`` arguments of the transfer set."""
        # make_dataset draws num_samples // 10 per class: round up so that at least N come out
        num_samples = -(-self.transfer_samples // self.num_classes) * self.num_classes
        return _make_args(self.transfer_seed, num_samples=num_samples, train_split=1.0)

    @property
    def labeled_path(self) -> Path:
        """Cache file of the labeled data."""
        return self.data_dir / f"mnist1d_{_cache_key(self.labeled_args)}.npz"

    @property
    def transfer_path(self) -> Path:
        """Cache file of the transfer set (all generated inputs, before taking the first N)."""
        return self.data_dir / f"mnist1d_transfer_{_cache_key(self.transfer_args)}.npz"

    def _load_labeled(self) -> dict[str, np.ndarray]:
        return _load_or_build(self.labeled_path, self.labeled_args, ("x", "y", "x_test", "y_test"))

    def _load_transfer(self) -> np.ndarray:
        return _load_or_build(self.transfer_path, self.transfer_args, ("x",))["x"]

    # ------------------------------------------------------------------ hooks

    @override
    def prepare_data(self) -> None:
        """Build the cache files if missing (Lightning calls this on one process per node)."""
        self._load_labeled()
        if self.transfer_samples > 0:
            self._load_transfer()

    @override
    def setup(self, stage: str | None = None) -> None:
        """Load the splits from the cache files, building them if ``prepare_data`` did not.

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or None (all); the
                transfer set is only loaded for ``"fit"`` and None.
        """
        if self.test_dataset is None:
            data = self._load_labeled()
            x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
            val_idx, train_idx = perm[: self.val_size].sort().values, perm[self.val_size :].sort().values
            self.train_dataset = TensorDataset(x[train_idx], y[train_idx])
            self.val_dataset = TensorDataset(x[val_idx], y[val_idx])
            self.test_dataset = TensorDataset(torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"]))
            self._labeled_x = np.concatenate([data["x"], data["x_test"]])

        if self.transfer_samples > 0 and self.transfer_dataset is None and stage in (None, "fit"):
            x_u = self._load_transfer()[: self.transfer_samples]
            seen = _row_keys(self._labeled_x)
            keep = np.fromiter((row.tobytes() not in seen for row in x_u), dtype=bool, count=len(x_u))
            if not keep.all():
                rank_zero_warn(
                    f"Dropped {int((~keep).sum())} transfer rows equal to labeled rows; "
                    f"the transfer set has {int(keep.sum())} samples instead of {self.transfer_samples}."
                )
            x_u = x_u[keep]
            assert not (_row_keys(x_u) & seen), "transfer set overlaps the labeled data"
            self.transfer_dataset = TensorDataset(torch.from_numpy(np.ascontiguousarray(x_u)))

    # ------------------------------------------------------------------ loaders

    def _data_parallel(self) -> tuple[int, int]:
        """``(num_replicas, rank)`` of this process: the Trainer's, or ``(1, 0)`` without a distributed one."""
        # The kwargs Lightning itself would give a DistributedSampler: under model parallelism these
        # are the data-parallel size and rank, not the world size and global rank.
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if not kwargs:  # None for single-device strategies
            return 1, 0
        return int(kwargs["num_replicas"]), int(kwargs["rank"])

    def _loader(self, dataset: TensorDataset | None, batch_size: int, *, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("The datasets are not loaded yet: call `setup()` first (the Trainer does).")
        sampler = None
        drop_last = False
        if shuffle:
            # The shuffling order is a function of (seed, epoch) so that a resumed run replays it exactly.
            seed = torch.initial_seed() if self.shuffle_seed is None else self.shuffle_seed
            num_replicas, rank = self._data_parallel()
            sampler = EpochShuffleSampler(len(dataset), seed, num_replicas=num_replicas, rank=rank)
            # A last batch of one sample breaks BatchNorm ("Expected more than 1 value per channel"):
            # drop it in that case only (same on every rank, as each has len(sampler) samples), so that
            # the batches of every other size, the defaults included, stay as they were.
            drop_last = len(sampler) > batch_size and len(sampler) % batch_size == 1
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader | CombinedLoader:
        """Labeled ``[x, y]`` batches, or a ``CombinedLoader`` of labeled and unlabeled batches."""
        labeled = self._loader(self.train_dataset, self.batch_size, shuffle=True)
        if self.transfer_samples == 0:
            return labeled
        if self.transfer_dataset is None:
            raise RuntimeError("The transfer set is not loaded: call `setup('fit')` first (the Trainer does).")
        unlabeled = self._loader(self.transfer_dataset, self.transfer_batch_size, shuffle=True)
        return CombinedLoader({"labeled": labeled, "unlabeled": unlabeled}, mode="max_size_cycle")

    @override
    def val_dataloader(self) -> DataLoader:
        """Validation ``[x, y]`` batches of ``eval_batch_size``, in a fixed order."""
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        """Test ``[x, y]`` batches of ``eval_batch_size``, in a fixed order."""
        return self._loader(self.test_dataset, self.eval_batch_size, shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        """Test inputs only, as ``[x]`` batches of ``eval_batch_size``."""
        if self.test_dataset is None:
            raise RuntimeError("The datasets are not loaded yet: call `setup()` first (the Trainer does).")
        return self._loader(TensorDataset(self.test_dataset.tensors[0]), self.eval_batch_size, shuffle=False)
