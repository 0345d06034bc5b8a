"""Reloading a distilled student for inference: `load_from_checkpoint(path, student=...)` without its teacher."""

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd import DistillationModule, build_soft_targets, with_soft_targets
from lightning_kd.losses import DKDLoss, KDLoss, LearnableTemperature
from lightning_kd.models import get_model


def data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g)


def loader(x, y, batch=32):
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def trainer(tmp_path, **kwargs):
    defaults = dict(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    deterministic=True, default_root_dir=tmp_path)
    return L.Trainer(**{**defaults, **kwargs})


def fit(tmp_path, module):
    """One epoch, then `last.ckpt` (what a user reloads)."""
    x, y = data()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer(tmp_path, callbacks=[ckpt]).fit(module, loader(x, y), loader(x, y, batch=96))
    return tmp_path / "last.ckpt"


def distilled(tmp_path, **kwargs):
    teacher = get_model("cnn1d")
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    module = DistillationModule(teacher, get_model("mlp"), teacher_checkpoint=str(tmp_path / "teacher.pt"), **kwargs)
    return module, fit(tmp_path, module)


@pytest.mark.parametrize("soft_loss", [None, DKDLoss(beta=8.0), KDLoss(temperature=LearnableTemperature(4.0, t_min=1.0, t_range=10.0))],
                         ids=["kd", "dkd", "learned_temperature"])
def test_student_only_reload_gives_the_trained_students_outputs(tmp_path, soft_loss):
    module, path = distilled(tmp_path, soft_loss=soft_loss)
    # no teacher, no soft loss: neither is needed to run the student (a learned temperature's weights are dropped)
    loaded = DistillationModule.load_from_checkpoint(path, student=get_model("mlp"))
    assert loaded.teacher is None and loaded.student_only
    assert loaded.hparams.teacher_checkpoint == str(tmp_path / "teacher.pt")  # still recorded, for a later reload with it
    x, y = data(64, seed=1)
    trained = module.student.eval()
    with torch.no_grad():
        expected = trained.double()(x.double())  # float64 reference of the trained student
        trained.float()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).double(), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(loaded(x), trained(x))
    predictions = torch.cat(trainer(tmp_path).predict(loaded, loader(x, y)))
    assert torch.equal(predictions, trained(x).detach())

    # testing is inference too: the logged test metrics are the trained student's, recomputed here in float64
    tester = trainer(tmp_path)
    metrics = tester.test(loaded, loader(x, y, batch=64), verbose=False)[0]
    assert metrics["test/acc"] == pytest.approx(float((expected.argmax(-1) == y).double().mean()), abs=1e-6)
    assert metrics["test/loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(expected, y)), rel=1e-5)
    assert "test/agreement" not in metrics  # no teacher, no comparison with it
    # saved again, it is still the student of a distillation: reloaded, still student-only
    tester.save_checkpoint(tmp_path / "again.ckpt")
    assert DistillationModule.load_from_checkpoint(tmp_path / "again.ckpt", student=get_model("mlp")).student_only


def test_training_a_student_only_module_raises(tmp_path):
    _, path = distilled(tmp_path)
    loaded = DistillationModule.load_from_checkpoint(path, student=get_model("mlp"))
    before = copy.deepcopy(loaded.student.state_dict())
    x, y = data()
    match = r"loaded from the checkpoint of a distilled student without its teacher.*pass the teacher"
    with pytest.raises(RuntimeError, match=match):
        trainer(tmp_path, enable_checkpointing=False).fit(loaded, loader(x, y))
    with pytest.raises(RuntimeError, match=match):
        loaded.training_step((x, y), 0)
    assert all(torch.equal(v, before[k]) for k, v in loaded.student.state_dict().items())  # nothing trained
    # resuming a distilled run with a module that has no teacher is the same mistake
    with pytest.raises(RuntimeError, match=match):
        trainer(tmp_path, max_epochs=2, enable_checkpointing=False).fit(DistillationModule(None, get_model("mlp")), loader(x, y), ckpt_path=path)
    # given its teacher again, the same checkpoint trains on
    teacher_back = DistillationModule.load_from_checkpoint(path, teacher=get_model("cnn1d"), student=get_model("mlp"))
    assert not teacher_back.student_only
    trainer(tmp_path, enable_checkpointing=False).fit(teacher_back, loader(x, y))
    assert not torch.equal(teacher_back.student.classifier.weight, before["classifier.weight"])


def test_a_checkpoint_with_its_teacher_reloads_student_only(tmp_path):
    module, path = distilled(tmp_path, keep_teacher_in_checkpoint=True)
    assert any(k.startswith("teacher.") for k in torch.load(path, weights_only=True)["state_dict"])
    loaded = DistillationModule.load_from_checkpoint(path, student=get_model("mlp"))
    assert loaded.teacher is None and loaded.student_only
    assert not [k for k in loaded.state_dict() if k.startswith("teacher.")]
    x, _ = data(16, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), module.student.eval()(x))


def test_a_student_key_that_does_not_fit_still_fails(tmp_path):
    _, path = distilled(tmp_path)
    with pytest.raises(RuntimeError, match=r"size mismatch for student\.classifier\.weight"):
        DistillationModule.load_from_checkpoint(path, student=get_model("mlp", num_classes=3))


def test_a_scratch_checkpoint_reloads_as_it_was_trained(tmp_path):
    module = DistillationModule(None, get_model("mlp"))
    path = fit(tmp_path, module)
    loaded = DistillationModule.load_from_checkpoint(path, student=get_model("mlp"))
    assert loaded.teacher is None and not loaded.student_only  # it never had a teacher: it may train on
    assert torch.equal(loaded.student.classifier.weight, module.student.classifier.weight)
    x, y = data()
    trainer(tmp_path, enable_checkpointing=False).fit(loaded, loader(x, y))
    assert not torch.equal(loaded.student.classifier.weight, module.student.classifier.weight)


def test_load_from_checkpoint_without_a_student_says_what_to_pass(tmp_path):
    _, path = distilled(tmp_path)
    with pytest.raises(TypeError, match=r"needs the student's architecture: pass `student=`"):
        DistillationModule.load_from_checkpoint(path)


def test_a_recorded_teacher_checkpoint_without_a_teacher_is_refused_outside_a_reload(tmp_path):
    with pytest.raises(ValueError, match=r"`teacher_checkpoint` describe a teacher, but `teacher` is None"):
        DistillationModule(None, get_model("mlp"), teacher_checkpoint=str(tmp_path / "teacher.pt"))


def test_a_store_trained_student_loaded_without_its_store_is_student_only(tmp_path):
    x, y = data()
    store = build_soft_targets(get_model("cnn1d"), loader(x, y), tmp_path / "store", trainer=trainer(tmp_path, logger=False))
    module = DistillationModule(None, get_model("mlp"), soft_targets=store)
    fitted = trainer(tmp_path, enable_checkpointing=False)
    fitted.fit(module, with_soft_targets(loader(x, y), store))
    fitted.save_checkpoint(tmp_path / "run.ckpt")
    loaded = DistillationModule.load_from_checkpoint(tmp_path / "run.ckpt", student=get_model("mlp"), soft_targets=None)
    assert loaded.student_only  # training it on would drop the soft term: refused
    with pytest.raises(RuntimeError, match="without its teacher"):
        trainer(tmp_path, enable_checkpointing=False).fit(loaded, loader(x, y))
    assert not DistillationModule.load_from_checkpoint(tmp_path / "run.ckpt", student=get_model("mlp")).student_only  # store given back
