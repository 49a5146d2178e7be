"""File helpers shared by every stage: hashing, JSON records, and all-or-nothing outputs.

Every stage writes into a staging folder beside its destination and renames it into place only
when complete, so an error or Ctrl-C never leaves a half-written output that looks valid.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from mopeq_runtime.files import safe_relpath, sha256_fd

from .errors import MopeqError


def default_cache() -> Path:
    """The toolchain's cache folder: $MOPEQ_CACHE, else ~/.cache/mopeq-export."""
    return Path(os.environ.get("MOPEQ_CACHE") or Path.home() / ".cache" / "mopeq-export")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Deterministic JSON (sorted keys off: records keep their field order; fixed indent, newline)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    Path(path).write_text(text, encoding="utf-8")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    p = Path(path)
    if not p.is_file():
        raise MopeqError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MopeqError(f"{what} {p} is not valid JSON ({e}); regenerate it") from None


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': sizes in messages keep their digits whatever their scale."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _existing_ancestor(folder: Path) -> Path:
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def require_writable(folder: str | os.PathLike, what: str) -> None:
    """Refuse before any work when `folder` (or, if absent, the folder it would be created in) cannot be written:
    a read-only mount or missing permission, said as such (not as a lack of space)."""
    probe = _existing_ancestor(Path(folder))
    if not probe.is_dir():
        raise MopeqError(f"{what}: {probe} is not a folder; choose another place")
    if not os.access(probe, os.W_OK | os.X_OK):
        try:
            ro = os.statvfs(probe).f_flag & os.ST_RDONLY
        except OSError:
            ro = False
        why = "is on a read-only file system" if ro else "is not writable by this user"
        raise MopeqError(f"{what}: {probe} {why}; write elsewhere (nothing was changed)")


def require_free_space(folder: str | os.PathLike, need: int, what: str, margin: float = 1.1) -> None:
    """Fail before the work, not after it, when `folder`'s file system cannot hold `need` bytes (checked after
    it is known to be writable, so a read-only place is reported as read-only)."""
    require_writable(folder, what)
    probe = _existing_ancestor(Path(folder))
    free = shutil.disk_usage(probe).free
    if free < need * margin:
        raise MopeqError(f"{what} needs about {human_bytes(need * margin)} but {probe} has {human_bytes(free)} "
                         "free; free some space or write elsewhere")


# -- outputs: never delete what the tool did not create ------------------------------------------------------
# Every output folder records what the tool wrote into it: bundles in their manifest (each file's size and
# sha256), the other outputs in OUTPUT_MARKER ({"kind", "tool", "files": {path: [size, sha256]}}). A previous
# output is recognised by that record only, and replacing it (--force) removes exactly the recorded files; a
# folder holding anything else is refused, naming the file, with nothing touched. One writer at a time per
# output: an advisory lock (`.NAME.lock` beside it) held from the first check to the final rename.
OUTPUT_MARKER = ".mopeq-output"
_CACHE_COMPLETE = ".complete"  # a stage-cache entry's completion record (pipeline.StageCache)


@dataclass(frozen=True)
class OutputRecord:
    kind: str  # 'analyze', 'quantize', 'export', 'bundle', 'cache'
    files: dict  # relative path -> (size, sha256); sha256 None for the record files themselves


def _small_json(path: Path, limit: int = 64 << 20):
    """A JSON file the tool may have written (not a link, bounded), else None."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > limit:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _file_table(d) -> dict | None:
    """{path: (size, sha256)} from a record's {path: [size, sha256]}, None when malformed."""
    if not isinstance(d, dict):
        return None
    out = {}
    for rel, entry in d.items():
        if not (isinstance(rel, str) and safe_relpath(rel) and isinstance(entry, list) and len(entry) == 2
                and type(entry[0]) is int and isinstance(entry[1], str)):
            return None
        out[rel] = (entry[0], entry[1])
    return out


