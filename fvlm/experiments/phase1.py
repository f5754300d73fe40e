"""`fvlm sweep ablations|scaling` and `fvlm phase1`: the plan as commands.

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

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fvlm.errors import UsageError

ANALYSIS_BOOTSTRAP = {"tiny": 50, "paper": 200}


def _add_common(parser: argparse.ArgumentParser, default_hint: str) -> None:
    parser.add_argument("--preset", default="tiny", help="tiny (CPU, synthetic data, minutes) or paper (the plan)")
    parser.add_argument("--out", help=f"output folder (default: {default_hint})")
    parser.add_argument("--data", help="data: a folder with train/ val/ probe/ (as `fvlm data synth` writes) or a "
                                       "shard folder / mix file for data.train (default: the preset's)")
    parser.add_argument("--dry-run", action="store_true", help="print the run matrix and time estimate; run nothing")
    parser.add_argument("--json", action="store_true", help="with --dry-run: the matrix as JSON")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs side by side on a CPU machine (default: the preset's, at most the CPU count)")
    parser.add_argument("--retry-failed", action="store_true", help="run failed runs again instead of skipping them")
    parser.add_argument("--no-measure", action="store_true", help="with --dry-run: do not time the models here")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="local: run here (default); slurm: submit each run as a SLURM job through submitit "
                             "and wait for them (re-running re-attaches and never submits a run twice)")
    slurm = parser.add_argument_group("SLURM (with --launcher slurm)")
    slurm.add_argument("--slurm-partition")
    slurm.add_argument("--slurm-gpus", type=int, default=1, help="GPUs per node for each run (torchrun inside)")
    slurm.add_argument("--slurm-nodes", type=int, default=1, help="nodes per run")
    slurm.add_argument("--slurm-time", type=int, default=24 * 60, help="time limit per job, minutes")
    slurm.add_argument("--slurm-account")
    slurm.add_argument("--slurm-qos")
    slurm.add_argument("--slurm-cpus-per-gpu", type=int, default=8)
    slurm.add_argument("--slurm-mem-gb", type=int)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides for every run; SIZE:key=value (e.g. M:optim.lr_llm=5e-6, "
                             "L:model.llm=/models/SmolLM2-1.7B) for one size of the scaling grid")


def register(sub) -> None:
    sweep = sub.add_parser("sweep", help="run one of the plan's sweeps (ablations or the scaling grid)",
                           description="Run the plan's ablation sweep or scaling grid. Re-running the same "
                                       "command skips finished runs and resumes an interrupted one.")
    kinds = sweep.add_subparsers(dest="sweep_kind", metavar="KIND", required=True)
    abl = kinds.add_parser("ablations", help="Phase 1a: F1-F3, LR2-LR4, A1, A6, B1, A8a/b, D1")
    _add_common(abl, "runs/phase1-<preset>/ablations")
    abl.set_defaults(func=cmd_sweep_ablations)
    sca = kinds.add_parser("scaling", help="Phase 1b: sizes x FLOP budgets x {foveated, multi-token}")
    _add_common(sca, "runs/phase1-<preset>/scaling")
    sca.add_argument("--flops-formula", choices=("exact", "seed"), default="exact",
                     help="samples per cell from the exact FLOP counter, or the plan's 2*N*tokens (seed)")
    sca.add_argument("--winner", help="locked_config.json of an ablation sweep (or its folder) to apply to every cell")
    sca.set_defaults(func=cmd_sweep_scaling)

    phase1 = sub.add_parser("phase1", help="the main job: ablations -> locked config -> scaling grid -> report",
                            description="Phase 1 end to end: the ablation sweep, the locked config chosen from "
                                        "it, the scaling grid with that config, and the analysis report. "
                                        "Re-running resumes.")
    _add_common(phase1, "runs/phase1-<preset>")
    phase1.add_argument("--flops-formula", choices=("exact", "seed"), default="exact")
    phase1.set_defaults(func=cmd_phase1)


# ----------------------------------------------------------------------------- shared set-up


def _slurm(args):
    """The SLURM settings of `--launcher slurm`, or None for the local launcher."""
    if args.launcher != "slurm":
        return None
    from fvlm.experiments.slurm import SlurmSettings

    settings = SlurmSettings(partition=args.slurm_partition, gpus_per_node=args.slurm_gpus, nodes=args.slurm_nodes,
                             time_min=args.slurm_time, account=args.slurm_account, qos=args.slurm_qos,
                             cpus_per_gpu=args.slurm_cpus_per_gpu, mem_gb=args.slurm_mem_gb)
    settings.validate()
    if not args.dry_run:
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise UsageError("--launcher slurm needs submitit (pip install 'fvlm[slurm]')") from None
    return settings


def _jobs(args, preset) -> int:
    if args.jobs is not None:
        if args.jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
        return args.jobs
    return max(1, min(preset.jobs, os.cpu_count() or 1))


def _setup(args, sub_folder: str | None):
    """(preset, output folder, overrides for every run, overrides per size). A sweep's folder is its
    --out, else runs/phase1-<preset>/<sub_folder>; phase1's is its --out, else runs/phase1-<preset>."""
    from fvlm.experiments import matrix, runner
    from fvlm.experiments.presets import get_preset

    preset = get_preset(args.preset)
    default = Path("runs") / f"phase1-{preset.name}"
    folder = Path(args.out) if args.out else (default / sub_folder if sub_folder else default)
    sizes = tuple(s.label for s in preset.sizes)
    common, by_size = matrix.split_overrides(args.overrides, sizes)
    common.update(runner.data_overrides(args.data))
    # Every run's sample count is set by the plan (the ablation budget, or a grid cell's FLOP budget),
    # so a train.max_samples override would be shown in the dry run and then silently replaced. It
    # sets the ablation budget; the grid's cells take theirs from the FLOP budgets only.
    for where in [common, *by_size.values()]:
        if "train.max_samples" in where and (sub_folder == "scaling" or where is not common):
            raise UsageError("train.max_samples: the scaling grid sizes every cell from its FLOP budget, so it "
                             "cannot be overridden there (it sets the ablation budget of fvlm sweep ablations "
                             "and fvlm phase1)")
    if "train.max_samples" in common:
        samples = int(common.pop("train.max_samples"))
        if samples < 1:
            raise UsageError(f"train.max_samples must be >= 1 for a sweep, got {samples}")
        preset = dataclasses.replace(preset, ablation_samples=samples)
    return preset, folder, common, by_size


