"""DistillationModule on real (tiny) fits: teacher hygiene, the loss, checkpoints, resume, errors."""

import copy
import dataclasses
import math
import warnings
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd import DistillationAnnealing, DistillationModule, Speed
from lightning_kd.checkpoint import fingerprint
from lightning_kd.losses import (
    DISTLoss,
    DKDLoss,
    HardMSELoss,
    JSDLoss,
    KDLoss,
    LearnableTemperature,
    ReverseKLLoss,
    SkewKLLoss,
    SoftMSELoss,
    cross_entropy_loss,
    dist_loss,
    dkd_loss,
    jsd_loss,
    kd_loss,
    reverse_kl_loss,
    skew_kl_loss,
    soft_mse_loss,
)
from lightning_kd.models import get_model
from lightning_kd.schedules import Cosine, Linear
from lightning_kd.teachers import load_teacher


def loaders(n=96, classes=10, batch=32, unlabeled=0):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 40, generator=g), torch.randint(0, classes, (n,), generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)
    if unlabeled:
        xu = torch.randn(unlabeled, 40, generator=g)
        train = CombinedLoader(
            {"labeled": train, "unlabeled": DataLoader(TensorDataset(xu), batch_size=batch)}, mode="max_size_cycle"
        )
    return train, DataLoader(TensorDataset(x, y), batch_size=64)


def trainer(tmp_path=None, **kwargs):
    defaults = dict(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True,
    )
    defaults.update(kwargs)
    return L.Trainer(default_root_dir=tmp_path, **defaults)


