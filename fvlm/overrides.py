"""The one override syntax of every command: `[CONFIG] key=value ...` (plus `SIZE:key=value` where a
command runs several model sizes, read by `fvlm.experiments.matrix.split_overrides`)."""

from __future__ import annotations

import argparse

from fvlm.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser, config: bool = True, help_text: str = "") -> None:
    """The positional `[CONFIG] key=value ...` of a command (without CONFIG where the config is not
    the user's to choose, as in `fvlm eval`, whose config is the checkpoint's). The `--set KEY=VALUE`
    spelling that some commands once had is still parsed, to say in one line how to write it now."""
    parser.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG | key=value" if config else "key=value",
        help=help_text
        or (
            "a config file or shipped config name (default: tiny), then field overrides"
            if config
            else "config field overrides"
        ),
    )
    parser.add_argument("--set", dest="old_set", action="append", default=[], help=argparse.SUPPRESS)


def split_config_items(items: list[str]) -> tuple[str | None, list[str]]:
    """The optional leading config name or path, then the key=value overrides."""
    config, overrides = (items[0], list(items[1:])) if items and "=" not in items[0] else (None, list(items))
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"'{item}' is not a key=value override (the config name goes first)")
    return config, overrides


def from_args(args: argparse.Namespace, command: str, config: bool = True) -> tuple[str | None, list[str]]:
    """(config, overrides) of a command parsed with `add_arguments`."""
    if args.old_set:
        example = args.old_set[0]
        raise UsageError(
            f"--set is gone: write overrides as key=value after the other arguments (fvlm {command} ... {example})"
        )
    if config:
        return split_config_items(args.items)
    for item in args.items:
        if "=" not in item:
            raise UsageError(f"'{item}' is not a key=value override")
    return None, list(args.items)
