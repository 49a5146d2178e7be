"""Where the compiled kernel library lives. Kept import-light: no torch, no transformers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import MopeqError  # the toolchain's type when it is installed (errors.py), else the runtime's own

LIBRARY_NAME = {"darwin": "libmopeq_ops.dylib", "win32": "mopeq_ops.dll"}.get(sys.platform, "libmopeq_ops.so")


class KernelLibraryMissing(MopeqError):
    """The C++ library of mopeq.MoEExperts has not been built."""


def library_path() -> Path:
    """Path of libmopeq_ops (register it with SessionOptions.register_custom_ops_library).

    $MOPEQ_KERNEL_LIBRARY overrides the packaged build (e.g. the sanitizer build of `make test-asan`)."""
    override = os.environ.get("MOPEQ_KERNEL_LIBRARY")
    path = Path(override) if override else Path(__file__).resolve().parent / "lib" / LIBRARY_NAME
    if not path.is_file():
        raise KernelLibraryMissing(
            f"kernel library not found at {path}; build it with `make kernels` in the repository root "
            "(without it, exported models still run through the portable ONNX function fallback)")
    return path
