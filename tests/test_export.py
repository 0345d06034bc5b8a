"""Shipping the student: ``export_student`` (safetensors + ONNX checked with onnxruntime) and ``task=export``.

The checkpoint under test is a real one: a DistillationModule with a FitNet adapter and the teacher kept in the
checkpoint, fitted for a few steps by a bare Lightning Trainer, so that the teacher's and the adapter's keys are
there to be left out. References are float64 and computed in the test from the checkpoint's own tensors.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import onnxruntime as ort
import pytest
import safetensors.torch
import torch
from test_cli import _one_thread_and_restored_globals, make_cfg, read_report  # noqa: F401 (an autouse fixture)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd import DistillationModule, cli, export_student
from lightning_kd.checkpoint import CheckpointError
from lightning_kd.features import FeatureTerm
from lightning_kd.losses import FitNetLoss
from lightning_kd.models import get_model

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")  # the fixture's fit

HIDDEN = (16,)  # the student: mlp 40 -> 16 -> 10
STUDENT_KEYS = {"hidden.0.0.weight", "hidden.0.0.bias", "classifier.weight", "classifier.bias"}


def student() -> nn.Module:
    return get_model("mlp", hidden=HIDDEN)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A distillation checkpoint written by Lightning: student, teacher (kept) and FitNet adapter keys."""
    root = tmp_path_factory.mktemp("distilled")
    L.seed_everything(0)
    module = DistillationModule(get_model("cnn1d", channels=4), student(), keep_teacher_in_checkpoint=True,
                                features={"fitnet": FeatureTerm(FitNetLoss(), "features.3", "hidden.0", weight=1.0)})
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 40, generator=g), torch.randint(0, 10, (32,), generator=g)), batch_size=8)
    trainer = L.Trainer(max_epochs=1, default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    path = next(root.rglob("*.ckpt"))
    keys = torch.load(path, weights_only=True)["state_dict"]
    # what must be left out is there to leave out
    assert any(k.startswith("teacher.") for k in keys) and any(k.startswith("feature_distillation.adapters.") for k in keys)
    return path


def reference_logits(checkpoint: Path, x: torch.Tensor) -> torch.Tensor:
    """The distilled MLP's logits in float64, written out from the checkpoint's ``student.*`` tensors."""
    state = {k: v.double() for k, v in torch.load(checkpoint, weights_only=True)["state_dict"].items()}
    hidden = torch.relu(x.double() @ state["student.hidden.0.0.weight"].T + state["student.hidden.0.0.bias"])
    return hidden @ state["student.classifier.weight"].T + state["student.classifier.bias"]


def held_out(n: int) -> torch.Tensor:
    return torch.randn(n, 40, generator=torch.Generator().manual_seed(123))


# ---------------------------------------------------------------------- safetensors


def test_safetensors_holds_the_plain_student_alone_and_reproduces_it(checkpoint, tmp_path):
    files = export_student(checkpoint, tmp_path, example_input=held_out(4), formats=["safetensors"], student=student())
    assert set(files) == {"safetensors", "manifest"} and not (tmp_path / "student.onnx").exists()
    weights = safetensors.torch.load_file(files["safetensors"])
    assert set(weights) == STUDENT_KEYS  # no teacher, no adapter, no `student.` prefix, no optimizer state
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(weights[k], saved["student." + k]) for k in weights)
    fresh = student()
    fresh.load_state_dict(weights)  # strict: the plain module's names
    x = held_out(13)
    torch.testing.assert_close(fresh.eval()(x).double(), reference_logits(checkpoint, x), rtol=0, atol=1e-5)
    manifest = json.loads(files["manifest"].read_text())
    assert manifest["formats"] == ["safetensors"] and manifest["parameters"] == 40 * 16 + 16 + 16 * 10 + 10
    assert manifest["files"]["safetensors"]["bytes"] == files["safetensors"].stat().st_size


# ---------------------------------------------------------------------- onnx


