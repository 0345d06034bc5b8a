"""Bad inputs to the Python API (DistillationModule, load_weights, load_from_checkpoint): one case per row.

Each row of ``docs/reliability.md`` for the module names its test here. Every case runs the real
code path (a Trainer fit, a real checkpoint file) and asserts the error type, the message (it names
the setting or the batch), and, where it matters, that nothing was trained or run.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd import DistillationAnnealing, DistillationModule, Speed, load_weights
from lightning_kd.checkpoint import CheckpointError, load_checkpoint
from lightning_kd.guards import NonFiniteError, ValueGuard
from lightning_kd.features import FeatureTerm
from lightning_kd.losses import ATLoss, DKDLoss, FitNetLoss, HardCrossEntropyLoss, HardMSELoss, KDLoss, RKDLoss, SoftMSELoss, kd_loss
from lightning_kd.losses.hard import cross_entropy_loss, mse_loss
from lightning_kd.schedules import Linear
from lightning_kd.soft_targets import build_soft_targets, with_soft_targets
from lightning_kd.teachers import TeacherEnsemble

C = 5  # classes


def trainer(**kwargs) -> L.Trainer:
    options = dict(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def loader(x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 4) -> DataLoader:
    dataset = TensorDataset(x) if y is None else TensorDataset(x, y)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def data(n: int = 16, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randint(0, C, (n,), generator=g)


class Poisoned(nn.Module):
    """A linear model whose output is replaced by ``value`` on the rows where the input's first feature is 99."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.linear = nn.Linear(3, C)
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        poisoned = (x[:, 0] == 99).unsqueeze(-1)
        return torch.where(poisoned, torch.full_like(out, self.value), out)


# ---------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "plus_inf"])
def test_non_finite_teacher_output_stops_the_run_naming_the_step(value):
    x, y = data()
    x[9, 0] = 99  # batch 2 (batch size 4)
    teacher = Poisoned(value)
    student = nn.Linear(3, C)
    before = copy.deepcopy(student.state_dict())
    module = DistillationModule(teacher, student)
    with pytest.raises(NonFiniteError, match=r"training step 2 \(batch 2 of epoch 0\) hold 5 non-finite"):
        trainer().fit(module, loader(x, y))
    # the two good steps trained; nothing of the poisoned batch reached the weights
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert not torch.equal(before["weight"], student.weight.detach())


def test_teacher_output_with_a_masked_class_is_accepted_but_an_all_masked_position_is_not():
    guard = ValueGuard()
    padded = torch.tensor([[1.0, 2.0, -math.inf], [0.5, -math.inf, -math.inf]])
    guard.check_teacher(padded, "step 0")  # a padded vocabulary: -inf classes are fine
    with pytest.raises(NonFiniteError, match=r"step 1 hold 3 non-finite"):
        guard.check_teacher(torch.tensor([[1.0, 2.0, 3.0], [-math.inf] * 3]), "step 1")


def test_non_finite_training_loss_stops_the_run_naming_the_step():
    x, y = data()
    x[13, 0] = 99  # batch 3
    module = DistillationModule(None, Poisoned(math.inf))  # scratch: the hard loss turns inf
    with pytest.raises(NonFiniteError, match=r"training loss became non-finite \(.*\) at training step 3 \(batch 3"):
        trainer().fit(module, loader(x, y))


def test_teacher_weights_with_nan_are_refused_at_load(tmp_path):
    teacher = nn.Linear(3, C)
    state = teacher.state_dict()
    state["bias"][1] = math.nan
    torch.save(state, tmp_path / "teacher.pt")
    with pytest.raises(ValueError, match=r"non-finite \(NaN/Inf\) values in 1 tensor\(s\): bias \(1\)"):
        load_weights(nn.Linear(3, C), tmp_path / "teacher.pt")
    with pytest.raises(ValueError, match="non-finite"):
        DistillationModule(nn.Linear(3, C), nn.Linear(3, C), teacher_checkpoint=str(tmp_path / "teacher.pt"))


