"""A name -> builder registry for the model zoo, shaped like ``torchvision.models``.

Example::

    >>> from lightning_kd.models import get_model, list_models
    >>> "resnet8x4" in list_models()
    True
    >>> model = get_model("mlp", hidden=(32,))
    >>> sum(p.numel() for p in model.parameters())
    1642
"""

from __future__ import annotations

from typing import Callable, TypeVar

from torch import nn

__all__ = ["get_model", "list_models", "register_model"]

_Builder = TypeVar("_Builder", bound=Callable[..., nn.Module])

# name -> class or factory function returning an ``nn.Module``.
_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[_Builder], _Builder]:
    """Register a model class or factory function under ``name``.

    Args:
        name: the name ``get_model`` will look the builder up by (also used in configs).

    Returns:
        A decorator that registers its argument and returns it unchanged.

    Raises:
        TypeError: if ``name`` is not a string.
        ValueError: if ``name`` is empty or already registered.

    Example::

        from torch import nn
        from lightning_kd.models import get_model, register_model

        @register_model("linear40")
        def linear40(num_classes: int = 10) -> nn.Module:
            return nn.Linear(40, num_classes)

        model = get_model("linear40", num_classes=3)
    """
    if not isinstance(name, str):
        raise TypeError(f"Expected `name` to be a str, but got {type(name).__name__}")
    if not name:
        raise ValueError("Expected `name` to be a non-empty string, but got ''")

    def decorator(builder: _Builder) -> _Builder:
        if name in _MODELS:
            raise ValueError(
                f"A model named '{name}' is already registered (by {_MODELS[name].__qualname__}). "
                "Choose a different name."
            )
        _MODELS[name] = builder
        return builder

    return decorator


def get_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name``.

    Args:
        name: a registered model name, one of ``list_models()``.
        **kwargs: passed to the model's constructor (e.g. ``num_classes``).

    Returns:
        A freshly initialised ``nn.Module``.

    Raises:
        ValueError: if ``name`` is not registered; the message lists the valid names.
    """
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ValueError(
            f"Unknown model '{name}'. Expected one of: {', '.join(list_models())}"
        ) from None
    return builder(**kwargs)


def list_models() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(_MODELS)
