"""The logit family against independent float64 references (explicit loops over positions and classes)."""

import math

import pytest
import torch

from lightning_kd.losses import (
    DISTLoss,
    DKDLoss,
    JSDLoss,
    KDLoss,
    LearnableTemperature,
    LogitLoss,
    ReverseKLLoss,
    SkewKLLoss,
    SoftMSELoss,
    TopKLogits,
    dist_loss,
    dkd_loss,
    jsd_loss,
    kd_loss,
    reverse_gradient,
    reverse_kl_loss,
    skew_kl_loss,
    soft_mse_loss,
    standardize_logits,
)

SHAPES = [(8, 10), (3, 5, 7), (2, 3)]


# ------------------------------------------------------------------ float64 references
def rows(x):
    return x.double().reshape(-1, x.shape[-1]).tolist()


def softmax(row, T, standardize=False):
    if standardize:
        mean = sum(row) / len(row)
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
        row = [(v - mean) / (std + 1e-7) for v in row]
    top = max(row)
    e = [math.exp((v - top) / T) for v in row]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def average(values, mask, T, t2=True):
    m = [True] * len(values) if mask is None else mask.reshape(-1).tolist()
    kept = [v for v, keep in zip(values, m) if keep]
    value = sum(kept) / max(len(kept), 1)
    return value * T * T if t2 else value


def ref_pointwise(s, t, T, fn, mask=None, standardize=False, t2=True):
    values = [fn(softmax(a, T, standardize), softmax(b, T, standardize)) for a, b in zip(rows(s), rows(t))]
    return average(values, mask, T, t2)


def ref_reverse(ps, pt):
    return kl(ps, pt)


def ref_jsd(beta):
    def fn(ps, pt):
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
        return beta * kl(pt, m) + (1 - beta) * kl(ps, m)

    return fn


def ref_skew(skew):
    def fn(ps, pt):
        return kl(pt, [skew * a + (1 - skew) * b for a, b in zip(pt, ps)])

    return fn


def ref_dkd(s, t, targets, alpha, beta, T, mask=None, standardize=False):
    values = []
    m = [True] * len(rows(s)) if mask is None else mask.reshape(-1).tolist()
    for a, b, y, ok in zip(rows(s), rows(t), targets.reshape(-1).tolist(), m):
        if y == -100 or not ok:
            continue
        ps, pt = softmax(a, T, standardize), softmax(b, T, standardize)
        tckd = kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        others_s = [v / (1 - ps[y]) for c, v in enumerate(ps) if c != y]
        others_t = [v / (1 - pt[y]) for c, v in enumerate(pt) if c != y]
        values.append(alpha * tckd + beta * kl(others_t, others_s))
    return average(values, None, T)


