"""Teacher vs student-from-scratch vs distilled student: measurements, tables, JSON and a plot.

The only module that knows about tables and plots. Also a small command to summarise several
runs (seeds) as mean ± std: ``python -m lightning_kd.report multirun/pipeline/<stamp>``; runs whose
settings differ in more than their seed get one table each. ``--sweep <multirun dir>`` summarises a
sweep as one row per config (its overrides but the seed): :mod:`lightning_kd.sweep`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from lightning_kd.io import atomic_write, atomic_write_text, read_json
from lightning_kd.teachers import call_model

# Report rows in workflow order; other names follow alphabetically.
ENTRY_ORDER = ("teacher", "student_scratch", "student_distilled", "student_distilled_stored", "student_on_policy",
               "student_distilled_transfer")
COLUMNS = (
    ("test_acc", "test acc", "{:.2%}"),
    ("params", "params", "{:,}"),
    ("weights_bytes", "weights KiB", None),
    ("checkpoint_bytes", "ckpt KiB", None),
    ("latency_ms", "CPU ms/batch", "{:.3f}"),
)
# Language models (entries with a per-token cross-entropy): bits per token (bytes for a byte-level model)
# and the inference throughput of a test batch's forward pass.
LM_COLUMNS = (
    ("test_bits_per_token", "bits/token", "{:.3f}"),
    ("tokens_per_s", "CPU tokens/s", "{:,.0f}"),
)


def columns(entries: dict[str, dict[str, Any]]) -> tuple[tuple[str, str, str | None], ...]:
    """:data:`COLUMNS`, and :data:`LM_COLUMNS` when an entry has a bits-per-token value."""
    lm = any(entry.get("test_bits_per_token") is not None for entry in entries.values())
    return COLUMNS + LM_COLUMNS if lm else COLUMNS


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, example: Any, *, repeats: int = 100, warmup: int = 10) -> float:
    """Mean wall-clock milliseconds of one forward pass of ``model`` on ``example``, on the CPU, in eval mode.

    The model is deep-copied so that the trained module's device and mode stay untouched.
    """
    import copy

    model = copy.deepcopy(model).to("cpu").float().eval()
    example = _to_cpu(example)
    return mean_ms(lambda: call_model(model, example), repeats=repeats, warmup=warmup)  # HF-style keyword inputs too


def mean_ms(forward: Callable[[], Any], *, repeats: int = 100, warmup: int = 10) -> float:
    """Mean wall-clock milliseconds of ``forward()`` over ``repeats`` calls, after ``warmup`` untimed ones.

    One clock for every runtime the report compares (PyTorch eager, onnxruntime).
    """
    for _ in range(warmup):
        forward()
    start = time.perf_counter()
    for _ in range(repeats):
        forward()
    return (time.perf_counter() - start) / max(1, repeats) * 1e3


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to("cpu", torch.float32 if x.is_floating_point() else x.dtype)
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def ordered(entries: dict[str, Any]) -> list[str]:
    known = [name for name in ENTRY_ORDER if name in entries]
    return known + sorted(name for name in entries if name not in ENTRY_ORDER)


def _cell(key: str, value: Any, fmt: str | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key.endswith("_bytes"):
        return f"{value / 1024:,.1f}"
    return fmt.format(value)


def table_rows(entries: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Formatted cells, one row per entry in workflow order: name, then :data:`COLUMNS`."""
    return [[name, *(_cell(key, entries[name].get(key), fmt) for key, _, fmt in columns(entries))] for name in ordered(entries)]


def markdown_table(entries: dict[str, dict[str, Any]]) -> str:
    """One row per entry: test accuracy, parameters, weights and checkpoint size, CPU latency per batch."""
    header = "| model | " + " | ".join(title for _, title, _ in columns(entries)) + " |"
    lines = [header, "|" + "---|" * (len(columns(entries)) + 1)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(entries)]
    return "\n".join(lines)


