#!/usr/bin/env bash
# One GPU, under 5 minutes: images/s, step time and MFU (vs the chip's bf16 peak) of the
# CLIP-ReID stage-2 ViT-B/16 step (batch 64) and the LPT phase-2 step (batch 256), in
# float32 and bfloat16.   Usage: bash benchmarks/gpu.sh [--tiny] [--steps N] [--json out.json]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" benchmarks/gpu.py "$@"
