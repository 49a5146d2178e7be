#!/usr/bin/env bash
# On the lent GPU machine (device tool): the predictor benchmark and the allocation study of issue 13 on
# text-moe, on the GPU. Needs work/devshare (text-moe, text_calib.txt, text_dev.txt, sensitivity.json from
# `mopeq-export analyze`) and build/ort-headers carried along. Results go to $OUT (8 files at most come back:
# predictor.json, alloc0..5/compare_text.json, logs.txt).
#   1. scripts/bench_predictor.py: every expert at 2/3/4 bits, 128 held-out windows, KL and NLL truths
#   2. scripts/compare_allocations.py in 6 parallel processes (the GPU is mostly idle on this model's small
#      kernels): one per size, and one for uniform 2/3/4 and k-means; every row is saved as it is done, and
#      each process stops at LIMIT seconds
set -uo pipefail
out=${OUT:-/tmp/out}
d=work/devshare
quantizer=${QUANTIZER:-signround}
limit=${LIMIT:-480}
OUT=/tmp/install bash scripts/device_install.sh || exit 1
timeout 240 python3 scripts/bench_predictor.py --model $d/text-moe --sens $d/sensitivity.json --calib $d/text_calib.txt \
  --windows 128 --bits 2,3,4 --probes-per-batch 8 --boot 300 --threads 8 --device cuda \
  --out "$out/predictor.json" > /tmp/predictor.log 2>&1
pids=()
p=0
for size in fixed 2.25 2.5 2.75 3.0 3.5; do
  if [ "$size" = fixed ]; then args=(--sizes ""); else args=(--sizes "$size" --no-fixed); fi
  mkdir -p "$out/alloc$p"
  OMP_NUM_THREADS=2 timeout "$limit" python3 scripts/compare_allocations.py --sensitivity $d/sensitivity.json \
    --model $d/text-moe --calib $d/text_calib.txt --data $d/text_dev.txt --device cuda --quantizer "$quantizer" \
    --rtn "" --predictions "$out/predictor.json" --budget-on gn_output,freq_x_err,out_err_gniso "${args[@]}" \
    --out "$out/alloc$p" > "/tmp/alloc$p.log" 2>&1 &
  pids+=($!)
  p=$((p + 1))
done
for pid in "${pids[@]}"; do wait "$pid"; done
rm -f "$out"/alloc*/compare_text.md "$out"/alloc*/compare_text.png "$out/predictor.json.state.pkl"
for f in /tmp/predictor.log /tmp/alloc*.log; do echo "=== $f"; grep -v Warning "$f" | tail -60; done > "$out/logs.txt"
tail -40 "$out/logs.txt"
