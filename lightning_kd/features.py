"""Feature and relation terms of a distillation run: which layers, which loss, which weight, which adapters.

Plain torch (no Lightning): :class:`~lightning_kd.DistillationModule` owns one
:class:`FeatureDistillation` and calls it around its forward passes. The adapters (FitNet's
regressors) are ``nn.Module`` children of it, hence trained with the student and saved in the
module's checkpoints, but they are not part of the student: an exported student has none.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

from torch import Tensor, nn

from lightning_kd.hooks import FeatureHooks, resolve_modules
from lightning_kd.losses.feature import at_loss, build_adapter, fitnet_loss, rkd_loss

FEATURE_LOSSES: dict[str, Callable[..., Tensor]] = {"fitnet": fitnet_loss, "at": at_loss, "rkd": rkd_loss}
_TERM_KEYS = ("method", "teacher_layers", "student_layers", "weight", "adapter")


class FeatureTerm:
    """One configured term: ``weight * Σ_pairs loss(student_layer_i, teacher_layer_i)``."""

    def __init__(self, key: str, spec: Mapping[str, Any]) -> None:
        if not isinstance(spec, Mapping):
            raise TypeError(f"Expected `features[{key!r}]` to be a mapping (method, teacher_layers, ...), but got {type(spec).__name__}.")
        self.key = key
        self.method = spec.get("method", key)
        if self.method not in FEATURE_LOSSES:
            raise ValueError(
                f"Unknown feature method {self.method!r} for `features[{key!r}]`. Expected one of {', '.join(FEATURE_LOSSES)} "
                "(set `method:` when the key is another name)."
            )
        self.teacher_layers = _layers(spec, "teacher_layers", key)
        self.student_layers = _layers(spec, "student_layers", key)
        if len(self.teacher_layers) != len(self.student_layers):
            raise ValueError(
                f"Expected as many `teacher_layers` as `student_layers` for `features[{key!r}]` (they pair up in order), "
                f"but got {len(self.teacher_layers)} and {len(self.student_layers)}."
            )
        self.weight = float(spec.get("weight", 1.0))
        self.adapter = spec.get("adapter", "auto")  # FitNet: auto | linear (last dim, e.g. (B, S, D)) | conv
        if self.adapter not in ("auto", "linear", "conv"):
            raise ValueError(f"Unknown `features[{key!r}].adapter` {self.adapter!r}. Expected one of auto, linear, conv.")
        self.options = {k: v for k, v in spec.items() if k not in _TERM_KEYS}
        allowed = [p for p in inspect.signature(FEATURE_LOSSES[self.method]).parameters][2:]
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for `features[{key!r}]` ({self.method}). Expected any of: "
                f"{', '.join([*_TERM_KEYS[1:], *allowed])}."
            )

    @property
    def needs_adapters(self) -> bool:
        return self.method == "fitnet"

    def adapter_key(self, index: int) -> str:
        return f"{self.key}_{index}"


def _layers(spec: Mapping[str, Any], name: str, key: str) -> list[str]:
    layers = spec.get(name)
    if isinstance(layers, str):
        layers = [layers]
    if not layers or not all(isinstance(layer, str) for layer in layers):
        raise ValueError(f"Expected `features[{key!r}].{name}` to be a non-empty list of layer names, but got {layers!r}.")
    return list(layers)


class FeatureDistillation(nn.Module):
    """Hooks on the teacher's and the student's layers, the feature terms, and FitNet's adapters.

    Args:
        teacher: the teacher (layer names relative to it).
        student: the student (layer names relative to it).
        terms: ``{key: {"method": "fitnet" | "at" | "rkd" (default: the key), "teacher_layers": [...],
            "student_layers": [...], "weight": 1.0, **loss options}}``; layers pair up in order and a
            term sums its pairs. FitNet also takes ``"adapter": "auto" | "linear" | "conv"``
            (``linear`` for channels-last features such as hidden states ``(B, S, D)``).

    Raises:
        ValueError: for an unknown method, option or layer name (with close matches), or unpaired layers.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, terms: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__()
        self.terms = [FeatureTerm(key, spec) for key, spec in terms.items()]
        if not self.terms:
            raise ValueError("Expected at least one feature term, but got none.")
        self._models = {"teacher": teacher, "student": student}  # not submodules: the module owns them
        self.teacher_layers = list(dict.fromkeys(layer for term in self.terms for layer in term.teacher_layers))
        self.student_layers = list(dict.fromkeys(layer for term in self.terms for layer in term.student_layers))
        resolve_modules(teacher, self.teacher_layers, setting="teacher layer")  # fail now, not at the first step
        resolve_modules(student, self.student_layers, setting="student layer")
        self.adapters = nn.ModuleDict()
        self.adapter_shapes: dict[str, tuple[list[int], list[int]]] = {}
        self._hooks: dict[str, FeatureHooks] = {}

    # -------------------------------------------------------------- hooks
    def attach(self) -> None:
        """Register the hooks (idempotent)."""
        if not self._hooks:
            self._hooks = {
                "teacher": FeatureHooks(self._models["teacher"], self.teacher_layers),
                "student": FeatureHooks(self._models["student"], self.student_layers),
            }

    def detach(self) -> None:
        """Remove every hook: the models are left as they were given."""
        for hooks in self._hooks.values():
            hooks.remove()
        self._hooks = {}

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def clear(self) -> None:
        for hooks in self._hooks.values():
            hooks.clear()

    # -------------------------------------------------------------- adapters
    @property
    def needs_adapters(self) -> bool:
        return any(term.needs_adapters for term in self.terms) and not self.adapter_shapes

    def build_adapters(self, shapes: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None) -> None:
        """Build FitNet's adapters from the shapes captured by the last forward of both models (or ``shapes``)."""
        kinds = {term.adapter_key(i): term.adapter for term in self.terms for i in range(len(term.teacher_layers))}
        if shapes is None:
            shapes = {}
            for term in self.terms:
                if term.needs_adapters:
                    for i, (t_layer, s_layer) in enumerate(zip(term.teacher_layers, term.student_layers)):
                        shapes[term.adapter_key(i)] = (
                            list(self._hooks["student"][s_layer].shape),
                            list(self._hooks["teacher"][t_layer].shape),
                        )
        for key, (student_shape, teacher_shape) in shapes.items():
            self.adapters[key] = build_adapter(student_shape, teacher_shape, kinds.get(key, "auto"))
            self.adapter_shapes[key] = (list(student_shape), list(teacher_shape))

    # -------------------------------------------------------------- losses
    def losses(self) -> dict[str, Tensor]:
        """``{key: unweighted term}`` from the features captured by the last forward of both models."""
        student, teacher = self._hooks["student"], self._hooks["teacher"]
        values: dict[str, Tensor] = {}
        for term in self.terms:
            fn = FEATURE_LOSSES[term.method]
            total: Tensor | None = None
            for i, (t_layer, s_layer) in enumerate(zip(term.teacher_layers, term.student_layers)):
                s = student[s_layer]
                if term.needs_adapters:
                    s = self.adapters[term.adapter_key(i)](s)
                value = fn(s, teacher[t_layer].detach(), **term.options)
                total = value if total is None else total + value
            values[term.key] = total
        return values

    def weighted_sum(self, values: Mapping[str, Tensor]) -> Tensor:
        return sum(term.weight * values[term.key] for term in self.terms)