def test_onnx_matches_the_reference_on_another_batch_size(checkpoint, tmp_path):
    files = export_student(checkpoint, tmp_path, example_input=held_out(4), formats=("onnx",), student=student())
    session = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("x", ["batch", 40])]
    for n in (1, 13):  # traced with 4
        x = held_out(n)
        (logits,) = session.run(None, {"x": x.numpy()})
        assert logits.shape == (n, 10)
        np.testing.assert_allclose(logits, reference_logits(checkpoint, x).numpy(), rtol=0, atol=1e-5)
    manifest = json.loads(files["manifest"].read_text())
    onnx = manifest["onnx"]
    assert onnx["max_abs_diff"] <= 1e-5 and onnx["atol"] == 1e-5 and isinstance(onnx["opset"], int)
    assert onnx["checked_batches"] == 2 and onnx["checked_samples"] == 4 + 8  # the example and the example doubled
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "example_shape": [4, 40], "dynamic_axes": {"0": "batch"}}]
    assert manifest["source"]["checkpoint"] == str(checkpoint.resolve())
    assert set(manifest["versions"]) == {"lightning-kd", "torch", "safetensors", "onnx", "onnxscript", "onnxruntime"}


def test_a_float64_example_is_traced_in_the_models_dtype(checkpoint, tmp_path):
    files = export_student(checkpoint, tmp_path, example_input=held_out(4).double(), formats=["onnx"], student=student())
    session = ort.InferenceSession(str(files["onnx"]))
    assert session.get_inputs()[0].type == "tensor(float)"
    assert json.loads(files["manifest"].read_text())["inputs"][0]["dtype"] == "float32"
    (logits,) = session.run(None, {"x": held_out(6).numpy()})
    np.testing.assert_allclose(logits, reference_logits(checkpoint, held_out(6)).numpy(), rtol=0, atol=1e-5)


