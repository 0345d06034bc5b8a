"""Hugging Face ``transformers`` causal LMs for configs: built from a config (nothing downloaded) or loaded from a folder.

Needs the optional extra ``hf`` (``pip install 'lightning-kd[hf]'``); imported only when called.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn


def hf_causal_lm(model_type: str | None = None, *, pretrained: str | os.PathLike[str] | None = None, **config: Any) -> nn.Module:
    """A ``transformers`` causal LM: ``AutoModelForCausalLM`` from a fresh config, or from a saved model's folder.

    Args:
        model_type: a ``transformers`` model type (``"gpt2"``, ``"llama"``, ...) to build with fresh weights
            from ``config`` (e.g. ``n_layer=2, n_embd=64`` for GPT-2). Nothing is downloaded.
        pretrained: a local folder written by ``save_pretrained`` (or a hub name, which downloads unless it is
            cached). ``config`` entries then override the saved config's values.
        **config: config values.

    Raises:
        ImportError: without ``transformers``.
        ValueError: with both or neither of ``model_type`` and ``pretrained``.

    Example::

        >>> model = hf_causal_lm("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
        >>> model(input_ids=__import__("torch").zeros(1, 4, dtype=__import__("torch").long)).logits.shape
        torch.Size([1, 4, 32])
    """
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("hf_causal_lm needs `transformers`: pip install 'lightning-kd[hf]'.") from err
    if (model_type is None) == (pretrained is None):
        raise ValueError(
            f"Expected exactly one of `model_type` (build from a config) and `pretrained` (a saved model's folder), "
            f"but got model_type={model_type!r} and pretrained={pretrained!r}."
        )
    if pretrained is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(os.fspath(pretrained), **config)
    return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **config))