class Recorder(DistillationModule):
    """Records, on every training step, the modes and what the loss was computed from."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.modes, self.steps = [], []

    def training_step(self, batch, batch_idx):
        self.modes.append((self.teacher.training, self.student.training, torch.is_grad_enabled()))
        self.steps.append((self.temperature, self.alpha))
        return super().training_step(batch, batch_idx)


def teacher_state(module):
    return {k: v.clone() for k, v in module.teacher.state_dict().items()}


# ------------------------------------------------------------------------- teacher hygiene
@pytest.mark.filterwarnings("error:.*in eval mode")
def test_teacher_frozen_bit_identical_and_modes_on_every_step():
    teacher = get_model("cnn1d")
    teacher.train()  # a user hands over a teacher in train mode: BatchNorm would update its stats
    module = Recorder(teacher, get_model("mlp"))
    before = teacher_state(module)
    assert any("running_mean" in k for k in before)  # BatchNorm buffers are part of the check
    module.eval()  # the KD_FACTS pitfall: a user calls eval() before fit ...
    module.train()  # ... or train(), which must not turn the teacher's BatchNorm on
    assert module.teacher.training is False
    module.eval()
    train, val = loaders()
    trainer(max_epochs=2).fit(module, train, val)
    after = module.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(module.modes) == 6
    assert all(m == (False, True, True) for m in module.modes)
    assert not any(p.requires_grad for p in module.teacher.parameters())


def test_optimizer_sees_exactly_the_student_parameters():
    module = DistillationModule(get_model("cnn1d"), get_model("mlp"))
    optimizer = module.configure_optimizers()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in params} == {id(p) for p in module.student.parameters()}
    assert len(params) == len(list(module.student.parameters()))


def test_teacher_runs_without_autograd():
    module = DistillationModule(get_model("cnn1d"), get_model("mlp"))
    out = module.teacher_forward(torch.randn(4, 40))
    assert not out.requires_grad and out.grad_fn is None


def test_eval_mode_warning_silenced_for_the_teacher_only():
    train, val = loaders()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=1).fit(DistillationModule(get_model("cnn1d"), get_model("mlp")), train, val)
    assert not [w for w in caught if "in eval mode" in str(w.message)]

    student = get_model("mlp")
    student.hidden[0].eval()  # a user's deliberate choice inside the student: still reported
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=1).fit(DistillationModule(get_model("cnn1d"), student), train, val)
    assert [w for w in caught if "in eval mode" in str(w.message)]


# ------------------------------------------------------------------------- the loss
def reference_loss(student_logits, teacher_logits, targets, T, alpha):
    """Float64: alpha * T^2 * mean_i KL_i(all inputs) + (1 - alpha) * CE over labeled rows."""
    s, t = student_logits.double(), teacher_logits.double()
    kl = 0.0
    for i in range(s.shape[0]):
        ps = torch.exp(s[i] / T) / torch.exp(s[i] / T).sum()
        pt = torch.exp(t[i] / T) / torch.exp(t[i] / T).sum()
        kl += float((pt * (pt.log() - ps.log())).sum())
    kl /= s.shape[0]
    labeled = [i for i in range(s.shape[0]) if targets[i] >= 0]
    ce = -sum(float(s[i, targets[i]] - torch.logsumexp(s[i], 0)) for i in labeled) / len(labeled)
    return alpha * T * T * kl + (1 - alpha) * ce, T * T * kl, ce


def test_training_step_loss_matches_reference_with_unlabeled_inputs():
    module = DistillationModule(get_model("cnn1d"), get_model("mlp"), soft_loss=KDLoss(temperature=3.0), alpha=0.7)
    module.log = lambda *a, **k: None  # no Trainer attached
    x_l, y = torch.randn(5, 40), torch.randint(0, 10, (5,))
    x_u = torch.randn(3, 40)
    batch = {"labeled": [x_l, y], "unlabeled": [x_u]}  # what a CombinedLoader yields
    loss = module.training_step(batch, 0)
    x = torch.cat([x_l, x_u])
    with torch.no_grad():
        s, t = module.student(x), module.teacher(x)
    expected, soft, hard = reference_loss(s, t, torch.cat([y, torch.full((3,), -100)]), 3.0, 0.7)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    parts = module.distillation_loss(s, t, torch.cat([y, torch.full((3,), -100)]))
    assert parts["soft"].item() == pytest.approx(soft, rel=1e-5, abs=1e-6)  # float32 KL: ~1e-7 absolute
    assert parts["hard"].item() == pytest.approx(hard, rel=1e-5)


def test_fully_unlabeled_batch_trains_on_the_soft_term():
    module = DistillationModule(get_model("cnn1d"), get_model("mlp"), alpha=0.5)
    module.log = lambda *a, **k: None
    x = torch.randn(4, 40)
    loss = module.training_step((x,), 0)
    with torch.no_grad():
        s, t = module.student(x), module.teacher(x)
    _, soft, _ = reference_loss(s, t, torch.zeros(4, dtype=torch.long), 4.0, 0.5)
    assert loss.item() == pytest.approx(0.5 * soft, rel=1e-5, abs=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in module.student.parameters())


def test_without_teacher_the_loss_is_the_hard_loss():
    module = DistillationModule(None, get_model("mlp"))
    module.log = lambda *a, **k: None
    x, y = torch.randn(6, 40), torch.randint(0, 10, (6,))
    loss = module.training_step((x, y), 0)
    with torch.no_grad():
        s = module.student(x).double()
    assert loss.item() == pytest.approx(float(nn.functional.cross_entropy(s, y)), rel=1e-6)


def test_bf16_mixed_on_cpu_trains_and_logs_float32_losses(tmp_path):
    module = DistillationModule(get_model("cnn1d"), get_model("mlp"))
    train, val = loaders()
    t = trainer(tmp_path, precision="bf16-mixed", max_epochs=1, logger=CSVLogger(tmp_path, name="", version=""))
    t.fit(module, train, val)
    metrics = t.callback_metrics
    assert metrics["train/soft_loss"].dtype == torch.float32
    assert math.isfinite(float(metrics["train/loss"]))
    assert module.student.hidden[0][0].weight.dtype == torch.float32


def test_logged_metrics(tmp_path):
    module = DistillationModule(get_model("cnn1d"), get_model("mlp"))
    train, val = loaders()
    t = trainer(tmp_path, max_epochs=2, logger=CSVLogger(tmp_path, name="", version=""), log_every_n_steps=1)
    t.fit(module, train, val)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("train/loss", "train/soft_loss", "train/hard_loss", "train/loss_epoch", "train/acc", "train/agreement",
                 "val/acc", "val/kl", "val/agreement", "val/teacher_acc", "val/loss"):
        assert name in header, name
    rows = (tmp_path / "metrics.csv").read_text().splitlines()[1:]
    col = header.index("val/teacher_acc")
    assert sum(1 for r in rows if r.split(",")[col]) == 1  # the frozen teacher's accuracy, logged once
    # the teacher's test accuracy is what a manual forward gives
    result = t.test(module, val, verbose=False)[0]
    x, y = val.dataset.tensors
    with torch.no_grad():
        manual = (module.teacher(x).argmax(-1) == y).float().mean().item()
        agreement = (module.teacher(x).argmax(-1) == module.student(x).argmax(-1)).float().mean().item()
    assert result["test/teacher_acc"] == pytest.approx(manual)
    assert result["test/agreement"] == pytest.approx(agreement)


# ------------------------------------------------------------------------- checkpoints
def fit_with_checkpoint(tmp_path, module, **kwargs):
    train, val = loaders()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[ckpt], **kwargs).fit(module, train, val)
    return tmp_path / "last.ckpt"


def test_checkpoint_holds_no_teacher_and_loads_weights_only(tmp_path):
    teacher = get_model("cnn1d")
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    module = DistillationModule(teacher, get_model("mlp"), teacher_checkpoint=str(tmp_path / "teacher.pt"))
    path = fit_with_checkpoint(tmp_path, module)
    checkpoint = torch.load(path, weights_only=True)
    keys = list(checkpoint["state_dict"])
    assert keys and not [k for k in keys if k.startswith("teacher.")]
    assert all(k.startswith(("student.", "metrics.")) for k in keys)
    assert checkpoint["hyper_parameters"]["teacher_checkpoint"] == str(tmp_path / "teacher.pt")
    assert module.teacher.state_dict().keys()  # the live module still has its teacher

    # load_from_checkpoint with a *fresh* (random) teacher architecture: rebuilt from its own source
    loaded = DistillationModule.load_from_checkpoint(path, teacher=get_model("cnn1d"), student=get_model("mlp"))
    for k, v in teacher.state_dict().items():
        assert torch.equal(loaded.teacher.state_dict()[k], v)
    for k, v in module.student.state_dict().items():
        assert torch.equal(loaded.student.state_dict()[k], v)


def test_a_random_teacher_is_refused_and_missing_student_keys_fail(tmp_path):
    module = DistillationModule(get_model("cnn1d"), get_model("mlp"))
    path = fit_with_checkpoint(tmp_path, module)
    with pytest.raises(RuntimeError, match="not the one the checkpoint was trained with"):
        DistillationModule.load_from_checkpoint(path, teacher=get_model("cnn1d"), student=get_model("mlp"))
    loaded = DistillationModule.load_from_checkpoint(path, teacher=copy.deepcopy(module.teacher), student=get_model("mlp"))
    assert torch.equal(loaded.student.classifier.weight, module.student.classifier.weight)

    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["state_dict"]["student.classifier.weight"]
    torch.save(checkpoint, tmp_path / "broken.ckpt")
    with pytest.raises(RuntimeError, match="student.classifier.weight"):
        DistillationModule.load_from_checkpoint(tmp_path / "broken.ckpt", teacher=copy.deepcopy(module.teacher), student=get_model("mlp"))


def test_keep_teacher_in_checkpoint(tmp_path):
    module = DistillationModule(get_model("cnn1d"), get_model("mlp"), keep_teacher_in_checkpoint=True)
    path = fit_with_checkpoint(tmp_path, module)
    keys = torch.load(path, weights_only=True)["state_dict"]
    assert any(k.startswith("teacher.") for k in keys)
    loaded = DistillationModule.load_from_checkpoint(path, teacher=get_model("cnn1d"), student=get_model("mlp"))
    assert torch.equal(loaded.teacher.classifier.weight, module.teacher.classifier.weight)


class StopAt(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 == self.epoch:
            trainer.should_stop = True


def test_n_steps_equal_k_steps_plus_resume(tmp_path):
    """Student weights and the annealed T/alpha sequence: 4 epochs straight == 2 epochs, crash, resume."""

    def run(root, stop_at=None, resume=None):
        L.seed_everything(7)
        teacher = get_model("cnn1d", channels=8)
        L.seed_everything(7)
        module = Recorder(teacher, get_model("mlp"), lr_scheduler="cosine")
        callbacks = [
            DistillationAnnealing(temperature=Linear(8.0, 2.0), alpha=Cosine(0.9, 0.1)),
            ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0),
        ]
        if stop_at:
            callbacks.append(StopAt(stop_at))
        train, val = loaders(unlabeled=64)
        trainer(root, max_epochs=4, enable_checkpointing=True, callbacks=callbacks).fit(module, train, val, ckpt_path=resume)
        return module

    straight = run(tmp_path / "a")
    first = run(tmp_path / "b", stop_at=2)
    resumed = run(tmp_path / "c", resume=str(tmp_path / "b" / "last.ckpt"))
    assert len(straight.steps) == 12 and len(first.steps) == 6
    assert first.steps + resumed.steps == straight.steps
    assert straight.steps[0] == (8.0, 0.9) and straight.steps[-1][0] == pytest.approx(8.0 - 6.0 * 11 / 12)
    for k, v in straight.student.state_dict().items():
        assert torch.equal(resumed.student.state_dict()[k], v), k


# ------------------------------------------------------------------------- user projects
class DictBatchKD(DistillationModule):
    """A user project's batch format: {"signal": x, "digit": y}."""

    def unpack_batch(self, batch):
        return batch["signal"], batch["digit"]


