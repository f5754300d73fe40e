"""Where the model looks: the coarse (static) and fine (LLM-chosen) query's attention over a video's
frames, drawn by the analysis renderer (one renderer for `fvlm eval`, `fvlm generate` and the report),
and a number for "does the fine query follow the moving object": the share of patch attention that
falls on the patches where the frame differs from the video's median frame (the mover's current
position, since the background and the other objects do not move)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch

from fvlm import atomic
from fvlm.analysis.attention_maps import AttentionRecord, patch_map, render_video
from fvlm.data.loader import boxes_array
from fvlm.errors import UsageError
from fvlm.model.backbones import IMAGENET, PixelStats, model_pixel_stats
from fvlm.model.vlm import VLMBase


class LookSummary(TypedDict):
    """One video's attention picture and how much of each query's patch attention is on the mover
    (None where it cannot be measured), next to the mover's share of the patches."""

    png: str
    coarse_on_mover: float | None
    fine_on_mover: float | None
    mover_area: float | None


class _AttentionArrays(TypedDict):
    coarse_attn: np.ndarray
    frames: np.ndarray
    frame_mask: np.ndarray
    grid: np.ndarray
    keys: np.ndarray
    step: np.ndarray


class AttentionArrays(_AttentionArrays, total=False):
    """The arrays of an attention .npz (training's attention/step_NNNNNNN.npz, `fvlm eval`'s)."""

    fine_attn: np.ndarray
    mover_boxes: np.ndarray


def to_uint8(frames: torch.Tensor, pixel_stats: PixelStats = IMAGENET) -> np.ndarray:
    """Frames [..., 3, S, S] normalised with `pixel_stats` (or uint8 already) as uint8 [..., S, S, 3]
    for drawing."""
    from fvlm.data.decode import pixels_of

    if frames.dtype == torch.uint8:
        return frames.detach().cpu().movedim(-3, -1).numpy()
    x = frames.detach().float().cpu().movedim(-3, -1).numpy()
    return np.clip(pixels_of(x, pixel_stats) * 255.0 + 0.5, 0, 255).astype(np.uint8)


