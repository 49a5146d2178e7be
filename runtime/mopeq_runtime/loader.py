"""`load(BUNDLE)`: open (folder or .tar), verify, check the target, register the kernel, start sessions."""

from __future__ import annotations

import hashlib
import json
import lzma
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable

from .errors import BundleError
from .files import BundleFiles, sealed_copy
from .host import (check_elf_bytes, check_target, elf_arch_bytes, host_arch, library_providers, parse_device,
                   pick_providers)
from .manifest import GENAI_CONFIG, MANIFEST, Manifest, check_genai_config, parse_manifest, verify_files
from .model import BundleModel, KernelStatus
from .signature import (MAX_SIGNATURE_BYTES, SIGNATURE, KeyLike, SignatureInfo, parse_signature,
                        verify_signature)


MAX_MANIFEST_BYTES = 16 << 20


def _extract(tar_path: Path) -> Path:
    """Unpack a bundle archive (.tar, .tar.gz, .tar.xz, .tar.bz2) into a private temporary folder.

    Nothing is written before the archive's table of contents has been checked against its manifest: only
    regular files and folders, each file listed in manifest.json (or manifest.json / manifest.sig) with the
    size the manifest gives, each folder one that holds a listed file, no name twice, and the total within the
    free space. So an archive can never expand to more than the bundle it claims to be; the hashes are
    checked after unpacking, as for a folder."""
    try:
        with tarfile.open(tar_path) as tf:
            members = tf.getmembers()
            for m in members:
                if not (m.isfile() or m.isdir()):
                    raise BundleError(f"{tar_path} holds {m.name!r}, which is not a regular file or folder; "
                                      "a bundle archive holds only files (re-create it with `build --tar`)")
            files = {m.name.removeprefix("./"): m for m in members if m.isfile()}
            head = files.get(MANIFEST)
            if head is None or head.size > MAX_MANIFEST_BYTES:
                raise BundleError(f"{tar_path} has no {MANIFEST} of a sane size at its top level; it is not a bundle")
            manifest = parse_manifest(tf.extractfile(head).read(), f"{tar_path}:{MANIFEST}")
            declared = {f.path: f.size for f in manifest.files}
            folders = {p.as_posix() for f in declared for p in PurePosixPath(f).parents if p.as_posix() != "."}
            names = [m.name.removeprefix("./").rstrip("/") for m in members]
            most = len(declared) + len(folders) + 3  # + manifest.json, manifest.sig and the top folder itself
            if len(names) != len(set(names)) or len(names) > most:
                raise BundleError(f"{tar_path} holds {len(names)} members, with repeated names or more than a bundle "
                                  f"of {len(declared)} files has ({most} at most); the archive was altered, re-copy it")
            for m in members:
                name = m.name.removeprefix("./").rstrip("/")
                if m.isdir() and name not in folders and name not in ("", "."):
                    raise BundleError(f"{tar_path}: folder {name}/ holds no file the manifest lists; the archive "
                                      "was altered, re-copy it")
            for name, m in files.items():
                if name in (MANIFEST, SIGNATURE):
                    if name == SIGNATURE and m.size > MAX_SIGNATURE_BYTES:
                        raise BundleError(f"{tar_path}: {SIGNATURE} has {m.size} bytes; not a signature")
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
        why = (str(e).splitlines() or [""])[0][:200]
        raise BundleError(f"cannot unpack {tar_path}: {type(e).__name__}: {why}; re-copy the bundle") from None
    return tmp