def pearson(a, b):
    """The authors' DIST code: eps added to the product of the norms (not a clamp of each)."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    den = math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b))
    return num / (den + 1e-8)


def ref_dist(s, t, beta, gamma, T, mask=None):
    m = [True] * len(rows(s)) if mask is None else mask.reshape(-1).tolist()
    ps = [softmax(a, T) for a, ok in zip(rows(s), m) if ok]
    pt = [softmax(b, T) for b, ok in zip(rows(t), m) if ok]
    inter = 1 - sum(pearson(a, b) for a, b in zip(ps, pt)) / len(ps)
    cols = range(len(ps[0]))
    intra = 1 - sum(pearson([r[c] for r in ps], [r[c] for r in pt]) for c in cols) / len(ps[0])
    return (beta * inter + gamma * intra) * T * T


def logits(shape, scale=3.0):
    return torch.randn(shape) * scale


# ------------------------------------------------------------------ the divergences
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_reverse_kl_jsd_skew_match_float64_references(shape, T):
    s, t = logits(shape), logits(shape)
    approx = dict(rel=1e-6, abs=1e-6)
    assert reverse_kl_loss(s, t, temperature=T).item() == pytest.approx(ref_pointwise(s, t, T, ref_reverse), **approx)
    for beta in (0.1, 0.5, 0.9):
        assert jsd_loss(s, t, beta=beta, temperature=T).item() == pytest.approx(ref_pointwise(s, t, T, ref_jsd(beta)), **approx)
    for skew in (0.0, 0.1, 0.5):
        assert skew_kl_loss(s, t, skew=skew, temperature=T).item() == pytest.approx(ref_pointwise(s, t, T, ref_skew(skew)), **approx)


def test_divergences_with_a_mask_average_valid_positions_only():
    s, t = logits((4, 6, 9)), logits((4, 6, 9))
    mask = torch.rand(4, 6) > 0.5
    mask[0, 0] = True
    approx = dict(rel=1e-6, abs=1e-6)
    assert reverse_kl_loss(s, t, temperature=2.0, mask=mask).item() == pytest.approx(
        ref_pointwise(s, t, 2.0, ref_reverse, mask), **approx
    )
    assert jsd_loss(s, t, beta=0.3, mask=mask).item() == pytest.approx(ref_pointwise(s, t, 1.0, ref_jsd(0.3), mask), **approx)
    assert skew_kl_loss(s, t, skew=0.2, mask=mask).item() == pytest.approx(ref_pointwise(s, t, 1.0, ref_skew(0.2), mask), **approx)
    # what is masked does not matter
    s2 = torch.where(mask.unsqueeze(-1), s, torch.randn_like(s) * 50)
    assert jsd_loss(s2, t, beta=0.3, mask=mask).item() == pytest.approx(jsd_loss(s, t, beta=0.3, mask=mask).item(), rel=1e-6)


@pytest.mark.parametrize("fn", [reverse_kl_loss, jsd_loss, skew_kl_loss])
def test_divergences_bf16_inputs_upcast_and_all_masked_is_a_connected_zero(fn):
    s, t = logits((16, 10)).bfloat16(), logits((16, 10)).bfloat16()
    out = fn(s, t, temperature=2.0)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(fn(s.float(), t.float(), temperature=2.0).item(), rel=1e-6)
    x = torch.randn(2, 3, 5, requires_grad=True)
    zero = fn(x, torch.randn(2, 3, 5), mask=torch.zeros(2, 3, dtype=torch.bool))
    zero.backward()
    assert zero.item() == 0.0 and torch.all(x.grad == 0)


def test_special_cases_skew_zero_is_kl_and_jsd_limits_are_forward_and_reverse_kl():
    s, t = logits((6, 8), scale=1.0), logits((6, 8), scale=1.0)
    assert skew_kl_loss(s, t, skew=0.0, temperature=2.0).item() == pytest.approx(kd_loss(s, t, 2.0).item(), rel=1e-6)
    small = 1e-3  # the limits are approached linearly in beta; float32 cancellation limits how small it can go
    assert (jsd_loss(s, t, beta=small) / small).item() == pytest.approx(kd_loss(s, t, 1.0).item(), rel=1e-2)
    assert (jsd_loss(s, t, beta=1 - small) / small).item() == pytest.approx(reverse_kl_loss(s, t).item(), rel=1e-2)
    assert jsd_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_zero_probability_classes_give_finite_gradients_for_jsd_and_skew():
    t = torch.tensor([[0.0, 1.0, float("-inf")]])
    s = torch.tensor([[0.5, 0.2, 0.1]], requires_grad=True)
    for fn in (jsd_loss, skew_kl_loss):
        s.grad = None
        out = fn(s, t)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(s.grad).all()


def test_divergences_gradcheck_in_float64():
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64)
    # float32 math inside: loose tolerances, the check is that the gradient is the loss's own
    for fn in (lambda a: reverse_kl_loss(a, t), lambda a: jsd_loss(a, t), lambda a: skew_kl_loss(a, t)):
        torch.autograd.gradcheck(fn, (s,), eps=1e-3, atol=1e-3, rtol=1e-2)


# ------------------------------------------------------------------ DKD
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_matches_float64_reference(shape, T):
    s, t = logits(shape), logits(shape)
    targets = torch.randint(0, shape[-1], shape[:-1])
    for alpha, beta in ((1.0, 8.0), (0.5, 2.0)):
        expected = ref_dkd(s, t, targets, alpha, beta, T)
        # float32 math: its rounding (~1.2e-7 per term) is amplified by beta * T^2 (up to 128 here)
        tolerance = dict(rel=3e-6, abs=2e-7 * beta * T * T)
        assert dkd_loss(s, t, targets, alpha=alpha, beta=beta, temperature=T).item() == pytest.approx(expected, **tolerance)


def test_dkd_skips_unlabeled_and_masked_positions():
    s, t = logits((3, 4, 6)), logits((3, 4, 6))
    targets = torch.randint(0, 6, (3, 4))
    targets[0, 1] = -100
    mask = torch.rand(3, 4) > 0.3
    mask[1, 1] = True
    expected = ref_dkd(s, t, targets, 1.0, 8.0, 4.0, mask=mask)
    assert dkd_loss(s, t, targets, mask=mask).item() == pytest.approx(expected, rel=1e-6)


def test_dkd_decomposition_special_cases():
    s, t = logits((10, 7)), logits((10, 7))
    y = torch.randint(0, 7, (10,))
    # beta=0, alpha=1: the TCKD part alone, a binary KL on (p_y, 1 - p_y)
    ps, pt = torch.softmax(s.double() / 2, -1), torch.softmax(t.double() / 2, -1)
    b_s = torch.stack([ps[range(10), y], 1 - ps[range(10), y]], -1)
    b_t = torch.stack([pt[range(10), y], 1 - pt[range(10), y]], -1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(-1).mean() * 4
    assert dkd_loss(s, t, y, alpha=1.0, beta=0.0, temperature=2.0).item() == pytest.approx(tckd.item(), rel=1e-5)
    # KD = TCKD + (1 - p^t_y) NCKD, per sample (the paper's equation 1): one sample at a time
    for i in range(3):
        one = slice(i, i + 1)
        nckd = dkd_loss(s[one], t[one], y[one], alpha=0.0, beta=1.0, temperature=2.0)
        tck = dkd_loss(s[one], t[one], y[one], alpha=1.0, beta=0.0, temperature=2.0)
        kd = kd_loss(s[one], t[one], 2.0)
        assert kd.item() == pytest.approx((tck + (1 - pt[i, y[i]].item()) * nckd).item(), rel=1e-5)


def test_dkd_bf16_and_errors():
    s, t = logits((8, 5)).bfloat16(), logits((8, 5)).bfloat16()
    y = torch.randint(0, 5, (8,))
    out = dkd_loss(s, t, y)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref_dkd(s.float(), t.float(), y, 1.0, 8.0, 4.0), rel=1e-6)
    with pytest.raises(TypeError, match="integer class indices"):
        dkd_loss(s, t, y.float())
    with pytest.raises(ValueError, match=r"targets in \[0, 5\)"):
        dkd_loss(s, t, torch.full((8,), 5))
    with pytest.raises(ValueError, match="Expected `mask` of shape"):
        dkd_loss(s, t, y, mask=torch.ones(3, dtype=torch.bool))


# ------------------------------------------------------------------ DIST
@pytest.mark.parametrize("shape", [(8, 10), (3, 5, 7)])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dist_matches_float64_reference(shape, T):
    s, t = logits(shape), logits(shape)
    assert dist_loss(s, t, beta=2.0, gamma=0.5, temperature=T).item() == pytest.approx(
        ref_dist(s, t, 2.0, 0.5, T), rel=1e-6, abs=1e-6
    )
    mask = torch.rand(shape[:-1]) > 0.3
    mask.view(-1)[:2] = True
    assert dist_loss(s, t, temperature=T, mask=mask).item() == pytest.approx(ref_dist(s, t, 1.0, 1.0, T, mask), rel=1e-6, abs=1e-6)


def test_dist_of_identical_outputs_is_zero_and_all_masked_is_a_connected_zero():
    t = logits((16, 10))
    assert dist_loss(t, t.clone()).item() == pytest.approx(0.0, abs=1e-5)
    x = torch.randn(2, 3, requires_grad=True)
    zero = dist_loss(x, torch.randn(2, 3), mask=torch.zeros(2, dtype=torch.bool))
    zero.backward()
    assert zero.item() == 0.0 and torch.all(x.grad == 0)


# ------------------------------------------------------------------ standardisation
def test_standardize_is_a_zscore_and_applies_to_every_logit_loss():
    s, t = logits((6, 8)), logits((6, 8)) * 10 + 3
    z = standardize_logits(s).double()
    assert torch.allclose(z.mean(-1), torch.zeros(6, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(z.std(-1), torch.ones(6, dtype=torch.float64), atol=1e-5)
    # scale and shift of the teacher's logits no longer matter
    assert kd_loss(s, t, 2.0, standardize=True).item() == pytest.approx(
        kd_loss(s, (t - 3) / 10, 2.0, standardize=True).item(), rel=1e-5
    )
    # 3e-6: the z-scores add float32 rounding of their own (mean, std), amplified by T^2 (and beta for DKD)
    expected = ref_pointwise(s, t, 2.0, lambda ps, pt: kl(pt, ps), standardize=True)
    assert kd_loss(s, t, 2.0, standardize=True).item() == pytest.approx(expected, rel=3e-6)
    assert reverse_kl_loss(s, t, temperature=2.0, standardize=True).item() == pytest.approx(
        ref_pointwise(s, t, 2.0, ref_reverse, standardize=True), rel=3e-6
    )
    y = torch.randint(0, 8, (6,))
    assert dkd_loss(s, t, y, standardize=True).item() == pytest.approx(ref_dkd(s, t, y, 1.0, 8.0, 4.0, standardize=True), rel=3e-6)
    zs, zt = standardize_logits(s), standardize_logits(t)
    assert soft_mse_loss(s, t, standardize=True).item() == pytest.approx(soft_mse_loss(zs, zt).item(), rel=1e-6)
    assert dist_loss(s, t, standardize=True).item() == pytest.approx(dist_loss(zs, zt).item(), rel=1e-5)


# ------------------------------------------------------------------ options are constructor arguments
def test_objects_pass_their_options_and_the_shared_settings_to_the_functions():
    s, t, y = logits((5, 6)), logits((5, 6)), torch.randint(0, 6, (5,))
    assert DKDLoss(2.0, beta=3.0)(s, t, y).item() == pytest.approx(dkd_loss(s, t, y, beta=3.0, temperature=2.0).item())
    assert DKDLoss(2.0, beta=3.0)(s, t, y).item() == pytest.approx(ref_dkd(s, t, y, 1.0, 3.0, 2.0), rel=3e-6)
    jsd = JSDLoss(2.0, beta=0.2, scale_by_t2=False)
    assert jsd(s, t).item() == pytest.approx(jsd_loss(s, t, beta=0.2, temperature=2.0, scale_by_t2=False).item())
    assert jsd(s, t).item() == pytest.approx(ref_pointwise(s, t, 2.0, ref_jsd(0.2), t2=False), rel=1e-6, abs=1e-6)
    # an option is an attribute the annealing callback may set (`soft_loss.beta`): the next call uses it
    dkd = DKDLoss(2.0, beta=3.0)
    dkd.beta = 5.0
    assert dkd(s, t, y).item() == pytest.approx(ref_dkd(s, t, y, 1.0, 5.0, 2.0), rel=3e-6)


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: DKDLoss(gamma=1), "gamma"),  # DIST's option, not DKD's
        (lambda: DISTLoss(alpha=1.0), "alpha"),
        (lambda: JSDLoss(skew=0.1), "skew"),
        (lambda: SkewKLLoss(beta=0.5), "beta"),
        (lambda: ReverseKLLoss(beta=0.5), "beta"),
        (lambda: KDLoss(beta=8.0), "beta"),
        (lambda: SoftMSELoss(temperature=2.0), "temperature"),  # no temperature at all
        (lambda: SoftMSELoss(scale_by_t2=False), "scale_by_t2"),
    ],
    ids=["dkd-gamma", "dist-alpha", "jsd-skew", "skew_kl-beta", "reverse_kl-beta", "kd-beta", "mse-temperature", "mse-scale_by_t2"],
)
def test_a_wrong_option_is_pythons_own_type_error(build, name):
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'"):
        build()


def test_options_are_keyword_only():
    with pytest.raises(TypeError, match="positional argument"):
        KDLoss(4.0, False)
    with pytest.raises(TypeError, match="positional argument"):
        DKDLoss(4.0, 1.0, 8.0)


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: DKDLoss(beta=-1.0), ValueError, r"Expected `beta` to be a finite number >= 0, but got -1.0"),
        (lambda: DKDLoss(alpha=math.nan), ValueError, r"Expected `alpha` to be a finite number >= 0, but got nan"),
        (lambda: DISTLoss(gamma=-0.5), ValueError, r"Expected `gamma` to be a finite number >= 0, but got -0.5"),
        (lambda: JSDLoss(beta=1.5), ValueError, r"Expected `beta` to be in \[0, 1\], but got 1.5"),  # 0 and 1: forward / reverse KL
        (lambda: SkewKLLoss(skew=1.0), ValueError, r"Expected `skew` to be in \[0, 1\), but got 1.0"),
        (lambda: ReverseKLLoss(0.0), ValueError, r"Expected `temperature` to be > 0, but got 0.0"),
        (lambda: KDLoss("4"), TypeError, r"Expected `temperature` to be a number or a LearnableTemperature, but got str"),
        (lambda: KDLoss(True), TypeError, r"Expected `temperature` to be a number or a LearnableTemperature, but got bool"),
        (lambda: KDLoss(torch.tensor(4.0)), TypeError, r"a number or a LearnableTemperature, but got Tensor"),
    ],
    ids=["dkd-beta", "dkd-alpha-nan", "dist-gamma", "jsd-beta", "skew", "temperature-zero", "temperature-str",
         "temperature-bool", "temperature-tensor"],
)
def test_a_bad_value_raises_the_documented_error(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s, t: jsd_loss(s, t, beta=-0.1), r"Expected `beta` to be in \[0, 1\], but got -0.1"),
        (lambda s, t: skew_kl_loss(s, t, skew=1.0), r"Expected `skew` to be in \[0, 1\), but got 1.0"),
        (lambda s, t: reverse_kl_loss(s, t, temperature=0.0), "Expected `temperature` to be > 0"),
        (lambda s, t: dist_loss(s, t[:, :3]), "same shape"),
    ],
)
def test_bad_settings_name_the_setting(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(2, 4), torch.randn(2, 4))


# ------------------------------------------------------------------ CTKD
def test_gradient_reversal_flips_and_scales_the_gradient():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = reverse_gradient(x, 0.5)
    assert torch.equal(y, x)
    (3 * y).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-1.5, -1.5]))


def test_learnable_temperature_starts_where_asked_and_moves_against_the_loss():
    module = LearnableTemperature(4.0, t_min=1.0, t_range=20.0)
    assert module().item() == pytest.approx(4.0, rel=1e-6)
    s, t = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 3.0, 0.0]])
    assert module.grl_weight == 1.0
    T = module()
    loss = kd_loss(s, t, T)
    loss.backward()
    # gradient descent on theta moves T in the direction that *increases* the loss (reversed gradient)
    with torch.no_grad():
        stepped = LearnableTemperature(4.0)
        stepped.theta -= 0.1 * module.theta.grad
        assert kd_loss(s, t, stepped()).item() > loss.item()
    module.theta.grad = None
    module.grl_weight = 0.0  # the curriculum's start: T does not move
    kd_loss(s, t, module()).backward()
    assert module.theta.grad.item() == 0.0
    with pytest.raises(ValueError, match=r"initial temperature to be in \(1.0, 21.0\)"):
        LearnableTemperature(0.5)


# ------------------------------------------------------------------ the objects: module == functional twin == reference
REAL, PAD = 7, 3  # classes, then -inf columns in both models (a vocabulary padded from 7 to 10)
MASK = torch.tensor([[True, False, True], [True, True, False]])  # (B, S) positions that count


def ref_mse(s, t, mask=None, standardize=False):
    def z(row):
        if not standardize:
            return row
        mean = sum(row) / len(row)
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
        return [(v - mean) / (std + 1e-7) for v in row]

    values = [sum((x - y) ** 2 for x, y in zip(z(a), z(b))) / len(a) for a, b in zip(rows(s), rows(t))]
    return average(values, mask, 1.0)


def central_differences(f, x, h=1e-6):
    """The gradient of the float64 function ``f`` at ``x`` (float64) by central differences."""
    grad = torch.zeros_like(x)
    for i in range(x.numel()):
        up, down = x.clone(), x.clone()
        up.view(-1)[i] += h
        down.view(-1)[i] -= h
        grad.view(-1)[i] = (f(up) - f(down)) / (2 * h)
    return grad


# (object, its functional twin with the same options, the float64 reference); non-default options throughout
TWINS = {
    "kd": (
        lambda: KDLoss(2.5),
        lambda s, t, y, m: kd_loss(s, t, 2.5, mask=m),
        lambda s, t, y, m: ref_pointwise(s, t, 2.5, lambda ps, pt: kl(pt, ps), m),
    ),
    "kd-standardize-no-t2": (
        lambda: KDLoss(2.0, scale_by_t2=False, standardize=True),
        lambda s, t, y, m: kd_loss(s, t, 2.0, mask=m, scale_by_t2=False, standardize=True),
        lambda s, t, y, m: ref_pointwise(s, t, 2.0, lambda ps, pt: kl(pt, ps), m, standardize=True, t2=False),
    ),
    "dkd": (
        lambda: DKDLoss(2.0, alpha=0.5, beta=3.0),
        lambda s, t, y, m: dkd_loss(s, t, y, alpha=0.5, beta=3.0, temperature=2.0, mask=m),
        lambda s, t, y, m: ref_dkd(s, t, y, 0.5, 3.0, 2.0, m),
    ),
    "dist": (
        lambda: DISTLoss(2.0, beta=2.0, gamma=0.5),
        lambda s, t, y, m: dist_loss(s, t, beta=2.0, gamma=0.5, temperature=2.0, mask=m),
        lambda s, t, y, m: ref_dist(s, t, 2.0, 0.5, 2.0, m),
    ),
    "reverse_kl": (
        lambda: ReverseKLLoss(1.5),
        lambda s, t, y, m: reverse_kl_loss(s, t, temperature=1.5, mask=m),
        lambda s, t, y, m: ref_pointwise(s, t, 1.5, ref_reverse, m),
    ),
    "jsd": (
        lambda: JSDLoss(2.0, beta=0.3),
        lambda s, t, y, m: jsd_loss(s, t, beta=0.3, temperature=2.0, mask=m),
        lambda s, t, y, m: ref_pointwise(s, t, 2.0, ref_jsd(0.3), m),
    ),
    "skew_kl": (
        lambda: SkewKLLoss(2.0, skew=0.2),
        lambda s, t, y, m: skew_kl_loss(s, t, skew=0.2, temperature=2.0, mask=m),
        lambda s, t, y, m: ref_pointwise(s, t, 2.0, ref_skew(0.2), m),
    ),
    "mse": (
        lambda: SoftMSELoss(),
        lambda s, t, y, m: soft_mse_loss(s, t, mask=m),
        lambda s, t, y, m: ref_mse(s, t, m),
    ),
    "mse-standardize": (
        lambda: SoftMSELoss(standardize=True),
        lambda s, t, y, m: soft_mse_loss(s, t, mask=m, standardize=True),
        lambda s, t, y, m: ref_mse(s, t, m, standardize=True),
    ),
}


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("case", list(TWINS))
def test_module_equals_its_functional_twin_and_the_float64_reference(case, padded):
    build, functional, reference = TWINS[case]
    s, t = logits((2, 3, REAL)), logits((2, 3, REAL))
    y = torch.randint(0, REAL, (2, 3))
    y[1, 0] = -100  # a valid position without a label: DKD leaves it out, the others ignore targets
    if padded:
        pad = torch.full((2, 3, PAD), -math.inf)
        s_in, t_in = torch.cat([s, pad], dim=-1), torch.cat([t, pad], dim=-1)
    else:
        s_in, t_in = s, t
    a, b = s_in.clone().requires_grad_(True), s_in.clone().requires_grad_(True)
    by_module = build()(a, t_in, y, mask=MASK)
    by_function = functional(b, t_in, y, MASK)
    by_module.backward()
    by_function.backward()
    # forward is one call of the function: bit for bit, values and gradients
    assert torch.equal(by_module, by_function)
    assert torch.equal(a.grad, b.grad)
    # both against the float64 reference on the unpadded logits: a padded class is absent
    expected = reference(s, t, y, MASK)
    assert by_module.item() == pytest.approx(expected, rel=2e-5, abs=1e-6)
    assert torch.isfinite(a.grad).all()
    assert torch.equal(a.grad[..., REAL:], torch.zeros_like(a.grad[..., REAL:]))
    assert torch.equal(a.grad[~MASK], torch.zeros_like(a.grad[~MASK]))  # a masked position gets no gradient
    expected_grad = central_differences(lambda x: reference(x, t, y, MASK), s.double())
    scale = expected_grad.abs().max().item()
    torch.testing.assert_close(a.grad[..., :REAL].double(), expected_grad, rtol=1e-4, atol=1e-4 * scale)


# ------------------------------------------------------------------ what a loss needs, declared on its class
NEEDS = {  # needs_targets, uses_temperature, accepts_topk, compares_distributions
    KDLoss: (False, True, True, True),
    DKDLoss: (True, True, False, True),
    DISTLoss: (False, True, False, True),
    ReverseKLLoss: (False, True, False, True),
    JSDLoss: (False, True, False, True),
    SkewKLLoss: (False, True, False, True),
    SoftMSELoss: (False, False, False, False),
}


@pytest.mark.parametrize("cls", list(NEEDS), ids=lambda c: c.__name__)
def test_class_attributes_say_what_each_loss_needs(cls):
    assert issubclass(cls, LogitLoss)
    names = ("needs_targets", "uses_temperature", "accepts_topk", "compares_distributions")
    assert tuple(getattr(cls, n) for n in names) == NEEDS[cls]
    assert tuple(getattr(cls(), n) for n in names) == NEEDS[cls]  # the instance reads the class's
    assert all(type(getattr(cls, n)) is bool for n in names)


def test_dkd_without_targets_raises():
    s, t = logits((4, 5)), logits((4, 5))
    with pytest.raises(ValueError, match=r"DKDLoss needs a target class per position \(`targets`\), but got None"):
        DKDLoss()(s, t)
    with pytest.raises(ValueError, match="needs a target class"):
        DKDLoss()(s, t, mask=torch.ones(4, dtype=torch.bool))


def test_kd_accepts_topk_teacher_targets():
    # KDLoss.accepts_topk: with every class kept, top-k targets are the full teacher
    s, t = logits((6, 8)), logits((6, 8))
    expected = ref_pointwise(s, t, 2.0, lambda ps, pt: kl(pt, ps))
    assert KDLoss(2.0)(s, TopKLogits.from_logits(t, 8)).item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ the learnable temperature (CTKD)
def test_learnable_temperature_starts_at_ctkds_theta_of_one():
    module = LearnableTemperature()
    assert module.theta.item() == 1.0  # CTKD's code initialises the parameter to one
    assert module().item() == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)  # 1 + 20 sigmoid(1) = 15.62
    assert module.grl_weight == 1.0
    other = LearnableTemperature(t_min=2.0, t_range=10.0)
    assert other().item() == pytest.approx(2 + 10 / (1 + math.exp(-1)), rel=1e-6)


@pytest.mark.parametrize("grl_weight", [1.0, 0.3])
def test_learnable_temperature_gradient_is_the_float64_derivative_times_minus_grl_weight(grl_weight):
    s, t = logits((6, 10)), logits((6, 10))
    sigma = 1 / (1 + math.exp(-1.0))
    T, dT_dtheta = 1 + 20 * sigma, 20 * sigma * (1 - sigma)  # at CTKD's start, theta = 1
    for scale_by_t2, tolerance in ((False, dict(rel=1e-5)), (True, dict(rel=1e-2))):
        temperature = LearnableTemperature(grl_weight=grl_weight)
        KDLoss(temperature, scale_by_t2=scale_by_t2)(s, t).backward()
        h = 1e-5

        def ref(T_):
            return ref_pointwise(s, t, T_, lambda ps, pt: kl(pt, ps), t2=scale_by_t2)

        dL_dtheta = (ref(T + h) - ref(T - h)) / (2 * h) * dT_dtheta
        # Tolerances: without T^2 float32 is within 4e-7 (100 seeds); T^2 KL at T = 15.6 is a small
        # difference of two larger terms (2T KL + T^2 dKL/dT), where float32 is off by up to 3e-3.
        assert temperature.theta.grad.item() == pytest.approx(-grl_weight * dL_dtheta, **tolerance)
        assert temperature.theta.grad.item() * dL_dtheta < 0  # reversed: descent on theta increases the loss


@pytest.mark.parametrize("cls", [c for c in NEEDS if c.uses_temperature], ids=lambda c: c.__name__)
def test_a_loss_holding_a_learnable_temperature_trains_theta_and_refuses_to_be_set(cls):
    s, t, y = logits((5, 6)), logits((5, 6)), torch.randint(0, 6, (5,))
    loss = cls(LearnableTemperature(3.0))
    assert [name for name, _ in loss.named_parameters()] == ["temperature.theta"]
    assert list(loss.state_dict()) == ["temperature.theta"]
    assert isinstance(loss.temperature, LearnableTemperature)
    with pytest.raises(RuntimeError, match=r"The temperature is learned \(a LearnableTemperature\), so it cannot be set"):
        loss.temperature = 2.0
    assert isinstance(loss.temperature, LearnableTemperature)  # the refusal changed nothing
    # the value is the loss at the temperature's current value, and theta gets a gradient
    out = loss(s, t, y)
    assert out.item() == pytest.approx(cls(3.0)(s, t, y).item(), rel=1e-5)
    out.backward()
    assert loss.temperature.theta.grad is not None and loss.temperature.theta.grad.item() != 0.0
    # a float temperature can be set (annealed), and replaced by a learned one
    plain = cls(3.0)
    plain.temperature = 2.0
    assert plain.temperature == 2.0 and plain(s, t, y).item() == cls(2.0)(s, t, y).item()
    with pytest.raises(ValueError, match=r"Expected `temperature` to be > 0, but got -1.0"):
        plain.temperature = -1.0
    assert plain.temperature == 2.0
    plain.temperature = LearnableTemperature()
    assert [name for name, _ in plain.named_parameters()] == ["temperature.theta"]


def test_soft_mse_has_no_temperature():
    loss = SoftMSELoss()
    with pytest.raises(AttributeError, match="SoftMSELoss has no temperature"):
        loss.temperature = 2.0
    with pytest.raises(AttributeError, match="SoftMSELoss has no temperature"):
        loss.temperature = LearnableTemperature()
    assert list(loss.parameters()) == []
    assert not hasattr(loss, "temperature")  # not even to read: nothing can anneal or log one


# ------------------------------------------------------------------ DIST's Pearson correlation is the authors'
def _authors_pearson(a, b):
    """DIST's official code: ``(a*b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)`` on the centred rows."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)


