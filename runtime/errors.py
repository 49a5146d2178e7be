"""Errors of the runtime. A device app that has only `mopeq_runtime` installed still gets one exception
type to catch; inside the toolchain it is the toolchain's MopeqError, so the CLI prints it as one line."""

from __future__ import annotations

try:  # the toolchain's errors module is tiny (no torch); reuse it when installed so `except MopeqError` works
    from mopeq_export.errors import MopeqError
except ImportError:  # pragma: no cover - device install without the toolchain
    class MopeqError(Exception):
        """A problem the user can act on: the message says what is wrong and what to do."""


class BundleError(MopeqError):
    """The bundle is incomplete, altered, of an unknown schema, or made for another device."""


class InputError(MopeqError):
    """A prompt or image the model cannot take (too long, wrong size or mode)."""
