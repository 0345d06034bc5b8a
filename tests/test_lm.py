"""Causal-LM distillation in the module: the shift, masks in every term and metric, keyword inputs, vocabularies,
and the global token normalisation under gradient accumulation and DDP, each against a float64 reference
written here."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_kd import CausalLMDistillation, DistillationModule
from lightning_kd.batch import causal_lm_targets, unpack, valid_positions
from lightning_kd.losses import JSDLoss, KDLoss

V = 11


class TinyLM(nn.Module):
    """Embedding -> tanh -> linear: logits (B, S, V) that depend on the token and on the attention mask (to see it arrive)."""

    def __init__(self, dim: int = 8, vocab: int = V, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)
        self.seen_keys: list[tuple[str, ...]] = []

    def forward(self, input_ids, attention_mask=None):
        self.seen_keys.append(tuple(sorted(["input_ids"] + ([] if attention_mask is None else ["attention_mask"]))))
        return self.head(torch.tanh(self.embed(input_ids)))


def batch_of(rows: list[list[int]], *, side: str = "right", labels: bool = True) -> dict[str, torch.Tensor]:
    """An HF-style batch: padding id 0, attention mask, labels with -100 on padding."""
    length = max(map(len, rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        sl = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        ids[i, sl] = torch.tensor(row)
        mask[i, sl] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if labels:
        out["labels"] = ids.masked_fill(mask == 0, -100)
    return out


@torch.no_grad()
def reference_terms(student: nn.Module, teacher: nn.Module, rows: list[list[int]], temperature: float, prompt: int = 0):
    """float64, sequence by sequence (no padding at all): per valid token (KL_T, CE, KL_1, agreement, teacher CE)."""
    out = []
    for row in rows:
        ids = torch.tensor([row])
        s = _double_logits(student, ids)
        t = _double_logits(teacher, ids)
        for i in range(prompt, len(row) - 1):
            log_ps, log_pt = torch.log_softmax(s[i] / temperature, -1), torch.log_softmax(t[i] / temperature, -1)
            kl_t = (log_pt.exp() * (log_pt - log_ps)).sum()
            ls1, lt1 = torch.log_softmax(s[i], -1), torch.log_softmax(t[i], -1)
            out.append((kl_t, -ls1[row[i + 1]], (lt1.exp() * (lt1 - ls1)).sum(), float(s[i].argmax() == t[i].argmax()), -lt1[row[i + 1]]))
    return out


def _double_logits(model: TinyLM, ids: torch.Tensor) -> torch.Tensor:
    e = model.embed.weight.double()[ids[0]]
    return torch.tanh(e) @ model.head.weight.double().T + model.head.bias.double()


ROWS = [[3, 4, 5, 6, 7], [8, 9], [1, 2, 3, 10]]


# ---------------------------------------------------------------------------------------------- batches
def test_hf_dict_keeps_every_input_key_and_the_model_gets_keywords():
    batch = batch_of(ROWS)
    inputs, targets = unpack(batch)
    assert set(inputs) == {"input_ids", "attention_mask"} and targets is batch["labels"]
    student = TinyLM()
    module = CausalLMDistillation(TinyLM(seed=1), student)
    module.student_forward(inputs)
    assert student.seen_keys[-1] == ("attention_mask", "input_ids")


@pytest.mark.parametrize("side", ["right", "left"])
def test_causal_targets_shift_once_and_mask_padding(side):
    batch = batch_of(ROWS, side=side)
    targets = causal_lm_targets({k: batch[k] for k in ("input_ids", "attention_mask")}, batch["labels"])
    for b, row in enumerate(ROWS):
        expected = [-100] * targets.shape[1]
        start = 0 if side == "right" else targets.shape[1] - len(row)
        for i in range(len(row) - 1):
            expected[start + i] = row[i + 1]
        assert targets[b].tolist() == expected
    # without labels: the input ids are the labels; padding still masked by the attention mask
    unlabeled = causal_lm_targets({k: batch[k] for k in ("input_ids", "attention_mask")}, None)
    assert torch.equal(unlabeled, targets)


def test_prompt_labels_are_masked_and_valid_positions_follow_targets():
    batch = batch_of(ROWS)
    batch["labels"][:, :2] = -100  # a 2-token prompt
    inputs, targets = CausalLMDistillation(TinyLM(seed=1), TinyLM()).unpack_batch(batch)
    logits = torch.zeros(*targets.shape, V)
    mask = valid_positions(inputs, targets, logits)
    assert mask.sum().item() == sum(max(len(r) - 2, 0) for r in ROWS)
    assert valid_positions(inputs, None, logits).tolist() == (batch["attention_mask"] == 1).tolist()
    assert valid_positions(inputs, targets[:, 0], logits[:, 0]) is None  # classification: the transfer-set rule


def test_causal_targets_refuse_what_they_cannot_shift():
    with pytest.raises(ValueError, match=r"needs `labels` or `input_ids` of shape \(batch, sequence\)"):
        causal_lm_targets({"inputs_embeds": torch.zeros(2, 3, 4)}, None)
    with pytest.raises(ValueError, match=r"Expected `attention_mask` of the shape of the tokens"):
        causal_lm_targets({"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 4)}, None)


# ---------------------------------------------------------------------------------------------- loss and metrics
@pytest.mark.parametrize("side", ["right", "left"])
def test_every_term_is_a_mean_over_valid_tokens(side):
    teacher, student = TinyLM(seed=1), TinyLM(seed=2)
    module = CausalLMDistillation(teacher, student, temperature=2.0, alpha=0.3)
    batch = batch_of(ROWS, side=side)
    batch["input_ids"][batch["attention_mask"] == 0] = 9  # padding content must not matter
    inputs, targets, s, t = module._forward(batch, "test")
    mask = valid_positions(inputs, targets, s)
    losses = module.distillation_loss(s, t, targets, mask=mask)
    ref = reference_terms(student, teacher, ROWS, 2.0)
    kl = torch.stack([r[0] for r in ref]).mean() * 4.0
    ce = torch.stack([r[1] for r in ref]).mean()
    assert losses["soft"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert losses["hard"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx((0.3 * kl + 0.7 * ce).item(), rel=1e-5)


def test_the_generic_module_on_sequence_logits_masks_ignored_positions():
    """The bug of the issue: the soft term on (B, S, V) covered positions labeled -100."""
    teacher, student = TinyLM(seed=1), TinyLM(seed=2)
    module = DistillationModule(teacher, student, soft_loss=KDLoss(temperature=1.0), alpha=1.0)
    batch = batch_of(ROWS)
    targets = causal_lm_targets(batch, batch["labels"])
    inputs, _, s, t = module._forward({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": targets}, "t")
    mask = valid_positions(inputs, targets, s)
    soft = module.distillation_loss(s, t, targets, mask=mask)["soft"]
    ref = torch.stack([r[2] for r in reference_terms(student, teacher, ROWS, 1.0)]).mean()
    assert soft.item() == pytest.approx(ref.item(), rel=1e-5)


def test_validation_metrics_count_valid_tokens_only():
    teacher, student = TinyLM(seed=1), TinyLM(seed=2)
    module = CausalLMDistillation(teacher, student)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    batches = [batch_of(ROWS[:2]), batch_of(ROWS[2:])]  # batches of different token counts: a token mean, not a mean of means
    for b in batches:
        b["input_ids"][b["attention_mask"] == 0] = 10
    (metrics,) = trainer.validate(module, DataLoader(batches, batch_size=None), verbose=False)
    ref = reference_terms(student, teacher, ROWS, 1.0)
    mean = lambda i: sum(float(r[i]) for r in ref) / len(ref)  # noqa: E731
    assert metrics["val/kl"] == pytest.approx(mean(2), rel=1e-5)
    assert metrics["val/agreement"] == pytest.approx(mean(3), rel=1e-6)
    assert metrics["val/ce"] == pytest.approx(mean(1), rel=1e-5)
    assert metrics["val/loss"] == pytest.approx(mean(1), rel=1e-5)
    assert metrics["val/bits_per_token"] == pytest.approx(mean(1) / math.log(2), rel=1e-5)
    assert metrics["val/teacher_ce"] == pytest.approx(mean(4), rel=1e-5)


# ---------------------------------------------------------------------------------------------- vocabularies
def test_padded_vocabularies_are_compared_on_the_shared_prefix():
    teacher, student = TinyLM(vocab=16, seed=1), TinyLM(vocab=V, seed=2)
    batch = batch_of(ROWS)
    with pytest.raises(ValueError, match=r"teacher's vocabulary has 16 entries and the student's 11.*vocab_size="):
        CausalLMDistillation(teacher, student)._forward(batch, "t")
    module = CausalLMDistillation(teacher, student, vocab_size=V, alpha=1.0)
    inputs, targets, s, t = module._forward(batch, "t")
    assert s.shape[-1] == t.shape[-1] == V
    soft = module.distillation_loss(s, t, targets, mask=valid_positions(inputs, targets, s))["soft"]
    # reference: the teacher's distribution renormalised over its first V classes
    ref = []
    for row in ROWS:
        ids = torch.tensor([row])
        sl, tl = _double_logits(student, ids), _double_logits(teacher, ids)[:, :V]
        for i in range(len(row) - 1):
            lp, lq = torch.log_softmax(tl[i], -1), torch.log_softmax(sl[i], -1)
            ref.append((lp.exp() * (lp - lq)).sum())
    assert soft.item() == pytest.approx(torch.stack(ref).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"Expected `vocab_size` <= both models' vocabularies, but got vocab_size=12"):
        CausalLMDistillation(teacher, student, vocab_size=12)._forward(batch, "t")
    with pytest.raises(ValueError, match=r"Expected `vocab_size` to be an integer > 0 or None, but got 0"):
        CausalLMDistillation(teacher, student, vocab_size=0)


def test_temperature_and_soft_loss_must_agree():
    CausalLMDistillation(TinyLM(seed=1), TinyLM(), temperature=2.0, soft_loss=KDLoss(temperature=2.0))
    with pytest.raises(ValueError, match=r"Got `temperature=2.0` and `soft_loss=JSDLoss` with its own temperature \(1.0\)"):
        CausalLMDistillation(TinyLM(seed=1), TinyLM(), temperature=2.0, soft_loss=JSDLoss(temperature=1.0))


# ---------------------------------------------------------------------------------------------- global normalisation
MICRO = [ROWS, [[2, 3], [4, 5, 6, 7, 8, 9, 10]], [[1, 2, 3, 4, 5, 6]], [[7, 8, 9], [1, 2], [3, 4, 5, 6]]]
LR = 0.5


def expected_after_one_step(alpha: float, temperature: float) -> dict[str, torch.Tensor]:
    """float64: SGD(lr) on the mean over every valid token of all micro-batches (one big batch), written here."""
    teacher, student = TinyLM(seed=1), TinyLM(seed=2)
    params = {k: v.detach().double().clone().requires_grad_(True) for k, v in student.state_dict().items()}
    tw, tb, te = teacher.head.weight.double(), teacher.head.bias.double(), teacher.embed.weight.double()
    terms = []
    for rows in MICRO:
        for row in rows:
            ids = torch.tensor(row)
            s = torch.tanh(params["embed.weight"][ids]) @ params["head.weight"].T + params["head.bias"]
            t = torch.tanh(te[ids]) @ tw.T + tb
            for i in range(len(row) - 1):
                lp, lq = torch.log_softmax(t[i] / temperature, -1), torch.log_softmax(s[i] / temperature, -1)
                kl = (lp.exp() * (lp - lq)).sum() * temperature**2
                ce = -torch.log_softmax(s[i], -1)[row[i + 1]]
                terms.append(alpha * kl + (1 - alpha) * ce)
    loss = torch.stack(terms).mean()
    loss.backward()
    return {k: (p - LR * p.grad).detach() for k, p in params.items()}


def train_one_step(micro: list[list[list[int]]], accumulate: int) -> dict[str, torch.Tensor]:
    module = CausalLMDistillation(TinyLM(seed=1), TinyLM(seed=2), temperature=2.0, alpha=0.4,
                                  optimizer=lambda p: torch.optim.SGD(p, lr=LR))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader([batch_of(rows) for rows in micro], batch_size=None))
    return module.student.state_dict()


def test_accumulated_micro_batches_give_the_gradient_of_the_one_big_batch():
    expected = expected_after_one_step(0.4, 2.0)
    one_batch = train_one_step([[row for rows in MICRO for row in rows]], accumulate=1)
    accumulated = train_one_step(MICRO, accumulate=len(MICRO))  # 5, 4, 6 and 5+... valid tokens: unequal
    for key, value in expected.items():
        torch.testing.assert_close(one_batch[key].double(), value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(accumulated[key].double(), value, rtol=1e-5, atol=1e-6)


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, lightning as L
    from torch.utils.data import DataLoader
    sys.path.insert(0, {tests!r})
    from test_lm import MICRO, TinyLM, batch_of, LR
    from lightning_kd import CausalLMDistillation

    class Save(L.Callback):
        def on_train_end(self, trainer, module):
            if trainer.global_rank == 0:
                torch.save(module.student.state_dict(), {out!r})

    module = CausalLMDistillation(TinyLM(seed=1), TinyLM(seed=2), temperature=2.0, alpha=0.4,
                                  optimizer=lambda p: torch.optim.SGD(p, lr=LR))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Save()])
    # rank 0 gets micro-batches 0 and 2, rank 1 gets 1 and 3 (a distributed sampler without shuffling)
    trainer.fit(module, DataLoader([batch_of(rows) for rows in MICRO], batch_size=None))
    """
)