def _log(text: str) -> None:
    print(text, flush=True)


def _with_backbones(preset, common: dict[str, Any], by_size: dict[str, dict[str, Any]], data_root: Path | None):
    """The tiny preset's pretrained backbones (made once under <data_root>/backbones) as model.llm /
    model.dino overrides for every run and model.llm per size, where the user gave none. A dry run
    (no data_root) keeps the shape names: same architecture, same FLOPs, nothing made."""
    if preset.tiny_backbones is None or data_root is None:
        return common, by_size
    from fvlm.model.backbones import shape_folder_name
    from fvlm.model.pretrain_tiny import ensure_tiny_backbones

    wanted = "model.llm" not in common or "model.dino" not in common or any(
        "model.llm" not in by_size.get(s.label, {}) for s in preset.sizes)
    if not wanted:
        return common, by_size
    folder = ensure_tiny_backbones(data_root / "backbones", preset.tiny_backbones, log=_log)
    common = {"model.llm": str(folder / "tiny-llm"), "model.dino": str(folder / "tiny-dino"), **common}
    by_size = {label: dict(v) for label, v in by_size.items()}
    for size in preset.sizes:  # a size's own LLM wins over model.llm, as with shape names
        by_size.setdefault(size.label, {}).setdefault("model.llm", str(folder / shape_folder_name(size.llm, "llm")))
    return common, by_size


def _ablation_base(preset, common, data_root: Path | None):
    from fvlm.experiments import matrix, runner

    common, _ = _with_backbones(preset, common, {}, data_root)
    base = matrix.ablation_base(preset, common)
    return runner.resolve_synthetic(preset.config, base, data_root) if data_root else base


def _scaling_base(preset, common, locked: dict[str, Any], data_root: Path | None):
    from fvlm.experiments import runner

    base = {**preset.overrides, "optim.lr_connector": preset.connector_lr, "optim.lr_dino": preset.backbone_lr,
            "optim.lr_llm": preset.backbone_lr, **common, **locked}
    return runner.resolve_synthetic(preset.config, base, data_root) if data_root else base


