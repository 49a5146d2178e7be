#!/usr/bin/env bash
# On the lent GPU machine (device tool): issue 13's predictor benchmark, three runs at once (the GPU is mostly
# idle on text-moe's small kernels): learned-rounding truth on the usual 128 held-out windows, the same on a
# disjoint set (--window-offset 2), and the RTN truth; each with the in-context truth. Needs work/devshare
# (text-moe, text_calib.txt, sens_text.json from `mopeq-export analyze` on text-moe) carried along; results
# come back as $OUT/predictor_{signround,signround_w2,rtn}.json and their logs.
set -uo pipefail
out=${OUT:-/tmp/out}
d=work/devshare
mkdir -p "$out"
OUT=/tmp/install bash scripts/device_install.sh || exit 1
run() {  # run NAME bench_predictor-arguments...
  local name=$1
  shift
  timeout "${LIMIT:-500}" python3 scripts/bench_predictor.py --model $d/text-moe --sens $d/sens_text.json \
    --calib $d/text_calib.txt --windows 128 --bits 2,3,4 --probes-per-batch 8 --boot 300 --threads 4 \
    --device cuda "$@" --out "$out/predictor_$name.json" > "$out/predictor_$name.log" 2>&1 &
}
run signround --truth-quantizer signround
run signround_w2 --truth-quantizer signround --window-offset 2
run rtn --truth-quantizer rtn
wait
rm -f "$out"/*.state.pkl
for f in "$out"/predictor_*.log; do echo "=== $f"; grep -v Warning "$f" | tail -3; done
