#!/usr/bin/env bash
# The whole GPU benchmark suite: JSON + PNG into benchmarks/results/ (names start with the GPU
# model, e.g. h100_ops.json, h100_ops_time.png). No network needed.
#
#   bash benchmarks/run_gpu.sh              # every step, in order (roughly an hour on an H100)
#   bash benchmarks/run_gpu.sh list         # the steps
#   bash benchmarks/run_gpu.sh ops-fp32-sta ops-fp32-ops plot     # some steps
#
# Each step is one command that should stay under ~10 minutes, so the suite can also run step by
# step where a command's time is limited; the ops steps of one dtype --append into the same JSON
# (the targets are recomputed over everything measured so far), and so do the model steps.
#   build           build the CUDA extension if the 'cuda' backend is not available (non-fatal)
#   ops-fp32-targets  the B=64 STViT-S target shapes: STA (stages 1 and 2), associate,
#                   affinity_aggregate (float32); the official algorithm, reference, compiled
#                   reference, fused backends; wall / host / CUDA-graph time and kernels per call
#   ops-fp32-reduce-overhead  the B=64 STA target shapes under torch.compile(mode="reduce-overhead"):
#                   official+compile against every fused backend +compile, eager beside
#                   (own JSON: <gpu>_ops_reduce_overhead.json)
#   ops-fp32-sta    SuperTokenAttention sweep 56²..256² tokens (B=8) vs reference, compiled
#                   reference, dense SDPA / naive attention (float32)
#   ops-fp32-ops    affinity, aggregate, upsample sweeps (float32)
#   ops-fp32-assoc  associate, affinity_aggregate sweeps (float32)
#   ops-bf16-targets / -sta / -ops / -assoc         the same in bfloat16
#   model-eager     STViT-S/B/L, batch 64, 224², float32 + autocast, infer + train, eager
#   model-compiled-<small|base|large>-<infer|train>  the same under torch.compile, one model and
#                   mode per step (compiling STViT-L takes minutes per graph)
#   plot            PNGs from every JSON of this device, and the markdown tables (results/<gpu>_tables.md)
#
# Environment: PYTHON (default python3), STVIT_CUDA_ARCH / MAX_JOBS for the build step.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
R=benchmarks/results
mkdir -p "$R"

ALL_STEPS=(build ops-fp32-targets ops-fp32-reduce-overhead ops-fp32-sta ops-fp32-ops ops-fp32-assoc
           ops-bf16-targets ops-bf16-sta ops-bf16-ops ops-bf16-assoc
           model-eager model-compiled-small-infer model-compiled-small-train
           model-compiled-base-infer model-compiled-base-train
           model-compiled-large-infer model-compiled-large-train plot)

kind() {
  "$PY" -c "import sys, torch; sys.path.insert(0, 'benchmarks'); import common; print(common.device_kind(torch.device('cuda')))"
}

backends() {
  "$PY" -c "import stvit_kernels as sk; print(' '.join(sk.available_backends()))"
}

run() { echo "+ $*" >&2; "$@"; }

step() {
  local K
  case "$1" in
    list) printf '%s\n' "${ALL_STEPS[@]}" ;;
    build)
      if backends | grep -qw cuda; then
        echo "cuda backend available: $(backends)" >&2
      else
        echo "cuda backend not available ($(backends)); building the extension" >&2
        STVIT_CUDA_ARCH=${STVIT_CUDA_ARCH:-9.0} run "$PY" -m pip install --no-build-isolation --no-deps -e . \
          || echo "WARNING: the build failed; the benchmarks run with: $(backends)" >&2
      fi
      "$PY" -c "import stvit_kernels as sk, torch; print(torch.cuda.get_device_name()); print(sk.explain(torch.randn(1, 8, 8, 8, device='cuda')))"
      ;;
    ops-fp32-reduce-overhead)
      K=$(kind); run "$PY" benchmarks/bench_ops.py --full --device cuda --no-sweep --ops sta \
        --providers official official+compile fused fused+compile --compile-mode reduce-overhead \
        --out "$R/${K}_ops_reduce_overhead.json" ;;
    ops-fp32-*|ops-bf16-*)
      local dt part out args
      case "$1" in ops-fp32-*) dt=float32; out="$R/$(kind)_ops.json" ;; *) dt=bfloat16; out="$R/$(kind)_ops_bfloat16.json" ;; esac
      part=${1#ops-*-}
      case "$part" in
        targets) args=(--no-sweep) ;;   # starts the file afresh
        sta)     args=(--ops sta --no-targets --append) ;;
        ops)     args=(--ops affinity aggregate upsample --no-targets --append) ;;
        assoc)   args=(--ops associate affinity_aggregate --no-targets --append) ;;
        *) echo "unknown step '$1'" >&2; return 2 ;;
      esac
      run "$PY" benchmarks/bench_ops.py --full --device cuda --dtype "$dt" "${args[@]}" --out "$out" ;;
    model-eager)    K=$(kind); run "$PY" benchmarks/bench_model.py --device cuda --compile off --out "$R/${K}_model.json" ;;
    model-compiled-*-infer|model-compiled-*-train)
      local rest=${1#model-compiled-}
      K=$(kind); run "$PY" benchmarks/bench_model.py --device cuda --compile on --models "${rest%-*}" --modes "${rest##*-}" --append --out "$R/${K}_model.json" ;;
    plot)
      K=$(kind)
      shopt -s nullglob
      files=("$R/${K}"_ops*.json "$R/${K}"_model*.json)
      if [ ${#files[@]} -eq 0 ]; then echo "no results for $K under $R" >&2; return 1; fi
      run "$PY" benchmarks/plot.py "${files[@]}"
      "$PY" benchmarks/plot.py --markdown "${files[@]}" > "$R/${K}_tables.md"
      echo "wrote $R/${K}_tables.md" >&2
      ;;
    *) echo "unknown step '$1' (bash benchmarks/run_gpu.sh list)" >&2; return 2 ;;
  esac
}

if [ $# -eq 0 ]; then set -- "${ALL_STEPS[@]}"; fi
for s in "$@"; do step "$s"; done
