"""Attention heatmaps over the probe frames (the plan's Fig 4), shared by `fvlm analyze` and `fvlm eval`.

Input: the `attention/step_NNNNNNN.npz` files training writes at eval time:
  coarse_attn, fine_attn  float32 [videos, frames, layers, heads, 1 + patches]  (fine_attn optional)
  frames                  uint8   [videos, frames, S, S, 3]
  frame_mask              bool    [videos, frames]
  grid                    int     [2]   patch rows, cols (patches are row-major)
  keys                    str     [videos]
  step                    int

What a heatmap shows: the query's attention averaged over heads (and over layers unless one layer
is asked for), with the CLS token (index 0) dropped. The patch attention is shown as *mass*, not
renormalised: a frame whose query looked mostly at CLS comes out faint, which is information.
Each patch's mass is spread evenly over the pixels it covers, so the frame-sized map sums exactly to
the patch attention mass (1 - CLS share). `renormalise=True` divides by that mass instead.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fvlm import atomic
from fvlm.errors import UsageError


@dataclass
class AttentionRecord:
    coarse: np.ndarray
    fine: np.ndarray | None
    frames: np.ndarray
    frame_mask: np.ndarray
    grid: tuple[int, int]
    keys: list[str]
    step: int
    path: Path
    # The mover's box per frame [videos, frames, 4] (x0, y0, x1, y1 as shares of the frame side; NaN
    # where unknown), when the data says where the mover is; None for data without such boxes.
    mover_boxes: np.ndarray | None = None


def load_attention(path: Path | str) -> AttentionRecord:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: file not found")
    try:
        return _read_npz(path)
    except UsageError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        # A pickle (refused: allow_pickle=False), a file that is not a zip, a member cut short.
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UsageError(f"{path}: not a readable attention .npz ({reason})") from None


def _read_npz(path: Path) -> AttentionRecord:
    with path.open("rb") as handle:
        magic = handle.read(2)
    if magic != b"PK":  # np.load would take any other file for a pickle or a bare .npy
        raise UsageError(f"{path}: not a readable attention .npz (not a zip archive)")
    with np.load(path, allow_pickle=False) as data:
        for key in ("coarse_attn", "frames", "frame_mask", "grid", "keys", "step"):
            if key not in data:
                raise UsageError(f"{path}: missing array '{key}'")
        coarse = data["coarse_attn"].astype(np.float32)
        fine = data["fine_attn"].astype(np.float32) if "fine_attn" in data else None
        record = AttentionRecord(
            coarse=coarse,
            fine=fine,
            frames=data["frames"],
            frame_mask=data["frame_mask"].astype(bool),
            grid=(int(data["grid"][0]), int(data["grid"][1])),
            keys=[str(k) for k in data["keys"]],
            step=int(data["step"]),
            path=path,
            mover_boxes=data["mover_boxes"].astype(np.float32) if "mover_boxes" in data else None,
        )
    rows, cols = record.grid
    if coarse.ndim != 5 or coarse.shape[-1] != 1 + rows * cols:
        raise UsageError(
            f"{path}: 'coarse_attn' has shape {coarse.shape}; expected [videos, frames, layers, heads, 1 + {rows}*{cols}]"
        )
    if fine is not None and fine.shape[:2] + fine.shape[-1:] != coarse.shape[:2] + coarse.shape[-1:]:
        raise UsageError(f"{path}: 'fine_attn' shape {fine.shape} does not match 'coarse_attn' {coarse.shape}")
    if record.frames.shape[:2] != coarse.shape[:2] or record.frame_mask.shape != coarse.shape[:2]:
        raise UsageError(f"{path}: 'frames'/'frame_mask' do not cover the same videos and frames as 'coarse_attn'")
    if record.mover_boxes is not None and record.mover_boxes.shape != (*coarse.shape[:2], 4):
        raise UsageError(
            f"{path}: 'mover_boxes' has shape {record.mover_boxes.shape}; expected "
            f"[videos, frames, 4] = {(*coarse.shape[:2], 4)}"
        )
    return record


def patch_map(
    attn: np.ndarray, grid: tuple[int, int], layer: int | None = None, renormalise: bool = False
) -> np.ndarray:
    """One frame's attention [layers, heads, 1 + patches] -> patch map [rows, cols] (CLS dropped)."""
    per_layer = attn.mean(axis=1)
    weights = per_layer.mean(axis=0) if layer is None else per_layer[layer]
    patches = weights[1:].reshape(grid)
    if renormalise:
        total = patches.sum()
        return patches / total if total > 0 else patches
    return patches


