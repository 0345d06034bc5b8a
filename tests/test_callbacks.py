"""DistillationAnnealing: values per step, count_from, dotted paths, resume, logging, several instances, errors."""

import csv
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd.callbacks import DistillationAnnealing
from lightning_kd.schedules import Constant, Cosine, Exponential, Linear, Step

BATCH, N_BATCHES = 4, 3  # 3 optimizer steps per epoch


@pytest.fixture(autouse=True)
def _seed():
    pl.seed_everything(0, workers=True, verbose=False)


class StandIn(pl.LightningModule):
    """A tiny module that reads `temperature` and `alpha` (and `beta`) in each step, like the real one."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3, 2)
        self.temperature = 1.0
        self.alpha = 0.5
        self.beta = 0.0
        self.seen = []  # (global_step, epoch, temperature, alpha, beta) per training step

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((self.global_step, self.current_epoch, self.temperature, self.alpha, self.beta))
        out = self.net(x)
        # Weights depend on the values, so the resume test also checks that they were right.
        soft = nn.functional.mse_loss(out / self.temperature, y / self.temperature)
        hard = nn.functional.mse_loss(out, y)
        return self.alpha * self.temperature**2 * soft + (1 - self.alpha) * hard + self.beta * out.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        n = BATCH * N_BATCHES
        data = TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g))
        return DataLoader(data, batch_size=BATCH, shuffle=False)


class GRLTemperature(nn.Module):
    """Holds a plain float, like CTKD's learned temperature holds its reversal weight."""

    def __init__(self):
        super().__init__()
        self.grl_weight = 0.0


class SoftLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.beta = 0.0
        self.temperature = GRLTemperature()


class WithLoss(StandIn):
    """StandIn with a loss submodule whose options are reached by dotted paths."""

    def __init__(self):
        super().__init__()
        self.soft_loss = SoftLoss()
        self.nested = []  # (global_step, soft_loss.beta, soft_loss.temperature.grl_weight) per step

    def training_step(self, batch, batch_idx):
        self.nested.append((self.global_step, self.soft_loss.beta, self.soft_loss.temperature.grl_weight))
        return super().training_step(batch, batch_idx) + self.soft_loss.beta * self.net.weight.pow(2).sum()


def make_trainer(tmp_path, callbacks, logger=False, **kwargs):
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        default_root_dir=tmp_path,
        deterministic=True,
        **kwargs,
    )


def column(seen, i):
    return [row[i] for row in seen]


# -- values per step / epoch ----------------------------------------------------------------------
def test_sets_attributes_at_each_step(tmp_path):
    temperature, alpha = Cosine(4.0, 1.0, warmup=2, warmup_start=2.0), Linear(0.9, 0.1)
    model = StandIn()
    make_trainer(tmp_path, [DistillationAnnealing(temperature, alpha)], max_epochs=3).fit(model)
    total = 3 * N_BATCHES  # = trainer.estimated_stepping_batches
    assert column(model.seen, 0) == list(range(total))
    assert column(model.seen, 2) == [temperature(s, total) for s in range(total)]
    assert column(model.seen, 3) == [alpha(s, total) for s in range(total)]
    assert model.seen[0][2:4] == (2.0, 0.9) and model.seen[2][2] == 4.0  # warm-up start, warm-up end
    assert column(model.seen, 4) == [0.0] * total  # not annealed: left alone


def test_constant_numbers_and_none(tmp_path):
    model = StandIn()
    make_trainer(tmp_path, [DistillationAnnealing(temperature=3, alpha=None)], max_steps=4).fit(model)
    assert column(model.seen, 2) == [3.0] * 4
    assert column(model.seen, 3) == [0.5] * 4  # alpha=None leaves the module's value


def test_horizon_follows_gradient_accumulation(tmp_path):
    # 2 epochs x 3 batches / 3 accumulated = 2 optimizer steps: the schedule moves per optimizer step.
    model = StandIn()
    cb = DistillationAnnealing(temperature=Linear(4.0, 2.0))
    make_trainer(tmp_path, [cb], max_epochs=2, accumulate_grad_batches=3).fit(model)
    assert column(model.seen, 2) == [4.0] * 3 + [3.0] * 3


def test_schedule_own_total(tmp_path):
    model = StandIn()
    make_trainer(tmp_path, [DistillationAnnealing(alpha=Linear(1.0, 0.0, total=4))], max_steps=6).fit(model)
    assert column(model.seen, 3) == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