def test_overriding_unpack_batch_for_another_batch_format():
    x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))
    samples = [{"signal": x[i], "digit": y[i]} for i in range(64)]
    data = DataLoader(samples, batch_size=16)  # default collate: {"signal": (16, 40), "digit": (16,)}
    module = DictBatchKD(get_model("cnn1d"), get_model("mlp"))
    before = module.student.classifier.weight.clone()
    trainer(max_epochs=1, limit_val_batches=0).fit(module, data)
    assert not torch.equal(before, module.student.classifier.weight)


def test_regression_with_mse_losses():
    teacher, student = nn.Linear(40, 3), nn.Sequential(nn.Linear(40, 8), nn.ReLU(), nn.Linear(8, 3))
    module = DistillationModule(teacher, student, hard_loss=HardMSELoss(), soft_loss=SoftMSELoss(), alpha=0.5)
    module.log = lambda *a, **k: None
    x, y = torch.randn(6, 40), torch.randn(6, 3)
    loss = module.training_step((x, y), 0)
    with torch.no_grad():
        s, t = student(x).double(), teacher(x).double()
    expected = 0.5 * ((s - t) ** 2).mean() + 0.5 * ((s - y.double()) ** 2).mean()
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)


# ------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (lambda: {"soft_loss": KDLoss(temperature=0.0)}, ValueError, r"Expected `temperature` to be > 0, but got 0.0"),
        (lambda: {"soft_loss": KDLoss(temperature=-2)}, ValueError, r"`temperature` to be > 0"),
        (lambda: {"alpha": 1.5}, ValueError, r"Expected `alpha` to be in \[0, 1\], but got 1.5"),
        (lambda: {"alpha": -0.1}, ValueError, r"`alpha` to be in \[0, 1\]"),
        (lambda: {"hard_loss": "hinge"}, TypeError, r"Expected `hard_loss` to be a callable \(outputs, targets\) -> loss, but got str"),
        (lambda: {"soft_loss": "js"}, TypeError, r"Expected `soft_loss` to be a lightning_kd.losses.LogitLoss .*, but got str"),
        (lambda: {"soft_loss": nn.KLDivLoss()}, TypeError, r"Expected `soft_loss` to be a lightning_kd.losses.LogitLoss .*, but got KLDivLoss"),
        (lambda: {"lr_scheduler": "linear"}, ValueError, r"Unknown `lr_scheduler` 'linear'. Expected None, 'cosine'"),
        (lambda: {"lr_scheduler": {"interval": "step"}}, ValueError, r"Unknown `lr_scheduler` \{'interval': 'step'\}"),
        (lambda: {"speed": "fast"}, TypeError, r"Expected `speed` to be a lightning_kd.Speed, but got str"),
    ],
    ids=["temperature_zero", "temperature_negative", "alpha_above", "alpha_below", "hard_loss_str", "soft_loss_str",
         "soft_loss_not_a_logit_loss", "lr_scheduler_name", "lr_scheduler_dict_without_scheduler", "speed_str"],
)
def test_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        DistillationModule(get_model("cnn1d"), get_model("mlp"), **kwargs())


