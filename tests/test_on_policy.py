"""OnPolicy (GKD's on-policy batches): the draw, the prompts, the generated batch and its targets, the student's
state, the settings, and a Hugging Face student."""

import random
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from lightning_kd.batch import causal_lm_targets
from lightning_kd.callbacks import DistillationAnnealing
from lightning_kd.models import GPT, get_model
from lightning_kd.on_policy import OnPolicy
from lightning_kd.schedules import Linear

PAD, EOS, VOCAB = 0, 1, 20


def tiny_gpt(**kwargs):
    options = {"vocab_size": VOCAB, "block_size": 15, "n_layer": 1, "n_head": 2, "n_embd": 16, **kwargs}
    return get_model("gpt", **options)


def batch(rows, *, left):
    """A padded batch of ``(prompt, response)`` rows: labels -100 on the prompts, targets shifted as the module does."""
    length = max(len(p) + len(r) for p, r in rows)
    ids, mask, labels = [], [], []
    for prompt, response in rows:
        pad = length - len(prompt) - len(response)
        tokens, label = prompt + response, [-100] * len(prompt) + response
        if left:
            ids.append([PAD] * pad + tokens), mask.append([0] * pad + [1] * len(tokens)), labels.append([-100] * pad + label)
        else:
            ids.append(tokens + [PAD] * pad), mask.append([1] * len(tokens) + [0] * pad), labels.append(label + [-100] * pad)
    inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    return inputs, causal_lm_targets(inputs, torch.tensor(labels))


ROWS = [([7, 8], [17, 18, 19]), ([9, 10, 11], [17]), ([12, 13, 14, 15, 16], [18, 19])]


# -- the draw -------------------------------------------------------------------------------------
def test_the_draw_is_a_pure_function_of_seed_and_step():
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    draws = [OnPolicy(0.3, seed=5).draw(s) for s in range(10_000)]
    assert torch.equal(torch.get_rng_state(), states[0]) and (np.random.get_state()[1] == states[1]).all() and random.getstate() == states[2]
    torch.manual_seed(99), np.random.seed(99), random.seed(99)  # the global generators play no part
    assert [OnPolicy(0.3, seed=5).draw(s) for s in range(10_000)] == draws
    assert [OnPolicy(0.3, seed=6).draw(s) for s in range(10_000)] != draws
    # frequency (deterministic for these seeds): within 3 standard deviations of 0.3 over 10,000 steps
    assert sum(draws) == pytest.approx(3_000, abs=3 * (10_000 * 0.3 * 0.7) ** 0.5)
    # raising the probability only adds steps: an annealed lambda keeps the earlier on-policy steps
    more = [OnPolicy(0.6, seed=5).draw(s) for s in range(10_000)]
    assert all(m for d, m in zip(draws, more) if d) and sum(more) == pytest.approx(6_000, abs=150)
    assert not any(OnPolicy(0.0).draw(s) for s in range(2_000)) and all(OnPolicy(1.0).draw(s) for s in range(2_000))


def test_probability_zero_never_generates_and_one_always_does():
    student, (inputs, targets) = tiny_gpt(), batch(ROWS, left=False)
    calls = []
    student.lm_head.register_forward_hook(lambda *args: calls.append(1))
    for step in range(5):
        out = OnPolicy(0.0, max_new_tokens=2)(student, inputs, targets, step=step)
        assert out[0] is inputs and out[1] is targets and out[2] is False
    assert not calls
    for step in range(5):
        assert OnPolicy(1.0, max_new_tokens=2)(student, inputs, targets, step=step)[2] is True
    assert calls


# -- the generated batch --------------------------------------------------------------------------
def scripted_gpt(end):
    """A GPT whose most likely next token depends only on the position ``p`` of the last one: ``p + 2`` while
    ``p + 1 < end``, then EOS. Its blocks and token embeddings are zero, so the hidden state is
    ``ln_f(onehot(p))``; ``lm_head`` reads the position off it."""
    model = tiny_gpt(tie_weights=False).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.wpe.weight.copy_(torch.eye(15, 16))
        table = torch.zeros(VOCAB, 16, dtype=torch.float64)
        for p in range(15):
            table[p + 2 if p + 1 < end else EOS, p] = 1.0
        table[:, -1] = -table.sum(dim=1)  # each row sums to 0: the LayerNorm's mean (1/16 on every entry) cancels
        model.lm_head.weight.copy_(10 * table)
    return model


