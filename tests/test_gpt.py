"""The small GPT: a float64 reference forward, padding on either side, the Hugging Face-shaped interface, generation."""

from __future__ import annotations

import importlib.resources
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.models import GPT, GPTModel, get_model, list_models
from lightning_kd.models.gpt import top_p_filter

PAD, EOS = 257, 256


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny(**kwargs) -> GPT:
    """A 2-layer GPT whose logits are far apart (a large embedding scale), so that argmax ties do not occur."""
    model = GPT(**{"block_size": 24, "n_layer": 2, "n_head": 2, "n_embd": 16, **kwargs}).eval()
    nn.init.normal_(model.transformer.wte.weight, std=1.0)
    return model


def pad(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), PAD)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        where = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        ids[i, where], mask[i, where] = torch.tensor(row), 1
    return ids, mask


def reference_logits(model: GPT, ids: list[int]) -> torch.Tensor:
    """One unpadded sequence through the model's weights in float64, attention written out position by position."""
    p = {name: t.detach().double() for name, t in model.state_dict().items()}
    heads, width = model.transformer.h[0].attn.n_head, model.transformer.wte.embedding_dim
    d = width // heads

    def ln(x, name):
        return F.layer_norm(x, (width,), p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-5)

    def linear(x, name):
        return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    x = p["transformer.wte.weight"][ids] + p["transformer.wpe.weight"][: len(ids)]  # (S, C)
    for layer in range(len(model.transformer.h)):
        prefix = f"transformer.h.{layer}"
        q, k, v = linear(ln(x, f"{prefix}.ln_1"), f"{prefix}.attn.qkv").split(width, dim=1)
        out = torch.zeros_like(x)
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            for t in range(len(ids)):
                scores = (k[: t + 1, cols] @ q[t, cols]) / math.sqrt(d)  # keys 0..t only
                out[t, cols] = torch.softmax(scores, dim=0) @ v[: t + 1, cols]
        x = x + linear(out, f"{prefix}.attn.proj")
        hidden = F.gelu(linear(ln(x, f"{prefix}.ln_2"), f"{prefix}.mlp.0"))
        x = x + linear(hidden, f"{prefix}.mlp.2")
    return ln(x, "transformer.ln_f") @ p["lm_head.weight"].T  # (S, V)


# --------------------------------------------------------------------------- the forward


def test_forward_matches_a_float64_reference():
    model = tiny()
    ids = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]
    expected = reference_logits(model, ids)
    logits = model.double()(torch.tensor([ids]))[0]
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_the_logits_of_real_tokens(side):
    model = tiny()
    rows = [[5, 6, 7, 8, 9, 10, 11], [72, 105], [1, 2, 3, 4]]
    ids, mask = pad(rows, side)
    logits = model(ids, mask)  # (B, S, V)
    assert logits.shape == (3, 7, 258) and torch.isfinite(logits).all()
    for i, row in enumerate(rows):
        alone = model(torch.tensor([row]))[0]
        torch.testing.assert_close(logits[i][mask[i].bool()], alone, rtol=0, atol=1e-5)
    # what sits at the padded positions is never looked at
    other = ids.masked_fill(mask == 0, 3)
    torch.testing.assert_close(model(other, mask)[mask.bool()], logits[mask.bool()], rtol=0, atol=1e-6)


def test_a_row_of_padding_only_gives_finite_logits():
    model = tiny()
    ids, mask = pad([[1, 2, 3], []], "left")
    assert mask[1].sum() == 0
    assert torch.isfinite(model(ids, mask)).all()


def test_the_logits_are_causal():
    model = tiny()
    ids = torch.randint(0, 256, (2, 10))
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 256
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_an_all_ones_mask_equals_no_mask():
    model = tiny()
    ids = torch.randint(0, 256, (3, 9))
    torch.testing.assert_close(model(ids, torch.ones_like(ids)), model(ids), rtol=0, atol=1e-6)


def test_base_model_and_output_embeddings_give_the_logits():
    model = tiny()
    ids, mask = pad([[5, 6, 7, 8], [9, 10]], "left")
    hidden = model.base_model(ids, attention_mask=mask)
    assert isinstance(model.base_model, GPTModel) and hidden.shape == (2, 4, 16)
    assert model.get_output_embeddings() is model.lm_head and model.lm_head.bias is None
    torch.testing.assert_close(hidden @ model.get_output_embeddings().weight.T, model(ids, mask), rtol=0, atol=1e-6)


def test_a_hugging_face_batch_passes_whole():
    model = tiny()
    ids, mask = pad([[5, 6, 7], [8]], "right")
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    torch.testing.assert_close(model(**batch), model(ids, mask), rtol=0, atol=0)


