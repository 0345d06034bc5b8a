"""Per-step cost of distillation: a hand-written PyTorch loop vs DistillationModule + Trainer.

Run by hand (not a test); results go to docs/benchmarks.md with the machine and the command::

    python benchmarks/kd_step.py                       # CPU, 2 threads, resnet32x4 -> resnet8x4, batch 64
    python benchmarks/kd_step.py --device cuda --steps 50

Everything runs in one process. Library steps run inside ``Trainer.fit``; right after each one, a
callback runs the hand-written steps on the *same batch* with their own copies of the models, so
every library step has hand-written twins measured under the same machine conditions (paired
timing). A library step's time is the wall time of a whole loop iteration: from one
``on_train_batch_start`` to the next, minus the hand-written work done in between (data fetching,
logging and every Lightning hook included).

Variants:
- hand-written: student-only step, teacher inference, KD step (``F.kl_div`` on ``log_softmax``);
- ``online``: DistillationModule + Trainer, teacher forward every step (and each ``--options`` variant:
  ``channels_last``, ``teacher_bf16``, ``compile``);
- ``cached``: DistillationModule + Trainer from a soft-target store (no teacher in memory);
- cache build: ``build_soft_targets`` vs one hand-written teacher-inference pass over the same data.
Peak memory of each is measured in a fresh process per variant (CUDA: ``max_memory_allocated``; CPU: peak RSS above the
RSS before its steps; a fresh process each, because freed memory stays in the allocator arenas).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd import DistillationModule, Speed
from lightning_kd.losses import KDLoss
from lightning_kd.soft_targets.build import build_soft_targets
from lightning_kd.soft_targets.batches import with_soft_targets
from lightning_kd.models import get_model

T, ALPHA = 4.0, 0.9
OPTIONS = {
    "default": {},
    "channels_last": {"channels_last": True},
    "teacher_bf16": {"teacher_dtype": "bfloat16"},
    "compile": {"compile_student": True, "compile_teacher": True},
    "channels_last+teacher_bf16": {"channels_last": True, "teacher_dtype": "bfloat16"},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def optimizer(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def models(args, seed=0):
    torch.manual_seed(seed)
    teacher = get_model(args.teacher).eval().requires_grad_(False)
    student = get_model(args.student)
    return teacher, student


class Hand:
    """The floor: what a user would write without any library."""

    def __init__(self, args, device):
        self.teacher, self.student = (m.to(device) for m in models(args))
        self.opt = optimizer(self.student.parameters())
        self.device = device

    def _timed(self, fn, x, y):
        sync(self.device)
        start = time.perf_counter()
        fn(x, y)
        sync(self.device)
        return time.perf_counter() - start

    def _student(self, x, y):
        loss = F.cross_entropy(self.student(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def _teacher(self, x, y):
        with torch.no_grad():
            self.teacher(x)

    def _kd(self, x, y):
        with torch.no_grad():
            t = self.teacher(x)
        s = self.student(x)
        soft = F.kl_div(F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1), reduction="batchmean", log_target=True) * T * T
        loss = ALPHA * soft + (1 - ALPHA) * F.cross_entropy(s, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def student_step(self, x, y):
        return self._timed(self._student, x, y)

    def teacher_inference(self, x, y):
        return self._timed(self._teacher, x, y)

    def kd_step(self, x, y):
        return self._timed(self._kd, x, y)


class Paired(L.Callback):
    """Times each library loop iteration and runs the hand-written twins on the same batch after it."""

    def __init__(self, twins, device):
        self.twins = twins  # {name: fn(x, y) -> seconds}
        self.device = device
        self.library: list[float] = []
        self.hand: dict[str, list[float]] = {name: [] for name in twins}
        self._start = self._pending = self._resume = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync(self.device)
        now = time.perf_counter()
        if self._pending is not None:
            self.library.append(self._pending + (now - self._resume))  # the step plus the loop's own overhead after it
        self._start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync(self.device)
        self._pending = time.perf_counter() - self._start
        x, y = batch.batch if hasattr(batch, "batch") else batch
        for name, fn in self.twins.items():
            self.hand[name].append(fn(x, y))
        self._resume = time.perf_counter()


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def measure_memory(args, variant: str) -> dict:
    """In a fresh process: memory of 3 steps of one variant above the level after building models and data.

    A fresh process per variant, because memory that an earlier variant freed stays in the process
    (allocator arenas) and would hide the next one's peak. CPU: peak RSS (VmHWM) minus the RSS
    before the steps; CUDA: the caching allocator's peak above what was allocated before.
    """
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    n = 4 * args.batch_size
    g = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 100, (n,), generator=g))
    loader = partial(DataLoader, dataset, batch_size=args.batch_size)
    x, y = (t.to(device) for t in next(iter(loader())))
    with tempfile.TemporaryDirectory() as tmp:
        if variant.startswith("hand"):
            hand = Hand(args, device)
            run = lambda: [getattr(hand, {"hand_student": "_student", "hand_teacher": "_teacher", "hand_kd": "_kd"}[variant])(x, y) for _ in range(3)]  # noqa: E731
        elif variant == "online":
            module = make_module(args, *models(args))
            run = lambda: make_trainer(args, 3).fit(module, train_dataloaders=loader())  # noqa: E731
        else:
            teacher, student = models(args)
            store = build_soft_targets(teacher, loader(), Path(tmp) / "store", trainer=make_trainer(args, 1))
            del teacher
            module = make_module(args, None, student, soft_targets=store)
            run = lambda: make_trainer(args, 3).fit(module, train_dataloaders=with_soft_targets(loader(), store))  # noqa: E731
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        rss = _status("VmRSS")
        run()
        result = {"cpu_peak_rss_above_start": _status("VmHWM") - rss, "cpu_rss_at_start": rss}
        if device.type == "cuda":
            torch.cuda.synchronize()
            result["cuda_peak_above_start"] = torch.cuda.max_memory_allocated() - base
        return result


def time_teacher_forward(module, device) -> list[float]:
    """Wrap ``module.teacher_forward`` to time it inside the Trainer (is the teacher slower in there?)."""
    times: list[float] = []
    forward = module.teacher_forward

    def timed(inputs):
        sync(device)
        start = time.perf_counter()
        out = forward(inputs)
        sync(device)
        times.append(time.perf_counter() - start)
        return out

    module.teacher_forward = timed
    return times


def make_trainer(args, steps, callbacks=()):
    return L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )


def make_module(args, teacher, student, **kwargs):
    return DistillationModule(teacher, student, soft_loss=KDLoss(temperature=T), alpha=ALPHA, optimizer=optimizer, **kwargs)


def median(values, skip):
    return statistics.median(values[skip:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--build-batches", type=int, default=20, help="batches of the cache-build comparison")
    parser.add_argument("--options", default="default", help=f"comma-separated online variants: {', '.join(OPTIONS)}")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--memory", default=None, help=argparse.SUPPRESS)  # internal: one variant's memory, in a child process
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(measure_memory(args, args.memory)))
        return
    options = args.options.split(",")
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        parser.error(f"unknown --options {unknown}; expected any of {', '.join(OPTIONS)}")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps = args.warmup + args.steps + 1  # the last iteration has no "next start": not counted
    n = steps * args.batch_size
    g = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 100, (n,), generator=g))
    loader = partial(DataLoader, dataset, batch_size=args.batch_size, shuffle=False)
    results: dict = {"machine": machine(device, args), "command": "python " + " ".join(sys.argv), "steps": args.steps}
    hand = Hand(args, device)
    to_device = lambda fn: (lambda x, y: fn(x.to(device), y.to(device)))  # noqa: E731

    # -- online, paired with all three hand-written steps on the same batch
    for option in options:
        teacher, student = models(args)
        module = make_module(args, teacher, student, speed=Speed(**OPTIONS[option]))
        inside = time_teacher_forward(module, device)
        paired = Paired({"kd": to_device(hand.kd_step), "student": to_device(hand.student_step), "teacher": to_device(hand.teacher_inference)}, device)
        make_trainer(args, steps, [paired]).fit(module, train_dataloaders=loader())
        lib, kd, st, te = (median(v, args.warmup) for v in (paired.library, paired.hand["kd"], paired.hand["student"], paired.hand["teacher"]))
        ratio_kd = statistics.median([a / b for a, b in zip(paired.library[args.warmup:], paired.hand["kd"][args.warmup:])])
        results[f"online[{option}]"] = {"library_s": lib, "hand_kd_s": kd, "hand_student_s": st, "hand_teacher_s": te,
                                        "teacher_forward_in_trainer_s": median(inside, args.warmup),
                                        "ratio_vs_hand_kd": ratio_kd, "ratio_vs_student_plus_teacher": lib / (st + te)}
        print(f"online[{option}]", json.dumps(results[f"online[{option}]"]), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        # -- cache build vs one hand-written teacher pass over the same data (pass, build, pass)
        build_set = TensorDataset(torch.randn(args.build_batches * args.batch_size, 3, 32, 32, generator=g),
                                  torch.randint(0, 100, (args.build_batches * args.batch_size,), generator=g))
        build_loader = DataLoader(build_set, batch_size=args.batch_size)

        def teacher_pass():
            sync(device)
            start = time.perf_counter()
            for x, y in build_loader:
                hand._teacher(x.to(device), y)
            sync(device)
            return time.perf_counter() - start

        before = teacher_pass()
        start = time.perf_counter()
        build_soft_targets(hand.teacher, build_loader, Path(tmp) / "build", trainer=make_trainer(args, 1))
        build = time.perf_counter() - start
        after = teacher_pass()
        results["cache_build"] = {"build_s": build, "teacher_pass_s": (before + after) / 2, "ratio": build / ((before + after) / 2),
                                  "samples": len(build_set)}
        print("cache_build", json.dumps(results["cache_build"]), flush=True)

        # -- cached, paired with the hand-written student-only step
        store = build_soft_targets(hand.teacher, loader(), Path(tmp) / "store", trainer=make_trainer(args, 1))
        _, student = models(args)
        module = make_module(args, None, student, soft_targets=store)
        paired = Paired({"student": to_device(hand.student_step)}, device)
        make_trainer(args, steps, [paired]).fit(module, train_dataloaders=with_soft_targets(loader(), store))
        ratio = statistics.median([a / b for a, b in zip(paired.library[args.warmup:], paired.hand["student"][args.warmup:])])
        results["cached"] = {"library_s": median(paired.library, args.warmup), "hand_student_s": median(paired.hand["student"], args.warmup),
                             "ratio_vs_hand_student": ratio}
        print("cached", json.dumps(results["cached"]), flush=True)

    # -- peak memory, each variant alone in a fresh process
    memory = {}
    for variant in ("hand_student", "hand_teacher", "hand_kd", "online", "cached"):
        out = subprocess.run([sys.executable, __file__, "--memory", variant, "--device", args.device, "--threads", str(args.threads),
                              "--teacher", args.teacher, "--student", args.student, "--batch-size", str(args.batch_size)],
                             capture_output=True, text=True, check=True).stdout
        memory[variant] = json.loads(out.strip().splitlines()[-1])
    results["peak_memory_bytes"] = memory
    print("memory", json.dumps(memory), flush=True)

    print()
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def machine(device, args):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads"
    return f"{name}; torch {torch.__version__}, lightning {L.__version__}, Python {platform.python_version()}"


def markdown(r) -> str:
    ms = lambda s: f"{s * 1000:.1f} ms"  # noqa: E731
    lines = [f"Machine: {r['machine']}  ", f"Command: `{r['command']}`  ", f"Median of {r['steps']} paired steps after warm-up.", "",
             "| variant | library step | hand-written twin | ratio (paired) | vs student step + teacher inference | teacher forward in the Trainer |",
             "|---|---|---|---|---|---|"]
    for key, v in r.items():
        if key.startswith("online["):
            inside = v.get("teacher_forward_in_trainer_s")
            lines.append(f"| {key} | {ms(v['library_s'])} | KD step {ms(v['hand_kd_s'])} | {v['ratio_vs_hand_kd']:.3f} | "
                         f"{ms(v['hand_student_s'])} + {ms(v['hand_teacher_s'])}: {v['ratio_vs_student_plus_teacher']:.3f} | "
                         f"{ms(inside) if inside else ''} |")
    c = r["cached"]
    lines.append(f"| cached | {ms(c['library_s'])} | student-only step {ms(c['hand_student_s'])} | {c['ratio_vs_hand_student']:.3f} | | none |")
    b = r["cache_build"]
    lines += ["", f"Cache build over {b['samples']} samples: {b['build_s']:.2f} s vs one teacher-inference pass {b['teacher_pass_s']:.2f} s "
              f"(ratio {b['ratio']:.3f}).", "", "| peak memory | MiB |", "|---|---|"]
    cuda = any("cuda_peak_above_start" in v for v in r["peak_memory_bytes"].values())
    lines[-2:] = ["| variant (3 steps, fresh process) | peak above start, MiB | RSS at start, MiB |" + (" CUDA peak above start, MiB |" if cuda else ""),
                  "|---|---|---|" + ("---|" if cuda else "")]
    for k, v in r["peak_memory_bytes"].items():
        row = f"| {k} | {v['cpu_peak_rss_above_start'] / 2**20:.0f} | {v['cpu_rss_at_start'] / 2**20:.0f} |"
        lines.append(row + (f" {v['cuda_peak_above_start'] / 2**20:.0f} |" if cuda else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