@pytest.mark.parametrize("left", [False, True])
def test_targets_count_the_generated_tokens_up_to_the_first_eos(left):
    # prompts of 2, 3 and 5 tokens; the model says EOS at position 6; at most 4 new tokens
    inputs, targets = batch(ROWS, left=left)
    on_policy = OnPolicy(1.0, max_new_tokens=4, temperature=0.0, eos_token_id=EOS, pad_token_id=PAD)
    new_inputs, new_targets, generated = on_policy(scripted_gpt(end=6), inputs, targets, step=0)
    assert generated is True
    X = -100
    assert new_inputs["input_ids"].tolist() == [
        [PAD, PAD, PAD, 7, 8, 3, 4, 5, 6],  # no EOS within 4 tokens
        [PAD, PAD, 9, 10, 11, 4, 5, 6, EOS],
        [12, 13, 14, 15, 16, 6, EOS, PAD, PAD],  # padding after the EOS
    ]
    assert new_inputs["attention_mask"].tolist() == [
        [0, 0, 0, 1, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 0, 0],
    ]
    assert new_inputs["attention_mask"].dtype == inputs["attention_mask"].dtype
    assert new_targets.tolist() == [
        [X, X, X, X, 3, 4, 5, 6, X],
        [X, X, X, X, 4, 5, 6, EOS, X],
        [X, X, X, X, 6, EOS, X, X, X],  # the EOS counts; nothing after it
    ]
    # the module's own shift of labels that are -100 on the prompts gives the same targets
    labels = new_inputs["input_ids"].clone()
    labels[:, :5] = -100
    assert torch.equal(causal_lm_targets(new_inputs, labels), new_targets)


def test_generation_stops_early_when_every_sequence_ended():
    inputs, targets = batch(ROWS, left=True)
    on_policy = OnPolicy(1.0, max_new_tokens=8, temperature=0.0, eos_token_id=EOS)
    new_inputs, new_targets, _ = on_policy(scripted_gpt(end=6), inputs, targets, step=0)
    assert new_inputs["input_ids"].shape == (3, 5 + 5)  # the 2-token prompt: 3, 4, 5, 6, EOS
    assert (new_targets != -100).sum(dim=1).tolist() == [5, 4, 2]


@pytest.mark.parametrize("eos", [None, 3])
def test_left_and_right_padded_prompts_give_the_same_greedy_continuations(eos):
    torch.manual_seed(0)
    student = tiny_gpt().double().eval()
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.mul_(20.0)  # peaked next-token distributions: an EOS shows up
    on_policy = OnPolicy(1.0, max_new_tokens=5, temperature=0.0, eos_token_id=eos)
    right = on_policy(student, *batch(ROWS, left=False), step=3)
    left = on_policy(student, *batch(ROWS, left=True), step=3)
    assert torch.equal(right[0]["input_ids"], left[0]["input_ids"]) and torch.equal(right[1], left[1])
    assert torch.equal(right[0]["attention_mask"], left[0]["attention_mask"])
    # each row is what the student continues its prompt with, alone and unpadded
    ids, targets = right[0]["input_ids"], right[1]
    for row, (prompt, _) in enumerate(ROWS):
        alone, _ = student.generate(torch.tensor([prompt]), max_new_tokens=5, temperature=0.0, eos_token_id=eos)
        continuation = alone[0, len(prompt) :].tolist()
        if eos in continuation:
            continuation = continuation[: continuation.index(eos) + 1]
        assert targets[row][targets[row] != -100].tolist() == continuation
        assert ids[row, 5 : 5 + len(continuation)].tolist() == continuation
    if eos is not None:
        assert any(eos in row for row in ids[:, 5:].tolist())  # the EOS case is exercised


def test_prompt_length_serves_sequences_without_prompt_marking():
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8, PAD], [PAD, 9, 10, 11, 12]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])}
    targets = causal_lm_targets(inputs, None)  # plain text: every next token counts
    with pytest.raises(ValueError, match=r"rows \[0, 1\] have a target from their first token on and `prompt_length` is None"):
        OnPolicy(1.0, max_new_tokens=2)(tiny_gpt(), inputs, targets, step=0)
    prompts, mask = OnPolicy(1.0, prompt_length=2).prompts(inputs, targets)
    assert prompts.tolist() == [[5, 6], [9, 10]] and mask.all()
    prompts, mask = OnPolicy(1.0, prompt_length=3).prompts(inputs, targets)
    assert prompts.tolist() == [[5, 6, 7], [9, 10, 11]]
    # a marked row keeps its own prompt; a row without a counted target is all prompt
    labels = torch.tensor([[-100, -100, -100, 8, -100], [-100, -100, -100, -100, -100]])
    prompts, mask = OnPolicy(1.0, prompt_length=1).prompts(inputs, causal_lm_targets(inputs, labels))
    assert prompts.tolist() == [[PAD, 5, 6, 7], [9, 10, 11, 12]] and mask.tolist() == [[False, True, True, True], [True] * 4]


# -- the student's state and the randomness of sampling -------------------------------------------
class GradientGenerate(GPT):
    """The zoo's GPT with a ``generate`` that leaves autograd on: OnPolicy must turn it off itself."""

    generate = GPT.generate.__wrapped__


