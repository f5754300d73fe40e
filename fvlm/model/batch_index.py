"""The indices a training step needs, built on the host before the batch reaches the device.

Which frames are real and which text tokens are targets is data: finding them on the device
(`frames[frame_mask]`, `loss_mask.nonzero()`) makes the host wait for the device, and gives every
batch tensors of a new size. The loader's collate builds them instead, from the CPU masks, as plain
integer index tensors the model gathers and scatters with (`index_select`, `gather`): no sync, and
under `torch.compile` no data-dependent shape. A batch made elsewhere (evaluation, a test) may leave
them out; the model then builds them itself from the masks, on their device (eager use only).

Keys a batch gains (see `fvlm.model.vlm.Batch`):
- `frame_rows` [N] long: the flat slot (b * T + t) of each frame DINO encodes, batch-major. With
  `static` the list is padded to the shape ladder with copies of its last slot: DINO encodes them
  too and the scatter never reads them, so the padding changes no result, only the shape.
- `target_rows`, `target_cols` [M] long: sample and text column of each loss target; `target_weight`
  [M] float, 1 for a target and 0 for padding (padding points at column 0 of sample 0).
- `n_targets`: the number of targets that count (a Python int, read by the trainer on the host).

A target counts when some real position precedes it: a text column above 0, or column 0 after at
least one real frame (the model checks the same on the device: `target_weight` stays the host's
promise, the model's own check makes a wrong promise harmless).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

INDEX_KEYS = ("frame_rows", "target_rows", "target_cols", "target_weight", "n_targets")


def bucket(value: int, cap: int | None = None) -> int:
    """`value` rounded up to the shape ladder of `train.static_shapes`: exact up to 8, then four steps
    per octave (9-16 by 2, 17-32 by 4, 33-64 by 8, ...: 10, 12, 14, 16, 20, 24, 28, 32, 40, ...), so
    padding adds less than a quarter, and a size takes one of a few dozen values over three decades.
    At most `cap` (a size the data never exceeds) when `value` fits under it."""
    step = 1 << max(0, (value - 1).bit_length() - 3) if value > 8 else 1
    rounded = -(-value // step) * step
    return min(rounded, cap) if cap is not None and value <= cap else rounded


def frame_rows(frame_mask: torch.Tensor, pad_to: int | None = None) -> torch.Tensor:
    """The flat slots of the real frames (a `nonzero`: host tensors only, or eager use)."""
    rows = frame_mask.reshape(-1).nonzero().squeeze(1)
    if pad_to is not None and pad_to > rows.numel():
        fill = rows[-1] if rows.numel() else rows.new_zeros(())
        rows = torch.cat([rows, fill.expand(pad_to - rows.numel())])
    return rows


def counted_targets(frame_mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the loss targets that have a real position before them."""
    counted = loss_mask.bool().clone()
    if counted.shape[1]:
        counted[:, 0] &= frame_mask.any(dim=1)
    return counted


@dataclass(frozen=True)
class StaticShapes:
    """`train.static_shapes`: collate pads every size of a batch to the shape ladder (`bucket`): frames
    per sample (at most `max_frames`), text length (at most `max_text`), and the frame and target
    lists. The data's own caps keep the ladder from padding past what a batch can hold."""

    max_frames: int
    max_text: int


def build_indices(
    frame_mask: torch.Tensor, loss_mask: torch.Tensor, static: bool = False
) -> dict[str, torch.Tensor | int]:
    """Every key above from the two masks. `static` pads the frame and target lists to the shape
    ladder (`bucket`): a few dozen shapes over a run instead of one per batch, so that a captured
    CUDA graph can be replayed (`train.static_shapes`)."""
    rows = frame_rows(frame_mask)
    if static and rows.numel():
        rows = frame_rows(frame_mask, bucket(rows.numel(), frame_mask.numel()))
    counted = counted_targets(frame_mask, loss_mask)
    t_rows, t_cols = counted.nonzero(as_tuple=True)
    n = t_rows.numel()
    padded = bucket(max(n, 1), loss_mask.numel()) if static else n
    weight = torch.zeros(padded, dtype=torch.float32, device=loss_mask.device)
    weight[:n] = 1.0
    pad = padded - n
    return {
        "frame_rows": rows,
        "target_rows": torch.cat([t_rows, t_rows.new_zeros(pad)]),
        "target_cols": torch.cat([t_cols, t_cols.new_zeros(pad)]),
        "target_weight": weight,
        "n_targets": n,
    }


