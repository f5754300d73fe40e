"""Foveated vs multi-token baseline, cell by cell of the scaling grid, and whether the gap grows with size.

A cell is one (size, budget) of the grid: its foveated run `<size>-<budget>-F`, its iso-sample
baseline `<size>-<budget>-B` (the same samples, so more FLOPs) and, where the grid has one, its
iso-FLOP baseline `<size>-<budget>-B-isoflop` (the same FLOPs, so fewer samples). Only these runs
are compared, each with its own partner: never an ablation on another data mix or stage, never the
best of several runs, never a curve read outside the samples it covers.

Each run's value is the end of its curve, smoothed by a quadratic in log samples over the curve's
tail (the fit the ablation questions judge their noise with); its uncertainty is a residual
bootstrap of that fit. The two runs of a comparison are resampled independently: run folders keep
no per-item validation losses, so the pairing the shared validation set would allow is not
available, and the interval is the wider, unpaired one. Where seed replicates measured the training
noise (fvlm.analysis.noise), each arm also gets a draw of it: the interval, and the slope across
sizes built from the same draws, then cover a second training run as well as the evaluation.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from fvlm.analysis.ablations import MIN_TAIL_POINTS, TAIL_FRACTION
from fvlm.analysis.table import Run, Table
from fvlm.eval.stats import N_BOOT

_CELL_RE = re.compile(r"^(?P<size>.+)-(?P<budget>C\d+)-(?P<arm>F|B|B-isoflop)$")
_ARM_ARCH = {"F": "foveated", "B": "multi_token", "B-isoflop": "multi_token"}
# Runs that stopped before their budget do not stand for it.
_FINISHED = ("completed", "unknown")
# Iso-sample partners must have seen the same samples; iso-FLOP partners the same FLOPs. Sample
# counts are rounded to whole batches, hence the tolerances.
SAME_SAMPLES_TOLERANCE = 0.05
SAME_FLOPS_TOLERANCE = 0.15


def end_value(run: Run, n_boot: int, rng: np.random.Generator) -> tuple[float, np.ndarray | None]:
    """(smoothed last value of the val-loss curve, bootstrap draws of it or None when the curve has
    too few evals for a tail fit with residual degrees of freedom)."""
    x, y = run.col("samples_seen"), run.col("val_loss")
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y = x[keep], y[keep]
    if len(x) < MIN_TAIL_POINTS + 1:
        return (float(y[-1]) if len(y) else math.nan), None
    m = max(MIN_TAIL_POINTS, int(math.ceil(len(x) * TAIL_FRACTION)))
    design = np.vander(np.log(x[-m:]), 3)
    coef, *_ = np.linalg.lstsq(design, y[-m:], rcond=None)
    fitted = design @ coef
    # Residuals shrink by the parameters fitted to them; rescaled so the bootstrap spread is unbiased.
    resid = (y[-m:] - fitted) * math.sqrt(m / (m - 3))
    resampled = fitted[None, :] + resid[rng.integers(0, m, size=(n_boot, m))]
    boot_coef, *_ = np.linalg.lstsq(design, resampled.T, rcond=None)
    return float(fitted[-1]), design[-1] @ boot_coef


def _difference(
    baseline: Run, foveated: Run, n_boot: int, rng: np.random.Generator, model: Any = None
) -> dict[str, Any]:
    """Advantage = baseline loss - foveated loss (positive: the foveated model is ahead). With a
    training-noise model (fvlm.analysis.noise), each arm's bootstrap draws get a draw of its training
    run's deviation as well, so that the interval covers a second seed of either arm."""
    b_val, b_draws = end_value(baseline, n_boot, rng)
    f_val, f_draws = end_value(foveated, n_boot, rng)
    out: dict[str, Any] = {"baseline_loss": b_val, "foveated_loss": f_val, "advantage": b_val - f_val}
    if b_draws is None or f_draws is None:
        short = [r.run_id for r, d in ((baseline, b_draws), (foveated, f_draws)) if d is None]
        out.update(
            ci95=None, draws=None, verdict=f"noise unknown ({', '.join(short)}: fewer than {MIN_TAIL_POINTS + 1} evals)"
        )
        return out
    draws = b_draws - f_draws
    lo, hi = (float(v) for v in np.percentile(draws, [2.5, 97.5]))
    eval_verdict = "foveated ahead" if lo > 0 else "baseline ahead" if hi < 0 else "within noise"
    b_floor, f_floor = (model.floor("val_loss", r.run_id) if model is not None else None for r in (baseline, foveated))
    out.update(ci95_eval=[lo, hi], eval_verdict=eval_verdict)
    if b_floor is not None and f_floor is not None:
        draws = draws + b_floor.draws(len(draws), rng) - f_floor.draws(len(draws), rng)
        lo, hi = (float(v) for v in np.percentile(draws, [2.5, 97.5]))
        out["training_noise"] = {
            "sd_per_run": [b_floor.sd, f_floor.sd],
            "sources": sorted({b_floor.source, f_floor.source}),
        }
    else:
        out["training_noise"] = "not measured (no seed replicates): the verdict may not survive a second run"
    verdict = "foveated ahead" if lo > 0 else "baseline ahead" if hi < 0 else "within noise"
    if verdict == "within noise" and eval_verdict != verdict:
        verdict = "within training noise"
    out.update(ci95=[lo, hi], draws=draws, verdict=verdict)
    return out


