"""Each loss against an independent float64 reference (plain loops / numpy-style math in the test)."""

import math

import pytest
import torch

from lightning_kd.losses import (
    HardCrossEntropyLoss,
    HardMSELoss,
    KDLoss,
    cross_entropy_loss,
    kd_loss,
    mse_loss,
    soft_mse_loss,
)


def ref_kd(student, teacher, T, mask=None, t2=True):
    """Float64 reference: loops over positions, softmax written out by hand."""
    s = student.double().reshape(-1, student.shape[-1])
    t = teacher.double().reshape(-1, teacher.shape[-1])
    m = torch.ones(s.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1)
    total, count = 0.0, 0
    for i in range(s.shape[0]):
        if not m[i]:
            continue
        es = [math.exp(v / T) for v in s[i].tolist()]
        et = [math.exp(v / T) for v in t[i].tolist()]
        ps = [v / sum(es) for v in es]
        pt = [v / sum(et) for v in et]
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
        count += 1
    value = total / max(count, 1)
    return value * T * T if t2 else value


@pytest.mark.parametrize("shape", [(8, 10), (3, 5, 7), (1, 2)])
@pytest.mark.parametrize("T", [1.0, 2.5, 4.0])
def test_kd_loss_matches_float64_reference(shape, T):
    s, t = torch.randn(shape) * 3, torch.randn(shape) * 3
    assert kd_loss(s, t, T).item() == pytest.approx(ref_kd(s, t, T), rel=1e-5, abs=1e-7)
    assert kd_loss(s, t, T, scale_by_t2=False).item() == pytest.approx(ref_kd(s, t, T, t2=False), rel=1e-5, abs=1e-7)


def test_kd_loss_sequence_with_mask_averages_valid_positions_only():
    s, t = torch.randn(4, 6, 11), torch.randn(4, 6, 11)
    mask = torch.rand(4, 6) > 0.4
    mask[0, 0] = True
    expected = ref_kd(s, t, 2.0, mask=mask)
    assert kd_loss(s, t, 2.0, mask=mask).item() == pytest.approx(expected, rel=1e-5)
    # masked positions do not matter at all: change them, same loss
    s2 = torch.where(mask.unsqueeze(-1), s, torch.randn_like(s) * 100)
    assert kd_loss(s2, t, 2.0, mask=mask).item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_bf16_inputs_are_upcast():
    s, t = (torch.randn(16, 10) * 2).bfloat16(), (torch.randn(16, 10) * 2).bfloat16()
    out = kd_loss(s, t, 4.0)
    assert out.dtype == torch.float32
    # the reference sees exactly the same (bf16-rounded) numbers, in float64
    assert out.item() == pytest.approx(ref_kd(s.float(), t.float(), 4.0), rel=1e-5)


def test_kd_loss_all_masked_is_graph_connected_zero():
    s = torch.randn(2, 3, 5, requires_grad=True)
    out = kd_loss(s, torch.randn(2, 3, 5), 4.0, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert out.item() == 0.0 and not torch.isnan(out)
    out.backward()
    assert s.grad is not None and torch.all(s.grad == 0)


def test_kd_loss_zero_probability_teacher_classes_do_not_give_nan():
    t = torch.tensor([[0.0, 1.0, float("-inf")]])
    s = torch.tensor([[0.5, 0.2, 0.1]], requires_grad=True)
    out = kd_loss(s, t, 1.0)
    pt = torch.softmax(torch.tensor([0.0, 1.0]), -1).double()
    ps = torch.softmax(s.detach().double(), -1)[0, :2]
    assert out.item() == pytest.approx((pt * (pt.log() - ps.log())).sum().item(), rel=1e-5)
    out.backward()
    assert torch.isfinite(s.grad).all()


def test_kd_loss_identical_distributions_is_zero_and_gradcheck():
    x = torch.randn(3, 4)
    assert kd_loss(x, x.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    # gradient against finite differences (the function computes in float32: loose tolerances)
    s = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, dtype=torch.float64)
    torch.autograd.gradcheck(lambda a: kd_loss(a, t, 2.0), (s,), eps=1e-3, atol=1e-3, rtol=1e-2)


def test_kd_module_equals_functional():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    assert KDLoss(3.0)(s, t).item() == kd_loss(s, t, 3.0).item()
    assert KDLoss(3.0)(s, t).item() == pytest.approx(ref_kd(s, t, 3.0), rel=1e-5)
    mask = torch.tensor([True, False, True, True, False])
    assert KDLoss(2.0, scale_by_t2=False)(s, t, mask=mask).item() == kd_loss(s, t, 2.0, mask=mask, scale_by_t2=False).item()
    assert KDLoss(2.0, scale_by_t2=False)(s, t, mask=mask).item() == pytest.approx(ref_kd(s, t, 2.0, mask, t2=False), rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, r"Expected `temperature` to be > 0, but got 0.0"),
        ({"temperature": -1.0}, r"`temperature` to be > 0"),
    ],
)
def test_kd_loss_bad_temperature(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), **kwargs)
    with pytest.raises(ValueError, match=match):  # the object checks at construction
        KDLoss(**kwargs)


