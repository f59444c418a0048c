#!/usr/bin/env bash
# GPU readiness check (bench/gpu_check.py): parity in fp32 (TF32 off), fp16/bf16 at real size with NaN/Inf checks,
# peak memory, time per image; at most ~8 minutes on one H100. JSON to $OUT/gpu_check.json (or bench/results/).
# Usage: bench/gpu_check.sh [--device cuda:0] [--quick] [--steps N]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
JSON=${OUT:-bench/results}/gpu_check.json
exec timeout 480 "$PY" bench/gpu_check.py --json "$JSON" "$@"