def test_student_must_be_a_module():
    with pytest.raises(TypeError, match=r"Expected `student` to be an nn.Module, but got str"):
        DistillationModule(get_model("cnn1d"), "mlp")


def test_callback_cannot_set_a_bad_value():
    module = DistillationModule(get_model("cnn1d"), get_model("mlp"))
    with pytest.raises(ValueError, match="`alpha` to be in"):
        module.alpha = 2.0
    with pytest.raises(ValueError, match=r"Expected `temperature` to be > 0, but got 0.0"):
        module.temperature = 0.0
    with pytest.raises(ValueError, match=r"Expected `soft_weight` to be a finite number >= 0, but got nan"):
        module.soft_weight = math.nan
    assert (module.alpha, module.temperature, module.soft_weight) == (0.9, 4.0, 1.0)  # the refused values left no trace


def test_teacher_and_student_with_different_classes():
    module = DistillationModule(get_model("cnn1d", num_classes=100), get_model("mlp"))
    train, val = loaders()
    with pytest.raises(ValueError, match=r"same shape, but got student \(\d+, 10\) and teacher \(\d+, 100\)"):
        trainer(max_epochs=1).fit(module, train, val)


def test_targets_that_do_not_fit_the_outputs():
    module = DistillationModule(get_model("cnn1d"), get_model("mlp"))
    train, _ = loaders(classes=100)
    with pytest.raises(ValueError, match=r"class targets in \[0, 10\)"):
        trainer(max_epochs=1, limit_val_batches=0).fit(module, train)