def output_record(folder: Path) -> tuple[OutputRecord | None, str]:
    """What the tool recorded of the output in `folder`, or (None, why it is not recognised as one)."""
    marker = _small_json(folder / OUTPUT_MARKER)
    if isinstance(marker, dict) and isinstance(marker.get("kind"), str):
        kind = marker["kind"]
        files = _file_table(marker.get("files"))
        if files is None and kind == "cache":  # entries of earlier versions: the file list is in .complete
            done = _small_json(folder / _CACHE_COMPLETE)
            files = _file_table(done.get("files")) if isinstance(done, dict) else None
        if files is None:
            return None, (f"a `{kind}` output whose marker has no valid file list (written by an earlier "
                          "mopeq-export, or edited); remove it yourself if it is no longer needed")
        files[OUTPUT_MARKER] = (0, None)
        if kind == "cache":
            files[_CACHE_COMPLETE] = (0, None)
        return OutputRecord(kind, files), ""
    manifest = folder / "manifest.json"
    head = _small_json(manifest)
    if isinstance(head, dict) and head.get("kind") == "mopeq.bundle":
        from mopeq_runtime.errors import BundleError
        from mopeq_runtime.manifest import Manifest

        try:
            m = Manifest.from_json(head, str(manifest))
        except BundleError:
            return None, "a folder whose manifest.json claims a bundle but is not a complete bundle manifest"
        if not all(safe_relpath(f.path) for f in m.files):
            return None, "a folder whose manifest.json lists paths outside it"
        files = {f.path: (f.size, f.sha256) for f in m.files}
        files.update({"manifest.json": (0, None), "manifest.sig": (0, None)})
        return OutputRecord("bundle", files), ""
    return None, "not an output of mopeq-export"


def _foreign(folder: Path, rec: OutputRecord, tolerate_changed: bool = False) -> str | None:
    """None when `folder` holds only files of `rec`, unchanged (size and sha256); else the first exception."""
    dirs = {str(PurePosixPath(rel).parent) for rel in rec.files}
    dirs |= {str(p) for rel in rec.files for p in PurePosixPath(rel).parents}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            return f"{rel} (a symbolic link the tool did not write)"
        if p.is_dir():
            if rel not in dirs:
                return f"the folder {rel}/ (not written by the tool)"
            continue
        want = rec.files.get(rel)
        if want is None:
            return f"{rel} (not written by the tool)"
        size, digest = want
        if digest is not None and not tolerate_changed:
            if p.stat().st_size != size or sha256_file(p) != digest:
                return f"{rel} (changed since the tool wrote it)"
    return None


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether one path equals, contains or lies inside the other (after resolving links)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or b in a.parents or a in b.parents


def check_out(dest: str | os.PathLike, kind: str, *, force: bool = False, inputs=(), file: bool = False,
              flag: str = "--out", hashes: bool = True) -> Path:
    """Refuse an output path that would destroy or overlap something the user owns; return it resolved.

    A folder output may be new, an empty folder, or (with force) a previous output of the same kind holding
    only the files its record lists, unchanged; a file output may be new or (with force) an existing file. It
    may never be a symbolic link, nor equal, contain or lie inside one of `inputs`, nor be written by another
    mopeq-export at the same time. Called by every command before any work, and again when the output is
    moved into place. hashes=False skips re-hashing the recorded files, for a second call right after one that
    hashed them (the build's, once its remaining inputs are known)."""
    raw = Path(dest)
    if raw.is_symlink():
        raise MopeqError(f"{flag} {raw} is a symbolic link; give the real path (nothing was changed)")
    dest = raw.resolve()
    for given in inputs:
        if given is None:
            continue
        src = Path(given).resolve()
        if overlaps(dest, src):
            raise MopeqError(f"{flag} {dest} overlaps the input {src}; write the output somewhere else "
                             "(nothing was changed)")
    holder = lock_holder(dest)
    if holder is not None:
        raise MopeqError(f"another mopeq-export (pid {holder}) is writing {dest}; wait for it to finish or choose "
                         f"another {flag} (nothing was changed)")
    if not dest.exists():
        require_writable(dest.parent, f"{flag} {dest}")
        return dest
    if file:
        if dest.is_dir():
            raise MopeqError(f"{flag} {dest} is a folder; give the path of a file to write")
        if not force:
            raise MopeqError(f"{dest} already exists; pass --force to replace it, or choose another {flag}")
        require_writable(dest.parent, f"{flag} {dest}")
        return dest
    if not dest.is_dir():
        raise MopeqError(f"{dest} exists and is not a folder; choose another {flag}")
    if not any(dest.iterdir()):
        return dest
    rec, why = output_record(dest)
    if rec is None or rec.kind != kind:
        what = f"a `{rec.kind}` output" if rec else why
        raise MopeqError(f"{dest} is not empty and is {what}; give a new or empty folder for this {kind} output "
                         "(nothing was changed)")
    if not force:
        raise MopeqError(f"{dest} holds a previous {kind} output; pass --force to replace it, or choose another {flag}")
    other = _foreign(dest, rec, tolerate_changed=kind == "cache" or not hashes)
    if other is not None and kind == "cache":
        raise MopeqError(f"the cache entry {dest} also holds {other}; the tool replaces only what it wrote: remove "
                         "that file (or the whole entry) and run again (nothing was changed)")
    if other is not None:
        raise MopeqError(f"{dest} holds a previous {kind} output, but also {other}; --force replaces only what the "
                         f"tool wrote: move that file out, or choose another {flag} (nothing was changed)")
    require_writable(dest.parent, f"{flag} {dest}")
    return dest


