"""The soft-target store as a safe file format: it never deletes what it did not create, says whether a folder
holds a finished store without touching it, refuses manifests that break the schema, gives every file the user's
umask, refuses iterable datasets from every entry point, never seals a store of non-finite teacher outputs, and
reports a full disk instead of dying with SIGBUS."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_kd.soft_targets.build import StoreWriter, build_soft_targets
from lightning_kd.data.augment import RandomShift
from lightning_kd.soft_targets.batches import SoftTargetDataModule, with_soft_targets
from lightning_kd.soft_targets.store import (
    SoftTargetStore,
    prepare_store_path,
    remove_incomplete_store,
    store_spec,
    store_state,
)
from lightning_kd.io import file_sha256

N, D, C, B = 40, 6, 5, 8


@pytest.fixture
def data():
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(0))
    x[:, 0] = torch.arange(N, dtype=torch.float32)  # feature 0 is the sample index: a teacher can poison chosen samples
    return TensorDataset(x, torch.randint(0, C, (N,)))


def loader(dataset, batch_size=B):
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(3))


def trainer():
    return L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)


class Poisoned(nn.Module):
    """A linear teacher whose outputs for samples ``rows`` get ``value``: in class 0 only, or the whole row."""

    def __init__(self, value=None, rows=(), whole_row=False):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(D, C)
        self.value, self.rows, self.whole_row = value, list(rows), whole_row

    def forward(self, x):
        out = self.linear(x)
        if self.value is not None:
            hit = torch.isin(x[:, 0].round().long(), torch.tensor(self.rows))
            if self.whole_row:
                out[hit] = self.value
            else:
                out[hit, 0] = self.value
        return out


def build(data, path, teacher=None, **kwargs):
    return build_soft_targets(teacher or Poisoned().eval(), loader(data), path, trainer=trainer(), **kwargs)


def interrupted_store(data, path):
    """A real unfinished build of ours: the teacher turns NaN at batch 2, after the files exist."""
    with pytest.raises(RuntimeError, match="not finite"):
        build(data, path, Poisoned(float("nan"), rows=[20]))
    assert store_state(path) == "incomplete"
    return path


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (and root itself) with its content: to show that nothing was touched."""
    items = {".": None}
    for p in sorted(root.rglob("*")):
        items[str(p.relative_to(root))] = p.read_bytes() if p.is_file() and not p.is_symlink() else os.readlink(p) if p.is_symlink() else None
    return items


# ---------------------------------------------------------------------------------- 1. never delete what we did not create
def _user_manifest(d, data):  # the case: any manifest.json without "complete": true
    (d / "manifest.json").write_text('{"name": "my dataset"}')
    (d / "notes.txt").write_text("mine")
    (d / "sub").mkdir()
    (d / "sub" / "data.bin").write_bytes(b"\x00\x01")


def _manifest_complete_false(d, data):
    (d / "manifest.json").write_text('{"complete": false, "parts": {"train": {}}}')
    (d / "train").mkdir()
    (d / "train" / "logits.npy").write_bytes(b"user bytes")


def _other_kind(d, data):
    (d / "manifest.json").write_text('{"kind": "my tool", "format": 2, "complete": false}')


def _format1_unfinished(d, data):  # an interrupted build of the previous version: no marker, so never deleted
    (d / "manifest.json").write_text('{"format": 1, "complete": false, "parts": {"train": {}}}')
    (d / "train").mkdir()
    (d / "train" / "logits.npy").write_bytes(b"\x93NUMPY")


def _not_json(d, data):
    (d / "manifest.json").write_bytes(b"\xff\xfe not json")


def _no_manifest(d, data):
    (d / "train").mkdir()
    (d / "train" / "logits.npy").write_bytes(b"x")


def _ours_plus(extra):
    def make(d, data):
        interrupted_store(data, d)
        extra(d)
    return make