def test_unsupported_batch_format_says_how_to_fix():
    module = DistillationModule(get_model("cnn1d"), get_model("mlp"))
    with pytest.raises(TypeError, match="override `unpack_batch"):
        module.unpack_batch((torch.randn(2, 40), torch.zeros(2), torch.zeros(2)))


# ---------------------------------------------------------------------- the soft losses in the module
SOFT_LOSSES = {  # each loss object with options off their defaults, and its functional twin with the same settings
    "kd": (lambda: KDLoss(2.0, standardize=True), lambda s, t, c: kd_loss(s, t, 2.0, standardize=True)),
    "mse": (lambda: SoftMSELoss(standardize=True), lambda s, t, c: soft_mse_loss(s, t, standardize=True)),
    "reverse_kl": (lambda: ReverseKLLoss(2.0, scale_by_t2=False, standardize=True),
                   lambda s, t, c: reverse_kl_loss(s, t, temperature=2.0, scale_by_t2=False, standardize=True)),
    "jsd": (lambda: JSDLoss(2.0, beta=0.2, standardize=True), lambda s, t, c: jsd_loss(s, t, beta=0.2, temperature=2.0, standardize=True)),
    "skew_kl": (lambda: SkewKLLoss(2.0, skew=0.3, standardize=True),
                lambda s, t, c: skew_kl_loss(s, t, skew=0.3, temperature=2.0, standardize=True)),
    "dkd": (lambda: DKDLoss(2.0, beta=4.0, standardize=True), lambda s, t, c: dkd_loss(s, t, c, beta=4.0, temperature=2.0, standardize=True)),
    "dist": (lambda: DISTLoss(2.0, gamma=0.5, standardize=True),
             lambda s, t, c: dist_loss(s, t, gamma=0.5, temperature=2.0, standardize=True)),
}


