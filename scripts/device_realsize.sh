#!/usr/bin/env bash
# On the lent GPU machine (device tool): install this checkout over the image's packages, build the kernel
# library, make a random-init checkpoint of SHAPE (scripts/make_checkpoint.py) and time one whole build of it
# (scripts/bench_realsize.py --build). Needs build/ort-headers carried along, and the reference tokenizer
# (TOKENIZER=DIR with tokenizer.json: ../shared beside the checkout does not travel). Results land in $OUT,
# with nvidia-smi's memory readings every second (nvidia-smi.csv) beside the allocator peaks of the stages.
#   TOKENIZER=DIR bash scripts/device_realsize.sh olmoe-1b-7b jetson-agx-orin [extra bench_realsize.py flags]
# BUILD=0 leaves out the whole build (then pass --stages, e.g. analyze,plan,quantize with --quantize-args variants).
# A run that outlives one device call (setsid) must run from a copy outside the carried tree (cp -a to /root/tree):
# the next call replaces the tree, and a file the run has yet to read can be missing meanwhile.
set -euo pipefail
shape=$1 target=$2
shift 2
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0
out=${OUT:-/tmp/out} device=${DEVICE:-cuda}  # DEVICE=cpu LAYERS=1: a dry run of this script without a GPU
ck=/root/ck/$shape${LAYERS:+-$LAYERS}
mkdir -p "$out" /root/ck
bash scripts/device_install.sh
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -l 1 >"$out/nvidia-smi.csv" 2>&1 &
smi=$!
trap 'kill $smi 2>/dev/null || true' EXIT
t0=$(date +%s)
[ -d "$ck" ] || python3 scripts/make_checkpoint.py --shape "$shape" --out "$ck" --device "$device" \
  ${TOKENIZER:+--tokenizer "$TOKENIZER"} ${LAYERS:+--layers "$LAYERS"}
echo "checkpoint ready after $(( $(date +%s) - t0 )) s"
work=/root/bench-$shape-$(date +%s)
rc=0
# LIMIT=S stops the benchmark after S seconds so that its logs still come back ($OUT) inside one device call
timeout "${LIMIT:-0}" python3 scripts/bench_realsize.py --model "$ck" --work "$work" --device "$device" --stages "" \
  $([ "${BUILD:-1}" = 0 ] || echo --build) \
  --target "$target" --json "$out/$shape.json" "$@" | tee "$out/$shape.txt" || rc=$?
cp "$work"/*.log "$out/" 2>/dev/null || true
cp "$work/summary.json" "$out/$shape-summary.json" 2>/dev/null || true
exit $rc
