"""CausalLMDistillation: the DistillationModule for causal language models (token-level KD)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_kd import batch as batch_utils
from lightning_kd._checks import check_number
from lightning_kd.losses import IGNORE_INDEX, KDLoss, LogitLoss
from lightning_kd.losses.fused import _resolve_loss, fused_linear_distillation_loss
from lightning_kd.hygiene import attached_trainer
from lightning_kd.module import DistillationModule
from lightning_kd.on_policy import OnPolicy
from lightning_kd.teachers import TeacherEnsemble, Teachers, call_model, cast_inputs

OutputLayer = tuple[Tensor, Tensor, Tensor | None]  # final hidden states (B, S, H), output weight (V, H), bias (V,) or None


class CausalLMDistillation(DistillationModule):
    r"""Token-level distillation of a causal language model: :class:`DistillationModule` with the causal shift.

    .. math::
        \mathcal{L} = \alpha \, \frac{1}{|M|} \sum_{(b, i) \in M} D\big(p^t_{b,i} \,\|\, p^s_{b,i}\big)
            + (1 - \alpha) \, \frac{1}{|M|} \sum_{(b, i) \in M} -\log p^s_{b,i}(y_{b,i+1})

    where position :math:`i` predicts token :math:`i + 1` and :math:`M` holds the valid positions of the
    **global** batch (every micro-batch of a gradient-accumulation window, on every rank): padding, prompt
    tokens (labels ``-100``) and the last position never count. :math:`D` is the soft loss: forward KL
    (:class:`~lightning_kd.losses.KDLoss`) at ``temperature`` by default; ``ReverseKLLoss``, ``JSDLoss(beta)``
    or ``SkewKLLoss`` take its place.

    Batches are Hugging Face-style dicts: ``input_ids`` and optionally ``attention_mask`` (any other key
    too) go to both models as keyword arguments; ``labels`` (unshifted, ``-100`` where no loss is wanted)
    are optional, the ``input_ids`` are the labels without them. Models return logits ``(B, S, V)``: a
    tensor, a tuple starting with them, or an object with ``.logits`` (``transformers`` models). The shift
    is done once, on the labels (:func:`~lightning_kd.batch.causal_lm_targets`); the logits are never sliced.

    Metrics, per valid token: ``val/ce`` and ``val/bits_per_token`` of the student and (``val/teacher_ce``,
    ``val/teacher_bits_per_token``) of the teacher, ``val/acc`` (next-token accuracy), ``val/agreement``
    (top-1 agreement with the teacher) and ``val/kl`` (forward KL at T=1).

    Vocabularies: if the two models' logits differ in size, they must share a prefix (one tokenizer, one
    model's embedding padded, e.g. to a multiple of 64): pass ``vocab_size`` (the tokenizer's size) and
    both are compared on their first ``vocab_size`` classes: the extra classes are removed before every
    softmax, loss and metric, as if the models had never had them. Without ``vocab_size`` a size difference
    is an error naming both sizes.

    Args:
        teacher: the frozen teacher (or several, or None for the from-scratch baseline).
        student: the model to train.
        temperature: of the default soft loss (forward KL), default 1.0; with ``soft_loss``, None or the
            loss's own temperature (a different one is refused).
        alpha: weight of the soft term in [0, 1].
        soft_loss: a :class:`~lightning_kd.losses.LogitLoss`; default ``KDLoss(temperature)``.
        vocab_size: the number of classes both vocabularies share (see above), or None.
        fused_chunk_size: None: the models return logits and the losses see them whole. An integer: training
            steps never materialise the ``(B·S, V)`` logits: :func:`~lightning_kd.losses.fused_linear_distillation_loss`
            computes the soft and hard terms from the final hidden states and output layers (:meth:`student_hidden`,
            :meth:`teacher_hidden`), this many valid tokens at a time, with the same value and gradients. Needs a
            ``KDLoss``, ``ReverseKLLoss``, ``JSDLoss`` or ``SkewKLLoss`` with a fixed temperature and one teacher or
            none; the per-step training agreement is then not logged (validation still computes every metric).
        on_policy: on-policy distillation (GKD, Agarwal et al., ICLR 2024): an :class:`~lightning_kd.OnPolicy`
            whose ``probability`` (GKD's λ) is the chance that a training batch is replaced by the student's own
            continuations of its prompts; the teacher scores them and the loss covers the generated tokens only.
            On such a batch the loss is ``soft_weight * soft`` (no cross-entropy: its labels would be the
            student's own samples). Its settings (``on_policy.probability``, ``on_policy.max_new_tokens``) and
            the soft loss's (``soft_loss.beta``) can be annealed by :class:`~lightning_kd.DistillationAnnealing`.
            The divergence runs at the soft loss's temperature (GKD: ``JSDLoss(beta)`` at 1); ``OnPolicy``'s own
            temperature is the sampling temperature. ``train/on_policy`` logs 1 for a generated batch.
        **kwargs: every other :class:`DistillationModule` argument (``hard_loss``, ``features``,
            ``optimizer``, ``lr_scheduler``, ``soft_targets``, ``speed``, ...).

    Raises:
        ValueError: for a ``temperature`` that contradicts ``soft_loss``'s, a ``vocab_size`` that is not an
            integer > 0, and (at run time) vocabularies of different sizes without ``vocab_size``.

    Example::

        >>> import torch
        >>> teacher, student = torch.nn.Embedding(8, 8), torch.nn.Embedding(8, 8)  # any models returning (B, S, V) logits
        >>> module = CausalLMDistillation(teacher, student, temperature=1.0, alpha=0.5)
        >>> inputs, targets = module.unpack_batch({"input_ids": torch.tensor([[5, 6, 7, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])})
        >>> targets.tolist()
        [[6, 7, -100, -100]]
    """

    def __init__(
        self,
        teacher: Teachers | None,
        student: nn.Module,
        *,
        temperature: float | None = None,
        alpha: float = 0.5,
        soft_loss: LogitLoss | None = None,
        vocab_size: int | None = None,
        fused_chunk_size: int | None = None,
        on_policy: OnPolicy | None = None,
        **kwargs: Any,
    ) -> None:
        if temperature is not None:
            check_number(temperature, "temperature")
        if soft_loss is None:
            soft_loss = KDLoss(temperature=1.0 if temperature is None else temperature)
        elif temperature is not None and isinstance(soft_loss, LogitLoss) and (
            soft_loss.learned or not soft_loss.uses_temperature or float(soft_loss.temperature) != float(temperature)
        ):
            raise ValueError(
                f"Got `temperature={temperature}` and `soft_loss={type(soft_loss).__name__}` with its own temperature "
                f"({'learned' if soft_loss.learned else getattr(soft_loss, 'temperature', None)}): give the temperature to "
                "the loss only, or leave `soft_loss` at its default."
            )
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
            raise ValueError(f"Expected `vocab_size` to be an integer > 0 or None, but got {vocab_size!r}.")
        if fused_chunk_size is not None and (isinstance(fused_chunk_size, bool) or not isinstance(fused_chunk_size, int) or fused_chunk_size < 1):
            raise ValueError(f"Expected `fused_chunk_size` to be an integer >= 1 or None, but got {fused_chunk_size!r}.")
        super().__init__(teacher, student, soft_loss=soft_loss, alpha=alpha, **kwargs)
        self.vocab_size = vocab_size
        self.fused_chunk_size = fused_chunk_size
        if fused_chunk_size is not None:
            self._check_fusable()
        if on_policy is not None:
            if not isinstance(on_policy, OnPolicy):
                raise TypeError(f"Expected `on_policy` to be a lightning_kd.OnPolicy or None, but got {type(on_policy).__name__}.")
            if self.teacher is None:
                raise ValueError("`on_policy` needs a teacher to score the student's continuations, but `teacher` is None.")
            if self.soft_targets is not None:
                raise ValueError("`on_policy` needs the teacher online: stored teacher outputs are for the dataset's tokens, not generated ones.")
            if self.augmentation is not None:
                raise ValueError("`on_policy` does not apply an `augmentation`; leave one of them unset.")
        self.on_policy = on_policy
        self.hparams.update({"vocab_size": vocab_size, "fused_chunk_size": fused_chunk_size})

    def _check_fusable(self) -> None:
        _resolve_loss(self.soft_loss, 1.0)  # a loss the fused pass cannot compute is refused now, naming the allowed ones
        if self.soft_targets is not None:
            raise ValueError("`fused_chunk_size` needs the teacher's hidden states, but the teacher's outputs come from `soft_targets`.")
        if isinstance(self.teacher, TeacherEnsemble):
            raise ValueError("`fused_chunk_size` fuses one teacher's output layer; several teachers need their logits (leave it None).")
        if self.augmentation is not None:
            raise ValueError("`fused_chunk_size` does not apply an `augmentation`; leave one of them unset.")

    # ------------------------------------------------------------------ hooks of the fused loss
    def student_hidden(self, inputs: Any) -> OutputLayer:
        """The student's final hidden states and output layer, for ``fused_chunk_size`` (see :func:`final_hidden`)."""
        return final_hidden(self.student, inputs, "student")

    def teacher_hidden(self, inputs: Any) -> OutputLayer:
        """The teacher's final hidden states and output layer, without autograd, in the teacher's own dtype."""
        inputs = cast_inputs(inputs, self.teacher)
        with torch.no_grad(), self._teacher_precision():
            return final_hidden(self.teacher, inputs, "teacher")

    def _generate(self, batch: Any) -> tuple[Any, Tensor, bool]:
        """The batch's ``(inputs, targets)``, replaced by the student's continuations on an on-policy step."""
        inputs, targets = self.unpack_batch(batch_utils.split_indexed(batch)[0])
        if self.on_policy is None:
            return inputs, targets, False
        # one draw per micro-batch, restored on resume (the global step repeats within an accumulation window)
        trainer = attached_trainer(self)
        step = trainer.fit_loop.epoch_loop.total_batch_idx if trainer is not None else self.global_step
        inputs, targets, generated = self.on_policy(self.student, inputs, targets, step=step)
        if generated and self.vocab_size is not None:
            ids = inputs["input_ids"]
            if bool((ids >= self.vocab_size).any()):  # one host read, on generated steps only
                raise ValueError(
                    f"The student generated token ids >= vocab_size={self.vocab_size}, which the teacher's shared vocabulary "
                    "does not have: on-policy distillation needs both models to cover what the student samples."
                )
        if trainer is not None:
            self.log("train/on_policy", float(generated), on_step=True, on_epoch=False, batch_size=batch_utils.batch_size(inputs))
        return inputs, targets, generated

    def _on_policy_loss(self, losses: dict[str, Tensor], generated: bool) -> dict[str, Tensor]:
        if generated:  # the divergence alone: the labels of a generated batch are the student's own samples
            losses["loss"] = self.soft_weight * losses["soft"]
        return losses

    @override
    def _training_losses(self, batch: Any, where: str) -> tuple[dict[str, Tensor], Any, Tensor | None, Tensor | None, Tensor | None, Any]:
        inputs, targets, generated = self._generate(batch)
        if self.fused_chunk_size is None:
            inputs, targets, student_out, teacher_out = self._forward(batch, where, training=True, unpacked=(inputs, targets))
            mask = batch_utils.valid_positions(inputs, targets, student_out)
            losses = self.distillation_loss(student_out, teacher_out, targets, mask=mask)
            return self._on_policy_loss(losses, generated), inputs, targets, mask, student_out, teacher_out
        mask = targets != IGNORE_INDEX
        h_s, w_s, b_s = self.student_hidden(inputs)
        h_t = w_t = b_t = None
        if self.teacher is not None:
            h_t, w_t, b_t = self.teacher_hidden(inputs)
            self._guard.check_teacher(h_t, where)
        w_s, b_s, w_t, b_t = self._shared_output_layers(w_s, b_s, w_t, b_t)
        self._guard.check_targets(targets, w_s.shape[0], where)
        if self.teacher is None:
            soft_weight, hard_weight = 0.0, 1.0
        elif generated:  # the divergence alone, as on the materialised path
            soft_weight, hard_weight = self.soft_weight, 0.0
        else:
            soft_weight, hard_weight = self.soft_weight * self.alpha, 1.0 - self.alpha
        loss, soft, hard = fused_linear_distillation_loss(
            h_s, w_s, h_t, w_t, targets, loss=self.soft_loss, mask=mask, chunk_size=self.fused_chunk_size,
            soft_weight=soft_weight, hard_weight=hard_weight, student_bias=b_s, teacher_bias=b_t,
        )
        return {"loss": loss, "soft": soft, "hard": hard}, inputs, targets, mask, None, None

    def _shared_output_layers(self, w_s: Tensor, b_s: Tensor | None, w_t: Tensor | None, b_t: Tensor | None) -> tuple[Tensor, ...]:
        """The output layers' rows of the shared vocabulary (the same rule as for logits)."""
        self.check_vocabularies(w_s.shape[0], None if w_t is None else w_t.shape[0])
        if self.vocab_size is None:
            return w_s, b_s, w_t, b_t
        v = self.vocab_size
        return w_s[:v], None if b_s is None else b_s[:v], None if w_t is None else w_t[:v], None if b_t is None else b_t[:v]

    @override
    def unpack_batch(self, batch: Any) -> tuple[Any, Tensor | None]:
        """``(inputs, next-token targets)``: the default unpacking, then the causal shift of the labels."""
        inputs, labels = super().unpack_batch(batch)
        return inputs, batch_utils.causal_lm_targets(inputs, labels)


def final_hidden(model: nn.Module, inputs: Any, role: str = "model") -> OutputLayer:
    """``(hidden states (B, S, H), output weight (V, H), output bias or None)`` of a causal LM, without its logits.

    The Hugging Face layout, which the zoo's GPT follows too: ``model.base_model`` returns the final hidden
    states (a tensor, an output with ``.last_hidden_state``, or a tuple starting with them) and
    ``model.get_output_embeddings()`` is the output ``nn.Linear`` (tied to the input embedding or not).
    Override :meth:`CausalLMDistillation.student_hidden` / ``teacher_hidden`` for any other layout.

    Raises:
        TypeError: for a model without that layout.
    """
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if not isinstance(base, nn.Module) or base is model or not isinstance(head, nn.Linear):
        raise TypeError(
            f"`fused_chunk_size` needs the {role}'s final hidden states and output layer: a `base_model` that returns the "
            "hidden states and `get_output_embeddings()` returning an nn.Linear (Hugging Face causal LMs and the zoo's GPT "
            f"have both), but {type(model).__name__} has not. Override `{role}_hidden(inputs) -> (hidden, weight, bias)`."
        )
    out = call_model(base, inputs)
    hidden = out if isinstance(out, Tensor) else getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        hidden = out[0]
    if not isinstance(hidden, Tensor):
        raise TypeError(f"The {role}'s `base_model` returned {type(out).__name__}, not hidden states; override `{role}_hidden`.")
    return hidden, head.weight, head.bias
