"""Errors that reach the user as one line and exit code 2 (bad usage, config or input), and the one
reader per text format that every part of fvlm reads files through.

Files come from users, from other machines and from runs that were killed half-way, so a reader
checks what the parser would otherwise trust: the text is UTF-8, and a JSON or YAML document is not
nested deeper than MAX_DEPTH, not larger than its size limit, and (YAML) does not expand through
aliases into more than MAX_YAML_VALUES values (the "billion laughs" document: nine anchors of nine
aliases each are a few hundred bytes and a billion strings). Each check raises LimitError (a
ValueError) from the parsing functions, and a UsageError naming the file from the reading ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

# Nesting of any JSON or YAML document fvlm reads; its own files nest a handful of levels. Far below
# Python's recursion limit, so neither the parsers nor the code that walks the result can hit it.
MAX_DEPTH = 64
# A YAML document (configs, mix files) and its expansion through aliases (*name).
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000
MAX_YAML_ALIASES = 100
# A JSON document: a sample's metadata, one benchmark line, a results file of a run.
MAX_JSON_BYTES = 256 << 20


class UsageError(Exception):
    """A problem with what the user gave us: a flag, a config field, a file. Exit code 2, no traceback."""


class LimitError(ValueError):
    """Structured text past one of the limits above."""


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# ----------------------------------------------------------------------------- text


def read_text(path) -> str:
    """A UTF-8 text file the user or a run folder supplies; a file that is not UTF-8 is a one-line error."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None


def decode_lines(data: bytes) -> list[str | None]:
    """The lines of `data` (line ends removed), each None where it is not UTF-8: for logs that a
    reader keeps line by line, where one damaged line must not cost the others."""
    lines: list[str | None] = []
    for raw in data.splitlines():
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(None)
    return lines


# ----------------------------------------------------------------------------- JSON

# The characters that matter to nesting: brackets, and the quotes and backslashes that decide
# whether a bracket is inside a string.
_JSON_SPECIAL = re.compile(r'[\[\]{}"\\]')


def _check_json_depth(text: str, limit: int) -> None:
    """Raises LimitError when brackets outside strings nest deeper than `limit`. One pass, no
    recursion: the C parser would otherwise recurse once per level."""
    depth, in_string, escaped_at = 0, False, -1
    for match in _JSON_SPECIAL.finditer(text):
        at = match.start()
        if at == escaped_at:
            continue
        char = text[at]
        if in_string:
            if char == "\\":
                escaped_at = at + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                raise LimitError(f"nested deeper than {limit} levels")
        elif char in "]}":
            depth -= 1


def parse_json(text: str | bytes, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads within the limits. Raises ValueError: json.JSONDecodeError, UnicodeDecodeError (bytes
    that are not UTF-8) or LimitError."""
    if len(text) > max_bytes:
        raise LimitError(f"larger than {max_bytes} bytes")
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    _check_json_depth(text, max_depth)
    return json.loads(text)


def json_problem(exc: ValueError) -> str:
    """What is wrong with a JSON text, for a one-line message."""
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON ({exc.msg})"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (bad byte at offset {exc.start})"
    return f"not usable JSON ({exc})"


def read_json(path) -> Any:
    try:
        return parse_json(read_text(path))
    except ValueError as exc:
        raise UsageError(f"{path}: {json_problem(exc)}") from None


# ----------------------------------------------------------------------------- YAML


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the limits above, checked while the document is composed (before
    anything is built from it): nesting, aliases, and the number of values the document stands for
    once every alias is expanded."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._expanded: dict[int, int] = {}  # id(node) -> values the node stands for, itself included

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise LimitError(f"more than {MAX_YAML_ALIASES} aliases (*name)")
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise LimitError(f"nested deeper than {MAX_DEPTH} levels")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [item for pair in node.value for item in pair]
        else:
            children = []
        values = 1
        for child in children:
            if id(child) not in self._expanded:
                # Only a node still being composed has no count yet: an alias inside its own anchor.
                raise LimitError("an alias (*name) refers to the value that contains it")
            values += self._expanded[id(child)]
        if values > MAX_YAML_VALUES:
            raise LimitError(f"expands through aliases into more than {MAX_YAML_VALUES} values")
        self._expanded[id(node)] = values
        return node


def parse_yaml(text: str) -> Any:
    """yaml.safe_load within the limits. Raises yaml.YAMLError or LimitError."""
    if len(text) > MAX_YAML_BYTES:
        raise LimitError(f"larger than {MAX_YAML_BYTES} bytes")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def yaml_problem(exc: Exception) -> str:
    """What is wrong with a YAML text, for a one-line message."""
    if isinstance(exc, LimitError):
        return f"not usable YAML ({exc})"
    return f"not valid YAML ({_first_line(exc)})"


def read_yaml(path) -> Any:
    """A YAML file as data (None for an empty file)."""
    try:
        return parse_yaml(read_text(path))
    except (yaml.YAMLError, LimitError) as exc:
        raise UsageError(f"{path}: {yaml_problem(exc)}") from None


def not_empty(args: Any, *names: str) -> None:
    """Refuses a string argument given as empty (`--out ''`): it would silently mean the current
    folder, or nothing. Arguments left out (None) are fine. `names` are argparse dests of options
    ("out" for --out), or positional arguments in capitals ("OUT" for the dest "out")."""
    for name in names:
        value = getattr(args, name.lower(), None)
        if isinstance(value, str) and not value.strip():
            label = name if name.isupper() else f"--{name.replace('_', '-')}"
            raise UsageError(f"{label} must not be empty")


def check_folder_path(path: str | Path, what: str) -> Path:
    """`path` as a folder to write into, made or not: refused when it, or the nearest part of it that
    exists, is a file (writing would fail later, naming some path inside it)."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise UsageError(f"{what} {path}: {part} exists and is not a folder")
            break
    return path
