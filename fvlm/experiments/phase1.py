"""Phase 1 of the plan as a pipeline: the ablation sweep, the locked config, the scaling grid, the
evaluation of F3 in every mode, the foveation evidence and the report (`fvlm phase1`, `fvlm sweep`).

Folder layout (`--out`, default runs/phase1-<preset>):
    <out>/data/            the synthetic set, generated once (tiny preset, no --data)
    <out>/ablations/       Phase 1a: one run folder per run, sweep.csv, sweep_state.json, locked_config.json
    <out>/scaling/         Phase 1b: the same for the grid
    <out>/report/          fvlm analyze of both: report.md, figures, decisions.json, the export files
    <out>/decisions.json   the analysis's decisions plus the locked config and how it was chosen
    <out>/evidence.json    foveation evidence (fvlm.experiments.evidence), summarised in the report
`fvlm sweep ablations` and `fvlm sweep scaling` take the sweep folder itself as --out (default:
the matching sub-folder of runs/phase1-<preset>), so running the sweeps by hand and running
`fvlm phase1` share their runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvlm import run_folder as rf
from fvlm.analysis.cli import analyze
from fvlm.errors import UsageError, read_json
from fvlm.experiments import decide, matrix, runner
from fvlm.experiments.estimate import estimate, fmt_seconds
from fvlm.experiments.evidence import (
    EvidenceSettings,
    collect_evidence,
    decisions_summary,
    evidence_markdown,
    grid_reading,
)
from fvlm.experiments.milestones import phase1b_step
from fvlm.experiments.presets import Preset, get_preset
from fvlm.experiments.runner import Sweep, diff_text, keep_workers
from fvlm.experiments.slurm import SlurmSettings
from fvlm.model.backbones import shape_folder_name
from fvlm.model.pretrain_tiny import ensure_tiny_backbones

# The largest --scale: the paper preset's million samples per ablation become a billion.
MAX_SCALE = 1000.0
F1_NOTE = "if F1 (frozen backbones) wins the freeze question, LR2, LR3 and LR4 are skipped"


@dataclass
class Plan:
    """What a sweep command runs: the preset, its output folder, the overrides for every run and the
    overrides per size of the scaling grid."""

    preset: Preset
    folder: Path
    common: dict[str, Any]
    by_size: dict[str, dict[str, Any]]
    seed_offset: int = 0


def plan(
    preset_name: str,
    out: str | None,
    overrides: list[str],
    data: str | None,
    sub_folder: str | None,
    scale: float = 1.0,
    replicates: int | None = None,
    seed_offset: int = 0,
) -> Plan:
    """A sweep's folder is `out`, else <root>/phase1-<preset>[-x<scale>]/<sub_folder>; phase1's (no
    sub_folder) is `out`, else <root>/phase1-<preset>[-x<scale>]. The root is $FVLM_OUT, else runs.

    `scale` multiplies the plan's sample budgets: the ablation budget and the grid's FLOP budgets
    alike, so that C3 stays beside the ablation budget at the smallest size, as the plan places it.
    A train.max_samples override still sets the ablation budget exactly.

    `replicates` sets every training-noise replicate count of the preset; `seed_offset` shifts every
    run's seed (a whole second Phase 1 whose verdicts can be set beside the first), into a folder
    named -seed<offset>."""
    preset = get_preset(preset_name)
    if replicates is not None:
        preset = preset.with_replicates(replicates)
    if seed_offset < 0:
        raise UsageError(f"--seed-offset must be >= 0, got {seed_offset}")
    if not (math.isfinite(scale) and 0 < scale <= MAX_SCALE):
        raise UsageError(f"--scale must be a number > 0 and at most {MAX_SCALE:g}, got {scale:g}")
    name = f"phase1-{preset.name}"
    if scale != 1:
        preset = dataclasses.replace(
            preset,
            ablation_samples=max(1, round(preset.ablation_samples * scale)),
            budgets={k: v * scale for k, v in preset.budgets.items()},
        )
        name += f"-x{scale:g}"
    if seed_offset:
        name += f"-seed{seed_offset}"
    default = Path(os.environ.get("FVLM_OUT") or "runs") / name
    folder = Path(out) if out else (default / sub_folder if sub_folder else default)
    sizes = tuple(s.label for s in preset.sizes)
    common, by_size = matrix.split_overrides(overrides, sizes)
    common.update(runner.data_overrides(data))
    # Every run's sample count is set by the plan (the ablation budget, or a grid cell's FLOP budget),
    # so a train.max_samples override would be shown in the dry run and then silently replaced. It
    # sets the ablation budget; the grid's cells take theirs from the FLOP budgets only.
    for where in [common, *by_size.values()]:
        if "train.max_samples" in where and (sub_folder == "scaling" or where is not common):
            raise UsageError(
                "train.max_samples: the scaling grid sizes every cell from its FLOP budget, so it "
                "cannot be overridden there (it sets the ablation budget of fvlm sweep ablations "
                "and fvlm phase1)"
            )
    if "train.max_samples" in common:
        samples = int(common.pop("train.max_samples"))
        if samples < 1:
            raise UsageError(f"train.max_samples must be >= 1 for a sweep, got {samples}")
        preset = dataclasses.replace(preset, ablation_samples=samples)
    return Plan(preset, folder, common, by_size, seed_offset)


def _log(text: str) -> None:
    print(text, flush=True)


def _with_backbones(preset, common: dict[str, Any], by_size: dict[str, dict[str, Any]], data_root: Path | None):
    """The tiny preset's pretrained backbones (copied or made once under <data_root>/backbones) as model.llm /
    model.dino overrides for every run and model.llm per size, where the user gave none. A dry run
    (no data_root) keeps the shape names: same architecture, same FLOPs, nothing made."""
    if preset.tiny_backbones is None or data_root is None:
        return common, by_size
    wanted = (
        "model.llm" not in common
        or "model.dino" not in common
        or any("model.llm" not in by_size.get(s.label, {}) for s in preset.sizes)
    )
    if not wanted:
        return common, by_size
    folder = ensure_tiny_backbones(data_root / "backbones", preset.tiny_backbones, log=_log)
    common = {"model.llm": str(folder / "tiny-llm"), "model.dino": str(folder / "tiny-dino"), **common}
    by_size = {label: dict(v) for label, v in by_size.items()}
    for size in preset.sizes:  # a size's own LLM wins over model.llm, as with shape names
        by_size.setdefault(size.label, {}).setdefault("model.llm", str(folder / shape_folder_name(size.llm, "llm")))
    return common, by_size


def _ablation_base(preset, common, data_root: Path | None):
    common, _ = _with_backbones(preset, common, {}, data_root)
    base = matrix.ablation_base(preset, common)
    return runner.resolve_synthetic(preset.config, base, data_root) if data_root else base


def _scaling_base(preset, common, locked: dict[str, Any], data_root: Path | None):
    base = {
        **preset.overrides,
        "optim.lr_connector": preset.connector_lr,
        "optim.lr_dino": preset.backbone_lr,
        "optim.lr_llm": preset.backbone_lr,
        **common,
        **locked,
    }
    return runner.resolve_synthetic(preset.config, base, data_root) if data_root else base


def _print_matrix(title: str, sweep, preset, jobs: int, measure: bool, as_json: bool, notes: list[str]) -> dict:
    est = estimate(sweep.planned, preset, jobs, measure=measure, folders=[sweep.folder])
    rows = []
    for p, e in zip(sweep.planned, est["rows"]):
        rows.append(
            {
                "run_id": p.spec.run_id,
                "description": p.spec.description,
                "diff": p.spec.diff,
                "samples": p.spec.samples,
                "flops_per_sample": p.flops_per_sample,
                "flops": e["flops"],
                "est_seconds": e["seconds"],
                **({"budget": p.spec.meta["budget"]} if "budget" in p.spec.meta else {}),
                **({"replicate_of": p.spec.meta["replicate_of"]} if "replicate_of" in p.spec.meta else {}),
            }
        )
    replicas = [(r, e) for r, e in zip(rows, est["rows"]) if "replicate_of" in r]
    if replicas:
        # What the training-noise replicates add to the plan's own runs, in FLOPs and in time.
        def share(key: str) -> tuple[float, float]:
            extra = sum(e.get(key) or 0.0 for _, e in replicas)
            return extra, extra / max(sum(e.get(key) or 0.0 for e in est["rows"]) - extra, 1e-30)

        flops, flops_share = share("flops")
        seconds, seconds_share = share("seconds")
        est["replicates"] = {
            "runs": len(replicas),
            "flops": flops,
            "flops_share": flops_share,
            "run_seconds": seconds,
            "seconds_share": seconds_share,
        }
        if "gpu_hours" in est:
            est["replicates"]["gpu_hours"] = est["gpu_hours"] * seconds_share / (1 + seconds_share)
        notes = [
            *notes,
            f"training-noise replicates (<run>.s<k>, another seed each): {len(replicas)} runs, "
            f"{flops:.3g} FLOPs, +{flops_share:.0%} of the plan's runs' FLOPs"
            + (
                f", {est['replicates']['gpu_hours']:.1f} GPU-hours (+{seconds_share:.0%})"
                if "gpu_hours" in est
                else f", +{seconds_share:.0%} of their run time"
            ),
        ]
    record = {
        "sweep": sweep.kind,
        "preset": preset.name,
        "out": str(sweep.folder),
        "base": sweep.base,
        "runs": rows,
        "estimate": {k: v for k, v in est.items() if k != "rows"},
        "notes": notes,
    }
    if as_json:
        return record
    print(f"{title}: {len(rows)} runs -> {sweep.folder}")
    print(f"  base: {preset.config} + {diff_text(sweep.base)}")
    print(f"  {'run':<14}{'samples':>10}{'FLOPs':>11}{'est.':>9}   difference from the base")
    for r in rows:
        print(
            f"  {r['run_id']:<14}{r['samples']:>10,}{r['flops']:>11.3g}{fmt_seconds(r['est_seconds']):>9}   "
            f"{diff_text({k: v for k, v in r['diff'].items() if not k.startswith('train.') or k == 'train.stage'})}"
        )
    total = (
        f"  total: {sum(r['samples'] for r in rows):,} samples, {est['total_flops']:.3g} FLOPs, "
        f"about {fmt_seconds(est['wall_seconds'])} wall"
    )
    if "gpu_hours" in est:
        total += f", {est['gpu_hours']:.1f} GPU-hours, ${est['cost_usd']:,.0f} ({est['cost_basis']})"
    print(total)
    print(f"  estimate from {est['basis']}")
    for note in notes:
        print(f"  note: {note}")
    return record


# ----------------------------------------------------------------------------- ablations


def ablation_matrix(
    preset, base: dict[str, Any], seed_offset: int = 0, freeze_winner: str | None = None
) -> list[matrix.RunSpec]:
    """The twelve runs (at the seed offset) and, after them, their training-noise replicates."""
    seed = int(base.get("seed", 0))
    specs = matrix.seeded(matrix.ablation_specs(preset, freeze_winner), seed, seed_offset)
    return specs + matrix.replicate_specs(specs, preset.ablation_replicates, seed, seed_offset)


def grid_matrix(
    preset, base: dict[str, Any], specs: list[matrix.RunSpec], seed_offset: int = 0
) -> list[matrix.RunSpec]:
    """The grid's cells (at the seed offset) and the replicates of both arms at the replicate budgets."""
    seed = int(base.get("seed", 0))
    specs = matrix.seeded(specs, seed, seed_offset)
    budgets = preset.replicate_budgets
    counts = {
        s.run_id: preset.grid_replicates
        for s in specs
        if s.meta.get("budget") in budgets and not s.run_id.endswith("-isoflop")
    }
    return specs + matrix.replicate_specs(specs, counts, seed, seed_offset)


