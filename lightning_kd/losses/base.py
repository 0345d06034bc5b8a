"""The base class of the logit losses: options in the constructor, needs declared on the class.

A loss object is what :class:`~lightning_kd.DistillationModule` is given (``soft_loss=DKDLoss(beta=8.0)``,
or ``soft_loss: {_target_: lightning_kd.losses.DKDLoss, beta: 8.0}`` in a config): its class
attributes say what it needs, so no caller tests a loss by name. Each subclass is a thin module
over its functional twin (``forward`` is one call), like ``nn.KLDivLoss`` over ``F.kl_div``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from lightning_kd._checks import check_bool
from lightning_kd.losses._reduction import Temperature, check_temperature
from lightning_kd.losses.ctkd import LearnableTemperature


class LogitLoss(nn.Module):
    """A loss between student and teacher logits ``(N, C)`` or ``(B, S, C)``, averaged over valid positions.

    ``forward(student_logits, teacher_logits, targets=None, *, mask=None)``: the student first.

    Class attributes (what a loss needs, read by the module and the metrics):
        needs_targets: a class index per position (DKD); the module gives unlabeled inputs the
            teacher's top-1 class.
        uses_temperature: the loss has a softmax temperature (not the logit MSE).
        accepts_topk: the teacher may be :class:`~lightning_kd.losses.TopKLogits` (a top-k store).
        compares_distributions: student and teacher outputs are distributions to compare (top-1
            agreement and KL are logged).

    Args:
        temperature: :math:`T > 0`, finite, or a :class:`~lightning_kd.losses.LearnableTemperature`
            (CTKD), whose parameter is then trained with the student.
        scale_by_t2: multiply by :math:`T^2` (Hinton et al.).
        standardize: z-score both logit vectors before the temperature (logit standardisation).

    Raises:
        ValueError: for a temperature that is not a finite number > 0.
        TypeError: for a temperature that is neither a number nor a ``LearnableTemperature``, or a
            ``scale_by_t2``/``standardize`` that is not a bool (``"no"`` would switch it on).
    """

    needs_targets: ClassVar[bool] = False
    uses_temperature: ClassVar[bool] = True
    accepts_topk: ClassVar[bool] = False
    compares_distributions: ClassVar[bool] = True

    def __init__(self, temperature: float | LearnableTemperature = 1.0, *, scale_by_t2: bool = True, standardize: bool = False) -> None:
        super().__init__()
        object.__setattr__(self, "_temperature", None)
        if self.uses_temperature:
            self.temperature = temperature
        self.scale_by_t2 = scale_by_t2
        self.standardize = standardize

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "temperature":  # nn.Module would register a module value under the name, bypassing the checks
            self._set_temperature(value)
        elif name in ("scale_by_t2", "standardize"):  # also when a schedule or a user sets it later
            super().__setattr__(name, check_bool(value, name))
        else:
            super().__setattr__(name, value)

    @property
    def temperature(self) -> float | LearnableTemperature:
        """The temperature: a float, or the :class:`LearnableTemperature` module that learns it.

        Raises:
            AttributeError: for a loss without a temperature (:class:`SoftMSELoss`).
        """
        if not self.uses_temperature:
            raise AttributeError(f"{type(self).__name__} has no temperature (its logits enter the loss as they are).")
        return self._modules.get("temperature") or self._temperature

    def _set_temperature(self, value: float | LearnableTemperature) -> None:
        if not self.uses_temperature:
            raise AttributeError(f"{type(self).__name__} has no temperature (its logits enter the loss as they are).")
        if isinstance(value, LearnableTemperature):
            self._modules["temperature"] = value  # a submodule: its parameter trains with the student
            object.__setattr__(self, "_temperature", None)
            return
        if "temperature" in self._modules:
            raise RuntimeError(
                "The temperature is learned (a LearnableTemperature), so it cannot be set or annealed. Anneal its "
                "`grl_weight` instead (`soft_loss.temperature.grl_weight`), or give the loss a number."
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"Expected `temperature` to be a number or a LearnableTemperature, but got {type(value).__name__}.")
        check_temperature(value)
        object.__setattr__(self, "_temperature", float(value))

    @property
    def learned(self) -> bool:
        """Whether the temperature is learned (CTKD)."""
        return "temperature" in self._modules

    def current_temperature(self) -> Temperature:
        """What the functional loss gets: the float, or the learned temperature's 0-d tensor (with its graph)."""
        learned = self._modules.get("temperature")
        return learned() if learned is not None else self._temperature

    def forward(self, student_logits: Tensor, teacher_logits: Any, targets: Tensor | None = None, *, mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def _shared(self) -> dict[str, Any]:
        return {"temperature": self.current_temperature(), "scale_by_t2": self.scale_by_t2, "standardize": self.standardize}

    def _options(self) -> dict[str, Any]:
        """The loss's own options, for ``repr``."""
        return {}

    def extra_repr(self) -> str:
        options = {**({"temperature": self._temperature} if not self.learned and self.uses_temperature else {}),
                   **self._options(), "scale_by_t2": self.scale_by_t2, "standardize": self.standardize}
        if not self.uses_temperature:
            options.pop("scale_by_t2")
        return ", ".join(f"{k}={v!r}" for k, v in options.items())
