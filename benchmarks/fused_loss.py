"""Peak memory and time of a token-level KD loss + backward: materialised logits vs chunks vs the fused linear loss.

Run by hand (not a test); results go to docs/benchmarks.md with the machine and the command::

    python benchmarks/fused_loss.py                    # CPU, both cases, 3 paired repeats
    python benchmarks/fused_loss.py --device cuda --repeats 10

Cases (student and teacher hidden size H, forward KL at T = 1, no mask):
- ``32k``: V = 32,000, B = 8, S = 512 (B·S = 4,096), H = 512;
- ``128k``: V = 128,000, B = 4, S = 512 (B·S = 2,048), H = 512.

Methods, each a forward and a backward that leaves the gradients of the student's hidden states
and output weight in ``.grad`` (the teacher's logits are computed under ``no_grad`` in all three):
- ``naive``: ``KDLoss`` on the materialised float32 logits ``(B, S, V)``, one backward;
- ``chunked``: the same per chunk of ``--chunk-size`` tokens, each chunk's loss (weighted by its share
  of the tokens) backpropagated at once, so autograd holds one chunk's graph at a time;
- ``fused``: :func:`lightning_kd.losses.fused_linear_kd_loss`.

Time: forward + backward, the methods interleaved in every repeat (the order rotates), medians and
the median of the per-repeat ratios to ``naive``. Peak memory: each method alone in a fresh
process (freed memory stays in the allocator and would hide the next method's peak), two
iterations; CPU: peak RSS (``VmHWM``, reset after the inputs exist) above the RSS once the inputs
are allocated; CUDA: ``max_memory_allocated`` above the allocation once the inputs exist. The
loss and the gradients of ``chunked`` and ``fused`` are compared to ``naive`` (relative: ``|a - b| / |b|``
for the loss, ``max |a - b| / max |b|`` for a gradient).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from lightning_kd.losses import KDLoss, fused_linear_kd_loss

CASES = {"32k": {"V": 32_000, "B": 8, "S": 512, "H": 512}, "128k": {"V": 128_000, "B": 4, "S": 512, "H": 512}}
METHODS = ("naive", "chunked", "fused")


def make_inputs(case: dict, device: torch.device) -> dict:
    """Hidden states ~ N(0, 1), weights ~ N(0, 2/H): logits of standard deviation ~1.4, as in a trained LM."""
    g = torch.Generator().manual_seed(0)
    V, B, S, H = case["V"], case["B"], case["S"], case["H"]
    make = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device)  # noqa: E731
    return {
        "hidden": make(B, S, H).requires_grad_(),
        "weight": make(V, H, scale=(2 / H) ** 0.5).requires_grad_(),
        "teacher_hidden": make(B, S, H),
        "teacher_weight": make(V, H, scale=(2 / H) ** 0.5),
    }


def naive(x: dict, chunk_size: int) -> torch.Tensor:
    logits = x["hidden"] @ x["weight"].T  # (B, S, V)
    with torch.no_grad():
        teacher_logits = x["teacher_hidden"] @ x["teacher_weight"].T
    loss = KDLoss(temperature=1.0)(logits, teacher_logits)
    loss.backward()
    return loss.detach()


def chunked(x: dict, chunk_size: int) -> torch.Tensor:
    hidden = x["hidden"].reshape(-1, x["hidden"].shape[-1])  # (N, H), a view: its rows' gradients reach x["hidden"]
    teacher_hidden = x["teacher_hidden"].reshape(hidden.shape[0], -1)
    n, total = hidden.shape[0], 0.0
    loss_fn = KDLoss(temperature=1.0)
    for start in range(0, n, chunk_size):
        h = hidden[start:start + chunk_size]
        with torch.no_grad():
            teacher_logits = teacher_hidden[start:start + chunk_size] @ x["teacher_weight"].T
        loss = loss_fn(h @ x["weight"].T, teacher_logits) * (h.shape[0] / n)  # the chunk's share of the token mean
        loss.backward(retain_graph=start + chunk_size < n)  # the reshape's graph is shared by the chunks
        total += loss.item()
    return torch.tensor(total)


def fused(x: dict, chunk_size: int) -> torch.Tensor:
    loss = fused_linear_kd_loss(x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"], chunk_size=chunk_size)
    loss.backward()
    return loss.detach()


RUN = {"naive": naive, "chunked": chunked, "fused": fused}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(method: str, x: dict, chunk_size: int, device: torch.device) -> tuple[float, torch.Tensor]:
    x["hidden"].grad = x["weight"].grad = None
    sync(device)
    start = time.perf_counter()
    loss = RUN[method](x, chunk_size)
    sync(device)
    return time.perf_counter() - start, loss


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def measure_memory(case: str, method: str, chunk_size: int, device: torch.device) -> dict:
    """In this (fresh) process: the peak above the level once the inputs exist, over two iterations."""
    x = make_inputs(CASES[case], device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")
    rss = _status("VmRSS")
    for _ in range(2):
        step(method, x, chunk_size, device)
    result = {"cpu_peak_rss_above_start": _status("VmHWM") - rss, "cpu_rss_at_start": rss}
    if device.type == "cuda":
        torch.cuda.synchronize()
        result["cuda_peak_above_start"] = torch.cuda.max_memory_allocated() - base
    return result


def memory_in_fresh_process(args, case: str, method: str) -> dict:
    command = [sys.executable, __file__, "--device", args.device, "--threads", str(args.threads),
               "--chunk-size", str(args.chunk_size), "--memory", f"{case}:{method}"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def time_and_compare(args, case: str, device: torch.device) -> dict:
    x = make_inputs(CASES[case], device)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    results = {}
    for repeat in range(args.repeats + 1):  # repeat 0 warms up (first-touch allocations, kernels) and is not timed
        order = METHODS[repeat % len(METHODS):] + METHODS[:repeat % len(METHODS)]
        for method in order:
            seconds, loss = step(method, x, args.chunk_size, device)
            if repeat:
                times[method].append(seconds)
            if repeat == 0:
                results[method] = (loss.cpu(), x["hidden"].grad.cpu(), x["weight"].grad.cpu())
            print(f"  {case} repeat {repeat} {method}: {seconds:.2f} s", file=sys.stderr, flush=True)
    out = {}
    ref_loss, ref_h, ref_w = results["naive"]
    for method in METHODS:
        loss, gh, gw = results[method]
        out[method] = {
            "median_s": statistics.median(times[method]),
            "times_s": times[method],
            "ratio_to_naive": statistics.median(t / n for t, n in zip(times[method], times["naive"])),
            "loss": loss.item(),
            "loss_rel_diff": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
            "grad_hidden_rel_diff": relative(gh, ref_h),
            "grad_weight_rel_diff": relative(gw, ref_w),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cases", default="32k,128k", help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per method (after one warm-up)")
    parser.add_argument("--chunk-size", type=int, default=256, help="tokens per chunk (chunked and fused)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory", default=None, help=argparse.SUPPRESS)  # internal: "case:method" in a child process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory:
        case, method = args.memory.split(":")
        print(json.dumps(measure_memory(case, method, args.chunk_size, device)))
        return
    report = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"},
        "chunk_size": args.chunk_size,
        "load_average_at_start": os.getloadavg(),
        "cases": {},
    }
    for case in args.cases.split(","):
        result = time_and_compare(args, case, device)
        if not args.skip_memory:
            for method in METHODS:
                result[method]["memory"] = memory_in_fresh_process(args, case, method)
        report["cases"][case] = {"shape": CASES[case], "methods": result}
        print_table(case, result, device)
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))


def print_table(case: str, result: dict, device: torch.device) -> None:
    key = "cuda_peak_above_start" if device.type == "cuda" else "cpu_peak_rss_above_start"
    naive_memory = result["naive"].get("memory", {}).get(key)
    print(f"\n{case}: method | peak above inputs | vs naive | time (median) | ratio to naive (paired) | loss rel | grad h rel | grad W rel",
          file=sys.stderr)
    for method, r in result.items():
        memory = r.get("memory", {}).get(key)
        mem = f"{memory / 2**20:,.0f} MiB | {naive_memory / memory:.1f}x" if memory else "- | -"
        print(f"{method} | {mem} | {r['median_s']:.2f} s | {r['ratio_to_naive']:.3f} | {r['loss_rel_diff']:.1e} | "
              f"{r['grad_hidden_rel_diff']:.1e} | {r['grad_weight_rel_diff']:.1e}", file=sys.stderr)


if __name__ == "__main__":
    main()