def run_ablations(
    preset,
    folder: Path,
    base: dict[str, Any],
    jobs: int,
    retry_failed: bool = False,
    slurm=None,
    seed_offset: int = 0,
) -> dict[str, Any]:
    """Phase 1a with the plan's conditional: F1-F3 (and the runs that do not depend on them) first;
    when F1 wins the freeze question, LR2-LR4 are skipped. The replicates come last; the locked
    config is chosen from the twelve alone. Returns the locked config record."""
    every = ablation_matrix(preset, base, seed_offset)
    first = [s for s in every if s.run_id in ("F1", "F2", "F3", "A1", "A6", "B1")]
    Sweep(folder, "ablations", preset.config, base, first, preset.sample_shape, jobs, _log, slurm).run(retry_failed)
    freeze = decide.freeze_choice(folder, every)
    _log(f"[ablations] freeze question: {freeze.get('choice')} ({freeze.get('reason')})")
    skipped = {}
    if freeze.get("choice") == "F1":
        reason = "skipped: F1 (frozen backbones) won the freeze question, so only the connector LR matters (plan)"
        skipped = {rid: reason for rid in matrix.LR_IDS}
        _log(f"[ablations] LR2, LR3, LR4 {reason}")
    specs = ablation_matrix(preset, base, seed_offset, freeze_winner=freeze.get("choice"))
    Sweep(folder, "ablations", preset.config, base, specs, preset.sample_shape, jobs, _log, slurm).run(retry_failed)
    locked = decide.lock(folder, every, skipped)
    _log(
        f"[ablations] locked config: {json.dumps(locked['overrides']) if locked['overrides'] else '(the F3 baseline)'}"
        f" -> {folder / 'locked_config.json'}"
    )
    return locked


