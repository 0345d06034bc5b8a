"""Sequence stores (format 3): the teacher's top-k logits or sampled tokens on exactly the valid tokens of
variable-length samples, stored ragged; lookup into any padding; refusals; the sampled estimator's unbiasedness
(a statistical test whose tolerance is the estimator's exact variance); integrity. Float64 references written here."""

from __future__ import annotations

import json
import math

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_kd import CausalLMDistillation, DistillationModule
from lightning_kd.losses import DKDLoss, KDLoss, LearnableTemperature, SampledLogits, TopKLogits, kd_loss
from lightning_kd.soft_targets.batches import SoftTargetBatch, with_soft_targets
from lightning_kd.soft_targets.build import build_soft_targets
from lightning_kd.soft_targets.sequences import LogitSampling
from lightning_kd.soft_targets.store import SoftTargetStore, remove_incomplete_store, store_state

V, K, TOP = 13, 12, 3


class CausalMeanLM(nn.Module):
    """A causal LM whose logits at a real token depend on the real tokens up to it only (never on padding or its side):
    the running mean of the embeddings of the attended tokens, then a linear head."""

    def __init__(self, seed: int = 0, scale: float = 1.5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(V, 8)
        self.head = nn.Linear(8, V)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)

    def forward(self, input_ids, attention_mask=None):
        m = torch.ones_like(input_ids, dtype=self.embed.weight.dtype) if attention_mask is None else attention_mask.to(self.embed.weight.dtype)
        e = self.embed(input_ids) * m.unsqueeze(-1)
        h = e.cumsum(1) / m.cumsum(1).clamp(min=1).unsqueeze(-1)
        return self.head(torch.tanh(h + e))  # (B, S, V)


