"""Visual input from a path on disk (a video file, a folder of frames, or one image), decoded and
resized exactly as the data pipeline decodes training samples."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fvlm.errors import UsageError

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov")


def _image_exts() -> tuple[str, ...]:
    from fvlm.data.index import IMAGE_EXTS

    return tuple(f".{e}" for e in IMAGE_EXTS)


def check_visual_path(path: Path) -> str:
    """'video' | 'frames' | 'image' for a usable path; UsageError naming it otherwise."""
    if path.is_dir():
        if not any(p.suffix.lower() in _image_exts() for p in path.iterdir()):
            raise UsageError(f"{path}: folder holds no frames ({', '.join(_image_exts())})")
        return "frames"
    if not path.is_file():
        raise UsageError(f"{path}: no such video, frame folder or image")
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTS:
        return "video"
    if suffix in _image_exts():
        return "image"
    raise UsageError(f"{path}: not a video ({', '.join(VIDEO_EXTS)}), image or frame folder")


def _natural(path: Path) -> list:
    """frame_2 before frame_10, which a plain string sort gets wrong."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def load_visual(path: str | Path, *, size: int, max_frames: int, fps: float, image_frames: int) -> np.ndarray:
    """uint8 [T, size, size, 3]. Videos are sampled at `fps` and thinned to `max_frames`; a frame
    folder (sorted by name) is thinned to `max_frames`; an image is repeated `image_frames` times."""
    from fvlm.data.decode import SampleError, decode_image, decode_mp4

    path = Path(path)
    kind = check_visual_path(path)
    try:
        if kind == "video":
            return decode_mp4(path.read_bytes(), size, fps, max_frames)
        if kind == "image":
            return np.repeat(decode_image(path.read_bytes(), size)[None], image_frames, axis=0)
        names = sorted((p for p in path.iterdir() if p.suffix.lower() in _image_exts()), key=_natural)
        if len(names) > max_frames:
            names = [names[i] for i in np.linspace(0, len(names) - 1, max_frames).round().astype(int)]
        return np.stack([decode_image(p.read_bytes(), size) for p in names])
    except SampleError as exc:
        raise UsageError(f"{path}: cannot decode ({exc.reason})") from None
