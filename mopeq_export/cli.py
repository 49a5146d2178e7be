"""`mopeq-export`: one command per pipeline stage, plus `build` that runs them all.

Every command turns a MopeqError into a one-line `error: ...` and exit code 2.
"""

from __future__ import annotations

import errno
import signal
import sys
from pathlib import Path

import typer
from rich.console import Console

from .errors import MopeqError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Per-expert mixed-precision quantization and edge export for MoE models.")
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Per-expert mixed-precision quantization and edge export for MoE models."""


def default_calib(is_vlm: bool) -> Path:
    """The shipped calibration set (mopeq_export.calibration_data); an installation without it is broken."""
    from .data import CALIBRATION, calibration_file

    p = calibration_file(is_vlm)
    if p is None:
        raise MopeqError(f"the shipped calibration data ({CALIBRATION[is_vlm]}) is missing from this installation of "
                         "mopeq-export: reinstall it, or pass --calib FILE")
    return p


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C so every staged output is removed on the way out."""


def _on_sigterm(signum, frame):
    raise Terminated()


_OS_ADVICE = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere",
              errno.EROFS: "the file system is read-only: choose a writable --out / --cache",
              errno.EACCES: "no permission: choose a folder you can write (or read)",
              errno.EPERM: "no permission: choose a folder you can write (or read)",
              errno.ENOENT: "check the path", errno.ELOOP: "a symbolic link loops: check the path",
              errno.ENOTDIR: "a part of the path is a file, not a folder"}


def os_error_message(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    advice = _OS_ADVICE.get(e.errno, "check the paths and the disk")
    return f"{e.strerror or e}{where}: {advice}; nothing was written"


def main() -> None:
    from rich.markup import escape

    from .devices import bound_host_memory

    bound_host_memory()  # before any tensor work: the tool's host memory stays what its stages state
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
    except MopeqError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as e:
        console.print(f"[bold red]error:[/] {escape(os_error_message(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]: nothing was written")
        sys.exit(130)
    except Terminated:
        console.print("[bold red]terminated[/]: nothing was written")
        sys.exit(143)


# Each command lives in mopeq_export/commands/<name>.py and registers itself on `app`.
from .commands import load_all  # noqa: E402

load_all()
