"""Feature distillation on transformers: layouts, padded sequences, hooked layers that return tuples or ModelOutputs.

Each masked loss is checked against a float64 reference written here on the *unpadded* sequences,
with the padded positions of the batch filled with garbage (huge values, inf, NaN).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from lightning_kd.features import FeatureDistillation, FeatureTerm, feature_layout, token_mask
from lightning_kd.hooks import FeatureHooks, first_tensor
from lightning_kd.losses import ATLoss, FitNetLoss, RKDLoss, at_loss, fitnet_loss, rkd_loss
from lightning_kd.models import get_model

transformers = pytest.importorskip("transformers")
from transformers.modeling_outputs import BaseModelOutput  # noqa: E402

LENGTHS = [5, 2, 7, 1]  # valid tokens per sequence; S = 7


def padded(lengths: list[int], width: int, *, left: bool = False, fill: float = 1e30, dtype=torch.float32) -> tuple[list[Tensor], Tensor, Tensor]:
    """Sequences ``(n_b, width)`` in float64, the padded batch ``(B, S, width)`` with ``fill`` at padded positions, and the mask."""
    seqs = [torch.randn(n, width, dtype=torch.float64) for n in lengths]
    S = max(lengths)
    batch = torch.full((len(lengths), S, width), fill, dtype=torch.float64)
    mask = torch.zeros(len(lengths), S, dtype=torch.bool)
    for b, seq in enumerate(seqs):
        rows = slice(S - len(seq), S) if left else slice(0, len(seq))
        batch[b, rows], mask[b, rows] = seq, True
    return seqs, batch.to(dtype), mask


def garbage(batch: Tensor, mask: Tensor) -> Tensor:
    """Padded positions cycling through huge, -huge, inf and NaN."""
    junk = torch.tensor([1e30, -1e30, math.inf, math.nan], dtype=batch.dtype).repeat(batch.numel() // 4 + 1)[: batch.numel()]
    return torch.where(mask.unsqueeze(-1), batch, junk.view_as(batch))


# ------------------------------------------------------------------ float64 references on unpadded sequences
def ref_fitnet(ss: list[Tensor], ts: list[Tensor]) -> float:
    total = sum(((s.double() - t.double()) ** 2).sum().item() for s, t in zip(ss, ts))
    return total / sum(s.numel() for s in ss)


def ref_at(ss: list[Tensor], ts: list[Tensor], p: float = 2.0) -> float:
    def amap(f):  # per token: mean over the hidden dimension of |f|^p, L2-normalised over the sequence
        a = [sum(abs(v) ** p for v in token) / len(token) for token in f.double().tolist()]
        norm = math.sqrt(sum(v * v for v in a))
        return [v / max(norm, 1e-12) for v in a]

    total = sum((x - y) ** 2 for s, t in zip(ss, ts) for x, y in zip(amap(s), amap(t)))
    return total / sum(len(s) for s in ss)


def huber(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def ref_rkd(ss: list[Tensor], ts: list[Tensor], wd: float = 25.0, wa: float = 50.0) -> float:
    """Park et al. on the per-sequence means over valid tokens; empty sequences left out."""
    s = [x.double().mean(0).tolist() for x in ss if len(x)]
    t = [x.double().mean(0).tolist() for x in ts if len(x)]
    n = len(s)

    def dist(e):
        d = [[math.dist(e[i], e[j]) for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mean for v in row] for row in d]

    def angles(e):
        out = []
        for i, j, k in itertools.product(range(n), repeat=3):
            u, v = [a - b for a, b in zip(e[j], e[i])], [a - b for a, b in zip(e[k], e[i])]
            nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
            out.append(0.0 if nu == 0 or nv == 0 else sum(x * y for x, y in zip(u, v)) / (nu * nv))
        return out

    ds, dt = dist(s), dist(t)
    distance = sum(huber(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / n**2
    angle = sum(huber(a, b) for a, b in zip(angles(s), angles(t))) / n**3
    return wd * distance + wa * angle


# ------------------------------------------------------------------ the masked losses
@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
def test_masked_losses_equal_float64_references_on_the_unpadded_sequences(left):
    ss, s, mask = padded(LENGTHS, 6, left=left)
    ts, t, _ = padded(LENGTHS, 6, left=left)  # FitNet: equal widths (after the adapter)
    ts9, t9, _ = padded(LENGTHS, 9, left=left)  # AT and RKD: any width
    s, t, t9 = garbage(s, mask), garbage(t, mask), garbage(t9, mask)
    assert fitnet_loss(s, t, mask=mask).item() == pytest.approx(ref_fitnet(ss, ts), rel=1e-5)
    assert at_loss(s, t9, mask=mask).item() == pytest.approx(ref_at(ss, ts9), rel=1e-5)
    assert at_loss(s, t9, p=1.0, mask=mask).item() == pytest.approx(ref_at(ss, ts9, p=1.0), rel=1e-5)
    assert rkd_loss(s, t9, mask=mask).item() == pytest.approx(ref_rkd(ss, ts9), rel=1e-4)
    assert rkd_loss(s, t9, distance_weight=1.0, angle_weight=0.0, mask=mask).item() == pytest.approx(ref_rkd(ss, ts9, 1.0, 0.0), rel=1e-4)
    # the modules are the functions; an integer mask (an attention mask as tokenizers give it) is the bool one
    assert FitNetLoss()(s, t, mask=mask.long()).item() == fitnet_loss(s, t, mask=mask).item()
    assert ATLoss(p=2.0)(s, t9, mask=mask).item() == at_loss(s, t9, mask=mask).item()
    assert RKDLoss()(s, t9, mask=mask).item() == rkd_loss(s, t9, mask=mask).item()


def test_a_sequence_without_valid_tokens_is_left_out_and_padding_gets_no_gradient():
    lengths = [4, 0, 3, 2]
    ss, s, mask = padded(lengths, 5)
    ts, t, _ = padded(lengths, 5)
    s = garbage(s, mask).requires_grad_(True)
    for fn, ref in ((fitnet_loss, ref_fitnet), (at_loss, ref_at), (rkd_loss, ref_rkd)):
        loss = fn(s, garbage(t, mask), mask=mask)
        assert loss.item() == pytest.approx(ref(ss, ts), rel=1e-4), fn.__name__
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(grad).all() and (grad[~mask] == 0).all(), fn.__name__
        assert grad[mask].abs().sum() > 0, fn.__name__


def test_without_padding_the_masked_losses_are_the_plain_ones_on_the_same_tokens():
    s, t = torch.randn(3, 6, 8), torch.randn(3, 6, 8)
    full = torch.ones(3, 6, dtype=torch.bool)
    torch.testing.assert_close(fitnet_loss(s, t, mask=full), fitnet_loss(s, t))
    torch.testing.assert_close(at_loss(s, t, mask=full), at_loss(s.transpose(1, 2), t.transpose(1, 2)))  # tokens = positions
    torch.testing.assert_close(rkd_loss(s, t, mask=full), rkd_loss(s.mean(1), t.mean(1)))


def test_an_all_padded_batch_is_a_graph_connected_zero():
    s = torch.full((2, 3, 4), math.nan).requires_grad_(True)
    t = torch.full((2, 3, 5), math.inf)
    none = torch.zeros(2, 3, dtype=torch.bool)
    for loss in (fitnet_loss(s, torch.full_like(s, math.inf), mask=none), at_loss(s, t, mask=none), rkd_loss(s, t, mask=none)):
        assert loss.item() == 0.0 and loss.dtype == torch.float32
        (grad,) = torch.autograd.grad(loss, s)
        assert (grad == 0).all()


def test_masked_losses_gradcheck():
    _, s, mask = padded([3, 1, 2], 3, dtype=torch.float64, fill=0.0)
    _, t, _ = padded([3, 1, 2], 4, dtype=torch.float64, fill=0.0)
    s.requires_grad_(True)
    tol = dict(eps=1e-3, atol=1e-3, rtol=1e-2)  # the losses compute in float32, as every loss here does
    assert torch.autograd.gradcheck(lambda x: fitnet_loss(x, t[..., :3], mask=mask), (s,), **tol)
    assert torch.autograd.gradcheck(lambda x: at_loss(x, t, mask=mask), (s,), **tol)
    assert torch.autograd.gradcheck(lambda x: rkd_loss(x, t, mask=mask), (s,), **tol)


def test_bf16_sequences_give_float32_losses_close_to_fp32():
    _, s, mask = padded(LENGTHS, 16)
    _, t, _ = padded(LENGTHS, 16)
    s, t = torch.where(mask.unsqueeze(-1), s, 0.0), torch.where(mask.unsqueeze(-1), t, 0.0)
    for fn in (fitnet_loss, at_loss, rkd_loss):
        low = fn(s.bfloat16(), t.bfloat16(), mask=mask)
        assert low.dtype == torch.float32
        assert low.item() == pytest.approx(fn(s, t, mask=mask).item(), rel=0.05), fn.__name__


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: fitnet_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), mask=torch.ones(2, 3)), TypeError,
         r"Expected `mask` to be a bool tensor \(B, S\), True at the valid tokens, but got a torch.float32 tensor"),
        (lambda: at_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), mask=torch.ones(2, 4, dtype=torch.bool)), ValueError,
         r"attention transfer on sequence features \(B, S, D\) whose \(B, S\) is the mask's shape \(2, 4\), but got the student feature \(2, 3, 4\)"),
        (lambda: rkd_loss(torch.randn(2, 3, 4), torch.randn(2, 8), mask=torch.ones(2, 3, dtype=torch.bool)), ValueError,
         r"RKD on sequence features .* but got the teacher feature \(2, 8\)"),
    ],
    ids=["float_mask", "mask_of_another_length", "teacher_not_a_sequence"],
)
def test_bad_masks_are_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------ layouts
def test_feature_layout_rules():
    assert feature_layout("auto", (2, 7, 32), (2, 7)) == "sequence"
    assert feature_layout("auto", (2, 7, 32), None) == "channels_first"  # no mask: as before sequences existed
    assert feature_layout("auto", (2, 32), (2, 7)) == "channels_first"  # a pooled vector
    assert feature_layout("auto", (2, 8, 4, 4), (2, 7)) == "channels_first"
    assert feature_layout("channels_first", (2, 7, 32), (2, 7)) == "channels_first"
    assert feature_layout("sequence", (2, 7, 32), None) == "sequence"
    with pytest.raises(ValueError, match=r"The student feature of 'conv' has shape \(2, 16, 7\), which does not start with the token mask's "
                                         r"\(B, S\) = \(2, 6\).* Set the term's `layout`: 'channels_first' for a conv map"):
        feature_layout("auto", (2, 16, 7), (2, 6), where="the student feature of 'conv'")
    with pytest.raises(ValueError, match=r"Expected the feature to be a sequence \(B, S, D\) with \(B, S\) = the token mask's \(2, 6\)"):
        feature_layout("sequence", (2, 7, 32), (2, 6))
    with pytest.raises(ValueError, match=r"Expected the feature to be a sequence \(B, S, D\) \(layout='sequence'\), but got \(2, 32\)"):
        feature_layout("sequence", (2, 32), None)


def test_feature_term_layout_option():
    term = FeatureTerm(FitNetLoss(), "a", "b", layout="sequence")
    assert repr(term).endswith("weight=1.0, layout='sequence')") and term.accepts_mask
    assert "layout" not in repr(FeatureTerm(FitNetLoss(), "a", "b"))  # the default: checkpoints of older runs keep their record
    with pytest.raises(ValueError, match=r"Unknown feature `layout` 'channels_last'. Expected one of auto, channels_first, sequence"):
        FeatureTerm(ATLoss(), "a", "b", layout="channels_last")


# ------------------------------------------------------------------ hooked layers that return tuples, dicts, ModelOutputs
class Returns(nn.Module):
    """A layer returning ``wrap(hidden)``: a tuple as older transformers blocks do, a dict, a ModelOutput..."""

    def __init__(self, wrap):
        super().__init__()
        self.proj, self.wrap = nn.Linear(4, 4), wrap

    def forward(self, x):
        return self.wrap(self.proj(x))


class Net(nn.Module):
    def __init__(self, wrap):
        super().__init__()
        self.block = Returns(wrap)

    def forward(self, x):
        return self.block(x)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda h: (h, None, torch.zeros(1)),
        lambda h: [None, (h,)],
        lambda h: BaseModelOutput(last_hidden_state=h, hidden_states=(torch.zeros(1), h + 1)),
        lambda h: BaseModelOutput(hidden_states=(torch.zeros(1), h)),
        lambda h: {"logits": h, "attentions": None},
    ],
    ids=["tuple", "nested", "model_output", "hidden_states_only", "dict"],
)
def test_hooked_outputs_are_unwrapped_to_the_hidden_states(wrap):
    model = Net(wrap)
    x = torch.randn(2, 3, 4)
    with FeatureHooks(model, ["block"]) as hooks:
        model(x)
        torch.testing.assert_close(hooks["block"], model.block.proj(x))


def test_a_hooked_output_without_a_tensor_is_an_error_naming_the_layer_and_the_type():
    model = Net(lambda h: ("text", None))
    with FeatureHooks(model, ["block"]), pytest.raises(TypeError, match=r"Layer 'block' of Net returned tuple, in which a feature hook finds no tensor"):
        model(torch.randn(2, 4))
    model = Net(lambda h: h)
    with FeatureHooks(model, ["block"], capture="input"), pytest.raises(TypeError, match="Layer 'block' of Net was called without a tensor among its positional arguments"):
        model.block(x=torch.randn(2, 4))
    assert first_tensor(BaseModelOutput()) is None and first_tensor({"hidden_states": None, "n": 3}) is None


# ------------------------------------------------------------------ FeatureDistillation on HF models
def gpt2(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=width, n_head=2, vocab_size=64, n_positions=16, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(config).eval()


def llama(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=width, intermediate_size=2 * width, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(config).eval()


def token_batch(lengths: list[int]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Right-padded ids (pad id 0), their mask, and the unpadded rows."""
    rows = [torch.randint(3, 64, (n,)) for n in lengths]
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, : len(row)], mask[b, : len(row)] = row, True
    return ids, mask, rows


