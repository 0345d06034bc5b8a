"""Feature and relation terms of a distillation run: which layers, which loss, which weight, which adapters.

Plain torch (no Lightning): :class:`~lightning_kd.DistillationModule` owns one
:class:`FeatureDistillation` and calls it around its forward passes. The adapters (FitNet's
regressors) are ``nn.Module`` children of it, hence trained with the student and saved in the
module's checkpoints, but they are not part of the student: an exported student has none.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

from torch import Tensor, nn

from lightning_kd.hooks import FeatureHooks, resolve_modules
from lightning_kd.losses.feature import build_adapter

class FeatureTerm:
    """One feature term: ``weight * Σ_pairs loss(student_layer_i, teacher_layer_i)``.

    Args:
        loss: the loss on one pair of features: :class:`~lightning_kd.losses.FitNetLoss`,
            :class:`~lightning_kd.losses.ATLoss`, :class:`~lightning_kd.losses.RKDLoss`, or any module
            ``(student_feature, teacher_feature) -> Tensor``. A loss whose class sets
            ``needs_adapter = True`` (FitNet) gets a trained adapter from the student feature's shape
            to the teacher's, of the kind its ``adapter`` attribute names.
        teacher_layers: a layer name or a list of them, as in the teacher's ``named_modules()``.
        student_layers: as many student layers, paired with the teacher's in order.
        weight: the term's weight, finite and >= 0.

    Raises:
        TypeError: if ``loss`` is not callable.
        ValueError: for empty or unpaired layer lists, or a weight that is not finite and >= 0.

    Example::

        >>> from lightning_kd.losses import FitNetLoss
        >>> FeatureTerm(FitNetLoss(), "features.3", "hidden.1", weight=100.0)
        FeatureTerm(FitNetLoss(adapter='auto'), teacher_layers=['features.3'], student_layers=['hidden.1'], weight=100.0)
    """

    def __init__(self, loss: Callable[[Tensor, Tensor], Tensor], teacher_layers: str | Sequence[str], student_layers: str | Sequence[str],
                 weight: float = 1.0) -> None:
        if not callable(loss):
            raise TypeError(f"Expected the feature term's `loss` to be a module or callable (student_feature, teacher_feature), but got {type(loss).__name__}.")
        self.loss = loss
        self.teacher_layers = _layers(teacher_layers, "teacher_layers")
        self.student_layers = _layers(student_layers, "student_layers")
        if len(self.teacher_layers) != len(self.student_layers):
            raise ValueError(
                "Expected as many `teacher_layers` as `student_layers` (they pair up in order), "
                f"but got {len(self.teacher_layers)} and {len(self.student_layers)}."
            )
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"Expected the feature term's `weight` to be a finite number >= 0, but got {weight}.")
        self.weight = float(weight)
        self.needs_adapters = bool(getattr(loss, "needs_adapter", False))
        self.adapter = getattr(loss, "adapter", "auto")

    def __repr__(self) -> str:
        return (f"FeatureTerm({self.loss!r}, teacher_layers={self.teacher_layers}, student_layers={self.student_layers}, "
                f"weight={self.weight})")


def _layers(layers: str | Sequence[str], name: str) -> list[str]:
    if isinstance(layers, str):
        layers = [layers]
    if not layers or not all(isinstance(layer, str) for layer in layers):
        raise ValueError(f"Expected `{name}` to be a layer name or a non-empty list of them, but got {layers!r}.")
    return list(layers)


class FeatureDistillation(nn.Module):
    """Hooks on the teacher's and the student's layers, the feature terms, and FitNet's adapters.

    Args:
        teacher: the teacher (layer names relative to it).
        student: the student (layer names relative to it).
        terms: ``{key: FeatureTerm}``; the key names the term in the logs (``train/feature_<key>``).

    Raises:
        TypeError: if a term is not a :class:`FeatureTerm`.
        ValueError: for no term, or a layer name that neither model has (with close matches).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, terms: Mapping[str, FeatureTerm]) -> None:
        super().__init__()
        for key, term in terms.items():
            if not isinstance(term, FeatureTerm):
                raise TypeError(
                    f"Expected `features[{key!r}]` to be a FeatureTerm(loss, teacher_layers, student_layers, weight), "
                    f"but got {type(term).__name__}."
                )
        self.keys = [str(key) for key in terms]
        self.terms = list(terms.values())
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

    def clear(self) -> None:
        for hooks in self._hooks.values():
            hooks.clear()

    # -------------------------------------------------------------- adapters
    @property
    def needs_adapters(self) -> bool:
        return any(term.needs_adapters for term in self.terms) and not self.adapter_shapes

    def build_adapters(self, shapes: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None) -> None:
        """Build FitNet's adapters from the shapes captured by the last forward of both models (or ``shapes``)."""
        kinds = {f"{key}_{i}": term.adapter for key, term in self._items() for i in range(len(term.teacher_layers))}
        if shapes is None:
            shapes = {}
            for key, term in self._items():
                if term.needs_adapters:
                    for i, (t_layer, s_layer) in enumerate(zip(term.teacher_layers, term.student_layers)):
                        shapes[f"{key}_{i}"] = (
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
        for key, term in self._items():
            total: Tensor | None = None
            for i, (t_layer, s_layer) in enumerate(zip(term.teacher_layers, term.student_layers)):
                s = student[s_layer]
                if term.needs_adapters:
                    s = self.adapters[f"{key}_{i}"](s)
                value = term.loss(s, teacher[t_layer].detach())
                total = value if total is None else total + value
            values[key] = total
        return values

    def weighted_sum(self, values: Mapping[str, Tensor]) -> Tensor:
        return sum(term.weight * values[key] for key, term in self._items())

    def _items(self) -> list[tuple[str, FeatureTerm]]:
        return list(zip(self.keys, self.terms))


def feature_distillation(teacher: nn.Module | None, student: nn.Module, features: Mapping[str, FeatureTerm] | None, *,
                         stored: bool) -> FeatureDistillation | None:
    """The module's feature terms, or None without any; ``stored``: the teacher's outputs come from a soft-target store.

    Raises:
        TypeError: if ``features`` is not a dict.
        ValueError: with a store (it holds logits, not activations) or without a teacher.
    """
    if features is not None and not isinstance(features, Mapping):
        raise TypeError(f"Expected `features` to be a dict {{key: FeatureTerm(...)}}, but got {type(features).__name__}.")
    if not features:
        return None
    if stored:
        raise ValueError(
            "Feature terms need the teacher's forward on every training batch, but with `soft_targets` the "
            "teacher's outputs come from the store (logits only). Drop `soft_targets` to train with `features`."
        )
    if teacher is None:
        raise ValueError("Feature terms need the teacher's activations: pass a `teacher`.")
    return FeatureDistillation(teacher, student, features)
