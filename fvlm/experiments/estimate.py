"""How long a sweep will take: training throughput measured on this machine for every distinct
model of the matrix (a few steps on a random batch of the preset's average sample), or, where the
models are too large for this machine's CPU, the planned FLOPs at an assumed GPU utilisation.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from fvlm.config import RunConfig
from fvlm.experiments.presets import Preset

# Per run, on top of training: building the model and loaders and writing the last files.
RUN_OVERHEAD_SEC = 3.0
# An evaluation runs fine + coarse forward passes (no backward) over eval_samples, plus the probe videos.
EVAL_COST_PER_SAMPLE = 0.7
MEASURE_MAX_PARAMS = 50e6  # larger models are not timed on a CPU


def measure_samples_per_sec(cfg: RunConfig, frames: int, text: int, steps: int = 3) -> float:
    """Training samples per second of `cfg`'s model at its batch size on this machine's device."""
    import torch

    from fvlm.model.build import build_model
    from fvlm.training.optim import build_optimizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if device.type == "cpu" and cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    try:
        torch.manual_seed(0)
        model = build_model(cfg.model).to(device)
        model.train()
        optimizer = build_optimizer(model, cfg.optim)
        b, size = cfg.train.batch_size, cfg.model.image_size
        batch = {
            "frames": torch.randn(b, frames, 3, size, size, device=device),
            "frame_mask": torch.ones(b, frames, dtype=torch.bool, device=device),
            "input_ids": torch.randint(4, 250, (b, text), device=device),
            "attention_mask": torch.ones(b, text, dtype=torch.long, device=device),
            "loss_mask": torch.ones(b, text, dtype=torch.bool, device=device),
        }
        bf16 = device.type == "cuda" and cfg.train.precision in ("auto", "bf16")

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(batch, compute_coarse=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return b * steps / (time.perf_counter() - began)
    finally:
        torch.set_num_threads(threads)


def _model_key(cfg: RunConfig) -> str:
    return json.dumps([cfg.model.__dict__, cfg.train.batch_size, cfg.train.cpu_threads], sort_keys=True, default=str)


def estimate(planned: list, preset: Preset, jobs: int, measure: bool = True) -> dict[str, Any]:
    """Per-run and total time estimates for a list of runner.Planned."""
    import torch

    from fvlm.model.flops import count_params

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    largest = max((count_params(p.cfg.model)["total"] for p in planned), default=0)
    can_measure = measure and (gpus > 0 or largest <= MEASURE_MAX_PARAMS)
    frames, text = preset.sample_shape
    speed: dict[str, float] = {}
    rows = []
    for p in planned:
        t = p.cfg.train
        steps = max(1, math.ceil(p.spec.samples / (t.batch_size * t.grad_accum)))
        evals = math.ceil(steps / t.eval_every) if t.eval_every else 0
        row = {"run_id": p.spec.run_id, "samples": p.spec.samples, "flops": p.spec.samples * p.flops_per_sample,
               "flops_per_sample": p.flops_per_sample}
        if can_measure:
            key = _model_key(p.cfg)
            if key not in speed:
                speed[key] = measure_samples_per_sec(p.cfg, frames, text)
            sps = speed[key] * max(1, gpus)
            eval_samples = evals * (t.eval_samples + t.probe_videos) * EVAL_COST_PER_SAMPLE
            row["seconds"] = RUN_OVERHEAD_SEC + (p.spec.samples + eval_samples) / sps
            row["samples_per_sec"] = sps
        else:
            # The plan's machine at an assumed model FLOP utilisation; evaluation adds its share.
            rate = preset.gpus * preset.gpu_peak_flops * preset.assumed_mfu
            eval_flops = evals * (t.eval_samples + t.probe_videos) * p.flops_per_sample * EVAL_COST_PER_SAMPLE / 3
            row["seconds"] = (row["flops"] + eval_flops) / rate
        rows.append(row)
    total = sum(r["seconds"] for r in rows)
    if can_measure:
        device = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else f"this CPU, {jobs} run(s) side by side"
        basis = f"measured training throughput on {device}"
        wall = total / (1 if gpus else max(1, jobs))
        gpu_hours = total * gpus / 3600 if gpus else None
    else:
        basis = (f"planned FLOPs on {preset.gpus} x {preset.gpu_name} at {preset.assumed_mfu:.0%} of "
                 f"{preset.gpu_peak_flops / 1e12:.0f} TFLOP/s bf16 peak (assumed: too large to time on this CPU)")
        wall = total
        gpu_hours = total * preset.gpus / 3600
    out = {"rows": rows, "basis": basis, "total_run_seconds": total, "wall_seconds": wall,
           "total_flops": sum(r["flops"] for r in rows)}
    if gpu_hours is not None:
        out["gpu_hours"] = gpu_hours
        out["cost_usd"] = gpu_hours * preset.gpu_hour_cost
        out["cost_basis"] = f"${preset.gpu_hour_cost:.2f} per GPU-hour"
    return out


def fmt_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"
