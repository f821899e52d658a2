#!/usr/bin/env bash
# The GPU checks, for a machine with a GPU whose python (GPU_PY, default python3) has torch and
# the extension already built in this tree (e.g. by ../shared/gpu/stage.sh); no venv, no build.
#   bash tests/gpu.sh tier       the GPU tier: every test that puts something on the GPU
#   bash tests/gpu.sh sanitize   compute-sanitizer memcheck + racecheck over every CUDA kernel
# (make test-gpu / make sanitize-gpu). GPU_WORKERS: pytest-xdist workers (default 16).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PY:-python3}
case "${1:-}" in
  tier)
    # -v: each result as it comes (a time-boxed run keeps what finished); the random sweep with
    # STVIT_SWEEP_CASES cases per op and backend (each new shape is a Triton compile)
    STVIT_GPU_TIER=1 STVIT_EXPECT_CUDA=1 STVIT_EXPECT_COMPILED=1 \
      STVIT_SWEEP_CASES=${STVIT_SWEEP_CASES:-40} "$PY" -m pytest tests -v -rfEs --tb=short \
      -p no:cacheprovider -n "${GPU_WORKERS:-16}" --timeout 300 --durations=20 ;;
  sanitize)
    for tool in memcheck racecheck; do
      echo "== compute-sanitizer --tool $tool"
      compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" tests/sanitize_cuda.py
    done ;;
  *) echo "usage: bash tests/gpu.sh tier|sanitize" >&2; exit 2 ;;
esac
