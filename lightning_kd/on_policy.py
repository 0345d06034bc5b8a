"""On-policy distillation (GKD): a batch transform that replaces a batch's continuations by the student's own."""

from __future__ import annotations

import inspect
import math
import numbers
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_kd._checks import check_number
from lightning_kd.losses import IGNORE_INDEX

__all__ = ["OnPolicy"]

# What our GPT's `generate` takes (lightning_kd.models.gpt.GPT.generate): a student with these is called the same way.
_OUR_GENERATE = frozenset({"input_ids", "attention_mask", "max_new_tokens", "temperature", "top_p", "eos_token_id", "generator"})
_KEYS = ("input_ids", "attention_mask")  # what a generated batch has; any other input key could not follow it


class OnPolicy:
    r"""On-policy distillation (Agarwal et al., "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes", ICLR 2024: GKD): with probability :math:`\lambda` per step, the student's own
    continuations of the batch's prompts replace the dataset's.

    GKD minimises, over prompts :math:`x` and continuations :math:`y`,

    .. math::
        \mathcal{L}(\theta) = (1 - \lambda)\, \mathbb{E}_{(x, y) \sim \mathcal{D}}\big[D(x, y)\big]
            + \lambda\, \mathbb{E}_{x \sim \mathcal{D}}\, \mathbb{E}_{y \sim p_S^{\tau}(\cdot \mid x)}\big[D(x, y)\big],
        \qquad D(x, y) = \sum_{n} D_{\mathrm{JSD}(\beta)}\big(p_T(\cdot \mid x, y_{<n}) \,\|\, p_S^\theta(\cdot \mid x, y_{<n})\big)

    where :math:`p_S^{\tau}` samples the student at temperature :math:`\tau` (and nucleus ``top_p``), without a
    gradient through the sampling. This object draws the mixture: at each step, with probability
    ``probability`` (:math:`\lambda`) it returns a batch of the student's samples, else the batch unchanged. The
    module then runs both models on whatever it returns, so the teacher scores the student's samples, and the
    soft loss covers the positions whose next token was **generated**, up to and including each sequence's first
    ``eos_token_id``: never the prompt, the padding or what follows the EOS. :math:`\beta` is the soft loss's own
    (``JSDLoss(beta=...)``, annealed as ``soft_loss.beta``); GKD's divergence is at temperature 1, its
    :math:`\tau` is only the sampling temperature. On a generated batch the labels are the student's own
    samples: the hard (cross-entropy) term has nothing to teach there.

    **Prompts.** A sequence's prompt is its tokens up to the position of its first valid target (the targets'
    ``-100`` prefix: the labels of the prompt are ``-100``); a sequence with no valid target is all prompt. A
    sequence whose first token already has a valid target carries no prompt marking: its prompt is then its
    first ``prompt_length`` real tokens (a one-token prompt cannot be told from no prompt: pass
    ``prompt_length=1`` for those). Prompts may be padded on either side; they are generated from left-padded.

    **The generated batch.** ``input_ids`` ``(B, P + N)``: the prompts left-padded to the longest, ``P``, then
    ``N <= max_new_tokens`` generated tokens (fewer when every sequence ended early), ``pad_token_id`` after each
    sequence's first EOS; ``attention_mask`` 0 on that padding, 1 elsewhere (the EOS included). Targets
    ``(B, P + N)``: position ``i`` has target ``input_ids[:, i + 1]`` where that token was generated and is not
    after the first EOS, ``-100`` elsewhere: the causal shift of labels that are ``-100`` on the prompts.

    **Randomness.** Whether step ``s`` is on-policy is a pure function of ``(seed, s)``: a resumed run repeats
    the draws of an uninterrupted one, every rank of a distributed run draws alike, and raising ``probability``
    only adds on-policy steps (the draw is ``u(seed, s) < probability``). The sampling's random generator is
    seeded from ``(seed, s)`` and the process's rank; no global random state is touched.

    **Generation.** Without gradient, the student in eval mode (each submodule's mode is restored after), with
    its key/value cache: through :meth:`GPT.generate <lightning_kd.models.GPT.generate>` for the zoo's GPT (or any
    ``generate`` with its signature), and Hugging Face's ``generate`` for a ``transformers`` model.

    Every setting is an attribute, validated on every assignment: ``DistillationAnnealing`` can anneal
    ``on_policy.probability`` (GKD's :math:`\lambda`) and ``on_policy.max_new_tokens`` (a float from a schedule is
    rounded to the nearest integer).

    Args:
        probability: :math:`\lambda`, the probability that a step's batch is replaced, in [0, 1].
        max_new_tokens: the most tokens generated per sequence, an integer >= 1.
        temperature: the sampling temperature, >= 0; 0 is greedy decoding.
        top_p: nucleus sampling: the smallest set of most likely tokens whose probability reaches it, in (0, 1].
        prompt_length: the prompt of a sequence without prompt marking: its first this many real tokens; None:
            such a sequence is an error.
        eos_token_id: the token that ends a sequence (counted, then nothing after it); None: sequences end at
            ``max_new_tokens`` only.
        pad_token_id: the token of the padding (prompts' and after an EOS), an integer >= 0.
        seed: the draws' and the sampling's seed, an integer >= 0.

    Raises:
        TypeError: for a setting of the wrong type (a string, a bool, a float where an integer is needed); when
            called, for inputs that are not a dict with ``input_ids``, or a student without ``generate``.
        ValueError: for a setting outside the values above (naming them); when called, for inputs with keys other
            than ``input_ids`` and ``attention_mask``, shapes that disagree, a sequence without a real token, or
            sequences without a prompt marking when ``prompt_length`` is None.

    Example::

        >>> from lightning_kd.models import get_model
        >>> student = get_model("gpt", vocab_size=16, block_size=16, n_layer=1, n_head=2, n_embd=16)
        >>> on_policy = OnPolicy(1.0, max_new_tokens=4, temperature=0.0)
        >>> inputs = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.tensor([[1, 1, 1, 1]])}
        >>> targets = torch.tensor([[-100, 7, 8, -100]])  # the labels of the prompt [5, 6] are -100
        >>> new_inputs, new_targets, generated = on_policy(student, inputs, targets, step=0)
        >>> generated, new_inputs["input_ids"][0, :2].tolist(), new_targets[0].ne(-100).tolist()
        (True, [5, 6], [False, True, True, True, True, False])
    """

    def __init__(
        self,
        probability: float = 0.5,
        *,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        prompt_length: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        seed: int = 0,
    ) -> None:
        self.probability = probability
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.prompt_length = prompt_length
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.seed = seed

    # ------------------------------------------------------------------ settings, validated on every assignment
    @property
    def probability(self) -> float:
        return self._probability

    @probability.setter
    def probability(self, value: float) -> None:
        self._probability = _in_range(value, "probability", "in [0, 1]", lambda v: 0.0 <= v <= 1.0)

    @property
    def max_new_tokens(self) -> int:
        return self._max_new_tokens

    @max_new_tokens.setter
    def max_new_tokens(self, value: int) -> None:
        number = _in_range(value, "max_new_tokens", "an integer >= 1", lambda v: v >= 1 and math.isfinite(v))
        self._max_new_tokens = math.floor(number + 0.5)  # a schedule's float: the nearest integer

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = _in_range(value, "temperature", ">= 0 (0 is greedy)", lambda v: 0.0 <= v < math.inf)

    @property
    def top_p(self) -> float:
        return self._top_p

    @top_p.setter
    def top_p(self, value: float) -> None:
        self._top_p = _in_range(value, "top_p", "in (0, 1]", lambda v: 0.0 < v <= 1.0)

    @property
    def prompt_length(self) -> int | None:
        return self._prompt_length

    @prompt_length.setter
    def prompt_length(self, value: int | None) -> None:
        self._prompt_length = None if value is None else _integer(value, "prompt_length", 1, " or None")

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @eos_token_id.setter
    def eos_token_id(self, value: int | None) -> None:
        self._eos_token_id = None if value is None else _integer(value, "eos_token_id", 0, " or None")

    @property
    def pad_token_id(self) -> int:
        return self._pad_token_id

    @pad_token_id.setter
    def pad_token_id(self, value: int) -> None:
        self._pad_token_id = _integer(value, "pad_token_id", 0)

    @property
    def seed(self) -> int:
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._seed = _integer(value, "seed", 0)

    def __repr__(self) -> str:
        names = ("max_new_tokens", "temperature", "top_p", "prompt_length", "eos_token_id", "pad_token_id", "seed")
        return f"{type(self).__name__}({self.probability}, " + ", ".join(f"{n}={getattr(self, n)!r}" for n in names) + ")"

    # ------------------------------------------------------------------ randomness: pure functions of (seed, step)
    def draw(self, step: int) -> bool:
        """Whether step ``step``'s batch is replaced: ``u(seed, step) < probability`` with ``u`` uniform in [0, 1)."""
        return _uniform(self._states(step)[0]) < self.probability

    def _states(self, step: int, rank: int = 0) -> np.ndarray:
        step = _integer(step, "step", 0)
        # SeedSequence hashes its entropy: nearby (seed, step) pairs give independent streams
        return np.random.SeedSequence((self.seed, step, rank)).generate_state(2, dtype=np.uint64)

    def _generation_seed(self, step: int) -> int:
        # the draw is the same on every rank (all generate or none); the samples are not
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        return int(self._states(step, rank)[1] >> np.uint64(1))  # < 2**63: any generator accepts it

    # ------------------------------------------------------------------ the transform
    def __call__(self, student: nn.Module, inputs: dict[str, Tensor], targets: Tensor, *, step: int) -> tuple[dict[str, Tensor], Tensor, bool]:
        """``(inputs, targets, generated)``: the student's continuations with probability ``probability``, else the batch.

        Args:
            student: the model that generates (its modes are restored, its parameters get no gradient).
            inputs: ``{"input_ids": (B, S), "attention_mask": (B, S) optional}``.
            targets: ``(B, S)`` causally shifted next-token targets, ``-100`` where none (CausalLMDistillation's
                ``unpack_batch``).
            step: the training step (``global_step``); the draw and the sampling depend on it. With gradient
                accumulation every micro-batch of a window then draws alike (one draw per optimizer
                step); pass a micro-batch counter instead for one draw per micro-batch.

        Returns:
            ``(inputs, targets, False)`` unchanged, or ``(new_inputs, new_targets, True)`` (see the class).
        """
        ids, attention = _check_batch(inputs, targets)
        if not self.draw(step):
            return inputs, targets, False
        prompt_ids, prompt_mask = self.prompts(inputs, targets)
        new_tokens = self._generate(student, prompt_ids, prompt_mask, self._generation_seed(step))  # (B, N)
        counted = _before_first_eos(new_tokens, self.eos_token_id)  # (B, N): generated, up to and including the EOS
        sequences = torch.cat([prompt_ids, new_tokens.masked_fill(~counted, self.pad_token_id)], dim=1)  # (B, P + N)
        mask = torch.cat([prompt_mask, counted], dim=1)
        generated = torch.cat([torch.zeros_like(prompt_mask), counted], dim=1)
        new_targets = torch.full_like(sequences, IGNORE_INDEX)
        new_targets[:, :-1] = sequences[:, 1:].masked_fill(~generated[:, 1:], IGNORE_INDEX)  # the causal shift
        dtype = attention.dtype if attention is not None else torch.long
        return {"input_ids": sequences.to(ids.dtype), "attention_mask": mask.to(dtype)}, new_targets, True

    def prompts(self, inputs: dict[str, Tensor], targets: Tensor) -> tuple[Tensor, Tensor]:
        """The batch's prompts, left-padded: ``(input_ids (B, P), attention_mask (B, P) bool)``, ``P`` the longest.

        Raises:
            ValueError: for a sequence without a real token, or sequences without a prompt marking when
                ``prompt_length`` is None.
        """
        ids, attention = _check_batch(inputs, targets)
        length = ids.shape[1]
        real = torch.ones_like(ids, dtype=torch.bool) if attention is None else attention != 0
        empty = ~real.any(dim=1)
        if empty.any():
            raise ValueError(f"Expected every sequence to hold a real token to prompt with, but rows {_rows(empty)} are all padding.")
        valid = targets != IGNORE_INDEX
        positions = torch.arange(length, device=ids.device)
        first_real = real.int().argmax(dim=1)  # argmax of a bool row: its first True
        # the prompt ends at the position that predicts the first counted token; no counted token: all prompt
        end = torch.where(valid.any(dim=1), valid.int().argmax(dim=1), length - 1)
        keep = real & (positions <= end[:, None])
        unmarked = valid.any(dim=1) & (end <= first_real)  # the first real token already has a target
        if unmarked.any():
            if self.prompt_length is None:
                raise ValueError(
                    f"Expected a prompt in every sequence: labels of -100 on its prompt tokens, or `prompt_length` for "
                    f"sequences without them, but rows {_rows(unmarked)} have a target from their first token on and "
                    "`prompt_length` is None. Set the prompts' labels to -100 in the collate function, or pass "
                    "`prompt_length=` (the first real tokens are then the prompt)."
                )
            first_tokens = real & (real.long().cumsum(dim=1) <= self.prompt_length)
            keep = torch.where(unmarked[:, None], first_tokens, keep)
        width = int(keep.sum(dim=1).max())
        # a stable sort of keep moves each row's prompt tokens, in order, to its end: left padding
        order = torch.sort(keep.int(), dim=1, stable=True).indices[:, length - width :]
        prompt_mask = keep.gather(1, order)
        return ids.gather(1, order).masked_fill(~prompt_mask, self.pad_token_id), prompt_mask

    def _generate(self, student: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, seed: int) -> Tensor:
        """The new tokens ``(B, N)``, ``N <= max_new_tokens``, of ``student`` after the left-padded prompts."""
        model = getattr(student, "_orig_mod", student)  # a torch.compile'd student: generate with the eager module
        transformers = sys.modules.get("transformers")  # a Hugging Face model was built by an imported transformers
        hugging_face = transformers is not None and isinstance(model, transformers.GenerationMixin)
        parameters = _parameters(getattr(model, "generate", None))
        if not hugging_face and not _OUR_GENERATE <= parameters.keys():
            raise TypeError(
                f"Expected a student with a `generate` method (a Hugging Face model, or one with the signature of "
                f"lightning_kd's GPT: {', '.join(sorted(_OUR_GENERATE))}), but {type(model).__name__} has none. Give it "
                "one, or do not pass `on_policy`."
            )
        modes = [(module, module.training) for module in model.modules()]
        model.eval()  # no dropout while sampling
        try:
            with torch.no_grad():  # not inference_mode: the tokens become the next forward's inputs, under autograd
                if hugging_face:
                    out = self._hugging_face_generate(model, prompt_ids, prompt_mask, seed)
                else:
                    generator = torch.Generator(device=prompt_ids.device).manual_seed(seed)
                    extra = {"pad_token_id": self.pad_token_id} if "pad_token_id" in parameters else {}
                    out = model.generate(
                        prompt_ids, prompt_mask.long(), max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                        top_p=self.top_p, eos_token_id=self.eos_token_id, generator=generator, **extra,
                    )
        finally:
            for module, mode in modes:  # each submodule's own mode (a frozen BatchNorm stays in eval)
                module.training = mode
        sequences = out[0] if isinstance(out, tuple) else getattr(out, "sequences", out)
        if not isinstance(sequences, Tensor) or sequences.dim() != 2 or sequences.shape[0] != prompt_ids.shape[0]:
            raise TypeError(f"Expected `generate` to return sequences (B, P + N), but got {type(out).__name__}.")
        return sequences[:, prompt_ids.shape[1] :]

    def _hugging_face_generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, seed: int) -> Any:
        sample = self.temperature > 0
        # Sampling flags only when sampling (greedy would warn about them); top_k=0 because Hugging Face's default
        # top_k=50 would truncate the student's distribution. The others override a checkpoint's generation config
        # (beams, repetition penalties) that would make the samples something other than the student's own.
        options = {"temperature": self.temperature, "top_p": self.top_p, "top_k": 0} if sample else {}
        plain = {"num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "use_cache": True}
        device = prompt_ids.device
        cuda = [device] if device.type == "cuda" else []
        # Hugging Face samples from the global generator: seed it inside a fork that restores it afterwards
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()].manual_seed(seed)
            return model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask.long(), max_new_tokens=self.max_new_tokens, do_sample=sample,
                pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id, **plain, **options,
            )


