"""The byte-level text datamodule: document splits, windows that give the text back, padding, loaders."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_kd.data import ByteTextDataModule
from lightning_kd.data.text import (
    EOS_TOKEN_ID,
    IGNORE_INDEX,
    PAD_TOKEN_ID,
    VOCAB_SIZE,
    collate_windows,
    decode,
    encode,
    load_documents,
    split_documents,
    windows,
)

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    return load_documents()


@pytest.fixture(scope="module")
def dm() -> ByteTextDataModule:
    datamodule = ByteTextDataModule()
    datamodule.setup()
    return datamodule


def documents_of(split_windows: list[list[int]]) -> list[list[int]]:
    """Undo the windowing of one split: consecutive windows of a document overlap by one token; a document ends with EOS."""
    documents, current = [], None
    for window in split_windows:
        current = list(window) if current is None else current + list(window[1:])
        if window[-1] == EOS_TOKEN_ID:
            documents.append(current)
            current = None
    assert current is None, "a split ends inside a document"
    return documents


# --------------------------------------------------------------------------- splits


def test_the_special_tokens_follow_the_bytes():
    assert (EOS_TOKEN_ID, PAD_TOKEN_ID, VOCAB_SIZE) == (256, 257, 258)
    assert (ByteTextDataModule.vocab_size, ByteTextDataModule.eos_token_id, ByteTextDataModule.pad_token_id) == (258, 256, 257)


def test_splits_are_disjoint_whole_documents_and_deterministic(dm, texts):
    names = [set(dm.documents[split]) for split in SPLITS]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert names[0] | names[1] | names[2] == set(texts)
    again = ByteTextDataModule()
    again.setup()
    assert again.documents == dm.documents and again.train_dataset == dm.train_dataset
    other = ByteTextDataModule(seed=1)
    other.setup()
    assert other.documents != dm.documents


def test_held_out_splits_get_their_share_of_the_tokens(dm, texts):
    sizes = {name: len(text.encode("utf-8")) + 1 for name, text in texts.items()}
    total = sum(sizes.values())
    shares = {split: sum(sizes[n] for n in dm.documents[split]) / total for split in SPLITS}
    assert 0.099 <= shares["val"] <= 0.1 and 0.099 <= shares["test"] <= 0.1  # never over, and close with 79 documents


def test_split_documents_never_overfills_and_trains_what_does_not_fit():
    sizes = {"huge": 50, **{f"d{i}": 5 for i in range(10)}}  # 100 in all; "huge" is larger than any held-out share
    for seed in range(10):
        split = split_documents(sizes, seed, val_fraction=0.2, test_fraction=0.1)
        assert "huge" in split["train"]
        assert sum(sizes[n] for n in split["val"]) == 20 and sum(sizes[n] for n in split["test"]) == 10
        assert sorted(sum(split.values(), [])) == sorted(sizes)
    assert split_documents(sizes, 3) == split_documents(sizes, 3)


# --------------------------------------------------------------------------- windows


def test_every_split_gives_its_documents_back(dm, texts):
    total_bytes = 0
    for split in SPLITS:
        documents = documents_of(getattr(dm, f"{split}_dataset"))
        assert [decode(doc) for doc in documents] == [texts[name] for name in dm.documents[split]]
        assert all(doc == encode(texts[name]) for doc, name in zip(documents, dm.documents[split]))
        total_bytes += sum(sum(token < 256 for token in doc) for doc in documents)
    assert total_bytes == sum(len(text.encode("utf-8")) for text in texts.values())


def test_windows_are_full_but_for_each_documents_last(dm):
    for split in SPLITS:
        split_windows = getattr(dm, f"{split}_dataset")
        lengths = torch.tensor([len(w) for w in split_windows])
        last = torch.tensor([w[-1] == EOS_TOKEN_ID for w in split_windows])
        assert (lengths <= dm.seq_len).all() and (lengths >= 2).all()
        assert (lengths[~last] == dm.seq_len).all()  # only a document's last window is shorter
        assert last.sum() == len(dm.documents[split]) and (lengths[last] < dm.seq_len).any()


def test_windows_overlap_by_one_token():
    tokens = list(range(20))
    cut = windows(tokens, seq_len=6)
    assert cut == [[0, 1, 2, 3, 4, 5], [5, 6, 7, 8, 9, 10], [10, 11, 12, 13, 14, 15], [15, 16, 17, 18, 19]]
    assert windows(list(range(6)), seq_len=6) == [[0, 1, 2, 3, 4, 5]]  # fits exactly: no window of one token
    assert windows([EOS_TOKEN_ID], seq_len=6) == [[EOS_TOKEN_ID]]
    with pytest.raises(ValueError, match=r"Expected `seq_len` to be >= 2, but got 1"):
        windows(tokens, seq_len=1)


def test_every_token_but_a_documents_first_is_a_target_once(dm, texts):
    """The targets (labels after the causal shift) of the validation loader are its documents' bytes and EOS, once each;
    the mean cross-entropy of a uniform guess over the vocabulary, in float64, is then ln(258) nats = log2(258) bits per byte."""
    targets, nats = 0, 0.0
    for batch in dm.val_dataloader():
        labels = batch["labels"][:, 1:]
        valid = labels != IGNORE_INDEX
        targets += int(valid.sum())
        uniform = torch.zeros(*labels.shape, VOCAB_SIZE, dtype=torch.float64)
        nats += float(torch.nn.functional.cross_entropy(uniform[valid], labels[valid], reduction="sum"))
    assert targets == sum(len(encode(texts[name])) - 1 for name in dm.documents["val"])
    assert nats / targets / math.log(2) == pytest.approx(math.log2(VOCAB_SIZE), rel=1e-12)


def test_max_train_windows_keeps_a_seeded_subset_in_order(dm):
    capped = ByteTextDataModule(max_train_windows=100)
    capped.setup()
    assert len(capped.train_dataset) == 100 and capped.val_dataset == dm.val_dataset and capped.test_dataset == dm.test_dataset
    positions = [dm.train_dataset.index(w) for w in capped.train_dataset]
    assert positions == sorted(positions)
    again = ByteTextDataModule(max_train_windows=100)
    again.setup()
    assert again.train_dataset == capped.train_dataset


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_is_masked_and_ignored(side):
    examples = [[72, 105, 33, EOS_TOKEN_ID], [72], [1, 2, 3]]
    batch = collate_windows(examples, padding_side=side)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (3, 4) for t in batch.values())
    expected_mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]])
    if side == "left":
        expected_mask = expected_mask.flip(1)
    assert torch.equal(batch["attention_mask"], expected_mask)
    padding = expected_mask == 0
    assert (batch["input_ids"][padding] == PAD_TOKEN_ID).all() and (batch["labels"][padding] == IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][~padding], batch["input_ids"][~padding])  # not shifted
    assert [batch["input_ids"][i][expected_mask[i].bool()].tolist() for i in range(3)] == examples


@pytest.mark.parametrize("side", ["right", "left"])
def test_loaders_give_padded_batches_of_the_configured_shape(side):
    dm = ByteTextDataModule(seq_len=64, batch_size=8, eval_batch_size=16, padding_side=side)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, DataLoader)
    batches = list(loader)
    assert len(batches) == math.ceil(len(dm.train_dataset) / 8)
    assert all(b["input_ids"].shape[0] == 8 and b["input_ids"].shape[1] <= 64 for b in batches[:-1])
    assert sum(b["attention_mask"].sum() for b in batches) == sum(len(w) for w in dm.train_dataset)
    assert any(not b["attention_mask"].all() for b in batches)  # the documents' last windows are shorter
    end = 0 if side == "right" else -1  # the real tokens are on the other side
    assert all(b["attention_mask"][:, end].all() for b in batches)
    val = list(dm.val_dataloader())
    assert sum(len(b["input_ids"]) for b in val) == len(dm.val_dataset) and val[0]["input_ids"].shape[0] == 16


def test_the_training_order_is_a_function_of_the_epoch():
    dm = ByteTextDataModule(seq_len=32, batch_size=4, max_train_windows=40, shuffle_seed=7)
    dm.setup()
    order = lambda epoch: [b["input_ids"] for b in _epoch(dm.train_dataloader(), epoch)]  # noqa: E731
    first = order(0)
    assert all(torch.equal(a, b) for a, b in zip(first, order(0)))
    assert not all(torch.equal(a, b) for a, b in zip(first, order(1)))


def _epoch(loader: DataLoader, epoch: int) -> DataLoader:
    loader.sampler.set_epoch(epoch)
    return loader


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seq_len": 1}, ValueError, r"Expected `seq_len` to be >= 2, but got 1"),
        ({"batch_size": True}, TypeError, r"Expected `batch_size` to be an int, but got bool"),
        ({"max_train_windows": 0}, ValueError, r"Expected `max_train_windows` to be >= 1, but got 0"),
        ({"val_fraction": 0.6, "test_fraction": 0.4}, ValueError, r"Expected `val_fraction \+ test_fraction` to be < 1"),
        ({"val_fraction": -0.1}, ValueError, r"Expected `val_fraction` to be in \[0, 1\), but got -0.1"),
        ({"padding_side": "middle"}, ValueError, r"Expected `padding_side` to be 'right' or 'left', but got 'middle'"),
    ],
)
def test_settings_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        ByteTextDataModule(**kwargs)


def test_loaders_before_setup_are_refused():
    with pytest.raises(RuntimeError, match=r"call `setup\(\)` first"):
        ByteTextDataModule().train_dataloader()
