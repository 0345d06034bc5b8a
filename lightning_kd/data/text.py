"""Byte-level language modelling on Python's own documentation, as a LightningDataModule.

The corpus is ``pydoc_data.topics.topics``, the text of ``help()``'s topics that ships with every
CPython (79 documents, about 466 k bytes in Python 3.11): nothing is downloaded. Its content
changes a little between Python versions, so the numbers of one version are compared with the same
version's.

Tokens are UTF-8 bytes (ids 0..255) plus two special tokens: :data:`EOS_TOKEN_ID` (256) ends every
document and :data:`PAD_TOKEN_ID` (257) pads batches, so ``vocab_size`` is :data:`VOCAB_SIZE` (258).
A mean cross-entropy in nats per token divided by ``ln 2`` is in bits per byte, with one caveat: the
end-of-document token counts as a token (one per document, about 0.02 % of the tokens).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_kd.data.samplers import EpochShuffleSampler

__all__ = [
    "EOS_TOKEN_ID",
    "IGNORE_INDEX",
    "PAD_TOKEN_ID",
    "VOCAB_SIZE",
    "ByteTextDataModule",
    "collate_windows",
    "decode",
    "encode",
    "load_documents",
    "split_documents",
    "windows",
]

EOS_TOKEN_ID = 256
PAD_TOKEN_ID = 257
VOCAB_SIZE = 258
IGNORE_INDEX = -100  # the label of padding: what F.cross_entropy and Hugging Face losses skip

_SPLITS = ("train", "val", "test")


def load_documents() -> dict[str, str]:
    """The corpus: topic name -> text, sorted by name."""
    from pydoc_data.topics import topics  # 0.5 MB of strings: loaded when the data is, not on import

    return dict(sorted(topics.items()))


def split_documents(
    sizes: Mapping[str, int], seed: int, *, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> dict[str, list[str]]:
    """Split whole documents into ``{"train", "val", "test"}`` by their share of the corpus.

    The documents, sorted by name, are visited in a permutation drawn from ``seed``; each goes to
    validation if it fits in what is left of validation's share (``val_fraction`` of the total size),
    else to test if it fits in test's share, else to training. The held-out splits thus get at most
    their share and, with many small documents, close to it; a document larger than a held-out share
    always trains. (Fractions of the documents would not do: this corpus's sizes range from 0.2 to
    63 kB, and one seed's validation split would hold 4 % of the text, another's 27 %.)

    Args:
        sizes: document name -> size (e.g. its number of bytes).
        seed: seed of the visiting order.
        val_fraction: validation's share of the total size.
        test_fraction: test's share of the total size.

    Returns:
        The sorted names of each split; every document is in exactly one.

    Example::

        >>> split = split_documents({f"doc{i}": 10 for i in range(10)}, seed=0)
        >>> [len(split[name]) for name in ("train", "val", "test")]
        [8, 1, 1]
    """
    names = sorted(sizes)
    total = sum(sizes.values())
    room = {"val": val_fraction * total, "test": test_fraction * total}
    chosen: dict[str, list[str]] = {split: [] for split in _SPLITS}
    for i in torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist():
        name = names[i]
        split = next((held for held in ("val", "test") if sizes[name] <= room[held]), "train")
        if split != "train":
            room[split] -= sizes[name]
        chosen[split].append(name)
    return {split: sorted(chosen[split]) for split in _SPLITS}


def encode(text: str) -> list[int]:
    """``text``'s UTF-8 bytes followed by :data:`EOS_TOKEN_ID`."""
    return [*text.encode("utf-8"), EOS_TOKEN_ID]


def decode(tokens: Sequence[int] | Tensor) -> str:
    """The text of byte tokens: stops at the first :data:`EOS_TOKEN_ID`, skips padding and ``-100``.

    Example::

        >>> decode(encode("héllo") + [PAD_TOKEN_ID])
        'héllo'
    """
    if isinstance(tokens, Tensor):
        tokens = tokens.tolist()
    data = bytearray()
    for token in tokens:
        if token == EOS_TOKEN_ID:
            break
        if 0 <= token < 256:
            data.append(token)
    return data.decode("utf-8", errors="replace")  # a window may cut a multi-byte character