@pytest.mark.parametrize("name", sorted(SOFT_LOSSES))
def test_every_soft_loss_is_the_functional_one_with_its_options(name):
    make_loss, functional = SOFT_LOSSES[name]
    s, t = torch.randn(6, 10), torch.randn(6, 10)
    y = torch.tensor([1, 2, 3, -100, 5, 6])  # one unlabeled row
    module = DistillationModule(get_model("cnn1d"), get_model("mlp"), soft_loss=make_loss(), alpha=0.7, soft_weight=0.5)
    losses = module.distillation_loss(s, t, y)
    # DKD needs a class for the unlabeled row: the teacher's top-1
    classes = torch.where(y == -100, t.argmax(-1), y)
    soft = functional(s, t, classes)
    assert torch.equal(losses["soft"], soft)
    expected = 0.5 * 0.7 * soft + 0.3 * cross_entropy_loss(s, y)
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_temperature_reads_and_writes_the_loss_temperature():
    module = DistillationModule(get_model("cnn1d"), get_model("mlp"), soft_loss=DKDLoss(temperature=3.0, beta=8.0), alpha=1.0)
    assert module.temperature == 3.0 == module.soft_loss.temperature
    module.temperature = 2.5  # what the annealing callback does
    assert module.soft_loss.temperature == 2.5 and module.temperature == 2.5
    s, t, y = torch.randn(5, 10), torch.randn(5, 10), torch.randint(0, 10, (5,))
    assert torch.equal(module.distillation_loss(s, t, y)["soft"], dkd_loss(s, t, y, beta=8.0, temperature=2.5))

    no_temperature = DistillationModule(get_model("cnn1d"), get_model("mlp"), soft_loss=SoftMSELoss())
    with pytest.raises(AttributeError, match="SoftMSELoss has no temperature"):
        no_temperature.temperature = 2.0
    with pytest.raises(TypeError, match="temperature"):  # Python's own error: the logit MSE takes no temperature
        SoftMSELoss(temperature=LearnableTemperature())


