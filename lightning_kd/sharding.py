"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``): which parts of a model become
FSDP units, and the full state dict of a sharded model.

Plain torch: no Lightning. :class:`~lightning_kd.DistillationModule` calls :func:`shard_model` from its
``configure_model`` under Lightning's ``ModelParallelStrategy``; anyone can call it in their own loop.

The rule of :func:`shard_units`, the default for the zoo's models and for Hugging Face ones: every
module held in an ``nn.ModuleList`` or ``nn.ModuleDict`` (the usual container of transformer blocks,
GPT-2's ``h``, Llama's ``layers``, and of an ensemble's members) is its own unit; a model without such a
container gets one unit per direct child that holds parameters; the model itself is the last unit and
holds what is left (embeddings, final norm, output layer). A unit's parameters are gathered when its
``forward`` is called, so a model that uses a submodule's weights without calling it needs its own rule
(override :meth:`~lightning_kd.DistillationModule.shard_student` / ``shard_teacher``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from lightning_kd.io import atomic_write

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

TeacherSharding = Literal["shard", "replicate"]
TEACHER_SHARDING: tuple[str, ...] = ("shard", "replicate")


def check_teacher_sharding(value: object) -> str:
    """``value`` if it is one of :data:`TEACHER_SHARDING`.

    Raises:
        ValueError: naming ``teacher_sharding`` and the allowed values.
    """
    if not isinstance(value, str) or value not in TEACHER_SHARDING:
        raise ValueError(f"Expected `teacher_sharding` to be one of {', '.join(map(repr, TEACHER_SHARDING))}, but got {value!r}.")
    return value


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules of ``model`` that become their own FSDP unit, in module order (the model itself not included).

    Example::

        >>> from lightning_kd.models import get_model
        >>> [type(m).__name__ for m in shard_units(get_model("mlp"))]
        ['Sequential', 'Linear']
        >>> len(shard_units(get_model("gpt_student")))  # one unit per transformer block
        2
    """
    containers: list[str] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(c + ".") or c == "" for c in containers)
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)) and not inside:
            containers.append(name)
    if containers:
        return [child for c in containers for child in model.get_submodule(c).children() if _has_parameters(child)]
    return [child for child in model.children() if _has_parameters(child)]


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def shard_model(model: nn.Module, mesh: DeviceMesh, *, reshard_after_forward: bool | None = None) -> None:
    """``fully_shard`` each of :func:`shard_units` and then ``model`` itself, over the 1-D ``mesh``, in place.

    Args:
        model: the model; its parameters become ``DTensor`` shards (``model`` becomes an ``FSDPModule``).
        mesh: a 1-D device mesh of the data-parallel ranks.
        reshard_after_forward: FSDP2's: None (its default) frees each unit's gathered weights after its forward
            but keeps the model's own until the backward pass; True frees those too (a frozen teacher, which has
            no backward pass, would otherwise keep them gathered).

    Raises:
        ValueError: if ``mesh`` is not 1-D.
    """
    from torch.distributed.fsdp import fully_shard

    if mesh.ndim != 1:
        raise ValueError(f"Expected a 1-D device mesh (the data-parallel ranks), but got one of shape {tuple(mesh.shape)}.")
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)


def is_sharded(model: nn.Module | None) -> bool:
    """Whether ``model`` (or a submodule) is sharded by FSDP2: ``fully_shard`` was applied to it."""
    if model is None:
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's whole state dict as plain CPU tensors; for a sharded model on rank 0 only (others: ``{}``).

    A sharded model's weights are gathered with ``torch.distributed.checkpoint.state_dict.get_model_state_dict``
    (``full_state_dict=True, cpu_offload=True``): a collective, so every rank must call this, in the same order.
    """
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    return {key: value.detach().cpu() for key, value in state.items()}


def save_full_state_dict(model: nn.Module, path: str | os.PathLike[str], *, rank: int = 0) -> None:
    """Save ``model``'s whole state dict (:func:`full_state_dict`) as a plain tensor dict, written on rank 0.

    The file loads with ``torch.load(path, weights_only=True)`` into a fresh, unsharded model
    (``model.load_state_dict(...)``). Written atomically: a crash leaves the previous file or the new one.

    Args:
        model: the model, sharded or not; every rank calls this (gathering a sharded one is a collective).
        path: the file.
        rank: this process's global rank: only rank 0 writes.
    """
    state = full_state_dict(model)
    if rank == 0:
        atomic_write(path, lambda f: torch.save(state, f))
