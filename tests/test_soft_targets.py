"""The offline soft-target store: exact round trips, refusals (fingerprint, corruption, random views, losses that
need full logits from a top-k store), replayed augmentation, CombinedLoaders, and distillation from the store equal
to online distillation (bit for bit on the CPU)."""

from __future__ import annotations

import json
import math

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_kd import DistillationModule, Speed
from lightning_kd.data.augment import RandomScale, RandomShift
from lightning_kd.losses import DISTLoss, DKDLoss, JSDLoss, KDLoss, ReverseKLLoss, SkewKLLoss, SoftMSELoss, TopKLogits, kd_loss
from lightning_kd.soft_targets.batches import SoftTargetBatch, SoftTargetDataModule, indexed_loader, with_soft_targets
from lightning_kd.soft_targets.build import build_soft_targets
from lightning_kd.soft_targets.store import SoftTargetStore
from lightning_kd.teacher_outputs import TeacherOutputs

N, D, C, B = 96, 12, 7, 16


def make_teacher(seed=0):
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(D, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Dropout(0.3), nn.Linear(24, C))
    teacher[1].running_mean.normal_()  # eval-mode BatchNorm must differ visibly from train mode
    return teacher.eval()


def make_student(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, D, generator=g) * 2, torch.randint(0, C, (N,), generator=g))


def loader(dataset, shuffle=True, batch_size=B):
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(3))


def trainer(**kwargs):
    defaults = dict(logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, deterministic=True)
    return L.Trainer(**{**defaults, **kwargs})


