"""`fvlm analyze PATH [PATH ...] --out DIR [--fit-runs GLOB,GLOB]`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from fvlm import atomic
from fvlm.errors import UsageError, check_folder_path, not_empty
from fvlm.eval.stats import N_BOOT

if TYPE_CHECKING:  # imported when the analysis runs: `fvlm --help` stays quick
    from fvlm.experiments.schedule import ScheduleInputs


class Decisions(TypedDict):
    """decisions.json: the records of the report's decisions, in the report's order."""

    questions: list[dict[str, Any]]  # each ablation answer's decision_keys
    go_no_go: list[dict[str, str]]  # report.go_no_go
    decision2: list[dict[str, str]]  # report.decision2
    decision3: dict[str, Any]  # fvlm.experiments.schedule.decision3
    foveated_vs_baseline: dict[str, Any]  # fvlm.analysis.compare.without_draws
    replication: dict[str, Any]  # fvlm.analysis.noise.replication


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "analyze",
        help="fits, ablation table, figures, export and decision report from runs or an export",
        description="Reads run folders, sweep folders and export folders (all_eval_points.csv + run_summaries.csv) "
        "and writes report.md, ablation_table.csv, decisions.json, the figures, and the export "
        "(all_eval_points.csv, run_summaries.csv, scaling_fits.json, scaling_law_plot.png) to --out.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("--out", help="output folder (required unless --side-by-side)")
    parser.add_argument(
        "--side-by-side",
        action="store_true",
        help="PATHs are two or more whole Phase 1 outputs (or their decisions.json): print their verdicts "
        "side by side and count contradictions (with --out: also side_by_side.md / .json there)",
    )
    parser.add_argument(
        "--fit-runs", help="comma-separated run-id globs used for the scaling fits (default: every run)"
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=N_BOOT,
        help=f"bootstrap resamples for the 95%% intervals (default {N_BOOT}: 50 draws in each 2.5%% "
        "tail; about 1.5 minutes on a 24-run export on one core)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="processes for the bootstrap refits of the scaling fits, most of the analysis's time (same "
        "intervals whatever the number; default 1)",
    )
    parser.add_argument(
        "--schedule",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Decision 3's inputs: gpus, gpu_name, gpu_peak_flops, mfu, assumed_mfu, gpu_hour_cost, "
        "stage2_ratio, stage3_ratio (SmolVLM2's stage proportions), budget_usd, max_wall_days, "
        "size (default: the paper preset's GPUs and prices, MFU measured where it can be)",
    )
    parser.set_defaults(func=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    if args.side_by_side:
        return _side_by_side(args)
    if not args.out:
        raise UsageError("fvlm analyze: --out is required (the folder the report is written to)")
    if args.bootstrap < 1:
        raise UsageError(f"--bootstrap must be >= 1, got {args.bootstrap}")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")
    not_empty(args, "out")
    check_folder_path(args.out, "--out")
    if any(not p.strip() for p in args.paths):
        raise UsageError("PATH must not be empty")
    globs = []
    if args.fit_runs is not None:
        globs = [g.strip() for g in args.fit_runs.split(",") if g.strip()]
        if not globs:
            raise UsageError("--fit-runs: no run-id glob given (leave --fit-runs out to fit every run)")
    from fvlm.experiments.schedule import parse_inputs

    schedule = parse_inputs(args.schedule)
    summary = analyze(
        args.paths,
        Path(args.out),
        globs or None,
        n_boot=args.bootstrap,
        seed=args.seed,
        schedule=schedule,
        jobs=args.jobs,
    )
    print(
        f"analyzed {summary['runs']} runs -> {args.out} ({summary['figures']} figures, "
        f"{summary['absent']} absent; see report.md)"
    )
    return 0


def _side_by_side(args: argparse.Namespace) -> int:
    import json

    from fvlm.analysis import side_by_side as sbs

    result = sbs.side_by_side([Path(p) for p in args.paths])
    text = sbs.markdown(result)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "side_by_side.md").write_text(text)
        (out / "side_by_side.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


def analyze(
    paths: list[str],
    out: Path,
    globs: list[str] | None,
    n_boot: int = N_BOOT,
    seed: int = 0,
    schedule: ScheduleInputs | None = None,
    reading: dict[str, bool] | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    import csv
    import math

    from fvlm.analysis import ablations, compare, figures, noise, report, scaling, table
    from fvlm.analysis.fits import refits_in_processes
    from fvlm.errors import UsageError
    from fvlm.experiments.matrix import replicate_of
    from fvlm.experiments.schedule import ScheduleInputs, decision3

    data = table.load(paths)
    # One seed per cell in the fits: seed replicates measure the training noise (fvlm.analysis.noise).
    fit_runs = [r for r in data.select(globs) if not replicate_of(r.run_id)[1]]
    if globs and not fit_runs:
        raise UsageError(f"--fit-runs {','.join(globs)} matched no run (runs: {', '.join(data.runs)})")
    out.mkdir(parents=True, exist_ok=True)

    with refits_in_processes(jobs):
        fits = scaling.scaling_fits(fit_runs, globs, n_boot=n_boot, seed=seed)
    answers = ablations.answer_all(data)
    comparison = compare.compare_cells(data, n_boot=n_boot, seed=seed, reading=reading)
    checklist = report.go_no_go(data, answers, fits, comparison)
    ctx = figures.Context(table=data, answers=answers, fits=fits, fit_runs=fit_runs, out=out, comparison=comparison)
    drawn = figures.draw_all(ctx)

    table.write_export_csvs(data, out)
    atomic.write_json(out / "scaling_fits.json", _jsonable(fits), indent=2)

    with atomic.replacing(out / "ablation_table.csv", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=ablations.ABLATION_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in ablations.table_rows(answers):
            writer.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
            )

    decision_keys = (
        "id",
        "title",
        "runs",
        "winner",
        "runner_up",
        "margin",
        "noise",
        "verdict",
        "metric",
        "axis",
        "common_x",
        "winner_at_best",
        "margin_at_best",
        "unstable",
        "val_loss_ratio",
        "plan_rule",
        "training_noise",
        "by_kind",
        "provisional",
        "unchecked",
    )
    decisions: Decisions = {
        "questions": [{k: a[k] for k in decision_keys if k in a} for a in answers],
        "go_no_go": checklist,
        "decision2": report.decision2(data, fits, comparison),
        "decision3": decision3(fit_runs, fits, schedule or ScheduleInputs(), [Path(p) for p in paths]),
        "foveated_vs_baseline": compare.without_draws(comparison),
        "replication": noise.replication(data, answers, comparison),
    }
    atomic.write_json(out / "decisions.json", _jsonable(decisions), indent=2)
    report.write_report(
        out / "report.md",
        data,
        answers,
        fits,
        checklist,
        decisions["decision2"],
        drawn,
        paths,
        comparison,
        decisions["decision3"],
    )
    with (out / "report.md").open("a") as handle:
        handle.write("\n".join(noise.replication_markdown(decisions["replication"])) + "\n")
    return {
        "runs": len(data.runs),
        "figures": sum(1 for _, p, _ in drawn if p),
        "absent": sum(1 for _, p, _ in drawn if p is None),
    }


def _jsonable(value: Any) -> Any:
    """NaN and infinities become null: JSON has no NaN, and a missing number is what they mean."""
    import math

    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
