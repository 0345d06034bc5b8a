#!/usr/bin/env bash
# GPU readiness in one go (about 5-10 minutes on one GPU): each check prints one line
#   PASS|FAIL|SKIP  <check>  <seconds>  <numbers>
# and its full log lands in $OUT_DIR/<check>.log. Run from the repository root, in the venv that has the
# package installed (`pip install torch -e '.[test]'`, with a CUDA build of torch):
#   bash benchmarks/gpu_check.sh [OUT_DIR]            # OUT_DIR defaults to gpu_check/
#   GPU_CHECK_REHEARSE=1 bash benchmarks/gpu_check.sh  # the same script on CPU configs, tiny sizes (a dry run)
# Checks: the CUDA device; a distillation run under 16-mixed, bf16-mixed, NCCL DDP (every visible GPU) and FSDP2
# (trainer=fsdp); the KD-step benchmark and the fused-loss benchmark with --device cuda. Nothing is downloaded:
# MNIST-1D is generated, the teacher is a random cnn1d (the checks are about the machinery, not accuracy).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-gpu_check}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
export LIGHTNING_KD_DATA="${LIGHTNING_KD_DATA:-$OUT_DIR/data}"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
PY="${PYTHON:-python}"

line() { printf '%-5s %-22s %6ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$SUMMARY"; }

# check NAME TIMEOUT_S COMMAND...: runs COMMAND, then `numbers NAME` reads what it wrote.
check() {
  local name="$1" limit="$2"; shift 2
  local start end rc
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  end=$(date +%s)
  if [ $rc -eq 0 ]; then line PASS "$name" $((end - start)) "$(numbers "$name")"
  else line FAIL "$name" $((end - start)) "exit $rc: $(tail -n 1 "$OUT_DIR/$name.log" | cut -c1-160)"; fi
}

# The headline numbers of a finished check.
numbers() {
  "$PY" - "$1" "$OUT_DIR" <<'EOF'
import json, pathlib, sys
name, out = sys.argv[1], pathlib.Path(sys.argv[2])
if name == "kd_step":
    r = json.loads((out / "kd_step.json").read_text())
    online = r["online[default]"]
    print(f"library step {online['library_s'] * 1e3:.2f} ms, x{online['ratio_vs_hand_kd']:.3f} of a hand-written KD step; "
          f"cached x{r['cached']['ratio_vs_hand_student']:.3f} of a student-only step")
elif name == "fused_loss":
    text = (out / "fused_loss.json").read_text()
    r = json.loads(text[text.index("{"):])
    parts = []
    for case, c in r["cases"].items():
        m = c["methods"]
        mem = {k: v.get("memory", {}).get("cuda_peak_above_start") or float("nan") for k, v in m.items()}
        parts.append(f"{case}: fused {mem['fused'] / 2**20:,.0f} MiB vs naive {mem['naive'] / 2**20:,.0f} MiB, "
                     f"time x{m['fused']['ratio_to_naive']:.2f}, loss rel {m['fused']['loss_rel_diff']:.1e}")
    print("; ".join(parts))
else:
    parts = [f"{p.parent.name} test_acc={json.loads(p.read_text())['entry'].get('test_acc')}" for p in sorted((out / name / "run").glob("*/result.json"))]
    print("; ".join(parts) or "no result.json")
EOF
}

TEACHER="$OUT_DIR/teacher.pt"
"$PY" -c "import sys, torch; from lightning_kd.models import get_model; torch.manual_seed(0); torch.save(get_model('cnn1d', num_classes=10).state_dict(), sys.argv[1])" "$TEACHER"
DISTILL=(task=distill "task.stages=[student_scratch,student_distilled]" "teacher.checkpoint=$TEACHER" experiment=smoke callbacks=quiet)

if [ "${GPU_CHECK_REHEARSE:-0}" = 1 ]; then
  # Rehearsal on a CPU machine: the same checks and summaries on CPU configs and tiny benchmark sizes, so that a
  # lent GPU's minutes are not spent on a broken script.
  line SKIP device 0 "rehearsal on CPU (GPU_CHECK_REHEARSE=1)"
  line SKIP 16-mixed 0 "needs a GPU"
  check bf16-mixed 600 lightning-kd "${DISTILL[@]}" trainer=cpu precision=bf16-mixed "hydra.run.dir=$OUT_DIR/bf16-mixed/run"
  check ddp_gloo   600 lightning-kd "${DISTILL[@]}" trainer=ddp_cpu "hydra.run.dir=$OUT_DIR/ddp_gloo/run"
  if [ -f conf/trainer/fsdp_cpu.yaml ]; then
    check fsdp     600 lightning-kd "${DISTILL[@]}" trainer=fsdp_cpu "hydra.run.dir=$OUT_DIR/fsdp/run"
  fi
  check kd_step    600 "$PY" benchmarks/kd_step.py --steps 2 --warmup 1 --build-batches 2 --teacher resnet8x4 --json "$OUT_DIR/kd_step.json"
  check fused_loss 600 bash -c "'$PY' benchmarks/fused_loss.py --cases 32k --repeats 1 --skip-memory > '$OUT_DIR/fused_loss.json'"
  echo "summary: $SUMMARY"
  ! grep -q '^FAIL' "$SUMMARY"
  exit
fi

"$PY" - > "$OUT_DIR/device.log" 2>&1 <<'EOF'
import torch
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print(torch.__version__, torch.version.cuda, torch.cuda.device_count(), "x", torch.cuda.get_device_name(0),
      f"bf16={torch.cuda.is_bf16_supported()}")
EOF
if [ $? -ne 0 ]; then line FAIL device 0 "$(tail -n 1 "$OUT_DIR/device.log")"; exit 1; fi
line PASS device 0 "$(cat "$OUT_DIR/device.log")"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")

check 16-mixed   240 lightning-kd "${DISTILL[@]}" trainer=gpu precision=16-mixed "hydra.run.dir=$OUT_DIR/16-mixed/run"
check bf16-mixed 240 lightning-kd "${DISTILL[@]}" trainer=gpu precision=bf16-mixed "hydra.run.dir=$OUT_DIR/bf16-mixed/run"
check ddp_nccl   300 lightning-kd "${DISTILL[@]}" trainer=ddp "hydra.run.dir=$OUT_DIR/ddp_nccl/run"
if [ -f conf/trainer/fsdp.yaml ]; then
  check fsdp     300 lightning-kd "${DISTILL[@]}" trainer=fsdp "trainer.devices=$NGPU" "hydra.run.dir=$OUT_DIR/fsdp/run"
else
  line SKIP fsdp 0 "conf/trainer/fsdp.yaml is missing"
fi
check kd_step    300 "$PY" benchmarks/kd_step.py --device cuda --steps 50 --json "$OUT_DIR/kd_step.json"
check fused_loss 300 bash -c "'$PY' benchmarks/fused_loss.py --device cuda > '$OUT_DIR/fused_loss.json'"

echo "summary: $SUMMARY"
! grep -q '^FAIL' "$SUMMARY"
