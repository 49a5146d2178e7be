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


def elf_arch(path: Path) -> str | None:
    """Machine a shared library was compiled for, from its ELF header (None if not ELF)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    order = "little" if head[5] == 1 else "big"
    return _ELF_MACHINES.get(int.from_bytes(head[18:20], order), f"elf-machine-{int.from_bytes(head[18:20], order)}")


def pick_providers(preferred: tuple[str, ...], available: list[str]) -> list[str]:
    """The target's providers that this onnxruntime build has, in the target's order; CPU always last."""
    chosen = [p for p in preferred if p in available and p != "CPUExecutionProvider"]
    return chosen + ["CPUExecutionProvider"]