def remove_recorded(folder: Path, rec: OutputRecord) -> list[str]:
    """Delete exactly the recorded files of `folder` that are still what was recorded (size and sha256, checked
    again here), then the folders they leave empty (the folder itself included). The walk goes through folder
    descriptors and never follows a symbolic link, so a link swapped in meanwhile leads nowhere. Returns what
    was left (anything that appeared or changed after the check), deleting none of it."""
    import stat as _stat

    try:
        top = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return [folder.name]
    try:
        for base, dnames, fnames, dfd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
            for n in fnames:
                rel = (PurePosixPath(base) / n).as_posix().removeprefix("./")
                want = rec.files.get(rel)
                if want is None:
                    continue
                try:
                    fd = os.open(n, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                except OSError:
                    continue  # a link or gone: not the recorded file
                try:
                    st = os.fstat(fd)
                    same = _stat.S_ISREG(st.st_mode) and (want[1] is None or (
                        st.st_size == want[0] and sha256_fd(fd) == want[1]))
                finally:
                    os.close(fd)
                if same:
                    with contextlib.suppress(OSError):
                        os.unlink(n, dir_fd=dfd)
        for base, dnames, fnames, dfd in os.fwalk(".", dir_fd=top, topdown=False, follow_symlinks=False):
            for n in dnames:
                with contextlib.suppress(OSError):
                    os.rmdir(n, dir_fd=dfd)  # only empty folders go; a link to one is not a folder here
    finally:
        os.close(top)
    with contextlib.suppress(OSError):
        folder.rmdir()
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


# -- one writer per output ---------------------------------------------------------------------------------
_HELD: dict[tuple[str, int], int] = {}
_HELD_GUARD = threading.Lock()


def _lock_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.lock"


def _canonical(dest: str | os.PathLike) -> Path:
    """One name per output whatever path reached it (links and '..' in its folder resolved), so a process
    never takes its own lock for another writer's."""
    dest = Path(dest).absolute()
    return dest.parent.resolve() / dest.name


def lock_holder(dest: Path) -> int | None:
    """The pid of another process writing `dest` now (it holds the lock), else None."""
    dest = _canonical(dest)
    if (str(dest), threading.get_ident()) in _HELD:
        return None
    path = _lock_path(dest)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd)
    finally:
        os.close(fd)
    return None


def _read_pid(fd: int) -> int | str:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return "?"


