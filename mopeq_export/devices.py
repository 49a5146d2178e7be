"""Where a stage computes, in which precision, and what it cost (docs/DECISIONS.md "Devices and precision").

- ``--device auto|cpu|cuda|cuda:N``: auto is the first CUDA GPU when one is visible, else the CPU.
- ``--dtype auto|float32|bfloat16``: the dtype the model's forward (and the analysis backward) runs in.
  auto is float32 for models up to ``FLOAT32_MAX_PARAMS`` parameters (every reference and test model, so
  their numbers do not move) and bfloat16 above: a float32 copy of a real checkpoint costs twice its bytes.
  16-bit compute is always bfloat16 (float16 checkpoints included): its exponent range is float32's, so
  gradients of the analysis cannot underflow the way they can in float16.
- Whatever the compute dtype, what decides a result accumulates in float32 or float64: GPTQ's Hessians and
  Cholesky factors and its weights (float32), probe sums and routing statistics (float64), quantization
  errors (float64 sums of float32 differences).

`Resources` records wall time, the process's peak resident memory and the device's peak allocation, so every
stage record says what it cost.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from .errors import MopeqError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FLOAT32_MAX_PARAMS = 1_000_000_000


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """A torch device from the CLI spelling; a CUDA device that is not there is an error, not a fallback."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = 0
        if spec != "cuda":
            try:
                index = int(spec.split(":", 1)[1])
            except ValueError:
                raise MopeqError(f"--device {spec!r}: expected {DEVICE_CHOICES}") from None
        if not torch.cuda.is_available():
            raise MopeqError(f"--device {spec}: no CUDA GPU is visible to PyTorch (torch {torch.__version__}); "
                             "use --device cpu, or install a CUDA build of torch")
        if index >= torch.cuda.device_count():
            raise MopeqError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", index)
    raise MopeqError(f"--device {spec!r}: expected {DEVICE_CHOICES}")


def resolve_dtype(spec: str | torch.dtype | None, params: int) -> torch.dtype:
    """The compute dtype for a model of `params` parameters (see the module docstring)."""
    if isinstance(spec, torch.dtype):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.float32 if params <= FLOAT32_MAX_PARAMS else torch.bfloat16
    if spec not in DTYPES:
        raise MopeqError(f"--dtype {spec!r}: expected auto, {' or '.join(DTYPES)}")
    return DTYPES[spec]


_LIBC = None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_BOUND_BYTES = 1 << 20
_MMAP_BOUND = False  # bound_host_memory fixed the mmap threshold in this process
_TRIM_DEFAULT = 128 << 10  # glibc's M_TRIM_THRESHOLD


def bound_host_memory() -> None:
    """Keep freed host memory from piling up in the process (CPU runs at real size, docs/SCALE.md):

    - oneDNN's primitive cache keeps a reordered copy of each weight it multiplied in bfloat16: with the
      whole model passing through once per probe that is a second model. Capacity 0 (unless set).
    - glibc serves large allocations from its heap once it has freed some, and keeps the freed pages:
      a fixed mmap threshold of 1 MiB returns every large tensor's pages to the OS when it is freed
      (unless MALLOC_MMAP_THRESHOLD_ is set). Measured on a 2-layer Qwen3-MoE, probe peak 2.17 -> 1.43 GiB.
    """
    import os

    global _MMAP_BOUND
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
    libc = _libc()
    if libc and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_BOUND_BYTES)
        _MMAP_BOUND = True


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes

        try:
            _LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else False
        except OSError:  # not glibc
            _LIBC = False
    return _LIBC


@contextlib.contextmanager
def heap_reuse(max_block: int = 256 << 20) -> Iterator[None]:
    """Within the block, glibc keeps freed memory for the next allocation of the same size instead of
    handing every tensor over 1 MiB back to the OS (bound_host_memory's setting): a loop that allocates
    and frees the same working set many times (learned rounding's steps) otherwise spends as long in
    page faults as in arithmetic (measured on text-moe's learned-rounding quantize of the routed experts,
    2 cores: system time 343 s, under a profiler, -> 25 s, the stage 188 s). Blocks up to `max_block` come
    from the heap; on exit the 1 MiB threshold is back and the heap's free pages go to the OS (malloc_trim),
    so the stage's resident memory after the block is what it was. Nothing happens unless bound_host_memory set that threshold (the CLI does; a library
    caller keeps glibc's adaptive one, which does not have the problem)."""
    libc = _libc()
    if not (libc and _MMAP_BOUND):
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, max_block)
    libc.mallopt(_M_TRIM_THRESHOLD, max_block)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_BOUND_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_DEFAULT)
        libc.malloc_trim(0)


def trim_host_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc malloc_trim): called where a stage has just freed
    a large working set on the CPU (a probe's gradients, a decoder layer). A few milliseconds; measured
    on the 1.25B Qwen3-MoE analysis, the probe peak over the resident model fell from +0.47 to +0.28 GiB."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def available_bytes(device: torch.device) -> int:
    """Memory a new allocation can still get: free GPU memory, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def peak_rss_bytes() -> int:
    """The process's peak resident set since it started (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass(frozen=True)
class Resources:
    """What a stage cost: wall seconds, peak host RSS of the process so far, peak device allocation."""

    device: str
    dtype: str
    seconds: float
    peak_rss_bytes: int
    peak_gpu_bytes: int | None  # None on the CPU
    estimate_bytes: int | None = None  # the stage's own peak estimate on its device (scale.py), if it made one

    def to_json(self) -> dict:
        return asdict(self)


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class Meter:
    """Start when a stage starts, `done()` when it ends: a `Resources` record of that stage alone.

    The host peak is sampled every 20 ms by a thread (ru_maxrss would be the whole process's, earlier stages
    of a build included); the GPU peak is the allocator's, reset at the start."""

    def __init__(self, device: torch.device, dtype: torch.dtype, interval: float = 0.02,
                 estimate_bytes: int | None = None):
        self.device, self.dtype, self.estimate = device, dtype, estimate_bytes
        if device.type == "cuda":
            torch.cuda.init()  # the allocator's statistics need the CUDA context; a stage may meter first
            torch.cuda.reset_peak_memory_stats(device)
        self.start = time.perf_counter()
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, rss_bytes())

    def done(self) -> Resources:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        gpu = int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None
        return Resources(str(self.device), dtype_name(self.dtype), round(time.perf_counter() - self.start, 3),
                         self.peak, gpu, self.estimate)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
