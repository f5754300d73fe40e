"""Errors that reach the user as one line and exit code 2 (bad usage, config or input)."""


class UsageError(Exception):
    """A problem with what the user gave us: a flag, a config field, a file. Exit code 2, no traceback."""