def _ours_bad_part_name(d, data):
    interrupted_store(data, d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["parts"]["../outside"] = manifest["parts"].pop("train")
    (d / "manifest.json").write_text(json.dumps(manifest))


def _ours_symlinked_part(d, data):
    interrupted_store(data, d)
    user = d.parent / "user_elsewhere"
    user.mkdir()
    (user / "logits.npy").write_bytes(b"user array")
    shutil.rmtree(d / "train")  # the test's own setup, not the library
    (d / "train").symlink_to(user, target_is_directory=True)


FOREIGN = {
    "user-manifest-without-complete": (_user_manifest, r"has no `kind: lightning-kd soft-target store` marker"),
    "complete-false-without-marker": (_manifest_complete_false, r"has no `kind: lightning-kd soft-target store` marker"),
    "manifest-of-another-kind": (_other_kind, r"has no `kind: lightning-kd soft-target store` marker"),
    "format-1-unfinished": (_format1_unfinished, r"unfinished build of a format-1 store, which carries no marker"),
    "manifest-not-json": (_not_json, r"manifest.json is not readable as JSON"),
    "no-manifest": (_no_manifest, r"it has no manifest.json"),
    "ours-plus-user-file": (_ours_plus(lambda d: (d / "notes.txt").write_text("mine")), r"does not create: notes.txt"),
    "ours-plus-file-in-part": (_ours_plus(lambda d: (d / "train" / "mine.txt").write_text("mine")), r"does not create: train/mine.txt"),
    "ours-plus-unknown-npy": (_ours_plus(lambda d: np.save(d / "train" / "extra.npy", np.zeros(3))), r"does not create: train/extra.npy"),
    "ours-with-part-../outside": (_ours_bad_part_name, r"lists part names that are not plain folder names"),
    "ours-with-symlinked-part": (_ours_symlinked_part, r"does not create: train"),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_a_directory_that_is_not_our_unfinished_store_is_never_deleted(tmp_path, data, case):
    make, why = FOREIGN[case]
    d = tmp_path / "store"
    d.mkdir()
    make(d, data)
    before = snapshot(tmp_path)
    assert store_state(d) == "foreign"
    with pytest.raises(FileExistsError, match=rf"The store path {re.escape(str(d))} \(`build_soft_targets\(path=...\)`\) is not empty and is not a soft-target store.*{why}.*Nothing was deleted"):
        prepare_store_path(d)  # what the soft_targets stage calls instead of rmtree
    with pytest.raises(RuntimeError, match=rf"Refusing to remove {re.escape(str(d))}: .*{why}.*nothing was deleted"):
        remove_incomplete_store(d)
    with pytest.raises(FileExistsError, match=rf"{why}.*Nothing was deleted"):
        build(data, d)
    assert snapshot(tmp_path) == before  # every file of the user, byte for byte


def test_a_path_that_is_a_file_is_refused_and_kept(tmp_path, data):
    f = tmp_path / "store"
    f.write_text("mine")
    assert store_state(f) == "foreign"
    with pytest.raises(FileExistsError, match=r"it is not a directory. Nothing was deleted"):
        prepare_store_path(f)
    assert f.read_text() == "mine"


def test_a_store_path_that_links_to_a_directory_is_used_and_a_broken_link_is_refused(tmp_path, data):
    (tmp_path / "scratch").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "scratch", target_is_directory=True)
    interrupted_store(data, tmp_path / "link")
    assert prepare_store_path(tmp_path / "link") is False and (tmp_path / "link").is_symlink()
    build(data, tmp_path / "link")
    assert store_state(tmp_path / "scratch") == "complete"
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match=r"it is a broken symbolic link. Nothing was deleted"):
        build(data, tmp_path / "broken")
    assert (tmp_path / "broken").is_symlink()


