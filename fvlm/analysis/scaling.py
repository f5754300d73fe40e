"""Scaling fits of a set of runs, in the structure of the export's `scaling_fits.json`."""

from __future__ import annotations

import math
from functools import partial
from typing import Any, TypedDict

import numpy as np

from fvlm.analysis import ablations, fits
from fvlm.analysis.table import Run
from fvlm.eval.stats import N_BOOT

USABLE_STATUS = ("completed", "unknown", "interrupted")


class BootstrapSummary(TypedDict):
    """How a fit's intervals were drawn (fits.bootstrap's record without its intervals)."""

    unit: str
    n_resamples: int
    note: str


class PerSizeFit(fits.DataScalingFit):
    """One model size's L(D) fit in scaling_fits.json's `per_size_fits`: the fit, then its runs,
    intervals and plateau."""

    N: float | None
    runs: list[str]
    n_runs: int
    D_range: list[float]
    ci95: dict[str, list[float] | None]
    bootstrap: BootstrapSummary
    eval_noise: float
    D_plateau: float | None
    form: str


def _params(run: Run) -> float:
    """The parameter count of a run from those already filtered to runs that have one."""
    assert run.params is not None, f"{run.run_id}: no parameter count (callers keep only runs with one)"
    return run.params


def _points(runs: list[Run]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, loss, run_idx = [], [], []
    for i, run in enumerate(runs):
        x, y = run.col("samples_seen"), run.col("val_loss")
        keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
        d.append(x[keep])
        loss.append(y[keep])
        run_idx.append(np.full(keep.sum(), i))
    return np.concatenate(d), np.concatenate(loss), np.concatenate(run_idx)


# The bootstrap refits: module-level, so that `fits.refits_in_processes` can send them to its processes.
def _data_scaling_refit(d: np.ndarray, loss: np.ndarray, idx: np.ndarray) -> fits.DataScalingFit:
    return fits.fit_data_scaling(d[idx], loss[idx])


def _least_squares_refit(data: fits.JointData, idx: np.ndarray) -> dict[str, Any]:
    return fits.fit_joint_least_squares(data.take(idx))


def _huber_refit(data: fits.JointData, start: np.ndarray, idx: np.ndarray) -> dict[str, Any]:
    # Started from the full data's optimum only, not from a grid of starts.
    return fits.fit_joint_huber(data.take(idx), n_starts=0, extra_starts=[start])


def per_size(runs: list[Run], n_boot: int, seed: int) -> dict[str, PerSizeFit]:
    out: dict[str, PerSizeFit] = {}
    sizes = sorted({r.model_size for r in runs}, key=lambda s: min(r.params or 0 for r in runs if r.model_size == s))
    for size in sizes:
        group = [r for r in runs if r.model_size == size]
        d, loss, run_idx = _points(group)
        if len(d) < 4:
            continue
        fit = fits.fit_data_scaling(d, loss)
        boot = fits.bootstrap(run_idx, partial(_data_scaling_refit, d, loss), ["E", "a", "b"], n_boot, seed)
        noises = np.array([ablations.run_noise(r) for r in group])
        noise = float(np.median(noises[np.isfinite(noises)])) if np.isfinite(noises).any() else math.nan
        out[size] = {
            **fit,
            "N": float(group[0].params) if group[0].params else None,
            "runs": [r.run_id for r in group],
            "n_runs": len(group),
            "D_range": [float(d.min()), float(d.max())],
            "ci95": boot["ci95"],
            "bootstrap": {"unit": boot["unit"], "n_resamples": boot["n_resamples"], "note": boot["note"]},
            "eval_noise": noise,
            "D_plateau": plateau_samples(fit, noise) if fit["identified"] else None,
            "form": "L(D) = E + a / D^b, D = samples seen",
        }
    return out


def plateau_samples(fit: fits.DataScalingParams, noise: float) -> float | None:
    """Samples beyond which doubling D gains less than the eval noise, by the fitted law:
    a/D^b (1 - 2^-b) = noise."""
    if not (math.isfinite(noise) and noise > 0 and fit["a"] > 0 and fit["b"] > 0):
        return None
    log_d = (math.log(fit["a"] * (1 - 2 ** -fit["b"])) - math.log(noise)) / fit["b"]
    return float(math.exp(log_d)) if log_d < 700 else math.inf  # a nearly flat law: no plateau in reach


def joint(runs: list[Run], n_boot: int, seed: int) -> dict[str, Any] | None:
    usable = [r for r in runs if r.params]
    if len(usable) < 1:
        return None
    d, loss, run_idx = _points(usable)
    n = np.array([_params(usable[i]) for i in run_idx], float)
    labels = sorted({r.model_size for r in usable}, key=lambda s: min(_params(r) for r in usable if r.model_size == s))
    size_idx = np.array([labels.index(usable[i].model_size) for i in run_idx])
    data = fits.JointData(n, d, loss, size_idx, run_idx, labels)
    if len(loss) < 5:
        return None
    least_squares = fits.fit_joint_least_squares(data)
    huber = fits.fit_joint_huber(data)
    keys = ["E", "A", "B", "alpha", "beta"] if data.n_sizes >= 3 else ["B", "beta"]
    start = np.array(huber["theta"])
    ls_boot = fits.bootstrap(run_idx, partial(_least_squares_refit, data), keys, n_boot, seed, strata=size_idx)
    hub_boot = fits.bootstrap(run_idx, partial(_huber_refit, data, start), keys, n_boot, seed, strata=size_idx)
    least_squares.update(ci95=ls_boot["ci95"])
    huber.update(ci95=hub_boot["ci95"])
    identifiable = data.n_sizes >= 3
    record: dict[str, Any] = {
        key: huber[key]
        for key in ("E", "A", "B", "alpha", "beta", "E_by_size", "rmse", "identified", "not_identified_because")
    }
    record.update(
        form="L(N, D) = E + A / N^alpha + B / D^beta, N = total parameters, D = samples seen",
        method="huber_log (Hoffmann et al. approach 3); least squares under methods",
        n_points=int(len(loss)),
        n_sizes=data.n_sizes,
        sizes=labels,
        runs=[r.run_id for r in usable],
        identifiable=identifiable,
        ci95=huber["ci95"],
        bootstrap={"unit": hub_boot["unit"], "n_resamples": n_boot, "note": hub_boot["note"]},
        methods={"least_squares": least_squares, "huber_log": huber},
    )
    if not identifiable:
        record["note"] = (
            f"only {data.n_sizes} model size(s): A/N^alpha takes one value per size and cannot be "
            "separated from E, so E, A and alpha are null; E_by_size gives E + A/N^alpha per size"
        )
    return record


def iso_flop_entries(runs: list[Run]) -> list[fits.IsoFlopEntry]:
    entries: list[fits.IsoFlopEntry] = []
    for run in runs:
        if not run.flops_per_sample or run.status not in USABLE_STATUS or not run.params:
            continue
        x, y = run.col("samples_seen"), run.col("val_loss")
        keep = np.isfinite(x) & np.isfinite(y)
        if not keep.any():
            continue
        d = float(x[keep][-1])
        entries.append(
            {
                "run_id": run.run_id,
                "arch": run.arch,
                "N": float(run.params),
                "D": d,
                "C": d * run.flops_per_sample,
                "loss": float(y[keep][-1]),
            }
        )
    return entries


def scaling_fits(runs: list[Run], globs: list[str] | None, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    archs = sorted({r.arch for r in runs}, key=lambda a: (a != "foveated", a))  # foveated first, then by name
    main = [r for r in runs if r.arch == archs[0]] if archs else []
    entries = iso_flop_entries(main)
    iso = fits.iso_flop(entries)
    iso["entries"] = entries
    out: dict[str, Any] = {
        "fit_run_globs": globs or ["*"],
        "fit_runs": [r.run_id for r in runs],
        "arch": archs[0] if archs else None,
        "per_size_fits": per_size(main, n_boot, seed),
        "joint_chinchilla_fit": joint(main, n_boot, seed),
        "chinchilla_reference": fits.CHINCHILLA_REFERENCE,
        "iso_flop": iso,
        "flops_estimated": any(r.flops_estimated for r in main),
    }
    # Every arm's own iso-FLOP fit: the baseline's cells are grouped by the FLOPs they spent.
    by_arch = {}
    for arch in archs:
        arm = (
            iso
            if arch == archs[0]
            else fits.iso_flop(iso_flop_entries([r for r in runs if r.arch == arch]), by_label=False)
        )
        by_arch[arch] = {k: v for k, v in arm.items() if k != "entries"}
    out["iso_flop_by_arch"] = by_arch
    out["allocation_exponents"] = fits.compare_allocation_exponents(
        {a: v for a, v in by_arch.items() if a in ("foveated", "multi_token")}
    )
    if len(archs) > 1:
        out["per_size_fits_by_arch"] = {a: per_size([r for r in runs if r.arch == a], n_boot, seed) for a in archs[1:]}
    return out
