"""Hugging Face causal LMs (built from configs, never downloaded) distilled through the plain Lightning Trainer:
the loss against a float64 reference computed sequence by sequence without padding, and training that moves
the student towards the teacher and leaves the teacher untouched."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_kd import CausalLMDistillation
from lightning_kd.batch import valid_positions
from lightning_kd.losses import DKDLoss, JSDLoss, KDLoss
from lightning_kd.models.hf import hf_causal_lm

pytest.importorskip("transformers")

ROWS = [[5, 9, 13, 2, 7, 30, 31], [4, 8], [17, 3, 3, 60, 1]]


def padded(rows, side: str, pad: int = 0):
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), pad)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        sl = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        ids[i, sl], mask[i, sl] = torch.tensor(row), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def gpt2_pair(vocab_teacher: int = 64, vocab_student: int = 64):
    torch.manual_seed(0)
    teacher = hf_causal_lm("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=vocab_teacher, n_positions=32)
    student = hf_causal_lm("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=vocab_student, n_positions=32)
    return teacher, student


def llama_pair(vocab_teacher: int, vocab_student: int):
    torch.manual_seed(0)
    common = dict(num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    teacher = hf_causal_lm("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=vocab_teacher, **common)
    student = hf_causal_lm("llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1, vocab_size=vocab_student, **common)
    return teacher, student


def reference(teacher, student, rows, *, vocab: int, beta: float | None = None):
    """float64, each sequence alone (no padding): mean over next-token positions of (divergence, cross-entropy)."""
    t64, s64 = copy.deepcopy(teacher).double().eval(), copy.deepcopy(student).double().eval()
    div, ce = [], []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row])
            lt = torch.log_softmax(t64(input_ids=ids).logits[0, :, :vocab], -1)
            ls = torch.log_softmax(s64(input_ids=ids).logits[0, :, :vocab], -1)
            for i in range(len(row) - 1):
                p, q = lt[i].exp(), ls[i].exp()
                if beta is None:
                    div.append((p * (lt[i] - ls[i])).sum())
                else:
                    m = beta * p + (1 - beta) * q
                    div.append(beta * (p * (lt[i] - m.log())).sum() + (1 - beta) * (q * (ls[i] - m.log())).sum())
                ce.append(-ls[i, row[i + 1]])
    return torch.stack(div).mean().item(), torch.stack(ce).mean().item()


def terms(module, batch):
    module.eval()  # dropout off in the student too, for the comparison
    inputs, targets, s, t = module._forward(batch, "test")
    return module.distillation_loss(s, t, targets, mask=valid_positions(inputs, targets, s))


def test_gpt2_pair_loss_equals_the_unpadded_float64_reference():
    teacher, student = gpt2_pair()
    module = CausalLMDistillation(teacher, student, alpha=0.5)
    got = terms(module, padded(ROWS, "right"))
    kl, ce = reference(teacher, student, ROWS, vocab=64)
    assert got["soft"].item() == pytest.approx(kl, rel=1e-5)
    assert got["hard"].item() == pytest.approx(ce, rel=1e-5)


def test_llama_pair_left_padded_with_a_padded_teacher_vocabulary():
    """A teacher vocabulary padded from 64 to 72 (a multiple of 8), left padding, JSD(0.5): the shared-prefix rule."""
    teacher, student = llama_pair(72, 64)
    with pytest.raises(ValueError, match="teacher's vocabulary has 72 entries and the student's 64"):
        terms(CausalLMDistillation(teacher, student), padded(ROWS, "left"))
    module = CausalLMDistillation(teacher, student, soft_loss=JSDLoss(temperature=1.0, beta=0.5), vocab_size=64)
    got = terms(module, padded(ROWS, "left"))
    jsd, ce = reference(teacher, student, ROWS, vocab=64, beta=0.5)
    # RoPE sees only relative positions, so left padding leaves the real tokens' logits as they are (float32 noise)
    assert got["soft"].item() == pytest.approx(jsd, rel=1e-4)
    assert got["hard"].item() == pytest.approx(ce, rel=1e-4)


@pytest.mark.slow
def test_gpt2_pair_distils_through_the_plain_trainer():
    teacher, student = gpt2_pair()
    teacher_before = copy.deepcopy(teacher.state_dict())
    batches = [padded(ROWS, "right"), padded([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11]], "right")]
    module = CausalLMDistillation(teacher, student, alpha=1.0, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    before = terms(module, batches[0])["soft"].item()
    trainer = L.Trainer(accelerator="cpu", max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    after = terms(module, batches[0])["soft"].item()
    assert after < 0.5 * before, (before, after)  # the student moved towards the teacher on the tokens it saw
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert all(not k.startswith("teacher.") for k in module.state_dict())  # the teacher stays out of checkpoints


@pytest.mark.parametrize("loss", [KDLoss(temperature=2.0), JSDLoss(temperature=1.0, beta=0.3)], ids=["kd_t2", "jsd"])
def test_fused_training_loss_and_gradients_equal_the_materialised_ones(loss):
    """GPT-2 ties its output layer to the input embedding: the fused pass must add both gradients."""
    teacher, student = gpt2_pair(vocab_teacher=72)
    batch = padded(ROWS, "right")
    grads, values = [], []
    for fused in (None, 3):
        module = CausalLMDistillation(teacher, copy.deepcopy(student), soft_loss=copy.deepcopy(loss), alpha=0.3, vocab_size=64,
                                      fused_chunk_size=fused)
        module.student.eval()  # no dropout, same numbers in both passes
        losses = module._training_losses(batch, "test")[0]
        losses["loss"].backward()
        values.append({k: v.item() for k, v in losses.items()})
        grads.append({k: p.grad.clone() for k, p in module.student.named_parameters() if p.grad is not None})
    for key in ("loss", "soft", "hard"):
        assert values[1][key] == pytest.approx(values[0][key], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and "transformer.wte.weight" in grads[1]
    for key, value in grads[0].items():
        torch.testing.assert_close(grads[1][key], value, rtol=1e-4, atol=1e-6)


def test_fused_option_refuses_what_it_cannot_compute():
    teacher, student = gpt2_pair()
    with pytest.raises(ValueError, match=r"Expected `loss` to be one of KDLoss, ReverseKLLoss, JSDLoss or SkewKLLoss.*got DKDLoss"):
        CausalLMDistillation(teacher, student, soft_loss=DKDLoss(), fused_chunk_size=8)
    with pytest.raises(ValueError, match=r"Expected `fused_chunk_size` to be an integer >= 1 or None, but got 0"):
        CausalLMDistillation(teacher, student, fused_chunk_size=0)
    module = CausalLMDistillation(torch.nn.Embedding(64, 64), student, fused_chunk_size=8)
    with pytest.raises(TypeError, match=r"needs the teacher's final hidden states and output layer.*Override `teacher_hidden"):
        module._training_losses(padded(ROWS, "right"), "test")