def _cosine_pearson(a, b):
    """The same with ``torch.cosine_similarity``, which clamps each norm to eps instead."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return torch.cosine_similarity(a, b, dim=1, eps=1e-8)


def _ref_dist_rows(s, t, beta, gamma, pearson_):
    ps, pt = torch.softmax(s.double(), dim=1), torch.softmax(t.double(), dim=1)  # T = 1
    return beta * (1 - pearson_(ps, pt).mean()) + gamma * (1 - pearson_(ps.T, pt.T).mean())


@pytest.mark.parametrize(("beta", "gamma"), [(1.0, 0.0), (1.0, 1.0), (0.0, 1.0)], ids=["inter", "both", "intra"])
def test_dist_pearson_adds_eps_to_the_norm_product_as_the_authors_code(beta, gamma):
    # 32,000 classes near uniform: centred probabilities ~1e-6, so each row's norm product (~1e-7)
    # is comparable with eps = 1e-8, and where eps sits changes the loss
    s = torch.randn(4, 32_000) * 0.05
    t = s + torch.randn(4, 32_000) * 0.025  # correlated with the student
    x = s.clone().requires_grad_(True)
    out = DISTLoss(beta=beta, gamma=gamma)(x, t)
    out.backward()
    assert out.item() == dist_loss(s, t, beta=beta, gamma=gamma).item()
    s64 = s.double().requires_grad_(True)
    expected = _ref_dist_rows(s64, t, beta, gamma, _authors_pearson)
    expected.backward()
    rel = 1e-5  # float32 is within 1.1e-6 of the reference (30 seeds)
    assert out.item() == pytest.approx(expected.item(), rel=rel)
    scale = s64.grad.abs().max().item()
    torch.testing.assert_close(x.grad.double(), s64.grad, rtol=1e-4, atol=1e-4 * scale)  # within 1.1e-5 of scale
    # the difference is real: the cosine_similarity variant is off by far more than the tolerance
    clamped = _ref_dist_rows(s, t, beta, gamma, _cosine_pearson).item()
    assert abs(clamped - expected.item()) > 1000 * rel * abs(expected.item())
