#!/usr/bin/env bash
# Issue 12's GPU check: one script, under 8 minutes on one GPU. It runs the CUDA tests (tests/test_device.py's and
# the text task's), then times DP-SGD per grad-sample mode against plain PyTorch on MiniLM+LoRA and the ~10M CNN,
# in fp32 and with bf16 autocast (--amp: hooks and functorch only, the modes fedshield allows with amp), and writes
# everything as JSON under $OUT (default benchmarks/gpu_out): cuda_tests.xml/.txt, dpsgd_cuda_fp32.json,
# dpsgd_cuda_bf16.json, nvidia-smi.txt and gpu_check.json (a summary with each step's exit status).
#
# Usage (from anywhere; needs a CUDA build of torch and fedshield's dependencies, text extra included):
#   PYTHON=.venv/bin/python benchmarks/gpu_check.sh
# Exit status: 0 all passed; 2 no GPU; 3 torch without CUDA; 1 a step failed (see gpu_check.json).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
start=$(date +%s)

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || { echo "gpu_check: no nvidia-smi, so no GPU here" >&2; exit 2; }
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)" \
  || { echo "gpu_check: torch sees no CUDA device (a CPU build?); install a CUDA torch" >&2; exit 3; }

# 1. CUDA tests (about 1-2 minutes): the device tests, and DP-SGD on MiniLM+LoRA with and without bf16.
timeout 240 "$PY" -m pytest tests/test_device.py tests/test_text_task.py -q -p no:cacheprovider -k "cuda" \
  --junitxml "$OUT/cuda_tests.xml" > "$OUT/cuda_tests.txt" 2>&1
tests_rc=$?
tail -3 "$OUT/cuda_tests.txt"

# 2. Timings (about 2 x 2 minutes): batch 32, 128 tokens for MiniLM; 10 steps after one warm-up step.
bench() {  # $1: output name, then extra arguments
  local name=$1; shift
  timeout 150 "$PY" benchmarks/large_models.py --parts dpsgd --device cuda --models minilm-lora cnn10m \
    --steps 10 --batch 32 --tokens 128 --worker-timeout 60 --json "$OUT/$name.json" "$@" > "$OUT/$name.txt" 2>&1
}
bench dpsgd_cuda_fp32 --modes plain hooks functorch ghost; fp32_rc=$?
bench dpsgd_cuda_bf16 --amp --modes plain hooks functorch; bf16_rc=$?
cat "$OUT/dpsgd_cuda_fp32.txt" "$OUT/dpsgd_cuda_bf16.txt" | grep -v -i warn || true

"$PY" - "$OUT" "$tests_rc" "$fp32_rc" "$bf16_rc" "$start" <<'PYEOF'
import json, sys, time
from pathlib import Path
out, tests_rc, fp32_rc, bf16_rc, start = Path(sys.argv[1]), *map(int, sys.argv[2:6])
def rows(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else []
summary = {"exit": {"cuda_tests": tests_rc, "dpsgd_fp32": fp32_rc, "dpsgd_bf16": bf16_rc},
           "seconds": round(time.time() - start), "gpu": (out / "nvidia-smi.txt").read_text()[:2000],
           "dpsgd_fp32": rows("dpsgd_cuda_fp32"), "dpsgd_bf16": rows("dpsgd_cuda_bf16")}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
print(f"gpu_check: {summary['exit']} in {summary['seconds']} s; JSON in {out}/gpu_check.json")
PYEOF
[ "$tests_rc" -eq 0 ] && [ "$fp32_rc" -eq 0 ] && [ "$bf16_rc" -eq 0 ]