@pytest.mark.parametrize(
    "temperature",
    [math.inf, math.nan, 0.0, -1.0, torch.tensor(math.inf), torch.tensor(0.0), torch.tensor(-2.0)],
    ids=["inf", "nan", "zero", "negative", "tensor_inf", "tensor_zero", "tensor_negative"],
)
def test_bad_temperature_is_refused(temperature):
    """Refused by the loss object, by the module's setter (the annealing callback's path) and by the functional loss.

    A loss object takes a number (or a LearnableTemperature): a tensor is a TypeError there; the
    functional twin takes tensors and checks their value.
    """
    error = TypeError if isinstance(temperature, torch.Tensor) else ValueError
    with pytest.raises(error, match="`temperature`"):
        KDLoss(temperature=temperature)
    module = DistillationModule(nn.Linear(3, C), nn.Linear(3, C), soft_loss=KDLoss(temperature=2.0))
    with pytest.raises(error, match="`temperature`"):
        module.temperature = temperature
    assert module.temperature == 2.0  # the refused value left no trace
    with pytest.raises(ValueError, match="Expected `temperature` to be"):
        kd_loss(torch.randn(2, C), torch.randn(2, C), temperature)


@pytest.mark.parametrize("weights", [[math.nan, 1.0], [math.inf, 1.0], [-1.0, 2.0], [0.0, 0.0]], ids=["nan", "inf", "negative", "zero_sum"])
def test_bad_ensemble_weights_are_refused(weights):
    with pytest.raises(ValueError, match=r"Expected finite, non-negative `teacher_weights` with a positive sum"):
        TeacherEnsemble([nn.Linear(3, C), nn.Linear(3, C)], weights=weights)


def test_float16_true_precision_on_the_cpu_is_refused():
    x, y = data()
    module = DistillationModule(nn.Linear(3, C), nn.Linear(3, C))
    with pytest.raises(ValueError, match=r"Expected a `precision` that trains on the CPU, but got '16-true'"):
        trainer(precision="16-true").fit(module, loader(x, y))


# ---------------------------------------------------------------------------- targets
@pytest.mark.parametrize("hard_loss", [HardCrossEntropyLoss, HardMSELoss], ids=["cross_entropy", "mse"])
@pytest.mark.parametrize("bad", [C + 7, -5], ids=["too_large", "negative"])
def test_out_of_range_target_on_a_later_batch_names_the_value_and_the_batch(hard_loss, bad):
    x, y = data()
    y[10] = bad  # batch 2: the first batch is fine, so a check of the first batch alone would miss it
    module = DistillationModule(nn.Linear(3, C), nn.Linear(3, C), hard_loss=hard_loss())
    with pytest.raises(ValueError, match=rf"Expected class targets in \[0, {C}\) or -100 .* 1 target\(s\) at training step 2 \(batch 2 of epoch 0\) are out of range: {bad}\."):
        trainer().fit(module, loader(x, y))


def test_out_of_range_validation_target_is_refused():
    x, y = data()
    vx, vy = data(8, seed=1)
    vy[5] = C
    module = DistillationModule(nn.Linear(3, C), nn.Linear(3, C))
    with pytest.raises(ValueError, match=r"at validation batch 1 \(epoch 0\) are out of range"):
        trainer().fit(module, loader(x, y), loader(vx, vy))


@pytest.mark.parametrize("loss", [cross_entropy_loss, mse_loss], ids=["cross_entropy", "mse"])
def test_unchecked_hard_loss_never_turns_a_bad_target_into_class_zero(loss):
    """With the value check deferred (an accelerator), a bad target is ignored until the guard raises: never class 0."""
    logits = torch.randn(4, C, dtype=torch.float64)
    targets = torch.tensor([1, C + 3, 0, -7])
    value = loss(logits, targets, check_values=False)
    # float64 reference over the two valid rows only
    if loss is cross_entropy_loss:
        ref = -(torch.log_softmax(logits, -1)[[0, 2], [1, 0]]).mean()
    else:
        onehot = torch.zeros(2, C, dtype=torch.float64)
        onehot[0, 1] = onehot[1, 0] = 1
        ref = (logits[[0, 2]] - onehot).pow(2).mean(-1).mean()
    assert value.item() == pytest.approx(ref.item(), rel=1e-6)