def test_weights_are_tied_by_default():
    tied, untied = GPT(n_layer=1, n_embd=32, n_head=2), GPT(n_layer=1, n_embd=32, n_head=2, tie_weights=False)
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    assert untied.lm_head.weight is not untied.get_input_embeddings().weight
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(untied) - count(tied) == 258 * 32
    with torch.no_grad():
        tied.get_input_embeddings().weight[0, 0] += 1.0
    assert tied.lm_head.weight[0, 0] == tied.get_input_embeddings().weight[0, 0]


def test_gradients_reach_every_parameter():
    model = tiny().train()
    ids, mask = pad([[5, 6, 7, 8], [9, 10]], "left")
    model(ids, mask).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_dropout_acts_in_training_only():
    model = tiny(dropout=0.5)
    ids = torch.randint(0, 256, (2, 8))
    torch.testing.assert_close(model(ids), model(ids))
    model.train()
    assert not torch.allclose(model(ids), model(ids))


def test_bfloat16_logits_stay_close():
    model = tiny()
    ids, mask = pad([[5, 6, 7, 8, 9], [9, 10]], "left")
    expected = model(ids, mask)
    logits = model.to(torch.bfloat16)(ids, mask).float()
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[mask.bool()], expected[mask.bool()], rtol=0.05, atol=0.1)


# --------------------------------------------------------------------------- the zoo


def test_the_zoo_builds_the_demo_sizes():
    assert {"gpt", "gpt_teacher", "gpt_student"} <= set(list_models())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    teacher, student = get_model("gpt_teacher"), get_model("gpt_student")
    assert (count(teacher), count(student)) == (1_013_760, 141_312)
    assert teacher.lm_head.weight is not teacher.get_input_embeddings().weight  # untied: see the builders
    assert get_model("gpt", n_layer=1, n_head=1, n_embd=8, vocab_size=10).lm_head.out_features == 10
    assert teacher.block_size == student.block_size == 128


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_embd": 30, "n_head": 4}, ValueError, r"Expected `n_head` to divide `n_embd`, but got n_embd=30, n_head=4"),
        ({"n_layer": 0}, ValueError, r"Expected `n_layer` to be >= 1, but got 0"),
        ({"block_size": 12.0}, TypeError, r"Expected `block_size` to be an int, but got float"),
        ({"dropout": 1.0}, ValueError, r"Expected `dropout` to be in \[0, 1\), but got 1.0"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        GPT(**kwargs)


def test_forward_errors():
    model = tiny()
    with pytest.raises(TypeError, match=r"Expected `input_ids` to be an integer tensor of token ids, but got torch.float32"):
        model(torch.randn(2, 40))
    with pytest.raises(ValueError, match=r"Expected `input_ids` of shape \(B, S\), but got \(4,\)"):
        model(torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match=r"Expected at most block_size=24 positions, but got 25"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match=r"Expected `attention_mask` of shape \(1, 5\).*but got \(1, 4\)"):
        model(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))


# --------------------------------------------------------------------------- generation


def greedy_without_cache(model, ids, mask, steps, eos):
    """Greedy decoding that runs the whole sequence again at every step."""
    ended = torch.zeros(len(ids), dtype=torch.bool)
    for _ in range(steps):
        token = model(ids, mask)[:, -1].argmax(-1).masked_fill(ended, PAD)
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, (~ended).long()[:, None]], 1)
        ended |= token == eos
        if ended.all():
            break
    return ids, mask