def test_our_unfinished_store_is_removed_file_by_file_and_rebuilt_in_the_users_folder(tmp_path, data):
    d = interrupted_store(data, tmp_path / "store")
    (tmp_path / "beside.txt").write_text("mine")  # next to the store: untouched
    with pytest.raises(RuntimeError, match=r"is incomplete: its build did not finish. Remove it with .*remove_incomplete_store"):
        SoftTargetStore(d)
    with pytest.raises(FileExistsError, match=r"unfinished build of a soft-target store .*Remove it with `lightning_kd.soft_targets.store.remove_incomplete_store"):
        build(data, d)
    assert prepare_store_path(d) is False  # removed: build it
    assert d.is_dir() and not any(d.iterdir()) and store_state(d) == "empty"  # the folder is kept (it may be the user's)
    assert (tmp_path / "beside.txt").read_text() == "mine"
    store = build(data, d)
    assert store_state(d) == "complete" and prepare_store_path(d) is True  # reused, not removed
    with torch.no_grad():
        assert torch.equal(store.lookup("train", torch.arange(N)), Poisoned()(data.tensors[0]))


def test_remove_incomplete_store_lists_what_it_removed_and_refuses_a_finished_store(tmp_path, data):
    d = interrupted_store(data, tmp_path / "store")
    removed = {str(p.relative_to(d)) for p in remove_incomplete_store(d)}
    assert removed == {"manifest.json", "train", "train/logits.npy", "train/writes.npy"}
    assert remove_incomplete_store(d) == [] and remove_incomplete_store(tmp_path / "nowhere") == []
    build(data, d)
    before = snapshot(d)
    with pytest.raises(RuntimeError, match=r"Refusing to remove .*: it holds a finished soft-target store"):
        remove_incomplete_store(d)
    with pytest.raises(FileExistsError, match=r"is not empty: it holds a finished soft-target store. Open it with `SoftTargetStore\(path\)`, or choose another path. Nothing was deleted."):
        build(data, d)
    assert snapshot(d) == before


# ---------------------------------------------------------------------------------- is_complete: ask without touching
def _finished(d, data):
    build(data, d)


def _interrupted(d, data):
    interrupted_store(data, d)


def _empty(d, data):
    d.mkdir()


def _missing(d, data):
    pass


def _a_file(d, data):
    d.write_text("mine")


def _broken_link(d, data):
    d.symlink_to(d.parent / "nowhere")


def _foreign(make):
    def folder(d, data):
        d.mkdir()
        make(d, data)
    return folder


COMPLETENESS = {
    "finished-store": (_finished, True),
    "interrupted-build": (_interrupted, False),
    "empty-folder": (_empty, False),
    "missing-path": (_missing, False),
    "a-file": (_a_file, False),
    "broken-link": (_broken_link, False),
    **{f"foreign-{case}": (_foreign(make), False) for case, (make, _) in FOREIGN.items()},
}


@pytest.mark.parametrize("case", list(COMPLETENESS))
def test_is_complete_is_true_only_for_a_finished_store_and_touches_nothing(tmp_path, data, case):
    make, expected = COMPLETENESS[case]
    d = tmp_path / "store"
    make(d, data)
    before = snapshot(tmp_path)
    assert SoftTargetStore.is_complete(d) is expected
    assert SoftTargetStore.is_complete(str(d)) is expected
    if expected:  # what it promises: the store opens and reads
        with torch.no_grad():
            assert torch.equal(SoftTargetStore(d).lookup("train", torch.arange(N)), Poisoned()(data.tensors[0]))
    else:  # and what False means: it would not open
        with pytest.raises((FileNotFoundError, RuntimeError)):
            SoftTargetStore(d)
    assert snapshot(tmp_path) == before  # asking (and opening) changes nothing, byte for byte


# ---------------------------------------------------------------------------------- 2. the manifest's schema
def _set(*keys, value):
    def edit(m):
        for k in keys[:-1]:
            m = m[k]
        m[keys[-1]] = value
    return edit


def _drop(*keys):
    def edit(m):
        for k in keys[:-1]:
            m = m[k]
        del m[keys[-1]]
    return edit


