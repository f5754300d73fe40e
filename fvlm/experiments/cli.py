"""`fvlm sweep ablations|scaling` and `fvlm phase1`: argument parsing only; the pipeline is
`fvlm.experiments.phase1`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fvlm.errors import UsageError, check_folder_path, not_empty
from fvlm.experiments import phase1
from fvlm.experiments.decide import read_locked
from fvlm.experiments.presets import Preset
from fvlm.experiments.slurm import SlurmSettings


def _add_common(parser: argparse.ArgumentParser, default_hint: str) -> None:
    parser.add_argument("--preset", default="tiny", help="tiny (CPU, synthetic data, minutes) or paper (the plan)")
    parser.add_argument("--out", help=f"output folder (default: {default_hint})")
    parser.add_argument(
        "--data",
        help="data: a folder with train/ val/ probe/ (as `fvlm data synth` writes) or a "
        "shard folder / mix file for data.train (default: the preset's)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the plan's sample budgets (the ablation budget and the grid's FLOP budgets) by this; "
        "the default folder gets -x<scale> (default folders lie under $FVLM_OUT, else runs; tiny: 2 makes the largest model's cells read the pixels, "
        "in about twice the time)",
    )
    parser.add_argument(
        "--replicates",
        type=int,
        default=None,
        help="extra seeds of each replicated run (training noise; default: the preset's, 0: none)",
    )
    parser.add_argument(
        "--seed-offset",
        type=int,
        default=0,
        help="shift every run's seed by this (a second whole Phase 1 to set beside the first; default "
        "folder gets -seed<offset>)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the run matrix and time estimate; run nothing")
    parser.add_argument("--json", action="store_true", help="with --dry-run: the matrix as JSON")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs side by side on a CPU machine (default: the preset's, at most the CPU count)",
    )
    parser.add_argument("--retry-failed", action="store_true", help="run failed runs again instead of skipping them")
    parser.add_argument("--no-measure", action="store_true", help="with --dry-run: do not time the models here")
    parser.add_argument(
        "--launcher",
        choices=("local", "slurm"),
        default="local",
        help="local: run here (default); slurm: submit each run as a SLURM job through submitit "
        "and wait for them (re-running re-attaches and never submits a run twice)",
    )
    slurm = parser.add_argument_group("SLURM (with --launcher slurm)")
    slurm.add_argument("--slurm-partition")
    slurm.add_argument("--slurm-gpus", type=int, default=1, help="GPUs per node for each run (torchrun inside)")
    slurm.add_argument("--slurm-nodes", type=int, default=1, help="nodes per run")
    slurm.add_argument("--slurm-time", type=int, default=24 * 60, help="time limit per job, minutes")
    slurm.add_argument("--slurm-account")
    slurm.add_argument("--slurm-qos")
    slurm.add_argument("--slurm-cpus-per-gpu", type=int, default=8)
    slurm.add_argument("--slurm-mem-gb", type=int)
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides for every run; SIZE:key=value (e.g. M:optim.lr_llm=5e-6, "
        "L:model.llm=/models/SmolLM2-1.7B) for one size of the scaling grid",
    )


def register(sub) -> None:
    sweep = sub.add_parser(
        "sweep",
        help="run one of the plan's sweeps (ablations or the scaling grid)",
        description="Run the plan's ablation sweep or scaling grid. Re-running the same "
        "command skips finished runs and resumes an interrupted one.",
    )
    kinds = sweep.add_subparsers(dest="sweep_kind", metavar="KIND", required=True)
    abl = kinds.add_parser("ablations", help="Phase 1a: F1-F3, LR2-LR4, A1, A6, B1, A8a/b, D1")
    _add_common(abl, "runs/phase1-<preset>/ablations")
    abl.set_defaults(func=cmd_sweep_ablations)
    sca = kinds.add_parser("scaling", help="Phase 1b: sizes x FLOP budgets x {foveated, multi-token}")
    _add_common(sca, "runs/phase1-<preset>/scaling")
    sca.add_argument(
        "--flops-formula",
        choices=("exact", "seed"),
        default="exact",
        help="samples per cell from the exact FLOP counter, or the plan's 2*N*tokens (seed)",
    )
    sca.add_argument("--winner", help="locked_config.json of an ablation sweep (or its folder) to apply to every cell")
    sca.set_defaults(func=cmd_sweep_scaling)

    p1 = sub.add_parser(
        "phase1",
        help="the main job: ablations -> locked config -> scaling grid -> report",
        description="Phase 1 end to end: the ablation sweep, the locked config chosen from "
        "it, the scaling grid with that config, and the analysis report. "
        "Re-running resumes.",
    )
    _add_common(p1, "runs/phase1-<preset>")
    p1.add_argument("--flops-formula", choices=("exact", "seed"), default="exact")
    p1.set_defaults(func=cmd_phase1)

    st = sub.add_parser(
        "stages",
        help="after Phase 1: stages 1-3 (and DPO) with evaluation, resumable",
        description="Stage 1 (all-token loss, Sweep 1's freeze), stage 2 (answer only, full unfreeze) and "
        "stage 3 (answer only or DPO), each from the previous stage's best checkpoint and evaluated in "
        "three modes; a summary across stages. Re-running resumes (docs/stages.md).",
    )
    st.add_argument("--preset", choices=("tiny", "paper"), help="tiny: synthetic data and tiny backbones")
    st.add_argument("--size", help="paper size: 135m, 360m or 1.7b (default: Decision 3's, else 135m)")
    st.add_argument("--out", help="output folder (default runs/stages-<tiny|size>)")
    st.add_argument("--from-decisions", metavar="PATH", help="Phase 1's decisions.json: locked config, sample counts")
    st.add_argument("--data", help="a folder of one shard folder per dataset, named as the stage mixes name them")
    st.add_argument("--bench", action="append", default=[], metavar="FILE", help="a benchmark for every stage's eval")
    st.add_argument("--heldout-pairs", metavar="PATH", help="held-out preference pairs for a DPO stage 3")
    for stage in (1, 2, 3):
        st.add_argument(f"--stage{stage}-samples", type=int, metavar="N", help=f"stage {stage}'s sample count")
    st.add_argument(
        "--variant",
        metavar="NAME",
        default="",
        help="run stage 3 as stage3-NAME on the same stages 1-2 (summary stages-NAME.md): compares stage-3 settings",
    )
    st.add_argument("--export", action="store_true", help="export the last stage (the tiny preset always does)")
    st.add_argument("--dry-run", action="store_true", help="print the plan and its cost, run nothing")
    st.add_argument("--json", action="store_true", help="the dry run as JSON")
    st.add_argument("items", nargs="*", metavar="key=value", help="overrides for every stage; N:key=value for stage N")
    st.set_defaults(func=cmd_stages)


def _slurm(args) -> SlurmSettings | None:
    """The SLURM settings of `--launcher slurm`, or None for the local launcher. The --slurm-* values
    are checked either way: a bad one is a mistake whatever the launcher."""
    settings = SlurmSettings(
        partition=args.slurm_partition,
        gpus_per_node=args.slurm_gpus,
        nodes=args.slurm_nodes,
        time_min=args.slurm_time,
        account=args.slurm_account,
        qos=args.slurm_qos,
        cpus_per_gpu=args.slurm_cpus_per_gpu,
        mem_gb=args.slurm_mem_gb,
    )
    settings.validate()
    if args.launcher != "slurm":
        return None
    if not args.dry_run:
        try:
            import submitit  # noqa: F401  (optional dependency: only checked for)
        except ImportError:
            raise UsageError("--launcher slurm needs submitit (pip install 'fvlm[slurm]')") from None
    return settings


def _jobs(args, preset: Preset) -> int:
    if args.jobs is not None:
        if args.jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
        return args.jobs
    return max(1, min(preset.jobs, os.cpu_count() or 1))


def _plan(args, sub_folder: str | None) -> phase1.Plan:
    not_empty(args, "preset", "out", "data")
    if args.out:
        check_folder_path(args.out, "--out")
    _slurm(args)  # the SLURM flags are checked before anything is planned
    return phase1.plan(
        args.preset, args.out, args.overrides, args.data, sub_folder, args.scale, args.replicates, args.seed_offset
    )


def cmd_sweep_ablations(args) -> int:
    plan = _plan(args, "ablations")
    if plan.by_size:
        raise UsageError("SIZE:key=value overrides apply to the scaling grid only")
    jobs = _jobs(args, plan.preset)
    if args.dry_run:
        phase1.dry_run_ablations(plan, jobs, measure=not args.no_measure, as_json=args.json)
    else:
        phase1.sweep_ablations(plan, jobs, args.retry_failed, _slurm(args))
    return 0


def cmd_sweep_scaling(args) -> int:
    plan = _plan(args, "scaling")
    locked = read_locked(Path(args.winner))["overrides"] if args.winner else {}
    jobs = _jobs(args, plan.preset)
    slurm = _slurm(args)
    if args.dry_run:
        phase1.dry_run_scaling(plan, locked, args.flops_formula, jobs, measure=not args.no_measure, as_json=args.json)
    else:
        phase1.sweep_scaling(plan, locked, args.flops_formula, jobs, args.retry_failed, slurm)
    return 0


def cmd_phase1(args) -> int:
    plan = _plan(args, None)
    jobs = _jobs(args, plan.preset)
    if args.dry_run:
        phase1.dry_run_phase1(plan, args.flops_formula, jobs, measure=not args.no_measure, as_json=args.json)
    else:
        phase1.run_phase1(
            plan.preset,
            plan.folder,
            plan.common,
            plan.by_size,
            jobs,
            args.flops_formula,
            args.retry_failed,
            _slurm(args),
            plan.seed_offset,
        )
    return 0


def cmd_stages(args) -> int:
    from fvlm.experiments import stages

    counts = {s: getattr(args, f"stage{s}_samples") for s in (1, 2, 3)}
    for stage, count in counts.items():
        if count is not None and count < 1:
            raise UsageError(f"--stage{stage}-samples must be >= 1, got {count}")
    pipeline = stages.plan(
        preset=args.preset,
        size=args.size,
        out=args.out,
        decisions=args.from_decisions,
        samples=counts,
        data=args.data,
        overrides=list(args.items),
        export=args.export,
        dry_run=args.dry_run,
        heldout_pairs=args.heldout_pairs,
        benches=args.bench,
        variant=args.variant,
    )
    if args.dry_run:
        stages.dry_run(pipeline, args.json)
    else:
        stages.run(pipeline)
    return 0
