"""File helpers shared by every stage: hashing, JSON records, and all-or-nothing outputs.

Every stage writes into a staging folder beside its destination and renames it into place only
when complete, so an error or Ctrl-C never leaves a half-written output that looks valid.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

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


def require_free_space(folder: str | os.PathLike, need: int, what: str, margin: float = 1.1) -> None:
    """Fail before the work, not after it, when `folder`'s file system cannot hold `need` bytes."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need * margin:
        raise MopeqError(f"{what} needs about {need / 2**30:.2f} GiB but {probe} has {free / 2**30:.2f} GiB free; "
                         "free some space or write elsewhere")


# -- outputs: never delete what the tool did not create ------------------------------------------------------
OUTPUT_MARKER = ".mopeq-output"  # {"kind": ...} in every output folder except bundles (their manifest says it)


def _record_kind(path: Path) -> str | None:
    """The "kind" of a JSON record file, or None (absent, a link, not JSON, no string kind)."""
    if not path.is_file() or path.is_symlink():
        return None
    try:
        kind = json.loads(path.read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def output_kind(folder: Path) -> str | None:
    """The command that wrote `folder` ('analyze', 'quantize', 'export', 'bundle', 'cache'), or None."""
    kind = _record_kind(folder / OUTPUT_MARKER)
    if kind is None and _record_kind(folder / "manifest.json") == "mopeq.bundle":
        kind = "bundle"
    return kind


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether one path equals, contains or lies inside the other (after resolving links)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or b in a.parents or a in b.parents


def check_out(dest: str | os.PathLike, kind: str, *, force: bool = False, inputs=(), file: bool = False) -> Path:
    """Refuse an output path that would destroy or overlap something the user owns; return it resolved.

    A folder output may be new, an empty folder, or (with force) a previous output of the same kind; a file
    output may be new or (with force) an existing file. It may never be a symbolic link, nor equal, contain or
    lie inside one of `inputs`. Called by every command before any work, and again when the output is moved
    into place."""
    raw = Path(dest)
    flag = "--out"
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
    if not dest.exists():
        return dest
    if file:
        if dest.is_dir():
            raise MopeqError(f"{flag} {dest} is a folder; give the path of a file to write")
        if not force:
            raise MopeqError(f"{dest} already exists; pass --force to replace it, or choose another {flag}")
        return dest
    if not dest.is_dir():
        raise MopeqError(f"{dest} exists and is not a folder; choose another {flag}")
    if not any(dest.iterdir()):
        return dest
    owner = output_kind(dest)
    if owner != kind:
        what = f"a `{owner}` output" if owner else "not an output of mopeq-export"
        raise MopeqError(f"{dest} is not empty and is {what}; give a new or empty folder for this {kind} output "
                         "(nothing was changed)")
    if not force:
        raise MopeqError(f"{dest} holds a previous {kind} output; pass --force to replace it, or choose another {flag}")
    return dest


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
    """Remove `.NAME.partial-PID-*` / `.NAME.old-PID-*` leftovers of killed runs (their process is gone)."""
    name = re.compile(rf"\.{re.escape(dest.name)}\.(?:partial|old)-(\d+)-.*")
    for p in dest.parent.glob(f".{glob.escape(dest.name)}.*-*"):
        m = name.fullmatch(p.name)
        if m and int(m[1]) != os.getpid() and not _pid_alive(int(m[1])):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _stage_prefix(dest: Path, what: str = "partial") -> str:
    return f".{dest.name}.{what}-{os.getpid()}-"


@contextlib.contextmanager
def staged_dir(dest: str | os.PathLike, kind: str, *, force: bool = False, inputs=()) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `dest` atomically, on error it is removed.

    `dest` must pass check_out(kind, force, inputs): only a new/empty folder or a previous output of the same
    kind is ever replaced. The staging folder carries the kind's marker and ordinary permissions (umask)."""
    dest = check_out(dest, kind, force=force, inputs=inputs)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    stage = Path(tempfile.mkdtemp(prefix=_stage_prefix(dest), dir=dest.parent))
    try:
        os.chmod(stage, 0o777 & ~_umask())
        yield stage
        if kind != "bundle":
            (stage / OUTPUT_MARKER).write_text(json.dumps({"kind": kind, "tool": "mopeq-export"}) + "\n")
        check_out(dest, kind, force=True)  # nothing foreign appeared there meanwhile
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=_stage_prefix(dest, "old"), dir=dest.parent))
        os.rename(dest, old / dest.name)
    os.rename(stage, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_file(dest: str | os.PathLike, *, force: bool = True, inputs=()) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; it is renamed onto `dest` only if the block succeeds.

    force=False refuses an existing file (the commands' --out without --force); a folder is always refused."""
    dest = check_out(dest, "file", force=force, inputs=inputs, file=True)
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
    except OSError:
        pass  # a read-only or full cache folder only costs the next stage a re-hash
    return digest
