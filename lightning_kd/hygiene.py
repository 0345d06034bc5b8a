"""The rules of a frozen teacher inside a LightningModule: its modes, and checkpoints without it.

A mixin, so that :class:`~lightning_kd.DistillationModule` reads as the training step it is.
"""

from __future__ import annotations

import os
import pickle
import warnings
from typing import IO, Any

from torch import nn

from lightning_kd.checkpoint import LOADING_CHECKPOINT, CheckpointError, fingerprint, load_checkpoint


class FrozenTeacher:
    """LightningModule mixin: the frozen teacher's modes and checkpoints (put it before ``LightningModule``).

    For a module with ``teacher`` (None or a frozen model) and ``student``:

    - modes: the teacher stays in eval mode on every training step, whatever ``model.train()``,
      validation loops or user callbacks do, and the student trains even if the user called
      ``model.eval()`` before fit;
    - checkpoints: ``load_from_checkpoint`` never unpickles (``weights_only=True``, always);
      ``on_save_checkpoint`` records the teacher's fingerprint and ``on_load_checkpoint`` refuses a
      teacher whose weights differ from it; loaded without a teacher, a distilled student is
      :attr:`student_only` (inference).
    """

    _teacher_fingerprint: str | None = None
    _recorded_fingerprint: str | None = None  # taken before the teacher was sharded: its shards alone do not give it
    _eval_mode_guard: warnings.catch_warnings | None = None
    #: True once ``on_load_checkpoint`` loaded the checkpoint of a student trained with a teacher (or its stored
    #: outputs) into a module without one: the student serves inference (``forward``, predict, validate, test),
    #: and fit refuses, since it would go on training without the soft term.
    student_only: bool = False

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> Any:
        super().train(mode)  # type: ignore[misc]
        if self.teacher is not None:  # type: ignore[attr-defined]
            self.teacher.eval()  # type: ignore[attr-defined]  # `model.train()` must never turn the teacher's dropout/BatchNorm on
        return self

    def on_fit_start(self) -> None:
        self.check_can_train()
        # A user's `model.eval()` before fit must not freeze the student for the whole run. A student
        # that is itself in train mode keeps the modes its user chose for its submodules.
        if not self.student.training:  # type: ignore[attr-defined]
            self.student.train()  # type: ignore[attr-defined]
        teacher = self.teacher  # type: ignore[attr-defined]
        self.training = True  # the root, and every other child (losses, adapters, metrics), without recursing into the teacher
        for child in self.children():  # type: ignore[attr-defined]
            if child is not teacher and child is not self.student:  # type: ignore[attr-defined]
                child.train()
        if teacher is None:
            return
        teacher.eval()
        self._teacher_fingerprint = None
        # Lightning warns about modules in eval mode at the start of training; the frozen teacher's
        # are expected. Silence exactly that count, so a student left in eval mode still warns.
        count = sum(1 for _ in teacher.modules())
        self._eval_mode_guard = warnings.catch_warnings()
        self._eval_mode_guard.__enter__()  # left in `on_train_start`, right after Lightning's check
        warnings.filterwarnings("ignore", message=rf"Found {count} module\(s\) in eval mode")

    def on_train_start(self) -> None:
        if self._eval_mode_guard is not None:
            self._eval_mode_guard.__exit__(None, None, None)
            self._eval_mode_guard = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Re-asserted every step: validation loops, user callbacks or `model.train()` may flip modes.
        teacher = self.teacher  # type: ignore[attr-defined]
        if teacher is not None and teacher.training:
            teacher.eval()
        if not self.student.training:  # type: ignore[attr-defined]
            self.student.train()  # type: ignore[attr-defined]

    def check_can_train(self) -> None:
        """Refuse to train a student loaded for inference without the teacher it was distilled from.

        Raises:
            RuntimeError: if :attr:`student_only`, saying what to pass instead.
        """
        if self.student_only:
            raise RuntimeError(
                f"This {type(self).__name__} was loaded from the checkpoint of a distilled student without its teacher "
                "(`teacher=None`): it serves inference only (forward, predict, validate, test). Training it would go on "
                "without the soft term. To go on distilling, pass the teacher: `load_from_checkpoint(path, "
                "teacher=<its architecture>, student=...)` (or `soft_targets=<the store>` for a store-trained student)."
            )

    # ------------------------------------------------------------------ checkpoints
    def record_teacher_fingerprint(self) -> None:
        """Take the teacher's fingerprint now and keep it: call it before the teacher is sharded (FSDP2), whose
        shards alone cannot be fingerprinted on one rank. The teacher is frozen, so the fingerprint stays true."""
        self._recorded_fingerprint = None if self.teacher is None else fingerprint(self.teacher)  # type: ignore[attr-defined]

    def teacher_fingerprint(self) -> str | None:
        """SHA-256 of the teacher's parameters and buffers (cached during a fit: the teacher is frozen)."""
        teacher = self.teacher  # type: ignore[attr-defined]
        if teacher is None:
            return None
        if self._recorded_fingerprint is not None:
            return self._recorded_fingerprint
        trainer = attached_trainer(self)
        fitting = trainer is not None and trainer.training
        if self._teacher_fingerprint is None or not fitting:
            self._teacher_fingerprint = fingerprint(teacher)
        return self._teacher_fingerprint

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | os.PathLike[str] | IO[bytes],
        map_location: Any = None,
        hparams_file: str | os.PathLike[str] | None = None,
        strict: bool | None = None,
        weights_only: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Lightning's ``load_from_checkpoint``, always with ``weights_only=True``: nothing is unpickled.

        Pass the ``teacher`` and ``student`` architectures (and the ``soft_loss``, ``features`` and
        other objects the module was built with) as keyword arguments. The teacher's weights come from
        the ``teacher_checkpoint`` recorded in the checkpoint if that file still exists, else from the
        teacher given; either way their fingerprint must match the one the checkpoint recorded.

        For inference, ``student=`` alone is enough: without a teacher (``teacher`` defaults to None
        here), the checkpoint of a distilled student loads its student weights only (teacher weights,
        FitNet adapters and the objective's objects are not needed) and the module is
        :attr:`student_only`: ``forward``, predict, validate and test use the student; fit refuses.

        Raises:
            TypeError: without ``student=``: a checkpoint holds the student's weights, not its code.
            ValueError: for ``weights_only=False``.
            FileNotFoundError: if ``checkpoint_path`` does not exist.
            CheckpointError: for an empty, truncated or non-torch file, or one holding pickled objects.
            RuntimeError: if the teacher does not match the checkpoint's fingerprint (or runs in another dtype).
            ValueError: if ``soft_loss``, ``hard_loss`` or ``features`` differ from those the checkpoint was trained with.
        """
        if weights_only is not True:
            raise ValueError(
                f"Expected `weights_only=True`, but got {weights_only!r}: lightning-kd never unpickles a checkpoint "
                "(a pickled payload runs code). Checkpoints written by lightning-kd load with weights_only=True."
            )
        if "student" not in kwargs:
            raise TypeError(
                f"{cls.__name__}.load_from_checkpoint needs the student's architecture: pass `student=` (e.g. "
                "`student=get_model('mlp')`); the checkpoint holds its weights, not its code."
            )
        kwargs.setdefault("teacher", None)  # the student alone, for inference (see `student_only`)
        token = LOADING_CHECKPOINT.set(True)
        try:
            return super().load_from_checkpoint(  # type: ignore[misc]
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
            LOADING_CHECKPOINT.reset(token)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["teacher_fingerprint"] = self.teacher_fingerprint()
        # Whether the student learns from a teacher (online, or its stored outputs): loaded without one, it is
        # `student_only`. A recorded key, since Lightning overwrites the saved hyperparameters with the load's arguments.
        teacher, store = self.teacher, getattr(self, "soft_targets", None)  # type: ignore[attr-defined]
        checkpoint["distilled"] = teacher is not None or store is not None or self.student_only
        if self.teacher is not None:  # type: ignore[attr-defined]
            checkpoint["teacher_dtypes"] = _float_dtypes(self.teacher)  # type: ignore[attr-defined]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = checkpoint.get("teacher_fingerprint")
        teacher = self.teacher  # type: ignore[attr-defined]
        distilled = checkpoint.get("distilled", expected is not None)  # (older checkpoints: a teacher's fingerprint)
        if teacher is None and getattr(self, "soft_targets", None) is None and distilled:
            self.student_only = True
            # Only the student's weights matter for inference: the teacher's (keep_teacher_in_checkpoint), FitNet's
            # adapters or a learned temperature are dropped; a student key that does not fit still fails loudly.
            own = set(self.state_dict())  # type: ignore[attr-defined]
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in own or k.startswith("student.")}
            return
        has_teacher_keys = any(k.startswith("teacher.") for k in checkpoint.get("state_dict", {}))
        if expected is None or teacher is None or has_teacher_keys:
            return
        actual = self._recorded_fingerprint or fingerprint(teacher)
        if actual == expected:
            return
        saved_dtypes, dtypes = checkpoint.get("teacher_dtypes"), _float_dtypes(teacher)
        if saved_dtypes is not None and saved_dtypes != dtypes:
            raise RuntimeError(
                f"The teacher given to this module runs in {', '.join(dtypes)}, but the checkpoint was trained with it in "
                f"{', '.join(saved_dtypes)} (the fingerprint covers dtypes). Give the same `speed=Speed(teacher_dtype=...)` "
                "as the run that wrote the checkpoint."
            )
        raise RuntimeError(
            "The teacher given to this module is not the one the checkpoint was trained with (its weights "
            f"fingerprint differs: expected {expected[:12]}, got {actual[:12]}). Pass the trained teacher (e.g. "
            "`teacher=load_weights(arch, 'teacher.ckpt')`), set `teacher_checkpoint`, or save checkpoints with "
            "`keep_teacher_in_checkpoint=True`."
        )


def _float_dtypes(model: nn.Module) -> list[str]:
    """The floating dtypes of a model's state dict, sorted (``["torch.bfloat16"]``)."""
    return sorted({str(t.dtype) for t in model.state_dict().values() if t.is_floating_point()})


def attached_trainer(module: Any) -> Any:
    """The module's Trainer, or None when it is not attached to one (a user calling a hook by hand)."""
    try:
        return module.trainer
    except RuntimeError:  # Lightning: "... is not attached to a `Trainer`"
        return None