def _rename_part(name):
    def edit(m):
        m["parts"][name] = m["parts"].pop("train")
    return edit


def _rename_file(name):
    def edit(m):
        files = m["parts"]["train"]["files"]
        files[name] = files.pop("logits")
    return edit


BAD = "is invalid: "
SCHEMA = {
    "part-../outside": (_rename_part("../outside"), BAD + r"expected `parts` to be keyed by plain names .*but got '../outside'"),
    "part-..": (_rename_part(".."), r"but got '\.\.'"),
    "part-a/b": (_rename_part("a/b"), r"but got 'a/b'"),
    "part-absolute": (_rename_part("/etc"), r"but got '/etc'"),
    "part-hidden": (_rename_part(".hidden"), r"but got '.hidden'"),
    "part-trailing-newline": (_rename_part("train\n"), r"but got 'train\\n'"),
    "file-../../evil": (_rename_file("../../evil"), BAD + r"expected `parts.train.files` to be the arrays \['logits', 'writes'\], but got \['../../evil', 'writes'\]"),
    "file-unknown": (_rename_file("weights"), r"the arrays \['logits', 'writes'\], but got \['weights', 'writes'\]"),
    "missing-parts": (_drop("parts"), BAD + r"the required key `parts` is missing"),
    "missing-epochs": (_drop("epochs"), r"the required key `epochs` is missing"),
    "missing-dtype": (_drop("dtype"), r"the required key `dtype` is missing"),
    "missing-top_k": (_drop("top_k"), r"the required key `top_k` is missing"),
    "missing-output_shape": (_drop("output_shape"), r"the required key `output_shape` is missing"),
    "missing-teacher.fingerprint": (_drop("teacher", "fingerprint"), r"the required key `teacher.fingerprint` is missing"),
    "missing-identity.length": (_drop("parts", "train", "identity", "length"), r"the required key `parts.train.identity.length` is missing"),
    "missing-files": (_drop("parts", "train", "files"), r"the required key `parts.train.files` is missing"),
    "missing-bytes": (_drop("parts", "train", "files", "logits", "bytes"), r"the required key `parts.train.files.logits.bytes` is missing"),
    "dtype-object": (_set("dtype", value="object"), r"expected `dtype` to be one of float16, bfloat16, float32, but got 'object'"),
    "dtype-float64": (_set("dtype", value="float64"), r"but got 'float64'"),
    "top_k-string": (_set("top_k", value="3"), r"expected `top_k` to be null or an int >= 1, but got '3'"),
    "top_k-0": (_set("top_k", value=0), r"expected `top_k` to be null or an int >= 1, but got 0"),
    "top_k-true": (_set("top_k", value=True), r"but got True"),
    "epochs-0": (_set("epochs", value=0), r"expected `epochs` to be an int >= 1, but got 0"),
    "epochs-float": (_set("epochs", value=1.0), r"expected `epochs` to be an int >= 1, but got 1.0"),
    "output_shape-0": (_set("output_shape", value=[0]), r"expected `output_shape` to be a list of ints >= 1, but got \[0\]"),
    "shape-inconsistent": (_set("parts", "train", "files", "logits", "shape", value=[1, N, C + 1]), r"expected `parts.train.files.logits.shape` to be \[1, 40, 5\]"),
    "length-inconsistent": (_set("parts", "train", "identity", "length", value=N + 1), r"expected `parts.train.files.writes.shape` to be \[1, 41\]"),
    "file-dtype-inconsistent": (_set("parts", "train", "files", "logits", "dtype", value="float64"), r"expected `parts.train.files.logits.dtype` to be 'float32', but got 'float64'"),
    "bytes-too-few": (_set("parts", "train", "files", "logits", "bytes", value=10), r"expected `parts.train.files.logits.bytes` to be >= 800"),
    "sha256-not-hex": (_set("parts", "train", "files", "logits", "sha256", value="x" * 64), r"expected `parts.train.files.logits.sha256` to be 64 lowercase hex"),
    "sha256-too-long": (_set("parts", "train", "files", "logits", "sha256", value="a" * 65), r"expected `parts.train.files.logits.sha256` to be 64 lowercase hex"),
    "augmentation_params-without-augmentation": (_set("augmentation_params", value=2), r"expected `augmentation_params` to be null without augmentation"),
    "kind-other": (_set("kind", value="my tool"), r"is not a soft-target store manifest: its `kind` is 'my tool'"),
    "format-2-without-kind": (_drop("kind"), r"format 2 needs `kind` 'lightning-kd soft-target store'"),
    "format-string": (_set("format", value="2"), r"has format '2', but this lightning-kd \(.*\) reads formats 1 and 2"),
}