def test_interval_epoch(tmp_path):
    temperature = Step([4.0, 2.0, 1.0], milestones=[1, 3])
    model = StandIn()
    cb = DistillationAnnealing(temperature, alpha=Linear(0.0, 1.0), interval="epoch")
    make_trainer(tmp_path, [cb], max_epochs=4).fit(model)
    assert column(model.seen, 1) == [e for e in range(4) for _ in range(N_BATCHES)]
    assert column(model.seen, 2) == [v for v in (4.0, 2.0, 2.0, 1.0) for _ in range(N_BATCHES)]
    assert column(model.seen, 3) == [v for v in (0.0, 0.25, 0.5, 0.75) for _ in range(N_BATCHES)]


def test_hooks_on_a_fake_trainer():
    # The hooks read only these Trainer attributes: check the arithmetic without a fit.
    cb = DistillationAnnealing(temperature=Linear(4.0, 2.0), alpha=0.3, log=False)
    module = StandIn()
    trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=10, callbacks=[cb])
    with pytest.raises(RuntimeError, match="needs the run's horizon"):
        cb.values(trainer)
    cb.on_train_start(trainer, module)
    assert (module.temperature, module.alpha) == (4.0, 0.3)  # set before the first batch
    trainer.global_step = 5  # e.g. resumed mid-run
    cb.on_train_batch_start(trainer, module, None, 0)
    assert (module.temperature, module.alpha) == (3.0, 0.3)
    assert cb.values(trainer) == {"temperature": 3.0, "alpha": 0.3}
    assert cb.state_dict() == {}


# -- count_from -----------------------------------------------------------------------------------
@pytest.mark.parametrize("count_from", [0, 1])
def test_count_from_one_gives_epoch_0_the_papers_first_value(tmp_path, count_from):
    # DKD's reference code: weight min(epoch / 20, 1) for epochs numbered 1..240.
    model = StandIn()
    warmup = Constant(1.0, warmup=20, warmup_start=0.0)
    cb = DistillationAnnealing(schedules={"beta": warmup}, interval="epoch", count_from=count_from)
    make_trainer(tmp_path, [cb], max_epochs=22, limit_train_batches=1).fit(model)
    assert column(model.seen, 1) == list(range(22))
    by_epoch = column(model.seen, 4)
    if count_from == 1:
        assert by_epoch == pytest.approx([min(epoch / 20, 1.0) for epoch in range(1, 23)])
        assert by_epoch[0] == pytest.approx(0.05) and by_epoch[18] == pytest.approx(0.95)
        assert by_epoch[19:] == [1.0, 1.0, 1.0]  # from Lightning's epoch 19, the papers' epoch 20
    else:
        assert by_epoch == pytest.approx([min(epoch / 20, 1.0) for epoch in range(22)])
        assert by_epoch[0] == 0.0 and by_epoch[19] == pytest.approx(0.95) and by_epoch[20] == 1.0


def test_count_from_shifts_steps_too():
    cb = DistillationAnnealing(temperature=Linear(4.0, 2.0), count_from=3, log=False)
    module = StandIn()
    trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=10, callbacks=[cb])
    cb.on_train_start(trainer, module)
    assert module.temperature == Linear(4.0, 2.0)(3, 10) == pytest.approx(3.4)
    trainer.global_step = 8  # 8 + 3 is past the horizon: the end value, held
    assert cb.values(trainer) == {"temperature": 2.0}
    assert cb.state_key != DistillationAnnealing(temperature=Linear(4.0, 2.0), log=False).state_key