def capture(model: nn.Module, layer: str, rows: list[Tensor]) -> list[Tensor]:
    """The layer's hidden states of each row run alone, unpadded, in float64: what the references see."""
    with FeatureHooks(model, [layer]) as hooks:
        out = []
        for row in rows:
            with torch.no_grad():
                model(row.unsqueeze(0))
            out.append(hooks[layer][0].double())
    return out


def run(teacher: nn.Module, student: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """The module's two forwards (the teacher's without a graph); the token mask it then gives the feature terms."""
    inputs = {"input_ids": ids, "attention_mask": mask.long()}
    with torch.no_grad():
        teacher(**inputs)
    return token_mask(inputs, student(**inputs).logits)


def test_token_mask_is_the_inputs_attention_mask_for_sequence_outputs_only():
    ids = torch.randint(0, 9, (2, 4))
    attention = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])  # left and right padding
    logits = torch.zeros(2, 4, 9)
    assert torch.equal(token_mask({"input_ids": ids, "attention_mask": attention}, logits), attention.bool())
    assert torch.equal(token_mask(ids, logits), torch.ones(2, 4, dtype=torch.bool))  # token ids alone: every token valid
    assert token_mask({"input_ids": ids}, logits).all()
    assert token_mask(torch.randn(2, 40), torch.zeros(2, 10)) is None  # classification: channels first, as before