def _print_matrix(title: str, sweep, preset, jobs: int, measure: bool, as_json: bool, notes: list[str]) -> dict:
    from fvlm.experiments.estimate import estimate, fmt_seconds
    from fvlm.experiments.runner import diff_text

    est = estimate(sweep.planned, preset, jobs, measure=measure, folders=[sweep.folder])
    rows = []
    for p, e in zip(sweep.planned, est["rows"]):
        rows.append({"run_id": p.spec.run_id, "description": p.spec.description, "diff": p.spec.diff,
                     "samples": p.spec.samples, "flops_per_sample": p.flops_per_sample, "flops": e["flops"],
                     "est_seconds": e["seconds"], **({"budget": p.spec.meta["budget"]} if "budget" in p.spec.meta else {})})
    record = {"sweep": sweep.kind, "preset": preset.name, "out": str(sweep.folder), "base": sweep.base, "runs": rows,
              "estimate": {k: v for k, v in est.items() if k != "rows"}, "notes": notes}
    if as_json:
        return record
    print(f"{title}: {len(rows)} runs -> {sweep.folder}")
    print(f"  base: {preset.config} + {diff_text(sweep.base)}")
    print(f"  {'run':<14}{'samples':>10}{'FLOPs':>11}{'est.':>9}   difference from the base")
    for r in rows:
        print(f"  {r['run_id']:<14}{r['samples']:>10,}{r['flops']:>11.3g}{fmt_seconds(r['est_seconds']):>9}   "
              f"{diff_text({k: v for k, v in r['diff'].items() if not k.startswith('train.') or k == 'train.stage'})}")
    total = f"  total: {sum(r['samples'] for r in rows):,} samples, {est['total_flops']:.3g} FLOPs, " \
            f"about {fmt_seconds(est['wall_seconds'])} wall"
    if "gpu_hours" in est:
        total += f", {est['gpu_hours']:.1f} GPU-hours, ${est['cost_usd']:,.0f} ({est['cost_basis']})"
    print(total)
    print(f"  estimate from {est['basis']}")
    for note in notes:
        print(f"  note: {note}")
    return record


# ----------------------------------------------------------------------------- ablations


def run_ablations(preset, folder: Path, base: dict[str, Any], jobs: int, retry_failed: bool = False,
                  slurm=None) -> dict[str, Any]:
    """Phase 1a with the plan's conditional: F1-F3 (and the runs that do not depend on them) first;
    when F1 wins the freeze question, LR2-LR4 are skipped. Returns the locked config record."""
    from fvlm.experiments import decide, matrix
    from fvlm.experiments.runner import Sweep

    every = matrix.ablation_specs(preset)
    first = [s for s in every if s.run_id in ("F1", "F2", "F3", "A1", "A6", "B1")]
    Sweep(folder, "ablations", preset.config, base, first, preset.sample_shape, jobs, _log, slurm).run(retry_failed)
    freeze = decide.freeze_choice(folder, every)
    _log(f"[ablations] freeze question: {freeze.get('choice')} ({freeze.get('reason')})")
    skipped = {}
    if freeze.get("choice") == "F1":
        reason = "skipped: F1 (frozen backbones) won the freeze question, so only the connector LR matters (plan)"
        skipped = {rid: reason for rid in matrix.LR_IDS}
        _log(f"[ablations] LR2, LR3, LR4 {reason}")
    specs = matrix.ablation_specs(preset, freeze_winner=freeze.get("choice"))
    Sweep(folder, "ablations", preset.config, base, specs, preset.sample_shape, jobs, _log, slurm).run(retry_failed)
    locked = decide.lock(folder, every, skipped)
    _log(f"[ablations] locked config: {json.dumps(locked['overrides']) if locked['overrides'] else '(the F3 baseline)'}"
         f" -> {folder / 'locked_config.json'}")
    return locked


def cmd_sweep_ablations(args) -> int:
    from fvlm.experiments import matrix
    from fvlm.experiments.runner import Sweep

    preset, folder, common, by_size = _setup(args, "ablations")
    if by_size:
        raise UsageError("SIZE:key=value overrides apply to the scaling grid only")
    jobs = _jobs(args, preset)
    if args.dry_run:
        base = _ablation_base(preset, common, None)
        sweep = Sweep(folder, "ablations", preset.config, base, matrix.ablation_specs(preset), preset.sample_shape,
                      jobs)
        record = _print_matrix("fvlm sweep ablations", sweep, preset, jobs, not args.no_measure, args.json,
                               ["if F1 (frozen backbones) wins the freeze question, LR2, LR3 and LR4 are skipped"])
        if args.json:
            print(json.dumps(record, indent=1, default=str))
        return 0
    base = _ablation_base(preset, common, folder)
    run_ablations(preset, folder, base, jobs, args.retry_failed, _slurm(args))
    return 0


