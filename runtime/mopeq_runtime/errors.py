"""Errors of the runtime, and of the whole project: the toolchain (mopeq_export) re-exports MopeqError from
here, so a device app that has only `mopeq_runtime` installed and the CLI catch the same type."""

from __future__ import annotations


class MopeqError(Exception):
    """A problem the user can act on: the message says what is wrong and what to do."""


class BundleError(MopeqError):
    """The bundle is incomplete, altered, of an unknown schema, or made for another device."""


class InputError(MopeqError):
    """A prompt or image the model cannot take (too long, wrong size or mode)."""
