"""DistillationModule: a frozen teacher, a trainable student, and the training step between them."""

from __future__ import annotations

import contextlib
import math
import os
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from typing_extensions import override

from lightning_kd._checks import check_bool, check_number
from lightning_kd import batch as batch_utils
from lightning_kd import optim
from lightning_kd.checkpoint import (
    LOADING_CHECKPOINT, allow_missing_teacher_keys, check_objectives, drop_teacher_keys, fingerprint, objectives, plain,
)
from lightning_kd.data.augment import Augmentation
from lightning_kd.features import FeatureTerm, feature_distillation, token_mask
from lightning_kd.guards import ValueGuard, batchnorm_batch_of_one, check_precision
from lightning_kd.hygiene import FrozenTeacher, attached_trainer
from lightning_kd.losses import IGNORE_INDEX, HardCrossEntropyLoss, HardMSELoss, KDLoss, LogitLoss, TopKLogits
from lightning_kd.losses.hard import class_per_position
from lightning_kd.metrics import DistillationMetrics
from lightning_kd.sharding import TeacherSharding, check_teacher_sharding, is_sharded, shard_model
from lightning_kd.soft_targets.store import SoftTargetStore, open_store
from lightning_kd.teacher_outputs import StoredTeacherOutputs, TeacherOutputs
from lightning_kd.speed import Speed
from lightning_kd.teachers import TeacherEnsemble, Teachers, call_model, cast_inputs, check_not_shared, extract_logits, load_teacher

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

OptimizerFactory = Callable[[Any], torch.optim.Optimizer]