@torch.no_grad()
def attention_record(
    model: VLMBase, batch: Mapping[str, Any], keys: list[str], step: int | None, path: Path
) -> AttentionRecord:
    """Coarse attention from the static query and fine attention from the model's inference mode
    (autoregressive: each query chosen by the LLM's state after the previous fine token). Of the
    batch it reads the frames, their mask and the mover's boxes (when the data has them)."""
    frames: torch.Tensor = batch["frames"]
    frame_mask: torch.Tensor = batch["frame_mask"]
    modes = [m for m in ("coarse_only", "autoregressive") if m in model.supported_modes]
    blocks = model.visual_blocks({"frames": frames, "frame_mask": frame_mask}, tuple(modes))
    if "coarse" not in blocks["coarse_only"][2]:
        raise UsageError("attention pictures: this model has no query (multi-token baseline)")
    coarse = blocks["coarse_only"][2]["coarse"]
    fine = blocks["autoregressive"][2]["fine"] if "autoregressive" in blocks else None
    size = frames.shape[-1]
    patch = model.encoder.patch_size
    return AttentionRecord(
        coarse=coarse.float().cpu().numpy(),
        fine=None if fine is None else fine.float().cpu().numpy(),
        frames=to_uint8(frames, model_pixel_stats(model)),
        frame_mask=frame_mask.cpu().numpy().astype(bool),
        grid=(size // patch, size // patch),
        keys=list(keys),
        step=int(step or 0),
        path=path,
        mover_boxes=boxes_array(batch.get("mover_boxes") or [], frame_mask.shape[1]),
    )


def mover_patches(
    frames: np.ndarray, grid: tuple[int, int], threshold: float = 30.0, boxes: np.ndarray | None = None
) -> np.ndarray:
    """bool [T, rows, cols]: the mover's patches. With `boxes` ([T, 4], shares of the frame side, as
    the data gives them), the patches at least a quarter covered by the mover's box. Without, the
    patches whose pixels differ from the median frame: right when only the mover changes, as in the
    motion videos; not when objects appear or change colour."""
    t, h, w = frames.shape[:3]
    rows, cols = grid
    if boxes is not None and np.isfinite(boxes).all():
        ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
        inside = np.stack(
            [((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :] for x0, y0, x1, y1 in boxes]
        )
        blocks = inside[:, : rows * (h // rows), : cols * (w // cols)].reshape(t, rows, h // rows, cols, w // cols)
        return blocks.mean(axis=(2, 4)) >= 0.25
    median = np.median(frames.astype(np.float32), axis=0)
    changed = np.abs(frames.astype(np.float32) - median).max(axis=-1) > threshold
    blocks = changed[:, : rows * (h // rows), : cols * (w // cols)].reshape(t, rows, h // rows, cols, w // cols)
    return blocks.mean(axis=(2, 4)) > 0.25


def _boxes(record: AttentionRecord, video: int, frame_ids: np.ndarray) -> np.ndarray | None:
    return None if record.mover_boxes is None else record.mover_boxes[video, frame_ids]


def mover_shares(record: AttentionRecord, video: int, which: str = "fine") -> list[tuple[int, float, float]] | None:
    """Frame by frame, (frame index, share of patch attention mass on the mover's patches, the
    mover's share of the patches): the second number is what attention spread evenly over the
    patches would put on the mover. Frames without a mover, or without patch attention, are left
    out; None when the query is absent or the video has fewer than 2 frames (no median to move from)."""
    attn = record.fine if which == "fine" else record.coarse
    if attn is None:
        return None
    frame_ids = np.flatnonzero(record.frame_mask[video])
    if len(frame_ids) < 2:
        return None
    movers = mover_patches(record.frames[video, frame_ids], record.grid, boxes=_boxes(record, video, frame_ids))
    rows: list[tuple[int, float, float]] = []
    for mover, t in zip(movers, frame_ids):
        patches = patch_map(attn[video, t], record.grid)
        if mover.any() and patches.sum() > 0:
            rows.append((int(t), float(patches[mover].sum() / patches.sum()), float(mover.mean())))
    return rows


def mover_share(record: AttentionRecord, video: int, which: str = "fine") -> float | None:
    """Mean over frames of the share of patch attention mass on the mover's patches."""
    rows = mover_shares(record, video, which)
    return float(np.mean([share for _, share, _ in rows])) if rows else None


def draw(record: AttentionRecord, out: Path, gif: bool = False, layer: int | None = None) -> dict[str, LookSummary]:
    """One PNG (and GIF) per video; returns {key: {png, coarse_on_mover, fine_on_mover, mover_area}}."""
    layers = record.coarse.shape[2]
    if layer is not None and not 0 <= layer < layers:
        raise UsageError(f"--layer {layer}: the attention has {layers} layer(s) (0 to {layers - 1})")
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, LookSummary] = {}
    for video, key in enumerate(record.keys):
        name = key.replace("/", "_")
        png = render_video(
            record, video, out / f"{name}.png", layer=layer, gif_path=out / f"{name}.gif" if gif else None
        )
        frame_ids = np.flatnonzero(record.frame_mask[video])
        area = (
            float(
                mover_patches(
                    record.frames[video, frame_ids], record.grid, boxes=_boxes(record, video, frame_ids)
                ).mean()
            )
            if len(frame_ids) > 1
            else None
        )
        summary[key] = {
            "png": str(png),
            "coarse_on_mover": mover_share(record, video, "coarse"),
            "fine_on_mover": mover_share(record, video, "fine"),
            "mover_area": area,
        }
    return summary


def save_npz(record: AttentionRecord, path: Path) -> Path:
    """The same arrays training writes to attention/step_NNNNNNN.npz, so `fvlm analyze` can redraw them."""
    arrays: AttentionArrays = {
        "coarse_attn": record.coarse.astype(np.float32),
        "frames": record.frames,
        "frame_mask": record.frame_mask,
        "grid": np.array(record.grid),
        "keys": np.array(record.keys),
        "step": np.array(record.step),
    }
    if record.fine is not None:
        arrays["fine_attn"] = record.fine.astype(np.float32)
    if record.mover_boxes is not None:
        arrays["mover_boxes"] = record.mover_boxes.astype(np.float32)
    with atomic.replacing(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return path
