"""The one error type for "the user must change something" (exit code 1 in the CLI)."""


class DistillError(Exception):
    """A problem the user can fix; the message is one line and says how."""
