"""The methods table of docs/methods.md: every row is one Hydra multirun of ``lightning-kd`` over 3 seeds.

    python benchmarks/methods.py teachers            # train the two MNIST-1D teachers (seeds 42, 43)
    python benchmarks/methods.py run --jobs 2        # every row (skips rows already finished)
    python benchmarks/methods.py table               # mean ± std per row and column, as markdown
    python benchmarks/methods.py commands            # the exact command of each row

Runs go to ``--root`` (default ``runs/methods``). Each job runs with ``OMP_NUM_THREADS=1`` so that
``--jobs`` processes share the cores without contention. Accuracy is the test accuracy of the model
at the **last** epoch (no checkpoint selection), from each stage's ``result.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SEEDS = "0,1,2"
COMMON = ["callbacks=quiet", "logger=none", "report.plot=false", "report.latency_batches=10"]
SAME, TRANSFER = "student_distilled", "student_distilled_transfer"
# the small CNN's last block, for FitNet and RKD
CNN_LAYERS = {"fitnet": ["distill.features.fitnet.student_layers=[features.3]"], "rkd": ["distill.features.rkd.student_layers=[features.3]"]}
# The CTKD and DKD-warm-up rows were measured before those schedules counted epochs from 1 and before CTKD
# started at its code's T = 15.62: these overrides reproduce that measurement (`experiment=ctkd` / `dkd` do not).
AS_MEASURED = {"ctkd": ["distill.soft_loss.temperature.initial=4", "schedule.count_from=0"], "dkd_warmup": ["schedule.count_from=0"]}


@dataclass
class Row:
    slug: str
    label: str
    overrides: list[str]
    student: str = "mlp"
    columns: tuple[str, ...] = (SAME, TRANSFER)
    scratch: bool = False


def rows(teacher_2: str) -> list[Row]:
    mlp = [
        Row("mlp_scratch", "scratch (no teacher)", [], scratch=True, columns=(SAME,)),
        Row("mlp_kd", "KD (T=4, α=0.9)", ["distill=kd"]),
        Row("mlp_dkd", "DKD (α=1, β=8, T=4)", ["distill=dkd"]),
        Row("mlp_dist", "DIST (β=γ=2, T=4)", ["distill=dist"]),
        Row("mlp_kd_ls", "KD + logit standardisation", ["distill=kd_ls"]),
        Row("mlp_ctkd", "CTKD (learned T, GRL 0→1 over 10 epochs)", ["distill=ctkd", "schedule=ctkd", *AS_MEASURED["ctkd"]]),
        Row("mlp_fitnet", "FitNet (hint: features.3 → hidden.1, ×100)", ["distill=fitnet"]),
        # The angle term costs O(B^3 D) a step: ~80 min a seed for the 11,760 transfer steps on one CPU thread.
        Row("mlp_rkd", "RKD (features.3 / hidden.1)", ["distill=rkd"], columns=(SAME,)),
        Row("mlp_kd_2teachers", "KD from 2 teachers (mean logits)", ["distill=kd", f"teacher.extra=[{teacher_2}]"]),
        Row("mlp_kd_t8to2", "KD, T 8 → 2 linear", ["distill=kd", "schedule=anneal_temperature"]),
        Row("mlp_kd_alpha", "KD, α 0.9 → 0.1 cosine", ["distill=kd", "schedule=anneal_alpha"]),
        Row("mlp_kd_t1", "KD, T=1, α=0.5", ["distill=kd", "distill.soft_loss.temperature=1", "distill.alpha=0.5"]),
        Row("mlp_dkd_warmup", "DKD + warm-up (20 epochs)", ["distill=dkd", "schedule=dkd_warmup", *AS_MEASURED["dkd_warmup"]]),
        # the bundles as they are now, following the authors' code
        Row("mlp_ctkd_authors", "CTKD as its code (T from 15.62, epochs from 1): `experiment=ctkd`", ["experiment=ctkd"]),
        Row("mlp_dkd_warmup_authors", "DKD + warm-up, epochs from 1: `experiment=dkd`", ["experiment=dkd"]),
    ]
    cnn = [
        Row("cnn_scratch", "scratch (no teacher)", [], scratch=True),
        Row("cnn_kd", "KD (T=4, α=0.9)", ["distill=kd"]),
        Row("cnn_dkd", "DKD (α=1, β=8, T=4)", ["distill=dkd"]),
        Row("cnn_dist", "DIST (β=γ=2, T=4)", ["distill=dist"]),
        Row("cnn_kd_ls", "KD + logit standardisation", ["distill=kd_ls"]),
        Row("cnn_ctkd", "CTKD", ["distill=ctkd", "schedule=ctkd", *AS_MEASURED["ctkd"]]),
        Row("cnn_fitnet", "FitNet (features.3 → features.3, 1×1 conv)", ["distill=fitnet", *CNN_LAYERS["fitnet"]]),
        Row("cnn_at", "AT (features.1–3, ×1000)", ["distill=at"]),
        Row("cnn_at_100", "AT ×100 (the weight lowered 10×)", ["distill=at", "distill.features.at.weight=100"]),
        Row("cnn_rkd", "RKD (features.3)", ["distill=rkd", *CNN_LAYERS["rkd"]]),
        Row("cnn_kd_at", "KD + AT", ["distill=kd_at"]),
        Row("cnn_kd_2teachers", "KD from 2 teachers (mean logits)", ["distill=kd", f"teacher.extra=[{teacher_2}]"]),
    ]
    for row in cnn:
        row.student, row.columns = "cnn1d_small", (SAME,)
    return mlp + cnn


def command(row: Row, root: Path, teacher: str) -> list[str]:
    stages = "[student_scratch]" if row.scratch else "[" + ",".join(row.columns) + "]"
    task = ["task=scratch"] if row.scratch else ["task=distill", f"teacher.checkpoint={teacher}"]
    return [
        "lightning-kd", "-m", *task, f"task.stages={stages}", f"student={row.student}", *row.overrides,
        f"seed={SEEDS}", *COMMON, f"hydra.sweep.dir={root / row.slug}",
    ]


def results(root: Path, row: Row) -> dict[str, list[float]]:
    """``{column: [test accuracy per seed]}`` of the finished jobs of a row."""
    found: dict[str, list[float]] = {}
    for job in sorted((root / row.slug).glob("[0-9]*"), key=lambda p: int(p.name)):
        for column in ("student_scratch", *row.columns):
            done = job / column / "result.json"
            if done.is_file():
                found.setdefault(column, []).append(100 * json.loads(done.read_text())["entry"]["test_acc"])
    return found


def fmt(values: list[float] | None, *, signed: bool = False) -> str:
    if not values:
        return "–"
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{values[0]:{sign}.1f} (1 seed)"
    text = f"{statistics.mean(values):{sign}.1f} ± {statistics.stdev(values):.1f}"
    return text + ("" if len(values) == 3 else f" ({len(values)} seeds)")


def run(args: argparse.Namespace) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    script = shutil.which("lightning-kd", path=os.path.dirname(sys.executable)) or "lightning-kd"  # the one beside this Python
    todo = [r for r in rows(args.teacher_2) if not args.only or r.slug in args.only]

    def one(row: Row) -> None:
        out = results(args.root, row)
        if all(len(out.get(c, [])) == 3 for c in (("student_scratch",) if row.scratch else row.columns)):
            print(f"{row.slug}: done already", flush=True)
            return
        started = time.perf_counter()
        log = args.root / f"{row.slug}.log"
        args.root.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            rc = subprocess.call([script, *command(row, args.root, args.teacher)[1:]], stdout=f, stderr=subprocess.STDOUT, env=env)
        print(f"{row.slug}: rc={rc} in {time.perf_counter() - started:.0f} s", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, todo))


def table(args: argparse.Namespace) -> None:
    """Mean ± std over the seeds, and the same-data gain over scratch paired by seed (same init, same batches)."""
    for student, title in (("mlp", "MLP student (15,210 parameters)"), ("cnn1d_small", "small 1-D CNN student (814 parameters)")):
        print(f"\n### {title}\n")
        print("| method | same labeled data | Δ vs scratch, paired by seed | + unlabeled transfer set |\n|---|---|---|---|")
        scratch: list[float] = []
        for row in rows(args.teacher_2):
            if row.student != student:
                continue
            out = results(args.root, row)
            same = out.get("student_scratch") if row.scratch else out.get(SAME)
            if row.scratch:
                scratch = same or []
            gain = [a - b for a, b in zip(same or [], scratch)] if not row.scratch else None
            transfer = out.get(TRANSFER) if TRANSFER in row.columns else None
            skipped = "–" if row.scratch else "not run"
            print(
                f"| {row.label} | {fmt(same)} | {fmt(gain, signed=True) if gain else '–'} | "
                f"{fmt(transfer) if TRANSFER in row.columns else skipped} |"
            )


def teachers(args: argparse.Namespace) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for seed in (42, 43):
        cmd = ["lightning-kd", "task=teacher", f"seed={seed}", *COMMON, f"hydra.run.dir={args.root / f'teacher_{seed}'}"]
        print(shlex.join(cmd), flush=True)
        subprocess.check_call([shutil.which("lightning-kd", path=os.path.dirname(sys.executable)) or cmd[0], *cmd[1:]], env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("teachers", "run", "table", "commands"))
    parser.add_argument("--root", type=Path, default=Path("runs/methods"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="row slugs to run")
    args = parser.parse_args()
    if args.action != "commands":  # `commands` prints the paths as given, for the docs
        args.root = args.root.resolve()
    args.teacher = str(args.root / "teacher_42" / "teacher" / "checkpoints" / "last.ckpt")
    args.teacher_2 = str(args.root / "teacher_43" / "teacher" / "checkpoints" / "last.ckpt")
    if args.action == "commands":
        for row in rows(args.teacher_2):
            print(f"{row.slug}: {shlex.join(command(row, args.root, args.teacher))}")
    else:
        {"teachers": teachers, "run": run, "table": table}[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