# ----------------------------------------------------------------------------- scaling


def _scaling_sweep(preset, folder, common, by_size, locked, formula, data_root, jobs, slurm=None):
    from fvlm.experiments import matrix
    from fvlm.experiments.runner import Sweep

    common, by_size = _with_backbones(preset, common, by_size, data_root)
    base = _scaling_base(preset, common, locked, data_root)
    specs = matrix.scaling_specs(preset, base, by_size, formula)
    return Sweep(folder, "scaling", preset.config, base, specs, preset.sample_shape, jobs, _log, slurm)


def cmd_sweep_scaling(args) -> int:
    from fvlm.experiments.decide import read_locked

    preset, folder, common, by_size = _setup(args, "scaling")
    locked = read_locked(Path(args.winner))["overrides"] if args.winner else {}
    jobs = _jobs(args, preset)
    sweep = _scaling_sweep(preset, folder, common, by_size, locked, args.flops_formula,
                           None if args.dry_run else folder, jobs, _slurm(args))
    if args.dry_run:
        notes = [f"budgets: " + ", ".join(f"{k}={v:.3g}" for k, v in preset.budgets.items())
                 + f" FLOPs; samples = budget / FLOPs per sample ({args.flops_formula} formula, "
                   f"{preset.sample_shape[0]} frames + {preset.sample_shape[1]} text tokens)",
                 "B cells are iso-sample (the F cell's samples); B-isoflop cells match the F cell's FLOPs"]
        if not locked:
            notes.append("no --winner: every cell uses the F3 baseline config")
        record = _print_matrix("fvlm sweep scaling", sweep, preset, jobs, not args.no_measure, args.json, notes)
        if args.json:
            print(json.dumps(record, indent=1, default=str))
        return 0
    sweep.run(args.retry_failed)
    return 0


# ----------------------------------------------------------------------------- phase1


def cmd_phase1(args) -> int:
    from fvlm.experiments import matrix
    from fvlm.experiments.runner import Sweep

    preset, root, common, by_size = _setup(args, None)
    jobs = _jobs(args, preset)
    ablation_dir, scaling_dir = root / "ablations", root / "scaling"
    if args.dry_run:
        base = _ablation_base(preset, common, None)
        abl = Sweep(ablation_dir, "ablations", preset.config, base, matrix.ablation_specs(preset), preset.sample_shape,
                    jobs)
        sca = _scaling_sweep(preset, scaling_dir, common, by_size, {}, args.flops_formula, None, jobs)
        notes_a = ["if F1 (frozen backbones) wins the freeze question, LR2, LR3 and LR4 are skipped"]
        notes_s = ["every cell gets the config locked from the ablations (shown here: the F3 baseline)"]
        records = [_print_matrix("phase 1a: fvlm sweep ablations", abl, preset, jobs, not args.no_measure, args.json,
                                 notes_a)]
        if not args.json:
            print()
        records.append(_print_matrix("phase 1b: fvlm sweep scaling", sca, preset, jobs, not args.no_measure,
                                     args.json, notes_s))
        if args.json:
            print(json.dumps({"preset": preset.name, "out": str(root), "sweeps": records}, indent=1, default=str))
        else:
            wall = sum(r["estimate"]["wall_seconds"] for r in records)
            from fvlm.experiments.estimate import fmt_seconds

            print(f"\nphase 1 total: about {fmt_seconds(wall)} wall, then the analysis")
        return 0

    run_phase1(preset, root, common, by_size, jobs, args.flops_formula, args.retry_failed, _slurm(args))
    return 0


