"""`lightning-kd experiment=lm` through Hydra on a tiny budget: the zoo's GPT pair and a Hugging Face GPT-2 pair
built from configs. The report's bits per token are recomputed here in float64 from the saved student."""

from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from lightning_kd import cli
from lightning_kd.batch import causal_lm_targets
from lightning_kd.soft_targets import SoftTargetStore

TINY = (
    "callbacks=quiet", "logger=none", "teacher.epochs=1", "student.epochs=1", "data.max_train_windows=48",
    "data.batch_size=16", "data.eval_batch_size=64", "report.latency_batches=2", "report.plot=false",
)
TINY_ZOO = ("teacher.model.n_layer=1", "teacher.model.n_embd=32", "teacher.model.n_head=2",
            "student.model.n_layer=1", "student.model.n_embd=16", "student.model.n_head=2")
TINY_HF = ("teacher=hf_gpt2", "student=hf_gpt2_small", "teacher.model.n_layer=1", "teacher.model.n_embd=32",
           "teacher.model.n_head=2", "student.model.n_layer=1", "student.model.n_embd=16")


def make_cfg(run_dir: Path, *overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="lightning_kd.conf", version_base="1.3"):
            return compose(config_name="config", overrides=[f"run_dir={run_dir}", "experiment=lm", *TINY, *overrides],
                           return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


@torch.no_grad()
def bits_per_token_float64(model: torch.nn.Module, datamodule) -> float:
    """Mean next-token cross-entropy over every real (non-padding) next token of the test split, in bits, float64."""
    model = model.double().eval()
    total, count = 0.0, 0
    for batch in datamodule.test_dataloader():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = getattr(logits, "logits", logits).double()
        log_p = torch.log_softmax(logits, -1)
        for b in range(len(logits)):
            real = batch["attention_mask"][b].nonzero().flatten().tolist()
            for i, j in zip(real[:-1], real[1:]):
                total -= log_p[b, i, batch["input_ids"][b, j]].item()
                count += 1
    return total / count / math.log(2)


@pytest.mark.slow
@pytest.mark.parametrize("models", [TINY_ZOO, TINY_HF], ids=["zoo_gpt", "hf_gpt2"])
def test_lm_experiment_reports_bits_per_token_that_the_saved_student_gives(tmp_path, models):
    if models is TINY_HF:
        pytest.importorskip("transformers")
    cfg = make_cfg(tmp_path, *models)
    cli.train(cfg)
    report = json.loads((tmp_path / "report.json").read_text())
    entries = report["entries"]
    assert list(entries) == ["teacher", "student_scratch", "student_distilled", "student_distilled_stored", "student_on_policy"]
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("test")
    for stage in ("student_scratch", "student_distilled", "student_distilled_stored", "student_on_policy"):
        model = hydra.utils.instantiate(cfg.student.model, _convert_="all")
        model.load_state_dict(torch.load(tmp_path / stage / "model.pt", weights_only=True))
        assert entries[stage]["test_bits_per_token"] == pytest.approx(bits_per_token_float64(model, datamodule), rel=1e-4)
        assert entries[stage]["params"] == sum(p.numel() for p in model.parameters())
        assert entries[stage]["tokens_per_s"] > 0
    assert entries["student_distilled"]["teacher_test_bits_per_token"] == pytest.approx(entries["teacher"]["test_bits_per_token"], rel=1e-5)
    checkpoint = torch.load(tmp_path / "student_distilled" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(key.startswith("teacher.") for key in checkpoint["state_dict"])
    assert "bits/token" in (tmp_path / "report.md").read_text()
    store = SoftTargetStore(tmp_path / "soft_targets")  # the stored stage read the teacher's top-16 on valid tokens only
    datamodule.setup("fit")
    valid = sum(int((causal_lm_targets(b, b["labels"]) != -100).sum()) for b in datamodule.train_dataloader())
    assert store.sequences and store.top_k == 16 and store.manifest["parts"]["train"]["rows"] == valid