def upsample_mass(patches: np.ndarray, height: int, width: int) -> np.ndarray:
    """Spread each patch's mass evenly over its pixels: the result sums to patches.sum()."""
    rows, cols = patches.shape
    row_of = np.minimum(np.arange(height) * rows // height, rows - 1)
    col_of = np.minimum(np.arange(width) * cols // width, cols - 1)
    pixels_per_row = np.bincount(row_of, minlength=rows)
    pixels_per_col = np.bincount(col_of, minlength=cols)
    density = patches / np.outer(pixels_per_row, pixels_per_col)
    return density[np.ix_(row_of, col_of)]


def _overlay(frame: np.ndarray, heat: np.ndarray, vmax: float) -> np.ndarray:
    import matplotlib

    rgb = matplotlib.colormaps["inferno"](np.clip(heat / vmax, 0, 1) if vmax > 0 else heat)[..., :3]
    return (0.45 * frame.astype(float) / 255 + 0.55 * rgb).clip(0, 1)


def render_video(
    record: AttentionRecord,
    video: int,
    out_png: Path | str,
    layer: int | None = None,
    renormalise: bool = False,
    gif_path: Path | str | None = None,
    max_frames: int = 8,
) -> Path:
    """A grid for one probe video: the frames, then coarse (static query) and fine (LLM-chosen query)
    heatmaps over them. Colours share one scale per row so frames can be compared."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not 0 <= video < len(record.keys):
        raise UsageError(f"{record.path}: video index {video} out of range (0..{len(record.keys) - 1})")
    frame_ids = np.flatnonzero(record.frame_mask[video])[:max_frames]
    passes = [("coarse", record.coarse)] + ([("fine", record.fine)] if record.fine is not None else [])
    height, width = record.frames.shape[2:4]
    heat = {
        name: [
            upsample_mass(patch_map(attn[video, t], record.grid, layer, renormalise), height, width) for t in frame_ids
        ]
        for name, attn in passes
    }

    n_cols = max(len(frame_ids), 1)
    fig, axes = plt.subplots(
        1 + len(passes), n_cols, figsize=(1.9 * n_cols + 0.8, 2.0 * (1 + len(passes))), squeeze=False
    )
    for col, t in enumerate(frame_ids):
        axes[0, col].imshow(record.frames[video, t])
        axes[0, col].set_title(f"frame {t}", fontsize=9)
        for row, (name, _) in enumerate(passes, start=1):
            maps = heat[name]
            axes[row, col].imshow(_overlay(record.frames[video, t], maps[col], max(m.max() for m in maps)))
            mass = maps[col].sum()
            axes[row, col].set_title(f"{name}: patch mass {mass:.2f}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for row, (name, _) in enumerate(passes, start=1):
        axes[row, 0].set_ylabel(f"{name} query", fontsize=9)
    axes[0, 0].set_ylabel("input", fontsize=9)
    which = "mean over layers and heads" if layer is None else f"layer {layer}, mean over heads"
    scale = "renormalised over patches" if renormalise else "attention mass (CLS dropped)"
    fig.suptitle(f"{record.keys[video]} @ step {record.step}: {which}; {scale}", fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    atomic.save_figure(fig, out_png, dpi=130)
    plt.close(fig)

    if gif_path is not None:
        from PIL import Image

        images = []
        for col, t in enumerate(frame_ids):
            tiles = [
                _overlay(record.frames[video, t], heat[name][col], max(m.max() for m in heat[name]))
                for name, _ in passes
            ]
            images.append(Image.fromarray((np.concatenate(tiles, axis=1) * 255).astype(np.uint8)))
        with atomic.replacing(gif_path, "wb") as handle:
            images[0].save(handle, format="GIF", save_all=True, append_images=images[1:], duration=500, loop=0)
    return out_png
