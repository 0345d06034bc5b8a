"""The fused linear distillation loss against float64 references written here, and against the loss objects
on materialised logits (value and gradients); masks, bias, shapes, bf16, tied embeddings, compile, errors.

Also the generalised JSD at ``beta = 0`` and ``beta = 1`` (TRL's convention: forward and reverse KL).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.losses import (
    DISTLoss,
    DKDLoss,
    FusedLinearKDLoss,
    JSDLoss,
    KDLoss,
    LearnableTemperature,
    ReverseKLLoss,
    SkewKLLoss,
    SoftMSELoss,
    fused_linear_distillation_loss,
    fused_linear_kd_loss,
    jsd_loss,
)

V, H_S, H_T = 19, 6, 4


# ---- float64 references, independent of the library --------------------------------------------------------------

def ref_log_softmax(z):
    z = z.double()
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def ref_kl(log_p, log_q):
    """KL(p || q) per position; classes with p = 0 contribute 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def ref_mixture(log_p, log_q, w):
    return torch.log(w * log_p.exp() + (1 - w) * log_q.exp())


def ref_per_position(kind, zs, zt, T, option):
    ls, lt = ref_log_softmax(zs / T), ref_log_softmax(zt / T)
    if kind == "forward" or (kind == "jsd" and option == 0.0):
        return ref_kl(lt, ls)
    if kind == "reverse" or (kind == "jsd" and option == 1.0):
        return ref_kl(ls, lt)
    if kind == "jsd":
        m = ref_mixture(lt, ls, option)
        return option * ref_kl(lt, m) + (1 - option) * ref_kl(ls, m)
    return ref_kl(lt, ref_mixture(lt, ls, option))  # skew


def ref_loss(kind, zs, zt, T, option, scale_by_t2, mask=None):
    per = ref_per_position(kind, zs, zt, T, option)
    if mask is None:
        mask = torch.ones(per.shape, dtype=torch.bool)
    mean = torch.where(mask, per, 0.0).sum() / mask.sum().clamp(min=1)
    return mean * (T * T if scale_by_t2 else 1.0)


