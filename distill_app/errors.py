"""The one error type for "the user must change something" (exit code 1 in the CLI), and the
one way an exception or a server's message is shortened to a line for it."""

from __future__ import annotations


class DistillError(Exception):
    """A problem the user can fix; the message is one line and says how."""


def one_line(what: BaseException | str, limit: int | None = 160) -> str:
    """``what`` (an exception, or a server's message) as one line of at most ``limit`` characters:
    whitespace and line breaks squashed, an exception without text named by its type."""
    text = " ".join(str(what).split())
    if not text and isinstance(what, BaseException):
        text = type(what).__name__
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