def sequential_outputs(teacher, x, batch_size=B):
    """The teacher's outputs as the builder computes them: in index order, in batches of `batch_size`."""
    with torch.no_grad():
        return torch.cat([teacher.eval()(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


# ---------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_exact_in_the_stored_dtype(tmp_path, data, dtype):
    teacher = make_teacher()
    store = build_soft_targets(teacher, loader(data), tmp_path / "st", dtype=dtype, trainer=trainer())
    expected = sequential_outputs(teacher, data.tensors[0]).to(getattr(torch, dtype))
    index = torch.randperm(N)[:40]
    got = store.lookup("train", index)
    assert got.dtype == getattr(torch, dtype)
    assert torch.equal(got, expected[index])
    manifest = json.loads((tmp_path / "st" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["dtype"] == dtype and manifest["output_shape"] == [C]
    assert manifest["parts"]["train"]["identity"]["length"] == N
    assert np.all(np.load(tmp_path / "st" / "train" / "writes.npy") == 1)  # every row once


def test_the_build_runs_the_teacher_in_eval_mode_whatever_mode_it_is_given_in(tmp_path, data):
    teacher = make_teacher().train()  # dropout and batch-statistics BatchNorm would change every output
    store = build_soft_targets(teacher, loader(data), tmp_path / "st", trainer=trainer())
    assert torch.equal(store.lookup("train", torch.arange(N)), sequential_outputs(make_teacher(), data.tensors[0]))
    assert not any(p.requires_grad for p in teacher.parameters())


def test_top_k_store_keeps_the_top_logits_and_the_tail(tmp_path, data):
    teacher = make_teacher()
    store = build_soft_targets(teacher, loader(data), tmp_path / "st", dtype="float32", top_k=3, trainer=trainer())
    full = sequential_outputs(teacher, data.tensors[0])
    got = store.lookup("train", torch.arange(N))
    assert isinstance(got, TopKLogits) and got.values.shape == (N, 3)
    values, indices = full.topk(3, dim=-1)
    assert torch.equal(got.values, values) and torch.equal(got.indices, indices)
    rest = [[v for c, v in enumerate(row) if c not in set(idx)] for row, idx in zip(full.double().tolist(), indices.tolist())]
    tail = torch.tensor([math.log(sum(math.exp(v) for v in r)) for r in rest], dtype=torch.float64)
    torch.testing.assert_close(got.tail_logsumexp.double(), tail, rtol=1e-6, atol=1e-6)
    # a top-k file is 3/7 of the full one
    files = store.manifest["parts"]["train"]["files"]
    assert files["topk_values"]["shape"] == [1, N, 3] and "logits" not in files


def test_float16_overflow_is_refused(tmp_path, data):
    teacher = make_teacher()
    with torch.no_grad():
        teacher[-1].weight.mul_(1e5)
    with pytest.raises(ValueError, match=r"overflow `dtype` 'float16'. Use one of: bfloat16, float32"):
        build_soft_targets(teacher, loader(data), tmp_path / "st", dtype="float16", trainer=trainer())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "float64"}, r"Unknown `dtype` 'float64'. Expected one of float16, bfloat16, float32."),
        ({"top_k": 0}, r"Expected `top_k` to be None or an int >= 1, but got 0"),
        ({"epochs": 0}, r"Expected `epochs` to be an int >= 1, but got 0"),
        ({"epochs": 2}, r"`epochs=2` records several views per sample, which only differ under augmentation"),
    ],
)
def test_bad_settings_are_refused(tmp_path, data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_soft_targets(make_teacher(), loader(data), tmp_path / "st", trainer=trainer(), **kwargs)
    assert not (tmp_path / "st").exists()


def test_a_non_empty_path_is_refused(tmp_path, data):
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="is not empty"):
        build_soft_targets(make_teacher(), loader(data), tmp_path / "st", trainer=trainer())
    assert (tmp_path / "st" / "mine.txt").read_text() == "user data"


# ---------------------------------------------------------------------------------- top-k loss
def ref_bucket_kl(student, top_values, top_indices, tail_lse, T):
    """Float64 reference: KL over the k top classes plus one tail bucket, with the tail at T as in the docs."""
    total = 0.0
    for s, v, idx, tl in zip(student.double().tolist(), top_values.double().tolist(), top_indices.tolist(), tail_lse.double().tolist()):
        c, k = len(s), len(v)
        zs = sum(math.exp(x / T) for x in s)
        q = [math.exp(s[i] / T) / zs for i in idx]
        q_tail = sum(math.exp(s[j] / T) for j in range(c) if j not in idx) / zs
        tail_logit = math.log(c - k) + (tl - math.log(c - k)) / T
        zt = sum(math.exp(x / T) for x in v) + math.exp(tail_logit)
        p = [math.exp(x / T) / zt for x in v]
        p_tail = math.exp(tail_logit) / zt
        total += sum(a * math.log(a / b) for a, b in zip(p, q)) + p_tail * math.log(p_tail / q_tail)
    return total / len(student) * T * T


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_top_k_loss_matches_its_float64_reference(k, T):
    s, t = torch.randn(10, 7) * 2, torch.randn(10, 7) * 2
    top = TopKLogits.from_logits(t, k)
    expected = ref_bucket_kl(s, top.values, top.indices, top.tail_logsumexp, T)
    assert kd_loss(s, top, T).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_top_k_loss_equals_the_full_loss_when_the_tail_is_negligible(T):
    s = torch.randn(32, 50, requires_grad=True)
    t = torch.full((32, 50), -60.0)
    t[:, :5] = torch.randn(32, 5) * 2  # five plausible classes, 45 with ~e^-60 of the mass
    full, top = kd_loss(s, t, T), kd_loss(s, TopKLogits.from_logits(t, 5), T)
    assert top.item() == pytest.approx(full.item(), rel=1e-6)
    g_full, = torch.autograd.grad(full, s)
    g_top, = torch.autograd.grad(top, s)
    torch.testing.assert_close(g_top, g_full, rtol=1e-5, atol=1e-7)


def test_top_k_with_k_equal_to_the_classes_is_the_full_loss_and_its_gradient_is_finite():
    s, t = torch.randn(6, 3, 9, requires_grad=True), torch.randn(6, 3, 9) * 3
    mask = torch.rand(6, 3) > 0.3
    top = kd_loss(s, TopKLogits.from_logits(t, 9), 2.0, mask=mask)
    assert top.item() == pytest.approx(kd_loss(s, t, 2.0, mask=mask).item(), rel=1e-6)
    top.backward()
    assert torch.isfinite(s.grad).all()


def test_top_k_loss_is_a_lower_bound_of_the_full_loss_at_t1():
    s, t = torch.randn(200, 20), torch.randn(200, 20) * 2
    for k in (1, 5, 10, 19):
        assert kd_loss(s, TopKLogits.from_logits(t, k), 1.0).item() <= kd_loss(s, t, 1.0).item() + 1e-6


def test_top_k_targets_of_the_wrong_shape_are_refused():
    top = TopKLogits.from_logits(torch.randn(4, 9), 3)
    with pytest.raises(ValueError, match=r"Expected top-k teacher targets of shape \(5,\) \+ \(k,\)"):
        kd_loss(torch.randn(5, 9), top)
    with pytest.raises(ValueError, match=r"Expected `top_k` in \[1, 9\]"):
        TopKLogits.from_logits(torch.randn(4, 9), 10)


# ---------------------------------------------------------------------------------- refusals
def build(tmp_path, data, **kwargs):
    return build_soft_targets(make_teacher(), loader(data), tmp_path / "st", dtype="float32", trainer=trainer(), **kwargs)


def test_a_store_of_another_teacher_is_refused(tmp_path, data):
    store = build(tmp_path, data)
    DistillationModule(make_teacher(), make_student(), soft_targets=store)  # the same teacher: accepted
    with pytest.raises(RuntimeError, match=r"was made by another teacher: its weights fingerprint is [0-9a-f]{12}, the given"):
        DistillationModule(make_teacher(seed=5), make_student(), soft_targets=store)


def test_other_data_is_refused_naming_what_differs(tmp_path, data):
    store = build(tmp_path, data)
    x, y = data.tensors
    changed = TensorDataset(x.clone().index_fill_(0, torch.tensor([0]), 0.0), y)
    with pytest.raises(RuntimeError, match=r"was built from other data than training dataset 'train'; content_sha256: stored"):
        with_soft_targets(loader(changed), store)
    with pytest.raises(RuntimeError, match=r"length: stored 96, now 95"):
        with_soft_targets(loader(TensorDataset(x[:95], y[:95])), store)


class WithTransform(Dataset):
    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return self.transform(x), y


class Scale:
    def __init__(self, factor):
        self.factor = factor

    def __call__(self, x):
        return x * self.factor

    def __repr__(self):
        return f"Scale({self.factor})"


def test_another_transform_is_refused(tmp_path, data):
    store = build_soft_targets(make_teacher(), loader(WithTransform(data, Scale(1.0))), tmp_path / "st", trainer=trainer())
    assert store.manifest["parts"]["train"]["identity"]["transform"] == "transform=Scale(1.0)"
    with_soft_targets(loader(WithTransform(data, Scale(1.0))), store)  # the same: accepted
    with pytest.raises(RuntimeError, match=r"transform: stored 'transform=Scale\(1.0\)', now 'transform=Scale\(2.0\)'"):
        with_soft_targets(loader(WithTransform(data, Scale(2.0))), store)


class RandomView(Dataset):
    """A dataset augmenting at random in __getitem__, as torchvision transforms do."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x + 0.1 * torch.randn_like(x), y


def test_random_augmentation_in_the_dataset_is_refused(tmp_path, data):
    with pytest.raises(RuntimeError, match=r"returned two different samples for index 0: it augments at random"):
        build_soft_targets(make_teacher(), loader(RandomView(data)), tmp_path / "st", trainer=trainer())
    store = build(tmp_path, data)
    with pytest.raises(RuntimeError, match=r"augments at random, so teacher outputs stored for one view would be reused"):
        with_soft_targets(loader(RandomView(data)), store)


def test_truncated_store_is_refused(tmp_path, data):
    store = build(tmp_path, data)
    file = store.path / "train" / "logits.npy"
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(size - 7 * 4)
    with pytest.raises(RuntimeError, match=rf"truncated or damaged: train/logits.npy has {size - 28} bytes, the manifest says {size}"):
        SoftTargetStore(store.path)


def test_corrupted_store_is_refused(tmp_path, data):
    store = build(tmp_path, data)
    file = store.path / "train" / "logits.npy"
    raw = bytearray(file.read_bytes())
    raw[-5] ^= 0xFF  # same size, one flipped byte
    file.write_bytes(bytes(raw))
    with pytest.raises(RuntimeError, match=r"is corrupted: the SHA-256 of train/logits.npy does not match its manifest"):
        SoftTargetStore(store.path)
    SoftTargetStore(store.path, verify=False)  # sizes only: opens (documented)


def test_incomplete_missing_and_garbled_stores_are_refused(tmp_path, data):
    store = build(tmp_path, data)
    manifest = store.path / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good.replace('"complete": true', '"complete": false'))
    with pytest.raises(RuntimeError, match="is incomplete: its build did not finish"):
        SoftTargetStore(store.path)
    manifest.write_text(good[:50])
    with pytest.raises(RuntimeError, match=r"The soft-target store manifest '.*manifest.json' is damaged \(not valid JSON"):
        SoftTargetStore(store.path)
    manifest.write_text(good.replace('"format": 2', '"format": 99'))
    with pytest.raises(RuntimeError, match=r"has format 99, but this lightning-kd \(.*\) reads formats 1 and 2. Rebuild it."):
        SoftTargetStore(store.path)
    with pytest.raises(FileNotFoundError, match="No soft-target store at .*nowhere"):
        SoftTargetStore(tmp_path / "nowhere")


def test_plain_batches_with_soft_targets_are_refused(tmp_path, data):
    store = build(tmp_path, data)
    module = DistillationModule(None, make_student(), soft_targets=store)
    with pytest.raises(RuntimeError, match=r"carries no sample indices .*SoftTargetDataModule\(datamodule, store\)"):
        trainer(max_steps=1).fit(module, train_dataloaders=loader(data))


def test_a_store_with_another_augmentation_is_refused(tmp_path, data):
    store = build(tmp_path, data, augmentation=RandomShift(2), epochs=2)
    with pytest.raises(RuntimeError, match=r"recorded with augmentation RandomShift\(max_shift=2, dim=-1\), but training uses None"):
        DistillationModule(None, make_student(), soft_targets=store)
    with pytest.raises(RuntimeError, match=r"but training uses RandomShift\(max_shift=1, dim=-1\)"):
        DistillationModule(None, make_student(), soft_targets=store, augmentation=RandomShift(1))


# ---------------------------------------------------------------------------------- distilling from the store
def fit_student(module, train_loader, epochs):
    trainer(max_epochs=epochs).fit(module, train_dataloaders=train_loader)
    return torch.cat([p.detach().flatten() for p in module.student.parameters()])


class RecordsLosses(DistillationModule):
    """Keeps every training step's ``{"loss", "soft", "hard"}`` (the values the optimizer steps on)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []

    def distillation_loss(self, student_out, teacher_out, targets):
        losses = super().distillation_loss(student_out, teacher_out, targets)
        self.steps.append({key: value.detach().clone() for key, value in losses.items()})
        return losses


@pytest.mark.parametrize("make_loss", [lambda: KDLoss(4.0), lambda: DKDLoss(4.0, alpha=1.0, beta=8.0)], ids=["KDLoss", "DKDLoss"])
def test_distilling_from_the_store_equals_online_distillation(tmp_path, data, make_loss):
    """float32 store: same batches, same teacher outputs, same loss code -> the same losses at every step and the
    same student, bit for bit on the CPU (DKD takes its class targets from the batch, as online). N is a multiple
    of B, so the build's batches (in index order) and the shuffled training batches all hold B rows: a CPU matrix
    kernel may round a row's logits differently in a batch of another size (a last-bit difference of the teacher's
    own forward, not of the store)."""
    teacher = make_teacher()
    store = build_soft_targets(teacher, loader(data), tmp_path / "st", dtype="float32", trainer=trainer())
    L.seed_everything(0)
    online = RecordsLosses(teacher, make_student(), soft_loss=make_loss())
    online_weights = fit_student(online, loader(data), 3)
    L.seed_everything(0)
    offline = RecordsLosses(None, make_student(), soft_loss=make_loss(), soft_targets=store)
    assert offline.teacher is None  # no teacher in memory
    offline_weights = fit_student(offline, with_soft_targets(loader(data), store), 3)
    assert len(online.steps) == 3 * (N // B)
    for step, (a, b) in enumerate(zip(online.steps, offline.steps, strict=True)):
        assert a.keys() == b.keys() == {"loss", "soft", "hard"}
        assert all(torch.equal(a[key], b[key]) for key in a), (step, a, b)
    assert online.steps[0]["soft"] > 0 and not torch.equal(online.steps[0]["soft"], online.steps[-1]["soft"])  # a real run
    assert torch.equal(offline_weights, online_weights)


@pytest.mark.parametrize(
    ("make_loss", "name"),
    [
        (lambda: DKDLoss(), "DKDLoss"),
        (lambda: KDLoss(standardize=True), "KDLoss with standardize=True"),
        (lambda: DKDLoss(standardize=True), "DKDLoss with standardize=True"),
        (lambda: DISTLoss(), "DISTLoss"),
        (lambda: ReverseKLLoss(), "ReverseKLLoss"),
        (lambda: JSDLoss(), "JSDLoss"),
        (lambda: SkewKLLoss(), "SkewKLLoss"),
        (lambda: SoftMSELoss(), "SoftMSELoss"),
    ],
    ids=["DKDLoss", "KDLoss-standardize", "DKDLoss-standardize", "DISTLoss", "ReverseKLLoss", "JSDLoss", "SkewKLLoss", "SoftMSELoss"],
)
def test_a_top_k_store_refuses_a_loss_that_needs_full_logits_naming_it(tmp_path, data, make_loss, name):
    store = build(tmp_path, data, top_k=3)
    with pytest.raises(ValueError, match=rf"^{name} needs full teacher outputs, but the soft-target store keeps only the top-3; "
                                         r"only a loss that accepts top-k targets \(KDLoss\) distils from it"):
        DistillationModule(None, make_student(), soft_loss=make_loss(), soft_targets=store)


def test_a_top_k_store_distils_with_kd_loss(tmp_path, data):
    """The accepted side of the refusal: the module's soft loss is the bucketed top-k KL of the stored targets."""
    store = build(tmp_path, data, top_k=3)
    module = RecordsLosses(None, make_student(), soft_loss=KDLoss(2.0), soft_targets=store)
    first = next(iter(with_soft_targets(loader(data), store)))  # the loader's seeded generator: the run's first batch
    trainer(max_steps=1).fit(module, train_dataloaders=with_soft_targets(loader(data), store))
    x, _ = first.batch
    targets = store.lookup("train", first.index)
    assert isinstance(targets, TopKLogits)
    assert torch.equal(module.steps[0]["soft"], kd_loss(make_student()(x), targets, 2.0).detach())  # the student before its step


def test_replayed_augmentation_equals_online_augmentation(tmp_path, data):
    """A store recorded for 2 epochs of a random shift replays the exact views: training for 4 epochs
    (views 0, 1, 0, 1) from it equals online training that draws the same (seed, epoch % 2, index) views."""
    aug = RandomShift(3)
    teacher = make_teacher()
    store = build_soft_targets(teacher, loader(data), tmp_path / "st", dtype="float32", epochs=2, augmentation=aug,
                               augmentation_seed=7, trainer=trainer())
    # the recorded views: epoch e of sample i is the teacher's output on the shifted input
    x = data.tensors[0]
    for epoch in (0, 1):
        params = store.augmentation_params("train", torch.arange(N), epoch)
        assert torch.equal(params, aug.sample(7, epoch, torch.arange(N)))
        with torch.no_grad():
            expected = torch.cat([teacher(aug.apply(x[i : i + B], params[i : i + B])) for i in range(0, N, B)])
        assert torch.equal(store.lookup("train", torch.arange(N), epoch), expected)
    assert not torch.equal(store.lookup("train", torch.arange(N), 0), store.lookup("train", torch.arange(N), 1))

    class CycledViews(TeacherOutputs):  # online views keyed like the store: (seed, epoch % 2, index)
        def view(self, inputs, indexed, epoch, step):
            return super().view(inputs, indexed, epoch % 2, step)

    L.seed_everything(0)
    cycled = DistillationModule(teacher, make_student(), augmentation=aug, augmentation_seed=7)
    cycled.teacher_outputs = CycledViews(aug, seed=7)  # the one seam where a training batch's view and teacher outputs come from
    online = fit_student(cycled, indexed_loader(loader(data), "train"), 4)
    L.seed_everything(0)
    offline = fit_student(DistillationModule(None, make_student(), soft_targets=store, augmentation=aug, augmentation_seed=7),
                          with_soft_targets(loader(data), store), 4)
    torch.testing.assert_close(offline, online, rtol=1e-5, atol=1e-6)


def test_online_augmentation_is_a_pure_function_of_seed_epoch_and_index(data):
    aug = RandomScale(0.5, 1.5)
    module = DistillationModule(make_teacher(), make_student(), augmentation=aug, augmentation_seed=3)
    batch = next(iter(indexed_loader(loader(data), "train")))
    x, _ = batch.batch
    seen = module.teacher_outputs.view(x, [batch], 0, 0)
    torch.testing.assert_close(seen, x * aug.sample(3, 0, batch.index))
    assert torch.equal(seen, module.teacher_outputs.view(x, [batch], 0, 5))  # the sample index keys the draw, not the step
    assert not torch.equal(seen, module.teacher_outputs.view(x, [batch], 1, 0))  # another epoch: another view


def test_combined_loaders_map_to_parts_and_a_labeled_only_loader_reuses_its_part(tmp_path, data):
    """The transfer-set case: one store for {labeled, unlabeled}; a same-data run finds the labeled part by content."""
    g = torch.Generator().manual_seed(9)
    unlabeled = TensorDataset(torch.randn(40, D, generator=g))

    def combined():  # fresh loaders (and shuffling generators) for each run
        return CombinedLoader({"labeled": loader(data), "unlabeled": loader(unlabeled, batch_size=8)}, mode="max_size_cycle")

    teacher = make_teacher()
    store = build_soft_targets(teacher, combined(), tmp_path / "st", dtype="float32", trainer=trainer())
    assert store.parts == ["labeled", "unlabeled"]
    assert torch.equal(store.lookup("unlabeled", torch.arange(40)), sequential_outputs(teacher, unlabeled.tensors[0], batch_size=8))

    batch, _, _ = next(iter(with_soft_targets(combined(), store)))
    assert isinstance(batch["labeled"], SoftTargetBatch) and batch["unlabeled"].part == "unlabeled"
    single = with_soft_targets(loader(data), store)  # named "train", matched to "labeled" by its content
    assert next(iter(single)).part == "labeled"

    L.seed_everything(0)
    online = fit_student(DistillationModule(teacher, make_student()), combined(), 2)
    L.seed_everything(0)
    offline = fit_student(DistillationModule(None, make_student(), soft_targets=store), with_soft_targets(combined(), store), 2)
    torch.testing.assert_close(offline, online, rtol=1e-5, atol=1e-6)


# batches of each loader: labeled 96 / 16 = 6, unlabeled 40 / 8 = 5; what each mode of a CombinedLoader yields
MODES = {"max_size_cycle": 6, "max_size": 6, "min_size": 5, "sequential": 6 + 5}


@pytest.mark.parametrize("mode", list(MODES))
def test_with_soft_targets_copies_a_combined_loader_and_keeps_its_mode(tmp_path, data, mode):
    g = torch.Generator().manual_seed(9)
    unlabeled = TensorDataset(torch.randn(40, D, generator=g))
    teacher = make_teacher()
    store = build_soft_targets(teacher, {"labeled": loader(data), "unlabeled": loader(unlabeled, batch_size=8)}, tmp_path / "st",
                               dtype="float32", trainer=trainer())
    first, second = loader(unlabeled, batch_size=8), loader(data)
    users = CombinedLoader({"unlabeled": first, "labeled": second}, mode=mode)  # not the store's order
    wrapped = with_soft_targets(users, store)

    assert isinstance(wrapped, CombinedLoader) and wrapped is not users
    assert list(users.iterables) == ["unlabeled", "labeled"]  # the user's loader is untouched: their own DataLoaders
    assert users.iterables["unlabeled"] is first and users.iterables["labeled"] is second
    assert users.flattened == [first, second]
    assert list(wrapped.iterables) == ["unlabeled", "labeled"] and not set(map(id, wrapped.flattened)) & {id(first), id(second)}

    got = [batch for batch, _, _ in wrapped]
    assert len(got) == MODES[mode]  # the copy's mode: its batch count
    if mode == "sequential":  # one loader after the other, each batch a single part's
        assert [b.part for b in got] == ["unlabeled"] * 5 + ["labeled"] * 6
        rows = {part: torch.cat([b.index for b in got if b.part == part]) for part in ("unlabeled", "labeled")}
    else:  # a dict of both parts per batch; max_size pads the shorter one with None once it is exhausted
        assert all(set(b) == {"unlabeled", "labeled"} for b in got)
        assert all(b["labeled"].part == "labeled" for b in got)
        parts = [b["unlabeled"] for b in got]
        if mode == "max_size":
            assert parts[5:] == [None]
        assert all(p.part == "unlabeled" for p in parts[:5])
        rows = {"unlabeled": torch.cat([p.index for p in parts[:5]]), "labeled": torch.cat([b["labeled"].index for b in got])}
    if mode != "min_size":  # every sample of each part once per pass (min_size stops after the shorter loader)
        assert torch.equal(rows["unlabeled"].sort().values, torch.arange(40))
        assert torch.equal(rows["labeled"].sort().values, torch.arange(N))
    for part, index in rows.items():  # each row carries its own sample: the store's targets are its teacher outputs
        dataset, size = (unlabeled, 8) if part == "unlabeled" else (data, B)
        assert torch.equal(store.lookup(part, index), sequential_outputs(teacher, dataset.tensors[0], batch_size=size)[index])

    plain = [batch for batch, _, _ in users]  # the user's loader still yields their own batches, in its mode
    assert len(plain) == MODES[mode]
    assert not any(isinstance(b, SoftTargetBatch) or (isinstance(b, dict) and any(isinstance(v, SoftTargetBatch) for v in b.values()))
                   for b in plain)


def test_soft_target_datamodule_reads_through(tmp_path):
    from lightning_kd.data import MNIST1DDataModule

    dm = MNIST1DDataModule(tmp_path / "data", batch_size=256, transfer_samples=300)
    teacher = nn.Sequential(nn.Linear(40, 10)).eval()
    store = build_soft_targets(teacher, dm, tmp_path / "st", trainer=trainer())
    assert store.parts == ["labeled", "unlabeled"]
    wrapped = SoftTargetDataModule(MNIST1DDataModule(tmp_path / "data", batch_size=256, transfer_samples=300), store)
    assert wrapped.num_classes == 10  # attributes of the wrapped datamodule
    module = DistillationModule(None, nn.Sequential(nn.Linear(40, 10)), soft_targets=store)
    fit = trainer(max_epochs=1)
    fit.fit(module, datamodule=wrapped)
    assert fit.callback_metrics["train/soft_loss_epoch"] > 0
    assert 0 <= fit.callback_metrics["val/acc"] <= 1 and "val/agreement" not in fit.callback_metrics  # no teacher: no teacher metrics


def test_bf16_teacher_beside_a_float32_student_under_32_true(data):
    teacher = make_teacher().to(torch.bfloat16)
    module = DistillationModule(teacher, make_student())
    fit_student(module, loader(data), 1)
    x = data.tensors[0][:4]
    assert module.teacher_forward(x).dtype == torch.bfloat16
    forced = DistillationModule(make_teacher(), make_student(), speed=Speed(teacher_dtype="bfloat16"))
    assert next(forced.teacher.parameters()).dtype == torch.bfloat16
    assert forced.teacher_forward(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"Unknown `teacher_dtype` 'fp8'. Expected one of float32, bfloat16, float16 or None"):
        Speed(teacher_dtype="fp8")


# ---------------------------------------------------------------------------------- speed options
def test_teacher_runs_in_its_own_dtype_outside_the_trainers_autocast(data):
    module = DistillationModule(make_teacher(), make_student(), speed=Speed(teacher_dtype="float32"))
    x = data.tensors[0][:4]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module.teacher_forward(x).dtype == torch.float32  # autocast is off for the teacher
        assert DistillationModule(make_teacher(), make_student()).teacher_forward(x).dtype == torch.bfloat16  # as given: it follows autocast


def test_channels_last_converts_conv_nets_and_inputs_without_changing_the_math():
    torch.manual_seed(0)
    conv = lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))  # noqa: E731
    teacher, student = conv().eval(), conv()
    reference = DistillationModule(teacher, student)
    fast = DistillationModule(teacher, student, speed=Speed(channels_last=True))
    assert fast.student[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fast.teacher_forward(x), reference.teacher_forward(x))


@pytest.mark.slow
def test_compile_in_place_keeps_checkpoint_keys_and_outputs(tmp_path, data):
    plain = make_student()
    keys = list(plain.state_dict())
    module = DistillationModule(make_teacher(), make_student(), speed=Speed(compile_student=True, compile_teacher=True))
    assert list(module.student.state_dict()) == keys  # `.compile()` in place: no `_orig_mod.` prefix
    trainer(max_steps=2).fit(module, train_dataloaders=loader(data))
    x = data.tensors[0][:8]
    eager = make_student()
    eager.load_state_dict(module.student.state_dict())
    torch.testing.assert_close(module.student(x), eager(x), rtol=1e-5, atol=1e-5)


def test_a_store_pickles_as_its_path(tmp_path, data):
    import pickle

    store = build(tmp_path, data)
    blob = pickle.dumps(store)
    assert len(blob) < 500  # not the arrays
    again = pickle.loads(blob)
    assert torch.equal(again.lookup("train", torch.arange(5)), store.lookup("train", torch.arange(5)))