def test_deferred_checks_raise_at_the_flush_naming_the_first_bad_step():
    guard = ValueGuard(every_n_steps=4, deferred=True)
    for step in range(1, 4):
        guard.check_loss(torch.tensor(math.nan if step == 2 else 1.0), f"training step {step}")
        guard.maybe_flush(step)  # steps 1..3: nothing read yet
    guard.check_targets(torch.tensor([0, 9]), 5, "training step 4")
    with pytest.raises(NonFiniteError, match=r"non-finite \(nan\) at training step 2;"):
        guard.maybe_flush(4)


# ---------------------------------------------------------------------------- misuse
def test_teacher_and_student_the_same_object_is_refused():
    model = nn.Linear(3, C)
    with pytest.raises(ValueError, match=r"Expected `teacher` and `student` to be two different models"):
        DistillationModule(model, model)


def test_teacher_and_student_sharing_a_parameter_is_refused():
    shared = nn.Linear(3, 3)
    teacher, student = nn.Sequential(shared, nn.Linear(3, C)), nn.Sequential(shared, nn.Linear(3, C))
    with pytest.raises(ValueError, match=r"share no parameters, but 2 student parameter\(s\) belong to the teacher too: 0.weight, 0.bias"):
        DistillationModule(teacher, student)
    assert all(p.requires_grad for p in student.parameters())  # refused before anything was frozen


def test_last_batch_of_one_with_a_batchnorm_student_names_drop_last():
    x, y = data(9)  # batches of 4, 4, 1
    student = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, C))
    module = DistillationModule(nn.Linear(3, C), student)
    with pytest.raises(ValueError, match=r"single sample .* Set `drop_last=True` on the training DataLoader"):
        trainer().fit(module, loader(x, y))


# ---------------------------------------------------------------------------- checkpoints
@pytest.fixture
def saved_run(tmp_path):
    """A fitted module's checkpoint and the teacher's own checkpoint file it records."""
    x, y = data()
    teacher = nn.Linear(3, C)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    module = DistillationModule(nn.Linear(3, C), nn.Linear(3, C), teacher_checkpoint=str(tmp_path / "teacher.pt"))
    t = trainer(default_root_dir=tmp_path)
    t.fit(module, loader(x, y))
    t.save_checkpoint(tmp_path / "run.ckpt")
    return tmp_path, teacher, module


def test_load_from_checkpoint_refuses_weights_only_false(saved_run):
    tmp_path, teacher, _ = saved_run
    with pytest.raises(ValueError, match=r"Expected `weights_only=True`, but got False"):
        DistillationModule.load_from_checkpoint(tmp_path / "run.ckpt", teacher=nn.Linear(3, C), student=nn.Linear(3, C), weights_only=False)


def test_pickled_payload_in_a_checkpoint_never_runs(saved_run):
    """Even where torch's default is weights_only=False (simulated with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1)."""
    tmp_path, _, _ = saved_run
    marker = tmp_path / "pwned"
    payload = tmp_path / "evil.ckpt"
    script = f"""
import os, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
checkpoint = torch.load({str(tmp_path / 'run.ckpt')!r}, weights_only=True)
checkpoint["hyper_parameters"]["payload"] = Payload()
torch.save(checkpoint, {str(payload)!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    code = f"""
import torch
import torch.nn.functional as F
from torch import nn
from lightning_kd import DistillationAnnealing, DistillationModule, Speed, load_weights
for load in (
    lambda: DistillationModule.load_from_checkpoint({str(payload)!r}, teacher=nn.Linear(3, {C}), student=nn.Linear(3, {C})),
    lambda: load_weights(nn.Linear(3, {C}), {str(payload)!r}),
):
    try:
        load()
    except Exception as err:
        print(type(err).__name__, err)
