"""Errors that reach the user as one line and exit code 2 (bad usage, config or input)."""


class UsageError(Exception):
    """A problem with what the user gave us: a flag, a config field, a file. Exit code 2, no traceback."""


def read_text(path) -> str:
    """A UTF-8 text file the user or a run folder supplies; a file that is not UTF-8 is a one-line error."""
    from pathlib import Path

    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None


def read_json(path):
    import json

    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc.msg})") from None


def read_yaml(path):
    """A YAML file as data (None for an empty file)."""
    import yaml

    try:
        return yaml.safe_load(read_text(path))
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