def poison_padding(layer: nn.Module, mask: Tensor):
    """A hook (registered before the feature hooks) that writes 1e6 at the padded positions of ``layer``'s hidden states."""

    def hook(module, args, out):
        hidden = first_tensor(out)
        if hidden.shape[:2] != mask.shape:
            return None
        hidden = torch.where(mask.unsqueeze(-1), hidden, 1e6)
        return hidden if isinstance(out, Tensor) else (hidden, *out[1:])  # older transformers blocks return tuples

    return layer.register_forward_hook(hook)


def test_fitnet_on_gpt2_hidden_states_gets_a_linear_adapter_and_ignores_padding():
    teacher, student = gpt2(48, 0), gpt2(32, 1)
    layer = "transformer.h.0"
    ids, mask, rows = token_batch(LENGTHS)
    poison = poison_padding(student.get_submodule(layer), mask)  # the loss must not see the padded positions
    fd = FeatureDistillation(teacher, student, {"fitnet": FeatureTerm(FitNetLoss(), layer, layer)})
    fd.attach()
    fd.build_adapters(mask=run(teacher, student, ids[:2, :5], mask[:2, :5]))  # the dry forward, on another batch
    fd.clear()
    adapter = fd.adapters["fitnet_0"]
    assert isinstance(adapter, nn.Linear) and (adapter.in_features, adapter.out_features) == (32, 48)
    assert fd.adapter_shapes == {"fitnet_0": ([2, 5, 32], [2, 5, 48], "sequence")}

    valid = run(teacher, student, ids, mask)
    assert torch.equal(valid, mask)
    value = fd.losses(mask=valid)["fitnet"]
    fd.clear()
    poison.remove()
    w, b = adapter.weight.detach().double(), adapter.bias.detach().double()
    expected = ref_fitnet([s @ w.T + b for s in capture(student, layer, rows)], capture(teacher, layer, rows))
    assert value.item() == pytest.approx(expected, rel=1e-4)
    value.backward()  # trains the adapter and the student, not the teacher
    assert adapter.weight.grad.abs().sum() > 0 and student.transformer.wte.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())

    # a checkpoint's record rebuilds the same adapter without a forward; an older record (no layout) is channels first
    again = FeatureDistillation(teacher, student, {"fitnet": FeatureTerm(FitNetLoss(), layer, layer)})
    again.build_adapters(fd.adapter_shapes)
    assert isinstance(again.adapters["fitnet_0"], nn.Linear) and again.adapter_shapes == fd.adapter_shapes
    old = FeatureDistillation(teacher, student, {"fitnet": FeatureTerm(FitNetLoss(), layer, layer)})
    old.build_adapters({"fitnet_0": ([8, 100], [8, 64, 5])})
    assert isinstance(old.adapters["fitnet_0"], nn.Sequential)
    assert old.adapter_shapes == {"fitnet_0": ([8, 100], [8, 64, 5], "channels_first")}
    fd.detach()


