"""Feature and relation terms of a distillation run: which layers, which loss, which weight, which adapters.

Plain torch (no Lightning): :class:`~lightning_kd.DistillationModule` owns one
:class:`FeatureDistillation` and calls it around its forward passes. The adapters (FitNet's
regressors) are ``nn.Module`` children of it, hence trained with the student and saved in the
module's checkpoints, but they are not part of the student: an exported student has none.

Sequences. Language models give hidden states ``(B, S, D)``, channels *last*, with padded
positions; conv nets give maps ``(B, C, *spatial)``, channels first. Which one a feature is, its
*layout*, is decided by :func:`feature_layout` from the term's ``layout`` and the token mask the
module passes (``build_adapters(mask=...)``, ``losses(mask=...)``): ``"auto"`` reads a 3-D feature
whose leading dimensions are the mask's ``(B, S)`` as a sequence, anything else as channels first,
and without a mask every feature is channels first (the behaviour before sequences existed). A
sequence feature gets a ``Linear`` adapter on its last dimension, and its loss gets the mask, so
that padded tokens count nowhere. :func:`token_mask` makes that mask from a batch's inputs and
the student's outputs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_kd.hooks import FeatureHooks, resolve_modules
from lightning_kd.losses.feature import build_adapter

Layout = Literal["auto", "channels_first", "sequence"]
LAYOUTS = ("auto", "channels_first", "sequence")


class FeatureTerm:
    """One feature term: ``weight * Σ_pairs loss(student_layer_i, teacher_layer_i)``.

    Args:
        loss: the loss on one pair of features: :class:`~lightning_kd.losses.FitNetLoss`,
            :class:`~lightning_kd.losses.ATLoss`, :class:`~lightning_kd.losses.RKDLoss`, or any module
            ``(student_feature, teacher_feature) -> Tensor``. A loss whose class sets
            ``needs_adapter = True`` (FitNet) gets a trained adapter from the student feature's shape
            to the teacher's, of the kind its ``adapter`` attribute names (a ``Linear`` on the last
            dimension for sequence features). A loss whose class (or which, for a function) sets
            ``accepts_mask = True`` is called as ``loss(s, t, mask=mask)`` on sequence features; a
            loss without it cannot be given a token mask.
        teacher_layers: a layer name or a list of them, as in the teacher's ``named_modules()``.
        student_layers: as many student layers, paired with the teacher's in order.
        weight: the term's weight, finite and >= 0.
        layout: how the features are laid out (see :func:`feature_layout`): ``"auto"`` (a 3-D
            feature whose ``(B, S)`` is the token mask's is a sequence, all else channels first),
            ``"sequence"`` (hidden states ``(B, S, D)``, also without a mask: then every token is
            valid), or ``"channels_first"`` (maps ``(B, C, *spatial)`` or vectors ``(B, D)``: the
            mask is not used).

    Raises:
        TypeError: if ``loss`` is not callable.
        ValueError: for empty or unpaired layer lists, a weight that is not finite and >= 0, or an
            unknown ``layout``.

    Example::

        >>> from lightning_kd.losses import FitNetLoss
        >>> FeatureTerm(FitNetLoss(), "features.3", "hidden.1", weight=100.0)
        FeatureTerm(FitNetLoss(adapter='auto'), teacher_layers=['features.3'], student_layers=['hidden.1'], weight=100.0)
    """

    def __init__(self, loss: Callable[[Tensor, Tensor], Tensor], teacher_layers: str | Sequence[str], student_layers: str | Sequence[str],
                 weight: float = 1.0, *, layout: Layout = "auto") -> None:
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
        if layout not in LAYOUTS:
            raise ValueError(f"Unknown feature `layout` {layout!r}. Expected one of {', '.join(LAYOUTS)}.")
        self.layout = layout
        self.needs_adapters = bool(getattr(loss, "needs_adapter", False))
        self.accepts_mask = bool(getattr(loss, "accepts_mask", False))
        self.adapter = getattr(loss, "adapter", "auto")

    def __repr__(self) -> str:
        # the default layout is left out: checkpoints record this text, and older ones have no layout
        layout = "" if self.layout == "auto" else f", layout={self.layout!r}"
        return (f"FeatureTerm({self.loss!r}, teacher_layers={self.teacher_layers}, student_layers={self.student_layers}, "
                f"weight={self.weight}{layout})")


def _layers(layers: str | Sequence[str], name: str) -> list[str]:
    if isinstance(layers, str):
        layers = [layers]
    if not layers or not all(isinstance(layer, str) for layer in layers):
        raise ValueError(f"Expected `{name}` to be a layer name or a non-empty list of them, but got {layers!r}.")
    return list(layers)


def feature_layout(layout: Layout, shape: Sequence[int], mask_shape: Sequence[int] | None, *, where: str = "the feature") -> str:
    """``"sequence"`` or ``"channels_first"``: how to read a feature of ``shape`` given a token mask of ``mask_shape``.

    - ``"channels_first"``: always (the mask, if any, is not used).
    - ``"sequence"``: the feature must be ``(B, S, D)``, with ``(B, S)`` the mask's shape when there is a mask.
    - ``"auto"``: without a mask, channels first. With a mask ``(B, S)``: a 3-D feature ``(B, S, D)`` is a
      sequence; a 3-D feature of any other leading shape is an error (a conv map ``(B, C, L)`` beside token
      inputs, or a mask of the wrong length: say which with ``layout``); other ranks (a pooled ``(B, D)``,
      a map ``(B, C, H, W)``) are channels first.

    Raises:
        ValueError: for a feature that ``layout`` cannot read, naming ``where``.

    Example::

        >>> feature_layout("auto", (2, 7, 32), (2, 7)), feature_layout("auto", (2, 7, 32), None)
        ('sequence', 'channels_first')
    """
    shape = tuple(shape)
    mask_shape = None if mask_shape is None else tuple(mask_shape)
    if layout == "channels_first":
        return "channels_first"
    if layout == "sequence":
        if len(shape) != 3 or (mask_shape is not None and shape[:2] != mask_shape):
            against = "" if mask_shape is None else f" with (B, S) = the token mask's {mask_shape}"
            raise ValueError(f"Expected {where} to be a sequence (B, S, D){against} (layout='sequence'), but got {shape}.")
        return "sequence"
    if mask_shape is None or len(shape) != 3:
        return "channels_first"
    if shape[:2] == mask_shape:
        return "sequence"
    raise ValueError(
        f"{where[0].upper()}{where[1:]} has shape {shape}, which does not start with the token mask's (B, S) = {mask_shape}: "
        "beside token inputs, a 3-D feature that is not a sequence of the mask's length is ambiguous. Set the term's "
        "`layout`: 'channels_first' for a conv map (B, C, L), or 'sequence' for hidden states (and pass the mask of the "
        "inputs that made them, before any causal shift)."
    )


def token_mask(inputs: Any, student_out: Tensor) -> Tensor | None:
    """The token mask to give :meth:`FeatureDistillation.build_adapters` and :meth:`~FeatureDistillation.losses` for a batch.

    Sequence outputs ``(B, S, V)`` (a language model): bool ``(B, S)``, the inputs' ``attention_mask != 0``
    where they have one (a dict), else every token valid. It is the mask of the *inputs*, not of the
    targets: the causal shift drops each sequence's last token from the targets, but its hidden
    states are as valid as the others'. Other outputs (``(N, C)`` classification): None, and every
    feature is read channels first.

    Example::

        >>> ids = torch.tensor([[5, 6, 7], [5, 6, 0]])
        >>> token_mask({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}, torch.zeros(2, 3, 11))
        tensor([[ True,  True,  True],
                [ True,  True, False]])
        >>> token_mask(ids, torch.zeros(2, 3, 11)).all().item(), token_mask(torch.randn(2, 40), torch.zeros(2, 10))
        (True, None)
    """
    if not isinstance(student_out, Tensor) or student_out.dim() < 3:
        return None
    attention = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if isinstance(attention, Tensor):
        return attention != 0
    return torch.ones(student_out.shape[:2], dtype=torch.bool, device=student_out.device)


def _check_token_mask(mask: Tensor | None) -> Tensor | None:
    if mask is not None and (not isinstance(mask, Tensor) or mask.is_floating_point() or mask.is_complex() or mask.dim() != 2):
        what = f"a {mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"Expected `mask` to be a bool tensor (B, S), True at the valid tokens, or None, but got {what}.")
    return None if mask is None else mask.to(torch.bool)


class FeatureDistillation(nn.Module):
    """Hooks on the teacher's and the student's layers, the feature terms, and FitNet's adapters.

    Args:
        teacher: the teacher (layer names relative to it).
        student: the student (layer names relative to it).
        terms: ``{key: FeatureTerm}``; the key names the term in the logs (``train/feature_<key>``).

    The caller's cycle: :meth:`attach` once; if :attr:`needs_adapters`, one forward of both models
    and :meth:`build_adapters` (with the token mask of that batch, for sequence models); then per
    step the two forwards, :meth:`losses` (with the batch's token mask), :meth:`weighted_sum` and
    :meth:`clear`; :meth:`detach` at the end.

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
        # {key: (student_shape, teacher_shape, layout)}: what rebuilds the adapters from a checkpoint
        self.adapter_shapes: dict[str, tuple[list[int], list[int], str]] = {}
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

    def build_adapters(self, shapes: Mapping[str, Sequence[Sequence[int] | str]] | None = None, *, mask: Tensor | None = None) -> None:
        """Build FitNet's adapters from the features captured by the last forward of both models (or from ``shapes``).

        Args:
            shapes: ``{key: (student_shape, teacher_shape, layout)}`` as :attr:`adapter_shapes` records
                them (a checkpoint's); entries without a layout (older checkpoints) are channels first.
            mask: the token mask ``(B, S)`` of the batch that made the captured features (sequence
                models), as :meth:`losses` will get; only its shape is read. Ignored with ``shapes``.

        Raises:
            ValueError: for features that a term's ``layout`` cannot read (see :func:`feature_layout`),
                or a ``conv`` adapter asked for sequence features.
            TypeError: for a ``mask`` that is not a 2-D bool or integer tensor.
        """
        mask = _check_token_mask(mask)
        kinds = {f"{key}_{i}": term.adapter for key, term in self._items() for i in range(len(term.teacher_layers))}
        if shapes is None:
            shapes = {}
            for key, term in self._items():
                if term.needs_adapters:
                    for i, (t_layer, s_layer) in enumerate(zip(term.teacher_layers, term.student_layers)):
                        s, t = self._hooks["student"][s_layer], self._hooks["teacher"][t_layer]
                        layout = self._pair_layout(term, s, t, mask, s_layer, t_layer)
                        shapes[f"{key}_{i}"] = (list(s.shape), list(t.shape), layout)
        for key, (student_shape, teacher_shape, *rest) in shapes.items():
            layout = rest[0] if rest else "channels_first"
            kind = kinds.get(key, "auto")
            if layout == "sequence":
                if kind == "conv":
                    raise ValueError(
                        f"Adapter {key!r}: a conv adapter maps channels-first maps, but the features are sequences "
                        f"{tuple(student_shape)} -> {tuple(teacher_shape)}. Use FitNetLoss(adapter='auto') or 'linear'."
                    )
                kind = "linear"  # (B, S, Ds) -> (B, S, Dt), token by token: padding cannot leak into valid tokens
            self.adapters[key] = build_adapter(student_shape, teacher_shape, kind)
            self.adapter_shapes[key] = (list(student_shape), list(teacher_shape), str(layout))

    # -------------------------------------------------------------- losses
    def losses(self, mask: Tensor | None = None) -> dict[str, Tensor]:
        """``{key: unweighted term}`` from the features captured by the last forward of both models.

        Args:
            mask: the token mask ``(B, S)`` of the batch (True, or nonzero, at the valid tokens; the
                inputs' attention mask, before any causal shift), or None for inputs without tokens.
                Sequence features (see :func:`feature_layout`) get it, all-True when it is None and
                the term's layout says ``"sequence"``; channels-first features do not.

        Raises:
            TypeError: for a ``mask`` that is not a 2-D bool or integer tensor, or a mask to give to a
                loss that does not accept one (no ``accepts_mask``).
            ValueError: for features that a term's ``layout`` cannot read.
            RuntimeError: if a term's features are not laid out as when its adapter was built (a mask
                given here but not to :meth:`build_adapters`, or the other way round).
        """
        mask = _check_token_mask(mask)
        student, teacher = self._hooks["student"], self._hooks["teacher"]
        values: dict[str, Tensor] = {}
        for key, term in self._items():
            total: Tensor | None = None
            for i, (t_layer, s_layer) in enumerate(zip(term.teacher_layers, term.student_layers)):
                s, t = student[s_layer], teacher[t_layer].detach()
                layout = self._pair_layout(term, s, t, mask, s_layer, t_layer)
                if term.needs_adapters:
                    built = self.adapter_shapes.get(f"{key}_{i}", (None, None, layout))[2]
                    if built != layout:
                        raise RuntimeError(
                            f"The adapter of feature term {key!r} ({s_layer!r} -> {t_layer!r}) was built for {built} features, "
                            f"but this step's are read as {layout} ({'with' if mask is not None else 'without'} a token mask). "
                            "Give `build_adapters(mask=...)` the same kind of mask as `losses(mask=...)`, or set the term's `layout`."
                        )
                    s = self.adapters[f"{key}_{i}"](s)
                value = self._loss(term, key, s, t, layout, mask)
                total = value if total is None else total + value
            values[key] = total
        return values

    def _pair_layout(self, term: FeatureTerm, s: Tensor, t: Tensor, mask: Tensor | None, s_layer: str, t_layer: str) -> str:
        mask_shape = None if mask is None else mask.shape
        s_layout = feature_layout(term.layout, s.shape, mask_shape, where=f"the student feature of {s_layer!r}")
        t_layout = feature_layout(term.layout, t.shape, mask_shape, where=f"the teacher feature of {t_layer!r}")
        if s_layout != t_layout:
            raise ValueError(
                f"The student feature of {s_layer!r} {tuple(s.shape)} reads as {s_layout}, but the teacher feature of {t_layer!r} "
                f"{tuple(t.shape)} as {t_layout}: pair layers of one kind, or set the term's `layout`."
            )
        return s_layout

    @staticmethod
    def _loss(term: FeatureTerm, key: str, s: Tensor, t: Tensor, layout: str, mask: Tensor | None) -> Tensor:
        if layout != "sequence":
            return term.loss(s, t)  # conv maps and vectors: as before sequences existed
        if term.accepts_mask:
            valid = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device) if mask is None else mask
            return term.loss(s, t, mask=valid)
        if mask is None:
            return term.loss(s, t)
        raise TypeError(
            f"Feature term {key!r} has sequence features and a token mask, but its loss {type(term.loss).__name__} does not "
            "accept `mask` (padded tokens would enter it). Give it a keyword `mask` ((B, S), True at valid tokens) and "
            "`accepts_mask = True`, or set the term's layout='channels_first' to call it without one."
        )

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
