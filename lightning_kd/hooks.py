"""Capture the activations of named submodules with forward hooks, for feature distillation.

Plain torch. Names are those of ``model.named_modules()`` on the bare model; the prefixes that
wrappers add (DDP and DataParallel's ``module.``, ``torch.compile``'s ``_orig_mod.``) are accepted
and ignored, so a name copied from a printed wrapped model works too.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Literal

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


class FeatureHooks:
    """Forward hooks that keep the last output (or input) of named submodules.

    Args:
        model: the model to watch (bare, or wrapped by DDP / ``torch.compile``).
        names: submodule names as in ``model.named_modules()``.
        capture: ``"output"`` (the submodule's return value) or ``"input"`` (its first positional argument).

    Raises:
        ValueError: for an unknown name (with close matches) or an unknown ``capture``.

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
        self._handles = [
            module.register_forward_hook(self._hook(name)) for name, module in resolve_modules(model, self.names).items()
        ]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            value = output if self.capture == "output" else args[0]
            if isinstance(value, (tuple, list)):
                value = value[0]
            self.features[name] = value

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
