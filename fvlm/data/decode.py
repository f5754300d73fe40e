"""From a sample's raw members to model inputs: frames (decoded, resized, centre-cropped,
normalised as DINOv2 expects) and chat-template tokens with a loss mask."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from fvlm.data.index import IMAGE_EXTS
from fvlm.errors import parse_json
from fvlm.model.tokenizer import chat_ids

if TYPE_CHECKING:  # torch is imported where frames are normalised, so that indexing data stays light
    import torch
    from transformers import PreTrainedTokenizerBase

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
DEFAULT_PROMPTS = {
    "video": "Describe what happens in this video.",
    "image": "Describe this image.",
    "text": "Say something.",
}


class SampleError(Exception):
    """A sample that cannot be used; `reason` is the skip-count key."""

    where: tuple[str, str]  # (shard, key), set by the reader that met the sample

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _fit(img: Image.Image, size: int) -> np.ndarray:
    """Shorter side to `size`, centre crop, RGB uint8 [size, size, 3]."""
    if img.format == "JPEG":
        img.draft("RGB", (size, size))  # libjpeg's DCT scaling: far cheaper than decoding full size
    img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img)


def decode_image(data: bytes, size: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return _fit(img, size)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        raise SampleError("undecodable_frame") from None


def decode_mp4(data: bytes, size: int, fps: float, max_frames: int) -> np.ndarray:
    """Frames at `fps` (the first at t=0), uniformly thinned to `max_frames`."""
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            picked: list[np.ndarray] = []
            next_t = 0.0
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else len(picked) / fps
                if t + 1e-6 >= next_t:
                    picked.append(_fit(frame.to_image(), size))
                    next_t += 1.0 / fps
    except (av.error.FFmpegError, IndexError, ValueError, OSError):
        raise SampleError("undecodable_frame") from None
    if not picked:
        raise SampleError("undecodable_frame")
    if len(picked) > max_frames:
        keep = np.linspace(0, len(picked) - 1, max_frames).round().astype(int)
        picked = [picked[i] for i in keep]
    return np.stack(picked)


def thinned(count: int, max_frames: int) -> list[int]:
    """Which of `count` frames a video keeps under `max_frames` (uniformly spread, first and last kept)."""
    if count <= max_frames:
        return list(range(count))
    return [int(i) for i in np.linspace(0, count - 1, max_frames).round().astype(int)]


def decode_frames(
    parts: dict[str, bytes], kind: str, size: int, *, max_frames: int, fps: float, replicate_image_frames: int
) -> np.ndarray:
    """uint8 [T, size, size, 3]; T = 0 for text-only samples."""
    if kind == "text":
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    if kind == "image":
        ext = next(e for e in parts if e in IMAGE_EXTS)
        frame = decode_image(parts[ext], size)
        return np.repeat(frame[None], replicate_image_frames, axis=0)
    if "mp4" in parts:
        return decode_mp4(parts["mp4"], size, fps, max_frames)
    names = sorted((e for e in parts if e.split(".")[0].isdigit()), key=lambda e: int(e.split(".")[0]))
    names = [names[i] for i in thinned(len(names), max_frames)]
    return np.stack([decode_image(parts[n], size) for n in names])


def normalise_into(out: torch.Tensor, frames_uint8: np.ndarray) -> None:
    """uint8 [T, H, W, 3] -> `out`, a float32 tensor [T, 3, H, W], with ImageNet mean/std, in place:
    one pass over the batch buffer instead of a temporary per step."""
    import torch

    out.copy_(torch.from_numpy(np.ascontiguousarray(frames_uint8.transpose(0, 3, 1, 2))))  # bytes move fastest
    out.mul_(torch.from_numpy(1.0 / (255.0 * STD)).view(3, 1, 1)).sub_(torch.from_numpy(MEAN / STD).view(3, 1, 1))


def normalise(frames_uint8: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> a new float32 tensor [T, 3, H, W], normalised as DINOv2 expects."""
    import torch

    t, h, w, _ = frames_uint8.shape
    out = torch.empty(t, 3, h, w, dtype=torch.float32)
    normalise_into(out, frames_uint8)
    return out


def read_meta(parts: dict[str, bytes]) -> dict[str, Any]:
    """A sample's JSON, which the index already found to be a JSON object within the limits."""
    try:
        meta = parse_json(parts["json"])
    except ValueError:
        raise SampleError("invalid_json") from None
    if not isinstance(meta, dict):
        raise SampleError("invalid_json")
    return meta


def encode_dialogue(
    tokenizer: PreTrainedTokenizerBase,
    user: str,
    assistant: str,
    *,
    stage: int,
    max_tokens: int,
    end_of_turn_id: int | None,
) -> tuple[list[int], list[bool], int]:
    """Chat-template tokens of one user turn and one assistant turn, and which are targets.

    Stage 1: every token. Stages 2-3: the assistant's content and its end-of-turn token only (not
    the role header before it, nor the template's trailing newline after it).
    Right-truncated to `max_tokens`; a result with no target left raises SampleError. The third
    value is the length before truncation.
    """
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    ids = chat_ids(tokenizer, messages)
    if stage == 1:
        mask = [True] * len(ids)
    else:
        prompt = chat_ids(tokenizer, messages[:1], add_generation_prompt=True)
        start = len(prompt)
        if list(ids[:start]) != list(prompt):
            raise SampleError("template_mismatch")
        stop = len(ids)
        if end_of_turn_id is not None and end_of_turn_id in ids[start:]:
            stop = len(ids) - ids[::-1].index(end_of_turn_id)
        mask = [start <= i < stop for i in range(len(ids))]
    full_length = len(ids)
    ids, mask = ids[:max_tokens], mask[:max_tokens]
    if not any(mask):
        raise SampleError("no_loss_tokens")
    return ids, mask, full_length