def test_at_and_rkd_from_a_llama_teacher_to_a_gpt2_student_on_padded_batches():
    """Across architectures and widths: blocks (a tensor) and whole transformers (a ModelOutput: its last_hidden_state)."""
    teacher, student = llama(48, 0), gpt2(32, 1)
    pairs = [("model.layers.0", "transformer.h.0"), ("model", "transformer")]
    terms = {"at": FeatureTerm(ATLoss(), [t for t, _ in pairs], [s for _, s in pairs], weight=2.0),
             "rkd": FeatureTerm(RKDLoss(), "model", "transformer", weight=0.5)}
    ids, mask, rows = token_batch(LENGTHS)
    poisons = [poison_padding(teacher.get_submodule("model.layers.0"), mask), poison_padding(student.get_submodule("transformer.h.0"), mask)]
    fd = FeatureDistillation(teacher, student, terms)
    assert not fd.needs_adapters
    fd.attach()  # after the poison: the feature hooks see the padded positions' 1e6
    run(teacher, student, ids, mask)
    values = fd.losses(mask=mask)
    fd.clear()
    for handle in poisons:
        handle.remove()
    t_feats = {name: capture(teacher, name, rows) for name, _ in pairs}
    s_feats = {name: capture(student, name, rows) for _, name in pairs}
    at_ref = sum(ref_at(s_feats[s], t_feats[t]) for t, s in pairs)
    rkd_ref = ref_rkd(s_feats["transformer"], t_feats["model"])
    assert values["at"].item() == pytest.approx(at_ref, rel=1e-4)
    assert values["rkd"].item() == pytest.approx(rkd_ref, rel=1e-4)
    assert fd.weighted_sum(values).item() == pytest.approx(2.0 * at_ref + 0.5 * rkd_ref, rel=1e-4)
    fd.detach()


