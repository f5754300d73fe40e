"""The `fvlm` command. A thin dispatcher: each concern registers its own sub-commands.

Each module listed in COMMAND_MODULES exposes `register(subparsers)`, which adds its parsers and
sets `func` on them. Heavy imports (torch, transformers) happen inside the command functions, so
`fvlm --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fvlm.errors import UsageError

COMMAND_MODULES = (
    "fvlm.data.cli",
    "fvlm.model.cli",
    "fvlm.training.cli",
    "fvlm.experiments.cli",
    "fvlm.eval.cli",
    "fvlm.analysis.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fvlm", description="Foveated video-language models: train, sweep, evaluate, analyse."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"fvlm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fvlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
