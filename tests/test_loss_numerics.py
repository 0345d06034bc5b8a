"""Bad inputs to the logit losses: -inf (padded) classes, empty and all-masked batches, bf16,
non-finite temperatures and weights. Values against float64 references written here with plain
torch math on the *unpadded* logits: a class masked with -inf in both models must be absent."""

import math

import pytest
import torch

from lightning_kd.losses import (
    DISTLoss,
    DKDLoss,
    JSDLoss,
    KDLoss,
    LearnableTemperature,
    ReverseKLLoss,
    SkewKLLoss,
    TopKLogits,
    cross_entropy_loss,
    dist_loss,
    dkd_loss,
    jsd_loss,
    kd_loss,
    reverse_kl_loss,
    skew_kl_loss,
    soft_mse_loss,
    standardize_logits,
)

REAL, PAD = 7, 3  # classes, then -inf columns (a vocabulary padded from 7 to 10)


# ------------------------------------------------------------------ float64 references (unpadded logits)
def ref_standardize(z):
    mean = z.mean(dim=-1, keepdim=True)
    std = ((z - mean) ** 2).sum(dim=-1, keepdim=True).div(z.shape[-1] - 1).sqrt()
    return (z - mean) / (std + 1e-7)


def ref_probs(z, T, standardize):
    z = ref_standardize(z) if standardize else z
    e = torch.exp(z / T - (z / T).max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def ref_kl(p, q):  # rows (N, C) -> (N,)
    return (p * (torch.log(p) - torch.log(q))).sum(dim=-1)


def ref_mean(values, keep):
    return values[keep].sum() / max(int(keep.sum()), 1)


def ref_loss(name, s, t, y, T, keep, standardize):
    """The loss on float64 (N, C) rows ``s``, ``t``, averaged over the rows where ``keep``."""
    if name == "ce":
        log_p = s - torch.logsumexp(s, dim=-1, keepdim=True)
        return ref_mean(-log_p.gather(1, y.clamp(min=0)[:, None])[:, 0], keep & (y != -100))
    if name == "mse":
        if standardize:
            s, t = ref_standardize(s), ref_standardize(t)
        return ref_mean(((s - t) ** 2).mean(dim=-1), keep)
    ps, pt = ref_probs(s, T, standardize), ref_probs(t, T, standardize)
    if name == "kd":
        per_row = ref_kl(pt, ps)
    elif name == "reverse_kl":
        per_row = ref_kl(ps, pt)
    elif name == "jsd":  # beta = 0.5
        m = 0.5 * pt + 0.5 * ps
        per_row = 0.5 * ref_kl(pt, m) + 0.5 * ref_kl(ps, m)
    elif name == "skew_kl":  # skew = 0.1
        per_row = ref_kl(pt, 0.1 * pt + 0.9 * ps)
    elif name == "dkd":  # alpha = 1, beta = 8
        onehot = torch.nn.functional.one_hot(y.clamp(min=0), s.shape[-1]).bool()
        keep = keep & (y != -100)

        def parts(p):
            py = p[onehot]
            others = p.masked_select(~onehot).reshape(p.shape[0], -1)
            return torch.stack([py, 1 - py], dim=-1), others / (1 - py)[:, None]

        (bt, ot), (bs, os_) = parts(pt), parts(ps)
        per_row = 1.0 * ref_kl(bt, bs) + 8.0 * ref_kl(ot, os_)
    elif name == "dist":  # beta = gamma = 1
        def corr(a, b):
            a, b = a - a.mean(dim=-1, keepdim=True), b - b.mean(dim=-1, keepdim=True)
            return (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-8)  # the authors' eps

        inter = 1 - ref_mean(corr(ps, pt), keep)
        intra = 1 - corr(ps[keep].T, pt[keep].T).mean()
        return T * T * (inter + intra)
    return T * T * ref_mean(per_row, keep)


# ------------------------------------------------------------------ the losses under test, one call shape
def call(name, s, t, y, T, mask, standardize):
    if name == "ce":
        return cross_entropy_loss(s, y if mask is None else y.masked_fill(~mask, -100))
    if name == "mse":
        return soft_mse_loss(s, t, mask=mask, standardize=standardize)
    if name == "kd":
        return kd_loss(s, t, T, mask=mask, standardize=standardize)
    if name == "dkd":
        return dkd_loss(s, t, y, temperature=T, mask=mask, standardize=standardize)
    fn = {"reverse_kl": reverse_kl_loss, "jsd": jsd_loss, "skew_kl": skew_kl_loss, "dist": dist_loss}[name]
    return fn(s, t, temperature=T, mask=mask, standardize=standardize)


LOSSES = ["kd", "mse", "reverse_kl", "jsd", "skew_kl", "dkd", "dist", "ce"]
TEMPERED = ["kd", "reverse_kl", "jsd", "skew_kl", "dkd", "dist"]


def _cases():
    for name in LOSSES:
        for T in (1.0, 4.0):
            if name in ("mse", "ce") and T != 1.0:
                continue  # no temperature
            for standardize in (False, True):
                if name == "ce" and standardize:
                    continue
                for masked in (False, True):
                    tag = f"{name}-T{T:g}{'-standardize' if standardize else ''}{'-mask' if masked else ''}"
                    yield pytest.param(name, T, standardize, masked, id=tag)


def padded_batch(shape, dtype=torch.float32):
    """Student, teacher (``shape + (REAL,)``), the same with PAD -inf columns, targets in [0, REAL)."""
    s, t = torch.randn(*shape, REAL) * 2, torch.randn(*shape, REAL) * 2
    s, t = s.to(dtype), t.to(dtype)
    pad = torch.full((*shape, PAD), -math.inf, dtype=dtype)
    y = torch.randint(0, REAL, shape)
    return s, t, torch.cat([s, pad], dim=-1), torch.cat([t, pad], dim=-1), y


def loss_and_grad(name, s, t, y, T, mask, standardize):
    s = s.detach().clone().requires_grad_(True)
    loss = call(name, s, t, y, T, mask, standardize)
    loss.backward()
    return loss, s.grad


# ------------------------------------------------------------------ -inf classes masked in both models
@pytest.mark.parametrize(("name", "T", "standardize", "masked"), list(_cases()))
def test_padded_classes_are_absent(name, T, standardize, masked):
    shape = (2, 3) if masked else (6,)  # sequences with a mask, classification without
    s, t, s_pad, t_pad, y = padded_batch(shape)
    mask = torch.tensor([[True, False, True], [True, True, False]]) if masked else None

    loss_pad, grad_pad = loss_and_grad(name, s_pad, t_pad, y, T, mask, standardize)
    loss, grad = loss_and_grad(name, s, t, y, T, mask, standardize)

    keep = torch.ones(y.numel(), dtype=torch.bool) if mask is None else mask.reshape(-1)
    rows = lambda x: x.double().reshape(-1, x.shape[-1])  # noqa: E731
    expected = ref_loss(name, rows(s), rows(t), y.reshape(-1), T, keep, standardize)
    # Tolerances: padded and unpadded logits take different float32 reductions (10 vs 7 columns),
    # so they agree to rounding, not bit for bit. Largest gaps over 200 seeds: values 1.3e-6
    # relative (7.6e-6 with `standardize`, whose masked two-pass variance is not torch.std's
    # algorithm), gradients 2e-5 of their largest entry; each side is as far from float64.
    # Keeping the padded columns instead (e.g. DIST's zeros) moves the loss by 10-100 %.
    assert loss_pad.item() == pytest.approx(expected.item(), rel=2e-5)
    assert loss_pad.item() == pytest.approx(loss.item(), rel=2e-5 if standardize else 3e-6)

    assert torch.isfinite(grad_pad).all()
    assert torch.equal(grad_pad[..., REAL:], torch.zeros_like(grad_pad[..., REAL:]))
    scale = grad.abs().max().item()
    torch.testing.assert_close(grad_pad[..., :REAL], grad, rtol=1e-4, atol=1e-4 * scale)
    s64 = rows(s).requires_grad_(True)
    ref_loss(name, s64, rows(t), y.reshape(-1), T, keep, standardize).backward()
    torch.testing.assert_close(grad_pad.double().reshape(-1, REAL + PAD)[:, :REAL], s64.grad, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("name", LOSSES)
def test_padded_bf16_logits_match_their_float32_values(name):
    s, t, s_pad, t_pad, y = padded_batch((6,), torch.bfloat16)
    T = 1.0 if name in ("mse", "ce") else 4.0
    loss_pad, grad_pad = loss_and_grad(name, s_pad, t_pad, y, T, None, False)
    loss, grad = loss_and_grad(name, s.float(), t.float(), y, T, None, False)  # the same values, unpadded
    assert loss_pad.dtype == torch.float32 and grad_pad.dtype == torch.bfloat16
    assert loss_pad.item() == pytest.approx(loss.item(), rel=3e-6)  # float32 math on both sides
    assert torch.isfinite(grad_pad).all() and not grad_pad[..., REAL:].any()
    # the gradient is rounded to bf16 (8 bits of mantissa)
    torch.testing.assert_close(grad_pad[..., :REAL].float(), grad, rtol=1e-2, atol=1e-2 * grad.abs().max().item())


@pytest.mark.parametrize("k", [REAL, REAL + 1], ids=["k=real-classes", "k-includes-a-padded-class"])
@pytest.mark.parametrize("T", [1.0, 4.0], ids=["T1", "T4"])
def test_topk_teacher_of_a_padded_vocabulary_is_the_full_kd(k, T):
    s, t, s_pad, t_pad, y = padded_batch((6,))
    s_pad.requires_grad_(True)
    loss = kd_loss(s_pad, TopKLogits.from_logits(t_pad, k), T)  # every real class is in the top k: exact
    loss.backward()
    expected = ref_loss("kd", s.double(), t.double(), y, T, torch.ones(6, dtype=torch.bool), False)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-5)
    assert torch.isfinite(s_pad.grad).all() and not s_pad.grad[:, REAL:].any()


def test_learned_temperature_gets_the_unpadded_gradient():
    s, t, s_pad, t_pad, _ = padded_batch((6,))
    temperature = LearnableTemperature(4.0)
    KDLoss(temperature)(s_pad, t_pad).backward()
    # float64 reference on the unpadded logits; the gradient reversal flips the sign
    theta = temperature.theta.detach().double().requires_grad_(True)
    T = 1.0 + 20.0 * torch.sigmoid(theta)
    ps, pt = torch.softmax(s.double() / T, dim=-1), torch.softmax(t.double() / T, dim=-1)
    (T**2 * ref_kl(pt, ps).mean()).backward()
    # a small difference of larger terms: float32 is off by up to 3e-6 (200 seeds), padded or not
    assert temperature.theta.grad.item() == pytest.approx(-theta.grad.item(), abs=2e-5)


def test_skew_zero_on_padded_logits_is_forward_kl():
    # skew = 0 puts -inf into every mixture term (log 0), besides the padded classes
    s, t, s_pad, t_pad, y = padded_batch((6,))
    s_pad.requires_grad_(True)
    loss = skew_kl_loss(s_pad, t_pad, skew=0.0, temperature=2.0)
    loss.backward()
    expected = ref_loss("kd", s.double(), t.double(), y, 2.0, torch.ones(6, dtype=torch.bool), False)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-5)
    assert torch.isfinite(s_pad.grad).all() and not s_pad.grad[:, REAL:].any()