# -- dotted paths ---------------------------------------------------------------------------------
def test_dotted_paths_set_nested_attributes(tmp_path):
    beta, grl = Linear(0.0, 1.0), Cosine(0.0, 1.0, total=4)
    schedules = {"soft_loss.beta": beta, "soft_loss.temperature.grl_weight": grl}
    model = WithLoss()
    trainer = make_trainer(tmp_path, [DistillationAnnealing(schedules=schedules)], max_epochs=2)
    trainer.fit(model)
    total = 2 * N_BATCHES
    assert column(model.nested, 0) == list(range(total))
    assert column(model.nested, 1) == pytest.approx([s / 6 for s in range(total)])  # Linear, horizon 6 steps
    # half cosine 0 -> 1 over its own 4 steps, then held
    half = math.sqrt(0.5) / 2
    assert column(model.nested, 2) == pytest.approx([0.0, 0.5 - half, 0.5, 0.5 + half, 1.0, 1.0])
    assert column(model.seen, 4) == [0.0] * total  # the module's own `beta` is another attribute: left alone
    assert not hasattr(model, "grl_weight")
    assert trainer.callback_metrics["kd/soft_loss.beta"].item() == pytest.approx(5 / 6)
    assert trainer.callback_metrics["kd/soft_loss.temperature.grl_weight"].item() == 1.0


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("soft_los.beta", r"anneals `soft_los.beta`, but `WithLoss` has no attribute `soft_los`. Either correct"),
        ("soft_loss.gamma", r"but `WithLoss.soft_loss` has no attribute `gamma`. Either give `WithLoss.soft_loss` a"),
        ("soft_loss.temperature.grl", r"but `WithLoss.soft_loss.temperature` has no attribute `grl`"),
        ("soft_loss.temperature", r"is a `GRLTemperature` module .* anneal a float attribute of it \(`soft_loss\.temp"),
        ("soft_loss.scale", r"`WithLoss.soft_loss.scale` is a tensor.*Either store `scale` as a plain float"),
    ],
)
def test_dotted_path_errors_name_the_missing_part(path, match):
    model = WithLoss()
    model.soft_loss.register_buffer("scale", torch.tensor(1.0))
    cb = DistillationAnnealing(schedules={path: 1.0}, log=False)
    trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=10, callbacks=[cb])
    with pytest.raises(RuntimeError, match=match):
        cb.on_train_start(trainer, model)
    assert model.soft_loss.beta == 0.0 and model.soft_loss.temperature.grl_weight == 0.0  # nothing was set


def test_missing_part_of_a_path_raises_in_fit(tmp_path):
    cb = DistillationAnnealing(schedules={"soft_loss.temperature.grl": Linear(0.0, 1.0)})
    with pytest.raises(RuntimeError, match="`WithLoss.soft_loss.temperature` has no attribute `grl`"):
        make_trainer(tmp_path, [cb], max_steps=1).fit(WithLoss())


# -- resume ---------------------------------------------------------------------------------------
class StopAt(Callback):
    """Stop the fit loop after optimizer step `k`, like a job killed mid-run (at an epoch boundary)."""

    def __init__(self, k):
        self.k = k

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.k:
            trainer.should_stop = True


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize(
    ("interval", "limit"),
    [("step", "max_epochs"), ("step", "max_steps"), ("epoch", "max_epochs")],
)
def test_resume_continues_the_same_trajectory(tmp_path, interval, limit):
    # Both runs get the *same* Trainer limits (5 epochs = 15 steps), so the resumed run must rebuild
    # the same horizon. Stopping the first run with `max_steps=k` instead would make its horizon k
    # and hide a callback that forgets or mis-restores the horizon. It stops at an epoch boundary
    # (k = 2 epochs) so that the resumed run sees the same batches as the uninterrupted one.
    epochs, k = 5, 2 * N_BATCHES
    n = epochs * N_BATCHES
    limits = {"max_epochs": epochs} if limit == "max_epochs" else {"max_steps": n}

    def annealing():  # horizons come from the Trainer: no `total` on any schedule
        return DistillationAnnealing(
            Cosine(8.0, 1.0, warmup=0.2, warmup_start=2.0), Exponential(0.9, 0.1), interval=interval
        )

    pl.seed_everything(0, workers=True, verbose=False)
    full = StandIn()
    make_trainer(tmp_path / "full", [annealing()], **limits).fit(full)

    pl.seed_everything(0, workers=True, verbose=False)
    first = StandIn()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path / "first", [annealing(), StopAt(k), ckpt], **limits).fit(first)
    assert len(first.seen) == k
    assert torch.load(ckpt.last_model_path, weights_only=True)["global_step"] == k

    pl.seed_everything(123, workers=True, verbose=False)  # the resumed process has its own seed
    resumed = StandIn()
    # A ModelCheckpoint again, as Lightning asks when resuming a run that had one.
    again = ModelCheckpoint(dirpath=tmp_path / "ckpt_resumed", save_last=True)
    make_trainer(tmp_path / "resumed", [annealing(), again], **limits).fit(resumed, ckpt_path=ckpt.last_model_path)

    assert column(resumed.seen, 0) == list(range(k, n))
    if limit == "max_steps":
        # Lightning 2.6, not this callback: with `max_steps` it resumes an end-of-epoch checkpoint
        # as if mid-epoch, running one extra batch (batch_idx 3, from a restarted loader) under
        # `current_epoch` 1. The step-indexed trajectory is still exact; data order, and so the
        # weights, differ, and the epoch column lags: compare (step, T, alpha, beta) only.
        drop_epoch = lambda seen: [row[:1] + row[2:] for row in seen]  # noqa: E731
        assert drop_epoch(first.seen + resumed.seen) == drop_epoch(full.seen)
        return
    assert first.seen + resumed.seen == full.seen  # step, epoch, T, alpha, beta: identical
    assert len(set(column(full.seen, 2))) >= epochs  # the trajectory really moves
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- logging --------------------------------------------------------------------------------------
def test_logs_each_step_to_csv(tmp_path):
    temperature, alpha = Linear(4.0, 2.0), Cosine(0.9, 0.1)
    model = StandIn()
    cb = DistillationAnnealing(temperature, alpha, schedules={"beta": Linear(0.0, 1.0)})
    logger = CSVLogger(tmp_path, name="csv")
    make_trainer(tmp_path, [cb], logger=logger, max_steps=6, log_every_n_steps=1).fit(model)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("kd/temperature")]
    assert [int(r["step"]) for r in rows] == list(range(6))
    for name, schedule in {"temperature": temperature, "alpha": alpha, "beta": Linear(0.0, 1.0)}.items():
        logged = [float(r[f"kd/{name}"]) for r in rows]
        assert logged == pytest.approx([schedule(s, 6) for s in range(6)], rel=1e-6)  # logged as float32


