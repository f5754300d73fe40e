"""Evaluation during training: validation losses, attention entropy, and probe-video attention maps.

`val_loss` is the loss of the model's own default mode: the fine pass for a foveated two-pass model,
the coarse pass for a coarse-only model and the only pass of the multi-token baseline. It leaves
out the lambda-weighted coarse term, so runs with different lambda_coarse stay comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch

from fvlm import atomic
from fvlm import run_folder as rf
from fvlm.data.decode import uint8_pixels
from fvlm.data.loader import boxes_array
from fvlm.model.backbones import model_pixel_stats
from fvlm.model.batch_index import INDEX_KEYS, build_indices
from fvlm.training.dist import Dist

_Batch = TypeVar("_Batch", bound=Mapping[str, Any])


def to_device(batch: _Batch, device: torch.device) -> _Batch:
    """A batch (the model's Batch, or a plain dict) with its tensors on `device`: the same keys."""
    return cast(
        _Batch, {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    )


@dataclass
class ValTally:
    """A validation pass's totals on one rank, summed over ranks before use: token-weighted loss
    sums (mean x tokens) and frame-weighted attention entropy."""

    tokens: float = 0.0
    fine_sum: float = 0.0
    fine_tokens: float = 0.0
    coarse_sum: float = 0.0
    coarse_tokens: float = 0.0
    entropy_sum: float = 0.0
    entropy_frames: float = 0.0


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _in_lockstep(loader: Iterable[_Batch], dist: Dist) -> Iterator[tuple[_Batch, bool]]:
    """(batch, counted) until every rank is out of batches: a rank that runs out first repeats its
    last batch, uncounted, so that every rank runs as many forwards (FSDP2's are collectives)."""
    batches = iter(loader)
    last = None
    while True:
        batch = next(batches, None)
        if not dist.all_sum([float(batch is not None)])[0]:
            return
        if batch is not None:
            last = batch
            yield batch, True
        elif last is None:
            raise RuntimeError(
                f"rank {dist.rank} has no validation batch: train.eval_samples is below the process count"
            )
        else:
            yield last, False


@torch.no_grad()
def validate(model, loader, dist: Dist, autocast: Callable[[], AbstractContextManager], lockstep: bool = False) -> dict:
    """Token-weighted means over this rank's share of the val split, summed over ranks. With
    `lockstep` (a model sharded over ranks) every rank runs the same number of forwards."""
    was_training = model.training
    model.eval()
    local = ValTally()
    batches = _in_lockstep(loader, dist) if lockstep else ((batch, True) for batch in loader)
    for batch, counted in batches:
        batch = to_device(batch, dist.device)
        with autocast():
            out = model(batch, compute_coarse=True)
        if not counted:
            continue
        n = out.n_tokens
        local.tokens += n
        if out.loss_fine is not None:
            local.fine_sum += float(out.loss_fine) * n
            local.fine_tokens += n
        if out.loss_coarse is not None:
            local.coarse_sum += float(out.loss_coarse) * n
            local.coarse_tokens += n
        if out.attention_entropy is not None:
            frames = int(batch["frame_mask"].sum())
            local.entropy_sum += out.attention_entropy * frames
            local.entropy_frames += frames
    model.train(was_training)
    total = dist.sum_tally(local)
    loss_fine = total.fine_sum / total.fine_tokens if total.fine_tokens else None
    loss_coarse = total.coarse_sum / total.coarse_tokens if total.coarse_tokens else None
    return {
        "val_loss": loss_fine if loss_fine is not None else loss_coarse,
        "val_loss_fine": loss_fine,
        "val_loss_coarse": loss_coarse,
        "val_loss_ratio": _ratio(loss_fine, loss_coarse),
        "attention_entropy": total.entropy_sum / total.entropy_frames if total.entropy_frames else None,
    }


@torch.no_grad()
def save_probe_attention(
    model,
    loader,
    n_videos: int,
    step: int,
    run_dir: Path,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    write: bool = True,
) -> Path | None:
    """The encoder query's attention over [CLS + patches] for the first `n_videos` probe videos,
    per layer and head, as `attention/step_NNNNNNN.npz` (the heatmap figure's input). Returns
    None for a model without a query (the multi-token baseline). Without `write` it runs the
    forwards only (a rank of a sharded model, whose forwards the writing rank needs)."""
    was_training = model.training
    model.eval()
    videos: list[dict] = []
    for batch in loader:
        keep = [i for i, kind in enumerate(batch["kinds"]) if kind == "video"][: n_videos - len(videos)]
        if not keep:
            continue
        rows = torch.tensor(keep)
        # The batch's frame and target indices describe all of it: the sub-batch gets its own, built
        # here on the host as collate builds them, so the model finds none itself (a `nonzero` that
        # waits for the device, and under train.compile a graph of data-dependent sizes).
        sub: dict[str, Any] = {
            k: (v[rows] if isinstance(v, torch.Tensor) else [v[i] for i in keep])
            for k, v in batch.items()
            if k not in INDEX_KEYS
        }
        sub.update(build_indices(sub["frame_mask"], sub["loss_mask"]))
        with autocast():
            out = model(to_device(sub, device), return_attention=True)
        if not out.attention:
            model.train(was_training)
            return None
        for j, key in enumerate(sub["keys"]):
            mask = sub["frame_mask"][j]
            videos.append(
                {
                    "key": key,
                    "mask": mask.numpy(),
                    "frames": sub["frames"][j].numpy(),
                    "boxes": (sub.get("mover_boxes") or [None] * len(sub["keys"]))[j],
                    **{name: out.attention[name][j].float().cpu().numpy() for name in out.attention},
                }
            )
        if len(videos) >= n_videos:
            break
    model.train(was_training)
    if not videos or not write:
        return None
    n_frames = max(len(v["mask"]) for v in videos)
    size = videos[0]["frames"].shape[-1]
    patch = model.encoder.dino.config.patch_size

    def stack(name: str) -> np.ndarray:
        first = videos[0][name]
        out = np.zeros((len(videos), n_frames, *first.shape[1:]), dtype=first.dtype)
        for i, video in enumerate(videos):
            out[i, : len(video[name])] = video[name]
        return out

    arrays: dict[str, Any] = {
        "coarse_attn": stack("coarse").astype(np.float32),
        "frames": uint8_pixels(stack("frames").transpose(0, 1, 3, 4, 2), model_pixel_stats(model)),
        "frame_mask": stack("mask").astype(bool),
        "grid": np.array([size // patch, size // patch], dtype=np.int64),
        "keys": np.array([v["key"] for v in videos]),
        "step": np.array(step, dtype=np.int64),
    }
    if "fine" in videos[0]:
        arrays["fine_attn"] = stack("fine").astype(np.float32)
    boxes = boxes_array([v["boxes"] for v in videos], n_frames)
    if boxes is not None:
        arrays["mover_boxes"] = boxes
    path = rf.attention_file(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path, "wb") as f:
        np.savez_compressed(f, **arrays)
    return path