def dry_run_ablations(plan: Plan, jobs: int, measure: bool, as_json: bool) -> None:
    base = _ablation_base(plan.preset, plan.common, None)
    sweep = Sweep(
        plan.folder,
        "ablations",
        plan.preset.config,
        base,
        ablation_matrix(plan.preset, base, plan.seed_offset),
        plan.preset.sample_shape,
        jobs,
    )
    record = _print_matrix("fvlm sweep ablations", sweep, plan.preset, jobs, measure, as_json, [F1_NOTE])
    if as_json:
        print(json.dumps(record, indent=1, default=str))


def sweep_ablations(plan: Plan, jobs: int, retry_failed: bool, slurm: SlurmSettings | None) -> dict[str, Any]:
    base = _ablation_base(plan.preset, plan.common, plan.folder)
    return run_ablations(plan.preset, plan.folder, base, jobs, retry_failed, slurm, plan.seed_offset)


# ----------------------------------------------------------------------------- scaling


def _scaling_sweep(preset, folder, common, by_size, locked, formula, data_root, jobs, slurm=None, seed_offset=0):
    common, by_size = _with_backbones(preset, common, by_size, data_root)
    base = _scaling_base(preset, common, locked, data_root)
    specs = grid_matrix(preset, base, matrix.scaling_specs(preset, base, by_size, formula), seed_offset)
    return Sweep(folder, "scaling", preset.config, base, specs, preset.sample_shape, jobs, _log, slurm)


