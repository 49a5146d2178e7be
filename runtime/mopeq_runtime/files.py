"""A bundle's files, each opened once (docs/BUNDLE.md, "What a load guarantees").

Every name is looked up once, relative to the descriptor of the bundle folder, one component at a time and
never through a symbolic link (O_NOFOLLOW). A file is hashed from that descriptor and later used through it:
ONNX Runtime reads the graphs and their external data through a private folder whose entries point at the
held descriptors (/proc/self/fd/N), the tokenizer is parsed from the bytes that were hashed, and the kernel
library is loaded from a sealed in-memory copy of the bytes that were hashed (memfd). So a writer of the
bundle folder that renames, replaces or re-links files during a load cannot make the load use anything but
what it checked. Writing into a held file in place needs write permission on that file itself; a file whose
size, mtime or ctime changed between the hash and the end of the load is refused (`check_unchanged`).

Where the platform has no /proc/self/fd (or /dev/fd) and no memfd, private copies made from the held
descriptors take their place (a folder only this user can write).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import BundleError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
FILE_FLAGS = os.O_RDONLY | _NOFOLLOW | _CLOEXEC
DIR_FLAGS = FILE_FLAGS | getattr(os, "O_DIRECTORY", 0)
CHUNK = 1 << 20


def _fd_dir() -> str | None:
    for d in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(d):
            return d
    return None


def _stamp(st: os.stat_result) -> tuple:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def read_fd(fd: int, size: int | None = None) -> bytes:
    """All bytes of an open file from offset 0 (not moving any shared offset)."""
    parts, off = [], 0
    while size is None or off < size:
        block = os.pread(fd, CHUNK if size is None else min(CHUNK, size - off), off)
        if not block:
            break
        parts.append(block)
        off += len(block)
    return b"".join(parts)


def sha256_fd(fd: int) -> str:
    h, off = hashlib.sha256(), 0
    while block := os.pread(fd, CHUNK, off):
        h.update(block)
        off += len(block)
    return h.hexdigest()


@dataclass
class Held:
    rel: str
    fd: int
    stamp: tuple  # (size, mtime, ctime, inode, device) when it was opened: check_unchanged


def safe_relpath(p: str) -> bool:
    """A relative POSIX path inside its folder: not absolute, no '..' or '.', no backslash or NUL, normalized."""
    pp = PurePosixPath(p)
    return (bool(p) and not pp.is_absolute() and ".." not in pp.parts and "\\" not in p and "\0" not in p
            and p == pp.as_posix() and "." not in pp.parts)


_SEALED: dict[str, str] = {}  # sha256 -> path of its sealed copy, for the life of the process


def sealed_copy(data: bytes, name: str) -> str:
    """A path to an unchangeable copy of `data`, one per distinct content for the life of the process.

    A sealed memfd (Linux) stays open, so its /proc/self/fd/N name is never reused by other bytes: dlopen()
    returns an already-loaded library for a name it has seen, so a path must never stand for two contents.
    Elsewhere, a read-only file in a private folder (only this user can write it), named by the hash."""
    digest = hashlib.sha256(data).hexdigest()
    if digest in _SEALED:
        return _SEALED[digest]
    fd_dir = _fd_dir()
    if hasattr(os, "memfd_create") and fd_dir == "/proc/self/fd" and hasattr(fcntl, "F_ADD_SEALS"):
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
        except BaseException:
            os.close(fd)
            raise
        path = f"{fd_dir}/{fd}"
    else:
        global _SEALED_DIR
        if _SEALED_DIR is None:
            _SEALED_DIR = tempfile.mkdtemp(prefix="mopeq-libs-")  # 0700
        path = os.path.join(_SEALED_DIR, f"{digest[:32]}-{name}")
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o500)
    _SEALED[digest] = path
    return path


_SEALED_DIR: str | None = None


class BundleFiles:
    """A bundle folder opened once. `label` names it in messages (the folder, or the archive it came from)."""

    def __init__(self, root: Path, label: str):
        self.root, self.label = Path(root), label
        try:  # the folder the caller named may be a link (/opt/models/current -> v2): followed once, here
            self.fd = os.open(self.root, os.O_RDONLY | _CLOEXEC | getattr(os, "O_DIRECTORY", 0))
        except OSError as e:
            raise BundleError(f"cannot open the bundle folder {label}: {e.strerror}") from None
        self.held: dict[str, Held] = {}
        self._private: Path | None = None

    # -- lookups, once each ------------------------------------------------------------------------------
    def _open(self, rel: str) -> tuple[int, os.stat_result] | None:
        """(fd, stat) of a regular file at bundle path `rel`, None when absent; a link or special file raises."""
        if not safe_relpath(rel):
            raise BundleError(f"{self.label}: {rel!r} is not a path inside the bundle; the manifest was tampered with")
        parts = PurePosixPath(rel).parts
        fd, opened = self.fd, []
        try:
            for d in parts[:-1]:
                fd = os.open(d, DIR_FLAGS, dir_fd=fd)
                opened.append(fd)
            f = os.open(parts[-1], FILE_FLAGS | getattr(os, "O_NONBLOCK", 0), dir_fd=fd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno in (40, 62):  # ELOOP (Linux / macOS): the name is a symbolic link
                raise BundleError(f"{self.label}: {rel} is a symbolic link; a bundle holds only regular files "
                                  "(the bundle was tampered with, re-copy it)") from None
            raise BundleError(f"{self.label}: cannot open {rel}: {e.strerror}") from None
        finally:
            for d in opened:
                os.close(d)
        st = os.fstat(f)
        if not stat.S_ISREG(st.st_mode):
            os.close(f)
            raise BundleError(f"{self.label}: {rel} is not a regular file; the bundle was tampered with, re-copy it")
        return f, st

    def read_small(self, rel: str, limit: int) -> bytes | None:
        """The bytes of a small file (manifest, signature), read once; None when absent."""
        got = self._open(rel)
        if got is None:
            return None
        fd, st = got
        try:
            if st.st_size > limit:
                raise BundleError(f"{self.label}: {rel} has {st.st_size} bytes, more than {limit} (not a bundle's "
                                  f"{rel}); re-copy the bundle")
            return read_fd(fd, limit + 1)[: limit + 1]
        finally:
            os.close(fd)

    def hold(self, rel: str, size: int | None = None, sha256: str | None = None) -> Held:
        """Open `rel` once and keep it open; with `sha256`, its size and hash are checked from the descriptor."""
        if rel in self.held:
            return self.held[rel]
        got = self._open(rel)
        if got is None:
            raise BundleError(f"bundle file {rel} is missing from {self.label}; re-copy the whole bundle folder")
        fd, st = got
        try:
            if size is not None and st.st_size != size:
                raise BundleError(f"bundle file {rel} has {st.st_size} bytes, the manifest says {size}: it was "
                                  f"altered or truncated; re-copy the bundle ({self.label})")
            if sha256 is not None and sha256_fd(fd) != sha256:
                raise BundleError(f"bundle file {rel} does not match its sha256 in the manifest: it was altered; "
                                  f"re-copy or rebuild the bundle ({self.label})")
        except BaseException:
            os.close(fd)
            raise
        h = self.held[rel] = Held(rel, fd, _stamp(st))
        return h

    def bytes(self, rel: str) -> bytes:
        return read_fd(self.held[rel].fd)

    def walk(self) -> tuple[set[str], set[str]]:
        """(files, folders) in the bundle, relative; a symbolic link counts as a file (and is refused by hold)."""
        files, dirs = set(), set()

        def vanished(e: OSError):
            raise e

        try:
            for top, dnames, fnames, dfd in os.fwalk(".", dir_fd=self.fd, follow_symlinks=False, onerror=vanished):
                base = PurePosixPath(top)
                for n in list(dnames):
                    if stat.S_ISLNK(os.stat(n, dir_fd=dfd, follow_symlinks=False).st_mode):
                        files.add((base / n).as_posix())
                        dnames.remove(n)
                    else:
                        dirs.add((base / n).as_posix())
                files.update((base / n).as_posix() for n in fnames)
        except OSError as e:
            raise BundleError(f"{self.label} changed while it was being checked ({e.strerror}: {e.filename}); "
                              "something is writing into the bundle: load it from a folder nobody else writes") \
                from None
        return {f.removeprefix("./") for f in files}, {d.removeprefix("./") for d in dirs}

    # -- use through the held descriptors --------------------------------------------------------------------
    def private_dir(self) -> Path:
        if self._private is None:
            self._private = Path(tempfile.mkdtemp(prefix="mopeq-load-"))  # 0700: only this user
        return self._private

    def graph_path(self, graph_file: str, data_files: tuple[str, ...]) -> str:
        """A path ONNX Runtime can load `graph_file` from, its external data beside it, all the held files."""
        d = self.private_dir() / f"g{len(list(self.private_dir().iterdir()))}"
        d.mkdir()
        fd_dir = _fd_dir()
        home = PurePosixPath(graph_file).parent
        for rel in (graph_file, *data_files):
            h = self.held[rel]
            try:  # external data is found relative to the graph: keep that layout
                link = d / PurePosixPath(rel).relative_to(home)
            except ValueError:
                raise BundleError(f"{self.label}: {rel} does not lie beside or under its graph {graph_file}; "
                                  "rebuild the bundle") from None
            link.parent.mkdir(parents=True, exist_ok=True)
            if fd_dir is not None:
                link.symlink_to(f"{fd_dir}/{h.fd}")
            else:
                with open(link, "wb") as out:
                    off = 0
                    while block := os.pread(h.fd, CHUNK, off):
                        out.write(block)
                        off += len(block)
        return str(d / PurePosixPath(graph_file).name)

    def check_unchanged(self) -> None:
        """Refuse the load if a held file was written in place while it was checked and used."""
        for h in self.held.values():
            if _stamp(os.fstat(h.fd)) != h.stamp:
                raise BundleError(f"bundle file {h.rel} was modified while the bundle was loading ({self.label}); "
                                  "something is writing into the bundle: load it again from a folder nobody else "
                                  "writes")

    def close(self) -> None:
        for fd in [h.fd for h in self.held.values()] + [self.fd]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.held = {}
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None
