"""Throughput accounting: samples, visual and text tokens, achieved FLOP/s and MFU per logged interval.

MFU (model FLOPs utilisation) = achieved training FLOP/s / the devices' peak FLOP/s. The achieved
FLOPs come from the exact counter (`fvlm.model.flops.estimate_flops`: forward + backward matmuls of
what a step really runs), evaluated at the interval's mean sample shape. The peak is the dense bf16
tensor-core figure of the GPU, from the vendor's data sheets, and is used only when the run trains
in bf16; anything else (fp32 on a GPU, a CPU, a GPU not in the table) needs `train.peak_flops` and
otherwise leaves MFU blank, because a number against the wrong peak is worse than none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fvlm.config import ModelConfig

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a piece of the device name torch reports.
# Checked in order: the first match wins, so the PCIe H100 comes before the generic H100 (SXM).
BF16_PEAKS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def peak_flops(override: float | None, device_name: str | None, bf16: bool) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if override:
        return float(override), "train.peak_flops"
    if device_name is None:
        return None, "unknown on CPU (set train.peak_flops)"
    if not bf16:
        return None, f"unknown for fp32 on {device_name} (set train.peak_flops)"
    for piece, peak in BF16_PEAKS:
        if piece in device_name:
            return peak, f"bf16 dense peak of {piece}"
    return None, f"{device_name} is not in the peak table (set train.peak_flops)"


@dataclass
class Interval:
    """Totals since the last logged row (all ranks summed)."""

    samples: int = 0
    frames: int = 0
    text_tokens: int = 0
    loss_tokens: int = 0
    seconds: float = 0.0
    data_wait: float = 0.0
    steps: int = 0

    def add(
        self, *, samples: int, frames: int, text_tokens: int, loss_tokens: int, seconds: float, data_wait: float
    ) -> None:
        self.samples += samples
        self.frames += frames
        self.text_tokens += text_tokens
        self.loss_tokens += loss_tokens
        self.seconds += seconds
        self.data_wait += data_wait
        self.steps += 1

    def row(self, model_cfg: ModelConfig, peak: float | None, world_size: int) -> dict[str, float | None]:
        """The steps.csv throughput columns for this interval."""
        from fvlm.model.flops import estimate_flops

        seconds = max(self.seconds, 1e-9)
        visual = self.frames * (model_cfg.tokens_per_frame or 1)
        flops = None
        if self.samples:
            per_sample = estimate_flops(
                model_cfg,
                frames=self.frames / self.samples,
                text_tokens=self.text_tokens / self.samples,
                loss_tokens=self.loss_tokens / self.samples,
            ).per_sample
            flops = per_sample * self.samples / seconds
        row: dict[str, float | None] = {
            "throughput_samples_sec": self.samples / seconds,
            "tokens_per_sec": (visual + self.text_tokens) / seconds,
            "visual_tokens_per_sec": visual / seconds,
            "text_tokens_per_sec": self.text_tokens / seconds,
            "flops_per_sec": flops,
            "mfu": flops / (peak * world_size) if flops is not None and peak else None,
            "data_wait_sec": self.data_wait / max(self.steps, 1),
        }
        return row