class Texts(Dataset):
    """Variable-length token sequences (2 to 9 tokens); some start with a prompt whose labels are -100."""

    def __init__(self, n: int = 14, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(2, 10, (n,), generator=g).tolist()
        self.rows = [torch.randint(1, V, (length,), generator=g) for length in lengths]
        self.prompts = [min(i % 3, length - 1) for i, length in enumerate(lengths)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.rows[i].clone()
        labels[: self.prompts[i]] = -100
        return {"input_ids": self.rows[i], "labels": labels}


def collate(side: str):
    def pad(items):
        length = max(len(x["input_ids"]) for x in items)
        ids = torch.zeros(len(items), length, dtype=torch.long)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        for i, x in enumerate(items):
            n = len(x["input_ids"])
            cols = slice(0, n) if side == "right" else slice(length - n, length)
            ids[i, cols], mask[i, cols], labels[i, cols] = x["input_ids"], 1, x["labels"]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return pad


def loader(data, side="right", batch_size=4, shuffle=False):
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=collate(side), generator=torch.Generator().manual_seed(5))


def trainer(**kwargs):
    defaults = dict(logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, accelerator="cpu")
    return L.Trainer(**{**defaults, **kwargs})


def lm(**kwargs):
    return CausalLMDistillation(CausalMeanLM(0), CausalMeanLM(1, scale=0.5), **kwargs)


@torch.no_grad()
def reference_rows(data: Texts) -> list[torch.Tensor]:
    """Float64 teacher logits of each sample alone (no padding at all), at its valid positions: position i counts when
    it predicts a labelled token, i.e. labels[i + 1] != -100."""
    teacher = CausalMeanLM(0).double()
    rows = []
    for i in range(len(data)):
        sample = data[i]
        logits = teacher(sample["input_ids"][None])[0]
        valid = torch.tensor([sample["labels"][j + 1] != -100 for j in range(len(logits) - 1)] + [False])
        rows.append(logits[valid])
    return rows


@pytest.fixture(scope="module")
def data():
    return Texts()


@pytest.fixture(scope="module")
def stores(tmp_path_factory, data):
    """The stores every test reads: top-k built from right- and from left-padded batches, and sampled ones."""
    root = tmp_path_factory.mktemp("stores")
    made = {}
    for name, side, kwargs in [
        ("topk", "right", {"top_k": TOP}), ("topk_left", "left", {"top_k": TOP}),
        ("sampled", "right", {"sampled": K}), ("sampled_left", "left", {"sampled": LogitSampling(k=K)}),
        ("proposal", "right", {"sampled": LogitSampling(k=K, seed=3, proposal_temperature=2.0)}),
    ]:
        made[name] = build_soft_targets(lm(), loader(data, side, batch_size=5), root / name, trainer=trainer(), **kwargs)
    return made


def batch_for(data, index, side):
    return collate(side)([data[i] for i in index])


# ---------------------------------------------------------------------------------- layout and round trip
def test_the_store_holds_the_top_k_of_exactly_the_valid_tokens_ragged(stores, data):
    store, expected = stores["topk"], reference_rows(data)
    counts = [len(r) for r in expected]
    assert store.sequences and store.manifest["format"] == 3 and store.manifest["output_shape"] == [V]
    assert store.offsets["train"].tolist() == np.concatenate([[0], np.cumsum(counts)]).tolist()  # no padding stored
    files = store.manifest["parts"]["train"]["files"]
    assert files["topk_values"]["shape"] == [sum(counts), TOP] and files["tail_logsumexp"]["shape"] == [sum(counts)]
    assert store.manifest["positions"] == "targets != -100 of lightning_kd.lm.CausalLMDistillation.unpack_batch"
    values = np.array(store.arrays["train"]["topk_values"])
    indices = np.array(store.arrays["train"]["topk_indices"])
    tails = np.array(store.arrays["train"]["tail_logsumexp"])
    for i, rows in enumerate(expected):
        part = slice(store.offsets["train"][i], store.offsets["train"][i + 1])
        top, top_indices = rows.topk(TOP, dim=-1)
        rest = rows.scatter(-1, top_indices, -math.inf).logsumexp(-1)
        torch.testing.assert_close(torch.from_numpy(values[part]).double(), top, rtol=1e-5, atol=1e-5)
        assert torch.equal(torch.from_numpy(indices[part]).long(), top_indices)
        torch.testing.assert_close(torch.from_numpy(tails[part]).double(), rest, rtol=1e-5, atol=1e-5)


def test_left_and_right_padded_builds_store_the_same_rows(stores):
    for kind in ("topk", "sampled"):
        right, left = stores[kind].arrays["train"], stores[f"{kind}_left"].arrays["train"]
        assert np.array_equal(stores[kind].offsets["train"], stores[f"{kind}_left"].offsets["train"])
        for name in right:
            if name in ("topk_indices", "sample_indices", "offsets", "writes"):
                assert np.array_equal(right[name], left[name]), name
            else:
                np.testing.assert_allclose(right[name], left[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_lookup_scatters_each_samples_rows_into_its_valid_positions_of_any_padding(stores, data, side):
    index = [6, 2, 11, 0]
    batch = batch_for(data, index, side)
    _, targets = lm().unpack_batch(batch)
    mask = targets != -100
    got = stores["topk"].lookup("train", torch.tensor(index), mask=mask)
    assert isinstance(got, TopKLogits) and got.values.shape == (*mask.shape, TOP)
    for b, i in enumerate(index):
        rows = reference_rows(data)[i]
        torch.testing.assert_close(got.values[b][mask[b]].double(), rows.topk(TOP).values, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.indices[b][mask[b]], rows.topk(TOP).indices)
    # the filler at the other positions is harmless: finite values and distinct classes
    assert torch.equal(got.values[~mask], torch.zeros((int((~mask).sum()), TOP)))
    assert torch.equal(got.indices[~mask], torch.arange(TOP).expand(int((~mask).sum()), TOP))


# ---------------------------------------------------------------------------------- the loss from the store
def ref_topk_kl(student: torch.Tensor, rows: torch.Tensor, T: float) -> torch.Tensor:
    """Float64 KL between teacher and student collapsed onto the teacher's top-k classes plus one tail bucket, with the
    tail at temperature T taken as C - k equal logits at their log-mean-exp (the documented rule)."""
    top, idx = rows.topk(TOP, dim=-1)
    rest = rows.scatter(-1, idx, -math.inf).logsumexp(-1)
    n = V - TOP
    p = torch.log_softmax(torch.cat([top / T, (math.log(n) + (rest - math.log(n)) / T)[:, None]], -1), -1).exp()
    log_q = torch.log_softmax(student / T, -1)
    q = torch.cat([log_q.gather(-1, idx), log_q.scatter(-1, idx, -math.inf).logsumexp(-1, keepdim=True)], -1)
    return (p * (p.log() - q)).sum(-1)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kd_loss_from_the_stored_top_k_equals_the_float64_top_k_tail_kl_on_valid_tokens(stores, data, T):
    index = [3, 9, 4, 13, 1]
    module = lm(temperature=T, alpha=1.0, soft_targets=stores["topk"])
    batch = SoftTargetBatch("train", torch.tensor(index), batch_for(data, index, "left"))
    losses, _, _, mask, student_out, _ = module._training_losses(batch, "a test batch")  # through the module's one path
    expected = torch.cat([
        ref_topk_kl(student_out[b][mask[b]].detach().double(), reference_rows(data)[i], T) for b, i in enumerate(index)
    ]).mean() * T**2
    torch.testing.assert_close(losses["soft"].double(), expected, rtol=1e-5, atol=1e-6)


def ref_sampled(student: torch.Tensor, target: SampledLogits, T: float) -> torch.Tensor:
    """Float64 per-position estimate: sum_j w_j (-log q_T(x_j)) - H(p_T)."""
    log_q = torch.log_softmax(student.double() / T, -1)
    return -(target.weights.double() * log_q.gather(-1, target.indices.long())).sum(-1) - target.entropy.double()


def test_kd_loss_from_sampled_targets_equals_its_float64_formula_through_the_module(stores, data):
    index = [5, 0, 12]
    module = lm(alpha=1.0, soft_targets=stores["sampled"])
    batch = SoftTargetBatch("train", torch.tensor(index), batch_for(data, index, "right"))
    losses, _, _, mask, student_out, _ = module._training_losses(batch, "a test batch")
    target = stores["sampled"].lookup("train", torch.tensor(index), mask=mask)
    torch.testing.assert_close(losses["soft"].double(), ref_sampled(student_out.detach(), target, 1.0)[mask].mean(), rtol=1e-5, atol=1e-6)
    assert torch.equal(target.weights[~mask], torch.zeros(int((~mask).sum()), K))  # filler: no weight, no gradient


def test_stored_samples_are_the_pure_function_of_seed_sample_and_position(stores, data):
    rows = reference_rows(data)
    for name, sampling in [("sampled", LogitSampling(k=K)), ("proposal", LogitSampling(k=K, seed=3, proposal_temperature=2.0))]:
        store, arrays = stores[name], stores[name].arrays["train"]
        assert store.sampled == sampling
        for i in (0, 7, 13):
            part = slice(store.offsets["train"][i], store.offsets["train"][i + 1])
            n = part.stop - part.start
            again = sampling.draw(rows[i].float(), torch.full((n,), i), torch.arange(n))
            assert np.array_equal(arrays["sample_indices"][part], again.indices.numpy())
            np.testing.assert_allclose(arrays["sample_weights"][part], again.weights.numpy(), rtol=1e-6)
            p = torch.softmax(rows[i], -1)
            np.testing.assert_allclose(arrays["entropy"][part], -(p * p.log()).sum(-1).numpy(), rtol=1e-5)
    # from the teacher itself the weights are counts over K: multiples of 1/K summing to 1
    counts = np.asarray(stores["sampled"].arrays["train"]["sample_weights"]) * K
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-5)
    np.testing.assert_allclose(counts.sum(-1), K, atol=1e-4)


def test_distilling_from_sequence_stores_runs_in_a_trainer(stores, data):
    for name in ("topk", "sampled"):
        module = lm(soft_targets=stores[name])
        t = trainer(max_steps=3, log_every_n_steps=1)
        t.fit(module, train_dataloaders=with_soft_targets(loader(data, "left", shuffle=True), stores[name]))
        assert math.isfinite(float(t.callback_metrics["train/soft_loss"])) and "train/agreement" in t.callback_metrics


# ---------------------------------------------------------------------------------- the sampled estimator is unbiased
def exact_moments(p, r, q, T):
    """Mean and variance of one draw's gradient term Y = (p(x)/r(x)) (q - e_x) / T, x ~ r; and of its value term
    (p(x)/r(x)) (-log q(x)) (float64, per position and class)."""
    ratio = p / r  # (P, V) per token x
    eye = torch.eye(p.shape[-1], dtype=p.dtype)
    y = ratio[:, :, None] * (q[:, None, :] - eye) / T  # (P, x, c)
    mean = (r[:, :, None] * y).sum(1)
    var = (r[:, :, None] * y**2).sum(1) - mean**2
    value = ratio * -q.log()
    return mean, var, (r * value).sum(1), (r * value**2).sum(1) - (r * value).sum(1) ** 2


@pytest.mark.parametrize("T, proposal", [(1.0, None), (1.0, 2.0), (2.0, None)], ids=["teacher", "proposal-T2", "target-T2"])
def test_the_sampled_estimate_averages_to_the_full_forward_kl_gradient_and_value(T, proposal):
    g = torch.Generator().manual_seed(0)
    positions, seeds = 3, 3000
    teacher = torch.randn(positions, V, generator=g) * 2.5
    student = torch.randn(positions, V, generator=g, dtype=torch.float64)
    p = torch.softmax(teacher.double() / T, -1)
    r = p if proposal is None else torch.softmax(teacher.double() / proposal, -1)
    q = torch.softmax(student / T, -1)
    mean, var, value_mean, value_var = exact_moments(p, r, q, T)
    torch.testing.assert_close(mean, (q - p) / T)  # the single-draw term is unbiased: the estimator's mean is the full gradient
    draws = [LogitSampling(k=K, seed=seed, temperature=T, proposal_temperature=proposal).draw(teacher, torch.zeros(positions), torch.arange(positions))
             for seed in range(seeds)]
    target = SampledLogits(*(torch.stack(fields) for fields in list(zip(*draws))[:3]), T)  # (seeds, positions, K)
    z = student.float().requires_grad_(True)
    # one loss over every seed: its gradient w.r.t. the shared logits is the mean over seeds and positions
    kd_loss(z.expand(seeds, positions, V), target, temperature=T, scale_by_t2=False).backward()
    gradient = z.grad.double() * positions  # the mean over seeds of the per-seed gradient of the sum over positions
    values = (ref_sampled(student.expand(seeds, positions, V), target, T) + target.entropy.double()).mean(0)  # cross-entropy estimate
    # every draw of every seed is independent: the mean of seeds x K terms has variance var / (seeds K)
    spread = (var / (seeds * K)).sqrt().clamp(min=1e-12)
    z_grad = (gradient - mean) / spread
    z_value = (values - value_mean) / (value_var / (seeds * K)).sqrt()
    assert z_grad.abs().max() < 5 and z_value.abs().max() < 5
    # the tolerance is the estimator's own spread, not a loose bound: self-normalised weights (biased by O(1/K)) fail here
    assert 0.3 < z_grad.pow(2).mean() < 2.0
    # top-k (with its tail bucket) is not unbiased: its gradient misses the full one by many standard errors
    z = student.float().requires_grad_(True)
    (kd_loss(z, TopKLogits.from_logits(teacher, TOP), temperature=T, scale_by_t2=False) * positions).backward()
    assert ((z.grad.double() - mean) / spread).abs().max() > 20


# ---------------------------------------------------------------------------------- refusals
def test_a_sample_with_other_valid_positions_is_refused_naming_it_and_both_counts(stores, data):
    index = [4, 8]
    batch = batch_for(data, index, "right")
    mask = lm().unpack_batch(batch)[1] != -100
    mask[1, 0] = not mask[1, 0]  # other labels for sample 8: one position more or less
    given, stored = int(mask[1].sum()), len(reference_rows(data)[8])
    with pytest.raises(RuntimeError, match=rf"Sample 8 has {given} valid positions .* holds {stored} rows for it .*built on other labels or prompt masks"):
        stores["topk"].lookup("train", torch.tensor(index), mask=mask)
    # the usual mistake: a module whose unpack_batch does not shift the labels; with a masked prompt each sample has as
    # many valid positions as stored, each moved by one, so the rule itself is recorded and compared
    module = DistillationModule(None, CausalMeanLM(1), soft_loss=KDLoss(1.0), soft_targets=stores["topk"])
    with pytest.raises(RuntimeError, match=r"at the valid positions of `targets != -100 of lightning_kd.lm.CausalLMDistillation.unpack_batch`, "
                       r"but this module's are `targets != -100 of lightning_kd.module.DistillationModule.unpack_batch`"):
        module._training_losses(SoftTargetBatch("train", torch.tensor(index), batch), "a test batch")

    class Subclass(CausalLMDistillation):  # inherits the rule: reads the store
        pass

    subclass = Subclass(None, CausalMeanLM(1), soft_targets=stores["topk"])
    subclass._training_losses(SoftTargetBatch("train", torch.tensor(index), batch), "a test batch")
    with pytest.raises(RuntimeError, match=r"holds one row per valid token of a sequence: looking samples up needs the batch's valid positions"):
        stores["topk"].lookup("train", torch.tensor(index))


def test_sampled_targets_refuse_another_temperature_and_other_losses(stores, data):
    with pytest.raises(ValueError, match=r"sampled targets estimate the teacher at T=1.0, but KDLoss has temperature 2.0"):
        lm(temperature=2.0, soft_targets=stores["sampled"])
    with pytest.raises(ValueError, match=r"but KDLoss has a learned temperature"):
        lm(soft_loss=KDLoss(LearnableTemperature(2.0)), soft_targets=stores["sampled"])
    with pytest.raises(ValueError, match=r"DKDLoss needs full teacher outputs, but the soft-target store holds 12 sampled tokens"):
        lm(soft_loss=DKDLoss(), soft_targets=stores["sampled"])
    target = SampledLogits(torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), torch.zeros(2))
    with pytest.raises(ValueError, match=r"Expected `temperature` 1.0 \(the sampled targets' weights are for the teacher at that temperature\), but got 4.0"):
        kd_loss(torch.zeros(2, V), target, temperature=4.0)
    with pytest.raises(ValueError, match=r"must run at that fixed temperature, but got a learned one"):
        kd_loss(torch.zeros(2, V), target, temperature=torch.ones((), requires_grad=True))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sampled": 4, "top_k": 3}, ValueError, r"a store holds either the top-k logits or sampled tokens; choose one"),
        ({"sampled": 4, "dtype": "bfloat16"}, ValueError, r"Sampled targets are stored as float32 weights .* `dtype='bfloat16'`"),
        ({"sampled": 0}, ValueError, r"Expected `k` to be an int >= 1, but got 0"),
        ({"sampled": 2.5}, TypeError, r"Expected `sampled` to be None, an int k or a LogitSampling, but got float"),
    ],
)
def test_bad_sampling_settings_are_refused_before_anything_is_written(tmp_path, data, kwargs, error, match):
    with pytest.raises(error, match=match):
        build_soft_targets(lm(), loader(data), tmp_path / "st", trainer=trainer(), **kwargs)
    assert not (tmp_path / "st").exists()


