"""A shuffling sampler whose order is a pure function of (seed, epoch): resume replays it exactly."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """Random permutation of ``range(num_samples)`` drawn from ``(seed, epoch, pass)``.

    ``DataLoader(shuffle=True)`` draws from the global generator, whose state a checkpoint does not
    hold: a run resumed at epoch k would see other batches than the uninterrupted run. Lightning calls
    :meth:`set_epoch` before every epoch, so here the order depends on the epoch alone. ``pass`` counts
    the iterations inside one epoch: a ``CombinedLoader`` cycles a short loader several times per
    epoch, and each cycle gets a new order.

    Example::

        >>> sampler = EpochShuffleSampler(5, seed=0)
        >>> sampler.set_epoch(3)
        >>> first = list(sampler)
        >>> sampler.set_epoch(3)
        >>> list(sampler) == first, sorted(first)
        (True, [0, 1, 2, 3, 4])
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self._pass = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._pass = 0

    def __iter__(self) -> Iterator[int]:
        state = np.random.SeedSequence([self.seed, self.epoch, self._pass]).generate_state(2)
        self._pass += 1
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples
