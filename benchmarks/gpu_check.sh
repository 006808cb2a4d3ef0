#!/usr/bin/env bash
# GPU check (issue goal 6): a few epochs of the small and seed presets with bf16 autocast on one
# CUDA device; prints samples/s, GPU memory and achieved FLOP/s against the card's peak (H200 SXM
# bf16 dense: 989 TFLOP/s assumed; pass --peak-tflops N for another card). One prepared script,
# cut off at 290 s so that it stays under 5 minutes. From the repository root:
#
#     bash benchmarks/gpu_check.sh                 # small and seed, 3 epochs each (the first warms up)
#     bash benchmarks/gpu_check.sh --epochs 5      # extra arguments go to benchmarks/gpu_train.py
#
# Without a CUDA device it exits at once with status 2 and says why. PYTHON picks the interpreter
# (default .venv/bin/python, which needs a CUDA build of torch: see the README's TORCH variable).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device: nvidia-smi is missing or lists no GPU; nothing measured." >&2
    echo "gpu_check: the CPU path of the same code: $PY benchmarks/gpu_train.py --device cpu --smoke" >&2
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device: torch.cuda.is_available() is False for $PY" \
         "(CPU build of torch, no NVIDIA driver, or CUDA_VISIBLE_DEVICES empty); nothing measured." >&2
    echo "gpu_check: the CPU path of the same code: $PY benchmarks/gpu_train.py --device cpu --smoke" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
exec timeout --signal=TERM 290 "$PY" benchmarks/gpu_train.py --device cuda --presets small seed --epochs 3 "$@"