def test_standardize_ignores_padding_and_keeps_it_minus_inf():
    z = torch.tensor([[1.0, 2.0, 4.0, -math.inf, -math.inf]])
    out = standardize_logits(z)
    assert out[0, 3:].tolist() == [-math.inf, -math.inf]
    torch.testing.assert_close(out[:, :3], ref_standardize(z[:, :3].double()).float())


def test_mse_with_a_class_minus_inf_in_one_model_only_is_infinite():
    s, t = torch.zeros(2, 4), torch.zeros(2, 4)
    s[0, 3] = -math.inf  # not masked in the teacher: infinitely far, not silently ignored
    assert soft_mse_loss(s, t).item() == math.inf


# ------------------------------------------------------------------ no position, or none valid
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("batch", ["empty", "all-masked", "all-masked-padded"])
def test_no_valid_position_gives_a_graph_connected_zero(name, batch):
    if batch == "empty":
        s, t, y, mask = torch.randn(0, 5), torch.randn(0, 5), torch.zeros(0, dtype=torch.long), None
    else:
        s, t, s_pad, t_pad, y = padded_batch((4,))
        if batch == "all-masked-padded":  # the -inf columns must not turn the zero into NaN
            s, t = s_pad, t_pad
        mask = torch.zeros(4, dtype=torch.bool)
    s.requires_grad_(True)
    loss = call(name, s, t, y, 2.0, mask, False)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_dkd_with_no_labeled_position_gives_a_graph_connected_zero():
    s = torch.randn(4, 5, requires_grad=True)
    loss = dkd_loss(s, torch.randn(4, 5), torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


# ------------------------------------------------------------------ refused settings
BAD_TEMPERATURES = [
    pytest.param(math.inf, r"Expected `temperature` to be a finite number > 0, but got inf", id="inf"),
    pytest.param(math.nan, r"Expected `temperature` to be a finite number > 0, but got nan", id="nan"),
    pytest.param(torch.tensor(math.inf), r"a finite number > 0, but got inf", id="tensor-inf"),
    pytest.param(torch.tensor(math.nan), r"a finite number > 0, but got nan", id="tensor-nan"),
    pytest.param(torch.tensor(0.0), r"Expected `temperature` to be > 0, but got 0.0", id="tensor-zero"),
    pytest.param(torch.tensor([2.0, -1.0]), r"Expected `temperature` to be > 0, but got -1.0", id="tensor-negative-entry"),
]


@pytest.mark.parametrize(("temperature", "match"), BAD_TEMPERATURES)
@pytest.mark.parametrize("name", TEMPERED)
def test_bad_temperature_is_refused(name, temperature, match):
    s, t = torch.randn(2, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match=match):
        call(name, s, t, torch.tensor([0, 1]), temperature, None, False)


TEMPERED_OBJECTS = [KDLoss, DKDLoss, DISTLoss, ReverseKLLoss, JSDLoss, SkewKLLoss]


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("cls", TEMPERED_OBJECTS, ids=lambda c: c.__name__)
def test_kd_module_refuses_an_infinite_temperature(cls, value):
    # every loss object, at construction and when the temperature is set (annealed) later
    match = rf"Expected `temperature` to be a finite number > 0, but got {value}"
    with pytest.raises(ValueError, match=match):
        cls(value)
    loss = cls(2.0)
    with pytest.raises(ValueError, match=match):
        loss.temperature = value
    assert loss.temperature == 2.0


def test_constant_tensor_temperature_is_read_and_equals_the_float():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    assert kd_loss(s, t, torch.tensor(3.0)).item() == kd_loss(s, t, 3.0).item()


def test_learned_temperature_is_not_read():
    # requires grad: left to its parametrisation (reading it would sync the device), so even -1 is used as is
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    assert kd_loss(s, t, torch.tensor(-1.0, requires_grad=True)).item() == pytest.approx(kd_loss(-s, -t, 1.0).item(), rel=1e-6)


def _dkd(**options):
    return lambda s, t, y: dkd_loss(s, t, y, **options)


def _dist(**options):
    return lambda s, t, y: dist_loss(s, t, **options)


BAD_OPTIONS = [
    (_dkd(alpha=math.nan), r"Expected `alpha` to be a finite number >= 0, but got nan", "dkd-alpha-nan"),
    (_dkd(beta=math.inf), r"Expected `beta` to be a finite number >= 0, but got inf", "dkd-beta-inf"),
    (_dkd(beta=-1.0), r"Expected `beta` to be a finite number >= 0, but got -1.0", "dkd-beta-negative"),
    (_dist(beta=math.nan), r"Expected `beta` to be a finite number >= 0, but got nan", "dist-beta-nan"),
    (_dist(gamma=math.inf), r"Expected `gamma` to be a finite number >= 0, but got inf", "dist-gamma-inf"),
    (_dist(gamma=-0.5), r"Expected `gamma` to be a finite number >= 0, but got -0.5", "dist-gamma-negative"),
    (lambda s, t, y: jsd_loss(s, t, beta=math.nan), r"Expected `beta` to be in \[0, 1\], but got nan", "jsd-beta-nan"),
    (lambda s, t, y: jsd_loss(s, t, beta=math.inf), r"Expected `beta` to be in \[0, 1\], but got inf", "jsd-beta-inf"),
    (lambda s, t, y: skew_kl_loss(s, t, skew=math.nan), r"Expected `skew` to be in \[0, 1\), but got nan", "skew-nan"),
    (lambda s, t, y: skew_kl_loss(s, t, skew=-math.inf), r"Expected `skew` to be in \[0, 1\), but got -inf", "skew-minus-inf"),
    (lambda s, t, y: LearnableTemperature(t_min=math.inf), r"Expected `t_min` to be a finite number > 0, but got inf", "ctkd-t_min-inf"),
    (lambda s, t, y: LearnableTemperature(t_range=math.nan), r"Expected `t_range` to be a finite number > 0, but got nan", "ctkd-t_range-nan"),
    (lambda s, t, y: LearnableTemperature(math.nan), r"Expected the initial temperature to be in \(1.0, 21.0\)", "ctkd-initial-nan"),
    (lambda s, t, y: LearnableTemperature(grl_weight=math.nan), r"Expected `grl_weight` to be a finite number >= 0, but got nan", "ctkd-grl-nan"),
    (lambda s, t, y: LearnableTemperature(grl_weight=-1.0), r"Expected `grl_weight` to be a finite number >= 0, but got -1.0", "ctkd-grl-negative"),
    (lambda s, t, y: setattr(LearnableTemperature(), "grl_weight", math.inf), r"`grl_weight` to be a finite number >= 0, but got inf", "ctkd-grl-set-inf"),
    # the objects check their options at construction, with the functions' messages
    (lambda s, t, y: DKDLoss(alpha=math.nan), r"Expected `alpha` to be a finite number >= 0, but got nan", "DKDLoss-alpha-nan"),
    (lambda s, t, y: DKDLoss(beta=math.inf), r"Expected `beta` to be a finite number >= 0, but got inf", "DKDLoss-beta-inf"),
    (lambda s, t, y: DISTLoss(beta=math.nan), r"Expected `beta` to be a finite number >= 0, but got nan", "DISTLoss-beta-nan"),
    (lambda s, t, y: DISTLoss(gamma=-0.5), r"Expected `gamma` to be a finite number >= 0, but got -0.5", "DISTLoss-gamma-negative"),
    (lambda s, t, y: JSDLoss(beta=math.nan), r"Expected `beta` to be in \[0, 1\], but got nan", "JSDLoss-beta-nan"),
    (lambda s, t, y: SkewKLLoss(skew=math.inf), r"Expected `skew` to be in \[0, 1\), but got inf", "SkewKLLoss-skew-inf"),
]


@pytest.mark.parametrize(("call_", "match"), [pytest.param(c, m, id=i) for c, m, i in BAD_OPTIONS])
def test_non_finite_option_is_refused(call_, match):
    with pytest.raises(ValueError, match=match):
        call_(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 1]))