def test_feature_distillation_refuses_what_would_misfire():
    teacher, student = gpt2(48, 0), gpt2(32, 1)
    layer = "transformer.h.0"
    ids, mask, _ = token_batch([4, 2])

    # adapters built without the mask, losses with it: a Conv1d over the tokens must not train silently
    fd = FeatureDistillation(teacher, student, {"fitnet": FeatureTerm(FitNetLoss(), layer, layer)})
    fd.attach()
    run(teacher, student, ids, mask)
    fd.build_adapters()
    assert fd.adapter_shapes["fitnet_0"][2] == "channels_first"
    with pytest.raises(RuntimeError, match=r"adapter of feature term 'fitnet' .* was built for channels_first features, but this step's "
                                           r"are read as sequence \(with a token mask\)"):
        fd.losses(mask=mask)
    with pytest.raises(TypeError, match=r"Expected `mask` to be a bool tensor \(B, S\), True at the valid tokens, or None, but got list"):
        fd.losses(mask=[[1, 1]])
    fd.detach()

    # layout="sequence": a linear adapter and the sequence losses also without a mask (every token valid)
    seq = FeatureDistillation(teacher, student, {"fitnet": FeatureTerm(FitNetLoss(), layer, layer, layout="sequence")})
    seq.attach()
    with FeatureHooks(student, [layer]) as s_hooks, FeatureHooks(teacher, [layer]) as t_hooks:
        run(teacher, student, ids, mask)
        seq.build_adapters()
        adapter = seq.adapters["fitnet_0"]
        assert isinstance(adapter, nn.Linear)
        expected = fitnet_loss(adapter(s_hooks[layer]), t_hooks[layer])
        assert seq.losses()["fitnet"].item() == pytest.approx(expected.item(), rel=1e-6)
    seq.detach()

    # a conv adapter cannot map sequences
    conv = FeatureDistillation(teacher, student, {"fitnet": FeatureTerm(FitNetLoss(adapter="conv"), layer, layer)})
    conv.attach()
    run(teacher, student, ids, mask)
    with pytest.raises(ValueError, match=r"a conv adapter maps channels-first maps, but the features are sequences"):
        conv.build_adapters(mask=mask)
    with pytest.raises(TypeError, match=r"Expected `mask` to be a bool tensor \(B, S\), True at the valid tokens, or None, but got a "
                                        r"torch.int64 tensor of shape \(2, 4, 1\)"):
        conv.build_adapters(mask=mask.long().unsqueeze(-1))
    conv.detach()

    # GPT-2's position embeddings are (1, S, D): beside a (B, S) mask, a 3-D feature of another (B, S) is refused, not guessed
    wpe = FeatureDistillation(teacher, student, {"at": FeatureTerm(ATLoss(), layer, "transformer.wpe")})
    wpe.attach()
    run(teacher, student, ids, mask)
    with pytest.raises(ValueError, match=r"The student feature of 'transformer.wpe' has shape \(1, 4, 32\), which does not start with the "
                                         r"token mask's \(B, S\) = \(2, 4\)"):
        wpe.losses(mask=mask)
    wpe.detach()

    # a loss that cannot take the mask is not given padded tokens
    mine = FeatureDistillation(teacher, student, {"mine": FeatureTerm(lambda s, t: (s.mean(-1) - t.mean(-1)).pow(2).mean(), layer, layer)})
    mine.attach()
    run(teacher, student, ids, mask)
    with pytest.raises(TypeError, match=r"Feature term 'mine' has sequence features and a token mask, but its loss function does not accept `mask`"):
        mine.losses(mask=mask)
    mine.detach()


