"""A small decoder-only transformer (GPT-2 style, pre-LN) for language-model distillation demos.

Its interface mirrors a Hugging Face causal LM, so that distillation code written for one serves the
other: ``model(input_ids, attention_mask)`` gives the next-token logits, ``model.base_model(...)``
the final hidden states, ``model.get_output_embeddings()`` the output layer, and
``model.generate(...)`` samples continuations with a key/value cache. Unlike Hugging Face's models
it returns plain tensors, not output objects.

Padding follows Hugging Face's conventions: ``attention_mask`` is 1 on real tokens and 0 on padding,
on the right or on the left. Padded keys take no part in attention, and the position of a token
counts the real tokens before it, so a left-padded sequence gives the logits of the unpadded one on
its real tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.models.registry import register_model

__all__ = ["GPT", "GPTModel", "gpt_student", "gpt_teacher", "top_p_filter"]

# One layer's cached keys and values, each (B, n_head, T, head_dim).
KeyValue = tuple[Tensor, Tensor]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"Expected `{name}` to be an int, but got {type(value).__name__}: {value!r}")
        if value < 1:
            raise ValueError(f"Expected `{name}` to be >= 1, but got {value}")


def _position_ids(attention_mask: Tensor) -> Tensor:
    """Each token's position among the real tokens of its row, ``(B, T)``; padding gets the position of its neighbour."""
    # Hugging Face's rule for left padding: the first real token is at position 0 however many pads precede it.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _attention_bias(attention_mask: Tensor, num_queries: int) -> Tensor:
    """Which keys each of the last ``num_queries`` positions may attend to: ``(B, 1, num_queries, T)``, True = attend.

    A query sees the real keys at or before it (causal and padding masks combined) and always itself:
    a padding query (on the left, before any real token) would otherwise see no key, and softmax over
    an all-masked row is NaN.
    """
    total = attention_mask.shape[1]
    queries = torch.arange(total - num_queries, total, device=attention_mask.device)[:, None]  # (S, 1) absolute
    keys = torch.arange(total, device=attention_mask.device)[None, :]  # (1, T)
    allowed = (keys <= queries) & attention_mask.bool()[:, None, None, :]  # (B, 1, S, T)
    return allowed | (keys == queries)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``, with an optional cache."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, bias: Tensor | None, past: KeyValue | None = None) -> tuple[Tensor, KeyValue]:
        batch, length, width = x.shape
        q, k, v = (
            t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2)  # (B, H, S, D)
            for t in self.qkv(x).split(width, dim=2)
        )
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0, is_causal=bias is None
        )  # (B, H, S, D)
        y = y.transpose(1, 2).reshape(batch, length, width)
        return self.resid_dropout(self.proj(y)), (k, v)


