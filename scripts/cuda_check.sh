#!/usr/bin/env bash
# The CUDA kernel of mopeq.MoEExperts on a GPU machine, start to finish (docs/KERNELS.md):
#   1. configure + build runtime/csrc/cuda with nvcc (sm_87 and sm_90 unless CUDA_ARCHS says otherwise)
#   2. correctness harness: random mixed-width layers vs a float64 CPU reference, malformed inputs
#   3. compute-sanitizer memcheck over the small cases and the bad-index cases
#   4. benchmark table (OLMoE-like layer) vs this card's device-to-device copy bandwidth
#   5. the same benchmark for a 4-warp-CTA build (kept only if it wins; see docs/KERNELS.md)
# Usage: bash scripts/cuda_check.sh [build-dir]      logs go to $OUT (device tool) or the build dir.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-build/cuda}
LOG=${OUT:-$B}
ARCHS=${CUDA_ARCHS:-"87;90"}
mkdir -p "$B" "$LOG"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
nvcc --version | tail -2

cmake -S runtime/csrc/cuda -B "$B" -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CUDA_ARCHITECTURES=$ARCHS" \
  -DCMAKE_CUDA_FLAGS="--threads 0" >"$LOG/configure.log"
cmake --build "$B" -j >"$LOG/build.log" 2>&1 || { tail -40 "$LOG/build.log"; exit 1; }

status=0
"$B/test_moe_cuda" | tee "$LOG/harness.log" || status=1
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 9 "$B/test_moe_cuda" --quick >"$LOG/memcheck.log" 2>&1 \
    && echo "compute-sanitizer memcheck (--quick): clean" || { echo "compute-sanitizer memcheck: ERRORS"; tail -30 "$LOG/memcheck.log"; status=1; }
fi

nvcc -O3 -std=c++17 -arch=sm_90 -DMOPEQ_CUDA_WARPS=4 -Iruntime/csrc/include -Iruntime/csrc/cuda \
  runtime/csrc/cuda/moe_experts.cu runtime/csrc/cuda/test_moe_cuda.cu -o "$B/test_moe_cuda_w4"
echo; echo "variant: 4 warps per CTA (MOPEQ_CUDA_WARPS=4)"
"$B/test_moe_cuda_w4" --bench | tee "$LOG/bench_w4.log" | grep -E "^\||copy"
exit $status