def test_kd_loss_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"student \(4, 10\) and teacher \(4, 100\)"):
        kd_loss(torch.randn(4, 10), torch.randn(4, 100), 4.0)


def test_soft_mse_reference_and_mask():
    s, t = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    mask = torch.rand(3, 4) > 0.5
    mask[0, 0] = True
    d = (s.double() - t.double()) ** 2
    expected = sum(d[i, j].mean().item() for i in range(3) for j in range(4) if mask[i, j]) / mask.sum().item()
    assert soft_mse_loss(s, t, mask=mask).item() == pytest.approx(expected, rel=1e-5)


def test_cross_entropy_ignores_unlabeled_rows():
    logits = torch.randn(6, 4)
    y = torch.tensor([0, 3, -100, 2, -100, 1])
    lp = torch.log_softmax(logits.double(), -1)
    expected = -sum(lp[i, y[i]].item() for i in range(6) if y[i] >= 0) / 4
    assert cross_entropy_loss(logits, y).item() == pytest.approx(expected, rel=1e-6)


def test_mse_hard_one_hot_and_regression():
    out = torch.randn(4, 3)
    y = torch.tensor([0, 2, 1, -100])
    onehot = torch.eye(3, dtype=torch.float64)[y[:3]]
    expected = ((out[:3].double() - onehot) ** 2).mean().item()
    assert mse_loss(out, y).item() == pytest.approx(expected, rel=1e-6)
    target = torch.randn(4, 3)
    target[1] = float("nan")  # an unlabeled regression row
    keep = [0, 2, 3]
    expected = ((out[keep].double() - target[keep].double()) ** 2).mean().item()
    assert mse_loss(out, target).item() == pytest.approx(expected, rel=1e-6)


def test_hard_targets_that_do_not_fit_the_outputs():
    with pytest.raises(ValueError, match=r"class targets in \[0, 10\).*values in \[0, 99\]"):
        cross_entropy_loss(torch.randn(3, 10), torch.tensor([0, 5, 99]))
    with pytest.raises(ValueError, match=r"Expected targets of shape \(3,\)"):
        cross_entropy_loss(torch.randn(3, 10), torch.tensor([[0], [1], [2]]))
    with pytest.raises(TypeError, match=r"integer class indices as targets for the cross-entropy.*Use HardMSELoss"):
        cross_entropy_loss(torch.randn(3, 10), torch.randn(3))
    with pytest.raises(ValueError, match=r"regression targets of shape \(3, 2\)"):
        mse_loss(torch.randn(3, 2), torch.randn(3, 5))


def test_hard_loss_modules_equal_their_functions_and_the_references():
    logits = torch.randn(6, 4)
    y = torch.tensor([0, 3, -100, 2, -100, 1])
    lp = torch.log_softmax(logits.double(), -1)
    expected = -sum(lp[i, y[i]].item() for i in range(6) if y[i] >= 0) / 4
    assert HardCrossEntropyLoss()(logits, y).item() == cross_entropy_loss(logits, y).item()
    assert HardCrossEntropyLoss()(logits, y).item() == pytest.approx(expected, rel=1e-6)
    labeled = [0, 1, 3, 5]
    onehot = torch.eye(4, dtype=torch.float64)[y[labeled]]
    expected = ((logits[labeled].double() - onehot) ** 2).mean().item()
    assert HardMSELoss()(logits, y).item() == mse_loss(logits, y).item()
    assert HardMSELoss()(logits, y).item() == pytest.approx(expected, rel=1e-6)
    # check_values=False (the module checks every batch itself, without a device sync): an
    # out-of-range target is left out, not read as a class and not a crash
    y_bad = y.clone()
    y_bad[0] = 99
    kept = [1, 3, 5]
    expected = -sum(lp[i, y[i]].item() for i in kept) / 3
    assert HardCrossEntropyLoss()(logits, y_bad, check_values=False).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match=r"class targets in \[0, 4\)"):
        HardCrossEntropyLoss()(logits, y_bad)


def test_hard_loss_modules_take_no_options():
    # what the registry's "unknown hard_loss" became: a wrong option is Python's own TypeError
    with pytest.raises(TypeError, match="unexpected keyword argument 'reduction'"):
        HardCrossEntropyLoss(reduction="sum")
    with pytest.raises(TypeError, match="unexpected keyword argument 'ignore_index'"):
        HardMSELoss(ignore_index=-1)
