"""DistillationModule: a frozen teacher, a trainable student, and the training step between them."""

from __future__ import annotations

import os
import pickle
import warnings
from contextvars import ContextVar
from functools import partial
from pathlib import Path
from typing import IO, Any, Callable, Literal, Mapping

import lightning as L
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning.pytorch.utilities import CombinedLoader
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_kd import batch as batch_utils
from lightning_kd.checkpoint import CheckpointError, allow_missing_teacher_keys, drop_teacher_keys, fingerprint, load_checkpoint
from lightning_kd.data.augment import Augmentation
from lightning_kd.soft_targets.batches import SoftTargetBatch
from lightning_kd.soft_targets.store import SoftTargetStore, open_store
from lightning_kd.features import FeatureDistillation
from lightning_kd.guards import ValueGuard
from lightning_kd.metrics import DistillationMetrics
from lightning_kd.losses import (
    IGNORE_INDEX,
    NEEDS_TARGETS,
    LearnableTemperature,
    TopKLogits,
    check_soft_loss,
    compute_soft_loss,
    get_hard_loss,
)
from lightning_kd.losses._reduction import check_temperature
from lightning_kd.losses.hard import HardLoss
from lightning_kd.teachers import TeacherEnsemble, cast_inputs, extract_logits, resolve_dtype
from lightning_kd.weights import load_weights

OptimizerFactory = Callable[[Any], torch.optim.Optimizer]
LR_SCHEDULERS = ("cosine",)
Teachers = nn.Module | list[nn.Module] | dict[str, nn.Module]


