"""Decision 3 of the plan, derived from Decisions 1-2: the full pipeline's training schedule.

- Stage 1 samples: where the chosen size's data-scaling curve plateaus (the per-size fit's D at
  which doubling the data gains less than the eval noise).
- Stage 2 and 3 samples: stage 1's times the stage proportions of SmolVLM2's recipe, an input
  (`stage2_ratio`, `stage3_ratio`) since the project holds no copy of that recipe to read them from.
- GPU-hours and cost: samples x the exact FLOPs per sample the chosen size's runs recorded, on the
  plan's GPUs at the MFU measured for that model shape (benchmarks/mfu_measured.json or finished
  runs, as the sweep estimate reads it), else an assumed MFU; priced per GPU-hour.
- Whether 2 GPUs suffice: the whole pipeline within `max_wall_days` on `gpus` GPUs and within the
  `budget_usd` left for it.

Every assumption is a named field of `ScheduleInputs`, shown in the report and overridable with
`fvlm analyze --schedule key=value`. A missing input makes the answers that need it "unknown",
naming it; nothing falls back to a default quietly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fvlm.errors import UsageError
from fvlm.experiments.presets import PAPER


@dataclass(frozen=True)
class ScheduleInputs:
    gpus: int = PAPER.gpus
    gpu_name: str = PAPER.gpu_name
    gpu_peak_flops: float = PAPER.gpu_peak_flops  # bf16 dense, per GPU
    mfu: float | None = None  # None: measured for the chosen shape where a measurement exists
    assumed_mfu: float = PAPER.assumed_mfu  # where none does
    gpu_hour_cost: float = PAPER.gpu_hour_cost
    stage2_ratio: float | None = None  # stage 2 samples / stage 1 samples (SmolVLM2's proportions)
    stage3_ratio: float | None = None  # stage 3 samples / stage 1 samples
    budget_usd: float = 360.0  # what the plan leaves for the full 3-stage training after Phase 1
    max_wall_days: float = 7.0
    size: str | None = None  # the model size to schedule; None: Decision 2's compute-optimal size


def parse_inputs(items: list[str]) -> ScheduleInputs:
    """`key=value` strings (fvlm analyze --schedule) -> ScheduleInputs; a bad key or value is a
    one-line UsageError naming it."""
    fields = {f.name: f for f in dataclasses.fields(ScheduleInputs)}
    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise UsageError(f"--schedule {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        if key in ("gpu_name", "size"):
            values[key] = text.strip()
            continue
        try:
            number = float(text)
        except ValueError:
            raise UsageError(f"--schedule {key}: not a number: {text!r}") from None
        if not math.isfinite(number) or number <= 0:
            raise UsageError(f"--schedule {key}: must be a positive number, got {text!r}")
        values[key] = int(number) if key == "gpus" else number
    if "gpus" in values and values["gpus"] < 1:
        raise UsageError("--schedule gpus: must be >= 1")
    if "mfu" in values and values["mfu"] > 1:
        raise UsageError(f"--schedule mfu: a fraction of the peak (0-1], got {values['mfu']}")
    return ScheduleInputs(**values)


def _chosen_size(fits: dict[str, Any], inputs: ScheduleInputs) -> tuple[str | None, str]:
    per_size = fits.get("per_size_fits", {})
    if inputs.size:
        if inputs.size not in per_size:
            return None, f"size {inputs.size} has no per-size fit (sizes: {', '.join(per_size) or 'none'})"
        return inputs.size, "given (--schedule size=...)"
    interior = {k: b for k, b in fits.get("iso_flop", {}).get("budgets", {}).items() if b.get("interior")}
    sized = {s: f["N"] for s, f in per_size.items() if f.get("N")}
    if not interior or not sized:
        return None, (
            "no compute-optimal size: no FLOP budget has an interior iso-FLOP minimum (Decision 2); "
            "give one with --schedule size=<size>"
        )
    largest = max(interior.values(), key=lambda b: b["C"])
    size = min(sized, key=lambda s: abs(math.log(sized[s] / largest["N_star"])))
    return size, f"nearest grid size to N* = {largest['N_star']:.3g} at the largest budget with an interior minimum"


def _flops_per_sample(runs, size: str) -> tuple[float | None, bool, Any]:
    """Median exact FLOPs per sample recorded by the chosen size's foveated runs (estimated for
    exported runs, which record none), and one such run (its model shape keys the MFU)."""
    mine = [r for r in runs if r.model_size == size and r.arch == "foveated" and r.flops_per_sample]
    if not mine:
        return None, True, None
    return float(np.median([r.flops_per_sample for r in mine])), any(r.flops_estimated for r in mine), mine[0]


def _mfu(run, inputs: ScheduleInputs, folders: list[Path]) -> tuple[float, str]:
    from fvlm.experiments.estimate import measured_mfu

    if inputs.mfu is not None:
        return inputs.mfu, "given (--schedule mfu=...)"
    model = (run.config or {}).get("model") if run is not None else None
    if model:
        key = (Path(str(model.get("llm", ""))).name, str(model.get("arch", "foveated")))
        found = measured_mfu(inputs.gpu_name, folders).get(key)
        if found:
            return found[0], f"measured: {found[1]}"
    return inputs.assumed_mfu, f"assumed (no measurement for this model shape on {inputs.gpu_name})"


def decision3(runs, fits: dict[str, Any], inputs: ScheduleInputs, folders: list[Path] | None = None) -> dict[str, Any]:
    """Decision 3 as a record: {inputs, size, stages {1,2,3: samples or None}, gpu_hours, cost_usd,
    wall_days, two_gpus: yes|no|unknown, rows [{question, answer}], missing [names]}."""
    out: dict[str, Any] = {"inputs": dataclasses.asdict(inputs), "missing": []}
    size, why = _chosen_size(fits, inputs)
    out.update(size=size, size_basis=why)
    stage1 = None
    if size is None:
        out["missing"].append("model size: " + why)
    else:
        fit = fits["per_size_fits"][size]
        plateau = fit.get("D_plateau")
        if not fit.get("identified"):
            out["missing"].append(f"stage 1 samples: the {size} data-scaling fit is not identified")
        elif not plateau or not math.isfinite(plateau):
            out["missing"].append(
                f"stage 1 samples: the {size} data-scaling fit reaches no plateau in reach "
                "(doubling D always gains more than the eval noise)"
            )
        else:
            stage1 = float(plateau)
    stages: dict[str, float | None] = {"1": stage1}
    for stage, ratio in (("2", inputs.stage2_ratio), ("3", inputs.stage3_ratio)):
        stages[stage] = stage1 * ratio if stage1 is not None and ratio is not None else None
        if ratio is None:
            out["missing"].append(
                f"stage {stage} samples: SmolVLM2's stage {stage} : stage 1 proportion "
                f"(--schedule stage{stage}_ratio=...)"
            )
    out["stages"] = stages
    fps, estimated, run = _flops_per_sample(runs, size) if size else (None, True, None)
    if size and fps is None:
        out["missing"].append(f"FLOPs per sample: no foveated run of size {size}")
    mfu, mfu_source = _mfu(run, inputs, folders or [])
    out.update(flops_per_sample=fps, flops_estimated=estimated, mfu=mfu, mfu_source=mfu_source)
    per_gpu = inputs.gpu_peak_flops * mfu
    hours = {k: v * fps / per_gpu / 3600 if v is not None and fps else None for k, v in stages.items()}
    out["gpu_hours_by_stage"] = hours
    complete = all(h is not None for h in hours.values())
    if complete:
        total = sum(h for h in hours.values() if h is not None)
        wall_days = total / inputs.gpus / 24
        cost = total * inputs.gpu_hour_cost
        fits_time, fits_money = wall_days <= inputs.max_wall_days, cost <= inputs.budget_usd
        out.update(gpu_hours=total, cost_usd=cost, wall_days=wall_days)
        if fits_time and fits_money:
            out["two_gpus"] = "yes"
        elif not fits_money:
            out["two_gpus"] = "no"
            out["two_gpus_why"] = f"${cost:,.0f} exceeds the ${inputs.budget_usd:,.0f} budget on any GPU count"
        else:
            needed = math.ceil(total / 24 / inputs.max_wall_days)
            out["two_gpus"] = "no"
            out["two_gpus_why"] = (
                f"{wall_days:.1f} days on {inputs.gpus} GPUs > {inputs.max_wall_days:g}; {needed} GPUs would fit"
            )
    else:
        out["two_gpus"] = "unknown"
    out["rows"] = _rows(out, inputs)
    return out


def _num(value: float | None, unit: str = "") -> str:
    return "unknown" if value is None else f"{value:,.3g}{unit}"


def _rows(d: dict[str, Any], inputs: ScheduleInputs) -> list[dict[str, str]]:
    missing = "; ".join(d["missing"])
    stage1 = d["stages"]["1"]
    rows = [
        {
            "question": "Model size",
            "answer": f"{d['size']} ({d['size_basis']})" if d["size"] else f"unknown: {d['size_basis']}",
        },
        {
            "question": "Stage 1 samples (data-scaling plateau)",
            "answer": _num(stage1)
            if stage1 is not None
            else "unknown: " + next((m for m in d["missing"] if m.startswith(("stage 1", "model size"))), missing),
        },
    ]
    for stage in ("2", "3"):
        ratio = getattr(inputs, f"stage{stage}_ratio")
        value = d["stages"][stage]
        rows.append(
            {
                "question": f"Stage {stage} samples (SmolVLM2 proportions)",
                "answer": f"{_num(value)} ({ratio:g} x stage 1)"
                if value is not None
                else "unknown: needs "
                + (
                    "stage 1 samples"
                    if ratio is not None
                    else f"SmolVLM2's stage {stage} : stage 1 proportion (--schedule stage{stage}_ratio=...)"
                ),
            }
        )
    basis = (
        f"{inputs.gpu_name} at {inputs.gpu_peak_flops / 1e12:.0f} TFLOP/s x MFU {d['mfu']:.0%} ({d['mfu_source']}), "
        f"{_num(d['flops_per_sample'])} FLOPs per sample"
        + (" (estimated: 2 x N x 500 tokens)" if d["flops_estimated"] else " (exact counter, from the runs)")
        + f", ${inputs.gpu_hour_cost:.2f} per GPU-hour"
    )
    by_stage = ", ".join(f"stage {k}: {_num(v)}" for k, v in d["gpu_hours_by_stage"].items())
    if "gpu_hours" in d:
        rows.append(
            {
                "question": "Total GPU-hours and cost (full pipeline)",
                "answer": f"{d['gpu_hours']:,.1f} GPU-hours ({by_stage}), ${d['cost_usd']:,.0f}; {basis}",
            }
        )
    else:
        rows.append(
            {
                "question": "Total GPU-hours and cost (full pipeline)",
                "answer": f"unknown: needs {missing} (GPU-hours so far: {by_stage}); {basis}",
            }
        )
    if d["two_gpus"] == "unknown":
        two = "unknown: needs the total GPU-hours"
    else:
        two = (
            f"**{d['two_gpus']}**: {d['wall_days']:.1f} days wall on {inputs.gpus} GPUs (limit "
            f"{inputs.max_wall_days:g}), ${d['cost_usd']:,.0f} of ${inputs.budget_usd:,.0f}"
            + (f"; {d['two_gpus_why']}" if d.get("two_gpus_why") else "")
        )
    rows.append({"question": f"Do {inputs.gpus} GPUs suffice?", "answer": two})
    return rows