def test_without_logger_values_are_still_applied(tmp_path):
    model = StandIn()
    trainer = make_trainer(tmp_path, [DistillationAnnealing(Linear(4.0, 2.0), 0.2)], logger=False, max_steps=4)
    trainer.fit(model)
    assert column(model.seen, 2) == [4.0, 3.5, 3.0, 2.5]
    assert trainer.callback_metrics["kd/temperature"].item() == 2.5  # still logged, to callback_metrics


def test_log_false_logs_nothing(tmp_path):
    trainer = make_trainer(tmp_path, [DistillationAnnealing(2.0, log=False)], max_steps=2)
    trainer.fit(StandIn())
    assert "kd/temperature" not in trainer.callback_metrics


# -- several instances ----------------------------------------------------------------------------
def test_two_instances_do_not_collide(tmp_path):
    by_step = DistillationAnnealing(temperature=Linear(4.0, 1.0))
    beta = Constant(1.0, warmup=2, warmup_start=0.0)
    by_epoch = DistillationAnnealing(alpha=Linear(1.0, 0.0), schedules={"beta": beta}, interval="epoch")
    assert by_step.state_key != by_epoch.state_key
    model = StandIn()
    make_trainer(tmp_path, [by_step, by_epoch], max_epochs=2).fit(model)
    total = 2 * N_BATCHES
    assert column(model.seen, 2) == [Linear(4.0, 1.0)(s, total) for s in range(total)]
    assert column(model.seen, 3) == [1.0] * N_BATCHES + [0.5] * N_BATCHES
    assert column(model.seen, 4) == [0.0] * N_BATCHES + [0.5] * N_BATCHES


def test_two_instances_annealing_the_same_attribute_raise(tmp_path):
    callbacks = [DistillationAnnealing(alpha=0.5), DistillationAnnealing(temperature=2.0, schedules={"alpha": 0.1})]
    with pytest.raises(RuntimeError, match=r"`alpha` is annealed twice in two `DistillationAnnealing` callbacks"):
        make_trainer(tmp_path, callbacks, max_steps=1).fit(StandIn())


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"temperature": 0.0}, ValueError, r"`temperature` to stay > 0, but Constant\(value=0.0, .*\) goes down to 0"),
        ({"temperature": Linear(4.0, 1.0, warmup=2, warmup_start=0.0)}, ValueError, "`temperature` to stay > 0"),
        ({"schedules": {"temperature": -1.0}}, ValueError, "Expected `temperature` to stay > 0"),
        ({"alpha": 1.5}, ValueError, r"`alpha` to stay within \[0, 1\], but Constant\(value=1.5, .*\) spans \[1.5,"),
        ({"alpha": Linear(1.0, -0.1)}, ValueError, r"Expected `alpha` to stay within \[0, 1\]"),
        ({"alpha": 0.5, "interval": "batch"}, ValueError, r"Expected `interval` to be one of \['step', 'epoch'\]"),
        ({}, ValueError, "Expected at least one of `temperature`, `alpha` or `schedules` to be set"),
        ({"schedules": {}}, ValueError, "Expected at least one of"),
        ({"alpha": 0.5, "schedules": {"alpha": 0.2}}, ValueError, "`alpha` is annealed twice"),
        ({"temperature": "4"}, TypeError, "Expected a number or a Schedule, but got '4'"),
        ({"schedules": [("beta", 1.0)]}, TypeError, "Expected `schedules` to be a mapping"),
        ({"schedules": {"not a name": 1.0}}, TypeError, "Expected the keys of `schedules` to be attribute names"),
        ({"schedules": {"soft_loss..beta": 1.0}}, TypeError, "attribute names or dotted paths of them"),
        ({"schedules": {".beta": 1.0}}, TypeError, r"dotted paths of them \(e.g. 'soft_loss.beta'\), but got '.beta'"),
        ({"schedules": {"soft_loss.2": 1.0}}, TypeError, "Expected the keys of `schedules` to be attribute names"),
        ({"schedules": {"soft_loss.temperature": Linear(2.0, 0.0)}}, ValueError, "`soft_loss.temperature` to stay > 0"),
        ({"alpha": 0.5, "count_from": -1}, ValueError, r"Expected `count_from` to be an int >= 0 .*, but got -1"),
        ({"alpha": 0.5, "count_from": 1.0}, TypeError, r"Expected `count_from` to be an int >= 0 .* of type float"),
        ({"alpha": 0.5, "count_from": True}, TypeError, r"Expected `count_from` to be an int .* but got True of type"),
        ({"alpha": 0.5, "count_from": "1"}, TypeError, "Expected `count_from` to be an int"),
    ],
)
def test_construction_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        DistillationAnnealing(**kwargs)


