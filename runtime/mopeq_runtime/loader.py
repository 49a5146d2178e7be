"""`load(BUNDLE)`: open (folder or .tar), verify, check the target, register the kernel, start sessions."""

from __future__ import annotations

import json
import lzma
import shutil
import tarfile
import tempfile
import weakref
import zlib
from pathlib import Path
from typing import Iterable

from .errors import BundleError
from .host import check_elf, check_target, elf_arch, host_arch, pick_providers
from .manifest import MANIFEST, Manifest, read_manifest, verify_files
from .signature import SIGNATURE, KeyLike, verify_signature
from .model import BundleModel, KernelStatus


MAX_MANIFEST_BYTES = 16 << 20


def _extract(tar_path: Path) -> Path:
    """Unpack a bundle archive (.tar, .tar.gz, .tar.xz, .tar.bz2) into a private temporary folder.

    Nothing is written before the archive's table of contents has been checked against its manifest: only
    regular files and folders, each file listed in manifest.json (or manifest.json / manifest.sig) with the
    size the manifest gives, and the total within the free space. So an archive can never expand to more than
    the bundle it claims to be; the hashes are checked after unpacking, as for a folder."""
    try:
        with tarfile.open(tar_path) as tf:
            members = tf.getmembers()
            files = {m.name.removeprefix("./"): m for m in members if m.isfile()}
            for m in members:
                if not (m.isfile() or m.isdir()):
                    raise BundleError(f"{tar_path} holds {m.name!r}, which is not a regular file or folder; "
                                      "a bundle archive holds only files (re-create it with `build --tar`)")
            head = files.get(MANIFEST)
            if head is None or head.size > MAX_MANIFEST_BYTES:
                raise BundleError(f"{tar_path} has no {MANIFEST} of a sane size at its top level; it is not a bundle")
            manifest = Manifest.from_json(json.loads(tf.extractfile(head).read().decode("utf-8")),
                                          f"{tar_path}:{MANIFEST}")
            declared = {f.path: f.size for f in manifest.files}
            for name, m in files.items():
                if name in (MANIFEST, SIGNATURE):
                    continue
                if declared.get(name) != m.size:
                    why = "is not listed in its manifest" if name not in declared else \
                        f"has {m.size} bytes, the manifest says {declared[name]}"
                    raise BundleError(f"{tar_path}: member {name} {why}; the archive was altered, re-copy it")
            total = sum(m.size for m in files.values())
            tmp = Path(tempfile.mkdtemp(prefix="mopeq-bundle-"))
            if shutil.disk_usage(tmp).free < total:
                shutil.rmtree(tmp, ignore_errors=True)
                raise BundleError(f"unpacking {tar_path} needs {total / 2**20:.0f} MiB in {tmp.parent}; free space "
                                  "there (or set TMPDIR), or unpack it yourself and load the folder")
            try:
                tf.extractall(tmp, filter="data")  # also refuses absolute paths and '..'
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError, ValueError, zlib.error, lzma.LZMAError) as e:
        raise BundleError(f"cannot unpack {tar_path}: {type(e).__name__}: {e}; re-copy the bundle") from None
    return tmp


def open_bundle(path: str | Path, verify: bool = True,
                trusted_keys: Iterable[KeyLike] | None = None) -> tuple[Path, Manifest, Path | None]:
    """(folder, manifest, temporary folder to delete or None). A .tar is unpacked to a temporary folder.

    trusted_keys: public keys (PEM files, PEM bytes or raw 32-byte keys); the bundle is refused unless its
    manifest.sig verifies with one of them. Keys imply verify (the signature covers the files via their
    hashes)."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle not found: {path}")
    tmp = _extract(path) if path.is_file() else None
    root = tmp or path
    try:
        manifest = read_manifest(root)
        if trusted_keys is not None:
            verify_signature(root, trusted_keys)
        if verify or trusted_keys is not None:
            verify_files(root, manifest)
    except BaseException:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root, manifest, tmp


def check_validated(manifest: Manifest, allow_unvalidated: bool) -> None:
    if manifest.validation.get("passed") is True or allow_unvalidated:
        return
    raise BundleError("this bundle never passed the accuracy gate (its manifest's validation is "
                      f"{json.dumps(manifest.validation)[:80]}): it is the leftover of an interrupted or failed "
                      "build; rebuild it, or pass allow_unvalidated=True to run it anyway")


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
    check_elf(lib)  # a truncated library would crash the process inside dlopen (SIGBUS), not raise
    try:
        so.register_custom_ops_library(str(lib))
    except Exception as e:  # ORT raises a generic exception for libraries it cannot load
        return KernelStatus(False, f"the kernel library did not load ({str(e).splitlines()[0]}); "
                                   "running the function-body fallback")
    return KernelStatus(True, f"mopeq.MoEExperts runs in {device_library or k.library} ({arch})")


def load(bundle: str | Path, *, target: str | None = None, allow_foreign_target: bool = False,
         use_kernel: bool = True, require_kernel: bool = False, kernel_library: str | Path | None = None,
         providers: list[str] | None = None, threads: int = 0, verify: bool = True,
         trusted_keys: Iterable[KeyLike] | None = None, allow_unvalidated: bool = False) -> BundleModel:
    """Open a bundle for inference.

    target: the device name this app expects (refuses another target's bundle); allow_foreign_target runs a
    bundle on a host it was not built for (e.g. a Jetson bundle on an x86 CPU). use_kernel=False forces the
    portable function bodies; require_kernel=True makes a missing or unloadable kernel library an error.
    kernel_library: a libmopeq_ops built on the device from the bundle's kernel-src/ (a source-only bundle).
    trusted_keys: refuse the bundle unless it is signed by one of these ed25519 public keys (docs/BUNDLE.md).
    allow_unvalidated: run a bundle whose manifest does not record a passed accuracy gate (refused by default).
    """
    import onnxruntime as ort

    root, manifest, tmp = open_bundle(bundle, verify=verify, trusted_keys=trusted_keys)
    try:
        check_validated(manifest, allow_unvalidated)
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
