"""Capture the activations of named submodules with forward hooks, for feature distillation.

Plain torch. Names are those of ``model.named_modules()`` on the bare model; the prefixes that
wrappers add (DDP and DataParallel's ``module.``, ``torch.compile``'s ``_orig_mod.``) are accepted
and ignored, so a name copied from a printed wrapped model works too.

What a layer returns is reduced to one tensor by :func:`first_tensor`: a tensor as it is; a tuple
or list (Hugging Face blocks of older ``transformers`` return ``(hidden_states, ...)``) to its first
element that holds a tensor; a dict or ``ModelOutput`` to its ``last_hidden_state``, else its
``hidden_states`` (the last of them when it is a tuple of every layer's), else its first value that
holds a tensor. A layer whose output holds no tensor is an error naming the layer and the type.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Literal, Mapping

import torch  # noqa: F401  (the doctest uses it)
from torch import Tensor, nn

_WRAPPER_PARTS = ("_orig_mod",)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def canonical_name(name: str) -> str:
    """``name`` without wrapper parts: ``module.`` at the front, ``_orig_mod.`` anywhere."""
    parts = [p for p in name.split(".") if p and p not in _WRAPPER_PARTS]
    while parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def resolve_modules(model: nn.Module, names: Iterable[str], *, setting: str = "layer") -> dict[str, nn.Module]:
    """``{name: submodule}`` for each requested name, wrapper prefixes ignored.

    Raises:
        ValueError: for a name that is not a submodule, listing the closest existing names.
    """
    bare = unwrap(model)
    modules: dict[str, nn.Module] = {}
    for full, module in bare.named_modules():
        modules.setdefault(canonical_name(full), module)
    resolved = {}
    for name in names:
        key = name if name in modules else canonical_name(name)
        if key not in modules or key == "":
            close = difflib.get_close_matches(canonical_name(name), [n for n in modules if n], n=5, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            available = ", ".join(n for n in list(modules)[1:21] if n)
            raise ValueError(
                f"Unknown {setting} {name!r}: {type(bare).__name__} has no submodule of that name.{hint} "
                f"Names come from `model.named_modules()`, e.g. {available}{', ...' if len(modules) > 21 else ''}."
            )
        resolved[name] = modules[key]
    return resolved


def first_tensor(value: Any) -> Tensor | None:
    """The tensor that stands for a layer's output (see the module's docstring), or None if it holds none.

    Example::

        >>> first_tensor((None, torch.ones(2), torch.zeros(3))).shape
        torch.Size([2])
        >>> first_tensor({"logits": torch.ones(1), "last_hidden_state": torch.zeros(2, 4)}).shape
        torch.Size([2, 4])
        >>> first_tensor({"hidden_states": (torch.ones(1), torch.zeros(3))}).shape  # the last layer's
        torch.Size([3])
        >>> first_tensor(("text", None)) is None
        True
    """
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Mapping):  # dicts, and transformers' ModelOutput (an OrderedDict of its non-None fields)
        if value.get("last_hidden_state") is not None:
            return first_tensor(value["last_hidden_state"])
        hidden = value.get("hidden_states")
        if isinstance(hidden, (tuple, list)) and hidden:
            hidden = hidden[-1]  # (embeddings, layer 1, ..., layer N): the last is what last_hidden_state would be
        if hidden is not None and (found := first_tensor(hidden)) is not None:
            return found
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            if (found := first_tensor(item)) is not None:
                return found
    return None


class FeatureHooks:
    """Forward hooks that keep the last output (or input) of named submodules.

    Args:
        model: the model to watch (bare, or wrapped by DDP / ``torch.compile``).
        names: submodule names as in ``model.named_modules()``.
        capture: ``"output"`` (the submodule's return value) or ``"input"`` (its first positional
            argument that holds a tensor), reduced to one tensor by :func:`first_tensor`.

    Raises:
        ValueError: for an unknown name (with close matches) or an unknown ``capture``.
        TypeError: in the model's forward, when a hooked layer's output (or positional input) holds
            no tensor; the message names the layer and the type.

    Example::

        >>> from lightning_kd.models import get_model
        >>> model = get_model("mlp")
        >>> with FeatureHooks(model, ["hidden.0"]) as hooks:
        ...     _ = model(torch.randn(2, 40))
        ...     hooks["hidden.0"].shape
        torch.Size([2, 100])
        >>> len(model.hidden[0]._forward_hooks)
        0
    """

    def __init__(self, model: nn.Module, names: Iterable[str], *, capture: Literal["output", "input"] = "output") -> None:
        if capture not in ("output", "input"):
            raise ValueError(f"Expected `capture` to be 'output' or 'input', but got {capture!r}.")
        self.names = list(dict.fromkeys(names))
        self.capture = capture
        self.features: dict[str, Tensor] = {}
        self._model_name = type(unwrap(model)).__name__
        self._handles = [
            module.register_forward_hook(self._hook(name)) for name, module in resolve_modules(model, self.names).items()
        ]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            value = output if self.capture == "output" else args
            feature = first_tensor(value)
            if feature is None and self.capture == "input":
                raise TypeError(
                    f"Layer {name!r} of {self._model_name} was called without a tensor among its positional arguments (keyword "
                    "arguments are not seen by a forward hook): capture the output of the layer before it instead."
                )
            if feature is None:
                raise TypeError(
                    f"Layer {name!r} of {self._model_name} returned {type(output).__name__}, in which a feature hook finds no "
                    "tensor. A hooked layer must return a tensor, a tuple or list holding one, or a dict/ModelOutput with "
                    "`last_hidden_state` or `hidden_states`: hook the submodule that computes the hidden states instead."
                )
            self.features[name] = feature

        return hook

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.features:
            if name not in self.names:
                raise KeyError(f"{name!r} is not hooked; hooked layers: {', '.join(self.names)}.")
            raise RuntimeError(
                f"Layer {name!r} has not run since the features were last cleared: is it used in the model's "
                "forward? (A hook on a layer that runs inside a compiled region fires only if it was registered "
                "before compiling.)"
            )
        return self.features[name]

    def clear(self) -> None:
        """Drop the captured tensors (and the graphs they hold)."""
        self.features.clear()

    def remove(self) -> None:
        """Unregister every hook; the model is left as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> "FeatureHooks":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