class DistillationModule(FrozenTeacher, L.LightningModule):
    r"""Distil a frozen ``teacher`` (or several) into a trainable ``student``.

    .. math::
        \mathcal{L} = w \, \alpha \, \mathcal{L}_{\text{soft}}(z_s, z_t) + (1 - \alpha) \, \mathcal{L}_{\text{hard}}(z_s, y)
            + \sum_k \lambda_k \mathcal{L}_k(f_s, f_t)

    with ``alpha`` weighting the **soft** (teacher) term (torchdistill uses the opposite convention).
    The soft term is a loss object: by default :class:`~lightning_kd.losses.KDLoss`, Hinton's
    :math:`T^2\,\mathrm{KL}(\mathrm{softmax}(z_t/T) \,\|\, \mathrm{softmax}(z_s/T))`; any
    :class:`~lightning_kd.losses.LogitLoss` takes its place (``DKDLoss``, ``DISTLoss``, ``ReverseKLLoss``,
    ``JSDLoss``, ``SkewKLLoss``, ``SoftMSELoss``), with its options and temperature (a number, or a
    learned ``LearnableTemperature`` for CTKD) in its constructor. :math:`w` is ``soft_weight`` (DKD's
    warm-up anneals it). The last sum holds the feature terms (FitNet, AT, RKD) on hooked layers. The
    soft term covers every input, the hard term only labeled ones (targets ``-100`` or a missing
    target: Hinton's transfer set, e.g. a ``CombinedLoader`` of a labeled and an unlabeled loader).

    Teacher hygiene (:class:`~lightning_kd.hygiene.FrozenTeacher`): no gradient, eval mode on every
    training step, out of the optimizer, and out of checkpoints unless ``keep_teacher_in_checkpoint``
    (its fingerprint is recorded and checked on load instead). ``teacher=None`` trains the student on
    the hard loss alone (the "from scratch" baseline). ``load_from_checkpoint(path, student=...)``
    without a teacher loads a distilled student for inference only (see ``student_only``). Override
    points: :meth:`unpack_batch`, :meth:`teacher_forward`, :meth:`student_forward`, :meth:`distillation_loss`,
    and under Lightning's ``ModelParallelStrategy`` (FSDP2) :meth:`shard_student` and :meth:`shard_teacher`.

    Args:
        teacher: the trained teacher, several (a list or dict: an ensemble whose logits are the
            weighted mean of theirs), or None. Loaded and frozen by :func:`~lightning_kd.teachers.load_teacher`.
        student: the model to train; ``forward(x)`` is the student.
        soft_loss: a :class:`~lightning_kd.losses.LogitLoss`; default ``KDLoss(temperature=4.0)``.
        alpha: weight of the soft term in [0, 1] (the annealing callback may change it).
        hard_loss: any ``(outputs, targets) -> loss``; default :class:`~lightning_kd.losses.HardCrossEntropyLoss`
            (:class:`~lightning_kd.losses.HardMSELoss` for one-hot or regression targets).
        soft_weight: extra factor :math:`w \ge 0` on the soft term.
        features: ``{key: FeatureTerm(loss, teacher_layers, student_layers, weight)}`` (see
            :class:`~lightning_kd.features.FeatureTerm`); FitNet's adapters are built from one dry
            forward at the start of fit (on ``example_input_array`` if set, else the first training
            batch), trained with the student, and not part of the exported student.
        soft_targets: a :class:`~lightning_kd.SoftTargetStore` (or its path): training batches (wrapped
            by ``SoftTargetDataModule`` / ``with_soft_targets``) take their teacher outputs from it, so
            ``teacher`` may be None. A given teacher must be the one that made the store; it then serves
            the validation metrics.
        augmentation: a replayable :class:`~lightning_kd.data.augment.Augmentation` of the training
            inputs (teacher and student see the same view), drawn from ``(augmentation_seed, epoch,
            sample index)`` or replayed from ``soft_targets``.
        augmentation_seed: seed of the augmentation draws.
        teacher_checkpoint: where the teacher's weights come from (one path; a list or dict for several
            teachers), recorded so that ``load_from_checkpoint`` can rebuild the teacher from it.
        teacher_weights: several teachers: None (mean) or one weight per teacher (list or dict).
        optimizer: a partial ``params -> Optimizer`` (Hydra ``_partial_: true``); default ``Adam(lr=1e-3)``.
        lr_scheduler: None, ``"cosine"`` (per-step cosine decay over the run), a
            :class:`~lightning_kd.schedules.Schedule` (the learning rate's multiplier per optimizer step,
            e.g. ``Cosine(1.0, 0.0, warmup=0.05, warmup_start=0.0)`` for a linear warm-up then cosine decay),
            a partial ``optimizer -> scheduler`` (stepped every epoch), or a Lightning scheduler dict whose
            ``"scheduler"`` is such a partial (e.g. ``{"scheduler": ..., "interval": "step"}``). A partial
            whose ``total_steps``/``num_training_steps``/``T_max`` is unset is told the run's length
            (:mod:`lightning_kd.optim`).
        keep_teacher_in_checkpoint: also save the teacher's weights in checkpoints.
        speed: :class:`Speed` options (teacher dtype, ``compile``, channels-last).
        teacher_sharding: under Lightning's ``ModelParallelStrategy``, where the student is sharded with FSDP2:
            ``"shard"`` the teacher too (each rank holds a slice of its weights and gathers one block at a time
            for its forward), or ``"replicate"`` it (each rank holds all of it: no communication for its
            forward, more memory). Other strategies replicate both models (see :meth:`configure_model`).

    Raises:
        ValueError: for ``alpha`` outside [0, 1], an unknown ``teacher_sharding``, an unknown scheduler, a top-k store with a loss that needs
            full logits, an unknown layer; at run time for outputs or targets that do not fit each other.
        TypeError: if the student, the teacher, ``soft_loss``, ``hard_loss`` or ``speed`` has the wrong type.

    Example::

        >>> from lightning_kd.losses import DKDLoss
        >>> from lightning_kd.models import get_model
        >>> module = DistillationModule(get_model("cnn1d"), get_model("mlp"), soft_loss=DKDLoss(beta=8.0), alpha=0.5)
        >>> module.teacher.training, any(p.requires_grad for p in module.teacher.parameters()), module.temperature
        (False, False, 4.0)
    """

    def __init__(
        self,
        teacher: Teachers | None,
        student: nn.Module,
        *,
        soft_loss: LogitLoss | None = None,
        alpha: float = 0.9,
        hard_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        soft_weight: float = 1.0,
        features: Mapping[str, FeatureTerm] | None = None,
        soft_targets: SoftTargetStore | str | os.PathLike[str] | None = None,
        augmentation: Augmentation | None = None,
        augmentation_seed: int = 0,
        # the list and dict forms first: LightningCLI (jsonargparse) would read a YAML list as its str
        teacher_checkpoint: Sequence[Any] | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        teacher_weights: Sequence[float] | Mapping[str, float] | None = None,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: str | Callable[..., Any] | Mapping[str, Any] | None = None,
        keep_teacher_in_checkpoint: bool = False,
        speed: Speed | None = None,
        teacher_sharding: TeacherSharding = "shard",
    ) -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"Expected `student` to be an nn.Module, but got {type(student).__name__}.")
        self.soft_loss = KDLoss(temperature=4.0) if soft_loss is None else soft_loss
        if not isinstance(self.soft_loss, LogitLoss):
            raise TypeError(
                f"Expected `soft_loss` to be a lightning_kd.losses.LogitLoss (KDLoss, DKDLoss, ...; subclass it for your "
                f"own loss), but got {type(self.soft_loss).__name__}."
            )
        self.hard_loss = HardCrossEntropyLoss() if hard_loss is None else hard_loss
        if not callable(self.hard_loss):
            raise TypeError(f"Expected `hard_loss` to be a callable (outputs, targets) -> loss, but got {type(self.hard_loss).__name__}.")
        optim.check(optimizer, lr_scheduler)
        self.speed = speed or Speed()
        if not isinstance(self.speed, Speed):
            raise TypeError(f"Expected `speed` to be a lightning_kd.Speed, but got {type(self.speed).__name__}.")
        self.alpha = alpha  # validated by the property setters below
        self.soft_weight = soft_weight
        self.optimizer_factory = optimizer
        self.lr_scheduler = lr_scheduler
        self.keep_teacher_in_checkpoint = check_bool(keep_teacher_in_checkpoint, "keep_teacher_in_checkpoint")
        self.teacher_sharding = check_teacher_sharding(teacher_sharding)
        self.teacher_checkpoint = plain(teacher_checkpoint)
        store = None if soft_targets is None else open_store(soft_targets, recorded=LOADING_CHECKPOINT.get())
        # Only plain values go to the hyperparameters (checkpoints load with weights_only=True); the objects
        # (losses, feature terms, speed, augmentation) are given again to `load_from_checkpoint`.
        self.save_hyperparameters({
            "alpha": float(alpha), "soft_weight": float(soft_weight), "augmentation_seed": int(augmentation_seed),
            "teacher_checkpoint": self.teacher_checkpoint, "teacher_weights": plain(teacher_weights),
            "keep_teacher_in_checkpoint": keep_teacher_in_checkpoint, "teacher_sharding": teacher_sharding,
            "soft_targets": None if store is None else str(store.path),
        })
        self.student = student
        self.teacher = None
        if teacher is not None:
            check_not_shared(teacher, student)  # before anything is frozen or loaded: shared weights belong to the student too
            self.teacher = load_teacher(teacher, teacher_checkpoint, weights=teacher_weights, dtype=self.speed.teacher_dtype,
                                        missing_ok=LOADING_CHECKPOINT.get())
        elif (teacher_weights is not None or teacher_checkpoint is not None) and not LOADING_CHECKPOINT.get():
            # (recorded in a checkpoint loaded without its teacher: the student alone, see `student_only`)
            raise ValueError("`teacher_weights` / `teacher_checkpoint` describe a teacher, but `teacher` is None.")
        self.speed.apply(student, self.teacher)
        self.feature_distillation = feature_distillation(self.teacher, student, features, stored=store is not None)
        self.augmentation = augmentation
        self.augmentation_seed = int(augmentation_seed)
        self.teacher_outputs = TeacherOutputs(augmentation, augmentation_seed) if store is None else StoredTeacherOutputs(store, augmentation)
        self.teacher_outputs.check_loss(self.soft_loss)
        if store is not None and self.teacher is not None:
            store.check_teacher(fingerprint(self.teacher))
        # What the objective is made of, as constructed (before any annealing): recorded in checkpoints and
        # compared on load, so that a module rebuilt without them does not silently train or evaluate another one.
        self._objectives = objectives(self.soft_loss, self.hard_loss, features)
        self._teacher_acc_logged = False
        self._window_tokens: Tensor | None = None  # valid tokens of the accumulation window so far (sequence outputs)
        self._guard = ValueGuard()  # non-finite teacher outputs and losses, out-of-range targets
        self.register_state_dict_post_hook(drop_teacher_keys)
        self.register_load_state_dict_post_hook(allow_missing_teacher_keys)
        self.metrics = DistillationMetrics()

    @property
    def soft_targets(self) -> SoftTargetStore | None:
        """The soft-target store the training batches' teacher outputs come from, if any."""
        return getattr(self.teacher_outputs, "store", None)

    # ------------------------------------------------------------------ settings the callback anneals
    #: Two names of one attribute, for :class:`~lightning_kd.callbacks.DistillationAnnealing` (one schedule each).
    annealing_aliases: ClassVar[dict[str, str]] = {"temperature": "soft_loss.temperature"}

    @property
    def temperature(self) -> float:
        """The soft loss's temperature (the current learned value for a ``LearnableTemperature``)."""
        if self.soft_loss.learned:
            return float(self.soft_loss.current_temperature().detach())
        return self.soft_loss.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.soft_loss.temperature = value  # validated (and refused for a learned one) by the loss

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        check_number(value, "alpha")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"Expected `alpha` to be in [0, 1], but got {value}.")
        self._alpha = float(value)

    @property
    def soft_weight(self) -> float:
        return self._soft_weight

    @soft_weight.setter
    def soft_weight(self, value: float) -> None:
        check_number(value, "soft_weight")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"Expected `soft_weight` to be a finite number >= 0, but got {value}.")
        self._soft_weight = float(value)

    # ------------------------------------------------------------------ hooks for user projects
    def unpack_batch(self, batch: Any) -> tuple[Any, Tensor | None]:
        """Split a batch into ``(inputs, targets)``; ``targets`` None (or -100 rows) = unlabeled.

        Default: ``(x, y)``, ``(x,)``, a tensor, a dict with input/target keys, or a dict of such
        batches (``CombinedLoader``). Override for other formats.
        """
        return batch_utils.unpack(batch)

    def teacher_forward(self, inputs: Any) -> Tensor:
        """The teacher's logits for ``inputs``, computed without autograd, in the teacher's own dtype."""
        inputs = cast_inputs(inputs, self.teacher)  # e.g. a bfloat16 teacher beside a float32 student under "32-true"
        with torch.no_grad(), self._teacher_precision():
            return extract_logits(call_model(self.teacher, inputs))

    def _teacher_precision(self) -> contextlib.AbstractContextManager:
        """Autocast off for a teacher kept in its own dtype (``speed.teacher_dtype``; an ensemble's members handle theirs)."""
        own_dtype = self.speed.teacher_dtype is not None and not isinstance(self.teacher, TeacherEnsemble)
        return torch.autocast(device_type=self.device.type, enabled=False) if own_dtype else contextlib.nullcontext()

    def student_forward(self, inputs: Any) -> Tensor:
        """The student's logits for ``inputs`` (a dict of inputs is passed as keyword arguments)."""
        return extract_logits(call_model(self.student, inputs))

    def distillation_loss(
        self, student_out: Tensor, teacher_out: Tensor | TopKLogits | None, targets: Tensor | None, *, mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """``{"loss", "soft", "hard"}``: ``soft_weight * alpha * soft + (1 - alpha) * hard`` (hard alone without a teacher).

        ``mask``: for sequence outputs ``(B, S, V)``, the valid token positions ``(B, S)`` (see
        :func:`~lightning_kd.batch.valid_positions`): every term is then a mean over them. It is passed only
        for sequence outputs, so an override with the three positional arguments keeps working for classification.
        """
        zero = 0.0 * student_out.float().sum()  # graph-connected zero for a missing term
        hard = zero if targets is None else self._hard(student_out, targets)
        if teacher_out is None:
            return {"loss": hard, "soft": zero, "hard": hard}
        classes = class_per_position(teacher_out, targets, type(self.soft_loss).__name__) if self.soft_loss.needs_targets else None
        soft = self.soft_loss(student_out, teacher_out, classes, mask=mask)
        return {"loss": self.soft_weight * self.alpha * soft + (1.0 - self.alpha) * hard, "soft": soft, "hard": hard}

    def forward(self, x: Any) -> Any:
        return call_model(self.student, x)

    # ------------------------------------------------------------------ steps
    def _forward(
        self, batch: Any, where: str, *, training: bool = False, unpacked: tuple[Any, Tensor | None] | None = None
    ) -> tuple[Any, Tensor | None, Tensor, Tensor | TopKLogits | None]:
        """``(inputs, targets, student_out, teacher_out)`` of a batch, with the teacher's outputs and the class
        targets checked (``where`` names the batch in the errors). Training batches take their view and teacher
        outputs from ``teacher_outputs`` (online or stored), the others from the teacher's forward.
        ``unpacked``: the batch's ``(inputs, targets)`` already unpacked (and e.g. replaced by generated ones)."""
        batch, indexed = batch_utils.split_indexed(batch)
        inputs, targets = self.unpack_batch(batch) if unpacked is None else unpacked
        if batch_utils.is_empty(inputs):  # every mean over it would be NaN
            raise ValueError(f"The batch at {where} holds no sample: check the DataLoader (its sampler and `collate_fn`).")
        if isinstance(targets, Tensor) and targets.dtype not in (torch.int64, torch.bool) and not targets.is_floating_point():
            targets = targets.long()  # int32/uint8 class indices: what cross-entropy, one-hot and the metrics need
        if self.speed.channels_last:
            inputs = batch_utils.to_channels_last(inputs)
        if training:
            inputs = self.teacher_outputs.view(inputs, indexed, self.current_epoch, self.global_step)
            teacher_out = self.teacher_outputs(self, inputs, indexed, self.current_epoch, mask=targets != IGNORE_INDEX if isinstance(targets, Tensor) and targets.dim() >= 2 and not targets.is_floating_point() else None)
        else:
            teacher_out = None if self.teacher is None else self.teacher_forward(inputs)
        if teacher_out is not None:
            self._guard.check_teacher(teacher_out if isinstance(teacher_out, Tensor) else teacher_out[0], where)  # sparse targets: their values / weights
        with batchnorm_batch_of_one():
            student_out = self.student_forward(inputs)
        student_out, teacher_out = self._shared_vocabulary(student_out, teacher_out)
        if isinstance(targets, Tensor) and not targets.is_floating_point() and targets.shape == student_out.shape[:-1]:
            self._guard.check_targets(targets, student_out.shape[-1], where)  # class indices: every batch
        return inputs, targets, student_out, teacher_out

    #: Sequence models: the number of classes both models share (see :class:`~lightning_kd.CausalLMDistillation`);
    #: None: the two must predict the same number of classes.
    vocab_size: int | None = None

    def _shared_vocabulary(self, student_out: Tensor, teacher_out: Tensor | TopKLogits | None) -> tuple[Tensor, Tensor | TopKLogits | None]:
        """Both models' logits on their shared vocabulary: the first ``vocab_size`` classes; else refuse sizes that differ."""
        sequences = student_out.dim() >= 3 and isinstance(teacher_out, Tensor) and teacher_out.shape[:-1] == student_out.shape[:-1]
        teacher_size = teacher_out.shape[-1] if isinstance(teacher_out, Tensor) and (sequences or self.vocab_size is not None) else None
        self.check_vocabularies(student_out.shape[-1], teacher_size)
        if self.vocab_size is None:
            return student_out, teacher_out
        student_out = student_out[..., : self.vocab_size]
        if isinstance(teacher_out, Tensor):
            teacher_out = teacher_out[..., : self.vocab_size]
        return student_out, teacher_out

    def check_vocabularies(self, student_size: int, teacher_size: int | None) -> None:
        """Refuse vocabularies of different sizes without ``vocab_size``, and a ``vocab_size`` above either of them.

        Raises:
            ValueError: naming both sizes.
        """
        if self.vocab_size is not None:
            if min(student_size, teacher_size or student_size) < self.vocab_size:
                raise ValueError(
                    f"Expected `vocab_size` <= both models' vocabularies, but got vocab_size={self.vocab_size} with a student "
                    f"of {student_size} classes" + (f" and a teacher of {teacher_size}." if teacher_size is not None else ".")
                )
        elif teacher_size is not None and teacher_size != student_size:
            raise ValueError(
                f"The teacher's vocabulary has {teacher_size} entries and the student's {student_size}. If "
                "they share a tokenizer and one of them is padded (e.g. to a multiple of 64), pass `vocab_size=` the "
                "tokenizer's size to CausalLMDistillation: both are then compared on their first `vocab_size` classes. "
                "Models with different tokenizers cannot be distilled token by token."
            )

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The step's loss. For sequence outputs, the loss *summed* over the step's valid tokens: Lightning
        divides it by ``accumulate_grad_batches`` and DDP averages the gradients over ranks, and
        :meth:`on_before_optimizer_step` then divides the gradients by the valid tokens of the global batch, so
        that micro-batches with different numbers of valid tokens give the gradient of the one big batch.
        The logged ``train/loss`` is the step's mean per valid token."""
        self.check_can_train()
        where = f"training step {self.global_step} (batch {batch_idx} of epoch {self.current_epoch})"
        losses, inputs, targets, mask, student_out, teacher_out = self._training_losses(batch, where)
        rows = batch_utils.batch_size(inputs)
        n: Any = rows if mask is None else mask.sum()  # sequences: the epoch means weigh each step by its valid tokens
        if self.feature_distillation is not None:
            # the inputs' own token mask (the targets' mask drops each sequence's last token, whose features are valid)
            terms = self.feature_distillation.losses() if mask is None else self.feature_distillation.losses(mask=_feature_mask(inputs, student_out, mask))
            self.feature_distillation.clear()  # the captured activations hold the graph: drop them after use
            losses["loss"] = losses["loss"] + self.feature_distillation.weighted_sum(terms)
            for key, value in terms.items():
                self.log(f"train/feature_{key}", value.detach(), on_step=True, on_epoch=False, batch_size=rows)
        if self.soft_loss.learned:
            self.log("train/temperature", self.temperature, on_step=True, on_epoch=False, batch_size=rows)
        for name, key in (("loss", "loss"), ("soft_loss", "soft"), ("hard_loss", "hard")):
            value = losses[key].detach()
            # Per step: this rank's value, no collective. Per epoch: a torchmetrics mean, which Lightning
            # reduces across ranks at the epoch's end.
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name == "loss", batch_size=rows)
            self.metrics[f"train_{name}_epoch"].update(value, weight=n)
            self._log_metric("train", f"{name}_epoch")
        if student_out is not None:  # None when the loss never materialised the logits (a fused loss)
            self._update_metrics("train", student_out, teacher_out, targets, mask)
        self._guard.check_loss(losses["loss"], where)
        if mask is None:
            return losses["loss"]
        tokens = n.float()
        self._window_tokens = tokens if self._window_tokens is None else self._window_tokens + tokens
        return losses["loss"] * tokens

    def _training_losses(self, batch: Any, where: str) -> tuple[dict[str, Tensor], Any, Tensor | None, Tensor | None, Tensor | None, Any]:
        """``(losses, inputs, targets, mask, student_out, teacher_out)`` of a training batch: the terms of
        :meth:`distillation_loss`, and ``mask`` the valid positions of sequence outputs (None otherwise)."""
        inputs, targets, student_out, teacher_out = self._forward(batch, where, training=True)
        mask = batch_utils.valid_positions(inputs, targets, student_out)
        if mask is None:
            return self.distillation_loss(student_out, teacher_out, targets), inputs, targets, None, student_out, teacher_out
        return self.distillation_loss(student_out, teacher_out, targets, mask=mask), inputs, targets, mask, student_out, teacher_out

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Sequence outputs: divide the gradients by the valid tokens of the global batch (every micro-batch of the
        accumulation window, on every rank), undoing Lightning's division by ``accumulate_grad_batches`` and DDP's
        mean over ranks. Before gradient clipping, which then sees the gradient of the token mean."""
        tokens, self._window_tokens = self._window_tokens, None
        if tokens is None:
            return
        total = self.trainer.strategy.reduce(tokens, reduce_op="sum")
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / total.clamp(min=1.0)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.dtype))

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._guard.maybe_flush(self.global_step)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step("val", batch, f"validation batch {batch_idx} (epoch {self.current_epoch})")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step("test", batch, f"test batch {batch_idx}")

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        inputs, _ = self.unpack_batch(batch)
        return self.student_forward(inputs)

    def _eval_step(self, stage: str, batch: Any, where: str) -> None:
        inputs, targets, student_out, teacher_out = self._forward(batch, where)
        self._guard.check_student(student_out, where)  # in training a non-finite output makes the loss non-finite
        mask = batch_utils.valid_positions(inputs, targets, student_out)
        if targets is not None:
            hard = self._hard(student_out, targets)
            # sequences: a mean over the epoch's valid tokens, not a mean of batch means
            self.metrics[f"{stage}_loss"].update(hard, weight=1 if mask is None else (targets != IGNORE_INDEX).sum())
            self._log_metric(stage, "loss")
        self._update_metrics(stage, student_out, teacher_out, targets, mask)

    def _hard(self, student_out: Tensor, targets: Tensor) -> Tensor:
        if isinstance(self.hard_loss, (HardCrossEntropyLoss, HardMSELoss)):  # targets were checked by the guard, without a sync
            return self.hard_loss(student_out, targets, check_values=False)
        return self.hard_loss(student_out, targets)

    def _update_metrics(
        self, stage: str, student_out: Tensor, teacher_out: Tensor | TopKLogits | None, targets: Tensor | None, mask: Tensor | None
    ) -> None:
        # the frozen teacher's validation accuracy is logged once (not during the sanity check)
        once = stage != "val" or not (self._teacher_acc_logged or self.trainer.sanity_checking)
        updated = self.metrics.accumulate(stage, student_out, teacher_out, targets,
                                          compare=self.soft_loss.compares_distributions, teacher_metrics=once, mask=mask)
        for key in updated:
            self._log_metric(stage, key.split("_", 1)[1])

    def _log_metric(self, stage: str, name: str) -> None:
        """Log the torchmetrics object itself: Lightning computes it (reduced across ranks) and resets it at the epoch's end."""
        self.log(f"{stage}/{name}", self.metrics[f"{stage}_{name}"], on_step=False, on_epoch=True, prog_bar=name == "acc")

    @override
    def on_train_epoch_end(self) -> None:
        self._guard.flush()  # the checks still recorded on an accelerator, before anything is logged or saved

    @override
    def on_validation_epoch_end(self) -> None:
        self._guard.flush()
        if not self.trainer.sanity_checking and self.teacher is not None:
            self._teacher_acc_logged = True

    @override
    def on_test_epoch_end(self) -> None:
        self._guard.flush()

    # ------------------------------------------------------------------ optimizers
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter outside the teacher: the student, FitNet's adapters (once built) and a learned temperature."""
        return [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("teacher.")]

    @override
    def configure_optimizers(self) -> Any:
        return optim.configure(self.trainable_parameters(), self.optimizer_factory, self.lr_scheduler, attached_trainer(self))

    @override
    def setup(self, stage: str) -> None:
        trainer = attached_trainer(self)
        if trainer is not None:  # None when a test or a user calls setup by hand
            check_precision(trainer)
        # Before the strategy wraps the module (DDP) and the optimizer is made: hooks and adapters exist by then.
        if stage == "fit" and self.feature_distillation is not None:
            self.feature_distillation.attach()
            if self.feature_distillation.needs_adapters:
                self.feature_distillation.build_adapters(mask=self._dry_forward())
                self.feature_distillation.clear()

    def _dry_forward(self) -> Tensor | None:
        """One forward of both models in eval mode on an example batch, to see the hooked layers' shapes; returns
        the batch's token mask (sequence outputs) that tells the feature terms which features are sequences."""
        inputs = self.example_input_array
        if inputs is None:
            inputs, _ = self.unpack_batch(batch_utils.split_indexed(batch_utils.first_training_batch(self.trainer))[0])
        student_mode = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                self.teacher_forward(inputs)
                return token_mask(inputs, self.student_forward(inputs))
        finally:
            self.student.train(student_mode)

    @override
    def on_fit_start(self) -> None:
        self._guard.every_n_steps = max(1, int(self.trainer.log_every_n_steps))
        super().on_fit_start()

    @override
    def teardown(self, stage: str) -> None:
        if stage == "fit" and self.feature_distillation is not None:
            self.feature_distillation.detach()  # nothing stays registered on the user's models

    # ------------------------------------------------------------------ sharding (FSDP2)
    @override
    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``: shard the student with FSDP2 (:meth:`shard_student`) and
        shard the teacher (:meth:`shard_teacher`) or leave a whole copy on each rank (``teacher_sharding``).

        A no-op under any other strategy, and for a model that is already sharded: Lightning calls this hook
        for every ``fit``, ``validate`` and ``test``. The teacher stays frozen, in eval mode and out of the
        optimizer; its fingerprint is taken before it is sharded (checkpoints record it, loads compare it).

        Raises:
            ValueError: for trainable parameters outside the student (FitNet's adapters, a learned temperature):
                FSDP2 shards and averages the student's gradients only; theirs would differ on every rank.
        """
        trainer = attached_trainer(self)
        if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
            return
        outside = [name for name, p in self.named_parameters() if p.requires_grad and not name.startswith(("student.", "teacher."))]
        if outside and not is_sharded(self.student):
            raise ValueError(
                f"Expected every trainable parameter to belong to the student under ModelParallelStrategy (FSDP2 shards and "
                f"averages the student's gradients only), but got {', '.join(outside[:5])}"
                f"{f' and {len(outside) - 5} more' if len(outside) > 5 else ''} (FitNet's adapters or a learned "
                "temperature). Train this objective with DDP (`Trainer(strategy='ddp')`), or shard these modules in `shard_student`."
            )
        mesh = self.device_mesh
        if not is_sharded(self.student):
            self.shard_student(mesh)
        if self.teacher is not None and self.teacher_sharding == "shard" and not is_sharded(self.teacher):
            self.record_teacher_fingerprint()
            self.shard_teacher(mesh)

    def shard_student(self, mesh: DeviceMesh) -> None:
        """Shard the student over the data-parallel ranks of ``mesh`` (called by :meth:`configure_model`).

        Default: :func:`~lightning_kd.sharding.shard_model`, one FSDP unit per block of an ``nn.ModuleList`` /
        ``nn.ModuleDict`` (a transformer's layers), else per child with parameters, then the whole student.
        Override for another rule, or to add tensor parallelism on ``mesh["tensor_parallel"]``.

        Raises:
            ValueError: if ``mesh`` has a tensor-parallel dimension larger than 1 (this rule shards data-parallel only).
        """
        shard_model(self.student, _data_parallel(mesh))

    def shard_teacher(self, mesh: DeviceMesh) -> None:
        """Shard the frozen teacher over the data-parallel ranks of ``mesh`` (with ``teacher_sharding="shard"``).

        Default: :func:`~lightning_kd.sharding.shard_model` (the rule of :meth:`shard_student`), freeing each
        block's gathered weights right after its forward.
        """
        shard_model(self.teacher, _data_parallel(mesh, tensor_parallel_ok=True), reshard_after_forward=True)

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._guard.flush()  # no checkpoint is written after a non-finite loss that is still unread on the device
        super().on_save_checkpoint(checkpoint)
        if self.feature_distillation is not None:
            checkpoint["feature_adapters"] = self.feature_distillation.adapter_shapes
        checkpoint["distillation_objectives"] = self._objectives

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # the teacher's fingerprint; without a teacher, maybe `student_only`
        if self.student_only:
            return  # inference: the objective it was trained with does not matter
        check_objectives(checkpoint.get("distillation_objectives"), self._objectives)
        shapes = checkpoint.get("feature_adapters")
        if shapes and self.feature_distillation is not None and not self.feature_distillation.adapter_shapes:
            self.feature_distillation.build_adapters(shapes)  # `load_from_checkpoint` comes without a dry forward



def _data_parallel(mesh: DeviceMesh, *, tensor_parallel_ok: bool = False) -> DeviceMesh:
    """The data-parallel dimension of Lightning's ``("data_parallel", "tensor_parallel")`` mesh (a 1-D mesh as it is)."""
    if mesh.ndim == 1:
        return mesh
    tensor_parallel = mesh["tensor_parallel"].size()
    if tensor_parallel > 1 and not tensor_parallel_ok:
        raise ValueError(
            f"Expected `ModelParallelStrategy(tensor_parallel_size=1)`, but got {tensor_parallel}: the default `shard_student` "
            "shards over the data-parallel ranks only. Set `data_parallel_size` to the number of processes and "
            "`tensor_parallel_size=1`, or override `shard_student` to apply tensor parallelism."
        )
    return mesh["data_parallel"]


def _feature_mask(inputs: Any, student_out: Tensor | None, mask: Tensor) -> Tensor:
    """The token mask of the feature terms: the inputs' attention mask (all tokens without one)."""
    if student_out is not None:
        return token_mask(inputs, student_out)
    attention = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return attention != 0 if isinstance(attention, Tensor) else torch.ones_like(mask)
