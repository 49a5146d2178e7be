#!/usr/bin/env bash
# On the lent GPU machine (device tool): learned-rounding variants (SignRoundConfig fields through
# compare_allocations.py --signround) at uniform widths and the default plan at --sizes, several seeds, all of
# text_dev (or vqa_dev); one process per variant and size, at once. Needs work/devshare (text-moe, text_calib.txt,
# text_dev.txt; for MODEL=vlm: vlm-moe, vqa_calib.npz, vqa_dev.npz) and build/ort-headers carried along; the
# sensitivity report is made here (analyze on the GPU). Parts come back as $OUT/parts.tgz (merge:
# `python scripts/compare_allocations.py merge OUT */compare_text.json` in the unpacked folder).
#   VARIANTS="base v_range=1.0" (one set of processes each; "base" is the default config), SIZES (default 2.75),
#   SEEDS (default 0,1), LIMIT seconds per process, UNIFORM="2 3" (the uniform widths; empty for none).
set -uo pipefail
out=${OUT:-/tmp/out}
d=work/devshare
parts=/tmp/parts
OUT=/tmp/install bash scripts/device_install.sh || exit 1
rm -rf "$parts"  # a warm machine keeps an earlier call's parts
mkdir -p "$parts"
if [ "${MODEL:-text}" = vlm ]; then
  M=(--model $d/vlm-moe --calib $d/vqa_calib.npz --data $d/vqa_dev.npz); sens=/tmp/sens_vlm; calib=$d/vqa_calib.npz; model=$d/vlm-moe
else
  M=(--model $d/text-moe --calib $d/text_calib.txt --data $d/text_dev.txt); sens=/tmp/sens; calib=$d/text_calib.txt; model=$d/text-moe
fi
# a warm machine keeps the report of an earlier call (same model and data)
[ -f $sens/sensitivity.json ] || mopeq-export analyze --model $model --calib $calib --out $sens \
  --device cuda > "$out/analyze.log" 2>&1 || { tail -20 "$out/analyze.log"; exit 1; }
cp $sens/sensitivity.json "$out/sens_${MODEL:-text}.json"
pids=()
part() {  # part NAME SIGNROUND-FIELDS compare_allocations-arguments...
  local name=$1 sr=$2
  shift 2
  mkdir -p "$parts/$name"
  OMP_NUM_THREADS=1 timeout "${LIMIT:-420}" python3 scripts/compare_allocations.py --device cuda --rtn "" \
    --seeds "${SEEDS:-0,1}" --windows 0 --sensitivity $sens/sensitivity.json "${M[@]}" ${sr:+--signround "$sr"} \
    "$@" --out "$parts/$name" > "$parts/$name/log.txt" 2>&1 &
  pids+=($!)
}
for v in ${VARIANTS:-base v_range=1.0}; do
  sr=$v; [ "$v" = base ] && sr=""
  for s in ${SIZES-2.75}; do part "$v-$s" "$sr" --sizes "$s" --no-fixed --skip random,frequency,hessian; done
  for b in ${UNIFORM-2 3}; do
    skip=kmeans,budget; for o in 2 3 4; do [ "$o" = "$b" ] || skip="$skip,uniform-$o"; done
    part "$v-u$b" "$sr" --sizes "" --skip "$skip"
  done
done
for pid in "${pids[@]}"; do wait "$pid"; done
rm -f "$parts"/*/compare_text.md "$parts"/*/compare_text.png
tar czf "$out/parts.tgz" -C "$parts" .
for f in "$parts"/*/log.txt; do echo "=== $f"; grep -v Warning "$f" | tail -5; done