@pytest.fixture
def built(tmp_path, data):
    store = build(data, tmp_path / "st")
    return store.path, json.loads((store.path / "manifest.json").read_text())


@pytest.mark.parametrize("case", list(SCHEMA))
def test_a_manifest_that_breaks_the_schema_is_refused_naming_the_key_and_the_file(built, tmp_path, case):
    path, manifest = built
    (tmp_path / "outside").mkdir()  # what `../outside` would have read
    np.save(tmp_path / "outside" / "logits.npy", np.zeros((1, N, C), np.float32))
    edit, match = SCHEMA[case]
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(tmp_path)
    for verify in (True, False):
        with pytest.raises(RuntimeError, match=match) as info:
            SoftTargetStore(path, verify=verify)
        if BAD in match:
            assert f"'{path / 'manifest.json'}'" in str(info.value)
    assert snapshot(tmp_path) == before  # opening deletes nothing


def test_a_manifest_that_is_not_an_object_is_refused(built):
    path, _ = built
    (path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(RuntimeError, match=r"manifest.json' is invalid: expected a JSON object, but got list"):
        SoftTargetStore(path)


def _npy_with_header(path: Path, descr: str, shape) -> None:
    """A .npy file whose header claims ``descr`` (e.g. a pickled object array), padded to ``path``'s size."""
    size = path.stat().st_size
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple(shape)}, }}".encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    raw = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header
    path.write_bytes(raw + b"\x00" * (size - len(raw)))


@pytest.mark.parametrize(
    ("descr", "match"),
    [("|O", r"train/logits.npy is not a plain .npy array \(.*Python objects"), ("<i4", r"train/logits.npy holds int32 \[1, 40, 5\] in \d+ bytes, the manifest says float32")],
    ids=["pickled-object-header", "other-dtype-header"],
)
def test_array_headers_that_disagree_with_the_manifest_are_refused_without_unpickling(built, descr, match):
    path, manifest = built
    file = path / "train" / "logits.npy"
    _npy_with_header(file, descr, (1, N, C))
    manifest["parts"]["train"]["files"]["logits"]["sha256"] = file_sha256(file)  # a consistent manifest: only the header lies
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError, match=match):
        SoftTargetStore(path)


def test_a_complete_format_1_store_is_still_read(built, data):
    path, manifest = built
    del manifest["kind"]
    manifest["format"] = 1  # exactly what the previous version wrote
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert store_state(path) == "complete" and prepare_store_path(path) is True and SoftTargetStore.is_complete(path)
    with torch.no_grad():
        assert torch.equal(SoftTargetStore(path).lookup("train", torch.arange(N)), Poisoned()(data.tensors[0]))


def test_a_loader_name_that_is_not_a_plain_folder_name_is_refused_before_anything_is_written(tmp_path, data):
    with pytest.raises(ValueError, match=r"Expected the names of the training loaders .* to be plain names .*, but got '../x'"):
        build_soft_targets(Poisoned(), CombinedLoader({"../x": loader(data)}), tmp_path / "st", trainer=trainer())
    assert sorted(os.listdir(tmp_path)) == []


