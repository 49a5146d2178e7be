#!/usr/bin/env bash
# On the lent GPU machine (device tool): install this checkout over the image's packages, build the kernel
# library, make a random-init checkpoint of SHAPE (scripts/make_checkpoint.py) and time one whole build of it
# (scripts/bench_realsize.py --build). Needs build/ort-headers carried along. Results land in $OUT.
#   bash scripts/device_realsize.sh olmoe-1b-7b jetson-agx-orin [extra bench_realsize.py flags]
set -euo pipefail
shape=$1 target=$2
shift 2
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0
out=${OUT:-/tmp/out}
mkdir -p "$out" /root/ck
if ! python3 -c "import mopeq_export" 2>/dev/null; then
  # the device reaches no package index: the runtime's source folder goes on the path (its build backend,
  # scikit-build-core, is not installed there), the toolchain installs editable with the local setuptools
  echo "$PWD/runtime" > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/mopeq_runtime_src.pth"
  python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/pip.log" 2>&1
fi
if [ ! -f runtime/mopeq_runtime/lib/libmopeq_ops.so ]; then
  ort=$PWD/build/ort-headers/usr/include/onnxruntime
  { cmake -S runtime/csrc -B build/kernels -DCMAKE_BUILD_TYPE=Release -DORT_INCLUDE_DIR="$ort" &&
    cmake --build build/kernels -j 16 && cmake --install build/kernels --prefix runtime/mopeq_runtime; } >"$out/cmake.log" 2>&1
fi
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
[ -d "/root/ck/$shape" ] || python3 scripts/make_checkpoint.py --shape "$shape" --out "/root/ck/$shape" --device cuda
work=/root/bench-$shape-$(date +%s)
python3 scripts/bench_realsize.py --model "/root/ck/$shape" --work "$work" --device cuda --stages "" --build \
  --target "$target" --json "$out/$shape.json" "$@" | tee "$out/$shape.txt"
cp "$work"/*.log "$out/" 2>/dev/null || true
cp "$work/summary.json" "$out/$shape-summary.json" 2>/dev/null || true
