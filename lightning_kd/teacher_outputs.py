"""Where a training batch's teacher outputs come from: the frozen teacher (online) or a soft-target store.

One small interface, two implementations, so that :class:`~lightning_kd.DistillationModule` has one
code path for both. Each says which view of the inputs both models see (a replayable augmentation:
drawn from ``(seed, epoch, sample index)`` online, replayed from the store offline) and gives the
teacher's outputs on it. Validation and test batches always take the teacher's own forward (when
there is a teacher): the store holds the training data only.

Both are called as ``outputs(module, inputs, indexed, epoch, mask=None)``; ``mask`` is the batch's
valid positions ``(B, S)`` for sequence targets (``targets != -100``), which a sequence store needs
to place each sample's stored tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_kd.data.augment import Augmentation
from lightning_kd.losses import LogitLoss, SampledLogits, TopKLogits
from lightning_kd.soft_targets.batches import SoftTargetBatch
from lightning_kd.soft_targets.sequences import positions_rule
from lightning_kd.soft_targets.store import SoftTargetStore

if TYPE_CHECKING:
    from lightning_kd.module import DistillationModule

Outputs = Tensor | TopKLogits | SampledLogits


class TeacherOutputs:
    """Online: the teacher's forward on the training view (``None`` without a teacher).

    Args:
        augmentation: a replayable augmentation of the training inputs, or None.
        seed: seed of its draws.

    Raises:
        TypeError: if ``augmentation`` is not a :class:`~lightning_kd.data.augment.Augmentation`.
    """

    def __init__(self, augmentation: Augmentation | None = None, seed: int = 0) -> None:
        if augmentation is not None and not isinstance(augmentation, Augmentation):
            raise TypeError(
                f"Expected `augmentation` to be a lightning_kd.data.augment.Augmentation, but got {type(augmentation).__name__}."
            )
        self.augmentation = augmentation
        self.seed = int(seed)

    def check_loss(self, loss: LogitLoss) -> None:
        """Refuse a soft loss that cannot use these outputs (nothing to refuse online)."""

    def view(self, inputs: Any, indexed: list[SoftTargetBatch] | None, epoch: int, step: int) -> Any:
        """The training inputs both models see: augmented when there is an augmentation."""
        if self.augmentation is None:
            return inputs
        if not isinstance(inputs, Tensor):
            raise TypeError("`augmentation` applies to tensor inputs; override `unpack_batch` to return one.")
        return self.augmentation.apply(inputs, self._params(inputs, indexed, epoch, step).to(inputs.device))

    def _params(self, inputs: Tensor, indexed: list[SoftTargetBatch] | None, epoch: int, step: int) -> Tensor:
        if indexed is not None:
            return self.augmentation.sample(self.seed, epoch, torch.cat([b.index for b in indexed]))
        # no sample indices: draws keyed by the step instead, still a pure function (resume-safe)
        return self.augmentation.sample(self.seed, step, torch.arange(len(inputs)))

    def __call__(
        self, module: "DistillationModule", inputs: Any, indexed: list[SoftTargetBatch] | None, epoch: int, mask: Tensor | None = None
    ) -> Outputs | None:
        """The teacher's outputs on ``inputs`` (``mask``, the valid positions of sequence targets, is not needed online)."""
        return None if module.teacher is None else module.teacher_forward(inputs)