@pytest.mark.slow
def test_ddp_ranks_with_unequal_tokens_give_the_gradient_of_the_one_big_batch(tmp_path):
    out = tmp_path / "student.pt"
    script = tmp_path / "ddp_lm.py"
    script.write_text(DDP_SCRIPT.format(tests=str(__import__("pathlib").Path(__file__).parent), out=str(out)))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    for key, value in expected_after_one_step(0.4, 2.0).items():
        torch.testing.assert_close(got[key].double(), value, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- on-policy (GKD)
def test_on_policy_batches_are_scored_on_the_generated_tokens_only():
    """probability 1, greedy: the loss is JSD(0.5) on the student's own continuations, no cross-entropy."""
    from lightning_kd import OnPolicy
    from lightning_kd.losses import JSDLoss
    from lightning_kd.models import get_model

    torch.manual_seed(0)
    teacher = get_model("gpt", vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=16)
    student = get_model("gpt", vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=8)
    generation = OnPolicy(1.0, max_new_tokens=3, temperature=0.0, prompt_length=2, pad_token_id=0)
    module = CausalLMDistillation(teacher, student, soft_loss=JSDLoss(temperature=1.0, beta=0.5), alpha=0.3, on_policy=generation)
    module.student.eval()  # no dropout in the comparison (generation restores the mode it finds)
    losses, inputs, targets, mask, s, t = module._training_losses(batch_of(ROWS, labels=False), "test")
    assert mask.sum().item() == 3 * len(ROWS)  # 3 generated tokens per row count; prompts and padding never
    assert losses["loss"].item() == pytest.approx(losses["soft"].item(), rel=1e-6)  # soft_weight 1, no hard term
    ref = []
    with torch.no_grad():
        t64, s64 = copy.deepcopy(teacher).double(), copy.deepcopy(student).double()
        for b in range(len(ROWS)):
            real = inputs["attention_mask"][b].bool()
            ids = inputs["input_ids"][b][real][None]
            lt, ls = torch.log_softmax(t64(ids)[0], -1), torch.log_softmax(s64(ids)[0], -1)
            for i in range(1, ids.shape[1] - 1):  # positions predicting the 3 generated tokens (prompt: 2 tokens)
                p, q = lt[i].exp(), ls[i].exp()
                m = (0.5 * p + 0.5 * q).log()
                ref.append(0.5 * (p * (lt[i] - m)).sum() + 0.5 * (q * (ls[i] - m)).sum())
    # a JSD of ~1e-3 between two similar models: float32 cancellation leaves ~2e-5 relative
    assert losses["soft"].item() == pytest.approx(torch.stack(ref).mean().item(), rel=1e-4)