def test_the_students_modes_are_restored_and_generation_has_no_gradient():
    student, (inputs, targets) = GradientGenerate(VOCAB, 15, n_layer=1, n_head=2, n_embd=16, dropout=0.1), batch(ROWS, left=False)
    seen = []
    student.lm_head.register_forward_hook(lambda module, *args: seen.append((torch.is_grad_enabled(), module.training, student.transformer.drop.training)))
    student.train()
    student.transformer.h[0].eval()  # a submodule kept in eval mode (a frozen part) stays so
    new_inputs, new_targets, _ = OnPolicy(1.0, max_new_tokens=3)(student, inputs, targets, step=0)
    assert seen and all(s == (False, False, False) for s in seen)
    assert student.training and student.transformer.drop.training and not student.transformer.h[0].training
    assert not student.transformer.h[0].attn.training  # eval() reached it too, and stays
    assert not new_inputs["input_ids"].requires_grad and all(p.grad is None for p in student.parameters())
    student.eval()
    OnPolicy(1.0, max_new_tokens=3)(student, inputs, targets, step=0)
    assert not any(m.training for m in student.modules())
    # the generated batch then trains the student as any batch does
    logits = student.train()(**new_inputs)
    nn.functional.cross_entropy(logits.flatten(0, 1), new_targets.flatten()).backward()
    assert student.lm_head.weight.grad is not None


def test_sampling_is_seeded_by_seed_and_step_and_leaves_the_global_generator_alone():
    torch.manual_seed(0)
    student, (inputs, targets) = tiny_gpt(), batch(ROWS, left=True)
    on_policy = OnPolicy(1.0, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3)
    state = torch.get_rng_state()
    first = on_policy(student, inputs, targets, step=7)[0]["input_ids"]
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(42)
    assert torch.equal(on_policy(student, inputs, targets, step=7)[0]["input_ids"], first)
    assert not torch.equal(on_policy(student, inputs, targets, step=8)[0]["input_ids"], first)
    on_policy.seed = 4
    assert not torch.equal(on_policy(student, inputs, targets, step=7)[0]["input_ids"], first)


# -- settings -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "value", "error", "match"),
    [
        ("probability", 1.5, ValueError, r"^Expected `probability` to be in \[0, 1\], but got 1.5$"),
        ("probability", -0.1, ValueError, r"`probability` to be in \[0, 1\], but got -0.1"),
        ("probability", float("nan"), ValueError, r"`probability` to be in \[0, 1\], but got nan"),
        ("probability", "0.5", TypeError, r"Expected `probability` to be a number, but got '0.5'"),
        ("max_new_tokens", 0, ValueError, r"Expected `max_new_tokens` to be an integer >= 1, but got 0"),
        ("max_new_tokens", float("inf"), ValueError, r"`max_new_tokens` to be an integer >= 1, but got inf"),
        ("max_new_tokens", True, TypeError, r"Expected `max_new_tokens` to be a number, but got True"),
        ("temperature", -1.0, ValueError, r"Expected `temperature` to be >= 0 \(0 is greedy\), but got -1.0"),
        ("top_p", 0.0, ValueError, r"Expected `top_p` to be in \(0, 1\], but got 0.0"),
        ("top_p", 1.01, ValueError, r"Expected `top_p` to be in \(0, 1\], but got 1.01"),
        ("prompt_length", 0, ValueError, r"Expected `prompt_length` to be an integer >= 1 or None, but got 0"),
        ("prompt_length", 2.0, TypeError, r"Expected `prompt_length` to be an integer >= 1 or None, but got 2.0 \(float\)"),
        ("eos_token_id", -1, ValueError, r"Expected `eos_token_id` to be an integer >= 0 or None, but got -1"),
        ("pad_token_id", None, TypeError, r"Expected `pad_token_id` to be an integer >= 0, but got None"),
        ("seed", -1, ValueError, r"Expected `seed` to be an integer >= 0, but got -1"),
    ],
)
def test_settings_are_validated_in_the_constructor_and_on_assignment(name, value, error, match):
    with pytest.raises(error, match=match):
        OnPolicy(value) if name == "probability" else OnPolicy(**{name: value})
    on_policy = OnPolicy()
    before = getattr(on_policy, name)
    with pytest.raises(error, match=match):
        setattr(on_policy, name, value)
    assert getattr(on_policy, name) == before  # a refused value changes nothing


class StandIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.on_policy = OnPolicy(0.0, max_new_tokens=4)