def dry_run_scaling(plan: Plan, locked: dict[str, Any], formula: str, jobs: int, measure: bool, as_json: bool) -> None:
    preset = plan.preset
    sweep = _scaling_sweep(
        preset, plan.folder, plan.common, plan.by_size, locked, formula, None, jobs, seed_offset=plan.seed_offset
    )
    notes = [
        "budgets: "
        + ", ".join(f"{k}={v:.3g}" for k, v in preset.budgets.items())
        + f" FLOPs; samples = budget / FLOPs per sample ({formula} formula, "
        f"{preset.sample_shape[0]} frames + {preset.sample_shape[1]} text tokens)",
        "B cells are iso-sample (the F cell's samples); B-isoflop cells match the F cell's FLOPs",
    ]
    if not locked:
        notes.append("no --winner: every cell uses the F3 baseline config")
    record = _print_matrix("fvlm sweep scaling", sweep, preset, jobs, measure, as_json, notes)
    if as_json:
        print(json.dumps(record, indent=1, default=str))


def sweep_scaling(
    plan: Plan, locked: dict[str, Any], formula: str, jobs: int, retry_failed: bool, slurm: SlurmSettings | None
) -> dict[str, str]:
    sweep = _scaling_sweep(
        plan.preset, plan.folder, plan.common, plan.by_size, locked, formula, plan.folder, jobs, slurm, plan.seed_offset
    )
    return sweep.run(retry_failed)


# ----------------------------------------------------------------------------- phase1


