"""`load(BUNDLE)`: open (folder or .tar), verify, check the target, register the kernel, start sessions."""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import weakref
from pathlib import Path

from .errors import BundleError
from .host import check_target, elf_arch, host_arch, pick_providers
from .manifest import Manifest, read_manifest, verify_files
from .model import BundleModel, KernelStatus


def _extract(tar_path: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="mopeq-bundle-"))
    try:
        with tarfile.open(tar_path) as tf:
            tf.extractall(tmp, filter="data")  # refuses absolute paths, '..', links out of the folder
    except (tarfile.TarError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleError(f"cannot unpack {tar_path}: {e}; re-copy the bundle") from None
    return tmp


def open_bundle(path: str | Path, verify: bool = True) -> tuple[Path, Manifest, Path | None]:
    """(folder, manifest, temporary folder to delete or None). A .tar is unpacked to a temporary folder."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle not found: {path}")
    tmp = _extract(path) if path.is_file() else None
    root = tmp or path
    try:
        manifest = read_manifest(root)
        if verify:
            verify_files(root, manifest)
    except BaseException:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root, manifest, tmp


def _kernel(ort, so, root: Path, manifest: Manifest, use_kernel: bool, device_library: Path | None) -> KernelStatus:
    k = manifest.kernel
    if not use_kernel:
        return KernelStatus(False, "kernel disabled by the caller: MoE layers run the ONNX function-body fallback")
    if device_library is not None:  # built on the device from kernel-src/: outside the bundle, so not hashed
        lib = Path(device_library)
        if not lib.is_file():
            raise BundleError(f"kernel library {lib} not found; build it from the bundle's kernel-src/ ({k.build})")
    elif k.status != "binary" or not k.library:
        return KernelStatus(False, f"no kernel library in the bundle ({k.note}); running the function-body fallback")
    else:
        lib = root / k.library
    arch, host = elf_arch(lib), host_arch()
    if arch != host:
        return KernelStatus(False, f"the bundle's kernel library is for {arch}, this host is {host}; "
                                   f"running the function-body fallback (build it here: {k.build})")
    try:
        so.register_custom_ops_library(str(lib))
    except Exception as e:  # ORT raises a generic exception for libraries it cannot load
        return KernelStatus(False, f"the kernel library did not load ({str(e).splitlines()[0]}); "
                                   "running the function-body fallback")
    return KernelStatus(True, f"mopeq.MoEExperts runs in {device_library or k.library} ({arch})")


def load(bundle: str | Path, *, target: str | None = None, allow_foreign_target: bool = False,
         use_kernel: bool = True, require_kernel: bool = False, kernel_library: str | Path | None = None,
         providers: list[str] | None = None, threads: int = 0, verify: bool = True) -> BundleModel:
    """Open a bundle for inference.

    target: the device name this app expects (refuses another target's bundle); allow_foreign_target runs a
    bundle on a host it was not built for (e.g. a Jetson bundle on an x86 CPU). use_kernel=False forces the
    portable function bodies; require_kernel=True makes a missing or unloadable kernel library an error.
    kernel_library: a libmopeq_ops built on the device from the bundle's kernel-src/ (a source-only bundle).
    """
    import onnxruntime as ort

    root, manifest, tmp = open_bundle(bundle, verify=verify)
    try:
        note = check_target(manifest.target, target, allow_foreign_target)
        so = ort.SessionOptions()
        so.log_severity_level = 3  # ORT warnings (e.g. unused initializers) are noise to a device app
        if threads:
            so.intra_op_num_threads = threads
        kernel = _kernel(ort, so, root, manifest, use_kernel, kernel_library)
        if require_kernel and not kernel.used:
            raise BundleError(f"kernel library required but not used: {kernel.reason}")
        chosen = providers or pick_providers(manifest.target.providers, ort.get_available_providers())
        sessions = {}
        for g in manifest.graphs:
            try:
                sessions[g.name] = ort.InferenceSession(str(root / g.file), sess_options=so, providers=chosen)
            except Exception as e:  # ORT's exceptions carry the reason on their first line
                raise BundleError(f"ONNX Runtime cannot load {g.file}: {str(e).splitlines()[0]}") from None
        model = BundleModel(root, manifest, sessions, kernel, chosen, note)
    except BaseException:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if tmp:
        weakref.finalize(model, shutil.rmtree, tmp, True)  # the unpacked copy lives as long as the model
    return model
