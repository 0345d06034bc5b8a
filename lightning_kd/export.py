"""Ship the student: its weights as ``safetensors`` and the model as ONNX, checked with onnxruntime.

What is written loads without Lightning, without lightning-kd and without the teacher:
``student.safetensors`` holds the plain student's state dict (no teacher, no FitNet adapters, no
optimizer state), so that ``student.load_state_dict(safetensors.torch.load_file(path))`` restores it;
``student.onnx`` is the student's forward pass, exported by ``torch.onnx.export(..., dynamo=True)`` with
a dynamic batch axis (and a dynamic sequence axis for token inputs), run by ``onnxruntime``;
``export.json`` says what was exported from where, the inputs, the opset, the difference to PyTorch
that was measured and the versions.

Plain torch, safetensors, onnx and onnxruntime: no Lightning. Only rebuilding a student from the
configuration a ``lightning-kd`` run recorded uses Hydra's ``instantiate``.
"""

from __future__ import annotations

import itertools
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lightning_kd._checks import check_bool, check_number
from lightning_kd.checkpoint import load_checkpoint
from lightning_kd.io import atomic_write, atomic_write_json, file_sha256, read_json
from lightning_kd.teachers import call_model, cast_inputs, extract_logits
from lightning_kd.weights import load_weights

Format = Literal["safetensors", "onnx"]
FORMATS: tuple[Format, ...] = ("safetensors", "onnx")
FILES = {"safetensors": "student.safetensors", "onnx": "student.onnx"}
MANIFEST = "export.json"
# The names of the dynamic axes in the manifest: dim 0 of every input, dim 1 of integer (token) inputs.
BATCH_AXIS, SEQUENCE_AXIS = "batch", "sequence"

Inputs = Tensor | Mapping[str, Tensor]


