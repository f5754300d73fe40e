"""Writing a file so that a reader, or a failure half-way, never leaves half of it behind.

Every file fvlm writes whole (results, reports, figures, exports, CSVs rewritten from scratch) goes
through `replacing`: the content is written to a hidden temporary file in the same folder, flushed
to disk, then renamed over the target in one step. A write that fails (a full disk, the file-size
limit, a kill) leaves the previous version whole. A failed write also removes its temporary file
(a killed process can leave one, hidden, never in the target's place), and its error names the file
being written rather than the temporary one (or none at all, as `write()` reports it).
Append-only logs (steps.csv, metrics.csv) are the exception: they grow a row at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def temporary_name(path: Path) -> Path:
    """The hidden sibling a new version of `path` is written to before it replaces `path` (one per
    process, so that two processes writing the same file cannot write into each other's copy)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def naming(exc: OSError, path: Path | str) -> OSError:
    """The same error naming `path`: the file the user knows of rather than a temporary one, or any
    file at all where the failing call (write(), a library's writer) names none."""
    if exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))


@contextmanager
def replacing(path: Path | str, mode: str = "w", **open_args: Any) -> Iterator[IO[Any]]:
    """`with replacing(path) as f: f.write(...)` writes `path` atomically (see the module's text).
    `mode` is "w" (text, UTF-8 unless `encoding` says otherwise) or "wb"."""
    path = Path(path)
    tmp = temporary_name(path)
    if "b" not in mode:
        open_args.setdefault("encoding", "utf-8")
    try:
        with open(tmp, mode, **open_args) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        # write() names no file, and open() or rename() the temporary one: name the file being written.
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp)):
            raise naming(exc, path) from exc
        raise


def write_text(path: Path | str, text: str) -> Path:
    with replacing(path) as handle:
        handle.write(text)
    return Path(path)


def write_bytes(path: Path | str, data: bytes) -> Path:
    with replacing(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_json(path: Path | str, obj: Any, **dumps_args: Any) -> Path:
    """JSON text plus a final newline; `dumps_args` go to json.dumps (indent, default, allow_nan)."""
    return write_text(path, json.dumps(obj, **dumps_args) + "\n")


def save_figure(fig: Any, path: Path | str, **savefig_args: Any) -> Path:
    """matplotlib's `fig.savefig`, atomically. The format comes from the target's suffix (the
    temporary name ends in .tmp, from which matplotlib could not tell it)."""
    path = Path(path)
    savefig_args.setdefault("format", path.suffix.lstrip(".") or None)
    with replacing(path, "wb") as handle:
        fig.savefig(handle, **savefig_args)
    return path