def _cells(table: Table) -> tuple[dict[tuple[str, str], dict[str, Run]], list[str]]:
    cells: dict[tuple[str, str], dict[str, Run]] = {}
    notes = []
    for run in table.runs.values():
        match = _CELL_RE.match(run.run_id)
        if not match:
            continue
        arm = match["arm"]
        if run.arch != _ARM_ARCH[arm]:
            notes.append(f"{run.run_id}: named as a {arm} cell but its architecture is {run.arch}; left out")
            continue
        if run.status not in _FINISHED:
            notes.append(f"{run.run_id}: {run.status}, so its last eval does not stand for its budget; left out")
            continue
        cells.setdefault((run.model_size, match["budget"]), {})[arm] = run
    return cells, notes


def _same_setup(a: Run, b: Run) -> str | None:
    """Why two runs do not share data and stage, or None when they do (or carry no config to tell)."""
    if a.config is None or b.config is None:
        return None
    for section, key in (("data", None), ("train", "stage"), ("model", "llm"), ("model", "dino")):
        va = a.config.get(section, {}) if key is None else a.config.get(section, {}).get(key)
        vb = b.config.get(section, {}) if key is None else b.config.get(section, {}).get(key)
        if va != vb:
            return f"{section}{'.' + key if key else ''} differs"
    return None


def _end(run: Run, column: str) -> float:
    values = run.col(column)
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if len(finite) else math.nan


def _params(arms: dict[str, Run]) -> float:
    return next((r.params for r in arms.values() if r.params), 0.0)


def _flops_end(run: Run) -> float:
    return _end(run, "samples_seen") * (run.flops_per_sample or math.nan)


