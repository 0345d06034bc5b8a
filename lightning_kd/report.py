"""Teacher vs student-from-scratch vs distilled student: measurements, tables, JSON and a plot.

The only module that knows about tables and plots. Also a small command to summarise several
runs (seeds) as mean ± std: ``python -m lightning_kd.report multirun/pipeline/<stamp>``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

# Report rows in workflow order; other names follow alphabetically.
ENTRY_ORDER = ("teacher", "student_scratch", "student_distilled", "student_distilled_transfer")
COLUMNS = (
    ("test_acc", "test acc", "{:.2%}"),
    ("params", "params", "{:,}"),
    ("weights_bytes", "weights KiB", None),
    ("checkpoint_bytes", "ckpt KiB", None),
    ("latency_ms", "CPU ms/batch", "{:.3f}"),
)


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
    for _ in range(warmup):
        model(example)
    start = time.perf_counter()
    for _ in range(repeats):
        model(example)
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
    return [[name, *(_cell(key, entries[name].get(key), fmt) for key, _, fmt in COLUMNS)] for name in ordered(entries)]


def markdown_table(entries: dict[str, dict[str, Any]]) -> str:
    """One row per entry: test accuracy, parameters, weights and checkpoint size, CPU latency per batch."""
    header = "| model | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(entries)]
    return "\n".join(lines)


def print_table(entries: dict[str, dict[str, Any]]) -> None:
    """The same table on the terminal, with rich."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lightning-kd: teacher vs student (test set)")
    table.add_column("model", justify="left", no_wrap=True)
    for _, title, _ in COLUMNS:
        table.add_column(title, justify="right")
    for row in table_rows(entries):
        table.add_row(*row)
    Console().print(table)


def write_report(entries: dict[str, dict[str, Any]], run_dir: str | Path, *, meta: dict[str, Any] | None = None, plot: bool = True) -> Path:
    """Write ``report.json``, ``report.md`` (and ``report.png``) into ``run_dir``; return the markdown path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"entries": {name: entries[name] for name in ordered(entries)}, "meta": meta or {}}
    (run_dir / "report.json").write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    text = ["# lightning-kd report", "", markdown_table(entries), ""]
    if meta:
        text += ["", "Settings: " + ", ".join(f"`{k}={v}`" for k, v in meta.items()), ""]
    text += [
        "Accuracy of the last epoch on the test set. Latency: mean wall-clock time of one forward pass "
        "of one test batch on the CPU, eval mode, no autograd. Weights: the exported `model.pt` state dict; checkpoint: the stage's `last.ckpt` (optimizer state included, teacher excluded).",
        "",
    ]
    md = run_dir / "report.md"
    md.write_text("\n".join(text))
    if plot and entries:
        plot_report(entries, run_dir / "report.png")
    return md


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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def summarize(run_dirs: Iterable[str | Path]) -> tuple[dict[str, dict[str, Any]], str]:
    """Aggregate the ``report.json`` of several runs (e.g. seeds) into mean ± std per entry and metric."""
    reports = []
    for run_dir in run_dirs:
        found = sorted(Path(run_dir).glob("**/report.json"))
        reports += [json.loads(p.read_text()) for p in found]
    if not reports:
        raise FileNotFoundError(f"No report.json found under {list(map(str, run_dirs))}.")
    table: dict[str, dict[str, Any]] = {}
    for report in reports:
        for name, row in report["entries"].items():
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    table.setdefault(name, {}).setdefault(key, []).append(float(value))
    lines = ["| model | runs | test acc (mean ± std) | per run | params | CPU latency / batch (ms) |", "|---|---|---|---|---|---|"]
    for name in ordered(table):
        accs = table[name].get("test_acc", [])
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        runs = " / ".join(f"{a:.3f}" for a in accs)
        params = int(statistics.mean(table[name].get("params", [0])))
        latency = statistics.mean(table[name].get("latency_ms", [float("nan")]))
        lines.append(f"| {name} | {len(accs)} | {100 * statistics.mean(accs):.1f} ± {100 * std:.1f} % | {runs} | {params:,} | {latency:.3f} |")
    return table, "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Summarise lightning-kd runs (e.g. a seed multirun) as mean ± std.")
    parser.add_argument("run_dirs", nargs="+", help="directories searched recursively for report.json")
    args = parser.parse_args(argv)
    _, text = summarize(args.run_dirs)
    print(text)


if __name__ == "__main__":
    main()