"""
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert not marker.exists()
    assert out.count("CheckpointError") == 2 and "never unpickles code from a file" in out


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_damaged_checkpoint_gets_our_message(saved_run, damage):
    tmp_path, _, _ = saved_run
    path = tmp_path / f"{damage}.ckpt"
    content = (tmp_path / "run.ckpt").read_bytes()
    path.write_bytes({"truncated": content[: len(content) // 2], "empty": b"", "text": b"not a checkpoint"}[damage])
    match = "is empty" if damage == "empty" else "is truncated or not a torch checkpoint"
    with pytest.raises(CheckpointError, match=match):
        DistillationModule.load_from_checkpoint(path, teacher=nn.Linear(3, C), student=nn.Linear(3, C))
    with pytest.raises(CheckpointError, match=match):
        load_weights(nn.Linear(3, C), path)


def test_load_from_checkpoint_after_the_teacher_file_moved_uses_the_fingerprint(saved_run):
    tmp_path, teacher, module = saved_run
    (tmp_path / "teacher.pt").rename(tmp_path / "elsewhere.pt")
    with pytest.warns(UserWarning, match="no longer exists"):
        loaded = DistillationModule.load_from_checkpoint(tmp_path / "run.ckpt", teacher=copy.deepcopy(teacher), student=nn.Linear(3, C))
    assert torch.equal(loaded.student.weight, module.student.weight.cpu())
    with pytest.warns(UserWarning, match="no longer exists"), pytest.raises(RuntimeError, match="fingerprint differs"):
        DistillationModule.load_from_checkpoint(tmp_path / "run.ckpt", teacher=nn.Linear(3, C), student=nn.Linear(3, C))
    # outside load_from_checkpoint a missing teacher file is still an error
    with pytest.raises(FileNotFoundError, match="elsewhere_not_here"):
        DistillationModule(nn.Linear(3, C), nn.Linear(3, C), teacher_checkpoint=str(tmp_path / "elsewhere_not_here.pt"))


def test_load_checkpoint_reads_a_good_file(saved_run):
    tmp_path, _, module = saved_run
    checkpoint = load_checkpoint(tmp_path / "run.ckpt")
    assert torch.equal(checkpoint["state_dict"]["student.weight"], module.student.weight.detach().cpu())
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])


# ---------------------------------------------------------------------------- found by trying it as a new user
class NaNWhenEvaluated(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if self.training else out * math.nan


def test_non_finite_student_output_in_validation_stops_the_run():
    x, y = data()
    module = DistillationModule(nn.Linear(3, C), NaNWhenEvaluated(3, C))
    with pytest.raises(NonFiniteError, match=r"The student's outputs at validation batch 0 \(epoch 0\) hold 20 non-finite"):
        trainer().fit(module, loader(x, y), loader(x[:4], y[:4]))


def test_an_empty_batch_is_refused():
    x, y = data()
    empty = DataLoader(TensorDataset(x, y), batch_size=4, collate_fn=lambda items: (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"The batch at training step 0 \(batch 0 of epoch 0\) holds no sample"):
        trainer().fit(DistillationModule(nn.Linear(3, C), nn.Linear(3, C)), empty)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16])
@pytest.mark.parametrize("hard_loss", [HardCrossEntropyLoss, HardMSELoss], ids=["cross_entropy", "mse"])
def test_integer_targets_of_any_width_train_as_int64(dtype, hard_loss):
    """int32/uint8 class indices give exactly the int64 run (they were a raw torch error)."""
    x, y = data()
    weights = []
    for targets in (y, y.to(dtype)):
        L.seed_everything(0, verbose=False)
        module = DistillationModule(nn.Linear(3, C), nn.Linear(3, C), hard_loss=hard_loss())
        trainer().fit(module, loader(x, targets))
        weights.append(module.student.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


def test_targets_of_another_shape_with_a_custom_hard_loss_get_our_message():
    x, y = data()
    module = DistillationModule(nn.Linear(3, C), nn.Linear(3, C), hard_loss=lambda out, t: F.cross_entropy(out, t.view(-1)))
    with pytest.raises(ValueError, match=r"Expected class targets of shape \(4,\) .* but got \(4, 1\).*squeeze"):
        trainer().fit(module, loader(x, y.unsqueeze(-1)))


# ---------------------------------------------------------------------------- settings of the wrong type
def kl_reference(student: torch.Tensor, teacher: torch.Tensor, t: float) -> float:
    """Mean over rows of KL(softmax(teacher / t) || softmax(student / t)), in float64, written out."""
    p = torch.softmax(teacher.double() / t, dim=-1)
    log_q = torch.log_softmax(student.double() / t, dim=-1)
    return float((p * (p.log() - log_q)).sum(-1).mean())


@pytest.mark.parametrize(
    ("make", "setting"),
    [
        (lambda: KDLoss(scale_by_t2="no"), "scale_by_t2"),
        (lambda: KDLoss(standardize="false"), "standardize"),
        (lambda: setattr(KDLoss(), "standardize", "yes"), "standardize"),
        (lambda: kd_loss(torch.zeros(2, C), torch.zeros(2, C), 2.0, standardize="no"), "standardize"),
        (lambda: Speed(channels_last="no"), "channels_last"),
        (lambda: Speed(compile_student="False"), "compile_student"),
        (lambda: DistillationModule(nn.Linear(3, C), nn.Linear(3, C), keep_teacher_in_checkpoint="no"), "keep_teacher_in_checkpoint"),
    ],
    ids=["scale_by_t2", "standardize", "standardize_set_later", "functional", "channels_last", "compile_student", "keep_teacher"],
)
def test_a_switch_given_as_a_string_is_refused_naming_it(make, setting):
    """`bool("no")` is True: a string would switch the option on. A real bool is honoured (checked on values)."""
    with pytest.raises(TypeError, match=rf"Expected `{setting}` to be True or False, but got '\w+' \(str\)"):
        make()
    s, t = torch.randn(6, C, dtype=torch.float64), torch.randn(6, C, dtype=torch.float64)
    unscaled = KDLoss(temperature=3.0, scale_by_t2=False)(s.float(), t.float())
    assert unscaled.item() == pytest.approx(kl_reference(s, t, 3.0), rel=1e-5)
    assert KDLoss(temperature=3.0, scale_by_t2=True)(s.float(), t.float()).item() == pytest.approx(9 * kl_reference(s, t, 3.0), rel=1e-5)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: DistillationModule(nn.Linear(3, C), nn.Linear(3, C), alpha="0.5"), TypeError, r"Expected `alpha` to be a number, but got '0.5'"),
        (lambda: DistillationModule(nn.Linear(3, C), nn.Linear(3, C), soft_weight="1"), TypeError, r"Expected `soft_weight` to be a number"),
        (lambda: DistillationModule(nn.Linear(3, C), nn.Linear(3, C), optimizer="adam"), TypeError, r"Expected `optimizer` to be a partial"),
        (lambda: DistillationModule(nn.Linear(3, C), nn.Linear(3, C), features=["fitnet"]), TypeError, r"Expected `features` to be a dict"),
        (lambda: ATLoss(p=0.0), ValueError, r"Expected `p` to be a finite number > 0"),
        (lambda: ATLoss(p="2"), TypeError, r"Expected `p` to be a number"),
        (lambda: RKDLoss(angle_weight=-50.0), ValueError, r"Expected `angle_weight` to be a finite number >= 0"),
        (lambda: RKDLoss(distance_weight=math.nan), ValueError, r"Expected `distance_weight` to be a finite number >= 0"),
    ],
    ids=["alpha_str", "soft_weight_str", "optimizer_str", "features_list", "at_p_zero", "at_p_str", "rkd_negative", "rkd_nan"],
)
def test_a_setting_of_the_wrong_type_or_range_is_refused_naming_it(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_feature_terms_with_soft_targets_are_refused(tmp_path):
    """The store holds logits only: feature terms would read activations left from another batch (or none)."""
    x, y = data()
    teacher = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, C))
    store = build_soft_targets(teacher, loader(x, y), tmp_path / "store", trainer=trainer())
    features = {"fitnet": FeatureTerm(FitNetLoss(), "0", "0")}
    student = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, C))
    with pytest.raises(ValueError, match=r"Feature terms need the teacher's forward on every training batch.*Drop `soft_targets`"):
        DistillationModule(teacher, student, soft_targets=store, features=features)
    with pytest.raises(ValueError, match=r"Drop `soft_targets`"):
        DistillationModule(None, student, soft_targets=store, features=features)
    with pytest.raises(ValueError, match=r"Feature terms need the teacher's activations: pass a `teacher`"):
        DistillationModule(None, student, features=features)


def test_a_dict_batch_without_an_input_key_is_refused_naming_its_keys():
    """Before: its tensors were taken for a CombinedLoader's batches and concatenated (labels as inputs)."""
    x, y = data(8)
    samples = [{"pixel_values": x[i], "label": y[i]} for i in range(len(x))]
    module = DistillationModule(nn.Linear(3, C), nn.Linear(3, C))
    with pytest.raises(TypeError, match=r"Cannot unpack a dict batch with keys \['label', 'pixel_values'\]: none is an input key"):
        trainer().fit(module, DataLoader(samples, batch_size=4))
    # a CombinedLoader's dict of batches still concatenates, the unlabeled rows with the ignore index
    inputs, targets = module.unpack_batch({"labeled": (x[:4], y[:4]), "unlabeled": x[4:]})
    assert torch.equal(inputs, x) and torch.equal(targets, torch.cat([y[:4], torch.full((4,), -100)]))


