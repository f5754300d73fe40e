"""Folders made once and shared: the synthetic dataset and the tiny pretrained backbones."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def build_once(folder: Path, marker: str, build: Callable[[Path], object]) -> Path:
    """`folder`, built by `build(tmp)` into a temporary sibling and renamed into place unless
    `folder/marker` already exists. Two processes racing both build; the first rename wins and the
    loser's copy is removed, so a reader never sees a half-written folder."""
    folder = Path(folder)
    if (folder / marker).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    build(tmp)
    try:
        os.rename(tmp, folder)
    except OSError:
        if not (folder / marker).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