def windows(tokens: Sequence[int], seq_len: int) -> list[list[int]]:
    """Cut a document's tokens into windows of at most ``seq_len`` that overlap by one token.

    Window ``k`` starts at ``k * (seq_len - 1)``: its first token is the last of window ``k - 1``, so
    that every token but the document's first is predicted exactly once (the logits at a position
    predict the next token of the same window). The last window is shorter unless the document fits
    exactly.

    Example::

        >>> windows(list(range(10)), seq_len=4)
        [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
        >>> windows(list(range(11)), seq_len=4)
        [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9], [9, 10]]
    """
    if seq_len < 2:
        raise ValueError(f"Expected `seq_len` to be >= 2, but got {seq_len}")
    stride = seq_len - 1
    # A window needs a token after its first one, or it predicts nothing.
    return [list(tokens[start : start + seq_len]) for start in range(0, max(len(tokens) - 1, 1), stride)]


def collate_windows(examples: Sequence[Sequence[int]], *, padding_side: Literal["right", "left"] = "right") -> dict[str, Tensor]:
    """Pad windows to the longest into a Hugging Face-style batch.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}``, each ``(B, S)`` int64: the windows padded with
        :data:`PAD_TOKEN_ID`, 1 on real tokens and 0 on padding, and the input ids with ``-100`` on
        padding. The labels are not shifted: the logits at ``t`` predict ``labels[t + 1]``.

    Example::

        >>> batch = collate_windows([[72, 105, 33], [72, 105]], padding_side="left")
        >>> batch["input_ids"].tolist(), batch["labels"][1].tolist()
        ([[72, 105, 33], [257, 72, 105]], [-100, 72, 105])
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"Expected `padding_side` to be 'right' or 'left', but got {padding_side!r}")
    length = max(len(example) for example in examples)
    input_ids = torch.full((len(examples), length), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        where = slice(0, len(example)) if padding_side == "right" else slice(length - len(example), length)
        input_ids[row, where] = torch.as_tensor(example, dtype=torch.long)
        attention_mask[row, where] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _check_int(name: str, value: object, *, minimum: int) -> None:
    # bool is an int subclass; `batch_size=True` is a bug, not a batch size of 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be an int, but got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"Expected `{name}` to be >= {minimum}, but got {value}")


class ByteTextDataModule(L.LightningDataModule):
    """Byte-level text of Python's ``help()`` topics (``pydoc_data.topics``), for language-model distillation.

    The documents are split into train / validation / test whole, so that no text is in two splits:
    validation and test get about ``val_fraction`` and ``test_fraction`` of the tokens (see
    :func:`split_documents`; with the defaults 48 / 21 / 10 of the 79 documents, 80.0 / 10.0 / 10.0 %
    of the tokens and 2,960 / 378 / 372 windows of 128 in Python 3.11). Each document becomes its UTF-8 bytes and an end-of-document
    token, cut into windows of ``seq_len`` tokens that overlap by one token (see :func:`windows`): every
    token but a document's first is a target exactly once, and each document's last window is shorter,
    so batches hold real padding.

    Batches are Hugging Face-style dicts (see :func:`collate_windows`): ``input_ids``,
    ``attention_mask`` and ``labels``, each ``(B, S)`` int64 with ``S <= seq_len``; the labels are the
    input ids with ``-100`` on padding, not shifted. Training windows are shuffled by
    :class:`EpochShuffleSampler` (a function of ``(shuffle_seed, epoch)``: a resumed run sees the same
    batches; under DDP each rank takes its share of one order); validation and test keep document order.

    Args:
        seq_len: Longest window, in tokens (at most the model's ``block_size``).
        batch_size: Training batch size (per process under DDP).
        eval_batch_size: Batch size of the validation, test and predict loaders.
        seed: Seed of the document split and of the ``max_train_windows`` subset.
        val_fraction: Share of the tokens held out for validation (whole documents).
        test_fraction: Share of the tokens held out for testing (whole documents).
        max_train_windows: Keep this many training windows (a seeded random subset, in document order)
            to shorten a demo; None keeps all.
        padding_side: ``"right"`` or ``"left"`` (prompts for generation are padded on the left).
        shuffle_seed: Seed of the training order. Default: ``torch.initial_seed()`` when the loader is
            built, i.e. the run's ``seed_everything`` seed.
        num_workers: DataLoader workers.

    Raises:
        TypeError: If an integer setting is not an int.
        ValueError: If a setting is out of range, the fractions leave no training document, or
            ``padding_side`` is neither ``"right"`` nor ``"left"``.

    Example::

        >>> dm = ByteTextDataModule(seq_len=64, batch_size=4)
        >>> dm.setup("fit")
        >>> sum(len(dm.documents[split]) for split in ("train", "val", "test")) == len(load_documents())
        True
        >>> batch = next(iter(dm.train_dataloader()))
        >>> sorted(batch), batch["input_ids"].shape[0], batch["input_ids"].shape[1] <= 64
        (['attention_mask', 'input_ids', 'labels'], 4, True)
    """

    vocab_size = VOCAB_SIZE
    eos_token_id = EOS_TOKEN_ID
    pad_token_id = PAD_TOKEN_ID

    def __init__(
        self,
        *,
        seq_len: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_train_windows: int | None = None,
        padding_side: Literal["right", "left"] = "right",
        shuffle_seed: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_int("seq_len", seq_len, minimum=2)
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("eval_batch_size", eval_batch_size, minimum=1)
        _check_int("seed", seed, minimum=0)
        _check_int("num_workers", num_workers, minimum=0)
        if max_train_windows is not None:
            _check_int("max_train_windows", max_train_windows, minimum=1)
        if shuffle_seed is not None:
            _check_int("shuffle_seed", shuffle_seed, minimum=0)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"Expected `{name}` to be in [0, 1), but got {value}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"Expected `val_fraction + test_fraction` to be < 1 (documents left to train on), but got "
                f"{val_fraction} + {test_fraction}"
            )
        if padding_side not in ("right", "left"):
            raise ValueError(f"Expected `padding_side` to be 'right' or 'left', but got {padding_side!r}")
        self.save_hyperparameters()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.max_train_windows = max_train_windows
        self.padding_side = padding_side
        self.shuffle_seed = shuffle_seed
        self.num_workers = num_workers

        self.documents: dict[str, list[str]] | None = None  # split -> topic names
        self.train_dataset: list[list[int]] | None = None  # windows of token ids
        self.val_dataset: list[list[int]] | None = None
        self.test_dataset: list[list[int]] | None = None

    @override
    def setup(self, stage: str | None = None) -> None:
        """Split the documents and cut them into windows (the same on every call and every process)."""
        if self.documents is not None:
            return
        texts = load_documents()
        tokens = {name: encode(text) for name, text in texts.items()}
        sizes = {name: len(ids) for name, ids in tokens.items()}
        self.documents = split_documents(sizes, self.seed, val_fraction=self.val_fraction, test_fraction=self.test_fraction)
        cut = {split: [w for name in names for w in windows(tokens[name], self.seq_len)] for split, names in self.documents.items()}
        train = cut["train"]
        if self.max_train_windows is not None and self.max_train_windows < len(train):
            generator = torch.Generator().manual_seed(self.seed)
            keep = torch.randperm(len(train), generator=generator)[: self.max_train_windows].sort().values.tolist()
            train = [train[i] for i in keep]
        self.train_dataset, self.val_dataset, self.test_dataset = train, cut["val"], cut["test"]

    def _collate(self, examples: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        return collate_windows(examples, padding_side=self.padding_side)

    def _data_parallel(self) -> tuple[int, int]:
        """``(num_replicas, rank)`` of this process: the Trainer's, or ``(1, 0)`` without a distributed one."""
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if not kwargs:  # None for single-device strategies
            return 1, 0
        return int(kwargs["num_replicas"]), int(kwargs["rank"])

    def _loader(self, dataset: list[list[int]] | None, batch_size: int, *, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("The datasets are not loaded yet: call `setup()` first (the Trainer does).")
        sampler = None
        if shuffle:
            seed = torch.initial_seed() if self.shuffle_seed is None else self.shuffle_seed
            num_replicas, rank = self._data_parallel()
            sampler = EpochShuffleSampler(len(dataset), seed, num_replicas=num_replicas, rank=rank)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self._collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of ``batch_size`` windows."""
        return self._loader(self.train_dataset, self.batch_size, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        """Validation batches of ``eval_batch_size`` windows, in document order."""
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        """Test batches of ``eval_batch_size`` windows, in document order."""
        return self._loader(self.test_dataset, self.eval_batch_size, shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        """The test batches."""
        return self.test_dataloader()