def test_one_attribute_annealed_under_two_names_is_refused():
    """`temperature` is `soft_loss.temperature`: two schedules would overwrite each other on every step."""
    x, y = data()
    module = DistillationModule(nn.Linear(3, C), nn.Linear(3, C))
    one = DistillationAnnealing(temperature=Linear(4.0, 1.0), schedules={"soft_loss.temperature": Linear(8.0, 2.0)})
    with pytest.raises(RuntimeError, match=r"`soft_loss.temperature` and `temperature` name one attribute in one callback"):
        trainer(callbacks=[one]).fit(module, loader(x, y))
    two = [DistillationAnnealing(temperature=Linear(4.0, 1.0)), DistillationAnnealing(schedules={"soft_loss.temperature": Linear(8.0, 2.0)})]
    with pytest.raises(RuntimeError, match=r"name one attribute in two `DistillationAnnealing` callbacks"):
        trainer(callbacks=two).fit(module, loader(x, y))
    assert module.temperature == 4.0  # nothing was set


# ---------------------------------------------------------------------------- checkpoints of another objective
def fitted_checkpoint(tmp_path, teacher, **kwargs):
    x, y = data()
    module = DistillationModule(teacher, nn.Linear(3, C), **kwargs)
    t = trainer(max_steps=2)
    t.fit(module, loader(x, y))
    t.save_checkpoint(tmp_path / "run.ckpt")
    return module