def export_student(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    example_input: Inputs,
    formats: Sequence[Format] = FORMATS,
    student: nn.Module | None = None,
    check_inputs: Iterable[Inputs] = (),
    atol: float = 1e-5,
    opset: int | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Export the student of a distillation ``checkpoint`` to ``out_dir``; return ``{format: path, "manifest": path}``.

    The ONNX model is run with onnxruntime on ``example_input``, on the same input repeated to twice
    its batch size (the batch axis is dynamic) and on each of ``check_inputs`` (e.g. the test set), and
    compared with the PyTorch student. Nothing is written before every check has passed, and each file
    is written atomically.

    Args:
        checkpoint: a Lightning checkpoint of a ``lightning-kd`` stage (its ``student.*`` weights) or a
            state-dict file of the plain student (a stage's ``model.pt``). Read with
            ``torch.load(weights_only=True)``: a file holding pickled objects is refused.
        out_dir: where ``student.safetensors``, ``student.onnx`` and ``export.json`` go.
        example_input: one batch of the student's inputs (a tensor, or a dict of keyword inputs such
            as ``input_ids`` and ``attention_mask``); it traces the ONNX graph. Axis 0 of every input is
            exported as dynamic, and axis 1 of integer inputs (token sequences) too.
        formats: any of ``"safetensors"`` and ``"onnx"``.
        student: the student's architecture; its weights are replaced by the checkpoint's (in place).
            None: rebuilt from the configuration the ``lightning-kd`` run recorded beside the checkpoint
            (``stage_config.json`` of the stage folder).
        check_inputs: more batches to compare ONNX and PyTorch on.
        atol: the largest absolute difference between onnxruntime's and PyTorch's outputs that is accepted.
        opset: the ONNX opset; None: the exporter's default.
        overwrite: replace files of an earlier export in ``out_dir``.

    Returns:
        The written files: ``{"safetensors": ..., "onnx": ..., "manifest": ...}`` (the formats asked for).

    Raises:
        TypeError: for ``formats`` given as one string, a ``student`` that is not an ``nn.Module``, an
            ``example_input`` that is neither a tensor nor a dict of tensors, or a non-numeric ``atol``.
        ValueError: for an unknown or no format (naming the allowed ones), a negative ``atol``, an
            empty example batch, or ``student=None`` for a checkpoint outside a ``lightning-kd`` run.
        FileExistsError: if an output file exists and ``overwrite`` is False (nothing is written).
        FileNotFoundError, CheckpointError: for a missing, damaged or pickled checkpoint (see
            :func:`~lightning_kd.checkpoint.load_checkpoint`).
        RuntimeError: if the checkpoint does not hold exactly this student's weights, or onnxruntime's
            outputs differ from PyTorch's by more than ``atol`` (nothing is written).

    Example::

        import torch
        from lightning_kd import export_student
        from lightning_kd.models import get_model

        files = export_student("outputs/pipeline/2026-12-03_08-00-00/student_distilled/checkpoints/last.ckpt",
                               "shipped", example_input=torch.randn(8, 40), student=get_model("mlp"))
    """
    formats = check_formats(formats)
    atol = check_number(atol, "atol")
    if not atol >= 0:
        raise ValueError(f"Expected `atol` to be >= 0, but got {atol}.")
    overwrite = check_bool(overwrite, "overwrite")
    _check_inputs(example_input, "example_input")
    out_dir = Path(out_dir).expanduser()
    targets = {fmt: out_dir / FILES[fmt] for fmt in formats} | {"manifest": out_dir / MANIFEST}
    existing = [str(path) for path in targets.values() if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"Not exporting over an earlier export: {', '.join(existing)} exist(s). Choose another `out_dir`, "
            "or pass `overwrite=True` to replace them."
        )
    path = Path(checkpoint).expanduser()
    model = load_student(path, student)
    example_input = cast_inputs(example_input, model)  # float inputs in the model's dtype: the graph's input type
    manifest: dict[str, Any] = {
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "architecture": recorded_architecture(path),  # what the run recorded, if it was a lightning-kd run
        "parameters": sum(p.numel() for p in model.parameters()),
        "source": {"checkpoint": str(path.resolve()), "sha256": file_sha256(path)},
        "formats": list(formats),
        "inputs": _describe_inputs(example_input),
        "files": {},
        "versions": _versions(),
    }
    payloads: dict[str, bytes] = {}
    if "onnx" in formats:
        program = _to_onnx(model, example_input, opset)
        payloads["onnx"] = program.SerializeToString()
        session = onnx_session(payloads["onnx"])
        worst, batches, samples = 0.0, 0, 0
        for inputs in itertools.chain([example_input, _doubled(example_input)], check_inputs):  # one batch in memory at a time
            _check_inputs(inputs, "check_inputs")
            worst = max(worst, onnx_max_abs_diff(session, model, inputs))
            batches, samples = batches + 1, samples + _batch_size(inputs)
        if not worst <= atol:
            raise RuntimeError(
                f"The ONNX export of {type(model).__name__} differs from PyTorch by up to {worst:.3g} (max abs difference "
                f"over {batches} batches), more than `atol`={atol:g}: nothing was written. Check the model for "
                "operations that depend on Python values (they are traced as constants), or raise `atol`."
            )
        if not isinstance(example_input, Mapping):  # a positional input is named after the forward's argument
            manifest["inputs"][0]["name"] = session.get_inputs()[0].name
        manifest["onnx"] = {
            "opset": next((o.version for o in program.opset_import if o.domain in ("", "ai.onnx")), None),
            "exporter": "torch.onnx.export(dynamo=True)",
            "input_names": [i.name for i in session.get_inputs()],
            "output_names": [o.name for o in session.get_outputs()],
            "max_abs_diff": worst,
            "atol": atol,
            "checked_batches": batches,
            "checked_samples": samples,
        }
    if "safetensors" in formats:
        from safetensors.torch import save

        # Cloned: tied weights (a GPT's shared embedding and output layer) are stored under both names, so that a
        # plain `load_state_dict` fills both; safetensors refuses tensors that share memory.
        tensors = {key: value.detach().cpu().contiguous().clone() for key, value in model.state_dict().items()}
        payloads["safetensors"] = save(tensors, metadata={"format": "pt", "producer": f"lightning-kd {_version('lightning-kd')}"})
    for fmt, payload in payloads.items():
        atomic_write(targets[fmt], lambda f, payload=payload: f.write(payload))
        manifest["files"][fmt] = {"path": FILES[fmt], "bytes": len(payload), "sha256": file_sha256(targets[fmt])}
    atomic_write_json(targets["manifest"], manifest)
    return targets


def check_formats(formats: Any) -> tuple[Format, ...]:
    """``formats`` as a tuple without repeats.

    Raises:
        TypeError: for one string (``"onnx"`` would read as four letters) or a non-iterable.
        ValueError: for no format or an unknown one, naming the allowed ones.
    """
    if isinstance(formats, str) or not isinstance(formats, Iterable):
        raise TypeError(
            f"Expected `formats` to be a sequence of format names such as ('onnx',), but got {formats!r} "
            f"({type(formats).__name__}). Allowed formats: {', '.join(FORMATS)}."
        )
    formats = list(formats)
    unknown = [fmt for fmt in formats if fmt not in FORMATS]
    if unknown or not formats:
        got = f"unknown format(s) {unknown}" if unknown else "no format"
        raise ValueError(f"Expected `formats` to hold any of {', '.join(FORMATS)}, but got {got}.")
    return tuple(dict.fromkeys(formats))


def load_student(checkpoint: str | os.PathLike[str], student: nn.Module | None = None) -> nn.Module:
    """The student of ``checkpoint`` in eval mode: ``student`` (or the run's recorded architecture) with its weights.

    Only the checkpoint's student is read (``student.*`` of a Lightning checkpoint, every key of a plain
    state dict), and it must match the architecture key for key: a smaller model is refused rather than
    loaded with part of the weights.

    Raises:
        TypeError: if ``student`` is not an ``nn.Module``.
        ValueError: if ``student`` is None and no ``lightning-kd`` run recorded the checkpoint's architecture.
        FileNotFoundError, CheckpointError: for a missing, damaged or pickled file.
        RuntimeError: if the weights do not fit the architecture (missing, extra or differently shaped keys).
    """
    path = Path(checkpoint).expanduser()
    if student is None:
        architecture = recorded_architecture(path)
        if architecture is None:
            raise ValueError(
                f"Cannot rebuild the student of {str(path)!r}: no `stage_config.json` of a lightning-kd run beside it. "
                "Pass its architecture as `student=` (e.g. `lightning_kd.models.get_model('mlp')`); the checkpoint's "
                "weights replace its own."
            )
        from hydra.utils import instantiate  # the run's config is Hydra's; only this path needs it

        student = instantiate(architecture, _convert_="all")
    if not isinstance(student, nn.Module):
        raise TypeError(f"Expected `student` to be an nn.Module (the architecture to load the weights into), but got {type(student).__name__}.")
    checkpoint_dict = load_checkpoint(path, what="student checkpoint")
    # A Lightning checkpoint holds the module: its student under `student.` (never `teacher.`, even when the
    # teacher was kept in it); anything else is the plain student's state dict.
    lightning = isinstance(checkpoint_dict, dict) and "state_dict" in checkpoint_dict
    del checkpoint_dict
    return load_weights(student, path, prefix="student." if lightning else "", exact=True).eval()


def recorded_architecture(checkpoint: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The model config (``{"_target_": ..., ...}``) a ``lightning-kd`` run recorded for the stage of ``checkpoint``.

    Looked up in the stage folder of ``<stage>/checkpoints/*.ckpt``, ``<stage>/model.pt`` or
    ``<stage>/hpc_ckpt_N.ckpt``: its ``stage_config.json`` (or ``result.json``). The teacher stage's
    model is the teacher; every other stage's is the student. None outside a run.
    """
    from lightning_kd.runs import RECORD, RESULT  # the run's bookkeeping names

    path = Path(checkpoint).expanduser().resolve()
    for stage_dir in (path.parent, path.parent.parent):
        if (stage_dir / RECORD).is_file():
            record = read_json(stage_dir / RECORD, what="stage record")
        elif (stage_dir / RESULT).is_file():
            record = read_json(stage_dir / RESULT, what="stage result").get("stage_config")
        else:
            continue
        if not isinstance(record, dict) or "config" not in record:
            return None
        role = "teacher" if record.get("stage") == "teacher" else "student"
        return (record["config"].get(role) or {}).get("model")
    return None


# ------------------------------------------------------------------------------ onnxruntime


def onnx_session(model: str | os.PathLike[str] | bytes, *, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of ``model`` (a file or its bytes), with ``threads`` intra-op threads.

    Default: as many as torch uses (``torch.get_num_threads()``), so that latencies compare like for like.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def onnx_feed(session: Any, inputs: Inputs) -> dict[str, np.ndarray]:
    """``inputs`` as onnxruntime's ``{input name: array}`` for ``session``.

    Raises:
        ValueError: if a dict lacks one of the session's inputs, or one tensor is given to a model with several inputs.
    """
    names = [i.name for i in session.get_inputs()]
    if isinstance(inputs, Mapping):
        missing = [name for name in names if name not in inputs]
        if missing:
            raise ValueError(f"The ONNX model takes the inputs {names}, but the batch has no {missing} (it has {sorted(inputs)}).")
        return {name: inputs[name].detach().cpu().numpy() for name in names}
    if len(names) != 1:
        raise ValueError(f"The ONNX model takes the inputs {names}: give a dict of them, not one tensor.")
    return {names[0]: inputs.detach().cpu().numpy()}


@torch.no_grad()
def onnx_max_abs_diff(session: Any, model: nn.Module, inputs: Inputs) -> float:
    """The largest absolute difference between onnxruntime's first output and ``model``'s logits on ``inputs``.

    NaN in one output but not the other counts as an infinite difference; NaN in both is no difference.

    Raises:
        RuntimeError: if the two outputs differ in shape.
    """
    inputs = cast_inputs(inputs, model)
    expected = extract_logits(call_model(model, inputs)).detach().cpu().double().numpy()
    got = np.asarray(session.run(None, onnx_feed(session, inputs))[0], dtype=np.float64)
    if got.shape != expected.shape:
        raise RuntimeError(f"The ONNX model returns shape {got.shape} where PyTorch returns {expected.shape}.")
    if got.size == 0:
        return 0.0
    with np.errstate(invalid="ignore"):
        diff = np.abs(got - expected)
    diff[(got == expected) | (np.isnan(got) & np.isnan(expected))] = 0.0  # equal infinities, NaN in both
    return float(np.nan_to_num(diff, nan=np.inf).max())


# ------------------------------------------------------------------------------ helpers


def _to_onnx(model: nn.Module, example: Inputs, opset: int | None) -> Any:
    """The ``onnx.ModelProto`` of ``model`` traced on ``example`` by the dynamo exporter, with dynamic axes."""
    args, kwargs = ((), dict(example)) if isinstance(example, Mapping) else ((example,), None)
    dynamic = {name: _axes(t) for name, t in example.items()} if isinstance(example, Mapping) else (_axes(example),)
    try:
        program = torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic, opset_version=opset,
                                    output_names=["logits"], verbose=False)
    except Exception as err:
        raise RuntimeError(
            f"torch.onnx.export (dynamo) could not export {type(model).__name__} with a dynamic batch axis "
            f"(and a dynamic sequence axis for integer inputs): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    proto = program.model_proto
    _name_dynamic_axes(proto)
    return proto


def _name_dynamic_axes(proto: Any) -> None:
    """Rename the exporter's symbols of the inputs' dynamic axes (``s43``) to ``batch`` and ``sequence``, wherever
    they stand alone in the graph's shapes: what onnxruntime and Netron show the user."""
    labels = (BATCH_AXIS, SEQUENCE_AXIS)
    names: dict[str, str] = {}
    for value in proto.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim[:2]):
            if dim.dim_param:
                names.setdefault(dim.dim_param, labels[axis])
    for value in itertools.chain(proto.graph.input, proto.graph.output, proto.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


def _axes(tensor: Tensor) -> dict[int, Any]:
    # DYNAMIC, not AUTO: a model that fixes the batch size is refused by the exporter instead of exported static.
    dynamic = torch.export.Dim.DYNAMIC
    return {0: dynamic, 1: dynamic} if _is_sequence(tensor) else {0: dynamic}


def _is_sequence(tensor: Tensor) -> bool:
    return not tensor.is_floating_point() and tensor.ndim >= 2


def _check_inputs(inputs: Any, name: str) -> None:
    tensors = list(inputs.values()) if isinstance(inputs, Mapping) else [inputs]
    if not tensors or not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError(f"Expected `{name}` to be a tensor or a dict of tensors (keyword inputs), but got {type(inputs).__name__}.")
    if any(t.ndim == 0 or t.shape[0] == 0 for t in tensors):
        raise ValueError(f"Expected `{name}` to be a batch of at least one example, but got shapes {[tuple(t.shape) for t in tensors]}.")


def _describe_inputs(inputs: Inputs) -> list[dict[str, Any]]:
    named = inputs.items() if isinstance(inputs, Mapping) else [(None, inputs)]
    return [{"name": name, "dtype": str(t.dtype).removeprefix("torch."), "example_shape": list(t.shape),
             "dynamic_axes": {"0": BATCH_AXIS, **({"1": SEQUENCE_AXIS} if _is_sequence(t) else {})}} for name, t in named]


def _doubled(inputs: Inputs) -> Inputs:
    """The batch twice over: another batch size than the one the graph was traced with."""
    if isinstance(inputs, Mapping):
        return {name: torch.cat([t, t]) for name, t in inputs.items()}
    return torch.cat([inputs, inputs])


def _batch_size(inputs: Inputs) -> int:
    return int(next(iter(inputs.values())).shape[0]) if isinstance(inputs, Mapping) else int(inputs.shape[0])


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _versions() -> dict[str, str | None]:
    return {package: _version(package) for package in ("lightning-kd", "torch", "safetensors", "onnx", "onnxscript", "onnxruntime")}
