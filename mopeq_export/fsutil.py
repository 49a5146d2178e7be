"""File helpers shared by every stage: hashing, JSON records, and all-or-nothing outputs.

Every stage writes into a staging folder beside its destination and renames it into place only
when complete, so an error or Ctrl-C never leaves a half-written output that looks valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
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


@contextlib.contextmanager
def staged_dir(dest: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `dest` atomically, on error it is removed."""
    dest = Path(dest).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not overwrite:
        raise MopeqError(f"{dest} already exists; remove it or choose another --out")
    if dest.exists() and not dest.is_dir():
        raise MopeqError(f"{dest} exists and is not a folder; choose another --out")
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.rename(dest, old)
    os.rename(stage, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_file(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; it is renamed onto `dest` only if the block succeeds."""
    dest = Path(dest).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.partial-", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    os.replace(tmp_path, dest)


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
