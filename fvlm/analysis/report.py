"""The plan's decision framework computed from the data: Decision 1 and 2, go/no-go, report.md."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from fvlm import atomic
from fvlm import run_folder as rf
from fvlm.analysis import ablations
from fvlm.analysis.fits import not_identified_text, predict_data_scaling
from fvlm.analysis.table import Run, Table


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e4 or abs(value) < 1e-3 else f"{value:.{digits}f}"
    return str(value)


def _answer(answers: list[dict[str, Any]], qid: str) -> dict[str, Any]:
    return next(a for a in answers if a["id"] == qid)


# ----------------------------------------------------------------------------- go / no-go


def _two_pass(answers: list[dict[str, Any]]) -> tuple[str, str]:
    a = _answer(answers, "two_pass")
    if a["winner"] is None:
        return "unknown", a["verdict"]
    f3_won = a["labels"][a["winner"]] == "F3"
    evidence = (
        f"winner {a['winner']} by {_fmt(a['margin'])} val loss at {a['common_x']:.0f} samples; "
        f"noise {_fmt(a['noise'])}; {a['verdict']}"
    )
    return ("pass" if f3_won and a["verdict"].startswith("clear") else "fail"), evidence


def _converged(table: Table, answers: list[dict[str, Any]]) -> tuple[str, str]:
    runs = {rid for a in answers for rid in a.get("runs", []) if a["winner"] is not None}
    judged = {rid: ablations.still_falling(table.runs[rid]) for rid in sorted(runs)}
    checks = {k: v for k, v in judged.items() if v}
    if not checks:
        return "unknown", "no ablation run has enough eval points to judge its tail"
    falling = {k: v for k, v in checks.items() if v["falling"]}
    budget = max(v["samples"] for v in checks.values())
    if falling:
        detail = "; ".join(
            f"{k}: drop {v['drop_last_fifth']:.4f} over the last fifth vs noise {v['noise']:.4f}"
            for k, v in falling.items()
        )
        decaying = sorted(k for k in falling if table.runs[k].lr_schedule not in ("constant", ""))
        caveat = ""
        if decaying:
            verb = "ends" if len(decaying) == 1 else "end"
            caveat = (
                f". {', '.join(decaying)} {verb} on a decaying learning rate, and part of a last fifth's drop can "
                "be that decay: only the same run at more samples tells whether the budget was short"
            )
        return "fail", (
            f"{len(falling)}/{len(checks)} ablation runs still falling at ~{budget:.0f} samples ({detail}){caveat}"
        )
    worst = max(checks.items(), key=lambda kv: kv[1]["drop_last_fifth"] / kv[1]["noise"])
    return "pass", (
        f"all {len(checks)} ablation runs flat at ~{budget:.0f} samples (largest drop over the last fifth: "
        f"{worst[0]} {worst[1]['drop_last_fifth']:.4f} vs 2x noise {2 * worst[1]['noise']:.4f})"
    )


def _stable_winners(table: Table, answers: list[dict[str, Any]]) -> tuple[str, str]:
    winners = sorted({a["winner"] for a in answers if a["winner"]})
    if not winners:
        return "unknown", "no question has a winner"
    problems = {w: ablations.instability(table.runs[w]) for w in winners}
    bad = {w: p for w, p in problems.items() if p}
    if bad:
        return "fail", "; ".join(f"{w}: {p}" for w, p in bad.items())
    return (
        "pass",
        f"winners {', '.join(winners)}: none diverged, no non-finite loss, none ends > 5x noise above its best",
    )


def _unidentified_fits(fits: dict[str, Any]) -> list[str]:
    out = [
        f"per-size fit {size}: {not_identified_text(f)}"
        for size, f in fits.get("per_size_fits", {}).items()
        if not f["identified"]
    ]
    joint = fits.get("joint_chinchilla_fit")
    if joint and not joint["identified"]:
        out.append(f"joint fit: {not_identified_text(joint)}")
    return out


def _compute_optimal(fits: dict[str, Any]) -> tuple[str, str]:
    """Pass only when every budget with 3 or more sizes has an interior minimum (fits.iso_flop)."""
    budgets = fits.get("iso_flop", {}).get("budgets", {})
    fitted = {k: b for k, b in budgets.items() if "parabola" in b}
    unidentified = _unidentified_fits(fits)
    caveat = (" Not identified, so not used: " + "; ".join(unidentified) + ".") if unidentified else ""
    if not fitted:
        sizes = {b["n_sizes"] for b in budgets.values()} or {0}
        return "unknown", (
            f"no FLOP budget has 3 or more model sizes (at most {max(sizes)}); "
            "iso-FLOP minima cannot be located." + caveat
        )
    parts = []
    for k, b in fitted.items():
        if "N_star" not in b:
            parts.append(f"{k}: no minimum (loss not convex in log N)")
        else:
            parts.append(f"{k}: {_minimum_text(b, with_d=False)}")
    interior = all(b.get("interior") for b in fitted.values())
    return ("pass" if interior else "fail"), "; ".join(parts) + "." + caveat


def _efficiency(
    table: Table, answers: list[dict[str, Any]], comparison: dict[str, Any] | None = None
) -> tuple[str, str]:
    a = _answer(answers, "efficiency")
    if a["winner"] is None:
        # The ablation pair has no matched finished point (B1 spends more FLOPs per sample); the
        # grid's iso-FLOP baseline cells are the measured comparison at equal FLOPs, when it has them.
        matched = [c for c in (comparison or {}).get("cells", []) if c.get("same_flops") and c["same_flops"]["ci95"]]
        if not matched:
            return "unknown", a["verdict"]
        cells = "; ".join(
            f"{c['size']} {c['budget']}: {_pair_text(c['same_flops'])} vs {c['same_flops']['baseline']}"
            for c in matched
        )
        return "pass", (
            f"F3 vs B1: {a['verdict']}. Measured at equal FLOPs in the scaling grid instead (baseline - "
            f"foveated val loss, 95% interval): {cells}"
        )
    evidence = (
        f"{a['winner']} lower by {_fmt(a['margin'])} at each run's finished point "
        f"(FLOPs {', '.join(f'{k}: {v:.3g}' for k, v in a['flops_at_finish'].items())}); "
        f"noise {_fmt(a['noise'])}; {a['verdict']}"
    )
    return ("fail" if a.get("unstable") else "pass"), evidence


def _logging(table: Table) -> tuple[str, str]:
    project = [r for r in table.runs.values() if r.config is not None]
    if not project:
        return "unknown", (
            "only exported data: it carries no loss_fine/loss_coarse, attention maps or checkpoint metadata to verify"
        )
    problems = []
    for run in project:
        missing = []
        if run.summary is None:
            missing.append(rf.SUMMARY)
        if run.steps is None:
            missing.append(rf.STEPS)
        queries = run.arch != "multi_token"  # the baseline has no query, so no query attention to log
        if queries and not run.attention_files:
            missing.append("attention maps")
        if not run.has_checkpoint_meta:
            missing.append(f"checkpoint {rf.META}")
        for column in ("val_loss", "grad_norm") + (("loss_coarse", "attention_entropy") if queries else ()):
            if not np.isfinite(run.col(column)).any():
                missing.append(f"metrics {column}")
        if missing:
            problems.append(f"{run.run_id}: {', '.join(missing)}")
    if problems:
        return "fail", "; ".join(problems)
    return "pass", (
        f"{len(project)} run folders: metrics (incl. loss_coarse, entropy, grad norm), steps.csv, "
        "run_summary.json, attention maps and checkpoint metadata all present"
    )


def go_no_go(
    table: Table, answers: list[dict[str, Any]], fits: dict[str, Any], comparison: dict[str, Any] | None = None
) -> list[dict[str, str]]:
    items = [
        ("Foveated (F3) clearly beats coarse-only (A6)", _two_pass(answers)),
        ("Val loss curves converge (not still falling) at the ablation budget", _converged(table, answers)),
        ("No divergence in any winning config", _stable_winners(table, answers)),
        ("Scaling grid shows a clear compute-optimal point", _compute_optimal(fits)),
        (
            "Foveated has a measured efficiency comparison vs the multi-token baseline",
            _efficiency(table, answers, comparison),
        ),
        ("All logging works (CSV, attention maps, checkpoint metadata)", _logging(table)),
    ]
    return [{"criterion": c, "status": s, "evidence": e} for c, (s, e) in items]


# ----------------------------------------------------------------------------- Decision 2


def _pair_text(pair: dict[str, Any]) -> str:
    ci = pair["ci95"]
    interval = f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""
    return f"{pair['advantage']:+.4f}{interval} ({pair['verdict']})"


def _scaling_answer(comparison: dict[str, Any]) -> str:
    scaling = comparison["scaling"]
    if scaling["verdict"] == "unknown":
        answer = f"unknown: {scaling['evidence']}"
    else:
        answer = f"**{scaling['verdict']}**: {scaling['evidence']}"
    reading = comparison.get("scaling_reading")
    if reading is None:
        return answer
    # The foveation evidence measured which cells read the pixels (the largest budget's): the trend
    # over those alone, since cells that ignore the frames compare how fast the models learn text.
    if not reading["cells"]:
        only = "no grid cell with both arms measured to read the pixels"
    else:
        shown = reading["verdict"] if reading["verdict"] == "unknown" else f"**{reading['verdict']}**"
        only = f"{shown}: {reading['evidence']}"
    ignored = f"; measured and not reading: {', '.join(reading['not_reading'])}" if reading["not_reading"] else ""
    cells = ", ".join(reading["cells"]) or "none"
    return f"{answer}. Over the cells measured to read the pixels, both arms ({cells}{ignored}): {only}"


def _efficiency_answer(comparison: dict[str, Any]) -> str:
    parts = []
    for cell in comparison["cells"]:
        name = f"{cell['size']} {cell['budget']}"
        if cell.get("same_flops"):
            parts.append(f"{name}: {_pair_text(cell['same_flops'])} vs {cell['same_flops']['baseline']}")
        elif cell.get("same_flops_bound"):
            parts.append(f"{name}: {cell['same_flops_bound']}")
        else:
            parts.append(f"{name}: unknown ({cell.get('same_flops_note', 'no baseline')})")
    if not any(c.get("same_data") or c.get("same_flops") for c in comparison["cells"]):
        return (
            "unknown: needs the scaling grid's multi-token cells (<size>-<budget>-B, -B-isoflop) beside its "
            f"foveated cells (found {len(comparison['cells'])} foveated cells and no baseline partner)"
        )
    return "baseline - foveated val loss at equal FLOPs (positive: foveated ahead), 95% interval: " + "; ".join(parts)


def _minimum_text(b: dict[str, Any], with_d: bool = True) -> str:
    """One budget's iso-FLOP minimum: N* (and D*) when interior; otherwise where the data put the
    optimum, with the parabola's vertex named as outside the grid rather than given as an estimate."""
    if b["interior"]:
        return f"N* = {b['N_star']:.3g}" + (f", D* = {b['D_star']:.3g}" if with_d else "") + " (interior minimum)"
    lowest = b["lowest_N"]
    if lowest == min(b["sizes"]):
        where = f"the lowest loss is at the smallest size ({lowest:.3g}), so the optimum is there or below"
    elif lowest == max(b["sizes"]):
        where = f"the lowest loss is at the largest size ({lowest:.3g}), so the optimum is there or above"
    else:
        where = "the lowest loss is at a middle size but the parabola's vertex is not between the sizes"
    return f"no interior minimum: {where} (parabola vertex N = {b['N_star']:.3g}, outside what the grid measures)"