def test_sampling_is_refused_for_outputs_that_are_not_sequences_and_augmentation_for_sequences(tmp_path, data):
    classes = TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    with pytest.raises(ValueError, match=r"`sampled` targets are drawn per token of a sequence, but the teacher's outputs have shape \(1, 3\)"):
        build_soft_targets(nn.Linear(4, 3), DataLoader(classes, batch_size=4), tmp_path / "a", sampled=4, trainer=trainer())
    from lightning_kd.data.augment import RandomScale

    with pytest.raises(ValueError, match=r"A sequence store holds the teacher's outputs on each sample as it is .* `epochs=1`"):
        build_soft_targets(lm(), loader(data), tmp_path / "b", top_k=2, augmentation=RandomScale(0.5, 1.5), trainer=trainer())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------- integrity
def test_a_tampered_rows_file_is_refused_by_its_sha256_and_damaged_offsets_by_their_range(stores, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(stores["sampled"].path, copy)
    rows = copy / "train" / "sample_indices.npy"
    raw = bytearray(rows.read_bytes())
    raw[-1] ^= 1  # same size, one bit
    rows.write_bytes(bytes(raw))
    with pytest.raises(RuntimeError, match=r"is corrupted: the SHA-256 of train/sample_indices.npy does not match its manifest"):
        SoftTargetStore(copy)
    offsets = np.load(copy / "train" / "offsets.npy")
    offsets[3] = offsets[-1] + 5
    np.save(copy / "train" / "offsets.npy", offsets)  # same size: the .npy header does not change
    with pytest.raises(RuntimeError, match=r"train/offsets.npy is damaged: it must rise from 0 to the manifest's \d+ rows"):
        SoftTargetStore(copy, verify=False)


def test_a_sequence_manifest_that_breaks_the_schema_is_refused_and_an_unfinished_one_is_removable(stores, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(stores["sampled"].path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for edit, match in [
        (lambda m: m.pop("sampled"), r"the required key `sampled` is missing"),
        (lambda m: m["parts"]["train"].pop("rows"), r"the required key `parts.train.rows` is missing"),
        (lambda m: m["sampled"].update(temperature=0), r"expected `sampled.temperature` to be a number > 0, but got 0"),
        (lambda m: m.update(top_k=3), r"expected `top_k` to be null in a store of sampled targets, but got 3"),
        (lambda m: m["parts"]["train"].update(rows=m["parts"]["train"]["rows"] + 1), r"expected `parts.train.files.sample_weights.shape` to be \[65, 12\]"),
    ]:
        broken = json.loads(json.dumps(manifest))
        edit(broken)
        (copy / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(RuntimeError, match=match):
            SoftTargetStore(copy)
    manifest["complete"] = False  # an interrupted build of a sequence store: ours, removable file by file
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert store_state(copy) == "incomplete"
    removed = remove_incomplete_store(copy)
    assert {p.name for p in removed} >= {"offsets.npy", "sample_weights.npy", "sample_indices.npy", "entropy.npy", "writes.npy"}
    assert copy.is_dir() and not any(copy.iterdir())


def test_classification_stores_are_still_format_2_and_ignore_a_mask(tmp_path):
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    teacher = nn.Linear(4, 5)
    store = build_soft_targets(teacher, DataLoader(TensorDataset(x, torch.randint(0, 5, (10,))), batch_size=4), tmp_path / "st", top_k=2, trainer=trainer())
    assert store.manifest["format"] == 2 and not store.sequences and store.sampled is None
    got = store.lookup("train", torch.arange(10), mask=torch.ones(10, 3, dtype=torch.bool))
    with torch.no_grad():
        assert torch.equal(got.indices.long(), teacher(x).topk(2).indices)
