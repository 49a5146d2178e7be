#!/usr/bin/env bash
# Cross-build libmopeq_ops and the kernel self-test for aarch64 (Jetson-class CPUs) and run the
# self-test under qemu-user.  Needs: apt-get install g++-aarch64-linux-gnu qemu-user
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ort=${ORT_INCLUDE_DIR:-$root/build/ort-headers/usr/include/onnxruntime}
cmake -S "$root/runtime/csrc" -B "$root/build/kernels-aarch64" -DCMAKE_SYSTEM_NAME=Linux \
  -DCMAKE_SYSTEM_PROCESSOR=aarch64 -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
  -DORT_INCLUDE_DIR="$ort" -DMOPEQ_BUILD_SELFTEST=ON -DMOPEQ_CUDA=OFF >/dev/null
cmake --build "$root/build/kernels-aarch64" -j 2
for path in i8-neon i8-scalar scalar; do
  MOPEQ_KERNEL=$path qemu-aarch64 -L /usr/aarch64-linux-gnu "$root/build/kernels-aarch64/kernel_selftest"
done
