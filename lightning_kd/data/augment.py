"""Replayable batch augmentations: random, but a pure function of (seed, epoch, sample index).

Cached soft targets are only right for the view of the input the teacher saw. A dataset that
augments at random in ``__getitem__`` gives the student another view every epoch, and targets
keyed by sample index alone go stale (a known bug of several KD projects). These augmentations draw their parameters
from a counter-based hash of ``(seed, epoch, index)`` instead of a global RNG, so that:

- a soft-target cache built for ``E`` epochs records, for every (sample, epoch), the parameters it
  applied and the teacher's outputs on that exact view, and training replays those parameters;
- a resumed run replays the same views (no RNG state to save);
- the draw is vectorised over the batch, on the batch's device (no per-sample Python RNG).

Each augmentation maps a uniform ``(B, num_params)`` draw to its parameters (:meth:`params`) and
applies parameters to a batch (:meth:`apply`). ``repr`` describes it fully; it goes into a cache's
fingerprint.

Example::

    >>> aug = Compose([RandomShift(3), RandomScale(0.9, 1.1)])
    >>> x = torch.arange(8.0).repeat(4, 1)
    >>> index = torch.arange(4)
    >>> p = aug.sample(seed=0, epoch=1, index=index)
    >>> torch.equal(aug.apply(x, p), aug.apply(x, aug.sample(seed=0, epoch=1, index=index)))
    True
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding uint32 values (wrapping products are
    fine: only their low 32 bits are kept)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def counter_uniform(seed: int, epoch: int, index: Tensor, n: int) -> Tensor:
    """``(B, n)`` float32 uniforms in [0, 1), a pure function of ``(seed, epoch, index[b], j)``."""
    index = index.to(torch.int64).reshape(-1)
    key = _mix32(torch.full_like(index, seed & _MASK32))
    key = _mix32(key ^ (epoch & _MASK32))
    high = ((index >> 32) & _MASK32) * 0x9E3779B1 & _MASK32  # indices past 2**32 stay distinct
    key = _mix32(key ^ (index & _MASK32) ^ high)
    counters = _mix32((torch.arange(1, n + 1, device=index.device, dtype=torch.int64) * 0x9E3779B1) & _MASK32)
    bits = _mix32(key.unsqueeze(1) ^ counters.unsqueeze(0))
    return (bits >> 8).to(torch.float32) / float(1 << 24)  # 24 random bits: exact in float32


class Augmentation(ABC):
    """A batch augmentation whose randomness is a pure function of ``(seed, epoch, index)``."""

    num_params: int

    @abstractmethod
    def params(self, uniform: Tensor) -> Tensor:
        """Parameters ``(B, num_params)`` (float32) from uniforms of the same shape."""

    @abstractmethod
    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        """Augment ``x`` (``(B, ...)``) with one row of ``params`` per sample."""

    def sample(self, seed: int, epoch: int, index: Tensor) -> Tensor:
        """The parameters for samples ``index`` (``(B,)``) at ``epoch``: ``(B, num_params)`` float32."""
        return self.params(counter_uniform(seed, epoch, index, self.num_params))

    def __call__(self, x: Tensor, seed: int, epoch: int, index: Tensor) -> Tensor:
        return self.apply(x, self.sample(seed, epoch, index.to(x.device)))


class RandomShift(Augmentation):
    """Circular shift along ``dim`` by an integer in ``[-max_shift, max_shift]``.

    Args:
        max_shift: largest shift, >= 0.
        dim: the (non-batch) dimension to shift; default the last.
    """

    num_params = 1

    def __init__(self, max_shift: int, dim: int = -1) -> None:
        if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
            raise ValueError(f"Expected `max_shift` to be an int >= 0, but got {max_shift!r}.")
        if dim == 0:
            raise ValueError("Expected `dim` to be a non-batch dimension (not 0).")
        self.max_shift = max_shift
        self.dim = dim

    def params(self, uniform: Tensor) -> Tensor:
        return torch.floor(uniform * (2 * self.max_shift + 1)) - self.max_shift

    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        dim = self.dim % x.dim()
        length = x.shape[dim]
        shift = params[:, 0].to(device=x.device, dtype=torch.int64)  # (B,)
        source = (torch.arange(length, device=x.device).unsqueeze(0) - shift.unsqueeze(1)) % length  # (B, L)
        view = [x.shape[0]] + [1] * (x.dim() - 1)
        view[dim] = length
        return torch.gather(x, dim, source.reshape(view).expand_as(x))

    def __repr__(self) -> str:
        return f"RandomShift(max_shift={self.max_shift}, dim={self.dim})"


class RandomScale(Augmentation):
    """Multiply each sample by a factor drawn uniformly from ``[low, high]``."""

    num_params = 1

    def __init__(self, low: float, high: float) -> None:
        if not 0 < low <= high:
            raise ValueError(f"Expected 0 < `low` <= `high`, but got low={low}, high={high}.")
        self.low, self.high = float(low), float(high)

    def params(self, uniform: Tensor) -> Tensor:
        return self.low + (self.high - self.low) * uniform

    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        return x * params[:, 0].to(x).reshape([-1] + [1] * (x.dim() - 1))

    def __repr__(self) -> str:
        return f"RandomScale(low={self.low}, high={self.high})"


class GaussianNoise(Augmentation):
    """Add i.i.d. Gaussian noise of standard deviation ``std``.

    Its one parameter per sample is a 24-bit noise seed (exact in float32), from which the noise
    of the whole sample is drawn with the same counter-based hash (Box-Muller).
    """

    num_params = 1

    def __init__(self, std: float) -> None:
        if not std >= 0:
            raise ValueError(f"Expected `std` to be >= 0, but got {std}.")
        self.std = float(std)

    def params(self, uniform: Tensor) -> Tensor:
        return torch.floor(uniform * float(1 << 24))

    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        n = x[0].numel()
        seeds = params[:, 0].to(device=x.device, dtype=torch.int64)
        u = counter_uniform(0x5EED, 0, seeds, 2 * n)  # (B, 2n)
        u1, u2 = u[:, :n].clamp_min(2.0**-24), u[:, n:]
        noise = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
        return x + self.std * noise.reshape(x.shape).to(x.dtype)

    def __repr__(self) -> str:
        return f"GaussianNoise(std={self.std})"


class Compose(Augmentation):
    """Apply ``augmentations`` in order; their parameters are concatenated."""

    def __init__(self, augmentations: Sequence[Augmentation]) -> None:
        bad = [type(a).__name__ for a in augmentations if not isinstance(a, Augmentation)]
        if bad:
            raise TypeError(f"Expected lightning_kd Augmentation objects, but got {', '.join(bad)}.")
        self.augmentations = list(augmentations)
        self.num_params = sum(a.num_params for a in self.augmentations)

    def params(self, uniform: Tensor) -> Tensor:
        parts, start = [], 0
        for a in self.augmentations:
            parts.append(a.params(uniform[:, start : start + a.num_params]))
            start += a.num_params
        return torch.cat(parts, dim=1) if parts else uniform[:, :0]

    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        start = 0
        for a in self.augmentations:
            x = a.apply(x, params[:, start : start + a.num_params])
            start += a.num_params
        return x

    def __repr__(self) -> str:
        return f"Compose([{', '.join(map(repr, self.augmentations))}])"