def compare_cells(
    table: Table, n_boot: int = N_BOOT, seed: int = 0, reading: dict[str, bool] | None = None
) -> dict[str, Any]:
    """Every grid cell's comparisons and the grows / flat / shrinks verdict across sizes.

    `reading` (run id -> whether it reads the pixels, from the foveation evidence) adds the verdict
    over the cells whose foveated run and same-samples baseline were both measured to read: where a
    cell's models ignore the frames its advantage measures how fast each learns the text, and a
    trend across sizes can come from those cells alone."""
    from fvlm.analysis import noise as training

    rng = np.random.default_rng(seed)
    model = training.from_table(table)
    found, notes = _cells(table)
    cells = []
    for (size, budget), arms in sorted(found.items(), key=lambda kv: (kv[0][1], _params(kv[1]))):
        foveated = arms.get("F")
        if foveated is None:
            notes.append(f"{size} {budget}: no finished foveated cell; its baselines are not compared")
            continue
        cell: dict[str, Any] = {
            "size": size,
            "budget": budget,
            "N": foveated.params,
            "foveated": foveated.run_id,
            "samples": _end(foveated, "samples_seen"),
            "flops": _flops_end(foveated),
        }
        baseline = arms.get("B")
        if baseline is None:
            cell["same_data"] = None
            cell["same_data_note"] = "no finished iso-sample baseline cell"
        elif (why := _same_setup(foveated, baseline)) is not None:
            cell["same_data"] = None
            cell["same_data_note"] = f"{baseline.run_id}: {why} from {foveated.run_id}"
        elif abs(_end(baseline, "samples_seen") / cell["samples"] - 1) > SAME_SAMPLES_TOLERANCE:
            cell["same_data"] = None
            cell["same_data_note"] = (
                f"{baseline.run_id} ended at {_end(baseline, 'samples_seen'):.0f} samples, "
                f"{foveated.run_id} at {cell['samples']:.0f}"
            )
        else:
            cell["same_data"] = _difference(baseline, foveated, n_boot, rng, model)
            cell["same_data"].update(baseline=baseline.run_id, baseline_flops=_flops_end(baseline))
        cell.update(_same_flops(foveated, arms.get("B-isoflop"), cell, n_boot, rng, model))
        cells.append(cell)
    extra: dict[str, Any] = {}
    if reading is not None:
        both = [c for c in cells if c.get("same_data") and _reads(reading, c)]
        extra["scaling_reading"] = {
            **scaling_verdict(both),
            "cells": [c["foveated"] for c in both],
            "not_reading": sorted(
                c["foveated"]
                for c in cells
                if c.get("same_data") and c["foveated"] in reading and not _reads(reading, c)
            ),
        }
    return {
        "cells": cells,
        "notes": notes,
        "scaling": scaling_verdict(cells),
        **extra,
        "n_resamples": n_boot,
        "sign": "advantage = baseline val loss - foveated val loss (positive: foveated ahead)",
        "method": (
            "smoothed end of each run's val-loss curve (quadratic in log samples over its tail); 95% "
            f"intervals from {n_boot} residual-bootstrap resamples of each run, unpaired (run folders keep "
            "no per-item losses), plus a draw of each arm's training noise where seed replicates measured it "
            "(fvlm.analysis.noise: the floor of the cell's size, t-distributed for its few degrees of freedom)"
        ),
    }


def _reads(reading: dict[str, bool], cell: dict[str, Any]) -> bool:
    """Both arms of a cell's same-samples comparison measured, and both read the pixels."""
    return bool(reading.get(cell["foveated"])) and bool(reading.get(cell["same_data"]["baseline"]))


def _same_flops(
    foveated: Run, isoflop: Run | None, cell: dict[str, Any], n_boot: int, rng: np.random.Generator, model: Any = None
) -> dict[str, Any]:
    """The matched-FLOPs comparison: the iso-FLOP baseline cell where the grid has one. Elsewhere only
    a bound follows, since a longer run of the baseline would not be worse: a baseline that spent more
    FLOPs on the same samples and still lost, loses at equal FLOPs too; one that tied (within noise)
    would not be ahead at equal FLOPs, so the foveated cell is not behind there, by the rule the
    ablations' efficiency question uses (higher by less than the noise counts as not worse); nothing
    follows when it won."""
    out: dict[str, Any] = {"same_flops": None}
    if isoflop is not None:
        why = _same_setup(foveated, isoflop)
        ratio = _flops_end(isoflop) / cell["flops"]
        if why is None and abs(ratio - 1) <= SAME_FLOPS_TOLERANCE:
            out["same_flops"] = _difference(isoflop, foveated, n_boot, rng, model)
            out["same_flops"].update(baseline=isoflop.run_id, flops_ratio=ratio)
            return out
        out["same_flops_note"] = (
            f"{isoflop.run_id}: {why}" if why else f"{isoflop.run_id} spent {ratio:.2f}x the foveated cell's FLOPs"
        )
    else:
        out["same_flops_note"] = "no iso-FLOP baseline at this cell"
    same_data = cell.get("same_data")
    if same_data and same_data["ci95"] is not None:
        extra = same_data["baseline_flops"] / cell["flops"]
        if same_data["verdict"] == "foveated ahead":
            out["same_flops_bound"] = (
                f"foveated ahead at equal FLOPs: ahead even of a baseline that spent {extra:.2f}x its FLOPs"
            )
        elif same_data["verdict"] in ("within noise", "within training noise"):
            out["same_flops_bound"] = (
                f"foveated not behind at equal FLOPs: {same_data['verdict']} of a baseline that spent {extra:.2f}x its "
                f"FLOPs (advantage at equal FLOPs at least {same_data['ci95'][0]:+.4f})"
            )
        else:
            out["same_flops_bound"] = (
                f"not decided: the iso-sample baseline spent {extra:.2f}x the FLOPs and is {same_data['verdict']}"
            )
    return out


