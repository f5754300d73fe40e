"""The `fvlm` command. A thin dispatcher: each concern registers its own sub-commands.

Each module listed in COMMAND_MODULES exposes `register(subparsers)`, which adds its parsers and
sets `func` on them. Heavy imports (torch, transformers) happen inside the command functions, so
`fvlm --help` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from fvlm.errors import UsageError

COMMAND_MODULES = (
    "fvlm.data.cli",
    "fvlm.model.cli",
    "fvlm.training.cli",
    "fvlm.experiments.cli",
    "fvlm.eval.cli",
    "fvlm.analysis.cli",
    "fvlm.export.cli",
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
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse fills a command's positional key=value list before the options that follow it
        # (`fvlm eval RUN --data none key=value`); overrides after those options belong to it too.
        if isinstance(getattr(args, "items", None), list) and not any(e.startswith("-") for e in extra):
            args.items += extra
        else:
            parser.parse_args(argv)  # reports the unrecognised arguments and exits 2
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
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        # A path the user gave that holds a file where a folder must go, or the reverse: their input.
        print(f"fvlm: error: {_wrong_kind_of_path(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        # Faults of the machine rather than of the input: a full disk, a read-only folder, no permission.
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"fvlm: error: {where}{exc.strerror or os.strerror(exc.errno)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        hint = MEMORY_HINTS.get(args.command, "lower the batch size, the frame count or the image size")
        print(f"fvlm: error: out of memory ({_first_line(exc)}); {hint}", file=sys.stderr)
        return 1


# errno values that mean the environment, not the input, is at fault.
# EFBIG: a file over the size limit of the process or the file system (ulimit -f).
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EDQUOT,
    errno.EMFILE,
    errno.EFBIG,
    errno.EIO,
}
# Which settings bound the memory of each command.
MEMORY_HINTS = {
    "train": "lower train.batch_size (raise train.grad_accum to keep the batch), data.max_frames or model.image_size",
    "sweep": "lower train.batch_size (raise train.grad_accum to keep the batch), data.max_frames or model.image_size",
    "phase1": "lower train.batch_size (raise train.grad_accum to keep the batch), data.max_frames or model.image_size",
    "eval": "lower --batch-size or data.max_frames (data.max_frames=N after the run folder)",
    "generate": "lower --frames",
    "flops": "lower --frames or --text-tokens",
    "data": "lower --size, --frames or the sample counts (data synth); model.image_size or data.max_frames (data inspect)",
}


def _wrong_kind_of_path(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else "a path"
    if isinstance(exc, FileExistsError):
        return f"{where}: exists and is not a folder (choose a new path)"
    if isinstance(exc, NotADirectoryError):
        return f"{where}: not a folder (a file stands where the path needs a folder)"
    return f"{where}: is a folder, not a file"


def _out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: Python's MemoryError, PyTorch's CPU allocator, or CUDA's OutOfMemoryError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return "can't allocate memory" in text or "CUDA out of memory" in text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    # PyTorch's allocator message starts with "[enforce fail at alloc_cpu.cpp:127] err == 0. "
    return line.split("DefaultCPUAllocator: ", 1)[-1][:160]


if __name__ == "__main__":
    sys.exit(main())