@dataclass
class OpenedBundle:
    """A bundle held open (files.BundleFiles): the manifest parsed from the bytes that were read once, and,
    when verified, every listed file open and checked against it. Close it (or use it as a context manager)."""

    files: BundleFiles
    manifest: Manifest
    manifest_bytes: bytes
    signature: dict | None  # manifest.sig's record, None when unsigned
    signed_by: SignatureInfo | None  # the trusted key that verified it, None when no keys were given
    tmp: Path | None  # the private unpacked copy of an archive

    @property
    def root(self) -> Path:
        return self.files.root

    @property
    def label(self) -> str:
        return self.files.label

    def close(self) -> None:
        self.files.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> "OpenedBundle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_bundle(path: str | Path, verify: bool = True,
                trusted_keys: Iterable[KeyLike] | None = None) -> OpenedBundle:
    """Open a bundle folder or archive (.tar is unpacked to a private temporary folder) for reading.

    manifest.json is read once; those bytes are parsed, value-checked and (with trusted_keys) signature-checked.
    verify: every listed file is opened once and its size and sha256 checked from the open descriptor, no
    unlisted file or folder, genai_config.json consistent with the manifest. trusted_keys: public keys (PEM
    files, PEM bytes or raw 32-byte keys); the bundle is refused unless its manifest.sig verifies with one of
    them. Keys imply verify (the signature covers the files through their hashes)."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle not found: {path}")
    keys = list(trusted_keys) if trusted_keys is not None else None
    if keys is not None:
        from .signature import raw_public_key

        for k in keys:
            raw_public_key(k)  # a bad key file fails before any bundle work
    tmp = _extract(path) if path.is_file() else None
    try:
        files = BundleFiles(tmp or path, str(path))
    except BaseException:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    opened = None
    try:
        data = files.read_small(MANIFEST, MAX_MANIFEST_BYTES)
        if data is None:
            raise BundleError(f"{path} is not a bundle: no {MANIFEST}; build one with `mopeq-export build`")
        manifest = parse_manifest(data, f"{path}:{MANIFEST}" if tmp else str(path / MANIFEST))
        sig_bytes = files.read_small(SIGNATURE, MAX_SIGNATURE_BYTES)
        sig = parse_signature(sig_bytes, f"{path}:{SIGNATURE}") if sig_bytes is not None else None
        opened = OpenedBundle(files, manifest, data, sig, None, tmp)
        if keys is not None:
            opened.signed_by = verify_signature(data, sig, keys, str(path))
        if verify or keys is not None:
            verify_files(files, manifest)
            genai = files.bytes(GENAI_CONFIG) if GENAI_CONFIG in files.held else None
            check_genai_config(genai, manifest, str(path))
    except BaseException:
        files.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return opened


def check_validated(manifest: Manifest, allow_unvalidated: bool) -> None:
    if manifest.validation.get("passed") is True or allow_unvalidated:
        return
    raise BundleError("this bundle never passed the accuracy gate (its manifest's validation is "
                      f"{json.dumps(manifest.validation)[:80]}): it is the leftover of an interrupted or failed "
                      "build; rebuild it, or pass allow_unvalidated=True to run it anyway")


def _kernel(so, b: OpenedBundle, use_kernel: bool, device_library: Path | None) -> KernelStatus:
    """Register the kernel library from a sealed copy of bytes that were checked (the bundle's, hashed from the
    descriptor the load holds; or the device-built one given by the app), never by a path looked up again."""
    k = b.manifest.kernel
    if not use_kernel:
        return KernelStatus(False, "kernel disabled by the caller: MoE layers run the ONNX function-body fallback")
    if device_library is not None:  # built on the device from kernel-src/: the app's own file, not in the bundle
        lib = Path(device_library)
        if not lib.is_file():
            raise BundleError(f"kernel library {lib} not found; build it from the bundle's kernel-src/ ({k.build})")
        try:
            with open(lib, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BundleError(f"cannot read the kernel library {lib}: {e.strerror}") from None
        name = str(lib)
    elif k.status != "binary" or not k.library:
        return KernelStatus(False, f"no kernel library in the bundle ({k.note}); running the function-body fallback")
    else:
        entry = next((f for f in b.manifest.files if f.path == k.library), None)
        if entry is None:
            raise BundleError(f"manifest refers to {k.library} but does not list its hash; the manifest was edited")
        b.files.hold(k.library, entry.size)
        data = b.files.bytes(k.library)  # code: hashed even with verify=False, and the bytes hashed are the ones loaded
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise BundleError(f"bundle file {k.library} does not match its sha256 in the manifest: it was altered; "
                              f"re-copy or rebuild the bundle ({b.label})")
        name = k.library
    arch, host = elf_arch_bytes(data), host_arch()
    if arch != host:
        return KernelStatus(False, f"the bundle's kernel library is for {arch}, this host is {host}; "
                                   f"running the function-body fallback (build it here: {k.build})")
    check_elf_bytes(data, name)  # a truncated library would crash the process inside dlopen (SIGBUS), not raise
    try:
        so.register_custom_ops_library(sealed_copy(data, Path(name).name))
    except Exception as e:  # ORT raises a generic exception for libraries it cannot load
        return KernelStatus(False, f"the kernel library did not load ({str(e).splitlines()[0]}); "
                                   "running the function-body fallback")
    return KernelStatus(True, f"mopeq.MoEExperts runs in {device_library or k.library} ({arch})",
                        library_providers(data))


CUDA = "CUDAExecutionProvider"


def _providers(manifest: Manifest, device: str, providers, kernel: KernelStatus, available: list[str]) -> list:
    """The execution providers for `device` (docs/BUNDLE.md, "The runtime API"); refuses a GPU the installed
    onnxruntime cannot drive, or a GPU load whose MoE layers would silently run on the CPU."""
    kind, index = parse_device(device)
    if providers is not None:
        if kind != "auto":
            raise BundleError("give device= or providers=, not both")
        return list(providers)
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    no_cuda_op = kernel.used and CUDA not in kernel.providers
    if kind == "cuda":
        if CUDA not in available:
            raise BundleError(f"device={device!r} needs ONNX Runtime's CUDA execution provider; this onnxruntime has "
                              f"{', '.join(available)}: install onnxruntime-gpu in its place, or load with "
                              "device='cpu'")
        if no_cuda_op:
            raise BundleError("the kernel library has no CUDA op (built without -DMOPEQ_CUDA=ON -DMOPEQ_ORT_CUDA=ON), "
                              "so the MoE layers would fall back to the CPU: rebuild the bundle with --target cuda "
                              "on a machine with nvcc, pass kernel_library= built with CUDA, load with device='cpu', "
                              "or use_kernel=False to run the portable function bodies on the GPU")
        return [(CUDA, {"device_id": index}), "CPUExecutionProvider"]
    chosen = pick_providers(manifest.target.providers, available)
    if CUDA in chosen and no_cuda_op:  # auto: never a GPU session whose MoE nodes run on the CPU
        chosen = [p for p in chosen if p != CUDA]
    return chosen


def load(bundle: str | Path, *, target: str | None = None, allow_foreign_target: bool = False,
         use_kernel: bool = True, require_kernel: bool = False, kernel_library: str | Path | None = None,
         providers: list | None = None, threads: int = 0, verify: bool = True,
         trusted_keys: Iterable[KeyLike] | None = None, allow_unvalidated: bool = False,
         device: str = "auto") -> BundleModel:
    """Open a bundle for inference (docs/BUNDLE.md, "What a load guarantees").

    target: the device name this app expects (refuses another target's bundle); allow_foreign_target runs a
    bundle on a host it was not built for (e.g. a Jetson bundle on an x86 CPU). use_kernel=False forces the
    portable function bodies; require_kernel=True makes a missing or unloadable kernel library an error.
    kernel_library: a libmopeq_ops built on the device from the bundle's kernel-src/ (a source-only bundle);
    it is the app's own file and no signature covers it.
    trusted_keys: refuse the bundle unless it is signed by one of these ed25519 public keys.
    verify=False skips the hashes (each file is still opened once and used through its descriptor).
    allow_unvalidated: run a bundle whose manifest does not record a passed accuracy gate (refused by default).
    device: "auto" (the target's providers that this onnxruntime has), "cpu", "cuda" or "cuda:N" (ONNX
    Runtime's CUDA execution provider; refused when this onnxruntime has none, or when the kernel library has
    no CUDA op). providers= (ORT provider list) overrides it.
    """
    import onnxruntime as ort

    parse_device(device)  # a malformed device fails before any work
    b = open_bundle(bundle, verify=verify, trusted_keys=trusted_keys)
    try:
        manifest = b.manifest
        check_validated(manifest, allow_unvalidated)
        note = check_target(manifest.target, target, allow_foreign_target)
        so = ort.SessionOptions()
        so.log_severity_level = 3  # ORT warnings (e.g. unused initializers) are noise to a device app
        if threads:
            so.intra_op_num_threads = threads
        kernel = _kernel(so, b, use_kernel, kernel_library)
        if require_kernel and not kernel.used:
            raise BundleError(f"kernel library required but not used: {kernel.reason}")
        chosen = _providers(manifest, device, providers, kernel, ort.get_available_providers())
        sessions = {}
        sizes = {f.path: f.size for f in manifest.files}
        for g in manifest.graphs:
            for rel in (g.file, *g.data_files):
                b.files.hold(rel, sizes.get(rel))  # already held and checked when verified
            try:
                sessions[g.name] = ort.InferenceSession(b.files.graph_path(g.file, g.data_files), sess_options=so,
                                                        providers=chosen)
            except Exception as e:  # ORT's exceptions carry the reason on their first line
                raise BundleError(f"ONNX Runtime cannot load {g.file}: {str(e).splitlines()[0]}") from None
        b.files.hold(manifest.tokenizer.file, sizes.get(manifest.tokenizer.file))
        names = [p if isinstance(p, str) else p[0] for p in chosen]
        first = chosen[0]
        on = ("cpu", 0) if names[0] != CUDA else ("cuda", 0 if isinstance(first, str) else first[1].get("device_id", 0))
        model = BundleModel(Path(bundle), manifest, sessions, kernel, names, note,
                            tokenizer_json=b.files.bytes(manifest.tokenizer.file), device=on)
        b.files.check_unchanged()
    finally:
        b.close()
    return model