@contextlib.contextmanager
def output_lock(dest: str | os.PathLike, *, wait: bool = False, say=None) -> Iterator[None]:
    """Hold the advisory lock of output `dest` (re-entrant within a thread). Another holder makes this raise
    (naming its pid), or with wait=True, say so through `say` and wait for it."""
    dest = _canonical(dest)
    key = (str(dest), threading.get_ident())
    with _HELD_GUARD:
        if key in _HELD:
            _HELD[key] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _HELD_GUARD:
                _HELD[key] -= 1
        return
    path = _lock_path(dest)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise MopeqError(f"cannot write beside {dest} ({e.strerror}); choose another output path") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            if not wait:
                os.close(fd)
                raise MopeqError(f"another mopeq-export (pid {holder}) is writing {dest}; wait for it to finish or "
                                 "choose another output (nothing was changed)") from None
            if say is not None:
                say(f"waiting for another mopeq-export (pid {holder}) that is writing {dest.name}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # the previous holder removes the lock file as it leaves: hold the current one, not a removed one
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    with _HELD_GUARD:
        _HELD[key] = 1
    try:
        yield
    finally:
        with _HELD_GUARD:
            del _HELD[key]
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(dest: Path) -> None:
    """Remove leftovers of killed runs (their process is gone): `.NAME.partial-PID-*` staging folders (the tool's
    own, whole) and, in `.NAME.old-PID-*` (a previous output being replaced), only its recorded files."""
    name = re.compile(rf"\.{re.escape(dest.name)}\.(partial|old)-(\d+)-.*")
    for p in dest.parent.glob(f".{glob.escape(dest.name)}.*-*"):
        m = name.fullmatch(p.name)
        if not m or int(m[2]) == os.getpid() or _pid_alive(int(m[2])):
            continue
        if m[1] == "partial" or not p.is_dir() or p.is_symlink():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            continue
        inner = p / dest.name
        rec, _ = output_record(inner) if inner.is_dir() else (None, "")
        if rec is not None:
            remove_recorded(inner, rec)
        with contextlib.suppress(OSError):
            p.rmdir()


def _stage_prefix(dest: Path, what: str = "partial") -> str:
    return f".{dest.name}.{what}-{os.getpid()}-"


def record_files(folder: Path) -> dict:
    """{relative path: [size, sha256]} of every file in `folder` (the marker itself excluded)."""
    return {rel: [p.stat().st_size, sha256_file(p)] for p in sorted(folder.rglob("*"))
            if p.is_file() and (rel := p.relative_to(folder).as_posix()) != OUTPUT_MARKER}


@contextlib.contextmanager
def staged_dir(dest: str | os.PathLike, kind: str, *, force: bool = False, inputs=()) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `dest` atomically, on error it is removed.

    `dest` must pass check_out(kind, force, inputs): only a new/empty folder or a previous output of the same
    kind is ever replaced, and only its recorded files are deleted. The staging folder carries the kind's
    marker (with its file list) and ordinary permissions (umask); the output's lock is held throughout."""
    dest = check_out(dest, kind, force=force, inputs=inputs)
    with output_lock(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(dest)
        stage = Path(tempfile.mkdtemp(prefix=_stage_prefix(dest), dir=dest.parent))
        try:
            os.chmod(stage, 0o777 & ~_umask())
            yield stage
            if kind != "bundle":
                (stage / OUTPUT_MARKER).write_text(json.dumps({"kind": kind, "tool": "mopeq-export",
                                                               "files": record_files(stage)}) + "\n")
            check_out(dest, kind, force=force or kind == "cache")  # nothing foreign appeared there meanwhile
            old_rec = output_record(dest)[0] if dest.exists() and any(dest.iterdir()) else None
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=_stage_prefix(dest, "old"), dir=dest.parent))
            os.rename(dest, old / dest.name)
        os.rename(stage, dest)
        if old is not None:
            if old_rec is None:  # it was an empty folder
                with contextlib.suppress(OSError):
                    (old / dest.name).rmdir()
            kept = remove_recorded(old / dest.name, old_rec) if old_rec else []
            if kept:  # appeared between the last check and the rename: kept, never deleted
                keep = dest.parent / f"{dest.name}.kept-{os.getpid()}"
                os.rename(old / dest.name, keep)
                print(f"note: {', '.join(kept[:3])} appeared in {dest} while it was being replaced; kept in {keep}",
                      file=sys.stderr)
            with contextlib.suppress(OSError):
                old.rmdir()


@contextlib.contextmanager
def staged_file(dest: str | os.PathLike, *, force: bool = True, inputs=(), flag: str = "--out") -> Iterator[Path]:
    """Yield a temporary path beside `dest`; it is renamed onto `dest` only if the block succeeds.

    force=False refuses an existing file (the commands' --out without --force); a folder is always refused."""
    dest = check_out(dest, "file", force=force, inputs=inputs, file=True, flag=flag)
    with output_lock(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(dest)
        fd, tmp = tempfile.mkstemp(prefix=_stage_prefix(dest), dir=dest.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            os.chmod(tmp_path, 0o666 & ~_umask())
            yield tmp_path
            os.replace(tmp_path, dest)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise


def cached_sha256(path: str | os.PathLike, cache_file: Path | None) -> str:
    """sha256 of a large input file, remembered by (size, mtime, ctime, inode) in `cache_file`.

    Checkpoints are tens of GB and every stage records their hash; hashing them again in each stage cost
    12-14 s per stage at 13 GB. The cache is keyed like make's and rsync's change detection: a file rewritten
    in place with its size and both timestamps kept would go unnoticed (ctime cannot be set by a user).
    `cache_file` None: always hash."""
    p = Path(path).resolve()
    st = p.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    if cache_file is None:
        return sha256_file(p)
    try:
        table = json.loads(cache_file.read_text(encoding="utf-8"))
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    hit = table.get(str(p))
    if isinstance(hit, dict) and hit.get("stat") == stamp and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    digest = sha256_file(p)
    table[str(p)] = {"stat": stamp, "sha256": digest}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with staged_file(cache_file) as tmp:
            tmp.write_text(json.dumps(table), encoding="utf-8")
    except (OSError, MopeqError):  # read-only, full, or another process writing the table right now
        pass  # a read-only or full cache folder only costs the next stage a re-hash
    return digest