def test_the_exports_load_with_torch_and_onnxruntime_alone(checkpoint, tmp_path):
    """A fresh interpreter with neither Lightning nor lightning-kd: the user's side of the export."""
    files = export_student(checkpoint, tmp_path, example_input=held_out(4), student=student())
    x = held_out(7)
    code = f"""
import json, sys, numpy as np, torch, onnxruntime, safetensors.torch
class MLP(torch.nn.Module):  # the zoo's mlp(hidden=(16,)), written out
    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(40, 16), torch.nn.ReLU()))
        self.classifier = torch.nn.Linear(16, 10)
    def forward(self, x):
        return self.classifier(self.hidden(x))
model = MLP()
model.load_state_dict(safetensors.torch.load_file({str(files["safetensors"])!r}))
x = torch.tensor(json.loads(sys.stdin.read()))
onnx = onnxruntime.InferenceSession({str(files["onnx"])!r}).run(None, {{"x": x.numpy()}})[0]
print(json.dumps({{"torch": model(x).tolist(), "onnx": onnx.tolist(),
                  "loaded": sorted(m for m in ("lightning", "lightning_kd", "hydra") if m in sys.modules)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(x.tolist()), capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    expected = reference_logits(checkpoint, x).numpy()
    np.testing.assert_allclose(np.array(result["torch"]), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.array(result["onnx"]), expected, rtol=0, atol=1e-5)


def test_a_gpt_student_exports_with_dynamic_batch_and_sequence_axes(tmp_path):
    """Token inputs (a dict with an attention mask), tied weights, a plain state-dict file (a stage's model.pt)."""
    L.seed_everything(0)
    gpt = get_model("gpt", vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0, tie_weights=True).eval()
    torch.save(gpt.state_dict(), tmp_path / "model.pt")
    g = torch.Generator().manual_seed(1)
    example = {"input_ids": torch.randint(0, 20, (2, 5), generator=g), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    fresh = get_model("gpt", vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0, tie_weights=True)
    files = export_student(tmp_path / "model.pt", tmp_path / "out", example_input=example, student=fresh)
    session = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    assert {i.name: i.shape for i in session.get_inputs()} == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    ids = torch.randint(0, 20, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    (logits,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        expected = gpt.double()(input_ids=ids, attention_mask=mask)  # the original module, in float64
    assert logits.shape == (3, 9, 20)
    np.testing.assert_allclose(logits, expected.numpy(), rtol=0, atol=1e-5)
    # the tied embedding is stored under both names, so that a strict load_state_dict fills both
    weights = safetensors.torch.load_file(files["safetensors"])
    assert set(weights) == set(fresh.state_dict())
    again = get_model("gpt", vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0, tie_weights=True)
    again.load_state_dict(weights)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(input_ids=ids, attention_mask=mask).double(), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- where the architecture comes from


def test_the_architecture_a_run_recorded_rebuilds_the_student(checkpoint, tmp_path):
    stage = tmp_path / "run" / "student_distilled"
    (stage / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, stage / "checkpoints" / "last.ckpt")
    architecture = {"_target_": "lightning_kd.models.get_model", "name": "mlp", "num_classes": 10, "hidden": list(HIDDEN)}
    (stage / "stage_config.json").write_text(json.dumps({"stage": "student_distilled", "config": {"student": {"model": architecture}}}))
    files = export_student(stage / "checkpoints" / "last.ckpt", tmp_path / "out", example_input=held_out(4), formats=["onnx"])
    manifest = json.loads(files["manifest"].read_text())
    assert manifest["architecture"] == architecture and manifest["model"] == "lightning_kd.models.mnist1d.MLP"
    (logits,) = ort.InferenceSession(str(files["onnx"])).run(None, {"x": held_out(5).numpy()})
    np.testing.assert_allclose(logits, reference_logits(checkpoint, held_out(5)).numpy(), rtol=0, atol=1e-5)


def test_without_a_student_or_a_run_record_the_export_is_refused(checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"Cannot rebuild the student of .*Pass its architecture as `student=`"):
        export_student(checkpoint, tmp_path / "out", example_input=held_out(4))
    assert not (tmp_path / "out").exists()


def test_a_student_that_is_not_the_checkpoints_is_refused(checkpoint, tmp_path):
    with pytest.raises(RuntimeError, match=r"does not fit this model: none of the prefixes \('student.',\)"):
        export_student(checkpoint, tmp_path, example_input=held_out(4), student=get_model("mlp", hidden=(16, 16)))
    # a smaller model whose keys are all in the checkpoint: refused, not loaded with part of the weights
    big = get_model("gpt", vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16)
    torch.save(big.state_dict(), tmp_path / "model.pt")
    with pytest.raises(RuntimeError, match=r"holds \d+ key\(s\) under the prefix '' that this model does not have \(transformer.h.1."):
        export_student(tmp_path / "model.pt", tmp_path, example_input=torch.zeros(1, 4, dtype=torch.long),
                       student=get_model("gpt", vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


# ---------------------------------------------------------------------- hostile inputs


class _Payload:
    """Unpickling it would call `_ran` (it must not happen)."""

    ran = False

    def __reduce__(self):
        return (_ran, ())


def _ran():
    _Payload.ran = True


def test_a_checkpoint_with_pickled_objects_is_refused_unrun(checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    state["callbacks"] = _Payload()
    torch.save(state, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"holds objects other than tensors and plain values, so it is refused"):
        export_student(tmp_path / "evil.ckpt", tmp_path / "out", example_input=held_out(4), student=student())
    assert not _Payload.ran and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("formats", "error", "match"),
    [
        (["onnx", "torchscript"], ValueError, r"Expected `formats` to hold any of safetensors, onnx, but got unknown format\(s\) \['torchscript'\]"),
        ([], ValueError, r"Expected `formats` to hold any of safetensors, onnx, but got no format"),
        ("onnx", TypeError, r"Expected `formats` to be a sequence of format names such as \('onnx',\), but got 'onnx'.*safetensors, onnx"),
        (3, TypeError, r"Expected `formats` to be a sequence of format names such as \('onnx',\), but got 3 \(int\)"),
    ],
)
def test_an_unknown_format_is_refused_naming_the_allowed_ones(checkpoint, tmp_path, formats, error, match):
    with pytest.raises(error, match=match):
        export_student(checkpoint, tmp_path / "out", example_input=held_out(4), formats=formats, student=student())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"atol": -1e-5}, ValueError, r"Expected `atol` to be >= 0, but got -1e-05"),
        ({"atol": "1e-5"}, TypeError, r"Expected `atol` to be a number, but got '1e-5'"),
        ({"overwrite": "no"}, TypeError, r"Expected `overwrite` to be True or False, but got 'no'"),
        ({"example_input": [torch.zeros(2, 40)]}, TypeError, r"Expected `example_input` to be a tensor or a dict of tensors"),
        ({"example_input": torch.zeros(0, 40)}, ValueError, r"Expected `example_input` to be a batch of at least one example"),
        ({"student": "mlp"}, TypeError, r"Expected `student` to be an nn.Module"),
    ],
)
def test_bad_settings_are_refused(checkpoint, tmp_path, kwargs, error, match):
    given = {"example_input": held_out(4), "student": student(), **kwargs}
    with pytest.raises(error, match=match):
        export_student(checkpoint, tmp_path / "out", **given)
    assert not (tmp_path / "out").exists()


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"The student checkpoint .*nope.ckpt' does not exist"):
        export_student(tmp_path / "nope.ckpt", tmp_path / "out", example_input=held_out(4), student=student())


def test_onnxruntime_inputs_are_matched_by_name(checkpoint, tmp_path):
    from lightning_kd.export import onnx_feed, onnx_session

    session = onnx_session(export_student(checkpoint, tmp_path, example_input=held_out(4), formats=["onnx"], student=student())["onnx"])
    assert set(onnx_feed(session, {"x": held_out(2)})) == {"x"}
    with pytest.raises(ValueError, match=r"The ONNX model takes the inputs \['x'\], but the batch has no \['x'\] \(it has \['input_ids'\]\)"):
        onnx_feed(session, {"input_ids": held_out(2)})


def test_an_earlier_export_is_not_overwritten_unless_asked(checkpoint, tmp_path):
    (tmp_path / "student.onnx").write_bytes(b"my own model")
    with pytest.raises(FileExistsError, match=r"student.onnx exist\(s\).*pass `overwrite=True` to replace them"):
        export_student(checkpoint, tmp_path, example_input=held_out(4), student=student())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx"]  # nothing else written either
    assert (tmp_path / "student.onnx").read_bytes() == b"my own model"
    files = export_student(checkpoint, tmp_path, example_input=held_out(4), student=student(), overwrite=True)
    (logits,) = ort.InferenceSession(str(files["onnx"])).run(None, {"x": held_out(3).numpy()})
    np.testing.assert_allclose(logits, reference_logits(checkpoint, held_out(3)).numpy(), rtol=0, atol=1e-5)


class _Counting(nn.Module):
    """Adds how often it has run: a Python value the ONNX graph freezes at its value when traced."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(40, 10)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.linear(x) + self.calls


def test_an_onnx_graph_that_differs_from_pytorch_is_refused_and_not_written(tmp_path):
    torch.save(_Counting().state_dict(), tmp_path / "model.pt")
    with pytest.raises(RuntimeError, match=r"differs from PyTorch by up to \d.*more than `atol`=1e-05: nothing was written"):
        export_student(tmp_path / "model.pt", tmp_path / "out", example_input=held_out(4), student=_Counting())
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- lightning-kd task=export


@pytest.mark.slow
def test_the_export_task_ships_a_runs_student_and_reports_both_runtimes(tmp_path):
    """A tiny scratch run with an export stage, then `task=export` on its checkpoint in a new run directory."""
    run = tmp_path / "run"
    short = ("student.epochs=1", "+trainer.limit_train_batches=2", "report.latency_batches=3")
    cli.train(make_cfg(run, "task=scratch", "task.stages=[student_scratch,export]", "export.stage=student_scratch", *short))
    shipped = read_report(run)
    assert list(shipped["entries"]) == ["student_scratch"]  # the model rows stay
    export = shipped["export"]
    assert export["checkpoint"] == "student_scratch/checkpoints/last.ckpt" and export["test_samples"] == 1000
    assert 0 <= export["max_abs_diff"] <= 1e-5 and export["latency_batch_size"] == 1000
    assert export["latency_ms"]["pytorch"] > 0 and export["latency_ms"]["onnxruntime"] > 0
    md = (run / "report.md").read_text()
    assert "| student_scratch |" in md and "## Export" in md and "| onnxruntime | `export/student.onnx` |" in md
    # read back: the shipped files reproduce the trained student on the test set
    from lightning_kd.data import MNIST1DDataModule

    data = MNIST1DDataModule()
    data.setup("test")
    x = torch.cat([batch[0] for batch in data.test_dataloader()])
    trained = get_model("mlp").eval()
    trained.load_state_dict(torch.load(run / "student_scratch" / "model.pt", weights_only=True))
    with torch.no_grad():
        expected = trained.double()(x.double()).numpy()
    (logits,) = ort.InferenceSession(str(run / "export" / "student.onnx")).run(None, {"x": x.numpy()})
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    shipped_student = get_model("mlp").eval()
    shipped_student.load_state_dict(safetensors.torch.load_file(run / "export" / "student.safetensors"))
    with torch.no_grad():
        np.testing.assert_allclose(shipped_student(x).double().numpy(), expected, rtol=0, atol=1e-5)

    # task=export in the finished run's directory: the done export is reused, the report keeps its model rows
    mtime = (run / "export" / "student.onnx").stat().st_mtime_ns
    assert cli.train(make_cfg(run, "task=export", "export.stage=student_scratch", "report.latency_batches=3")) == {}
    again = read_report(run)
    assert again["entries"] == shipped["entries"] and again["export"] == export and again["meta"] == shipped["meta"]
    assert "| student_scratch |" in (run / "report.md").read_text() and (run / "export" / "student.onnx").stat().st_mtime_ns == mtime

    # task=export elsewhere, from the checkpoint: the architecture comes from the run's record (the config says cnn1d_small)
    other = tmp_path / "other"
    overrides = ("task=export", f"export.checkpoint={run / 'student_scratch' / 'checkpoints' / 'last.ckpt'}", "student=cnn1d_small",
                 "report.latency_batches=3")
    cfg = make_cfg(other, *overrides)
    assert cli.train(cfg) == {}  # no model trained: no model rows
    alone = read_report(other)
    assert alone["entries"] == {} and alone["export"]["stage"] is None and alone["export"]["params"] == export["params"]
    assert "## Export" in (other / "report.md").read_text()
    # the same export again is reused; other settings over it are refused unless `export.overwrite=true`
    mtime = (other / "export" / "student.onnx").stat().st_mtime_ns
    cli.train(cfg)
    assert (other / "export" / "student.onnx").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match=r"pass `overwrite=True`.*\[lightning-kd: .*`export.overwrite=true`"):
        cli.train(make_cfg(other, *overrides, "export.formats=[onnx]"))
    cli.train(make_cfg(other, *overrides, "export.formats=[onnx]", "export.overwrite=true"))
    assert read_report(other)["export"]["formats"] == ["onnx"]

    # a state-dict file outside any run: the architecture is the `student` group's, and a wrong one is named
    loose = tmp_path / "loose" / "model.pt"
    loose.parent.mkdir()
    shutil.copy(run / "student_scratch" / "model.pt", loose)
    with pytest.raises(RuntimeError, match=r"does not fit this model.*the architecture is the `student` group's\]"):
        cli.train(make_cfg(tmp_path / "wrong", "task=export", f"export.checkpoint={loose}", "student=cnn1d_small"))
    cli.train(make_cfg(tmp_path / "right", "task=export", f"export.checkpoint={loose}", "report.latency_batches=3"))
    manifest = json.loads((tmp_path / "right" / "export" / "export.json").read_text())
    assert manifest["architecture"] is None and manifest["model"] == "lightning_kd.models.mnist1d.MLP"
    assert manifest["onnx"]["max_abs_diff"] <= 1e-5


def test_the_export_task_without_a_checkpoint_names_the_settings(tmp_path):
    with pytest.raises(ValueError, match=r"Nothing to export: stage student_distilled has not finished in .*`export.checkpoint=PATH`"):
        cli.train(make_cfg(tmp_path, "task=export"))
    with pytest.raises(ValueError, match=r"Expected `export.stage` to be one of teacher, student_scratch"):
        cli.train(make_cfg(tmp_path, "task=export", "export.stage=soft_targets"))
    with pytest.raises(FileNotFoundError, match=r"Checkpoint to export not found: .*nope.ckpt.*\(`export.checkpoint`\)"):
        cli.train(make_cfg(tmp_path, "task=export", f"export.checkpoint={tmp_path / 'nope.ckpt'}"))
