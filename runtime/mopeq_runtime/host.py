"""What machine the runtime is on, and whether a bundle's target and kernel library fit it."""

from __future__ import annotations

import platform
from pathlib import Path

from .errors import BundleError
from .manifest import TargetEntry

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8l": "aarch64"}
_ELF_MACHINES = {62: "x86_64", 183: "aarch64", 40: "arm"}  # e_machine of the ELF header


def host_arch() -> str:
    m = platform.machine().lower()
    return _ARCH_ALIASES.get(m, m)


def is_jetson() -> bool:
    """L4T writes /etc/nv_tegra_release; the device-tree model names the module (e.g. 'NVIDIA Jetson Orin Nano')."""
    if Path("/etc/nv_tegra_release").exists():
        return True
    try:
        return "jetson" in Path("/proc/device-tree/model").read_text(errors="ignore").lower()
    except OSError:
        return False


def check_target(target: TargetEntry, expect: str | None, allow_foreign: bool) -> str | None:
    """None if the bundle is meant for this host; else the reason (raised unless allow_foreign)."""
    reason = None
    arch = host_arch()
    if expect is not None and expect != target.name:
        reason = f"the bundle was built for target {target.name!r}, not {expect!r}"
    elif arch not in target.arches:
        reason = f"the bundle was built for target {target.name!r} ({'/'.join(target.arches)}), this host is {arch}"
    elif target.name.startswith("jetson") and not is_jetson():
        reason = f"the bundle was built for target {target.name!r} but this host is not a Jetson"
    if reason and not allow_foreign:
        raise BundleError(f"{reason}; rebuild with --target for this device, or pass allow_foreign_target=True "
                          "(CLI: --allow-foreign-target) to run it here anyway")
    return reason


def elf_arch_bytes(data: bytes) -> str | None:
    """Machine a shared library was compiled for, from its ELF header (None if not ELF)."""
    head = data[:20]
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    order = "little" if head[5] == 1 else "big"
    return _ELF_MACHINES.get(int.from_bytes(head[18:20], order), f"elf-machine-{int.from_bytes(head[18:20], order)}")


def elf_arch(path: Path) -> str | None:
    with open(path, "rb") as f:
        return elf_arch_bytes(f.read(20))


def check_elf_bytes(data: bytes, name: str) -> None:
    """Raise BundleError unless `data` is a whole ELF shared object: every program segment and section the
    headers declare lies inside it. dlopen() maps a truncated library and the process dies with SIGBUS on
    first touch; this reads only the headers."""
    size = len(data)
    bad = lambda why: BundleError(f"kernel library {name} is damaged ({why}); re-copy the bundle or "  # noqa: E731
                                  "rebuild the library")
    if size < 52 or data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        raise bad("not an ELF file")
    wide, order = data[4] == 2, "little" if data[5] == 1 else "big"
    u = lambda o, n: int.from_bytes(data[o:o + n], order)  # noqa: E731
    if wide and size < 64:
        raise bad("header cut short")
    if u(16, 2) != 3:  # ET_DYN
        raise bad("not a shared library")
    if wide:
        phoff, shoff = u(32, 8), u(40, 8)
        phentsize, phnum, shentsize, shnum = u(54, 2), u(56, 2), u(58, 2), u(60, 2)
    else:
        phoff, shoff = u(28, 4), u(32, 4)
        phentsize, phnum, shentsize, shnum = u(42, 2), u(44, 2), u(46, 2), u(48, 2)
    if phnum == 0 or phoff + phentsize * phnum > size or shoff + shentsize * shnum > size:
        raise bad(f"its headers reach past its {size} bytes: truncated")
    for i in range(phnum):
        ph = phoff + i * phentsize
        off, filesz = (u(ph + 8, 8), u(ph + 32, 8)) if wide else (u(ph + 4, 4), u(ph + 16, 4))
        if off + filesz > size:
            raise bad(f"segment {i} ends at byte {off + filesz}, the file has {size}: truncated")
    for i in range(shnum):
        sh = shoff + i * shentsize
        kind = u(sh + 4, 4)
        off, sz = (u(sh + 24, 8), u(sh + 32, 8)) if wide else (u(sh + 16, 4), u(sh + 20, 4))
        if kind != 8 and off + sz > size:  # SHT_NOBITS (.bss) occupies no file bytes
            raise bad(f"section {i} ends at byte {off + sz}, the file has {size}: truncated")


PROVIDERS_MARKER = b"mopeq-ops-providers:"  # runtime/csrc/src/op.cc, mopeq_ops_providers


def library_providers(data: bytes) -> tuple[str, ...]:
    """Execution providers a kernel library registers mopeq.MoEExperts for, read from its bytes (a library
    built before the marker existed registers the CPU op only)."""
    at = data.find(PROVIDERS_MARKER)
    if at < 0:
        return ("CPUExecutionProvider",)
    end = data.find(b"\0", at)
    text = data[at + len(PROVIDERS_MARKER):end if end >= 0 else at + 256].decode("ascii", "replace")
    return tuple(p for p in text.split(",") if p)


def parse_device(device: str) -> tuple[str, int]:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> (kind, device id)."""
    d = str(device).strip().lower()
    if d in ("auto", "cpu", "cuda"):
        return d, 0
    if d.startswith("cuda:") and d[5:].isdigit():
        return "cuda", int(d[5:])
    raise BundleError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")


def pick_providers(preferred: tuple[str, ...], available: list[str]) -> list[str]:
    """The target's providers that this onnxruntime build has, in the target's order; CPU always last."""
    chosen = [p for p in preferred if p in available and p != "CPUExecutionProvider"]
    return chosen + ["CPUExecutionProvider"]