def test_learned_temperature_trains_is_logged_checkpointed_and_cannot_be_annealed(tmp_path):
    L.seed_everything(0)
    teacher = get_model("cnn1d")
    learned = LearnableTemperature(4.0, t_min=1.0, t_range=10.0)
    module = DistillationModule(teacher, get_model("mlp"), soft_loss=KDLoss(temperature=learned))
    start = module.temperature
    assert start == pytest.approx(4.0, rel=1e-6)
    assert module.soft_loss.temperature is learned
    assert any(p is learned.theta for p in module.trainable_parameters())
    theta, before = learned.theta.detach().clone(), teacher_state(module)
    annealing = DistillationAnnealing(schedules={"soft_loss.temperature.grl_weight": Cosine(0.0, 1.0)})
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    fit = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[annealing, checkpoints],
                    default_root_dir=tmp_path)
    fit.fit(module, loaders(n=64, batch=16)[0])
    assert not torch.equal(learned.theta.detach(), theta)  # trained with the student ...
    assert module.temperature != pytest.approx(start, abs=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in module.teacher.state_dict().items())  # ... beside a bit-identical teacher
    assert learned.grl_weight == pytest.approx(Cosine(0.0, 1.0)(7, 8))  # the last of 8 steps: the dotted path reached the loss
    logged = fit.callback_metrics["train/temperature"].item()  # the last step's, before its optimizer step
    assert logged != pytest.approx(start, abs=1e-4) and logged == pytest.approx(module.temperature, abs=1e-2)
    assert any(p is learned.theta for g in fit.optimizers[0].param_groups for p in g["params"])
    with pytest.raises(RuntimeError, match="The temperature is learned"):
        module.temperature = 2.0
    assert module.soft_loss.temperature is learned  # the refused value replaced nothing

    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(state["soft_loss.temperature.theta"], learned.theta.detach())
    restored = DistillationModule.load_from_checkpoint(tmp_path / "last.ckpt", teacher=copy.deepcopy(module.teacher), student=get_model("mlp"),
                                                       soft_loss=KDLoss(temperature=LearnableTemperature(4.0, t_min=1.0, t_range=10.0)))
    assert torch.equal(restored.soft_loss.temperature.theta, learned.theta)
    assert restored.temperature == module.temperature
    # the loss objects are not in the checkpoint (weights only): leaving out the learned one is a loud error, not a default
    with pytest.raises(ValueError, match=r"soft_loss: trained with 'KDLoss\( .*\(temperature\): LearnableTemperature\(t_min=1.0, t_range=10.0"):
        DistillationModule.load_from_checkpoint(tmp_path / "last.ckpt", teacher=copy.deepcopy(module.teacher), student=get_model("mlp"))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (lambda: {"soft_loss": DKDLoss(gamma=1.0)}, TypeError, r"unexpected keyword argument 'gamma'"),  # Python's own check
        (lambda: {"soft_weight": -1.0}, ValueError, r"Expected `soft_weight` to be a finite number >= 0, but got -1.0"),
    ],
    ids=["unknown_loss_option", "negative_soft_weight"],
)
def test_bad_method_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        DistillationModule(get_model("cnn1d"), get_model("mlp"), **kwargs())


# ---------------------------------------------------------------------- the learning-rate schedule
class LearningRates(Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.values.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_a_scheduler_steps_per_optimizer_step_or_per_epoch(interval):
    schedule = partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    lr_scheduler = {"scheduler": schedule, "interval": "step"} if interval == "step" else schedule  # a bare partial: per epoch
    module = DistillationModule(get_model("cnn1d"), get_model("mlp"), optimizer=partial(torch.optim.SGD, lr=0.1), lr_scheduler=lr_scheduler)
    rates = LearningRates()
    fit = trainer(max_epochs=2, limit_val_batches=0, callbacks=[rates])
    fit.fit(module, loaders()[0])  # 3 batches per epoch
    assert fit.global_step == 6
    # the lr of optimizer step k (k = 0..5): 0.1 * 0.5^k per step, 0.1 * 0.5^epoch per epoch
    expected = [0.1 * 0.5 ** (k if interval == "step" else k // 3) for k in range(6)]
    assert rates.values == pytest.approx(expected, rel=1e-12)
    final = 0.1 * 0.5 ** (6 if interval == "step" else 2)
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(final, rel=1e-12)


# ---------------------------------------------------------------------- the teacher: load_teacher and Speed
def test_load_teacher_loads_freezes_and_casts_one_model(tmp_path):
    trained = get_model("cnn1d")
    torch.save(trained.state_dict(), tmp_path / "teacher.pt")
    fresh = get_model("cnn1d").train()
    teacher = load_teacher(fresh, tmp_path / "teacher.pt")
    assert teacher is fresh
    for key, value in trained.state_dict().items():  # weights and BatchNorm buffers
        assert torch.equal(teacher.state_dict()[key], value), key
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(3, 40)
    assert torch.equal(teacher(x), trained.eval()(x))
    assert fingerprint(teacher) == fingerprint(trained)
    cast = load_teacher(get_model("cnn1d"), str(tmp_path / "teacher.pt"), dtype="bfloat16")
    assert {p.dtype for p in cast.parameters()} == {torch.bfloat16}
    assert torch.equal(cast.classifier.weight, trained.classifier.weight.bfloat16())


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda p: load_teacher(get_model("cnn1d"), weights=[1.0]), ValueError, "`teacher_weights` is for several teachers"),
        (lambda p: load_teacher(get_model("cnn1d"), dtype={"0": "bfloat16"}), ValueError, "A per-teacher `teacher_dtype` dict needs several teachers"),
        (lambda p: load_teacher(get_model("cnn1d"), [p, p]), ValueError, "Several teacher checkpoints need several teachers"),
        (lambda p: load_teacher(get_model("cnn1d"), dtype="fp8"), ValueError, r"Unknown `teacher_dtype` 'fp8'"),
        (lambda p: load_teacher("cnn1d"), TypeError, r"Expected `teacher` to be an nn.Module, a list/dict of them, or None, but got str"),
        (lambda p: load_teacher(get_model("cnn1d"), p.parent / "missing.pt"), FileNotFoundError, "missing.pt"),
    ],
    ids=["weights", "per_member_dtype", "several_checkpoints", "unknown_dtype", "not_a_module", "missing_file"],
)
def test_load_teacher_refuses_settings_for_one_teacher(tmp_path, call, error, match):
    path = tmp_path / "teacher.pt"
    torch.save(get_model("cnn1d").state_dict(), path)
    with pytest.raises(error, match=match):
        call(path)


