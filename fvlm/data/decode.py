"""From a sample's raw members to model inputs: frames (decoded, resized, centre-cropped,
normalised as DINOv2 expects) and chat-template tokens with a loss mask."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from fvlm.data.index import IMAGE_EXTS
from fvlm.errors import parse_json
from fvlm.model.backbones import IMAGENET, PixelStats, pixel_affine
from fvlm.model.tokenizer import chat_ids

if TYPE_CHECKING:  # torch is imported where frames are normalised, so that indexing data stays light
    import torch
    from transformers import PreTrainedTokenizerBase

# ImageNet's mean and std, what frames are normalised with unless the DINO folder's
# preprocessor_config.json names others (`fvlm.model.backbones.pixel_stats`).
MEAN = np.array(IMAGENET.mean, dtype=np.float32)
STD = np.array(IMAGENET.std, dtype=np.float32)
DEFAULT_PROMPTS = {
    "video": "Describe what happens in this video.",
    "image": "Describe this image.",
    "text": "Say something.",
}
# Upstream fVLM's prompts for caption sets whose samples leave `user` empty, by the `source` named in
# the sample's JSON (a mix file's `prompt` takes precedence; other sources fall back to DEFAULT_PROMPTS).
SOURCE_PROMPTS = {
    "openvid": "Write a brief caption for this video.",
    "webvid": "What would be the WebVid caption for this video?",
    "vript": "Provide a detailed narration of what happens in this video.",
    "sharegpt4video": "Describe what happens in this video in detail.",
}
# The system turn upstream fVLM puts before every dialogue, in place of the default one that
# SmolLM2's chat template inserts when a dialogue has none ("... named SmolLM, trained by Hugging Face").
UPSTREAM_SYSTEM_PROMPT = "You are a helpful AI assistant."


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


def decode_mp4(data: bytes | str, size: int, fps: float, max_frames: int) -> np.ndarray:
    """Frames at `fps` (the first at t=0), uniformly thinned to `max_frames`; `data` is the file's
    bytes or its path."""
    import av

    try:
        with av.open(io.BytesIO(data) if isinstance(data, bytes) else data, mode="r") as container:
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


def stats_arrays(stats: PixelStats) -> tuple[np.ndarray, np.ndarray]:
    """float32 mean and std, [3] each (ImageNet's are MEAN and STD)."""
    return np.array(stats.mean, dtype=np.float32), np.array(stats.std, dtype=np.float32)


def normalise_into(out: torch.Tensor, frames_uint8: np.ndarray, stats: PixelStats = IMAGENET) -> None:
    """uint8 [T, H, W, 3] -> `out`, a float32 tensor [T, 3, H, W], with the DINO's mean/std (`stats`,
    ImageNet's by default), in place: one pass over the batch buffer instead of a temporary per step."""
    import torch

    scale, shift = pixel_affine(stats)  # what the model applies to uint8 frames on the device, too
    out.copy_(torch.from_numpy(np.ascontiguousarray(frames_uint8.transpose(0, 3, 1, 2))))  # bytes move fastest
    out.mul_(torch.tensor(scale, dtype=torch.float32).view(3, 1, 1))
    out.sub_(torch.tensor(shift, dtype=torch.float32).view(3, 1, 1))


def normalise(frames_uint8: np.ndarray, stats: PixelStats = IMAGENET) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> a new float32 tensor [T, 3, H, W], normalised as the DINO expects."""
    import torch

    t, h, w, _ = frames_uint8.shape
    out = torch.empty(t, 3, h, w, dtype=torch.float32)
    normalise_into(out, frames_uint8, stats)
    return out


def grey_frames(frames: torch.Tensor) -> torch.Tensor:
    """Frames like `frames` (normalised float, or a training batch's uint8) with every pixel flat grey
    in the model's input: normalised zeros, the DINO's mean colour. Always float, which the model takes
    as normalised: uint8 cannot hold the mean (ImageNet's red is 123.675 of 255)."""
    import torch

    dtype = frames.dtype if frames.is_floating_point() else torch.float32
    return torch.zeros(frames.shape, dtype=dtype, device=frames.device)


def uint8_pixels(frames: np.ndarray, stats: PixelStats = IMAGENET) -> np.ndarray:
    """Batch frames [..., H, W, 3] (channels last) as uint8 RGB for drawing: uint8 ones as they are,
    normalised ones back through `pixels_of`, rounded."""
    if frames.dtype == np.uint8:
        return frames
    return np.clip(np.rint(pixels_of(frames, stats) * 255.0), 0, 255).astype(np.uint8)


def pixels_of(frames: np.ndarray, stats: PixelStats = IMAGENET) -> np.ndarray:
    """Normalised frames [..., H, W, 3] (channels last) back to RGB in [0, 1], float32."""
    mean, std = stats_arrays(stats)
    return frames * std + mean


def read_meta(parts: dict[str, bytes]) -> dict[str, Any]:
    """A sample's JSON, which the index already found to be a JSON object within the limits."""
    try:
        meta = parse_json(parts["json"])
    except ValueError:
        raise SampleError("invalid_json") from None
    if not isinstance(meta, dict):
        raise SampleError("invalid_json")
    return meta


Turn = tuple[str, str]  # (user, assistant)


def dialogue_of(meta: dict[str, Any], parts: dict[str, bytes] | None = None) -> list[Turn]:
    """The (user, assistant) turns of a sample's JSON; a user left empty is filled in by the reader.

    - `messages`: a list of {role: user|assistant, content} alternating from a user turn to an
      assistant turn (multi-turn; `user`/`assistant` then repeat its first exchange);
    - `user` + `assistant`: one exchange (fvlm's and upstream fVLM's unified format);
    - `caption` or a `.txt` member: a caption-only sample (upstream's older shards): the caption
      answers an empty user turn.
    Raises SampleError naming what is missing or malformed; never `invalid_json` for valid JSON.
    """
    if "messages" in meta:
        messages = meta["messages"]
        if not isinstance(messages, list) or not messages or len(messages) % 2:
            raise SampleError("bad_field_messages")
        turns = []
        for i in range(0, len(messages), 2):
            user, answer = messages[i], messages[i + 1]
            ok = all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in (user, answer))
            if not ok or user.get("role") != "user" or answer.get("role") != "assistant":
                raise SampleError("bad_field_messages")
            turns.append((user["content"], answer["content"]))
    elif "assistant" in meta:
        if not isinstance(meta["assistant"], str):
            raise SampleError("bad_field_assistant")
        turns = [(meta.get("user", ""), meta["assistant"])]
    elif "caption" in meta:
        if not isinstance(meta["caption"], str):
            raise SampleError("bad_field_caption")
        turns = [("", meta["caption"])]
    elif parts is not None and "txt" in parts:
        try:
            turns = [("", parts["txt"].decode("utf-8"))]
        except UnicodeDecodeError:
            raise SampleError("bad_field_txt") from None
    elif "chosen" in meta or "chosen_assistant" in meta:
        raise SampleError("preference_pair")  # read by DPO (train.stage=3 with preference data), not here
    elif "token_ids" in meta or "loss_mask" in meta:
        # Upstream fVLM's pre-tokenised shards carry ids of one tokenizer and template and no text.
        raise SampleError("pretokenised_without_text")
    else:
        raise SampleError("missing_assistant")
    if not all(isinstance(user, str) for user, _ in turns):
        raise SampleError("bad_field_user")
    if any(not answer.strip() for _, answer in turns):
        raise SampleError("empty_answer")
    return turns


def template_injects_system(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template writes a system turn of its own into a dialogue that has none
    (SmolLM2's does; the byte tokenizer's does not)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False)
    return "system" in str(text)


def system_prompt_for(setting: str, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The system turn dialogues get under `data.system_prompt`: "auto" = upstream fVLM's prompt where
    the template would insert a default one of its own, none where it would not; "" = none (the
    template's default, if any, stands); any other text = that text."""
    if setting == "auto":
        return UPSTREAM_SYSTEM_PROMPT if template_injects_system(tokenizer) else None
    return setting or None


def encode_dialogue(
    tokenizer: PreTrainedTokenizerBase,
    turns: list[Turn],
    *,
    stage: int,
    max_tokens: int,
    end_of_turn_id: int | None,
    system: str | None = None,
) -> tuple[list[int], list[bool], int]:
    """Chat-template tokens of a dialogue of (user, assistant) turns, and which are targets.

    Stage 1: every token (the system turn too). Stages 2-3: each assistant turn's content and its
    end-of-turn token only (not the role header before it, nor the template's trailing newline after
    it). `system`, when given, opens the dialogue as a system turn.
    Right-truncated to `max_tokens`; a result with no target left raises SampleError. The third
    value is the length before truncation.
    """
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    ids = chat_ids(tokenizer, messages)
    if stage == 1:
        mask = [True] * len(ids)
    else:
        mask = [False] * len(ids)
        first = len(messages) - 2 * len(turns)
        for t in range(len(turns)):
            upto = first + 2 * t + 1  # the messages through this turn's user message
            prompt = chat_ids(tokenizer, messages[:upto], add_generation_prompt=True)
            through = chat_ids(tokenizer, messages[: upto + 1]) if t < len(turns) - 1 else ids
            start, stop = len(prompt), len(through)
            if list(ids[:start]) != list(prompt) or list(ids[:stop]) != list(through):
                raise SampleError("template_mismatch")
            if end_of_turn_id is not None and end_of_turn_id in through[start:]:
                stop = len(through) - list(through[::-1]).index(end_of_turn_id)
            mask[start:stop] = [True] * (stop - start)
    full_length = len(ids)
    ids, mask = ids[:max_tokens], mask[:max_tokens]
    if not any(mask):
        raise SampleError("no_loss_tokens")
    return ids, mask, full_length