class StoredTeacherOutputs(TeacherOutputs):
    """Offline: the outputs a :class:`~lightning_kd.soft_targets.SoftTargetStore` recorded, looked up by sample index.

    Training batches must carry their sample indices (``SoftTargetDataModule`` / ``with_soft_targets``);
    an augmentation replays the views the store recorded, epoch ``e`` reading view ``e % store.epochs``.

    Raises:
        RuntimeError: if ``augmentation`` is not the one the store was built with.
    """

    def __init__(self, store: SoftTargetStore, augmentation: Augmentation | None = None) -> None:
        super().__init__(augmentation)
        store.check_augmentation(augmentation)
        self.store = store

    def check_loss(self, loss: LogitLoss) -> None:
        """Refuse a loss that needs full teacher logits when the store keeps only the top-k, and for sampled
        targets any loss but one that accepts them, at the temperature they were sampled for.

        Raises:
            ValueError: naming the loss (and for sampled targets, both temperatures).
        """
        sampling = self.store.sampled
        if sampling is not None:
            if not getattr(loss, "accepts_sampled", False) or loss.standardize:
                raise ValueError(
                    f"{type(loss).__name__}{' with standardize=True' if loss.standardize else ''} needs full teacher outputs, but "
                    f"the soft-target store holds {sampling.k} sampled tokens per position; only a loss that accepts sampled "
                    "targets (KDLoss) distils from it."
                )
            if loss.learned or float(loss.temperature) != sampling.temperature:
                given = "a learned temperature" if loss.learned else f"temperature {loss.temperature}"
                raise ValueError(
                    f"The soft-target store's sampled targets estimate the teacher at T={sampling.temperature}, but "
                    f"{type(loss).__name__} has {given}: set `temperature={sampling.temperature}` (a sampled store cannot "
                    "be read at another temperature; build it with `LogitSampling(temperature=...)`)."
                )
            return
        if self.store.top_k is not None and (not loss.accepts_topk or loss.standardize):
            raise ValueError(
                f"{type(loss).__name__}{' with standardize=True' if loss.standardize else ''} needs full teacher outputs, but "
                f"the soft-target store keeps only the top-{self.store.top_k}; only a loss that accepts top-k targets "
                "(KDLoss) distils from it."
            )

    def _params(self, inputs: Tensor, indexed: list[SoftTargetBatch] | None, epoch: int, step: int) -> Tensor:
        return torch.cat([self.store.augmentation_params(b.part, b.index, epoch) for b in self._require(indexed)])

    def __call__(
        self, module: "DistillationModule", inputs: Any, indexed: list[SoftTargetBatch] | None, epoch: int, mask: Tensor | None = None
    ) -> Outputs:
        """The stored outputs of the batch's samples; a sequence store places them with ``mask`` ``(B, S)``.

        Raises:
            RuntimeError: for a batch without sample indices, or (sequence store) without ``mask`` or with
                a sample whose valid positions are not as many as the store holds for it.
        """
        batches = self._require(indexed)
        if self.store.sequences:
            self._check_positions(module)
        masks: list[Tensor | None] = [None] * len(batches)
        if mask is not None and self.store.sequences:  # the rows of a combined batch, loader after loader
            masks = list(mask.split([b.index.numel() for b in batches]))
        parts = [self.store.lookup(b.part, b.index, epoch, mask=m) for b, m in zip(batches, masks)]
        return _concat(parts).to(module.device)

    def _check_positions(self, module: "DistillationModule") -> None:
        """Refuse a module whose ``unpack_batch`` is not the one whose targets placed the store's tokens."""
        recorded, given = self.store.manifest["positions"], positions_rule(module)
        if recorded != given:
            raise RuntimeError(
                f"Soft-target store {self.store.path} holds the teacher's tokens at the valid positions of "
                f"`{recorded}`, but this module's are `{given}`: a different rule (e.g. the causal shift) would pair each "
                "stored token with another position. Train with the module class the store was built with (or one that "
                "inherits its `unpack_batch`), or build the store from this module: `build_soft_targets(module, data, path)`."
            )

    @staticmethod
    def _require(indexed: list[SoftTargetBatch] | None) -> list[SoftTargetBatch]:
        if indexed is None:
            raise RuntimeError(
                "`soft_targets` is set, but the training batch carries no sample indices to look its targets up. "
                "Wrap the data: `trainer.fit(module, datamodule=SoftTargetDataModule(datamodule, store))` or "
                "`train_dataloaders=with_soft_targets(loader, store)`."
            )
        return indexed


def _concat(parts: list[Outputs]) -> Outputs:
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], SampledLogits):
        return SampledLogits(*(torch.cat(fields) for fields in list(zip(*parts))[:3]), parts[0].temperature)
    if isinstance(parts[0], TopKLogits):
        return TopKLogits(*(torch.cat(fields) for fields in zip(*parts)))
    return torch.cat(parts)
