"""Where the compiled kernel library lives. Kept import-light: no torch, no transformers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import MopeqError

LIBRARY_NAME = {"darwin": "libmopeq_ops.dylib", "win32": "mopeq_ops.dll"}.get(sys.platform, "libmopeq_ops.so")
CUDA_LIBRARY_NAME = LIBRARY_NAME.replace("mopeq_ops", "mopeq_ops_cuda")  # + the CUDA op (csrc/CMakeLists.txt)


class KernelLibraryMissing(MopeqError):
    """The C++ library of mopeq.MoEExperts has not been built."""


def library_path() -> Path:
    """Path of libmopeq_ops (register it with SessionOptions.register_custom_ops_library).

    $MOPEQ_KERNEL_LIBRARY overrides the packaged build (e.g. the sanitizer build of `make test-asan`)."""
    override = os.environ.get("MOPEQ_KERNEL_LIBRARY")
    path = Path(override) if override else packaged_library()
    if not path.is_file():
        raise KernelLibraryMissing(
            f"kernel library not found at {path}; reinstall the runtime (`pip install ./runtime` builds it) or, in "
            "a source checkout, run `make kernels` (without it, exported models still run through the portable "
            "ONNX function fallback)")
    return path


def packaged_library() -> Path:
    """Where the package keeps its library: mopeq_runtime/lib (the wheel's build, or `make kernels`)."""
    return Path(__file__).resolve().parent / "lib" / LIBRARY_NAME


def cuda_library_path() -> Path | None:
    """libmopeq_ops_cuda (the CPU op and the CUDA op) when this installation built it (nvcc was found, or
    `make kernels-cuda`), else None. $MOPEQ_CUDA_KERNEL_LIBRARY overrides it."""
    override = os.environ.get("MOPEQ_CUDA_KERNEL_LIBRARY")
    path = Path(override) if override else packaged_library().with_name(CUDA_LIBRARY_NAME)
    return path if path.is_file() else None


def kernel_sources() -> Path | None:
    """The C++/CUDA sources of the library: inside an installed wheel (mopeq_runtime/csrc), else the source
    tree's runtime/csrc; None when neither is present."""
    here = Path(__file__).resolve().parent
    for p in (here / "csrc", here.parent / "csrc"):
        if (p / "CMakeLists.txt").is_file():
            return p
    return None
