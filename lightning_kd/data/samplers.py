"""A shuffling sampler whose order is a pure function of (seed, epoch): resume replays it exactly, and
under DDP the ranks share one order, so that their batches together are the one-process batches."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler


def epoch_permutation(size: int, seed: int, epoch: int, pass_: int = 0) -> list[int]:
    """The shuffled order of ``range(size)`` for ``(seed, epoch, pass_)``: the same on every process.

    Example::

        >>> epoch_permutation(5, seed=0, epoch=3) == epoch_permutation(5, seed=0, epoch=3)
        True
        >>> sorted(epoch_permutation(5, seed=0, epoch=3))
        [0, 1, 2, 3, 4]
    """
    state = np.random.SeedSequence([seed, epoch, pass_]).generate_state(2)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randperm(size, generator=generator).tolist()


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be an int, but got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"Expected `{name}` to be >= {minimum}, but got {value}")


class EpochShuffleSampler(DistributedSampler):
    """Rank ``rank``'s share of one random permutation of ``range(dataset_size)`` drawn from ``(seed, epoch, pass)``.

    ``DataLoader(shuffle=True)`` draws from the global generator, whose state a checkpoint does not
    hold: a run resumed at epoch k would see other batches than the uninterrupted run. Lightning calls
    :meth:`set_epoch` before every epoch, so here the order depends on the epoch alone. ``pass`` counts
    the iterations inside one epoch: a ``CombinedLoader`` cycles a short loader several times per
    epoch, and each cycle gets a new order (every rank has as many batches, so the ranks cycle in step).

    **DDP equals one process.** Every rank draws the same permutation ``perm`` (same seed) and takes
    ``perm[rank::num_replicas]``, like :class:`~torch.utils.data.DistributedSampler`. With a per-rank
    batch size ``b``, rank ``r``'s k-th batch then holds ``perm[k*W*b + r : (k+1)*W*b : W]`` (``W =
    num_replicas``): the ranks' k-th batches together are exactly the one-process k-th batch of size
    ``W*b``, so DDP with batch ``b`` trains like one process with batch ``W*b`` (to float rounding).
    With ``num_replicas=1`` the order is ``perm`` itself.

    When ``dataset_size`` is not a multiple of ``num_replicas``, ``perm`` is padded by repeating its
    first indices (as ``DistributedSampler`` does) so that every rank gets ``ceil(dataset_size / W)``
    samples and as many batches (ranks with fewer batches would leave DDP waiting forever); the last
    global batch then repeats up to ``W - 1`` samples and differs slightly from the one-process one.

    Because this is a ``DistributedSampler``, Lightning keeps it under DDP instead of wrapping it in
    its own ``DistributedSamplerWrapper`` (which would re-shuffle with another seed and re-split), and
    still calls :meth:`set_epoch` before every epoch.

    Args:
        dataset_size: Number of samples to shuffle (``len(dataset)``).
        seed: Shuffling seed; must be the same on every rank.
        num_replicas: Number of data-parallel processes ``W`` (Lightning's
            ``trainer.distributed_sampler_kwargs["num_replicas"]``).
        rank: This process's rank among them, in ``[0, num_replicas)``.

    Raises:
        TypeError: If an argument is not an int.
        ValueError: If ``dataset_size`` or ``seed`` is negative, ``num_replicas < 1`` or ``rank`` is
            outside ``[0, num_replicas)``.

    Example::

        >>> sampler = EpochShuffleSampler(5, seed=0)
        >>> sampler.set_epoch(3)
        >>> first = list(sampler)
        >>> sampler.set_epoch(3)
        >>> list(sampler) == first, sorted(first)
        (True, [0, 1, 2, 3, 4])
        >>> ranks = [EpochShuffleSampler(5, seed=0, num_replicas=2, rank=r) for r in (0, 1)]
        >>> for s in ranks:
        ...     s.set_epoch(3)
        >>> shares = [list(s) for s in ranks]
        >>> shares[0] == first[0::2], shares[1] == first[1::2] + first[:1]  # rank 1 padded with perm[0]
        (True, True)
    """

    def __init__(self, dataset_size: int, seed: int, *, num_replicas: int = 1, rank: int = 0) -> None:
        _check_int("dataset_size", dataset_size, minimum=0)
        _check_int("seed", seed, minimum=0)
        _check_int("num_replicas", num_replicas, minimum=1)
        _check_int("rank", rank, minimum=0)
        if rank >= num_replicas:
            raise ValueError(f"Expected `rank` to be in [0, {num_replicas - 1}], but got {rank}")
        # DistributedSampler only needs len(dataset): a range stands for the dataset. It sets epoch,
        # num_samples (per rank, padded up) and total_size (num_samples * num_replicas).
        super().__init__(range(dataset_size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.dataset_size = dataset_size
        self._pass = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch`` (Lightning calls this before every epoch, on every rank)."""
        self.epoch = epoch
        self._pass = 0

    def __iter__(self) -> Iterator[int]:
        indices = epoch_permutation(self.dataset_size, self.seed, self.epoch, self._pass)
        self._pass += 1
        padding = self.total_size - len(indices)
        if padding > 0:  # at most num_replicas - 1, but the dataset may be even smaller than that
            indices += (indices * math.ceil(padding / len(indices)))[:padding]
        return iter(indices[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples
