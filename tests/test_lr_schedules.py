"""The learning rate at every optimizer step of tiny fits, against float64 formulas written here.

``lr_scheduler`` as a :class:`~lightning_kd.schedules.Schedule` (warm-up then cosine), and partial schedulers
told the run's length (``T_max``, ``num_training_steps``, ``total_steps``). 3 epochs of 4 batches: 12 steps.
"""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd import DistillationModule
from lightning_kd.schedules import Constant, Cosine, Linear

BASE_LR, EPOCHS, BATCHES = 0.1, 3, 4
STEPS = EPOCHS * BATCHES


def toy(features=8, classes=3):
    return nn.Sequential(nn.Linear(features, 6), nn.ReLU(), nn.Linear(6, classes))


def train_loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4 * BATCHES, 8, generator=g), torch.randint(0, 3, (4 * BATCHES,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


class LearningRates(Callback):
    """The learning rate each optimizer step uses, and the one left after the last step."""

    def __init__(self):
        self.values = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.values.append(trainer.optimizers[0].param_groups[0]["lr"])


def fit(lr_scheduler, *, max_epochs=EPOCHS, root=None, resume=None, callbacks=()):
    torch.manual_seed(0)
    module = DistillationModule(toy(), toy(), optimizer=partial(torch.optim.SGD, lr=BASE_LR), lr_scheduler=lr_scheduler)
    rates = LearningRates()
    trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=root is not None, default_root_dir=root, limit_val_batches=0,
                        callbacks=[rates, *callbacks])
    trainer.fit(module, train_loader(), ckpt_path=resume, weights_only=True)
    return rates.values, trainer


def warmup_cosine(k: int, total: int, warmup: int, end: float = 0.0) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then a half cosine from 1 to ``end`` at step ``total``."""
    if k < warmup:
        return k / warmup
    progress = (k - warmup) / (total - warmup)
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------- a Schedule: warm-up, then cosine


@pytest.mark.parametrize("warmup, steps", [(3, 3), (0.25, 3), (5, 5)], ids=["3_steps", "a_quarter_of_12", "5_steps"])
@pytest.mark.parametrize("end", [0.0, 0.1], ids=["to_zero", "to_a_tenth"])
def test_warmup_then_cosine_at_every_step(warmup, steps, end):
    rates, trainer = fit(Cosine(1.0, end, warmup=warmup, warmup_start=0.0))
    assert trainer.global_step == STEPS
    expected = [BASE_LR * warmup_cosine(k, STEPS, steps, end) for k in range(STEPS)]
    assert rates == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert rates[0] == 0.0 and max(rates) == pytest.approx(BASE_LR, rel=1e-12)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(BASE_LR * end, abs=1e-15)  # after the last step


def test_the_warmup_cosine_rates_survive_a_resume(tmp_path):
    schedule = Cosine(1.0, 0.0, warmup=5, warmup_start=0.0)
    straight, _ = fit(schedule)
    first, _ = fit(schedule, max_epochs=1, root=tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    rest, _ = fit(schedule, root=tmp_path / "again", resume=str(tmp_path / "last.ckpt"))
    assert len(first) == BATCHES and first + rest == straight


def test_the_cosine_string_is_a_cosine_to_zero_without_warmup():
    rates, _ = fit("cosine")
    assert rates == pytest.approx([BASE_LR * warmup_cosine(k, STEPS, 0) for k in range(STEPS)], rel=1e-9, abs=1e-15)


# ---------------------------------------------------------------------- partials told the run's length


def test_a_partial_with_t_max_unset_gets_the_runs_steps_and_is_stepped_every_step():
    rates, trainer = fit(partial(torch.optim.lr_scheduler.CosineAnnealingLR, eta_min=0.01))
    (config,) = trainer.lr_scheduler_configs
    assert config.interval == "step" and config.scheduler.T_max == STEPS
    expected = [0.01 + (BASE_LR - 0.01) * 0.5 * (1.0 + math.cos(math.pi * k / STEPS)) for k in range(STEPS)]
    assert rates == pytest.approx(expected, rel=1e-9)


def linear_with_warmup(optimizer, num_warmup_steps, num_training_steps, last_epoch=-1):
    """transformers' get_linear_schedule_with_warmup, written out: its signature is what matters here."""

    def factor(step):
        if step < num_warmup_steps:
            return step / max(1, num_warmup_steps)
        return max(0.0, (num_training_steps - step) / max(1, num_training_steps - num_warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch)


def test_a_transformers_style_factory_gets_num_training_steps():
    rates, _ = fit(partial(linear_with_warmup, num_warmup_steps=2))
    expected = [BASE_LR * (k / 2 if k < 2 else (STEPS - k) / (STEPS - 2)) for k in range(STEPS)]
    assert rates == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_one_cycle_gets_total_steps_unless_it_gives_epochs():
    _, trainer = fit(partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=BASE_LR))
    assert trainer.lr_scheduler_configs[0].scheduler.total_steps == STEPS
    own = {"scheduler": partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=BASE_LR, epochs=EPOCHS + 1, steps_per_epoch=BATCHES),
           "interval": "step"}
    _, trainer = fit(own)
    assert trainer.lr_scheduler_configs[0].scheduler.total_steps == (EPOCHS + 1) * BATCHES  # its own, kept


def test_a_scheduler_dict_stepped_every_epoch_gets_the_epochs():
    rates, trainer = fit({"scheduler": partial(torch.optim.lr_scheduler.CosineAnnealingLR), "interval": "epoch"})
    assert trainer.lr_scheduler_configs[0].scheduler.T_max == EPOCHS
    expected = [BASE_LR * 0.5 * (1.0 + math.cos(math.pi * (k // BATCHES) / EPOCHS)) for k in range(STEPS)]
    assert rates == pytest.approx(expected, rel=1e-9)


def test_a_given_t_max_is_kept_and_a_bare_partial_still_steps_every_epoch():
    rates, trainer = fit(partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=6))
    (config,) = trainer.lr_scheduler_configs
    assert config.interval == "epoch" and config.scheduler.T_max == 6
    expected = [BASE_LR * 0.5 * (1.0 + math.cos(math.pi * (k // BATCHES) / 6)) for k in range(STEPS)]
    assert rates == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------------- refused


def two_lengths(optimizer, total_steps, T_max):
    return torch.optim.lr_scheduler.StepLR(optimizer, 1)


@pytest.mark.parametrize(
    "lr_scheduler, match",
    [
        (Linear(1.0, -0.5), r"Expected the `lr_scheduler` schedule .* to stay >= 0, but .* goes down to -0.5"),
        (Cosine(1.0, 0.0, warmup=3), r"to say where its warm-up starts: set `warmup_start=0.0`"),
        (partial(two_lengths), r"leaves several run-length parameters unset \(total_steps, T_max\).*ambiguous"),
        ({"scheduler": partial(two_lengths), "interval": "step"}, r"several run-length parameters unset"),
        ("warmup_cosine", r"Unknown `lr_scheduler` 'warmup_cosine'. Expected None, 'cosine', a lightning_kd.schedules.Schedule"),
    ],
    ids=["negative_multiplier", "warmup_without_start", "two_unset_lengths", "two_unset_lengths_in_a_dict", "unknown_name"],
)
def test_bad_schedules_are_refused_when_the_module_is_built(lr_scheduler, match):
    with pytest.raises(ValueError, match=match):
        DistillationModule(toy(), toy(), lr_scheduler=lr_scheduler)


def test_a_frequency_with_an_unset_length_is_refused():
    config = {"scheduler": partial(torch.optim.lr_scheduler.CosineAnnealingLR), "interval": "step", "frequency": 2}
    with pytest.raises(ValueError, match=r"`frequency` to be 1 when its scheduler is told the run's length \(`T_max` unset\)"):
        fit(config)


def test_a_schedule_over_an_endless_run_is_refused():
    module = DistillationModule(toy(), toy(), lr_scheduler=Constant(1.0))
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    with pytest.raises(RuntimeError, match=r"needs a finite run: set `max_epochs` or `max_steps`"):
        trainer.fit(module, train_loader())


def test_the_config_builds_the_schedule():
    """`student.lr_scheduler={_target_: lightning_kd.schedules.Cosine, ...}` reaches the module as the Schedule."""
    from omegaconf import OmegaConf

    from lightning_kd import stages

    recipe = OmegaConf.create({"optimizer": None, "lr_scheduler": {"_target_": "lightning_kd.schedules.Cosine", "start": 1.0,
                                                                   "end": 0.0, "warmup": 0.05, "warmup_start": 0.0}})
    assert stages._recipe(recipe)["lr_scheduler"] == Cosine(1.0, 0.0, warmup=0.05, warmup_start=0.0)