def print_table(entries: dict[str, dict[str, Any]]) -> None:
    """The same table on the terminal, with rich."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lightning-kd: teacher vs student (test set)")
    table.add_column("model", justify="left", no_wrap=True)
    for _, title, _ in columns(entries):
        table.add_column(title, justify="right")
    for row in table_rows(entries):
        table.add_row(*row)
    Console().print(table)


def write_report(
    entries: dict[str, dict[str, Any]],
    run_dir: str | Path,
    *,
    meta: dict[str, Any] | None = None,
    plot: bool = True,
    settings: dict[str, Any] | None = None,
    export: dict[str, Any] | None = None,
) -> Path:
    """Write ``report.json``, ``report.md`` (and ``report.png``) into ``run_dir``; return the markdown path.

    Each file is written atomically (a crash leaves the previous report or the new one). ``settings``
    (each stage's resolved settings, seed excluded) goes into ``report.json`` for :func:`summarize`;
    ``export`` (the export stage's entry) into its ``export`` and a table of its own (:func:`export_table`).
    """
    run_dir = Path(run_dir)
    payload: dict[str, Any] = {"entries": {name: entries[name] for name in ordered(entries)}, "meta": meta or {}}
    if settings is not None:
        payload["settings"] = settings
    if export is not None:
        payload["export"] = export
    atomic_write_text(run_dir / "report.json", json.dumps(payload, indent=2, sort_keys=False) + "\n")
    text = ["# lightning-kd report", ""]
    if entries or export is None:
        text += [markdown_table(entries), ""]
        shown = {k: v for k, v in (meta or {}).items() if not isinstance(v, (dict, list))}
        if shown:
            text += ["", "Settings: " + ", ".join(f"`{k}={v}`" for k, v in shown.items()), ""]
        text += [
            "Accuracy of the last epoch on the test set. Latency: mean wall-clock time of one forward pass "
            "of one test batch on the CPU, eval mode, no autograd. Weights: the exported `model.pt` state dict; checkpoint: the stage's `last.ckpt` (optimizer state included, teacher excluded).",
            "",
        ]
    if export is not None:
        text += ["## Export", "", export_table(export), "", export_note(export), ""]
    md = atomic_write_text(run_dir / "report.md", "\n".join(text))
    if plot and entries:
        plot_report(entries, run_dir / "report.png")
    return md


def add_export(run_dir: str | Path, export: dict[str, Any], *, plot: bool = True) -> Path:
    """Add the export stage's table to the run's report, keeping the rows, settings and meta it already has
    (``task=export`` in the directory of a finished run), or start a report with the table alone."""
    earlier = read_json(Path(run_dir) / "report.json", what="report") if (Path(run_dir) / "report.json").is_file() else {}
    return write_report(earlier.get("entries") or {}, run_dir, meta=earlier.get("meta"), plot=plot, settings=earlier.get("settings"),
                        export=export)


def export_table(export: dict[str, Any]) -> str:
    """The exported student per runtime: its file, size, max abs difference to PyTorch and CPU latency per batch."""
    files, latency = export.get("files") or {}, export.get("latency_ms") or {}
    rows = [("PyTorch (eager)", "safetensors", None, latency.get("pytorch"))]
    if "onnx" in files:
        rows.append(("onnxruntime", "onnx", export.get("max_abs_diff"), latency.get("onnxruntime")))
    lines = ["| runtime | file | KiB | max abs diff vs PyTorch | CPU ms/batch |", "|---|---|---|---|---|"]
    for runtime, fmt, diff, ms in rows:
        file = files.get(fmt) or {}
        name = f"`{file['path']}`" if file else "–"
        shown_diff = "–" if diff is None else f"{diff:.2e}"
        lines.append(f"| {runtime} | {name} | {_cell('file_bytes', file.get('bytes'), None)} | {shown_diff} | {_cell('latency_ms', ms, '{:.3f}')} |")
    return "\n".join(lines)


def export_note(export: dict[str, Any]) -> str:
    """What :func:`export_table` measured, in one paragraph."""
    note = f"The student of `{export.get('checkpoint')}` ({export.get('params', 0):,} parameters), without teacher or adapters."
    if export.get("max_abs_diff") is not None:
        note += (f" Max abs difference of onnxruntime's logits to PyTorch's over the test set ({export.get('test_samples'):,} "
                 f"examples) and the first test batch doubled (the batch axis is dynamic): accepted up to {export.get('atol'):g}.")
    note += (f" Latency: mean wall-clock time of {export.get('latency_repeats')} forward passes of one test batch of "
             f"{export.get('latency_batch_size')} on the CPU with {export.get('threads')} thread(s), after 10 untimed ones.")
    return note


def plot_report(entries: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Bar chart of test accuracy (parameters on the bars) beside accuracy vs CPU latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ordered(entries)
    acc = [100 * (entries[n].get("test_acc") or 0.0) for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bars = left.bar(range(len(names)), acc, color=["#4c72b0" if n == "teacher" else "#dd8452" for n in names])
    for bar, name in zip(bars, names):
        label = f"{bar.get_height():.1f} %\n{entries[name].get('params', 0) / 1e3:.1f}k params"
        left.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    left.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
    left.set_ylabel("test accuracy (%)")
    left.set_ylim(0, 110)
    left.set_title("Accuracy")
    for name, a in zip(names, acc):
        latency = entries[name].get("latency_ms")
        if latency is not None:
            right.scatter(latency, a, s=40)
            right.annotate(name, (latency, a), fontsize=8, xytext=(4, 4), textcoords="offset points")
    right.set_xscale("log")  # teachers are often 10-100x slower than their students
    right.set_xlabel("CPU latency per batch (ms, log scale)")
    right.set_ylabel("test accuracy (%)")
    right.set_title("Accuracy vs latency")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return Path(path)


def _read_reports(run_dirs: Iterable[str | Path]) -> list[tuple[Path, dict[str, Any]]]:
    run_dirs = list(run_dirs)
    found = [p for run_dir in run_dirs for p in sorted(Path(run_dir).glob("**/report.json"))]
    if not found:
        raise FileNotFoundError(f"No report.json found under {list(map(str, run_dirs))}.")
    return [(p, json.loads(p.read_text())) for p in found]


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def _setting(report: dict[str, Any]) -> dict[str, Any]:
    """What a run's report says about its settings, seed excluded, as dotted keys: ``meta``'s and each
    stage's (``student_distilled:distill.soft_loss.temperature``; the stage hashes in ``meta`` say the same)."""
    meta = {k: v for k, v in report.get("meta", {}).items() if k not in ("seed", "stage_settings")}
    flat = _flat(meta) if meta else {}
    for stage, values in (report.get("settings") or {}).items():
        flat.update({f"{stage}:{k}": v for k, v in _flat(values).items()})
    return flat


def _readable(settings: dict[str, Any]) -> dict[str, Any]:
    """``student_distilled:distill.soft_loss.temperature`` as ``distill.soft_loss.temperature`` when every stage agrees on it."""
    short: dict[str, set[str]] = {}
    for key, value in settings.items():
        short.setdefault(key.split(":", 1)[-1], set()).add(json.dumps(value, sort_keys=True, default=str))
    return {(key.split(":", 1)[-1] if len(short[key.split(":", 1)[-1]]) == 1 else key): value for key, value in settings.items()}


def _aggregate(reports: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], str]:
    table: dict[str, dict[str, Any]] = {}
    for report in reports:
        for name, row in report["entries"].items():
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    table.setdefault(name, {}).setdefault(key, []).append(float(value))
    lm = any("test_bits_per_token" in row for row in table.values())
    lines = ["| model | runs | test acc (mean ± std) | per run | params | CPU latency / batch (ms) |"
             + (" bits/token (mean ± std) | CPU tokens/s |" if lm else ""), "|---|---|---|---|---|---|" + ("---|---|" if lm else "")]
    for name in ordered(table):
        accs = table[name].get("test_acc", [])
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        runs = " / ".join(f"{a:.3f}" for a in accs)
        params = int(statistics.mean(table[name].get("params", [0])))
        latency = statistics.mean(table[name].get("latency_ms", [float("nan")]))
        line = f"| {name} | {len(accs)} | {100 * statistics.mean(accs):.1f} ± {100 * std:.1f} % | {runs} | {params:,} | {latency:.3f} |"
        if lm:
            bits = table[name].get("test_bits_per_token", [float("nan")])
            spread = statistics.stdev(bits) if len(bits) > 1 else 0.0
            speed = statistics.mean(table[name].get("tokens_per_s", [float("nan")]))
            line += f" {statistics.mean(bits):.3f} ± {spread:.3f} | {speed:,.0f} |"
        lines.append(line)
    return table, "\n".join(lines)


def summarize_groups(run_dirs: Iterable[str | Path]) -> list[tuple[dict[str, Any], dict[str, dict[str, Any]], str]]:
    """:func:`summarize` per group of runs that differ only in their seed.

    Returns one ``(settings, table, text)`` per group, where ``settings`` holds the dotted keys whose
    values differ between the groups (``meta.temperature``, ``student_distilled:distill.soft_loss.temperature``)
    with this group's values; empty when all runs share their settings.
    """
    groups: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for _, report in _read_reports(run_dirs):
        setting = _setting(report)
        groups.setdefault(json.dumps(setting, sort_keys=True, default=str), (setting, []))[1].append(report)
    keys = sorted({k for setting, _ in groups.values() for k in setting})
    differing = [k for k in keys if len({json.dumps(s.get(k, "<unset>"), default=str) for s, _ in groups.values()}) > 1]
    return [(_readable({k: setting.get(k, "<unset>") for k in differing}), *_aggregate(reports)) for setting, reports in groups.values()]


def summarize(run_dirs: Iterable[str | Path]) -> tuple[dict[str, dict[str, Any]], str]:
    """Aggregate the ``report.json`` of several runs (e.g. seeds) into mean ± std per entry and metric.

    Raises:
        FileNotFoundError: if no ``report.json`` is found.
        ValueError: if the runs differ in more than their seed (listing the settings that differ): a mean
            over two temperatures is no mean over seeds. :func:`summarize_groups` gives one table per setting.
    """
    groups = summarize_groups(run_dirs)
    if len(groups) > 1:
        differing = sorted({k for settings, _, _ in groups for k in settings})
        values = "; ".join(f"{k}: " + ", ".join(sorted({repr(s[k]) for s, _, _ in groups})) for k in differing[:5])
        raise ValueError(
            f"Expected runs that differ only in their seed, but they form {len(groups)} groups that differ in {len(differing)} "
            f"setting(s): {values}{' ...' if len(differing) > 5 else ''}. Use `summarize_groups` (or the command "
            "`python -m lightning_kd.report`) for one table per group."
        )
    return groups[0][1], groups[0][2]


def _percent(mean: float, std: float | None) -> str:
    return f"{100 * mean:.2f} ± {'–' if std is None else f'{100 * std:.2f}'} %"


def sweep_markdown(summary: dict[str, Any], title: str) -> str:
    """A sweep's summary (:func:`lightning_kd.sweep.as_json`) as markdown: the overrides every run shares, then one row
    per config: the overrides that tell it apart, the number of seeds ``n``, the seeds, and per model stage the test
    accuracy's mean ± sample standard deviation over the seeds."""
    configs = summary["configs"]
    keys = list(dict.fromkeys(k for c in configs for k in c["overrides"]))
    stages = ordered({stage: None for c in configs for stage in c["test_acc"]})
    runs = sum(len(c["seeds"]) for c in configs)
    lines = [f"## Sweep {title}: {len(configs)} config(s), {runs} run(s)", ""]
    if summary["shared_overrides"]:
        lines += ["All runs: " + " ".join(f"`{k}={v}`" for k, v in summary["shared_overrides"].items()), ""]
    if summary["unfinished_jobs"]:
        lines += [f"Not finished (no report.json), left out: {', '.join(summary['unfinished_jobs'])}", ""]
    lines.append("| " + " | ".join([*keys, "n", "seeds", *(f"{stage} test acc (mean ± std)" for stage in stages)]) + " |")
    lines.append("|" + "---|" * (len(keys) + 2 + len(stages)))
    for c in configs:
        cells = [c["overrides"].get(k, "–") for k in keys] + [str(len(c["seeds"])), ", ".join(c["seeds"])]
        for stage in stages:
            acc = c["test_acc"].get(stage)
            cells.append("–" if acc is None else _percent(acc["mean"], acc["std"]) + (f" (n={acc['n']})" if acc["n"] != len(c["seeds"]) else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_sweep_summary(sweep_dir: str | Path) -> tuple[dict[str, Any], str]:
    """Summarise the multirun in ``sweep_dir``: write ``sweep_summary.md`` and ``sweep_summary.json`` there, return both."""
    from lightning_kd import sweep

    summary = sweep.as_json(*sweep.summarize_sweep(sweep_dir))
    text = sweep_markdown(summary, str(sweep_dir))
    atomic_write_text(Path(sweep_dir) / "sweep_summary.json", json.dumps(summary, indent=2))
    atomic_write_text(Path(sweep_dir) / "sweep_summary.md", text)
    return summary, text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Summarise lightning-kd runs (e.g. a seed multirun) as mean ± std.")
    parser.add_argument("run_dirs", nargs="+", help="directories searched recursively for report.json")
    parser.add_argument("--sweep", action="store_true",
                        help="each directory is a multirun: one row per config (its overrides but the seed), mean ± std over seeds; "
                             "also written to <dir>/sweep_summary.md and .json")
    args = parser.parse_args(argv)
    if args.sweep:
        for run_dir in args.run_dirs:
            print(write_sweep_summary(run_dir)[1])
        return
    groups = summarize_groups(args.run_dirs)
    for i, (settings, _, text) in enumerate(groups):
        if len(groups) > 1:  # the settings that tell this group from the others
            print(("\n" if i else "") + "Runs with " + ", ".join(f"{k}={v!r}" for k, v in settings.items()) + ":\n")
        print(text)


if __name__ == "__main__":
    main()
