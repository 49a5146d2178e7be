# The two commands a new user runs:  make setup  &&  make test
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
BUILD   := build
# ORT C/C++ API headers for the kernel library; override with ORT_INCLUDE_DIR=/path/to/include/onnxruntime
ORT_INCLUDE_DIR ?= $(abspath $(BUILD)/ort-headers/usr/include/onnxruntime)

.PHONY: setup aarch64-tools test test-fast test-asan kernels kernels-asan kernels-cuda cuda-check clean

setup: $(VENV)/.installed kernels aarch64-tools

# The aarch64 cross compiler and qemu-user, so `make test` runs the NEON kernel paths emulated
# (tests/test_kernel_selftest.py); best effort: without root or apt the test skips and says why.
aarch64-tools:
	@if command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu qemu-user \
	    >/dev/null) || echo "note: could not install the aarch64 cross tools; the NEON kernel test will skip"; \
	else echo "note: aarch64 cross tools not installed (needs root and apt); the NEON kernel test will skip"; fi

$(VENV)/.installed: pyproject.toml runtime/pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first and pinned: the local CPU wheel (an unpinned torch pulls a multi-GB CUDA build)
	$(VPY) -m pip install -q torch==2.13.0
	# the runtime distribution (runtime/pyproject.toml) as an editable pure-Python install: its kernel
	# library comes from `make kernels` into runtime/mopeq_runtime/lib (a wheel build compiles it itself)
	$(VPY) -m pip install -q -e './runtime[signatures]' -Cwheel.cmake=false
	$(VPY) -m pip install -q -e '.[dev]'
	touch $@

$(ORT_INCLUDE_DIR)/onnxruntime_cxx_api.h:
	bash runtime/csrc/fetch_debian_headers.sh $(BUILD)/ort-headers libonnxruntime-dev onnxruntime/onnxruntime_cxx_api.h

kernels: $(ORT_INCLUDE_DIR)/onnxruntime_cxx_api.h
	cmake -S runtime/csrc -B $(BUILD)/kernels -DCMAKE_BUILD_TYPE=Release -DMOPEQ_CUDA=OFF -DORT_INCLUDE_DIR=$(ORT_INCLUDE_DIR) >/dev/null
	cmake --build $(BUILD)/kernels -j 2
	cmake --install $(BUILD)/kernels --prefix runtime/mopeq_runtime >/dev/null

# The kernel library under AddressSanitizer + UndefinedBehaviorSanitizer (any report aborts the process)
ASAN_LIB := $(abspath $(BUILD)/asan/libmopeq_ops.so)
kernels-asan: $(ORT_INCLUDE_DIR)/onnxruntime_cxx_api.h
	cmake -S runtime/csrc -B $(BUILD)/kernels-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOPEQ_CUDA=OFF -DORT_INCLUDE_DIR=$(ORT_INCLUDE_DIR) \
	  -DCMAKE_CXX_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer" \
	  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
	cmake --build $(BUILD)/kernels-asan -j 2
	mkdir -p $(BUILD)/asan && cp $(BUILD)/kernels-asan/libmopeq_ops.so $(ASAN_LIB)

# the kernel tests and the kernel fuzz test against the sanitized library (python itself is not
# instrumented: the ASan runtime is preloaded, leak checking off for the interpreter's own allocations)
test-asan: kernels-asan
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	MOPEQ_KERNEL_LIBRARY=$(ASAN_LIB) $(VPY) -m pytest -q -p no:cacheprovider tests/test_kernel_cpu.py \
	  tests/test_kernel_fuzz.py

# GPU/Jetson: libmopeq_ops_cuda (the CPU op + the CUDA kernel registered for ORT's CUDA provider; needs nvcc;
# off in setup) installed beside libmopeq_ops, where GPU-target builds pick it up
kernels-cuda: $(ORT_INCLUDE_DIR)/onnxruntime_cxx_api.h
	cmake -S runtime/csrc -B $(BUILD)/kernels-cuda -DCMAKE_BUILD_TYPE=Release -DMOPEQ_CUDA=ON -DMOPEQ_ORT_CUDA=ON \
	  -DORT_INCLUDE_DIR=$(ORT_INCLUDE_DIR) >/dev/null
	cmake --build $(BUILD)/kernels-cuda -j 2
	cmake --install $(BUILD)/kernels-cuda --prefix runtime/mopeq_runtime >/dev/null

# on a CUDA machine: build the CUDA kernel standalone, run its correctness harness, memcheck and benchmark
cuda-check:
	bash scripts/cuda_check.sh

test:
	$(VPY) -m pytest -q

test-fast:
	$(VPY) -m pytest -q -m "not slow"

clean:
	rm -rf $(BUILD) runtime/mopeq_runtime/lib