class Block(nn.Module):
    """A pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` with a 4x GELU MLP."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor, bias: Tensor | None, past: KeyValue | None = None) -> tuple[Tensor, KeyValue]:
        attended, present = self.attn(self.ln_1(x), bias, past)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), present


class GPTModel(nn.Module):
    """The transformer without its output layer (``GPT.base_model``): token ids to final hidden states.

    Token and learned position embeddings, ``n_layer`` pre-LN blocks and a final LayerNorm. Submodules,
    for feature hooks: ``wte``, ``wpe``, ``h.0`` ... ``h.{n_layer-1}`` (the blocks) and ``ln_f``.

    Shape:
        - ``input_ids``: ``(B, S)`` integer, ``S <= block_size``.
        - ``attention_mask``: ``(B, S)``, 1 on real tokens and 0 on padding; None: no padding.
        - Output: ``(B, S, n_embd)``, after the final LayerNorm.
    """

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None) -> Tensor:
        return self.decode(input_ids, attention_mask, position_ids)[0]

    def decode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past: list[KeyValue] | None = None,
    ) -> tuple[Tensor, list[KeyValue]]:
        """Hidden states ``(B, S, n_embd)`` of ``input_ids`` and every layer's keys and values, the cache included.

        With a cache of ``P`` earlier positions, ``input_ids`` holds the ``S`` new ones and
        ``attention_mask`` covers all ``P + S`` (Hugging Face's convention).
        """
        _check_input_ids(input_ids)
        past_length = 0 if past is None else past[0][0].shape[2]
        total = past_length + input_ids.shape[1]
        if total > self.block_size:
            raise ValueError(
                f"Expected at most block_size={self.block_size} positions, but got {total}: the model has no "
                "position embedding beyond it. Shorten the sequences or build the model with a larger `block_size`."
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (input_ids.shape[0], total):
            raise ValueError(
                f"Expected `attention_mask` of shape {(input_ids.shape[0], total)} (the cached and the new positions), "
                f"but got {tuple(attention_mask.shape)}"
            )
        if attention_mask is None and past is None:
            bias = None  # causal only: SDPA's fused causal kernel
        else:
            if attention_mask is None:
                attention_mask = torch.ones(input_ids.shape[0], total, dtype=torch.long, device=input_ids.device)
            bias = _attention_bias(attention_mask, input_ids.shape[1])
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, S)
            else:
                position_ids = _position_ids(attention_mask)[:, past_length:]  # (B, S)
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))  # (B, S, n_embd)
        presents = []
        for i, block in enumerate(self.h):
            x, present = block(x, bias, None if past is None else past[i])
            presents.append(present)
        return self.ln_f(x), presents


def _check_input_ids(input_ids: Tensor) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.is_floating_point() or input_ids.is_complex():
        got = input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise TypeError(f"Expected `input_ids` to be an integer tensor of token ids, but got {got}")
    if input_ids.ndim != 2:
        raise ValueError(f"Expected `input_ids` of shape (B, S), but got {tuple(input_ids.shape)}")


@register_model("gpt")
class GPT(nn.Module):
    """A small decoder-only transformer language model (Radford et al., "Language Models are Unsupervised
    Multitask Learners", 2019: GPT-2's pre-LN layout).

    :class:`GPTModel` (``base_model``, under the name ``transformer``) followed by ``lm_head``, a
    linear layer without bias whose weight is the token embedding's when ``tie_weights`` (as in GPT-2),
    so that ``logits == base_model(input_ids, attention_mask) @ lm_head.weight.T``. Weights start as
    GPT-2's: normal with std 0.02, the residual projections scaled by ``1 / sqrt(2 * n_layer)``.

    Submodules, for feature hooks: ``transformer.h.0`` ... (the blocks), ``transformer.ln_f`` and ``lm_head``.

    The logits at position ``t`` predict token ``t + 1``: the labels of a batch are the input ids
    (Hugging Face's convention), and the loss shifts them.

    Args:
        vocab_size: number of token ids (default: the 256 bytes, end-of-document and padding of
            :class:`~lightning_kd.data.ByteTextDataModule`).
        block_size: the longest sequence (learned positions ``0 .. block_size - 1``).
        n_layer: number of transformer blocks.
        n_head: attention heads per block; must divide ``n_embd``.
        n_embd: width of the hidden states.
        dropout: dropout on the embeddings, attention weights and residual branches.
        tie_weights: share the token embedding with ``lm_head``.

    Shape:
        - ``input_ids``: ``(B, S)`` integer, ``S <= block_size``.
        - ``attention_mask``: ``(B, S)``, 1 on real tokens and 0 on padding (left or right); None: no padding.
        - Output: logits ``(B, S, vocab_size)``.

    Raises:
        TypeError: if a size is not an int, or, in ``forward``, if ``input_ids`` is not an integer tensor.
        ValueError: if a size is not positive, ``n_head`` does not divide ``n_embd``, ``dropout`` is
            outside ``[0, 1)``, or, in ``forward``, if the input is longer than ``block_size`` or the mask
            has another shape.

    Example::

        >>> model = GPT(n_layer=2, n_head=2, n_embd=32, block_size=16)
        >>> sum(p.numel() for p in model.parameters())
        34240
        >>> ids = torch.tensor([[257, 257, 72, 105], [72, 105, 33, 256]])  # the first one left-padded
        >>> model(ids, attention_mask=(ids != 257).long()).shape
        torch.Size([2, 4, 258])
    """

    def __init__(
        self,
        vocab_size: int = 258,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 256,
        dropout: float = 0.0,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        _check_positive(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        if n_embd % n_head:
            raise ValueError(f"Expected `n_head` to divide `n_embd`, but got n_embd={n_embd}, n_head={n_head}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Expected `dropout` to be in [0, 1), but got {dropout}")
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.transformer = GPTModel(vocab_size, block_size, n_layer, n_head, n_embd, dropout)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, parameter in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):  # the residual branches: GPT-2's depth scaling
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
        if tie_weights:
            self.lm_head.weight = self.transformer.wte.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def base_model(self) -> GPTModel:
        """The transformer without ``lm_head``: ``base_model(input_ids, attention_mask)`` is ``(B, S, n_embd)``."""
        return self.transformer

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Next-token logits ``(B, S, vocab_size)``.

        ``labels`` is accepted and ignored, so that a Hugging Face batch can be passed whole
        (``model(**batch)``); the loss is the caller's.
        """
        del labels
        return self.lm_head(self.transformer(input_ids, attention_mask, position_ids))

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Continue left-padded prompts by sampling, with a key/value cache.

        Each step samples from ``softmax(logits / temperature)`` restricted to the nucleus of
        probability ``top_p`` (Holtzman et al., "The Curious Case of Neural Text Degeneration", ICLR
        2020); ``temperature=0`` takes the most likely token. A sequence that has produced
        ``eos_token_id`` continues with ``pad_token_id`` (masked out); generation stops after
        ``max_new_tokens`` steps or once every sequence has ended. The model's training mode is left
        as it is: call ``eval()`` first to sample without dropout.

        Args:
            input_ids: prompts ``(B, S)``, padded on the left.
            attention_mask: ``(B, S)``, 1 on real tokens, 0 on padding; None: no padding.
            max_new_tokens: most tokens to add (``S + max_new_tokens <= block_size``).
            temperature: divides the logits; 0 is greedy decoding.
            top_p: the smallest set of most likely tokens whose probability reaches ``top_p`` is sampled from.
            eos_token_id: the token that ends a sequence; None: sequences end only at ``max_new_tokens``.
            pad_token_id: what an ended sequence continues with. Default: ``eos_token_id``.
            generator: the random generator of the sampling (on the model's device).

        Returns:
            ``(sequences, attention_mask)``, both ``(B, S + N)`` with ``N <= max_new_tokens`` new positions:
            the prompts and their continuations, and the mask, 0 on the prompts' padding and after each
            sequence's first ``eos_token_id`` (which itself is 1).

        Raises:
            ValueError: if the prompts are empty or padded on the right, ``max_new_tokens < 1``,
                ``S + max_new_tokens > block_size``, ``temperature < 0``, or ``top_p`` is outside ``(0, 1]``.

        Example::

            >>> model = GPT(n_layer=1, n_head=2, n_embd=16, block_size=12).eval()
            >>> prompts = torch.tensor([[257, 72, 105], [72, 105, 33]])
            >>> sequences, mask = model.generate(prompts, (prompts != 257).long(), max_new_tokens=5,
            ...                                  temperature=0.0, eos_token_id=256, pad_token_id=257)
            >>> sequences.shape, mask[0, :3].tolist()
            (torch.Size([2, 8]), [0, 1, 1])
        """
        _check_input_ids(input_ids)
        _check_positive(max_new_tokens=max_new_tokens)
        batch, length = input_ids.shape
        if length == 0:
            raise ValueError("Expected prompts of at least one token, but got `input_ids` of shape (B, 0)")
        if length + max_new_tokens > self.block_size:
            raise ValueError(
                f"Expected the prompt length plus `max_new_tokens` to be at most block_size={self.block_size}, but got "
                f"{length} + {max_new_tokens} = {length + max_new_tokens}. Lower `max_new_tokens` or shorten the prompts."
            )
        if temperature < 0:
            raise ValueError(f"Expected `temperature` to be >= 0, but got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"Expected `top_p` to be in (0, 1], but got {top_p}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.long()
        if not attention_mask[:, -1].all():
            raise ValueError(
                "Expected left-padded prompts (`attention_mask[:, -1]` all 1), but some prompt ends in padding: "
                "new tokens would follow the padding. Pad the prompts on the left (`padding_side='left'`)."
            )
        if pad_token_id is None:
            pad_token_id = eos_token_id if eos_token_id is not None else 0
        sequences, mask = input_ids, attention_mask
        hidden, past = self.transformer.decode(input_ids, attention_mask)
        ended = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            logits = self.lm_head(hidden[:, -1])  # (B, V)
            token = _sample(logits, temperature, top_p, generator)
            token = token.masked_fill(ended, pad_token_id)
            sequences = torch.cat([sequences, token[:, None]], dim=1)
            mask = torch.cat([mask, (~ended).long()[:, None]], dim=1)
            if eos_token_id is not None:
                ended = ended | (token == eos_token_id)
            if step + 1 == max_new_tokens or ended.all():
                break
            hidden, past = self.transformer.decode(token[:, None], mask, past=past)
        return sequences, mask


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Set to ``-inf`` the logits outside the nucleus: the fewest most likely tokens whose probability reaches ``top_p``.

    The most likely token is always kept; ties are broken by the sort.

    Shape:
        - ``logits``: ``(..., V)``; output: the same.

    Example::

        >>> logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
        >>> top_p_filter(logits, 0.7).exp()
        tensor([0.5000, 0.3000, 0.0000, 0.0000])
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
    drop = torch.zeros_like(order, dtype=torch.bool).scatter(-1, order, before >= top_p)
    return logits.masked_fill(drop, float("-inf"))


def _sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """One token id per row of ``logits`` ``(B, V)``: greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = top_p_filter(logits.float() / temperature, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# The demo's sizes, measured on the byte-level pydoc data (batch 32 x 128, AdamW, cosine, two CPU cores).
# Untied output layers: with 258 tokens tying saves little and slowed learning (one epoch: train loss 2.83
# untied vs 3.11 tied for 4 x 192). Two layers: four learned far more slowly in the few hundred steps a demo
# has (4 x 192 ended at 3.59 validation bits per byte after 6 epochs, 2 x 192 at 2.58).


@register_model("gpt_teacher")
def gpt_teacher(vocab_size: int = 258, block_size: int = 128, dropout: float = 0.0) -> GPT:
    """The byte-level teacher of the language-model demo: 2 layers, 192 wide, 4 heads, untied (1.01 M parameters).

    Trained 8 epochs at lr 7e-4: 2.22 validation and 2.07 test bits per byte; 0.22 s a training step.
    """
    return GPT(vocab_size, block_size, n_layer=2, n_head=4, n_embd=192, dropout=dropout, tie_weights=False)


@register_model("gpt_student")
def gpt_student(vocab_size: int = 258, block_size: int = 128, dropout: float = 0.0) -> GPT:
    """The byte-level student of the language-model demo: 2 layers, 64 wide, 2 heads, untied (141 k parameters).

    Trained 6 epochs at lr 3e-3: 2.74 validation bits per byte from scratch, 2.54 distilled from the teacher
    (forward KL, alpha 0.5); 0.05 s a training step.
    """
    return GPT(vocab_size, block_size, n_layer=2, n_head=2, n_embd=64, dropout=dropout, tie_weights=False)
