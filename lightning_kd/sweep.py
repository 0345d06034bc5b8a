"""A Hydra multirun as configs x seeds: its jobs grouped by their command-line overrides, the seed left out.

``lightning-kd -m distill.soft_loss.temperature=1,4 distill.alpha=0.5,0.9 seed=1,2,3`` runs 12 jobs, each in
``<sweep dir>/<job number>/`` with its overrides in ``.hydra/overrides.yaml`` and its ``report.json``.
:func:`summarize_sweep` reads them back as 4 configs of 3 seeds each: per config and model stage, the test
accuracy of every seed, their mean and sample standard deviation. An Optuna sweep (``hydra/sweeper=optuna``)
reads the same way, one config per trial. The command: ``python -m lightning_kd.report --sweep <sweep dir>``.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

OVERRIDES = Path(".hydra") / "overrides.yaml"
SEED = "seed"


@dataclass(frozen=True)
class SweepConfig:
    """One config of a sweep: its overrides (the seed's left out) and, per model stage, one test accuracy per seed.

    ``accuracy[stage]`` lists the accuracies in the order of ``seeds``; ``mean`` and ``std`` (the sample
    standard deviation, ``n - 1`` in the denominator; None for one seed) are over them.
    """

    overrides: dict[str, str]
    seeds: tuple[str, ...]
    runs: tuple[str, ...]
    accuracy: dict[str, tuple[float, ...]]

    def mean(self, stage: str) -> float:
        return statistics.fmean(self.accuracy[stage])

    def std(self, stage: str) -> float | None:
        values = self.accuracy[stage]
        return statistics.stdev(values) if len(values) > 1 else None


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _job_order(job: Path, sweep_dir: Path) -> tuple[int, str]:
    """Hydra's job number (``<sweep dir>/<num>/``), else the path: jobs in the order they ran."""
    name = str(job.relative_to(sweep_dir))
    return (int(name), "") if name.isdigit() else (1 << 62, name)


def summarize_sweep(sweep_dir: str | Path) -> tuple[list[SweepConfig], dict[str, str], list[str]]:
    """The sweep's configs in job order, the overrides all its jobs share, and the jobs without a ``report.json``.

    A config is the set of a job's overrides other than ``seed=``; its runs are the jobs with that set.

    Raises:
        FileNotFoundError: if ``sweep_dir`` holds no Hydra job (no ``*/.hydra/overrides.yaml``) or no job finished.
        ValueError: if one config has the same seed twice (its mean would count a run twice).
    """
    sweep_dir = Path(sweep_dir)
    jobs = sorted((p.parents[1] for p in sweep_dir.glob("**/.hydra/overrides.yaml")), key=lambda job: _job_order(job, sweep_dir))
    if not jobs:
        raise FileNotFoundError(
            f"No Hydra job under {str(sweep_dir)!r}: expected the directory of a multirun (`lightning-kd -m ...`), whose jobs "
            f"each hold {OVERRIDES}."
        )
    unfinished = [str(job) for job in jobs if not (job / "report.json").is_file()]
    grouped: dict[tuple[str, ...], list[tuple[str, str, dict[str, Any]]]] = {}
    for job in jobs:
        if str(job) in unfinished:
            continue
        overrides = [str(o) for o in OmegaConf.load(job / OVERRIDES)]
        seed = next((o.split("=", 1)[1] for o in overrides if _key(o) == SEED), None)
        if seed is None:  # not swept: the job's composed config says which seed it ran
            composed = job / ".hydra" / "config.yaml"
            seed = str(OmegaConf.load(composed).get(SEED)) if composed.is_file() else "<unknown>"
        config = tuple(o for o in overrides if _key(o) != SEED)
        grouped.setdefault(config, []).append((seed, str(job), json.loads((job / "report.json").read_text())))
    if not grouped:
        raise FileNotFoundError(f"No job under {str(sweep_dir)!r} has finished (no report.json in {unfinished[:3]} ...).")
    configs = []
    for overrides, runs in grouped.items():
        seeds = [seed for seed, _, _ in runs]
        if len(set(seeds)) < len(seeds):
            raise ValueError(
                f"Expected each config of the sweep to run each seed once, but {list(overrides)} ran seed(s) "
                f"{sorted({s for s in seeds if seeds.count(s) > 1})} more than once ({[job for _, job, _ in runs]})."
            )
        stages = sorted({stage for _, _, report in runs for stage in report["entries"]})
        accuracy = {stage: tuple(float(report["entries"][stage]["test_acc"]) for _, _, report in runs
                                 if report["entries"].get(stage, {}).get("test_acc") is not None)
                    for stage in stages}
        configs.append(SweepConfig(overrides={_key(o): o.split("=", 1)[1] for o in overrides}, seeds=tuple(seeds),
                                   runs=tuple(job for _, job, _ in runs),
                                   accuracy={stage: values for stage, values in accuracy.items() if values}))
    shared = dict(configs[0].overrides)
    for config in configs[1:]:
        shared = {k: v for k, v in shared.items() if config.overrides.get(k) == v}
    if len(configs) == 1:
        shared = {}  # one config: its overrides are what the table shows
    return configs, shared, unfinished


def as_json(configs: list[SweepConfig], shared: dict[str, str], unfinished: list[str]) -> dict[str, Any]:
    """The summary as plain values: per config its overrides, seeds, runs and per stage ``n``, values, mean, std."""
    return {
        "shared_overrides": shared,
        "unfinished_jobs": unfinished,
        "configs": [{"overrides": {k: v for k, v in c.overrides.items() if k not in shared}, "seeds": list(c.seeds),
                     "runs": list(c.runs),
                     "test_acc": {stage: {"n": len(values), "values": list(values), "mean": c.mean(stage), "std": c.std(stage)}
                                  for stage, values in c.accuracy.items()}}
                    for c in configs],
    }