@pytest.mark.parametrize("eos", [None, "found"])
def test_cached_greedy_generation_equals_recomputing_every_step(eos):
    model = tiny()
    prompts, mask = pad([[5, 6, 7, 8, 9], [72, 105], [1, 2, 3]], "left")
    if eos == "found":  # a token that the first sequence generates third: it must end there
        eos = greedy_without_cache(model, prompts, mask, 3, None)[0][0, -1].item()
    expected = greedy_without_cache(model, prompts, mask, 12, eos)
    sequences, new_mask = model.generate(prompts, mask, max_new_tokens=12, temperature=0.0, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(sequences, expected[0]) and torch.equal(new_mask, expected[1])
    assert torch.equal(sequences[:, :5], prompts) and torch.equal(new_mask[:, :5], mask)
    if eos is not None:
        row = sequences[0, 5:].tolist()
        end = row.index(eos)
        assert end <= 2 and new_mask[0, 5 + end] == 1  # eos itself is a real token
        assert set(row[end + 1 :]) <= {PAD} and not new_mask[0, 5 + end + 1 :].any()


def test_a_left_padded_prompt_continues_like_the_prompt_alone():
    model = tiny()
    rows = [[5, 6, 7, 8, 9], [72, 105]]
    prompts, mask = pad(rows, "left")
    sequences, _ = model.generate(prompts, mask, max_new_tokens=8, temperature=0.0)
    for i, row in enumerate(rows):
        alone, _ = model.generate(torch.tensor([row]), max_new_tokens=8, temperature=0.0)
        assert torch.equal(sequences[i, -8:], alone[0, -8:])


def test_generation_stops_when_every_sequence_has_ended():
    model = tiny()
    prompts = torch.tensor([[5, 6, 7]])
    first = model.generate(prompts, max_new_tokens=1, temperature=0.0)[0][0, -1].item()
    sequences, mask = model.generate(prompts, max_new_tokens=10, temperature=0.0, eos_token_id=first)
    assert sequences.shape == mask.shape == (1, 4) and sequences[0, -1] == first


def test_sampling_follows_the_generator():
    model = tiny()
    prompts = torch.tensor([[5, 6, 7], [8, 9, 10]])
    run = lambda seed, **kw: model.generate(prompts, max_new_tokens=10, generator=torch.Generator().manual_seed(seed), **kw)[0]  # noqa: E731
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    greedy = model.generate(prompts, max_new_tokens=10, temperature=0.0)[0]
    assert torch.equal(run(3, top_p=1e-6), greedy)  # a nucleus of the most likely token only
    assert torch.equal(run(4, temperature=1e-4), greedy)


def test_top_p_filter_keeps_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    filtered = top_p_filter(probs.log(), 0.7).softmax(-1)
    expected = torch.tensor([[0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8], [1 / 3, 1 / 3, 1 / 3, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(filtered, expected, rtol=0, atol=1e-12)
    assert top_p_filter(probs.log(), 1.0) is not None and torch.equal(top_p_filter(probs.log(), 1.0), probs.log())


class FixedLogits(nn.Module):
    """An output layer that gives every position the same logits: the distribution generation samples from."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*hidden.shape[:-1], len(self.logits))


def test_sampling_frequencies_match_the_tempered_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3], dtype=torch.float64)
    model = GPT(vocab_size=4, block_size=4, n_layer=1, n_head=1, n_embd=8).eval()
    model.lm_head = FixedLogits(probs.float().log())
    prompts = torch.zeros(20_000, 1, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    tokens = model.generate(prompts, max_new_tokens=1, temperature=2.0, top_p=0.8, generator=generator)[0][:, -1]
    tempered = probs.sqrt() / probs.sqrt().sum()  # T=2: p^(1/2), renormalised: [0.120, 0.379, 0.208, 0.294]
    expected = torch.where(torch.arange(4) == 0, 0.0, tempered)  # the nucleus of 0.8 leaves out the least likely
    expected /= expected.sum()
    frequencies = torch.bincount(tokens, minlength=4).double() / len(tokens)
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.015)


def test_generation_errors():
    model = tiny()
    prompts = torch.ones(2, 20, dtype=torch.long)
    with pytest.raises(ValueError, match=r"prompt length plus `max_new_tokens` to be at most block_size=24, but got 20 \+ 5 = 25"):
        model.generate(prompts, max_new_tokens=5)
    with pytest.raises(ValueError, match=r"Expected `max_new_tokens` to be >= 1, but got 0"):
        model.generate(prompts, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"Expected `temperature` to be >= 0, but got -1"):
        model.generate(prompts, max_new_tokens=2, temperature=-1)
    with pytest.raises(ValueError, match=r"Expected `top_p` to be in \(0, 1\], but got 0"):
        model.generate(prompts, max_new_tokens=2, top_p=0)
    with pytest.raises(ValueError, match=r"Expected prompts of at least one token"):
        model.generate(torch.ones(2, 0, dtype=torch.long), max_new_tokens=2)
    ids, mask = pad([[1, 2, 3], [4]], "right")
    with pytest.raises(ValueError, match=r"Expected left-padded prompts.*`padding_side='left'`"):
        model.generate(ids, mask, max_new_tokens=2)


@pytest.mark.parametrize(("config", "builder"), [("teacher/gpt.yaml", "gpt_teacher"), ("student/gpt_small.yaml", "gpt_student")])
def test_the_demo_configs_build_the_zoo_sizes(config, builder):
    """The configs spell the sizes out (so that `teacher.model.n_layer=4` works); the zoo's names must not drift from them."""
    import hydra
    from omegaconf import OmegaConf

    text = importlib.resources.files("lightning_kd.conf").joinpath(config).read_text()
    model = hydra.utils.instantiate(OmegaConf.create(text).model, _convert_="all")
    reference = get_model(builder)
    assert repr(model) == repr(reference)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
