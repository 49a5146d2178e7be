"""The one exception type users see. The CLI prints its message on one line and exits non-zero.

It is the runtime's type (the toolchain depends on mopeq_runtime, never the other way round)."""

from mopeq_runtime.errors import MopeqError

__all__ = ["MopeqError", "require"]


def require(condition: bool, message: str) -> None:
    """Raise MopeqError(message) unless condition holds (used instead of `assert` for user input)."""
    if not condition:
        raise MopeqError(message)
