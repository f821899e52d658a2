#!/usr/bin/env bash
# One or two short device calls (about 8 minutes each): the GPU tier, compute-sanitizer, the STA per-call
# figures (wall, host, CUDA-graph GPU time, kernels) at the B=64 STViT-S stage shapes, and Nsight
# Compute's DRAM figures per kernel of the cuda, then the triton backend (benchmarks/ncu_kernels.py;
# Triton last: what does not fit in the call's time is the least needed), every step time-boxed,
# its log and JSON under OUTDIR, one line per step in OUTDIR/summary.txt.
#
#   bash ../shared/gpu/stage.sh                                   # here: build for the GPU machine
#   run(carry=[".gpu"], timeout_s=540,
#       command="cd .gpu/tree && PYTHONPATH=$PWD bash benchmarks/gpu_check.sh $OUT")
#
# Steps, in order of need: tier, sanitize, bench1, bench2, host_prof (issues 10, 11; host_prof:
# benchmarks/host_profile.py, the host time of a stage-1 call by function and by library, Triton's
# launcher apart, for triton and cuda, about 40 s), bench1_aten (bench1 with
# the refine attention on ATen's operators: STVIT_REFINE_KERNELS=0), ncu (issue 12), model
# (STViT-S img/s, fp32 + bf16, inference + training, eager, with the STA's share of the step),
# ncu_triton, bench_ro (stage 1 under torch.compile mode="reduce-overhead", official and cuda);
# not in the default list: bench1_bf16 (bench1 in bfloat16: issue 12's bf16 <= 0.6x fp32), dense
# and dense_bf16 (B=8, C=64, 56², 128², 256² tokens, cuda and triton against dense SDPA: issue 12's
# >= 3x / >= 30x and issue 11's time growing with the work), ncu_detail (ncu --set detailed on the
# CUDA pixel-side kernels and the refine cores at stage 1: why each is short of the bandwidth),
# tune (benchmarks/tune_cuda.py: the CUDA kernels' plan limits swept at the stage shapes, fp32 +
# bf16, about a minute), tune_triton (benchmarks/tune_triton.py: the same for the Triton kernels'
# plan, most of it compiling).
# All of them take more than one call's 540 s when the tier runs long: pick with STEPS.
# GPU_PY: the GPU machine's python (default python3). STEPS: a subset, e.g. STEPS="bench1 ncu".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
PY=${GPU_PY:-python3}
STEPS=${STEPS:-"tier sanitize bench1 bench2 host_prof ncu model ncu_triton bench_ro"}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  git log -1 --format='tree at %H %s' 2>/dev/null || true; } > "$OUT/env.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
}

# the STA module at a stage shape: official algorithm, cuda, triton; fwd and fwd+bwd
STA=("$PY" benchmarks/bench_ops.py --device cuda --ops sta --providers official cuda triton
     --batch 64 --modes fwd fwd+bwd --no-targets)

NCU_METRICS=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed

for s in $STEPS; do
  case "$s" in
    tier) step test_gpu 240 bash tests/gpu.sh tier ;;
    sanitize) step sanitize 60 bash tests/gpu.sh sanitize ;;
    bench1) step bench_stage1 60 "${STA[@]}" --sides 56 --dim 64 --heads 1 --stoken 8 \
              --out "$OUT/sta_stage1.json" ;;
    # the same with the refine attention on ATen's operators instead of its kernels (A/B)
    bench1_aten) STVIT_REFINE_KERNELS=0 step bench_stage1_aten_refine 60 "$PY" \
              benchmarks/bench_ops.py --device cuda --ops sta --providers cuda --batch 64 \
              --modes fwd fwd+bwd --no-targets --sides 56 --dim 64 --heads 1 --stoken 8 \
              --out "$OUT/sta_stage1_aten_refine.json" ;;
    bench2) step bench_stage2 60 "${STA[@]}" --sides 28 --dim 128 --heads 2 --stoken 4 \
              --out "$OUT/sta_stage2.json" ;;
    bench1_bf16) step bench_stage1_bf16 60 "${STA[@]}" --sides 56 --dim 64 --heads 1 --stoken 8 \
              --dtype bfloat16 --out "$OUT/sta_stage1_bf16.json" ;;
    tune) step tune_cuda 150 "$PY" benchmarks/tune_cuda.py --out "$OUT/tune_cuda.json" ;;
    tune_triton) step tune_triton 240 "$PY" benchmarks/tune_triton.py --out "$OUT/tune_triton.json" ;;
    dense|dense_bf16)
         dt=float32; [ "$s" = dense_bf16 ] && dt=bfloat16
         step "sta_$s" 120 "$PY" benchmarks/bench_ops.py --device cuda --ops sta \
           --providers cuda triton dense-sdpa --batch 8 --dim 64 --heads 1 --stoken 8 \
           --sides 56 128 256 --modes fwd fwd+bwd --no-targets --dtype "$dt" \
           --out "$OUT/sta_$s.json" ;;
    # why a kernel is short of the bandwidth: ncu's detailed sections (occupancy, warp stalls,
    # shared-memory / L1 / L2 traffic, instruction mix, its hints) for the CUDA pixel-side kernels
    # and the refine attention's cores (latency: a thread's chain of products) at stage 1, fp32
    # and bf16, forward and backward (about a minute)
    ncu_detail) step ncu_detail 180 ncu --profile-from-start off --set detailed \
                  -k 'regex:cell_kernel|upsample_kernel|pool_kernel|reduce_kernel|refine_core' \
                  "$PY" benchmarks/ncu_kernels.py run cuda --cases stage1 ;;
    ncu|ncu_triton)
         be=cuda; [ "$s" = ncu_triton ] && be=triton
         step "$s" 150 ncu --profile-from-start off --nvtx --csv --metrics "$NCU_METRICS" \
           "$PY" benchmarks/ncu_kernels.py run "$be"
         step "${s}_report" 20 "$PY" benchmarks/ncu_kernels.py report "$OUT/$s.log" \
           --out "$OUT/${s}_kernels.json" ;;
    # where each call's host time goes, triton then cuda (cProfile; Triton's launcher split out)
    host_prof) for be in triton cuda; do
                 step "host_profile_$be" 90 "$PY" benchmarks/host_profile.py --device cuda \
                   --backend "$be" --calls 50 --out "$OUT/host_profile_$be.json"
               done ;;
    model) step model_small 150 "$PY" benchmarks/bench_model.py --device cuda --models small \
             --compile off --rep-ms 300 --out "$OUT/model_small.json" ;;
    bench_ro) step bench_reduce_overhead 150 "$PY" benchmarks/bench_ops.py --device cuda --ops sta \
                --providers official+compile cuda+compile --batch 64 --modes fwd fwd+bwd \
                --no-targets --compile-mode reduce-overhead --sides 56 --dim 64 --heads 1 \
                --stoken 8 --out "$OUT/sta_stage1_reduce_overhead.json" ;;
    *) echo "unknown step $s (tier sanitize bench1 bench2 bench1_aten bench1_bf16 dense dense_bf16" \
            "tune tune_triton host_prof ncu ncu_detail model ncu_triton bench_ro)" >&2
       exit 2 ;;
  esac
done