@dataclass(frozen=True)
class FrameIndex:
    """Where the encoded frames come from and go back to: `rows` [N] (flat slots, see above) and
    `slot` [B, T] (each slot's row among the N, meaningful where `mask` is set)."""

    mask: torch.Tensor
    rows: torch.Tensor
    slot: torch.Tensor

    @staticmethod
    def of(frame_mask: torch.Tensor, rows: torch.Tensor | None = None) -> FrameIndex:
        """From a batch's `frame_rows` when it has them, else found from the mask (a sync)."""
        if rows is None:
            rows = frame_rows(frame_mask)
        # A real slot's row is the number of real slots before it: a running count, no sync.
        slot = (frame_mask.reshape(-1).long().cumsum(0) - 1).clamp_min(0).view(frame_mask.shape)
        return FrameIndex(frame_mask, rows, slot)

    @property
    def empty(self) -> bool:
        """No frame to encode: a shape, so no sync. Under torch.compile, a count found by `nonzero`
        (a batch without host indices) has no value to branch on; it is taken as not empty."""
        from torch.fx.experimental.symbolic_shapes import guard_or_false

        return guard_or_false(self.rows.shape[0] == 0)

    def gather(self, per_slot: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> the encoded frames' rows [N, ...]."""
        return per_slot.flatten(0, 1).index_select(0, self.rows)

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """Rows [N, ...] back to [B, T, ...], zeros where no frame is."""
        from torch.fx.experimental.symbolic_shapes import guard_or_false

        b, t = self.mask.shape
        if guard_or_false(values.shape[0] == 0):
            return values.new_zeros(b, t, *values.shape[1:])
        out = values.index_select(0, self.slot.reshape(-1).clamp_max(values.shape[0] - 1))
        out = out.view(b, t, *values.shape[1:])
        keep = self.mask.view(b, t, *([1] * (values.ndim - 1)))
        return torch.where(keep, out, out.new_zeros(()))


@dataclass(frozen=True)
class Targets:
    """The loss targets of a batch's text (see the module docstring)."""

    rows: torch.Tensor
    cols: torch.Tensor
    weight: torch.Tensor

    @staticmethod
    def of_masks(frame_mask: torch.Tensor | None, loss_mask: torch.Tensor) -> Targets:
        """Found from the masks (a sync). Without a frame mask, column 0 counts only if the model's
        own check finds a real position before it."""
        counted = loss_mask.bool() if frame_mask is None else counted_targets(frame_mask, loss_mask)
        rows, cols = counted.nonzero(as_tuple=True)
        return Targets(rows, cols, torch.ones(rows.shape[0], device=loss_mask.device))


def random_padded_batch(
    g: torch.Generator, b: int, t: int, length: int, size: int, static: bool = False
) -> dict[str, Any]:
    """A batch shaped as the loader's collate makes them, with random content (benchmarks): each
    sample a random number of real frames (1..t, valid first, the rest zero), a random text length
    (length/2..length, right-padded), targets a random run of its text, and the indices above
    (`static`: padded to the shape ladder, as `train.static_shapes` pads them)."""
    frames_per = torch.randint(1, t + 1, (b,), generator=g)
    text_per = torch.randint(length // 2, length + 1, (b,), generator=g)
    frame_mask = torch.arange(t)[None, :] < frames_per[:, None]
    attention_mask = (torch.arange(length)[None, :] < text_per[:, None]).long()
    start = torch.randint(1, length // 2, (b,), generator=g)
    loss_mask = attention_mask.bool() & (torch.arange(length)[None, :] >= start[:, None])
    batch: dict[str, Any] = {
        "frames": torch.randn(b, t, 3, size, size, generator=g) * frame_mask[:, :, None, None, None],
        "frame_mask": frame_mask,
        "input_ids": torch.randint(4, 250, (b, length), generator=g) * attention_mask,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
    }
    batch.update(build_indices(frame_mask, loss_mask, static=static))
    return batch