class DistillationModule(L.LightningModule):
    r"""Distil a frozen ``teacher`` (or several) into a trainable ``student``.

    The training loss, with ``alpha`` weighting the **soft** (teacher) term:

    .. math::
        \mathcal{L} = w \, \alpha \, T^2 \, \mathrm{KL}\big(\mathrm{softmax}(z_t/T) \,\|\, \mathrm{softmax}(z_s/T)\big)
            + (1 - \alpha) \, \mathcal{L}_{\text{hard}}(z_s, y) + \sum_k \lambda_k \mathcal{L}_k(f_s, f_t)

    (torchdistill uses the opposite convention for alpha.) The KL term is ``soft_loss="kl"``; any
    logit loss of :data:`lightning_kd.losses.SOFT_LOSSES` takes its place (DKD, DIST, reverse KL,
    JSD, skew KL, MSE), with logit standardisation as an option of all of them and a learnable
    temperature (CTKD) in place of ``T``. :math:`w` is ``soft_weight`` (1; warmed up by the
    annealing callback for DKD). The last sum holds the feature terms (FitNet, AT, RKD) on hooked
    layers, each with its weight :math:`\lambda_k`. The soft term covers every input, the
    hard term only labeled ones: a batch may mix labeled inputs with unlabeled ones (Hinton's
    transfer set), e.g. a ``CombinedLoader`` of a labeled and an unlabeled loader.

    Teacher hygiene: the teacher's parameters get ``requires_grad=False`` (so DDP ignores them),
    it runs under ``torch.no_grad()`` and stays in eval mode on every training step even after a
    ``model.train()`` / ``model.eval()`` call, the optimizer sees only the student's parameters,
    and checkpoints hold no ``teacher.*`` keys unless ``keep_teacher_in_checkpoint=True``; instead they
    record a fingerprint of the teacher's weights, checked when the checkpoint is loaded.

    With ``teacher=None`` the module trains the student alone on the hard loss: the same code path,
    metrics and optimizer, which makes it the fair "from scratch" baseline (and a teacher trainer).

    Override points for user projects: :meth:`unpack_batch`, :meth:`teacher_forward`,
    :meth:`student_forward`, :meth:`distillation_loss`.

    Args:
        teacher: the trained teacher (frozen here), or None for plain supervised training. A list or
            dict of teachers becomes a :class:`~lightning_kd.teachers.TeacherEnsemble` whose logits are
            the (weighted) mean of theirs; every hygiene rule holds for each of them.
        student: the model to train; ``forward(x)`` is the student.
        temperature: softmax temperature :math:`T > 0` (the annealing callback may change it); the
            starting value of a learnable temperature.
        alpha: weight of the soft term in [0, 1] (the annealing callback may change it).
        hard_loss: ``"cross_entropy"``, ``"mse"`` (one-hot class targets or raw regression
            targets), or any callable ``(student_outputs, targets) -> loss``.
        soft_loss: the logit loss: ``"kl"`` (Hinton's KD), ``"mse"`` (the regression case, and the
            high-temperature limit of KD), ``"dkd"``, ``"dist"``, ``"reverse_kl"``, ``"jsd"``,
            ``"skew_kl"`` (see :mod:`lightning_kd.losses`). DKD needs a class per input: unlabeled
            inputs (a transfer set) use the teacher's top-1 class.
        soft_loss_options: keyword options of that loss, e.g. ``{"beta": 8.0}`` for DKD or
            ``{"skew": 0.1}`` for skew KL.
        standardize: z-score student and teacher logits before the temperature (logit
            standardisation, Sun et al., CVPR 2024), for any soft loss.
        scale_by_t2: multiply the soft term by :math:`T^2` (not for ``"mse"``).
        soft_weight: extra factor :math:`w` on the soft term, for a warm-up by the annealing callback
            (DKD's first 20 epochs).
        learnable_temperature: CTKD (Li et al., AAAI 2023): ``True`` or ``{"t_min": 1, "t_range": 20}``
            makes :math:`T` a parameter trained through gradient reversal (starting at ``temperature``),
            logged as ``train/temperature``; anneal ``grl_weight`` (0 -> 1) with the callback.
        grl_weight: the gradient-reversal weight :math:`\lambda` of a learnable temperature.
        features: feature terms ``{key: {"method": "fitnet" | "at" | "rkd", "teacher_layers": [...],
            "student_layers": [...], "weight": 1.0, **options}}`` on layers named as in
            ``named_modules()`` (the method defaults to the key); see :class:`~lightning_kd.features.FeatureDistillation`.
            FitNet's adapters are built from one dry forward at the start of fit (on
            ``example_input_array`` if set, else the first training batch), trained with the student,
            and not part of the exported student.
        teacher_weights: for several teachers: None (mean) or one weight per teacher (list or dict).
        optimizer: a partial ``params -> Optimizer`` (Hydra ``_partial_: true``) applied to the
            trainable (student) parameters; default ``Adam(lr=1e-3)``.
        lr_scheduler: None, ``"cosine"`` (per-step cosine decay over the whole run), or a partial
            ``optimizer -> scheduler`` (or -> a Lightning lr-scheduler dict).
        lr_scheduler_interval: ``"epoch"`` or ``"step"``, for a partial ``lr_scheduler``.
        keep_teacher_in_checkpoint: also save the teacher's weights in checkpoints.
        teacher_checkpoint: where the teacher's weights come from (a checkpoint or state-dict file);
            recorded in the hyperparameters so that ``load_from_checkpoint`` can rebuild the teacher
            from it when the teacher architecture it is given does not carry the right weights.
        soft_targets: a :class:`~lightning_kd.data.SoftTargetStore` (or its path) of the teacher's
            outputs on the training set: training batches (wrapped by ``SoftTargetDataModule`` /
            ``with_soft_targets``) take their teacher outputs from it instead of a forward pass,
            so ``teacher`` may be None. Same loss, same metrics. A given teacher must be the one
            that made the store; it then still serves the validation metrics.
        augmentation: a replayable :class:`~lightning_kd.data.augment.Augmentation` of the training
            inputs (teacher and student see the same view). Its parameters are a pure function of
            ``(augmentation_seed, epoch, sample index)``, or replayed from ``soft_targets``.
        augmentation_seed: seed of the augmentation draws.
        teacher_dtype: run the teacher in this dtype (``"float32"``, ``"bfloat16"``, ``"float16"``)
            whatever the Trainer's precision: its weights are cast once and its forward runs
            outside autocast. None: as given (a teacher already in bfloat16 gets its inputs cast).
            For several teachers, a dict gives each its own: ``{"0": "bfloat16", "1": None}``.
        compile_student: ``student.compile()`` in place (checkpoint keys unchanged).
        compile_teacher: ``teacher.compile()`` in place.
        channels_last: convert conv nets and 4-D inputs to the channels-last memory format.

    Raises:
        ValueError: for ``temperature <= 0``, ``alpha`` outside [0, 1], an unknown loss, loss option,
            feature method, layer name or scheduler name; at run time for teacher/student outputs of
            different shapes or targets that do not fit the outputs.
        TypeError: if teacher or student is not an ``nn.Module``.

    Example::

        >>> from lightning_kd.models import get_model
        >>> module = DistillationModule(get_model("cnn1d"), get_model("mlp"), temperature=4.0, alpha=0.9)
        >>> module.teacher.training, any(p.requires_grad for p in module.teacher.parameters())
        (False, False)
    """

    def __init__(
        self,
        teacher: Teachers | None,
        student: nn.Module,
        *,
        temperature: float = 4.0,
        alpha: float = 0.9,
        hard_loss: HardLoss = "cross_entropy",
        soft_loss: Literal["kl", "mse", "dkd", "dist", "reverse_kl", "jsd", "skew_kl"] = "kl",
        soft_loss_options: Mapping[str, Any] | None = None,
        standardize: bool = False,
        scale_by_t2: bool = True,
        soft_weight: float = 1.0,
        learnable_temperature: bool | Mapping[str, float] = False,
        grl_weight: float = 1.0,
        features: Mapping[str, Mapping[str, Any]] | None = None,
        teacher_weights: list[float] | dict[str, float] | None = None,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: str | Callable[..., Any] | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        keep_teacher_in_checkpoint: bool = False,
        teacher_checkpoint: str | None = None,
        soft_targets: SoftTargetStore | str | None = None,
        augmentation: Augmentation | None = None,
        augmentation_seed: int = 0,
        teacher_dtype: Literal["float32", "bfloat16", "float16"] | Mapping[str, str | None] | None = None,
        compile_student: bool = False,
        compile_teacher: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"Expected `student` to be an nn.Module, but got {type(student).__name__}.")
        if isinstance(teacher, (list, tuple, Mapping)):
            per_teacher = teacher_dtype if isinstance(teacher_dtype, Mapping) else None
            teacher = TeacherEnsemble(teacher, weights=teacher_weights, dtypes=per_teacher)
            teacher_dtype = None if per_teacher is not None else teacher_dtype
        elif teacher_weights is not None:
            raise ValueError("`teacher_weights` is for several teachers: pass `teacher` as a list or dict of models.")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"Expected `teacher` to be an nn.Module, a list/dict of them, or None, but got {type(teacher).__name__}.")
        if isinstance(teacher_dtype, Mapping):
            raise ValueError("A per-teacher `teacher_dtype` dict needs several teachers; give one teacher a dtype name.")
        if teacher is not None:
            _check_not_shared(teacher, student)
        soft_loss_options = dict(soft_loss_options or {})
        check_soft_loss(soft_loss, soft_loss_options)
        if isinstance(lr_scheduler, str) and lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(
                f"Unknown `lr_scheduler` {lr_scheduler!r}. Expected one of {', '.join(LR_SCHEDULERS)}, None, "
                "or a partial taking the optimizer."
            )
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"Expected `lr_scheduler_interval` to be 'epoch' or 'step', but got {lr_scheduler_interval!r}.")
        dtype = None if teacher_dtype is None else resolve_dtype(teacher_dtype)
        if augmentation is not None and not isinstance(augmentation, Augmentation):
            raise TypeError(
                f"Expected `augmentation` to be a lightning_kd.data.augment.Augmentation, but got {type(augmentation).__name__}."
            )
        self.hard_loss_fn = get_hard_loss(hard_loss)
        self._builtin_hard = isinstance(hard_loss, str)
        self.temperature_model: LearnableTemperature | None = None
        self.temperature = temperature  # validated by the property setters below
        self.alpha = alpha
        self.soft_loss = soft_loss
        self.soft_loss_options = soft_loss_options
        self.standardize = standardize
        self.scale_by_t2 = scale_by_t2
        self.soft_weight = soft_weight
        self.grl_weight = grl_weight
        if learnable_temperature:
            if soft_loss == "mse":
                raise ValueError("`learnable_temperature` needs a soft loss with a temperature, but got soft_loss='mse'.")
            options = learnable_temperature if isinstance(learnable_temperature, Mapping) else {}
            self.temperature_model = LearnableTemperature(temperature, **options)
        self.optimizer_factory = optimizer
        self.lr_scheduler = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.keep_teacher_in_checkpoint = keep_teacher_in_checkpoint
        self.teacher_checkpoint = None if teacher_checkpoint is None else str(teacher_checkpoint)
        # Only plain values go to the hyperparameters: checkpoints must load with weights_only=True.
        self.save_hyperparameters(
            {
                "temperature": float(temperature),
                "alpha": float(alpha),
                "hard_loss": hard_loss if isinstance(hard_loss, str) else None,
                "soft_loss": soft_loss,
                "soft_loss_options": _plain(soft_loss_options),
                "standardize": standardize,
                "scale_by_t2": scale_by_t2,
                "soft_weight": float(soft_weight),
                "learnable_temperature": _plain(learnable_temperature),
                "grl_weight": float(grl_weight),
                "features": _plain(features),
                "teacher_weights": _plain(teacher_weights),
                "lr_scheduler": lr_scheduler if isinstance(lr_scheduler, str) else None,
                "keep_teacher_in_checkpoint": keep_teacher_in_checkpoint,
                "teacher_checkpoint": self.teacher_checkpoint,
                "soft_targets": None if soft_targets is None else str(getattr(soft_targets, "path", soft_targets)),
                "augmentation": None if augmentation is None else repr(augmentation),
                "augmentation_seed": augmentation_seed,
                "teacher_dtype": _plain(teacher_dtype),
                "compile_student": compile_student,
                "compile_teacher": compile_teacher,
                "channels_last": channels_last,
            }
        )
        self.augmentation = augmentation
        self.augmentation_seed = int(augmentation_seed)
        self.teacher_dtype = teacher_dtype
        self.channels_last = channels_last

        self.student = student
        self.teacher = teacher
        if teacher is not None:
            if teacher_checkpoint is not None and not _skip_missing_teacher_file(teacher_checkpoint):
                load_weights(teacher, teacher_checkpoint)
            teacher.requires_grad_(False)
            teacher.eval()
            if dtype is not None:
                teacher.to(dtype)
        if channels_last:
            for model in (student, teacher):
                if model is not None:
                    model.to(memory_format=torch.channels_last)
        self.feature_distillation: FeatureDistillation | None = None
        if features:
            if teacher is None:
                raise ValueError("Feature terms need the teacher's activations: pass a teacher (they cannot come from `soft_targets`).")
            self.feature_distillation = FeatureDistillation(teacher, student, features)
        if compile_student:
            student.compile()  # in place: parameters and state-dict keys keep their names
        if compile_teacher and teacher is not None:
            teacher.compile()
        self.soft_targets = None if soft_targets is None else open_store(soft_targets)
        if self.soft_targets is not None:
            if self.soft_targets.top_k is not None and (soft_loss != "kl" or standardize):
                raise ValueError(
                    f"soft_loss={soft_loss!r}{' with standardize=True' if standardize else ''} needs full teacher outputs, but the "
                    "soft-target store keeps only the top-k; only soft_loss='kl' takes top-k targets."
                )
            self.soft_targets.check_augmentation(augmentation)
            if teacher is not None:
                self.soft_targets.check_teacher(fingerprint(teacher))
        self._teacher_fingerprint: str | None = None
        self._teacher_acc_logged = False
        self._guard = ValueGuard()  # non-finite teacher outputs and losses, out-of-range targets
        self._eval_mode_guard: warnings.catch_warnings | None = None
        self.register_state_dict_post_hook(drop_teacher_keys)
        self.register_load_state_dict_post_hook(allow_missing_teacher_keys)

        self.metrics = DistillationMetrics()

    # ------------------------------------------------------------------ settings the callback anneals
    @property
    def temperature(self) -> float:
        """The softmax temperature (the current learned value with ``learnable_temperature``)."""
        if self.temperature_model is not None:
            return float(self.temperature_model().detach())
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if self.temperature_model is not None:
            raise RuntimeError(
                "The temperature is learned (`learnable_temperature`), so it cannot be set or annealed. Anneal "
                "`grl_weight` instead (e.g. `schedule=ctkd`), or switch `learnable_temperature` off."
            )
        check_temperature(value)
        self._temperature = float(value)

    @property
    def soft_weight(self) -> float:
        return self._soft_weight

    @soft_weight.setter
    def soft_weight(self, value: float) -> None:
        if not value >= 0:
            raise ValueError(f"Expected `soft_weight` to be >= 0, but got {value}.")
        self._soft_weight = float(value)

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"Expected `alpha` to be in [0, 1], but got {value}.")
        self._alpha = float(value)

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
        with torch.no_grad():
            if self.teacher_dtype is None:
                return extract_logits(self.teacher(inputs))
            with torch.autocast(device_type=self.device.type, enabled=False):
                return extract_logits(self.teacher(inputs))

    def student_forward(self, inputs: Any) -> Tensor:
        """The student's logits for ``inputs``."""
        return extract_logits(self.student(inputs))

    def distillation_loss(self, student_out: Tensor, teacher_out: Tensor | None, targets: Tensor | None) -> dict[str, Tensor]:
        """``{"loss", "soft", "hard"}``: ``soft_weight * alpha * soft + (1 - alpha) * hard`` (hard alone without a teacher)."""
        zero = 0.0 * student_out.float().sum()  # graph-connected zero for a missing term
        hard = zero if targets is None else self._hard(student_out, targets)
        if teacher_out is None:
            return {"loss": hard, "soft": zero, "hard": hard}
        soft = compute_soft_loss(
            self.soft_loss,
            student_out,
            teacher_out,
            self._target_classes(teacher_out, targets) if self.soft_loss in NEEDS_TARGETS else None,
            temperature=self.temperature_model(self.grl_weight) if self.temperature_model is not None else self._temperature,
            scale_by_t2=self.scale_by_t2,
            standardize=self.standardize,
            options=self.soft_loss_options,
        )
        loss = self.soft_weight * self.alpha * soft + (1.0 - self.alpha) * hard
        return {"loss": loss, "soft": soft, "hard": hard}

    def _target_classes(self, teacher_out: Tensor, targets: Tensor | None) -> Tensor:
        """The class per input for DKD: the label, or the teacher's top-1 for unlabeled inputs."""
        top1 = teacher_out.argmax(dim=-1)
        if targets is None:
            return top1
        if targets.is_floating_point():
            raise TypeError(f"soft_loss={self.soft_loss!r} needs class targets, but got real-valued (regression) targets.")
        return torch.where(targets == IGNORE_INDEX, top1, targets)

    def forward(self, x: Any) -> Any:
        return self.student(x)

    # ------------------------------------------------------------------ steps
    def _forward(self, batch: Any, where: str, *, training: bool = False) -> tuple[Any, Tensor | None, Tensor, Tensor | TopKLogits | None]:
        """``(inputs, targets, student_out, teacher_out)`` of a batch: one teacher forward per batch
        (none when its outputs come from the soft-target store). The teacher's outputs and the class
        targets are checked here (``where`` names the batch in the errors)."""
        batch, cached = batch_utils.split_cached(batch)
        inputs, targets = self.unpack_batch(batch)
        if _empty(inputs):  # every mean over it would be NaN
            raise ValueError(f"The batch at {where} holds no sample: check the DataLoader (its sampler and `collate_fn`).")
        if isinstance(targets, Tensor) and targets.dtype not in (torch.int64, torch.bool) and not targets.is_floating_point():
            targets = targets.long()  # int32/uint8 class indices: what cross-entropy, one-hot and the metrics need
        if self.channels_last:
            inputs = apply_to_collection(inputs, Tensor, _to_channels_last)
        teacher_out = None
        if training and self.soft_targets is not None:
            if cached is None:
                raise RuntimeError(
                    "`soft_targets` is set, but the training batch carries no sample indices to look its targets up. "
                    "Wrap the data: `trainer.fit(module, datamodule=SoftTargetDataModule(datamodule, store))` or "
                    "`train_dataloaders=with_soft_targets(loader, store)`."
                )
            teacher_out = _concat([self.soft_targets.lookup(c.part, c.index, self.current_epoch) for c in cached])
            teacher_out = teacher_out.to(self.device)
        if training and self.augmentation is not None:
            inputs = self._augment(inputs, cached)
        if teacher_out is None and self.teacher is not None:
            teacher_out = self.teacher_forward(inputs)
        if teacher_out is not None:
            self._guard.check_teacher(teacher_out.values if isinstance(teacher_out, TopKLogits) else teacher_out, where)
        student_out = self._student_forward_checked(inputs)
        if isinstance(targets, Tensor) and not targets.is_floating_point() and targets.shape == student_out.shape[:-1]:
            self._guard.check_targets(targets, student_out.shape[-1], where)  # class indices: every batch
        return inputs, targets, student_out, teacher_out

    def _student_forward_checked(self, inputs: Any) -> Tensor:
        try:
            return self.student_forward(inputs)
        except ValueError as err:
            if "Expected more than 1 value per channel when training" not in str(err):
                raise
            raise ValueError(
                f"A training batch holds a single sample ({err}), and the student's BatchNorm layers cannot "
                "normalise one value per channel. Set `drop_last=True` on the training DataLoader (or choose a "
                "batch size that does not leave a last batch of 1)."
            ) from err

    def _augment(self, inputs: Any, cached: list[SoftTargetBatch] | None) -> Tensor:
        if not isinstance(inputs, Tensor):
            raise TypeError("`augmentation` applies to tensor inputs; override `unpack_batch` to return one.")
        if self.soft_targets is not None:  # replay the views the teacher's outputs were recorded on
            params = torch.cat([self.soft_targets.augmentation_params(c.part, c.index, self.current_epoch) for c in cached])
        elif cached is not None:
            params = self.augmentation.sample(self.augmentation_seed, self.current_epoch, torch.cat([c.index for c in cached]))
        else:  # no sample indices: draws keyed by the step instead, still a pure function (resume-safe)
            params = self.augmentation.sample(self.augmentation_seed, self.global_step, torch.arange(len(inputs)))
        return self.augmentation.apply(inputs, params.to(inputs.device))

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        where = f"training step {self.global_step} (batch {batch_idx} of epoch {self.current_epoch})"
        inputs, targets, student_out, teacher_out = self._forward(batch, where, training=True)
        losses = self.distillation_loss(student_out, teacher_out, targets)
        n = batch_utils.batch_size(inputs)
        if self.feature_distillation is not None:
            terms = self.feature_distillation.losses()
            self.feature_distillation.clear()  # the captured activations hold the graph: drop them after use
            losses["loss"] = losses["loss"] + self.feature_distillation.weighted_sum(terms)
            for key, value in terms.items():
                self.log(f"train/feature_{key}", value.detach(), on_step=True, on_epoch=False, batch_size=n)
        if self.temperature_model is not None:
            self.log("train/temperature", self.temperature_model().detach(), on_step=True, on_epoch=False, batch_size=n)
        for name, key in (("loss", "loss"), ("soft_loss", "soft"), ("hard_loss", "hard")):
            value = losses[key].detach()
            # Per step: this rank's value, no collective. Per epoch: a torchmetrics mean, reduced across
            # ranks in `on_train_epoch_end` (a `sync_dist` epoch value read by the progress bar at another
            # point on each rank deadlocks DDP).
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name == "loss", batch_size=n)
            self.metrics[f"train_{name}_epoch"].update(value, weight=n)
        self._update_metrics("train", student_out, teacher_out, targets)
        self._guard.check_loss(losses["loss"], where)
        return losses["loss"]

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
        _, targets, student_out, teacher_out = self._forward(batch, where)
        self._guard.check_student(student_out, where)  # in training a non-finite output makes the loss non-finite
        if targets is not None:
            self.metrics[f"{stage}_loss"].update(self._hard(student_out, targets))
        self._update_metrics(stage, student_out, teacher_out, targets)

    def _hard(self, student_out: Tensor, targets: Tensor) -> Tensor:
        if self._builtin_hard:  # target values were checked by the guard in `_forward`, without a device sync
            return self.hard_loss_fn(student_out, targets, check_values=False)
        return self.hard_loss_fn(student_out, targets)

    def _update_metrics(self, stage: str, student_out: Tensor, teacher_out: Tensor | TopKLogits | None, targets: Tensor | None) -> None:
        self.metrics.accumulate(stage, student_out, teacher_out, targets, compare=self.soft_loss != "mse")

    def _log_metrics(self, stage: str) -> None:
        self._guard.flush()  # the checks still recorded on an accelerator, before anything is logged or saved
        # the frozen teacher's validation accuracy is logged once (not during the sanity check)
        skip = stage == "val" and (self._teacher_acc_logged or self.trainer.sanity_checking)
        for name, value in self.metrics.compute(stage, skip_teacher=skip).items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "acc", sync_dist=False)
        if stage == "val" and not self.trainer.sanity_checking and self.teacher is not None:
            self._teacher_acc_logged = True

    @override
    def on_train_epoch_end(self) -> None:
        self._log_metrics("train")

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    # ------------------------------------------------------------------ optimizers
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter outside the teacher: the student, FitNet's adapters (once built) and a learned temperature."""
        return [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("teacher.")]

    @override
    def configure_optimizers(self) -> Any:
        params = self.trainable_parameters()
        factory = self.optimizer_factory or partial(torch.optim.Adam, lr=1e-3)
        optimizer = factory(params)
        if self.lr_scheduler is None:
            return optimizer
        if self.lr_scheduler == "cosine":
            total = self.trainer.estimated_stepping_batches
            if total == float("inf"):
                raise RuntimeError("lr_scheduler='cosine' needs a finite run: set `max_epochs` or `max_steps`.")
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(total)))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        scheduler = self.lr_scheduler(optimizer)
        if isinstance(scheduler, Mapping):
            return {"optimizer": optimizer, "lr_scheduler": dict(scheduler)}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_scheduler_interval}}

    # ------------------------------------------------------------------ modes
    @override
    def train(self, mode: bool = True) -> "DistillationModule":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # `model.train()` must never turn the teacher's dropout/BatchNorm on
        return self

    @override
    def setup(self, stage: str) -> None:
        trainer = self._trainer  # None when a test or a user calls setup by hand
        precision = "" if trainer is None else str(trainer.precision)
        if precision in ("16-true", "16") and trainer.strategy.root_device.type == "cpu":
            # float16 weights on the CPU: Adam's updates underflow/overflow and the weights turn NaN
            raise ValueError(
                f"Expected a `precision` that trains on the CPU, but got {precision!r}: float16 weights are not supported "
                "there. Use '32-true', 'bf16-mixed' or 'bf16-true' on the CPU, or train on a GPU."
            )
        # Before the strategy wraps the module (DDP) and the optimizer is made: hooks and adapters exist by then.
        if stage == "fit" and self.feature_distillation is not None:
            self.feature_distillation.attach()
            if self.feature_distillation.needs_adapters:
                self._dry_forward()
                self.feature_distillation.build_adapters()
                self.feature_distillation.clear()

    def _dry_forward(self) -> None:
        """One forward of both models in eval mode on an example batch, to see the hooked layers' shapes."""
        inputs = self.example_input_array
        if inputs is None:
            inputs, _ = self.unpack_batch(batch_utils.split_cached(_first_batch(self.trainer))[0])
        student_mode = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                self.teacher_forward(inputs)
                self.student_forward(inputs)
        finally:
            self.student.train(student_mode)

    @override
    def teardown(self, stage: str) -> None:
        if stage == "fit" and self.feature_distillation is not None:
            self.feature_distillation.detach()  # nothing stays registered on the user's models

    @override
    def on_fit_start(self) -> None:
        self._guard.every_n_steps = max(1, int(self.trainer.log_every_n_steps))
        # A user's `model.eval()` before fit must not freeze the student for the whole run. A student
        # that is itself in train mode keeps the modes its user chose for its submodules.
        if not self.student.training:
            self.student.train()
        self.training = True  # the root and the metrics only, without recursing into the teacher
        self.metrics.train()
        if self.teacher is None:
            return
        self.teacher.eval()
        self._teacher_fingerprint = None
        # Lightning warns about modules in eval mode at the start of training; the frozen teacher's
        # are expected. Silence exactly that count, so a student left in eval mode still warns.
        count = sum(1 for _ in self.teacher.modules())
        self._eval_mode_guard = warnings.catch_warnings()
        self._eval_mode_guard.__enter__()  # left in `on_train_start`, right after Lightning's check
        warnings.filterwarnings("ignore", message=rf"Found {count} module\(s\) in eval mode")

    @override
    def on_train_start(self) -> None:
        if self._eval_mode_guard is not None:
            self._eval_mode_guard.__exit__(None, None, None)
            self._eval_mode_guard = None

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Re-asserted every step: validation loops, user callbacks or `model.train()` may flip modes.
        if self.teacher is not None and self.teacher.training:
            self.teacher.eval()
        if not self.student.training:
            self.student.train()

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | os.PathLike[str] | IO[bytes],
        map_location: Any = None,
        hparams_file: str | os.PathLike[str] | None = None,
        strict: bool | None = None,
        weights_only: bool = True,
        **kwargs: Any,
    ) -> "DistillationModule":
        """Lightning's ``load_from_checkpoint``, always with ``weights_only=True``: nothing is unpickled.

        Pass the ``teacher`` and ``student`` architectures as keyword arguments. The teacher's weights
        come from the ``teacher_checkpoint`` recorded in the checkpoint if that file still exists, else
        from the teacher given; either way their fingerprint must match the one the checkpoint recorded.

        Raises:
            ValueError: for ``weights_only=False``.
            FileNotFoundError: if ``checkpoint_path`` does not exist.
            lightning_kd.checkpoint.CheckpointError: for an empty, truncated or non-torch file, or one
                holding pickled objects.
            RuntimeError: if the teacher does not match the checkpoint's fingerprint.
        """
        if weights_only is not True:
            raise ValueError(
                f"Expected `weights_only=True`, but got {weights_only!r}: lightning-kd never unpickles a checkpoint "
                "(a pickled payload runs code). Checkpoints written by lightning-kd load with weights_only=True."
            )
        token = _LOADING_CHECKPOINT.set(True)
        try:
            return super().load_from_checkpoint(
                checkpoint_path, map_location=map_location, hparams_file=hparams_file, strict=strict, weights_only=True, **kwargs
            )
        except (RuntimeError, EOFError, pickle.UnpicklingError, OSError, KeyError) as err:
            if isinstance(err, CheckpointError) or not isinstance(checkpoint_path, (str, os.PathLike)):
                raise
            try:  # was it the file? then say so clearly (an error path: reading it again costs nothing that matters)
                load_checkpoint(checkpoint_path)
            except (CheckpointError, FileNotFoundError) as bad_file:
                raise bad_file from err
            raise
        finally:
            _LOADING_CHECKPOINT.reset(token)

    def teacher_fingerprint(self) -> str | None:
        """SHA-256 of the teacher's parameters and buffers (cached during a fit: the teacher is frozen)."""
        if self.teacher is None:
            return None
        fitting = self._trainer is not None and self._trainer.training
        if self._teacher_fingerprint is None or not fitting:
            self._teacher_fingerprint = fingerprint(self.teacher)
        return self._teacher_fingerprint

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._guard.flush()  # no checkpoint is written after a non-finite loss that is still unread on the device
        checkpoint["teacher_fingerprint"] = self.teacher_fingerprint()
        if self.feature_distillation is not None:
            checkpoint["feature_adapters"] = self.feature_distillation.adapter_shapes

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        shapes = checkpoint.get("feature_adapters")
        if shapes and self.feature_distillation is not None and not self.feature_distillation.adapter_shapes:
            self.feature_distillation.build_adapters(shapes)  # `load_from_checkpoint` comes without a dry forward
        expected = checkpoint.get("teacher_fingerprint")
        has_teacher_keys = any(k.startswith("teacher.") for k in checkpoint.get("state_dict", {}))
        if expected is None or self.teacher is None or has_teacher_keys:
            return
        actual = fingerprint(self.teacher)
        if actual == expected:
            return
        raise RuntimeError(
            "The teacher given to this module is not the one the checkpoint was trained with (its weights "
            f"fingerprint differs: expected {expected[:12]}, got {actual[:12]}). Pass the "
            "trained teacher (e.g. `teacher=load_weights(arch, 'teacher.ckpt')`), set `teacher_checkpoint`, or "
            "save checkpoints with `keep_teacher_in_checkpoint=True`."
        )