def decision2(table: Table, fits: dict[str, Any], comparison: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    per_size = fits.get("per_size_fits", {})
    budgets = fits.get("iso_flop", {}).get("budgets", {})
    minima = {k: b for k, b in budgets.items() if "N_star" in b}
    identified = {s: f for s, f in per_size.items() if f["identified"]}
    if minima:
        answer = "; ".join(f"{k}: {_minimum_text(b)}" for k, b in minima.items())
    elif len(identified) >= 2:
        d_common = min(f["D_range"][1] for f in identified.values())
        preds = {s: float(predict_data_scaling(f, d_common)) for s, f in identified.items()}
        best = min(preds, key=lambda s: preds[s])
        answer = (
            f"no iso-FLOP minimum (fewer than 3 sizes per budget). At matched data D = {d_common:.3g} the "
            f"per-size fits give " + ", ".join(f"{s}: {v:.4f}" for s, v in preds.items()) + f" -> {best} lowest"
        )
    else:
        answer = f"unknown: identified per-size fits for fewer than 2 sizes ({len(identified)} of {len(per_size)})"
    left_out = [f"{s}: {not_identified_text(f)}" for s, f in per_size.items() if not f["identified"]]
    if left_out and not minima:
        answer += "; left out: " + "; ".join(left_out)
    rows.append({"question": "Compute-optimal size", "answer": answer})

    rows.append({"question": "Does foveation scale?", "answer": _scaling_answer(comparison)})
    exponents = fits.get("allocation_exponents")
    if exponents:
        answer = exponents["evidence"] if exponents["verdict"] == "measured" else f"unknown: {exponents['evidence']}"
        rows.append({"question": "Compute-optimal allocation: N* ~ C^a, foveated vs baseline", "answer": answer})
    rows.append({"question": "Token efficiency", "answer": _efficiency_answer(comparison)})

    def plateau_text(size: str, fit: dict[str, Any]) -> str:
        if not fit["identified"]:
            return f"{size}: {not_identified_text(fit)}"
        return f"{size}: {_fmt(fit['D_plateau'], 3) if fit['D_plateau'] else 'n/a'} (noise {fit['eval_noise']:.4f})"

    if any(f["D_plateau"] for f in per_size.values()):
        answer = "samples beyond which doubling D gains less than the eval noise (per-size fit): " + ", ".join(
            plateau_text(s, f) for s, f in per_size.items()
        )
    elif per_size:
        answer = "unknown: " + ", ".join(plateau_text(s, f) for s, f in per_size.items())
    else:
        answer = "unknown: no per-size fit"
    rows.append({"question": "How much data?", "answer": answer})
    return rows


# ----------------------------------------------------------------------------- report.md


def _ci(fit: dict[str, Any], key: str) -> str:
    interval = (fit.get("ci95") or {}).get(key)
    return f"[{_fmt(interval[0])}, {_fmt(interval[1])}]" if interval else "—"


def _pixel_check(table: Table) -> list[str]:
    """Does the model read the pixels? From `fvlm eval`'s blank-frame control: the same validation
    samples with every frame replaced by flat grey. Mode and ablation gaps mean little without it."""
    rows = []
    for run in table.runs.values():
        modes = (run.eval_result or {}).get("modes") or {}
        for mode, r in modes.items():
            if r.get("pixel_gain") is not None:
                rows.append(
                    f"| {run.run_id} | {mode} | {_fmt(r['loss'])} | {_fmt(r['loss_blank_frames'])} | "
                    f"{_fmt(r['pixel_gain'])} |"
                )
    if not rows:
        return []
    return [
        "",
        "## Pixel check (fvlm eval, blank-frame control)",
        "",
        "Validation loss with the real frames and with every frame replaced by flat grey (frame count and "
        "masks unchanged). A pixel gain near 0 means the model reads only how many frames there are: its "
        "mode and ablation gaps then come from training dynamics, not from what it sees.",
        "",
        "| run | mode | val loss | blank frames | pixel gain |",
        "|---|---|---|---|---|",
        *rows,
    ]


def _milestone_evals(table: Table) -> list[str]:
    """The three-mode evaluation of the best Phase 1b run's checkpoints (fvlm.experiments.milestones):
    one row per kept checkpoint, with the mode gaps and their paired 95% intervals."""
    lines = ["", "## Three-mode evaluation: best Phase 1b checkpoint and kept milestones", ""]
    evaluated = [r for r in table.runs.values() if len(_eval_steps(r)) > 1]
    grid = [r for r in table.runs.values() if r.config is not None and re.match(r".+-C\d+-F$", r.run_id)]
    if not evaluated:
        if not grid:
            return []
        return lines + [
            "unknown: no grid run holds the evaluation of its milestones in all three modes "
            "(`fvlm phase1` writes it to the best run's eval/eval.json)."
        ]
    lines += [
        "| run | step | best | " + " | ".join(MODE_NAMES) + " | gaps [95% paired] |",
        "|---|---|---|" + "---|" * len(MODE_NAMES) + "---|",
    ]
    for run in evaluated:
        for entry in _eval_steps(run):
            losses = " | ".join(_fmt((entry["modes"].get(m) or {}).get("loss")) for m in MODE_NAMES)
            gaps = "; ".join(
                f"{k.replace('_minus_', ' − ')} {v['diff']:+.4f} [{v['ci95_bootstrap'][0]:+.4f}, "
                f"{v['ci95_bootstrap'][1]:+.4f}]"
                for k, v in (entry.get("gap_intervals") or {}).items()
            )
            lines.append(
                f"| {run.run_id} | {entry.get('step')} | {'yes' if entry.get('best') else ''} | {losses} | "
                f"{gaps or '—'} |"
            )
    return lines


MODE_NAMES = ("coarse_only", "coarse_fine", "autoregressive")


def _eval_steps(run: Run) -> list[dict[str, Any]]:
    """The per-checkpoint entries of a run's eval/eval.json (none without one)."""
    return (run.eval_result or {}).get("steps") or []


def _cell_table(comparison: dict[str, Any]) -> list[str]:
    if not comparison["cells"] and not comparison["notes"]:
        return []
    lines = [
        "",
        "## Foveated vs multi-token baseline, cell by cell",
        "",
        f"Each scaling-grid cell against its own baselines: same size, budget, data and stage. "
        f"{comparison['sign'][0].upper()}{comparison['sign'][1:]}. Method: {comparison['method']}.",
        "",
    ]
    if comparison["cells"]:
        lines += [
            "| cell | foveated | samples | same samples: baseline (its FLOPs / foveated) | advantage [95%] | "
            "equal FLOPs: baseline | advantage [95%] |",
            "|---|---|---|---|---|---|---|",
        ]
    for cell in comparison["cells"]:
        same = cell.get("same_data")
        same_text = (
            f"{same['baseline']} ({same['baseline_flops'] / cell['flops']:.2f}x) | {_pair_text(same)}"
            if same
            else f"— | {cell.get('same_data_note', '—')}"
        )
        flops = cell.get("same_flops")
        flops_text = (
            f"{flops['baseline']} ({flops['flops_ratio']:.2f}x) | {_pair_text(flops)}"
            if flops
            else f"— | {cell.get('same_flops_bound') or cell.get('same_flops_note', '—')}"
        )
        lines.append(
            f"| {cell['size']} {cell['budget']} | {cell['foveated']} | {cell['samples']:.0f} | "
            f"{same_text} | {flops_text} |"
        )
    lines += ["", f"Across sizes: {_scaling_answer(comparison)}."]
    if comparison["notes"]:
        lines += ["", "Left out:", ""] + [f"- {n}" for n in comparison["notes"]]
    return lines


def write_report(
    path: Path,
    table: Table,
    answers: list[dict[str, Any]],
    fits: dict[str, Any],
    checklist: list[dict[str, str]],
    decision2_rows: list[dict[str, str]],
    figures: list[tuple[str, Path | None, str]],
    inputs: list[str],
    comparison: dict[str, Any],
    decision3: dict[str, Any] | None = None,
) -> None:
    n_points = sum(r.n_points for r in table.runs.values())
    lines = [
        "# fvlm analysis report",
        "",
        f"Inputs: {', '.join(inputs)} — {len(table.runs)} runs, {n_points} eval points.",
        "",
    ]
    if table.notes:
        lines += ["Notes on the inputs:", ""] + [f"- {n}" for n in table.notes] + [""]

    lines += [
        "## Decision 1: architecture config (ablations)",
        "",
        "Compared on the smoothed val loss (a quadratic in log samples through the nearest fifth of the "
        "curve's evals, 5 to 9) at the last sample count all runs of a question reached; the "
        "efficiency question at each run's finished point (end of its LR schedule), decided only when the "
        "FLOPs match or the cheaper run is not worse (higher by less than the noise counts as not worse). Noise = the scatter of each run's val loss around a quadratic (in log "
        "samples) over the last half of its curve, plus, where seed replicates measured it, the training "
        "noise of its size and budget (see Replication), combined for the two runs compared. Verdict: clear if "
        "margin > 2x noise; within training noise if it clears 2x the eval noise alone but not the whole; "
        "without replicates, weak if > 1x (eval noise only: provisional). A provisional answer names the "
        "part of the plan's rule it could not check.",
        "",
        "| question | runs | winner | margin | noise | verdict | winner at best | unstable runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in answers:
        runs = ", ".join(f"{r} ({a['labels'][r]})" if a.get("labels") and a["labels"][r] != r else r for r in a["runs"])
        unstable = "; ".join(f"{k}: {v}" for k, v in (a.get("unstable") or {}).items())
        winner = f"{a['winner']} (provisional)" if a.get("winner") and a.get("provisional") else a.get("winner")
        lines.append(
            f"| {a['title']} | {runs or '—'} | {winner or '—'} | {_fmt(a['margin'])} | "
            f"{_fmt(a['noise'])} | {a['verdict']} | {a.get('winner_at_best') or '—'} | {unstable or '—'} |"
        )
    mapped = {r for a in answers for r in a.get("runs", [])}
    others = [r for r in table.runs if r not in mapped]
    if others:
        lines += ["", f"Runs not part of a plan question: {', '.join(others)}."]

    lines += ["", "## Decision 2: model size (scaling grid)", "", "| question | answer |", "|---|---|"]
    lines += [f"| {row['question']} | {row['answer']} |" for row in decision2_rows]
    lines += _cell_table(comparison)

    if decision3 is not None:
        assumptions = ", ".join(f"{k}={v}" for k, v in decision3["inputs"].items() if v is not None)
        lines += [
            "",
            "## Decision 3: training schedule (derived)",
            "",
            f"Inputs (override with `fvlm analyze --schedule key=value`): {assumptions}.",
            "",
            "| question | answer |",
            "|---|---|",
        ]
        lines += [f"| {row['question']} | {row['answer']} |" for row in decision3["rows"]]

    lines += ["", "## Go / no-go", "", "| criterion | status | evidence |", "|---|---|---|"]
    lines += [f"| {c['criterion']} | **{c['status']}** | {c['evidence']} |" for c in checklist]
    provisional = [a for a in answers if a.get("provisional")]
    if provisional:
        lines += [
            "",
            "Provisional answers the decisions above rest on: "
            + "; ".join(
                f"{a['id']} ({a['winner']}: {', '.join(u['check'] for u in a['unchecked'])} not checked)"
                for a in provisional
            )
            + ".",
        ]

    lines += _pixel_check(table)
    lines += _milestone_evals(table)

    lines += [
        "",
        "## Scaling fits",
        "",
        f"Fit runs: {', '.join(fits['fit_runs']) or '—'} (globs: {', '.join(fits['fit_run_globs'])}).",
        "",
    ]
    per_size = fits.get("per_size_fits", {})
    if per_size:
        lines += [
            "Per size, L(D) = E + a / D^b (global least squares; D = samples seen). A fit is shown as not "
            "identified, without its numbers, when its optimiser did not converge, an exponent sits at the "
            "bound of its search range, or its plateau E is below zero:",
            "",
            "| size | N | runs | points | E [95% CI] | a [95% CI] | b [95% CI] | RMSE | bootstrap |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for size, f in per_size.items():
            if not f["identified"]:
                lines.append(
                    f"| {size} | {_fmt(f['N'], 4)} | {f['n_runs']} | {f['n_points']} | "
                    f"{not_identified_text(f)} | | | {_fmt(f['rmse'])} | — |"
                )
                continue
            lines.append(
                f"| {size} | {_fmt(f['N'], 4)} | {f['n_runs']} | {f['n_points']} | {_fmt(f['E'])} {_ci(f, 'E')} | "
                f"{_fmt(f['a'])} {_ci(f, 'a')} | {_fmt(f['b'])} {_ci(f, 'b')} | {_fmt(f['rmse'])} | "
                f"{f['bootstrap']['note']} |"
            )
    joint = fits.get("joint_chinchilla_fit")
    if joint:
        lines += [
            "",
            f"Joint fit {joint['form']} ({joint['n_points']} points, {joint['n_sizes']} sizes):",
            "",
            "| method | E | A | alpha | B [95% CI] | beta [95% CI] | E + A/N^alpha by size | RMSE |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, m in joint["methods"].items():
            if not m["identified"]:
                lines.append(f"| {name} | {not_identified_text(m)} | | | | | | {_fmt(m['rmse'])} |")
                continue
            by_size = ", ".join(f"{s}: {v:.4f}" for s, v in (m.get("E_by_size") or {}).items()) or "—"
            lines.append(
                f"| {name} | {_fmt(m['E'])} {_ci(m, 'E') if m['E'] is not None else ''} | {_fmt(m['A'])} | "
                f"{_fmt(m['alpha'])} | {_fmt(m['B'])} {_ci(m, 'B')} | {_fmt(m['beta'])} {_ci(m, 'beta')} | "
                f"{by_size} | {_fmt(m['rmse'])} |"
            )
        if joint.get("note"):
            lines += ["", f"Note: {joint['note']}."]
        lines += ["", f"Bootstrap: {joint['bootstrap']['note']}."]
    if fits.get("flops_estimated"):
        lines += ["", "FLOPs of exported runs are estimated with the plan's 2 x N x 500 tokens per sample."]

    lines += ["", "## Figures", ""]
    for title, fig_path, _ in figures:
        if fig_path:
            lines += [f"### {title}", "", f"![{title}]({fig_path.name})", ""]
    absent = [(t, r) for t, p, r in figures if p is None]
    if absent:
        lines += ["Absent (their data is not in the inputs):", ""] + [f"- {t}: {r}" for t, r in absent] + [""]
    atomic.write_text(path, "\n".join(lines) + "\n")
