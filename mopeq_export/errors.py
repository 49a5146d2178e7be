"""The one exception type users see. The CLI prints its message on one line and exits non-zero."""


class MopeqError(Exception):
    """A problem the user can act on: the message says what is wrong and what to do."""


def require(condition: bool, message: str) -> None:
    """Raise MopeqError(message) unless condition holds (used instead of `assert` for user input)."""
    if not condition:
        raise MopeqError(message)