def test_distillation_annealing_schedules_lambda_and_the_generation_length():
    module = StandIn()
    cb = DistillationAnnealing(schedules={"on_policy.probability": Linear(0.0, 1.0), "on_policy.max_new_tokens": Linear(4.0, 16.0)}, log=False)
    trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=10, callbacks=[cb])
    cb.on_train_start(trainer, module)
    trainer.global_step = 3
    cb.on_train_batch_start(trainer, module, None, 3)
    assert module.on_policy.probability == pytest.approx(0.3)
    assert module.on_policy.max_new_tokens == 8 and isinstance(module.on_policy.max_new_tokens, int)  # 7.6, rounded
    assert repr(module.on_policy).startswith("OnPolicy(0.3") and "max_new_tokens=8" in repr(module.on_policy)


def test_bad_batches_and_students_are_refused():
    inputs, targets = batch(ROWS, left=False)
    on_policy = OnPolicy(1.0, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"keys \['input_ids', 'attention_mask'\] only.*\['position_ids'\] cannot follow"):
        on_policy(tiny_gpt(), {**inputs, "position_ids": inputs["input_ids"]}, targets, step=0)
    with pytest.raises(TypeError, match="Expected `inputs` to be a dict with `input_ids`"):
        on_policy(tiny_gpt(), inputs["input_ids"], targets, step=0)
    with pytest.raises(ValueError, match=r"Expected `targets` of the shape of `input_ids` \(3, 7\), but got \(3, 6\)"):
        on_policy(tiny_gpt(), inputs, targets[:, 1:], step=0)
    with pytest.raises(TypeError, match="Expected a student with a `generate` method .* but Linear has none"):
        on_policy(nn.Linear(2, 2), inputs, targets, step=0)
    with pytest.raises(ValueError, match=r"Expected `step` to be an integer >= 0, but got -1"):
        on_policy(tiny_gpt(), inputs, targets, step=-1)
    empty = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"].clone()}
    empty["attention_mask"][1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] are all padding"):
        on_policy(tiny_gpt(), empty, causal_lm_targets(empty, None), step=0)


def test_importing_it_loads_neither_lightning_nor_transformers():
    probe = "import sys, lightning_kd.on_policy; print([m for m in ('lightning', 'torchmetrics', 'transformers') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"


# -- Hugging Face ---------------------------------------------------------------------------------
def test_a_hugging_face_gpt2_student():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=EOS, eos_token_id=EOS,
        initializer_range=1.0,  # large weights: greedy continuations that vary
    )
    student = transformers.GPT2LMHeadModel(config).double()
    inputs, targets = batch(ROWS, left=False)
    reference = [  # Hugging Face's own greedy continuation of each prompt, alone
        student.eval().generate(input_ids=torch.tensor([p]), max_new_tokens=5, do_sample=False, pad_token_id=PAD, eos_token_id=None)[0, len(p) :].tolist()
        for p, _ in ROWS
    ]
    eos = reference[2][1]  # the last row's second token: that row ends early
    student.train()
    on_policy = OnPolicy(1.0, max_new_tokens=5, temperature=0.0, eos_token_id=eos, pad_token_id=PAD)
    for left in (False, True):
        new_inputs, new_targets, generated = on_policy(student, *batch(ROWS, left=left), step=0)
        assert generated and student.training
        for row, continuation in enumerate(reference):
            counted = continuation[: continuation.index(eos) + 1] if eos in continuation else continuation
            assert new_targets[row][new_targets[row] != -100].tolist() == counted
            assert new_inputs["attention_mask"][row, 5:].sum().item() == len(counted)
        assert (new_targets[2] != -100).sum().item() <= 2  # the EOS ended the last row
    # sampling: seeded by (seed, step), the global generator restored
    on_policy.temperature, on_policy.top_p = 1.0, 0.9
    state = torch.get_rng_state()
    first = on_policy(student, inputs, targets, step=1)
    assert torch.equal(torch.get_rng_state(), state)
    again = on_policy(student, inputs, targets, step=1)
    assert torch.equal(first[0]["input_ids"], again[0]["input_ids"]) and torch.equal(first[1], again[1])
    assert not torch.equal(on_policy(student, inputs, targets, step=2)[0]["input_ids"], first[0]["input_ids"])


def test_a_hugging_face_student_samples_its_whole_distribution():
    # Hugging Face's default top_k=50 would truncate it: 256 first tokens of a near-uniform 80-token student
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=80, n_positions=8, n_embd=16, n_layer=1, n_head=2, bos_token_id=EOS, eos_token_id=EOS)
    student = transformers.GPT2LMHeadModel(config)
    inputs = {"input_ids": torch.tensor([[5, 6]]).repeat(256, 1)}
    targets = torch.tensor([[-100, -100]]).repeat(256, 1)  # all prompt
    new_inputs, new_targets, _ = OnPolicy(1.0, max_new_tokens=1, temperature=1.0)(student, inputs, targets, step=0)
    assert new_inputs["input_ids"].shape == (256, 3) and (new_targets[:, 1] != -100).all()
    assert new_inputs["input_ids"][:, 2].unique().numel() > 50