# ---------------------------------------------------------------------------------- 3. the user's umask for every file
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)], ids=["umask-022", "umask-002", "umask-077"])
def test_every_file_of_a_store_gets_the_mode_of_the_users_umask(tmp_path, data, umask, mode):
    old = os.umask(umask)
    try:
        build(data, tmp_path / "st", top_k=2, epochs=2, augmentation=RandomShift(1))
    finally:
        os.umask(old)
    entries = {str(p.relative_to(tmp_path / "st")): stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "st").rglob("*")}
    files = {"manifest.json", "train/writes.npy", "train/topk_values.npy", "train/topk_indices.npy", "train/tail_logsumexp.npy", "train/params.npy"}
    assert set(entries) == files | {"train"}  # no temporary file left
    assert {name: m for name, m in entries.items() if name != "train"} == dict.fromkeys(files, mode)
    assert entries["train"] == 0o777 & ~umask


# ---------------------------------------------------------------------------------- 4. iterable datasets, from every entry point
class Stream(IterableDataset):
    def __iter__(self):
        return iter([(torch.randn(D), 0)] * 8)


class StreamData(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(Stream(), batch_size=4)


ITERABLE = r"need a map-style dataset .*but training dataset 'train' is Stream \(an IterableDataset\). Distil online instead \(without `soft_targets`\)"


@pytest.mark.parametrize("entry", ["build_soft_targets", "with_soft_targets", "SoftTargetDataModule"])
def test_an_iterable_training_set_gets_the_online_hint_from_every_entry_point(tmp_path, data, entry):
    store = build(data, tmp_path / "st")
    with pytest.raises(TypeError, match=ITERABLE):
        if entry == "build_soft_targets":
            build_soft_targets(Poisoned(), StreamData(), tmp_path / "other", trainer=trainer())
        elif entry == "with_soft_targets":
            with_soft_targets(DataLoader(Stream(), batch_size=4), store)
        else:
            SoftTargetDataModule(StreamData(), store).train_dataloader()
    assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------------------------- 5. non-finite teacher outputs
NONFINITE = {
    "nan-one-value": (dict(value=float("nan"), rows=[3]), {}, r"batch 0, epoch 0 are not finite: 1 NaN, 0 \+inf and 0 rows entirely -inf, in 1 of the batch's 8 samples \(sample indices 3\)"),
    "+inf-one-value": (dict(value=float("inf"), rows=[17, 19]), {}, r"batch 2, epoch 0 are not finite: 0 NaN, 2 \+inf and 0 rows entirely -inf, in 2 of the batch's 8 samples \(sample indices 17, 19\)"),
    "-inf-whole-row": (dict(value=float("-inf"), rows=[39], whole_row=True), {}, r"batch 4, epoch 0 are not finite: 0 NaN, 0 \+inf and 1 rows entirely -inf, .*\(sample indices 39\)"),
    "nan-whole-row-top-k": (dict(value=float("nan"), rows=[9], whole_row=True), {"top_k": 2}, r"batch 1, epoch 0 are not finite: 5 NaN"),
    "nan-bfloat16": (dict(value=float("nan"), rows=[0]), {"dtype": "bfloat16"}, r"batch 0, epoch 0 are not finite: 1 NaN"),
}


@pytest.mark.parametrize("case", list(NONFINITE))
def test_non_finite_teacher_outputs_leave_the_store_unsealed(tmp_path, data, case):
    poison, kwargs, match = NONFINITE[case]
    with pytest.raises(RuntimeError, match=rf"The teacher's outputs for part 'train', {match}.* is left incomplete \(not sealed\)"):
        build(data, tmp_path / "st", Poisoned(**poison), **kwargs)
    assert json.loads((tmp_path / "st" / "manifest.json").read_text())["complete"] is False
    assert store_state(tmp_path / "st") == "incomplete"
    with pytest.raises(RuntimeError, match="is incomplete"):
        SoftTargetStore(tmp_path / "st")


@pytest.mark.parametrize("top_k", [None, 3], ids=["full", "top-3"])
def test_a_masked_minus_inf_class_is_a_legitimate_output(tmp_path, data, top_k):
    teacher = Poisoned(float("-inf"), rows=range(N))  # class 0 masked everywhere, like a padded vocabulary
    store = build(data, tmp_path / "st", teacher, top_k=top_k)
    with torch.no_grad():
        expected = teacher(data.tensors[0])
    got = store.lookup("train", torch.arange(N))
    if top_k is None:
        assert torch.equal(got, expected)
    else:
        assert torch.equal(got.values, expected.topk(3).values) and torch.isfinite(got.tail_logsumexp).all()


def test_a_writer_whose_write_failed_never_seals(tmp_path, data):
    spec = store_spec({"train": data}, teacher_fingerprint="f" * 64, teacher_class="T", teacher_checkpoint=None, output_shape=[C],
                      dtype="float32", top_k=None, epochs=1, augmentation=None, augmentation_seed=0, world_size=1)
    writer = StoreWriter(tmp_path / "st", spec)
    writer.create()
    writer.open()
    index = torch.arange(N)
    bad = torch.zeros(N, C)
    bad[7, 2] = float("nan")
    with pytest.raises(RuntimeError, match=r"part 'train', batch 5, epoch 0 are not finite: 1 NaN.*sample indices 7\)"):
        writer.write("train", 0, index, bad, None, batch_idx=5)
    writer.write("train", 0, index, torch.zeros(N, C), None)  # every row now written once: only the flag stops the seal
    with pytest.raises(RuntimeError, match=r"a write failed during the build, so the store is not sealed"):
        writer.finish(0.0)
    with pytest.raises(RuntimeError, match=r"outputs for part 'train', batch None, epoch 0 have shape \(40, 4\), but the store holds \(40, 5\)"):
        writer.write("train", 0, index, torch.zeros(N, C - 1), None)
    assert store_state(tmp_path / "st") == "incomplete"


# ---------------------------------------------------------------------------------- 6. disk full
def test_too_little_free_space_is_refused_before_anything_is_written(tmp_path, data, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10))
    with pytest.raises(OSError, match=rf"Not enough disk space for the soft-target store at {re.escape(str(tmp_path / 'st'))}: it needs \d+ bytes, 10 free \(`build_soft_targets\(path=...\)`\).*Nothing was written") as info:
        build(data, tmp_path / "st")
    assert info.value.errno == errno.ENOSPC
    assert store_state(tmp_path / "st") == "missing"