def test_boundary_values_are_allowed():
    DistillationAnnealing(temperature=Exponential(1e-3, 1.0), alpha=Linear(0.0, 1.0))


def test_missing_attribute_raises(tmp_path):
    cb = DistillationAnnealing(alpha=0.5, schedules={"gamma": 1.0})
    with pytest.raises(RuntimeError, match="anneals `gamma`, but `StandIn` has no attribute `gamma`"):
        make_trainer(tmp_path, [cb], max_steps=1).fit(StandIn())


def test_tensor_attribute_raises(tmp_path):
    model = StandIn()
    model.register_buffer("gamma", torch.tensor(1.0))
    with pytest.raises(RuntimeError, match=r"`StandIn.gamma` is a tensor"):
        make_trainer(tmp_path, [DistillationAnnealing(schedules={"gamma": 1.0})], max_steps=1).fit(model)


def test_endless_run_needs_an_explicit_total(tmp_path):
    cb = DistillationAnnealing(temperature=Linear(4.0, 1.0))
    trainer = make_trainer(tmp_path, [cb], max_epochs=-1, max_steps=-1)
    match = r"`trainer.estimated_stepping_batches` is inf. Either set `Trainer\(max_steps=...\)`"
    with pytest.raises(RuntimeError, match=match):
        trainer.fit(StandIn())


@pytest.mark.parametrize("max_epochs", [-1, None])
def test_endless_epochs_need_an_explicit_total(max_epochs):
    cb = DistillationAnnealing(temperature=Linear(4.0, 1.0), interval="epoch", log=False)
    trainer = SimpleNamespace(current_epoch=0, max_epochs=max_epochs, callbacks=[cb])
    match = r"`trainer.max_epochs` is .*give the schedule its own horizon: Linear\(..., total=N\)"
    with pytest.raises(RuntimeError, match=match):
        cb.on_train_start(trainer, StandIn())


def test_endless_run_with_explicit_total(tmp_path):
    model = StandIn()
    cb = DistillationAnnealing(temperature=Linear(4.0, 2.0, total=2))
    make_trainer(tmp_path, [cb], max_epochs=-1, max_steps=4).fit(model)  # inf horizon would be fine too
    endless = DistillationAnnealing(temperature=Linear(4.0, 2.0, total=2), log=False)
    trainer = SimpleNamespace(global_step=7, estimated_stepping_batches=math.inf, callbacks=[endless])
    endless.on_train_start(trainer, StandIn())
    assert column(model.seen, 2) == [4.0, 3.0, 2.0, 2.0] and endless.values(trainer) == {"temperature": 2.0}


def test_schedule_that_cannot_run_on_the_horizon_fails_at_train_start(tmp_path):
    cb = DistillationAnnealing(temperature=Step([4.0, 2.0], milestones=[100]))  # milestone beyond 3 steps
    with pytest.raises(ValueError, match="Expected the int `milestones` to be <= the 3 steps"):
        make_trainer(tmp_path, [cb], max_steps=3).fit(StandIn())