def dry_run_phase1(plan: Plan, formula: str, jobs: int, measure: bool, as_json: bool) -> None:
    preset, root = plan.preset, plan.folder
    base = _ablation_base(preset, plan.common, None)
    abl = Sweep(
        root / "ablations",
        "ablations",
        preset.config,
        base,
        ablation_matrix(preset, base, plan.seed_offset),
        preset.sample_shape,
        jobs,
    )
    sca = _scaling_sweep(
        preset, root / "scaling", plan.common, plan.by_size, {}, formula, None, jobs, seed_offset=plan.seed_offset
    )
    notes_s = ["every cell gets the config locked from the ablations (shown here: the F3 baseline)"]
    records = [_print_matrix("phase 1a: fvlm sweep ablations", abl, preset, jobs, measure, as_json, [F1_NOTE])]
    if not as_json:
        print()
    records.append(_print_matrix("phase 1b: fvlm sweep scaling", sca, preset, jobs, measure, as_json, notes_s))
    if as_json:
        print(json.dumps({"preset": preset.name, "out": str(root), "sweeps": records}, indent=1, default=str))
    else:
        wall = sum(r["estimate"]["wall_seconds"] for r in records)
        print(f"\nphase 1 total: about {fmt_seconds(wall)} wall, then the analysis")


def run_phase1(
    preset,
    root: Path,
    common: dict[str, Any],
    by_size: dict[str, dict[str, Any]],
    jobs: int,
    formula: str = "exact",
    retry_failed: bool = False,
    slurm=None,
    seed_offset: int = 0,
) -> dict[str, Any]:
    """Ablations -> locked config -> F3 in three modes -> scaling grid -> foveation evidence -> report,
    under `root`."""
    began = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    ablation_dir, scaling_dir, report_dir = root / "ablations", root / "scaling", root / "report"
    _log(
        f"fvlm phase1 --preset {preset.name} -> {root} "
        + (
            f"(each run a SLURM job: {slurm.nodes} node(s) x {slurm.gpus_per_node} GPU(s))"
            if slurm
            else f"({jobs} run(s) side by side)"
        )
    )
    base = _ablation_base(preset, common, root)
    with keep_workers():  # the same worker processes train the three sweeps
        locked = run_ablations(preset, ablation_dir, base, jobs, retry_failed, slurm, seed_offset)
        evaluate_modes(preset, ablation_dir / "F3", base)
        sweep = _scaling_sweep(
            preset, scaling_dir, common, by_size, locked["overrides"], formula, root, jobs, slurm, seed_offset
        )
        sweep.run(retry_failed)
    phase1b_step(preset, scaling_dir, base, _log, jobs if slurm is None else 1)
    evidence = foveation_evidence(preset, root, ablation_dir, scaling_dir, jobs)
    summary = write_report(preset, root, ablation_dir, scaling_dir, report_dir, locked, evidence, jobs)
    _log(
        f"fvlm phase1: done in {(time.perf_counter() - began) / 60:.1f} min; report {report_dir / 'report.md'} "
        f"({summary['figures']} figures), decisions {root / 'decisions.json'}"
    )
    return summary


def evaluate_modes(preset, run_dir: Path, base: dict[str, Any]) -> None:
    """F3 (the baseline every question is asked against) in all three inference modes, on the
    synthetic multiple-choice benchmark when there is one, with attention pictures: the report's
    eval-mode figure (Fig 7). Skipped when already done; a failure is reported, not fatal."""
    # fvlm.eval imports torch: loaded here, so that `fvlm --help` (which imports this module) stays fast.
    from fvlm.eval.evaluate import evaluate_run

    if (rf.eval_dir(run_dir) / rf.EVAL_JSON).is_file() or not (run_dir / rf.SUMMARY).is_file():
        return
    settings: dict[str, Any] = {"attention": 4}
    if preset.name == "tiny":
        settings["max_samples"] = int(preset.overrides.get("train.eval_samples", 64))
    bench = Path(str(base.get("data.val", ""))).parent / "bench"
    if base.get("data.val") and bench.is_dir():
        settings["benches"] = [str(bench)]
    _log(f"[phase1] evaluating {run_dir} in every mode ({', '.join(f'{k}={v}' for k, v in settings.items())})")
    try:
        path = evaluate_run(run_dir, **settings)
    except UsageError as exc:
        _log(f"[phase1] evaluation of {run_dir.name} failed ({exc}); the report goes on without Fig 7")
        return
    _log(f"[phase1] wrote {path}")