def test_a_full_disk_while_allocating_leaves_a_removable_unsealed_store(tmp_path, data, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"Not enough disk space for the soft-target store at .*: it needs \d+ bytes, \d+ free .*left incomplete \(not sealed\)") as info:
        build(data, tmp_path / "st")
    assert info.value.errno == errno.ENOSPC
    assert store_state(tmp_path / "st") == "incomplete"
    monkeypatch.undo()
    assert prepare_store_path(tmp_path / "st") is False  # the soft_targets stage removes it ...
    build(data, tmp_path / "st")  # ... and builds again
    assert store_state(tmp_path / "st") == "complete"


@pytest.mark.parametrize("how", ["EOPNOTSUPP", "no-posix_fallocate"])
def test_without_fallocate_the_data_blocks_are_written_as_zeros_and_the_store_is_exact(tmp_path, data, monkeypatch, how):
    if how == "EOPNOTSUPP":
        monkeypatch.setattr(os, "posix_fallocate", lambda *a: (_ for _ in ()).throw(OSError(errno.EOPNOTSUPP, "not supported")))
    else:
        monkeypatch.delattr(os, "posix_fallocate")
    store = build(data, tmp_path / "st")
    with torch.no_grad():
        assert torch.equal(store.lookup("train", torch.arange(N)), Poisoned()(data.tensors[0]))