# Set while `load_from_checkpoint` builds the module: the recorded `teacher_checkpoint` may have moved since.
_LOADING_CHECKPOINT: ContextVar[bool] = ContextVar("lightning_kd_loading_checkpoint", default=False)


def _skip_missing_teacher_file(teacher_checkpoint: str | os.PathLike[str]) -> bool:
    """Whether to keep the given teacher as it is because its recorded checkpoint file is gone.

    Only inside ``load_from_checkpoint``: the fingerprint stored in the checkpoint then decides whether
    the given teacher is the right one (``on_load_checkpoint``). A user's own missing file still fails.
    """
    if not _LOADING_CHECKPOINT.get() or Path(teacher_checkpoint).expanduser().is_file():
        return False
    warnings.warn(
        f"The teacher checkpoint recorded in this checkpoint, {str(teacher_checkpoint)!r}, no longer exists; using "
        "the teacher passed to `load_from_checkpoint` as it is (its fingerprint is checked).",
        stacklevel=3,
    )
    return True


def _check_not_shared(teacher: nn.Module, student: nn.Module) -> None:
    """Refuse a teacher that is the student or shares parameters with it: freezing the teacher would
    silently freeze those student parameters too, and "distilling" a model into itself teaches nothing."""
    if teacher is student:
        raise ValueError("Expected `teacher` and `student` to be two different models, but got the same object twice.")
    teacher_params = {id(p) for p in teacher.parameters()}
    shared = [name for name, p in student.named_parameters(remove_duplicate=False) if id(p) in teacher_params]
    if shared:
        listed = ", ".join(shared[:5]) + (", ..." if len(shared) > 5 else "")
        raise ValueError(
            f"Expected `teacher` and `student` to share no parameters, but {len(shared)} student parameter(s) belong "
            f"to the teacher too: {listed}. The frozen teacher would freeze them; give the student its own copy "
            "(e.g. `copy.deepcopy(layer)`)."
        )


def _empty(inputs: Any) -> bool:
    try:
        return batch_utils.batch_size(inputs) == 0
    except (TypeError, IndexError, StopIteration):  # inputs of a user's own kind: not ours to size
        return False


def _plain(value: Any) -> Any:
    """A hyperparameter as plain Python (checkpoints must load with ``weights_only=True``)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _to_channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _concat(parts: list[Tensor | TopKLogits]) -> Tensor | TopKLogits:
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], TopKLogits):
        return TopKLogits(*(torch.cat(fields) for fields in zip(*parts)))
    return torch.cat(parts)


def _first_batch(trainer: "L.Trainer") -> Any:
    """The first training batch, for the adapters' dry forward (before the fit loop has its dataloaders)."""
    if trainer.datamodule is not None:
        loader = trainer.datamodule.train_dataloader()
    else:
        loader = trainer.fit_loop._data_source.dataloader()
    if isinstance(loader, CombinedLoader):
        loader = loader.flattened[0]
    elif isinstance(loader, Mapping):
        loader = next(iter(loader.values()))
    elif isinstance(loader, (list, tuple)):
        loader = loader[0]
    return next(iter(loader))
