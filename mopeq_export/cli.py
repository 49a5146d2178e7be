"""`mopeq-export`: one command per pipeline stage, plus `build` that runs them all.

Every command turns a MopeqError into a one-line `error: ...` and exit code 2.
"""

from __future__ import annotations

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


REPO_CALIB = Path(__file__).resolve().parent.parent / "calibration_data"


def default_calib(is_vlm: bool) -> Path:
    return REPO_CALIB / ("vqa_calib.npz" if is_vlm else "text_calib.txt")


def main() -> None:
    from .devices import bound_host_memory

    bound_host_memory()  # before any tensor work: the tool's host memory stays what its stages state
    try:
        app()
    except MopeqError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]: nothing was written")
        sys.exit(130)


# Each command lives in mopeq_export/commands/<name>.py and registers itself on `app`.
from .commands import load_all  # noqa: E402

load_all()