def test_load_from_checkpoint_with_another_soft_loss_is_refused(tmp_path):
    """Before: a module rebuilt without `soft_loss` silently went on with the default KDLoss."""
    teacher = nn.Linear(3, C)
    module = fitted_checkpoint(tmp_path, teacher, soft_loss=DKDLoss(beta=8.0), alpha=0.5)
    with pytest.raises(ValueError, match=r"soft_loss: trained with 'DKDLoss\(temperature=4.0, alpha=1.0, beta=8.0.*this module has 'KDLoss\("):
        DistillationModule.load_from_checkpoint(tmp_path / "run.ckpt", teacher=copy.deepcopy(teacher), student=nn.Linear(3, C), alpha=0.5)
    with pytest.raises(ValueError, match=r"hard_loss: trained with 'HardCrossEntropyLoss\(\)', this module has 'torch.nn.functional.mse_loss'"):
        DistillationModule.load_from_checkpoint(tmp_path / "run.ckpt", teacher=copy.deepcopy(teacher), student=nn.Linear(3, C),
                                                soft_loss=DKDLoss(beta=8.0), hard_loss=F.mse_loss)
    loaded = DistillationModule.load_from_checkpoint(tmp_path / "run.ckpt", teacher=copy.deepcopy(teacher), student=nn.Linear(3, C),
                                                     soft_loss=DKDLoss(beta=8.0))
    assert torch.equal(loaded.student.weight, module.student.weight.detach())
    # resuming a fit with another loss is refused the same way, before a step is taken
    x, y = data()
    other = DistillationModule(copy.deepcopy(teacher), nn.Linear(3, C), soft_loss=DKDLoss(beta=2.0))
    with pytest.raises(ValueError, match=r"beta=8.0.*this module has 'DKDLoss\(temperature=4.0, alpha=1.0, beta=2.0"):
        trainer(max_steps=4).fit(other, loader(x, y), ckpt_path=tmp_path / "run.ckpt")