def run_phase1(preset, root: Path, common: dict[str, Any], by_size: dict[str, dict[str, Any]], jobs: int,
               formula: str = "exact", retry_failed: bool = False, slurm=None) -> dict[str, Any]:
    """Ablations -> locked config -> F3 in three modes -> scaling grid -> foveation evidence -> report,
    under `root`."""
    began = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    ablation_dir, scaling_dir, report_dir = root / "ablations", root / "scaling", root / "report"
    _log(f"fvlm phase1 --preset {preset.name} -> {root} "
         + (f"(each run a SLURM job: {slurm.nodes} node(s) x {slurm.gpus_per_node} GPU(s))" if slurm
            else f"({jobs} run(s) side by side)"))
    base = _ablation_base(preset, common, root)
    locked = run_ablations(preset, ablation_dir, base, jobs, retry_failed, slurm)
    evaluate_modes(preset, ablation_dir / "F3", base)
    sweep = _scaling_sweep(preset, scaling_dir, common, by_size, locked["overrides"], formula, root, jobs, slurm)
    sweep.run(retry_failed)
    evidence = foveation_evidence(preset, root, ablation_dir, scaling_dir)
    summary = write_report(preset, root, ablation_dir, scaling_dir, report_dir, locked, evidence)
    _log(f"fvlm phase1: done in {(time.perf_counter() - began) / 60:.1f} min; report {report_dir / 'report.md'} "
         f"({summary['figures']} figures), decisions {root / 'decisions.json'}")
    return summary


def evaluate_modes(preset, run_dir: Path, base: dict[str, Any]) -> None:
    """F3 (the baseline every question is asked against) in all three inference modes, on the
    synthetic multiple-choice benchmark when there is one, with attention pictures: the report's
    eval-mode figure (Fig 7). Skipped when already done; a failure is reported, not fatal."""
    from fvlm.cli import main

    if (run_dir / "eval" / "eval.json").is_file() or not (run_dir / "run_summary.json").is_file():
        return
    argv = ["eval", str(run_dir), "--attention", "4"]
    if preset.name == "tiny":
        argv += ["--max-samples", str(preset.overrides.get("train.eval_samples", 64))]
    bench = Path(str(base.get("data.val", ""))).parent / "bench"
    if base.get("data.val") and bench.is_dir():
        argv += ["--bench", str(bench)]
    _log(f"[phase1] fvlm {' '.join(argv)}")
    code = main(argv)
    if code != 0:
        _log(f"[phase1] evaluation of {run_dir.name} failed (exit {code}); the report goes on without Fig 7")


def foveation_evidence(preset, root: Path, ablation_dir: Path, scaling_dir: Path) -> dict[str, Any] | None:
    """<root>/evidence.json (fvlm.experiments.evidence): pixel check, benchmark, paired differences
    and attention on the mover, for the ablations and the grid's largest-budget cells. Kept as it is
    when no run changed; a failure leaves the report without the section, logged, not fatal."""
    import torch

    from fvlm.experiments.evidence import EvidenceSettings, collect_evidence

    settings = EvidenceSettings(device="cuda" if torch.cuda.is_available() else "cpu")
    try:
        return collect_evidence(root, ablation_dir, scaling_dir, settings, log=_log,
                                budget=max(preset.budgets, key=preset.budgets.get),
                                sizes=tuple(s.label for s in preset.sizes))
    except Exception as exc:
        _log(f"[phase1] foveation evidence failed ({type(exc).__name__}: {exc}); the report goes on without it")
        return None


def write_report(preset, root: Path, ablation_dir: Path, scaling_dir: Path, report_dir: Path,
                 locked: dict[str, Any], evidence: dict[str, Any] | None = None) -> dict[str, Any]:
    """Analysis of both sweeps, then the locked config (and the foveation evidence, when given)
    added to decisions.json and report.md."""
    from fvlm.analysis.cli import analyze
    from fvlm.experiments.evidence import decisions_summary, evidence_markdown

    tmp = report_dir.with_name(report_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    summary = analyze([str(ablation_dir), str(scaling_dir)], tmp, ["?-C*"],
                      n_boot=ANALYSIS_BOOTSTRAP.get(preset.name, 200))
    decisions = json.loads((tmp / "decisions.json").read_text())
    decisions["locked_config"] = locked
    if evidence is not None:
        decisions["foveation_evidence"] = decisions_summary(evidence)
    (tmp / "decisions.json").write_text(json.dumps(decisions, indent=2) + "\n")
    with (tmp / "report.md").open("a") as report:
        report.write("\n## Locked configuration (fvlm phase1)\n\n")
        report.write("The scaling grid was trained with the F3 baseline plus these overrides, chosen from the "
                     "ablation runs (`ablations/locked_config.json`):\n\n")
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