def ref_ce(zs, y, ignore_index=-100):
    ok = y != ignore_index
    nll = -ref_log_softmax(zs).gather(-1, torch.where(ok, y, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(ok, nll, 0.0).sum() / ok.sum().clamp(min=1)


# ---- helpers ------------------------------------------------------------------------------------------------------

LOSSES = {  # id: (loss object, reference kind, T, option, scale_by_t2)
    "forward-T2": (lambda: KDLoss(temperature=2.0), "forward", 2.0, None, True),
    "forward-T2-no-t2": (lambda: KDLoss(temperature=2.0, scale_by_t2=False), "forward", 2.0, None, False),
    "reverse": (lambda: ReverseKLLoss(), "reverse", 1.0, None, True),
    "reverse-T1.5": (lambda: ReverseKLLoss(temperature=1.5), "reverse", 1.5, None, True),
    "jsd-0": (lambda: JSDLoss(beta=0.0), "jsd", 1.0, 0.0, True),
    "jsd-0.5": (lambda: JSDLoss(beta=0.5), "jsd", 1.0, 0.5, True),
    "jsd-0.3-T2": (lambda: JSDLoss(2.0, beta=0.3), "jsd", 2.0, 0.3, True),
    "jsd-1": (lambda: JSDLoss(beta=1.0), "jsd", 1.0, 1.0, True),
    "skew-0.1": (lambda: SkewKLLoss(skew=0.1), "skew", 1.0, 0.1, True),
}


def make(lead=(3, 7), dtype=torch.float32, bias=True, h_t=H_T, scale=1.5):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    x = {
        "student_hidden": r(*lead, H_S).requires_grad_(),
        "student_weight": r(V, H_S).requires_grad_(),
        "teacher_hidden": r(*lead, h_t),
        "teacher_weight": r(V, h_t),
    }
    if bias:
        x["student_bias"] = r(V).requires_grad_()
        x["teacher_bias"] = r(V)
    return x


def logits(x):
    zs = x["student_hidden"] @ x["student_weight"].T
    zt = x["teacher_hidden"] @ x["teacher_weight"].T
    if "student_bias" in x:
        zs, zt = zs + x["student_bias"], zt + x["teacher_bias"]
    return zs, zt


def trained(x):
    return [x[k] for k in ("student_hidden", "student_weight", "student_bias") if k in x]


def grads(value, x):
    return torch.autograd.grad(value, trained(x))


def assert_close_rel(actual, expected, rel):
    scale = expected.detach().double().abs().max().clamp(min=1e-30)
    err = (actual.detach().double() - expected.detach().double()).abs().max()
    assert err / scale <= rel, f"relative error {(err / scale).item():.2e} > {rel}"


def left_padding_mask(lead=(3, 7)):
    mask = torch.ones(lead, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    mask[1, :1] = False
    mask[-1, -2:] = False  # and right padding
    return mask


# ---- value and gradients -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(LOSSES))
def test_each_divergence_with_mask_and_bias_matches_float64_and_the_loss_object(name):
    build, kind, T, option, t2 = LOSSES[name]
    x, mask = make(), left_padding_mask()
    fused = fused_linear_kd_loss(**x, loss=build(), mask=mask, chunk_size=4)  # 16 valid positions: 4 chunks
    zs, zt = logits(x)
    reference = ref_loss(kind, zs, zt, T, option, t2, mask)
    assert fused.dtype == torch.float32
    assert fused.item() == pytest.approx(reference.item(), rel=1e-5)
    naive = build()(*logits(x), mask=mask)
    for ours, theirs in zip(grads(fused, x), grads(naive, x)):
        assert_close_rel(ours, theirs, 1e-4)
    for ours, ref in zip(grads(fused_linear_kd_loss(**x, loss=build(), mask=mask, chunk_size=4), x), grads(reference, x)):
        assert_close_rel(ours, ref, 1e-4)  # the gradients of the float64 reference, too


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_flat_positions_without_bias_any_chunk_size(chunk_size):
    x = make(lead=(21,), bias=False)
    fused = fused_linear_kd_loss(**x, temperature=2.0, chunk_size=chunk_size)  # default loss: KDLoss(temperature=2.0)
    zs, zt = logits(x)
    assert fused.item() == pytest.approx(ref_loss("forward", zs, zt, 2.0, None, True).item(), rel=1e-5)
    for ours, theirs in zip(grads(fused, x), grads(KDLoss(2.0)(zs, zt), x)):
        assert_close_rel(ours, theirs, 1e-4)


def test_float64_inputs_and_different_hidden_sizes():
    x = make(lead=(2, 5), dtype=torch.float64, h_t=11)
    loss = SkewKLLoss(skew=0.3)
    fused = fused_linear_kd_loss(**x, loss=loss, chunk_size=3)
    zs, zt = logits(x)
    assert fused.item() == pytest.approx(ref_loss("skew", zs, zt, 1.0, 0.3, True).item(), rel=1e-5)
    for ours, theirs in zip(grads(fused, x), grads(loss(zs, zt), x)):
        assert ours.dtype == torch.float64
        assert_close_rel(ours, theirs, 1e-5)


def test_masked_positions_are_skipped_and_get_zero_gradient():
    x, mask = make(), left_padding_mask()
    x["student_hidden"].data[~mask] = float("nan")  # never read: a masked row is not computed at all
    fused = fused_linear_kd_loss(**x, loss=ReverseKLLoss(), mask=mask, chunk_size=5)
    g_hidden = grads(fused, x)[0]
    assert torch.isfinite(fused)
    assert (g_hidden[~mask] == 0).all() and (g_hidden[mask] != 0).any()


@pytest.mark.parametrize("lead", [(2, 4), (0, 4), (0,)])
def test_all_masked_or_empty_is_a_graph_connected_zero(lead):
    x = make(lead=lead)
    mask = torch.zeros(lead, dtype=torch.bool)
    for m in (mask, None) if 0 in lead else (mask,):
        fused = fused_linear_kd_loss(**x, loss=JSDLoss(beta=0.5), mask=m)
        assert fused.item() == 0.0 and fused.requires_grad
        for g in grads(fused, x):
            assert (g == 0).all()


@pytest.mark.parametrize("name", ["forward-T2", "reverse", "jsd-0.5", "skew-0.1"])
def test_padded_vocabulary_minus_inf_in_both_models(name):
    build, *_ = LOSSES[name]
    x = make(lead=(9,))
    for key in ("student_bias", "teacher_bias"):
        x[key].data[-3:] = -math.inf  # three padded classes, masked in both models
    fused = fused_linear_kd_loss(**x, loss=build(), chunk_size=4)
    zs, zt = logits(x)
    naive = build()(zs, zt)
    assert fused.item() == pytest.approx(naive.item(), rel=1e-5)
    for ours, theirs in zip(grads(fused, x), grads(naive, x)):
        assert torch.isfinite(ours).all()
        assert_close_rel(ours, theirs, 1e-4)
    assert (grads(fused_linear_kd_loss(**x, loss=build()), x)[2][-3:] == 0).all()


def test_the_teacher_is_a_constant_and_the_gradient_scales_with_the_incoming_one():
    x = make()
    x["teacher_hidden"].requires_grad_()
    x["teacher_weight"].requires_grad_()
    (3.0 * fused_linear_kd_loss(**x)).backward()
    assert x["teacher_hidden"].grad is None and x["teacher_weight"].grad is None
    zs, zt = logits(x)
    for ours, theirs in zip([t.grad for t in trained(x)], grads(3.0 * KDLoss(1.0)(zs, zt.detach()), x)):
        assert_close_rel(ours, theirs, 1e-4)


def test_a_second_backward_through_the_same_graph_is_refused_not_wrong():
    x = make()
    fused = fused_linear_kd_loss(**x)
    fused.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        fused.backward()


def test_module_is_the_function():
    x, mask = make(), left_padding_mask()
    module = FusedLinearKDLoss(JSDLoss(beta=0.2), chunk_size=3)
    assert torch.equal(module(**x, mask=mask), fused_linear_kd_loss(**x, loss=JSDLoss(beta=0.2), mask=mask, chunk_size=3))
    assert torch.equal(FusedLinearKDLoss()(**x), fused_linear_kd_loss(**x))
    assert "chunk_size=3" in repr(module)


# ---- dtypes, tied embeddings, compile ------------------------------------------------------------------------------

def test_bf16_autocast_and_bf16_inputs_keep_float32_math():
    x = make(lead=(4, 6))
    reference = fused_linear_kd_loss(**x, loss=KDLoss(2.0), chunk_size=5)
    ref_grads = grads(reference, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = fused_linear_kd_loss(**x, loss=KDLoss(2.0), chunk_size=5)
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(reference.item(), rel=1e-6)
    for ours, theirs in zip(grads(under_autocast, x), ref_grads):
        assert ours.dtype == torch.float32
        assert_close_rel(ours, theirs, 1e-6)

    bf16 = {k: v.detach().bfloat16().requires_grad_(v.requires_grad) for k, v in x.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_linear_kd_loss(**bf16, loss=KDLoss(2.0), chunk_size=5)
    upcast = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in bf16.items()}
    zs, zt = logits(upcast)
    # float32 math on the bf16 values: as close to float64 as float32 inputs are
    assert fused.item() == pytest.approx(ref_loss("forward", zs, zt, 2.0, None, True).item(), rel=1e-5)
    for ours, theirs in zip(grads(fused, bf16), ref_grads):
        assert ours.dtype == torch.bfloat16
        assert_close_rel(ours.float(), theirs, 5e-2)  # the inputs themselves were rounded to bf16


class TinyLM(nn.Module):
    def __init__(self, vocab=V, hidden=H_S):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied embeddings

    def hidden(self, ids):
        return torch.tanh(self.mix(self.embed(ids)))


def test_tied_embeddings_get_both_gradients():
    torch.manual_seed(0)
    student, teacher = TinyLM(), TinyLM(hidden=H_T)
    ids = torch.randint(0, V, (3, 8))
    targets = ids.roll(-1, dims=1)
    mask = left_padding_mask((3, 8))
    with torch.no_grad():
        t_hidden = teacher.hidden(ids)

    def naive():
        zs = student.lm_head(student.hidden(ids))
        soft = SkewKLLoss(skew=0.1)(zs, teacher.lm_head(t_hidden), mask=mask)
        return 0.7 * soft + 0.3 * F.cross_entropy(zs.reshape(-1, V), torch.where(mask, targets, -100).reshape(-1))

    def fused():
        return fused_linear_distillation_loss(student.hidden(ids), student.lm_head.weight, t_hidden, teacher.lm_head.weight,
                                              targets, loss=SkewKLLoss(skew=0.1), soft_weight=0.7, hard_weight=0.3,
                                              mask=mask, chunk_size=5)[0]

    expected = torch.autograd.grad(naive(), list(student.parameters()))
    actual = torch.autograd.grad(fused(), list(student.parameters()))
    assert len(actual) == 3  # embed (= lm_head), mix.weight, mix.bias
    for ours, theirs in zip(actual, expected):
        assert_close_rel(ours, theirs, 1e-4)


def test_torch_compile_gives_the_same_value_and_gradients():
    x, mask = make(lead=(2, 5)), left_padding_mask((2, 5))

    def fn(x, mask):
        return fused_linear_kd_loss(**x, loss=JSDLoss(2.0, beta=0.4), mask=mask, chunk_size=3)

    compiled = torch.compile(fn)
    for m in (mask, None):
        eager, comp = fn(x, m), compiled(x, m)
        assert comp.item() == pytest.approx(eager.item(), rel=1e-6)
        for ours, theirs in zip(grads(comp, x), grads(eager, x)):
            assert_close_rel(ours, theirs, 1e-6)


# ---- the hard term -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1.0, 3.0])
def test_hard_cross_entropy_fused_with_the_soft_term(T):
    x, mask = make(), left_padding_mask()
    targets = torch.randint(0, V, (3, 7))
    targets[0, 4] = targets[2, 0] = -100
    combined, soft, hard = fused_linear_distillation_loss(**x, targets=targets, loss=KDLoss(T), soft_weight=0.4,
                                                          hard_weight=0.6, mask=mask, chunk_size=4)
    zs, zt = logits(x)
    labeled = torch.where(mask, targets, -100)
    assert hard.item() == pytest.approx(F.cross_entropy(zs.reshape(-1, V), labeled.reshape(-1)).item(), rel=1e-5)
    assert hard.item() == pytest.approx(ref_ce(zs, labeled).item(), rel=1e-5)
    assert soft.item() == pytest.approx(ref_loss("forward", zs, zt, T, None, True, mask).item(), rel=1e-5)
    assert combined.item() == pytest.approx(0.4 * soft.item() + 0.6 * hard.item(), rel=1e-6)
    assert not soft.requires_grad and not hard.requires_grad
    naive = 0.4 * KDLoss(T)(zs, zt, mask=mask) + 0.6 * F.cross_entropy(zs.reshape(-1, V), labeled.reshape(-1))
    for ours, theirs in zip(grads(combined, x), grads(naive, x)):
        assert_close_rel(ours, theirs, 1e-4)


@pytest.mark.parametrize("name", ["forward-T2", "reverse-T1.5", "jsd-0.3-T2", "skew-0.1"])
def test_blocks_of_rows_inside_a_chunk(name, monkeypatch):
    import lightning_kd.losses.fused as fused_module

    monkeypatch.setattr(fused_module, "_BLOCK_ELEMENTS", 3 * V)  # blocks of 3 rows in chunks of 7
    build, *_ = LOSSES[name]
    x, mask = make(), left_padding_mask()
    targets = torch.randint(0, V, (3, 7))
    targets[1, 3] = -100
    combined, soft, hard = fused_linear_distillation_loss(**x, targets=targets, loss=build(), soft_weight=0.6,
                                                          hard_weight=0.4, mask=mask, chunk_size=7)
    zs, zt = logits(x)
    labeled = torch.where(mask, targets, -100).reshape(-1)
    naive = 0.6 * build()(zs, zt, mask=mask) + 0.4 * F.cross_entropy(zs.reshape(-1, V), labeled)
    assert combined.item() == pytest.approx(naive.item(), rel=1e-5)
    for ours, theirs in zip(grads(combined, x), grads(naive, x)):
        assert_close_rel(ours, theirs, 1e-4)


def test_hard_term_alone_without_a_teacher_and_another_ignore_index():
    x = make(lead=(11,), bias=False)
    targets = torch.randint(0, V, (11,))
    targets[::4] = V  # the ignore index here
    combined, soft, hard = fused_linear_distillation_loss(x["student_hidden"], x["student_weight"], None, None, targets,
                                                          soft_weight=0.0, hard_weight=1.0, chunk_size=2, ignore_index=V)
    zs = x["student_hidden"] @ x["student_weight"].T
    naive = F.cross_entropy(zs, targets, ignore_index=V)
    assert soft.item() == 0.0
    assert combined.item() == pytest.approx(naive.item(), rel=1e-5)
    assert combined.item() == pytest.approx(ref_ce(zs, targets, ignore_index=V).item(), rel=1e-5)
    for ours, theirs in zip(grads(combined, x), grads(naive, x)):
        assert_close_rel(ours, theirs, 1e-4)


def test_no_labeled_position_gives_zero_hard_term():
    x = make(lead=(5,))
    combined, soft, hard = fused_linear_distillation_loss(**x, targets=torch.full((5,), -100), hard_weight=1.0)
    assert hard.item() == 0.0 and combined.item() == pytest.approx(soft.item())


# ---- the generalised JSD at its ends -------------------------------------------------------------------------------

@pytest.mark.parametrize("beta, kind", [(0.0, "forward"), (1.0, "reverse")])
def test_jsd_at_beta_0_and_1_is_forward_and_reverse_kl(beta, kind):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 5, V, generator=g) * 2, torch.randn(4, 5, V, generator=g) * 2
    mask = torch.rand(4, 5, generator=g) > 0.3
    expected = ref_loss(kind, s, t, 2.0, None, True, mask)
    assert jsd_loss(s, t, beta=beta, temperature=2.0, mask=mask).item() == pytest.approx(expected.item(), rel=1e-5)
    assert JSDLoss(2.0, beta=beta)(s, t, mask=mask).item() == pytest.approx(expected.item(), rel=1e-5)
    # the ends are TRL's convention, not the limit of the mixture form (which vanishes there)
    near = 1e-3 if beta == 0.0 else 1 - 1e-3
    assert jsd_loss(s, t, beta=near, temperature=2.0, mask=mask).item() < 0.01 * expected.item()


@pytest.mark.parametrize("beta", [-0.1, 1.5, math.nan])
def test_jsd_beta_outside_the_closed_interval_is_refused(beta):
    with pytest.raises(ValueError, match=r"Expected `beta` to be in \[0, 1\]"):
        JSDLoss(beta=beta)
    with pytest.raises(ValueError, match=r"Expected `beta` to be in \[0, 1\]"):
        jsd_loss(torch.zeros(1, 3), torch.zeros(1, 3), beta=beta)


# ---- errors ------------------------------------------------------------------------------------------------------

BAD = [
    (dict(loss=DKDLoss()), ValueError, "Expected `loss` to be one of KDLoss, ReverseKLLoss, JSDLoss or SkewKLLoss.*DKDLoss"),
    (dict(loss=DISTLoss()), ValueError, "one of KDLoss, ReverseKLLoss, JSDLoss or SkewKLLoss.*but got DISTLoss"),
    (dict(loss=SoftMSELoss()), ValueError, "but got SoftMSELoss"),
    (dict(loss=KDLoss(LearnableTemperature(4.0))), ValueError, "LearnableTemperature"),
    (dict(loss=KDLoss(standardize=True)), ValueError, "`standardize=False`"),
    (dict(loss=KDLoss(4.0), temperature=2.0), ValueError, r"left at 1.0 or to equal the loss's temperature 4.0, but got 2.0"),
    (dict(temperature=0.0), ValueError, "Expected `temperature` to be > 0"),
    (dict(chunk_size=0), ValueError, "Expected `chunk_size` to be >= 1, but got 0"),
    (dict(chunk_size=2.0), TypeError, "Expected `chunk_size` to be an int"),
    (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, r"Expected `mask` of shape \(3, 7\)"),
]


@pytest.mark.parametrize("options, error, match", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_options_are_refused(options, error, match):
    with pytest.raises(error, match=match):
        fused_linear_kd_loss(**make(), **options)


def test_the_loss_temperature_may_be_repeated():
    x = make()
    assert torch.equal(fused_linear_kd_loss(**x, temperature=4.0, loss=KDLoss(4.0)), fused_linear_kd_loss(**x, loss=KDLoss(4.0)))


def test_shapes_that_do_not_fit_are_refused():
    x = make()
    with pytest.raises(ValueError, match="same vocabulary size, but got student 19 and teacher 23"):
        fused_linear_kd_loss(**{**x, "teacher_weight": torch.randn(23, H_T), "teacher_bias": None})
    with pytest.raises(ValueError, match=r"teacher's output weight of shape \(V, 4\)"):
        fused_linear_kd_loss(**{**x, "teacher_weight": torch.randn(V, 5)})
    with pytest.raises(ValueError, match="hidden states for the same positions"):
        fused_linear_kd_loss(**{**x, "teacher_hidden": torch.randn(3, 6, H_T)})
    with pytest.raises(ValueError, match=r"student's bias of shape \(19,\)"):
        fused_linear_kd_loss(**{**x, "student_bias": torch.randn(V + 1)})
    with pytest.raises(ValueError, match=r"\(N, H\) or \(B, S, H\)"):
        fused_linear_kd_loss(**{**x, "student_hidden": torch.randn(H_S)})
    with pytest.raises(ValueError, match="one of KDLoss"):
        FusedLinearKDLoss(DKDLoss())
    with pytest.raises(ValueError, match="`chunk_size` to be >= 1"):
        FusedLinearKDLoss(chunk_size=-1)


def test_bad_distillation_settings_are_refused():
    x = make(lead=(5,))
    y = torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="Expected `hard_weight` to be a finite number >= 0, but got -1.0"):
        fused_linear_distillation_loss(**x, targets=y, hard_weight=-1.0)
    with pytest.raises(ValueError, match=r"Expected `teacher_hidden` and `teacher_weight` for the soft term"):
        fused_linear_distillation_loss(x["student_hidden"], x["student_weight"], None, None, y)
    with pytest.raises(ValueError, match=r"Expected `targets` of shape \(5,\)"):
        fused_linear_distillation_loss(**x, targets=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"Expected `targets` in \[0, 19\) or -100"):
        fused_linear_distillation_loss(**x, targets=torch.full((5,), V))
    with pytest.raises(TypeError, match="Expected integer class indices"):
        fused_linear_distillation_loss(**x, targets=torch.zeros(5))