def test_conv_features_without_a_mask_are_read_as_before():
    """Classification (no mask): the adapters and the values of FitNet, AT and RKD are those of the plain functions, bit for bit."""
    teacher, student = get_model("cnn1d").eval(), get_model("cnn1d", channels=8)
    terms = {"fitnet": FeatureTerm(FitNetLoss(), "features.3", "features.3"), "at": FeatureTerm(ATLoss(), "features.1", "features.1"),
             "rkd": FeatureTerm(RKDLoss(), "features.3", "features.3")}
    fd = FeatureDistillation(teacher, student, terms)
    fd.attach()
    x = torch.randn(4, 40)
    with FeatureHooks(student, ["features.1", "features.3"]) as s_hooks, FeatureHooks(teacher, ["features.1", "features.3"]) as t_hooks:
        with torch.no_grad():
            teacher(x)
        student(x)
        fd.build_adapters()
        assert isinstance(fd.adapters["fitnet_0"], nn.Conv1d) and fd.adapter_shapes["fitnet_0"][2] == "channels_first"
        values = fd.losses()
        s1, s3, t1, t3 = s_hooks["features.1"], s_hooks["features.3"], t_hooks["features.1"], t_hooks["features.3"]
        assert torch.equal(values["fitnet"], fitnet_loss(fd.adapters["fitnet_0"](s3), t3))
        assert torch.equal(values["at"], at_loss(s1, t1))
        assert torch.equal(values["rkd"], rkd_loss(s3, t3))
    fd.detach()