def foveation_evidence(
    preset, root: Path, ablation_dir: Path, scaling_dir: Path, jobs: int = 1
) -> dict[str, Any] | None:
    """<root>/evidence.json (fvlm.experiments.evidence): pixel check, benchmark, paired differences
    and attention on the mover, for the ablations and the grid's largest-budget cells, `jobs` runs
    side by side. Kept as it is when no run changed; a failure leaves the report without the
    section, logged, not fatal."""
    import torch  # here, not at the top, for the same reason as fvlm.eval in evaluate_modes

    settings = EvidenceSettings(**{"device": "cuda" if torch.cuda.is_available() else "cpu", **preset.evidence})
    try:
        return collect_evidence(
            root,
            ablation_dir,
            scaling_dir,
            settings,
            jobs=jobs,
            log=_log,
            budget=max(preset.budgets, key=preset.budgets.get),
            sizes=tuple(s.label for s in preset.sizes),
        )
    except Exception as exc:
        _log(f"[phase1] foveation evidence failed ({type(exc).__name__}: {exc}); the report goes on without it")
        return None


READING_QUESTION = "Do the grid's largest cells read the pixels? (foveation evidence)"


def _add_table_row(markdown: str, section: str, row: dict[str, str]) -> str:
    """`markdown` with a `| question | answer |` row added at the end of the first table under the
    heading `section`."""
    lines = markdown.split("\n")
    at = next(i for i, line in enumerate(lines) if line.startswith(section))
    first = next(i for i in range(at, len(lines)) if lines[i].startswith("|"))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join([*lines[:end], f"| {row['question']} | {row['answer']} |", *lines[end:]])


def write_report(
    preset,
    root: Path,
    ablation_dir: Path,
    scaling_dir: Path,
    report_dir: Path,
    locked: dict[str, Any],
    evidence: dict[str, Any] | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Analysis of both sweeps (its bootstrap refits on `jobs` processes), then the locked config
    (and the foveation evidence, when given) added to decisions.json and report.md."""
    tmp = report_dir.with_name(report_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    grid = grid_reading(evidence) if evidence is not None else None
    summary = analyze(
        [str(ablation_dir), str(scaling_dir)],
        tmp,
        ["?-C*"],
        n_boot=preset.analysis_bootstrap,
        reading=grid["reads_pixels"] if grid is not None else None,
        jobs=jobs,
    )
    decisions = read_json(tmp / "decisions.json")
    decisions["locked_config"] = locked
    if evidence is not None:
        decisions["foveation_evidence"] = decisions_summary(evidence)
        if grid is not None:  # Decision 2's answers are only about looking where the cells look
            row = {"question": READING_QUESTION, "answer": grid["sentence"]}
            decisions["decision2"].append(row)
            report_md = tmp / "report.md"
            report_md.write_text(_add_table_row(report_md.read_text(), "## Decision 2", row))
    (tmp / "decisions.json").write_text(json.dumps(decisions, indent=2) + "\n")
    with (tmp / "report.md").open("a") as report:
        report.write("\n## Locked configuration (fvlm phase1)\n\n")
        report.write(
            "The scaling grid was trained with the F3 baseline plus these overrides, chosen from the "
            "ablation runs (`ablations/locked_config.json`):\n\n"
        )
        report.write("| question | choice | adopted | reason |\n|---|---|---|---|\n")
        for c in locked["choices"]:
            adopted = ", ".join(f"`{k}={v}`" for k, v in c["adopted"].items()) or "nothing"
            report.write(f"| {c['question']} | {c.get('choice') or '-'} | {adopted} | {c.get('reason', '')} |\n")
        if evidence is not None:
            report.write(evidence_markdown(evidence))
    if report_dir.exists():
        shutil.rmtree(report_dir)
    tmp.rename(report_dir)
    shutil.copyfile(report_dir / "decisions.json", root / "decisions.json")
    return summary