def scaling_verdict(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Does the foveated advantage grow, stay flat or shrink with size? The slope of the same-data
    advantage in log10 N, within each budget (budgets enter as separate intercepts), over budgets
    that have at least two sizes; its interval from the cells' bootstrap draws."""
    usable = [c for c in cells if c.get("same_data") and c["same_data"]["draws"] is not None and c["N"]]
    by_budget: dict[str, list[dict[str, Any]]] = {}
    for c in usable:
        by_budget.setdefault(c["budget"], []).append(c)
    groups = [g for g in by_budget.values() if len({c["N"] for c in g}) >= 2]
    by_size = _by_size(usable)
    if not groups:
        paired = sum(1 for c in cells if c.get("same_data"))
        evidence = (
            f"needs one budget with same-samples comparisons at 2 or more sizes; of {len(cells)} foveated "
            f"grid cells, {paired} have an iso-sample baseline cell, {len(usable)} of them with an interval, "
            f"at {len({c['N'] for c in usable})} size(s)"
        )
        return {"verdict": "unknown", "by_size": by_size, "evidence": evidence}
    # Within-budget centring: the slope of one line shared by every budget, each at its own height.
    xs, ys = [], []
    for group in groups:
        x = np.log10([c["N"] for c in group])
        draws = np.stack([c["same_data"]["draws"] for c in group])
        xs.append(x - x.mean())
        ys.append(draws - draws.mean(axis=0, keepdims=True))
    x, y = np.concatenate(xs), np.concatenate(ys)
    slopes = (x @ y) / (x @ x)
    advantages = [np.array([c["same_data"]["advantage"] for c in g]) for g in groups]
    slope = float((x @ np.concatenate([a - a.mean() for a in advantages])) / (x @ x))
    lo, hi = (float(v) for v in np.percentile(slopes, [2.5, 97.5]))
    verdict = "grows" if lo > 0 else "shrinks" if hi < 0 else "flat"
    used = sorted({c["budget"] for g in groups for c in g})
    sizes = ", ".join(
        f"{s}: {v['advantage']:+.4f} [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]" for s, v in by_size.items()
    )
    evidence = (
        f"advantage (baseline - foveated val loss, same samples) by size, mean over budgets: {sizes}; "
        f"slope {slope:+.4f} per decade of N [{lo:+.4f}, {hi:+.4f}] within budgets {', '.join(used)}"
        + (
            ""
            if verdict != "flat"
            else " (no trend beyond the eval and training noise)"
            if all(isinstance(c["same_data"].get("training_noise"), dict) for g in groups for c in g)
            else " (no trend beyond the eval noise; training noise not measured)"
        )
    )
    return {
        "verdict": verdict,
        "slope_per_decade": slope,
        "ci95": [lo, hi],
        "budgets": used,
        "by_size": by_size,
        "evidence": evidence,
    }


def _by_size(cells: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each size's same-data advantage averaged over its budgets, with the interval of that mean."""
    out: dict[str, dict[str, Any]] = {}
    for size in sorted({c["size"] for c in cells}, key=lambda s: min(c["N"] for c in cells if c["size"] == s)):
        group = [c for c in cells if c["size"] == size]
        draws = np.mean([c["same_data"]["draws"] for c in group], axis=0)
        out[size] = {
            "advantage": float(np.mean([c["same_data"]["advantage"] for c in group])),
            "ci95": [float(v) for v in np.percentile(draws, [2.5, 97.5])],
            "budgets": [c["budget"] for c in group],
        }
    return out


def without_draws(result: dict[str, Any]) -> dict[str, Any]:
    """The comparison as written to decisions.json: the bootstrap draws left out."""
    cells = []
    for cell in result["cells"]:
        cell = dict(cell)
        for key in ("same_data", "same_flops"):
            if cell.get(key):
                cell[key] = {k: v for k, v in cell[key].items() if k != "draws"}
        cells.append(cell)
    return {**result, "cells": cells}