def test_module_takes_its_teacher_from_load_teacher(tmp_path):
    trained = get_model("cnn1d")
    torch.save(trained.state_dict(), tmp_path / "teacher.pt")
    module = DistillationModule(get_model("cnn1d"), get_model("mlp"), teacher_checkpoint=tmp_path / "teacher.pt",
                                speed=Speed(teacher_dtype="bfloat16"))
    expected = load_teacher(get_model("cnn1d"), tmp_path / "teacher.pt", dtype="bfloat16")
    assert fingerprint(module.teacher) == fingerprint(expected)
    x = torch.randn(4, 40)
    assert torch.equal(module.teacher_forward(x), expected(x.bfloat16()))


def test_speed_validates_dtype_names_and_is_a_value():
    assert Speed() == Speed(teacher_dtype=None, compile_student=False, compile_teacher=False, channels_last=False)
    assert Speed(channels_last=True) != Speed()
    Speed(teacher_dtype={"0": "bfloat16", "1": None})  # per member, None = as given
    with pytest.raises(ValueError, match=r"Unknown `teacher_dtype` 'fp8'. Expected one of float32, bfloat16, float16 or None"):
        Speed(teacher_dtype="fp8")
    with pytest.raises(ValueError, match=r"Unknown `teacher_dtype` 'int8'"):
        Speed(teacher_dtype={"0": "bfloat16", "1": "int8"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        Speed().channels_last = True


# ---------------------------------------------------------------------- a user's own loss combination
class EntropyBonusKD(DistillationModule):
    """A user project's loss: the parent's combination minus 0.1 times the student's mean entropy."""

    def distillation_loss(self, student_out, teacher_out, targets):
        parts = super().distillation_loss(student_out, teacher_out, targets)
        p = student_out.float().softmax(-1)
        entropy = -(p * p.log()).sum(-1).mean()
        return {**parts, "loss": parts["loss"] - 0.1 * entropy}


def test_overriding_distillation_loss_in_a_subclass():
    module = EntropyBonusKD(get_model("cnn1d"), get_model("mlp"), alpha=0.7)
    module.log = lambda *a, **k: None
    x, y = torch.randn(6, 40), torch.randint(0, 10, (6,))
    loss = module.training_step((x, y), 0)
    with torch.no_grad():
        s, t = module.student(x), module.teacher(x)
    expected, _, _ = reference_loss(s, t, y, 4.0, 0.7)
    p = torch.softmax(s.double(), -1)
    expected -= 0.1 * float(-(p * p.log()).sum(-1).mean())
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)

    before, student_before = teacher_state(module), module.student.classifier.weight.detach().clone()
    train, val = loaders()
    fit = trainer(max_epochs=1, log_every_n_steps=1)
    fit.fit(module, train, val)
    assert not torch.equal(module.student.classifier.weight, student_before)
    assert all(torch.equal(v, before[k]) for k, v in module.teacher.state_dict().items())