def test_a_teacher_in_another_dtype_is_named_on_load(tmp_path):
    teacher = nn.Linear(3, C)
    fitted_checkpoint(tmp_path, copy.deepcopy(teacher), speed=Speed(teacher_dtype="bfloat16"))
    with pytest.raises(RuntimeError, match=r"runs in torch.float32, but the checkpoint was trained with it in torch.bfloat16.*Speed\(teacher_dtype"):
        DistillationModule.load_from_checkpoint(tmp_path / "run.ckpt", teacher=copy.deepcopy(teacher), student=nn.Linear(3, C))
    loaded = DistillationModule.load_from_checkpoint(tmp_path / "run.ckpt", teacher=copy.deepcopy(teacher), student=nn.Linear(3, C),
                                                     speed=Speed(teacher_dtype="bfloat16"))
    assert loaded.teacher.weight.dtype == torch.bfloat16


def test_annealing_the_temperature_of_a_loss_without_one_says_why():
    x, y = data()
    module = DistillationModule(nn.Linear(3, C), nn.Linear(3, C), soft_loss=SoftMSELoss())
    with pytest.raises(RuntimeError, match=r"anneals `temperature`, but `DistillationModule.soft_loss` has no attribute `temperature` "
                                           r"\(SoftMSELoss has no temperature \(its logits enter the loss as they are\)\)"):
        trainer(callbacks=[DistillationAnnealing(temperature=Linear(4.0, 1.0))]).fit(module, loader(x, y))


def test_load_from_checkpoint_after_its_store_moved_says_what_to_pass(tmp_path):
    x, y = data()
    teacher = nn.Linear(3, C)
    store = build_soft_targets(teacher, loader(x, y), tmp_path / "store", trainer=trainer())
    module = DistillationModule(None, nn.Linear(3, C), soft_targets=store)
    t = trainer(max_steps=2)
    t.fit(module, with_soft_targets(loader(x, y), store))
    t.save_checkpoint(tmp_path / "run.ckpt")
    (tmp_path / "store").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=r"trained from the soft-target store at .*store, which is no longer there.*`soft_targets=None`"):
        DistillationModule.load_from_checkpoint(tmp_path / "run.ckpt", teacher=None, student=nn.Linear(3, C))
    for soft_targets in (None, tmp_path / "moved"):
        loaded = DistillationModule.load_from_checkpoint(tmp_path / "run.ckpt", teacher=None, student=nn.Linear(3, C), soft_targets=soft_targets)
        assert torch.equal(loaded.student.weight, module.student.weight.detach())
