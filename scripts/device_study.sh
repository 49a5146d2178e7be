#!/usr/bin/env bash
# On the lent GPU machine (device tool): issue 13's allocation study on text-moe and vlm-moe, every plan
# quantized with two learned-rounding seeds (and GPTQ on vlm-moe, its build default), scored on all of
# text_dev / vqa_dev. Needs work/devshare (text-moe, vlm-moe, the four data files, sens_text.json and
# sens_vlm.json from `mopeq-export analyze`) and build/ort-headers carried along. 18 processes of
# scripts/compare_allocations.py run at once (the GPU is mostly idle on these models' small kernels), each
# saving its rows as they are done and stopping at LIMIT seconds; their parts come back as $OUT/parts.tgz
# (merge here: `python scripts/compare_allocations.py merge docs/compare_X part*/compare_text.json`).
#   PREDICTOR=1 also runs scripts/bench_predictor.py first (every expert at 2/3/4 bits, 128 held-out windows);
#   PREDICTOR=signround measures its truth with the build's learned rounding instead of RTN; STUDY=0 skips the
#   allocation study (the predictor benchmark alone).
set -uo pipefail
out=${OUT:-/tmp/out}
d=work/devshare
limit=${LIMIT:-480}
seeds=${SEEDS:-0,1}
parts=/tmp/parts
OUT=/tmp/install bash scripts/device_install.sh || exit 1
mkdir -p "$parts"
if [ -n "${PREDICTOR:-}" ]; then
  truth=rtn
  [ "$PREDICTOR" = signround ] && truth=signround
  timeout "${PREDICTOR_LIMIT:-240}" python3 scripts/bench_predictor.py --model $d/text-moe --sens $d/sens_text.json \
    --calib $d/text_calib.txt --windows 128 --bits 2,3,4 --probes-per-batch 8 --boot 300 --threads 8 --device cuda \
    --truth-quantizer $truth --out "$out/predictor.json" > "$parts/predictor.log" 2>&1
  cp "$parts/predictor.log" "$out/" 2>/dev/null || true
fi
if [ "${STUDY:-1}" = 0 ]; then
  tail -40 "$parts/predictor.log" 2>/dev/null
  exit 0
fi
pids=()
part() {  # part NAME compare_allocations-arguments...
  local name=$1
  shift
  mkdir -p "$parts/$name"
  OMP_NUM_THREADS=1 timeout "$limit" python3 scripts/compare_allocations.py --device cuda --rtn "" --seeds "$seeds" \
    --windows 0 "$@" --out "$parts/$name" > "$parts/$name/log.txt" 2>&1 &
  pids+=($!)
}
T=(--sensitivity $d/sens_text.json --model $d/text-moe --calib $d/text_calib.txt --data $d/text_dev.txt)
V=(--sensitivity $d/sens_vlm.json --model $d/vlm-moe --calib $d/vqa_calib.npz --data $d/vqa_dev.npz)
for s in 2.25 2.5 2.75 3.0 3.5; do
  part "t$s" "${T[@]}" --sizes "$s" --no-fixed --predictions docs/predictor.json --budget-on out_err_gniso
done
part tuniform "${T[@]}" --sizes "" --skip kmeans,budget
part tkmeans "${T[@]}" --sizes "" --skip uniform
for q in gptq signround; do
  for s in 2.25 2.5 2.75 3.0 3.5; do part "v$q$s" "${V[@]}" --quantizer $q --sizes "$s" --no-fixed; done
  part "v${q}fixed" "${V[@]}" --quantizer $q --sizes ""
done
for pid in "${pids[@]}"; do wait "$pid"; done
rm -f "$parts"/*/compare_text.md "$parts"/*/compare_text.png
tar czf "$out/parts.tgz" -C "$parts" .
for f in "$parts"/*/log.txt; do echo "=== $f"; grep -v Warning "$f" | tail -4; done
