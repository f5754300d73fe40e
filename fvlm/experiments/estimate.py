"""How long a sweep will take: training throughput measured on this machine for every distinct
model of the matrix (a few steps on a random batch of the preset's average sample), or, where the
models are too large for this machine's CPU, the planned FLOPs on the preset's GPUs at a model FLOP
utilisation (MFU) that is measured where a measurement exists and assumed where none does.

Measured MFU comes from two places, for the same model shape (LLM and architecture) on the same GPU
kind as the preset's: `benchmarks/mfu_measured.json` in the repository (written by
`benchmarks/gpu_check.py`), and finished runs of the sweep itself (`run_summary.json` records the
device and the run's MFU).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from fvlm import run_folder as rf
from fvlm.config import RunConfig
from fvlm.errors import parse_json, parse_yaml
from fvlm.experiments.presets import Preset

# Per run, on top of training: building the model and loaders and writing the last files.
RUN_OVERHEAD_SEC = 3.0
# An evaluation runs fine + coarse forward passes (no backward) over eval_samples, plus the probe videos.
EVAL_COST_PER_SAMPLE = 0.7
MEASURE_MAX_PARAMS = 50e6  # larger models are not timed on a CPU
MEASURED_MFU_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "mfu_measured.json"


def gpu_kind(name: str) -> str | None:
    """The peak-table family of a GPU name ("NVIDIA H100 80GB HBM3" -> "H100")."""
    from fvlm.training.throughput import BF16_PEAKS

    return next((piece for piece, _ in BF16_PEAKS if piece in name), None)


def _shape_key(model_cfg) -> tuple[str, str]:
    return Path(str(model_cfg.llm)).name, model_cfg.arch


def measured_mfu(
    gpu_name: str, folders: list[Path], bench_file: Path = MEASURED_MFU_FILE
) -> dict[tuple[str, str], tuple[float, str]]:
    """{(llm shape, arch): (MFU, where it was measured)} for the GPU kind of `gpu_name`: finished runs
    under `folders` first (they are this sweep's own), then the benchmark file."""
    kind = gpu_kind(gpu_name)
    found: dict[tuple[str, str], tuple[float, str]] = {}
    if kind is None:
        return found
    if bench_file.is_file():
        try:
            records = parse_json(bench_file.read_bytes())
        except ValueError:
            records = []
        for r in records if isinstance(records, list) else []:
            if isinstance(r, dict) and r.get("mfu") and gpu_kind(str(r.get("device", ""))) == kind:
                found[(str(r.get("llm")), str(r.get("arch")))] = (float(r["mfu"]), f"{bench_file.name} ({r['device']})")
    for folder in folders:
        for summary_path in sorted(Path(folder).glob("*/run_summary.json")):
            try:
                summary = parse_json(summary_path.read_bytes())
                rate = summary.get("throughput") or {}
                model = _saved_model(summary_path.parent)
            except (ValueError, OSError, AttributeError):
                continue
            if model and rate.get("mfu") and gpu_kind(str(rate.get("device", ""))) == kind:
                found[model] = (float(rate["mfu"]), f"run {summary_path.parent.name} ({rate['device']})")
    return found


def _saved_model(run_dir: Path) -> tuple[str, str] | None:
    import yaml

    try:
        model = (parse_yaml((run_dir / rf.CONFIG).read_text(encoding="utf-8")) or {}).get("model") or {}
    except (OSError, ValueError, yaml.YAMLError, AttributeError):
        return None
    return (Path(str(model.get("llm", ""))).name, str(model.get("arch", "foveated"))) if model else None


def measure_samples_per_sec(cfg: RunConfig, frames: int, text: int, steps: int = 3) -> float:
    """Training samples per second of `cfg`'s model at its batch size on this machine's device."""
    import torch

    from fvlm.model.build import build_model
    from fvlm.training import precision as prec
    from fvlm.training.optim import build_optimizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if device.type == "cpu" and cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    try:
        torch.manual_seed(0)
        model = build_model(cfg.model).to(device)
        model.train()
        mode = prec.resolve(cfg.train.precision, device)
        trainable = [p for params in model.param_groups().values() for p in params]
        masters = prec.MasterWeights(model, trainable) if mode == "bf16" else None
        optimizer = build_optimizer(model, cfg.optim, masters)
        b, size = cfg.train.batch_size, cfg.model.image_size
        batch = {
            "frames": torch.randn(b, frames, 3, size, size, device=device),
            "frame_mask": torch.ones(b, frames, dtype=torch.bool, device=device),
            "input_ids": torch.randint(4, 250, (b, text), device=device),
            "attention_mask": torch.ones(b, text, dtype=torch.long, device=device),
            "loss_mask": torch.ones(b, text, dtype=torch.bool, device=device),
        }

        def step() -> None:
            with prec.autocast(mode, device):
                loss = model(batch, compute_coarse=False).loss
            loss.backward()
            if masters is not None:
                masters.accumulate_grads()
            optimizer.step()
            if masters is not None:
                masters.publish()
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
    return json.dumps(
        [cfg.model.__dict__, cfg.train.batch_size, cfg.train.cpu_threads, cfg.train.precision],
        sort_keys=True,
        default=str,
    )


def estimate(
    planned: list,
    preset: Preset,
    jobs: int,
    measure: bool = True,
    folders: list[Path] | None = None,
    bench_file: Path = MEASURED_MFU_FILE,
) -> dict[str, Any]:
    """Per-run and total time estimates for a list of runner.Planned; `folders` are sweep folders
    whose finished runs may have measured MFU."""
    import torch

    from fvlm.model.flops import count_params

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    largest = max((count_params(p.cfg.model)["total"] for p in planned), default=0)
    can_measure = measure and (gpus > 0 or largest <= MEASURE_MAX_PARAMS)
    frames, text = preset.sample_shape
    speed: dict[str, float] = {}
    mfu = {} if can_measure else measured_mfu(preset.gpu_name, folders or [], bench_file)
    rows = []
    for p in planned:
        t = p.cfg.train
        steps = max(1, math.ceil(p.spec.samples / (t.batch_size * t.grad_accum)))
        evals = math.ceil(steps / t.eval_every) if t.eval_every else 0
        row = {
            "run_id": p.spec.run_id,
            "samples": p.spec.samples,
            "flops": p.spec.samples * p.flops_per_sample,
            "flops_per_sample": p.flops_per_sample,
        }
        if can_measure:
            key = _model_key(p.cfg)
            if key not in speed:
                speed[key] = measure_samples_per_sec(p.cfg, frames, text)
            sps = speed[key] * max(1, gpus)
            eval_samples = evals * (t.eval_samples + t.probe_videos) * EVAL_COST_PER_SAMPLE
            row["seconds"] = RUN_OVERHEAD_SEC + (p.spec.samples + eval_samples) / sps
            row["samples_per_sec"] = sps
        else:
            # The plan's machine at the measured (else assumed) MFU; evaluation adds its share.
            utilisation, source = mfu.get(_shape_key(p.cfg.model), (preset.assumed_mfu, "assumed"))
            rate = preset.gpus * preset.gpu_peak_flops * utilisation
            eval_flops = evals * (t.eval_samples + t.probe_videos) * p.flops_per_sample * EVAL_COST_PER_SAMPLE / 3
            row["seconds"] = (row["flops"] + eval_flops) / rate
            row["mfu"], row["mfu_source"] = utilisation, source
        rows.append(row)
    total = sum(r["seconds"] for r in rows)
    if can_measure:
        device = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else f"this CPU, {jobs} run(s) side by side"
        basis = f"measured training throughput on {device}"
        wall = total / (1 if gpus else max(1, jobs))
        gpu_hours = total * gpus / 3600 if gpus else None
    else:
        measured = sorted({r["mfu_source"] for r in rows if r["mfu_source"] != "assumed"})
        assumed = sum(r["mfu_source"] == "assumed" for r in rows)
        parts = []
        if measured:
            parts.append(
                f"{len(rows) - assumed} run(s) at MFU measured on {preset.gpu_name}-class GPUs ({'; '.join(measured)})"
            )
        if assumed:
            parts.append(
                f"{assumed} run(s) at an assumed {preset.assumed_mfu:.0%} MFU (no measurement for their "
                f"model shape on a {gpu_kind(preset.gpu_name) or preset.gpu_name}; run benchmarks/gpu_check.py)"
            )
        basis = (
            f"planned FLOPs on {preset.gpus} x {preset.gpu_name} ({preset.gpu_peak_flops / 1e12:.0f} TFLOP/s "
            f"bf16 peak; too large to time on this CPU): " + ", ".join(parts)
        )
        wall = total
        gpu_hours = total * preset.gpus / 3600
    out = {
        "rows": rows,
        "basis": basis,
        "total_run_seconds": total,
        "wall_seconds": wall,
        "total_flops": sum(r["flops"] for r in rows),
    }
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