def _before_first_eos(tokens: Tensor, eos_token_id: int | None) -> Tensor:
    """Bool ``(B, N)``: the tokens up to and including each row's first ``eos_token_id`` (all of them without one)."""
    if eos_token_id is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    eos = (tokens == eos_token_id).long()
    return (eos.cumsum(dim=1) - eos) == 0  # no EOS strictly before


def _check_batch(inputs: Any, targets: Any) -> tuple[Tensor, Tensor | None]:
    if not isinstance(inputs, Mapping) or not isinstance(inputs.get("input_ids"), Tensor):
        raise TypeError(f"Expected `inputs` to be a dict with `input_ids` (a causal LM batch), but got {type(inputs).__name__}.")
    extra = sorted(set(inputs) - set(_KEYS))
    if extra:
        raise ValueError(
            f"Expected inputs with keys {list(_KEYS)} only: a generated batch has new tokens, and {extra} cannot follow "
            "them. Leave them out of the batch (a causal LM computes its positions from the attention mask)."
        )
    ids, attention = inputs["input_ids"], inputs.get("attention_mask")
    if ids.dim() != 2 or ids.is_floating_point():
        raise ValueError(f"Expected `input_ids` to be (B, S) token ids, but got {ids.dtype} of shape {tuple(ids.shape)}.")
    for name, tensor in (("attention_mask", attention), ("targets", targets)):
        if tensor is not None and (not isinstance(tensor, Tensor) or tensor.shape != ids.shape):
            got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"Expected `{name}` of the shape of `input_ids` {tuple(ids.shape)}, but got {got}.")
    if targets is None or targets.is_floating_point():
        raise ValueError("Expected the causally shifted next-token targets (B, S) of a causal LM batch, with -100 where none.")
    return ids, attention


def _in_range(value: Any, name: str, allowed: str, ok: Callable[[float], bool]) -> float:
    number = check_number(value, name)
    if not ok(number):
        raise ValueError(f"Expected `{name}` to be {allowed}, but got {value}")
    return number


def _integer(value: Any, name: str, low: int, alternative: str = "") -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Expected `{name}` to be an integer >= {low}{alternative}, but got {value!r} ({type(value).__name__}).")
    if value < low:
        raise ValueError(f"Expected `{name}` to be an integer >= {low}{alternative}, but got {value}")
    return int(value)


def _uniform(state: np.uint64) -> float:
    return int(state >> np.uint64(11)) * 2.0**-53  # the top 53 bits: a double in [0, 1)


def _parameters(method: Any) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(method).parameters if callable(method) else {}
    except (TypeError, ValueError):  # a builtin without a signature
        return {}


def _rows(flags: Tensor) -> list[int]:
    rows = flags.nonzero().flatten().tolist()
    return rows[:10] + ["..."] if len(rows) > 10 else rows