def _tmpfs_available(mnt: Path) -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mnt}"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
def test_a_real_full_file_system_gives_our_error_not_sigbus(tmp_path):
    """Two 1 MiB tmpfs in a user namespace (skipped where unshare is not allowed): the free-space check, then
    (with it faked away) the allocation itself. Before, the process died of SIGBUS with no message."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _tmpfs_available(mnt):
        pytest.skip("needs `unshare -rm` and tmpfs")
    (tmp_path / "mnt2").mkdir()
    script = textwrap.dedent(f"""
        import shutil, lightning as L, torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset
        from lightning_kd.soft_targets.build import build_soft_targets
        from lightning_kd.soft_targets.store import store_state
        data = TensorDataset(torch.randn(2048, 4), torch.zeros(2048, dtype=torch.long))
        real = shutil.disk_usage
        for where, fake in (("{mnt}/st", False), ("{tmp_path}/mnt2/st", True)):
            if fake:  # get past the free-space check to the allocation itself
                shutil.disk_usage = lambda p: real(p)._replace(free=10**12)
            try:  # 2048 x 200 float32 logits = 1.6 MB on a 1 MiB file system
                build_soft_targets(nn.Linear(4, 200), DataLoader(data, batch_size=256), where,
                                   trainer=L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False))
            except OSError as err:
                print("ERRNO", err.errno, store_state(where), err)
    """)
    mounts = f"mount -t tmpfs -o size=1m tmpfs {mnt} && mount -t tmpfs -o size=1m tmpfs {tmp_path / 'mnt2'}"
    run = subprocess.run(["unshare", "-rm", "sh", "-c", f'{mounts} && exec "{sys.executable}" -c "$0"', script],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]  # 135 (or -7) was SIGBUS
    lines = [line for line in run.stdout.splitlines() if line.startswith("ERRNO")]
    for line, state in zip(lines, ("missing", "incomplete"), strict=True):
        assert line.startswith(f"ERRNO {errno.ENOSPC} {state} [Errno {errno.ENOSPC}] Not enough disk space for the soft-target store"), line


# ---------------------------------------------------------------------------- found by trying it as a new user
@pytest.mark.parametrize("link", ["part-folder", "array-file"])
def test_a_symbolic_link_inside_a_store_is_refused(data, tmp_path, link):
    """A tampered store must not read outside its directory through a link (the manifest's checksums would match a copy)."""
    store_dir = tmp_path / "store"
    build(data, store_dir)
    outside = tmp_path / "outside"
    if link == "part-folder":
        shutil.move(store_dir / "train", outside)
        (store_dir / "train").symlink_to(outside, target_is_directory=True)
    else:
        outside.mkdir()
        shutil.move(store_dir / "train" / "logits.npy", outside / "logits.npy")
        (store_dir / "train" / "logits.npy").symlink_to(outside / "logits.npy")
    with pytest.raises(RuntimeError, match=r"is a symbolic link, and a store never reads outside its own directory"):
        SoftTargetStore(store_dir)


def test_a_store_itself_behind_a_link_opens(data, tmp_path):
    build(data, tmp_path / "store")
    (tmp_path / "link").symlink_to(tmp_path / "store", target_is_directory=True)
    assert torch.equal(SoftTargetStore(tmp_path / "link").lookup("train", torch.arange(3)), SoftTargetStore(tmp_path / "store").lookup("train", torch.arange(3)))


@pytest.mark.parametrize("index", [[N], [-1], [0, N + 5]], ids=["one-past-the-end", "negative", "far-out"])
def test_lookup_refuses_indices_outside_the_part(data, tmp_path, index):
    store = build(data, tmp_path / "store")
    with pytest.raises(IndexError, match=rf"Expected sample indices in \[0, {N}\) for part 'train'"):
        store.lookup("train", torch.tensor(index))


def test_lookup_of_an_unknown_part_names_the_parts(data, tmp_path):
    store = build(data, tmp_path / "store")
    with pytest.raises(KeyError, match=r"has no part 'nope'. Expected one of: train"):
        store.lookup("nope", torch.tensor([0]))
