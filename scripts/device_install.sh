#!/usr/bin/env bash
# On the lent GPU machine (device tool): install this checkout over the image's packages (no package index
# there) and build the kernel library. Needs build/ort-headers carried along. Logs go to $OUT.
set -euo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
# checked from / : in the checkout, `python3 -c` would import the source folder itself (not mopeq_exporters)
if ! (cd / && python3 -c "import mopeq_export, mopeq_exporters, mopeq_runtime") 2>/dev/null; then
  # the device reaches no package index: the runtime's source folder goes on the path (its build backend,
  # scikit-build-core, is not installed there), the toolchain installs editable with the local setuptools
  pth="$(python3 -c 'import site; print(site.getsitepackages()[0])')/mopeq_runtime_src.pth"
  echo "$PWD/runtime" > "$pth"
  if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/pip.log" 2>&1; then
    # the image's setuptools could not install it: the package names through links, on the path
    echo "pip install failed (pip.log): the toolchain goes on the path through links in /root/src"
    mkdir -p /root/src && ln -sfn "$PWD/mopeq_export" /root/src/mopeq_export && ln -sfn "$PWD/exporters" /root/src/mopeq_exporters
    for d in calibration_data evaluation_data; do ln -sfn "$PWD/$d" "mopeq_export/$d"; done
    echo /root/src >> "$pth"
  fi
fi
if [ ! -f runtime/mopeq_runtime/lib/libmopeq_ops.so ]; then
  ort=$PWD/build/ort-headers/usr/include/onnxruntime
  { cmake -S runtime/csrc -B build/kernels -DCMAKE_BUILD_TYPE=Release -DORT_INCLUDE_DIR="$ort" &&
    cmake --build build/kernels -j "$(nproc)" && cmake --install build/kernels --prefix runtime/mopeq_runtime; } >"$out/cmake.log" 2>&1
fi
(cd / && python3 -c "import mopeq_export, mopeq_exporters, mopeq_runtime.native as n; print('toolchain', mopeq_export.__file__, 'kernel', n.library_path())")
