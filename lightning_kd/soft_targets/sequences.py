r"""Sequence stores (format 3): the teacher's outputs on the *valid tokens* of variable-length samples, ragged.

A sequence store holds one row per valid token (``targets != -100`` after the module's
``unpack_batch``: for :class:`~lightning_kd.CausalLMDistillation`, after the causal shift; never
padding, prompts or the last position), all samples concatenated, and per part an ``offsets`` array:
sample ``i``'s rows are ``offsets[i]:offsets[i + 1]``, in the order of its valid positions. Nothing
is padded to the longest sample, and left or right padding at training time reads the same rows.

Per row, one of:
    - the full logits ``(V,)``;
    - top-k: the k largest logits, their tokens and the log-sum-exp of the rest (:class:`~lightning_kd.losses.TopKLogits`);
    - sampled: K tokens drawn from the teacher with importance weights and the teacher's entropy
      (:class:`~lightning_kd.losses.SampledLogits`, drawn by :class:`LogitSampling`).

Reading (:func:`lookup_sequences`) needs the batch's valid-position mask ``(B, S)``: each sample's
stored rows are scattered into its valid positions in order; the other positions get a filler that
the masked loss never reads. A sample whose number of valid positions differs from the stored one is
refused: the store was built on other labels, prompt masks or another ``unpack_batch``.

Plain numpy and torch: no Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_kd.losses.hard import IGNORE_INDEX
from lightning_kd.losses.sampled import SampledLogits
from lightning_kd.losses.topk import TopKLogits
from lightning_kd.soft_targets.manifest import SEQUENCE_FORMAT

_MASK32 = 0xFFFFFFFF
_DRAW_CHUNK = 1 << 24  # float64 entries per chunk of rows when drawing (128 MiB): a (B·S, V) float64 copy would not fit


def valid_mask(targets: Any, outputs: Tensor | None = None) -> Tensor | None:
    """Bool ``(B, S)``: the valid positions of a batch whose ``unpack_batch`` targets are integer ``(B, S)``.

    ``targets != -100``, the rule :class:`~lightning_kd.DistillationModule` uses for sequence outputs.
    None when the targets are not per-position class indices (classification, regression, none) or
    (given ``outputs``) do not have the outputs' leading shape ``(B, S)`` of ``(B, S, V)``.
    """
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.dtype == torch.bool or targets.dim() != 2:
        return None
    if outputs is not None and (outputs.dim() != 3 or tuple(outputs.shape[:-1]) != tuple(targets.shape)):
        return None
    return targets != IGNORE_INDEX


def positions_rule(module: Any) -> str:
    """What defines a module's valid positions, as a sequence store records it: the ``unpack_batch`` that makes the targets.

    Named by the function that implements it (a subclass that does not override it has its parent's), so that
    a store built with one rule is not read with another: a causal shift moves every position by one, which a
    count of valid positions per sample cannot see when a prompt is masked.
    """
    method = getattr(type(module), "unpack_batch", None)
    name = f"{method.__module__}.{method.__qualname__}" if method is not None else type(module).__qualname__
    return f"targets != -100 of {name}"


# ---------------------------------------------------------------------------------- sampling
def _mix32(x: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding uint32 values (the augmentations' hash; not
    imported from ``lightning_kd.data``, whose package loads the datamodules and Lightning)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def _uniforms(seed: int, sample: Tensor, position: Tensor, n: int) -> Tensor:
    """``(R, n)`` float64 uniforms in [0, 1) with 53 random bits, a pure function of ``(seed, sample[r], position[r], j)``.

    Two 32-bit lanes of a counter-based hash (MurmurHash3's finaliser): a 64-bit key per row, so
    that distinct ``(sample, position)`` pairs of a large corpus do not share a stream.
    """
    sample, position = sample.to(torch.int64), position.to(torch.int64)
    lanes = []
    for salt in (0x243F6A88, 0x85A308D3):
        key = _mix32(torch.full_like(sample, (seed ^ salt) & _MASK32))
        key = _mix32(key ^ ((seed >> 32) & _MASK32))
        key = _mix32(key ^ (sample & _MASK32))
        key = _mix32(key ^ ((sample >> 32) & _MASK32))
        key = _mix32(key ^ (position & _MASK32))
        lanes.append(key)
    counters = _mix32((torch.arange(1, n + 1, device=sample.device, dtype=torch.int64) * 0x9E3779B1) & _MASK32)
    high = _mix32(lanes[0].unsqueeze(1) ^ counters) >> 5  # 27 bits
    low = _mix32(lanes[1].unsqueeze(1) ^ counters) >> 6  # 26 bits
    return (high * (1 << 26) + low).to(torch.float64) / float(1 << 53)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected `{name}` to be a number, but got {type(value).__name__}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"Expected `{name}` to be a finite number > 0, but got {value}.")
    return float(value)


@dataclass(frozen=True)
class LogitSampling:
    r"""How a sequence store samples the teacher: Sparse Logit Sampling (Anshumann et al., ACL 2025).

    Per valid token, ``k`` tokens are drawn with replacement from the proposal :math:`r` (the teacher at
    ``proposal_temperature``; by default the target distribution :math:`p`, the teacher at
    ``temperature``), repeats are merged, and each distinct token keeps the importance weight
    :math:`w_j = \frac{n_j}{k} \frac{p(x_j)}{r(x_j)}`; the teacher's exact entropy :math:`H(p)` is kept
    too. :func:`~lightning_kd.losses.kd_loss` turns them into an unbiased estimate of forward KL and of
    its gradient (:mod:`lightning_kd.losses.sampled`).

    The draws are a pure function of ``(seed, sample index, position)`` (position: the rank of the token
    among the sample's valid positions), so a store is reproducible and independent of batching and
    padding (bit for bit on one device type; float64 sums may round differently on another).

    Args:
        k: draws per valid token (~12 in the paper); a store row holds ``k`` slots.
        seed: seed of the draws.
        temperature: :math:`T` of the target distribution :math:`p = \mathrm{softmax}(z_t / T)`. The loss
            must run at this temperature (at another one the weights would be wrong).
        proposal_temperature: draw from the teacher at this temperature instead (> ``temperature``
            samples the tail more often); None: from :math:`p` itself (weights = counts / k).

    Raises:
        ValueError: for ``k < 1`` or a temperature that is not a finite number > 0.
        TypeError: for a ``k`` or ``seed`` that is not an int, or a temperature that is not a number.

    Example::

        >>> draw = LogitSampling(k=4, seed=0).draw(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([0]), torch.tensor([0]))
        >>> round(float(draw.weights.sum()), 6), draw.weights.shape
        (1.0, torch.Size([1, 4]))
    """

    k: int = 12
    seed: int = 0
    temperature: float = 1.0
    proposal_temperature: float | None = None

    def __post_init__(self) -> None:
        for name in ("k", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Expected `{name}` to be an int, but got {type(value).__name__}.")
        if self.k < 1:
            raise ValueError(f"Expected `k` to be an int >= 1, but got {self.k}.")
        object.__setattr__(self, "temperature", _number(self.temperature, "temperature"))
        if self.proposal_temperature is not None:
            object.__setattr__(self, "proposal_temperature", _number(self.proposal_temperature, "proposal_temperature"))

    def to_manifest(self) -> dict[str, Any]:
        return {"k": self.k, "seed": self.seed, "temperature": self.temperature, "proposal_temperature": self.proposal_temperature}

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> "LogitSampling":
        return cls(entry["k"], entry["seed"], entry["temperature"], entry["proposal_temperature"])

    def draw(self, logits: Tensor, sample: Tensor, position: Tensor) -> SampledLogits:
        """Sampled targets ``(R, k)`` for teacher logits ``(R, V)`` of the tokens at ``position`` ``(R,)`` of samples ``sample`` ``(R,)``.

        Float64 inside, on the logits' device; weights and entropy are returned in float32. A ``-inf``
        logit (a masked token) is never drawn.
        """
        rows = logits.shape[0]
        step = max(1, _DRAW_CHUNK // max(1, logits.shape[-1]))
        parts = [self._draw(logits[i : i + step], sample[i : i + step], position[i : i + step]) for i in range(0, rows, step)]
        if not parts:
            empty = logits.new_zeros((0, self.k), dtype=torch.float32)
            return SampledLogits(empty, empty.long(), empty[:, 0], self.temperature)
        return SampledLogits(*(torch.cat(fields) for fields in list(zip(*parts))[:3]), self.temperature)

    def _draw(self, logits: Tensor, sample: Tensor, position: Tensor) -> SampledLogits:
        z = logits.detach().double()
        log_p = torch.log_softmax(z / self.temperature, dim=-1)
        log_r = log_p if self.proposal_temperature is None else torch.log_softmax(z / self.proposal_temperature, dim=-1)
        cdf = log_r.exp().cumsum(dim=-1)
        total = cdf[:, -1:]
        u = _uniforms(self.seed, sample.to(z.device), position.to(z.device), self.k)  # (R, k)
        drawn = torch.searchsorted(cdf, u * total, right=True)  # token x has the interval [cdf[x-1], cdf[x])
        last = (cdf < total).sum(dim=-1, keepdim=True)  # the last token with mass: u·total rounding up to total lands there
        drawn = torch.minimum(drawn, last)
        # merge repeats: sorted draws, one slot per run
        drawn = drawn.sort(dim=-1).values
        new = torch.ones_like(drawn, dtype=torch.bool)
        new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
        run = new.cumsum(dim=-1) - 1
        counts = torch.zeros_like(u).scatter_add_(1, run, torch.ones_like(u))
        tokens = torch.zeros_like(drawn).scatter_(1, run, drawn)  # every write of a run is the same token
        filled = torch.arange(self.k, device=z.device) <= run[:, -1:]
        tokens = torch.where(filled, tokens, torch.zeros_like(tokens))
        ratio = (log_p.gather(1, tokens) - log_r.gather(1, tokens)).exp()
        weights = torch.where(filled, counts / self.k * ratio, torch.zeros_like(ratio))
        weights, order = weights.sort(dim=-1, descending=True, stable=True)  # ties keep the token order
        p = log_p.exp()
        entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=-1)
        return SampledLogits(weights.float(), tokens.gather(1, order), entropy.float(), self.temperature)


# ---------------------------------------------------------------------------------- layout
def row_ids(offsets: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """The store rows of ``samples``, sample after sample, each in the order of its valid positions."""
    starts = offsets[samples]
    counts = offsets[samples + 1] - starts
    first = np.cumsum(counts) - counts  # where each sample's rows begin in the result
    return np.repeat(starts - first, counts) + np.arange(int(counts.sum()), dtype=np.int64)


def row_positions(counts: Tensor) -> Tensor:
    """For rows grouped by sample (``counts`` rows each), each row's rank among its sample's rows."""
    first = torch.cumsum(counts, 0) - counts
    return torch.arange(int(counts.sum()), device=counts.device) - first.repeat_interleave(counts)


def check_offsets(offsets: np.ndarray, rows: int, where: str) -> None:
    """Refuse offsets that do not cut ``rows`` rows into consecutive, non-negative ranges (a damaged file)."""
    if offsets.size == 0 or offsets[0] != 0 or offsets[-1] != rows or bool(np.any(np.diff(offsets) < 0)):
        raise RuntimeError(
            f"Soft-target store {where}/offsets.npy is damaged: it must rise from 0 to the manifest's {rows} rows. Rebuild it."
        )


def check_counts(mask: Tensor, samples: np.ndarray, offsets: np.ndarray, store: Any, part: str) -> None:
    """Refuse a batch whose samples have other numbers of valid positions than the store holds for them.

    Raises:
        RuntimeError: naming the first such sample index and both counts.
    """
    given = mask.sum(dim=1).numpy()
    stored = offsets[samples + 1] - offsets[samples]
    bad = np.flatnonzero(given != stored)
    if bad.size:
        i = int(bad[0])
        raise RuntimeError(
            f"Sample {int(samples[i])} has {int(given[i])} valid positions (targets != -100) in this batch, but soft-target store "
            f"{store} (part {part!r}) holds {int(stored[i])} rows for it ({bad.size} of the batch's {len(samples)} samples differ): "
            "the store was built on other labels or prompt masks, or with another `unpack_batch` (build it from the module "
            "you train, e.g. `build_soft_targets(CausalLMDistillation(teacher, ...), data, path)`, not from the bare teacher). "
            "Rebuild the store for this data and module."
        )


def _scatter(rows: Tensor, mask: Tensor, filler: Tensor) -> Tensor:
    """``(B, S, *rest)``: ``rows`` ``(R, *rest)`` in the valid positions of ``mask`` (row-major order), ``filler`` elsewhere."""
    out = filler.expand(*mask.shape, *filler.shape).clone()
    out[mask] = rows
    return out


def _torch(array: np.ndarray, dtype: str) -> Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def lookup_sequences(
    arrays: dict[str, np.ndarray], offsets: np.ndarray, manifest: dict[str, Any], samples: np.ndarray, mask: Tensor, *, store: Any, part: str
) -> Tensor | TopKLogits | SampledLogits:
    """The stored rows of ``samples`` scattered into the valid positions of ``mask`` ``(B, S)`` (CPU tensors).

    Not-valid positions hold a filler the masked loss never reads: zeros (logits, top-k values, tail,
    sampled weights and entropy), tokens ``0..k-1`` for top-k (distinct, as the loss expects) and 0
    for sampled tokens (weight 0: no contribution, no gradient).

    Raises:
        ValueError: for a mask that is not ``(B, S)`` with one row per sample.
        RuntimeError: for a sample whose valid positions in ``mask`` are not as many as its stored rows.
    """
    mask = mask.detach().cpu().to(torch.bool)
    if mask.dim() != 2 or mask.shape[0] != len(samples):
        raise ValueError(
            f"Expected the valid-position mask of a sequence store to be (batch, sequence) = ({len(samples)}, S), but got "
            f"{tuple(mask.shape)}."
        )
    check_counts(mask, samples, offsets, store, part)
    ids = row_ids(offsets, samples)
    dtype = manifest["dtype"]
    if manifest["sampled"] is not None:
        k = manifest["sampled"]["k"]
        weights = torch.from_numpy(arrays["sample_weights"][ids])
        return SampledLogits(
            _scatter(weights, mask, torch.zeros(k, dtype=weights.dtype)),
            _scatter(torch.from_numpy(arrays["sample_indices"][ids].astype(np.int64)), mask, torch.zeros(k, dtype=torch.int64)),
            _scatter(torch.from_numpy(arrays["entropy"][ids]), mask, torch.zeros((), dtype=torch.float32)),
            float(manifest["sampled"]["temperature"]),
        )
    if manifest["top_k"] is not None:
        k = manifest["top_k"]
        values = _torch(arrays["topk_values"][ids], dtype)
        return TopKLogits(
            _scatter(values, mask, torch.zeros(k, dtype=values.dtype)),
            _scatter(torch.from_numpy(arrays["topk_indices"][ids].astype(np.int64)), mask, torch.arange(k)),
            _scatter(torch.from_numpy(arrays["tail_logsumexp"][ids]), mask, torch.zeros((), dtype=torch.float32)),
        )
    logits = _torch(arrays["logits"][ids], dtype)
    return _scatter(logits, mask, torch.zeros(logits.shape[-1], dtype=logits.dtype))


# ---------------------------------------------------------------------------------- the manifest of a sequence store
def sequence_spec(spec: dict[str, Any], rows: dict[str, int], vocab: int, sampling: LogitSampling | None, positions: str) -> dict[str, Any]:
    """A format-3 manifest (unsealed) from the format-2 one :func:`~lightning_kd.soft_targets.store.store_spec` made.

    ``rows``: valid tokens per part; ``vocab``: the last dimension of the outputs; ``positions``: what
    defined the valid positions (recorded for people, e.g. ``lightning_kd.lm.CausalLMDistillation.unpack_batch``).
    """
    parts = {name: {**info, "rows": int(rows[name])} for name, info in spec["parts"].items()}
    return {
        **spec, "format": SEQUENCE_FORMAT, "output_shape": [int(vocab)], "positions": positions,
        "sampled": None if sampling is None else sampling.to_manifest(), "parts": parts,
    }
