"""After Phase 1: stages 1-3 as one resumable command (`fvlm stages`, docs/stages.md).

Stage 1 (alignment: all-token loss, caption data, Sweep 1's freeze), stage 2 (instruction: answer
tokens only, full unfreeze, differential learning rates) and stage 3 (refinement: answer tokens
only, or DPO against the frozen stage-2 model) run in order under one folder:

    <out>/stage1/ stage2/ stage3/   run folders (each with eval/eval.json: three modes on the benches)
    <out>/stage3/eval/dpo_heldout.json   the DPO stage's held-out reward margins (when it has pairs)
    <out>/mixes/stageN.yaml        the stage mix files pointed at --data (paper preset with --data)
    <out>/export/                  `fvlm export` of the last stage (tiny preset, or --export)
    <out>/stages.json, stages.md   the summary across stages, rewritten after every stage
    <out>/stage3-NAME/, stages-NAME.json, stages-NAME.md, export-NAME/   with --variant NAME: another
                                   stage 3 on the same stages 1-2 (to compare stage-3 settings)

Each stage starts from the previous stage's best checkpoint (lowest val loss). A rerun of the same
command skips finished stages and resumes an interrupted one exactly (the trainer resumes a run
folder exactly; the chain of init_from paths is a function of the finished stages).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fvlm import atomic
from fvlm import run_folder as rf
from fvlm.config import CONFIG_DIR, load_config, parse_overrides
from fvlm.errors import UsageError, read_json, read_yaml
from fvlm.experiments.matrix import RunSpec
from fvlm.experiments.presets import PAPER, TINY, TINY_DATA
from fvlm.experiments.runner import Planned

MIX_DIR = CONFIG_DIR / "mixes"
SIZES = {"135m": "paper_135m", "360m": "paper_360m", "1.7b": "paper_1.7b"}
STAGES = (1, 2, 3)
# Settings a later stage does not inherit from Phase 1's locked config: stage 2 and 3 unfreeze fully.
FREEZE_KEYS = ("model.freeze_dino", "model.freeze_llm")

# The tiny preset: Phase 1's tiny data and backbones; stage 1 on captions (no multiple choice),
# stage 2 on questions asked as multiple choice, stage 3 DPO on preference pairs of stage 1's set.
TINY_COMMON: dict[str, Any] = {
    **TINY_DATA,
    "data.synth_videos": 1500,
    "data.synth_images": 500,
    "data.synth_texts": 300,
    "data.synth_val": 96,
    "model.visual_scale": 0.3,
    "train.max_steps": 0,
    "train.eval_samples": 64,
    "train.probe_videos": 0,
    "train.keep_last": 1,
    "train.keep_milestones": 0,
    "train.log_every": 10,
    "train.cpu_threads": 1,
    "optim.lr_connector": 1e-2,
    "optim.lr_dino": 1e-3,
    "optim.lr_llm": 1e-3,
}
TINY_STAGES: dict[int, dict[str, Any]] = {
    1: {"train.stage": 1, "data.synth_mc_fraction": 0.0, "data.synth_pairs": 600, "train.eval_every": 100},
    2: {"train.stage": 2, "data.synth_mc_fraction": 1.0, "train.eval_every": 100},
    # DPO at learning rates 10x below stage 2's, plain (no SFT term): chosen from a sweep of learning
    # rate, beta, sft_weight and length (benchmarks/RESULTS.md, "DPO in stage 3"). At stage 2's rates
    # the policy over-optimises: the held-out chosen answers lose ~70 nats and the bench falls 0.3.
    3: {
        "train.stage": 3,
        "data.synth_mc_fraction": 1.0,
        "train.eval_every": 50,
        "train.dpo.enabled": True,
        "train.dpo.beta": 0.5,
        "train.dpo.sft_weight": 0.0,
        "optim.lr_connector": 1e-3,
        "optim.lr_dino": 1e-4,
        "optim.lr_llm": 1e-4,
        "optim.warmup_ratio": 0.0,
    },
}
TINY_SAMPLES = {1: 3000, 2: 4000, 3: 1200}


def _log(text: str) -> None:
    print(text, flush=True)


@dataclass
class StagePlan:
    stage: int
    run_id: str
    config: str  # a shipped config name or a path
    overrides: dict[str, Any]
    samples: int


@dataclass
class Pipeline:
    name: str  # tiny | 135m | 360m | 1.7b
    out: Path
    stages: list[StagePlan]
    export: bool
    eval_samples: int = 0  # 0: the whole val split
    notes: list[str] = field(default_factory=list)
    heldout_pairs: str | None = None  # held-out preference pairs for a DPO stage
    benches: list[str] = field(default_factory=list)  # fvlm eval --bench specs for every stage
    variant: str = ""  # a stage 3 of its own (stage3-<variant>/) on the shared stages 1-2

    def named(self, stem: str) -> str:
        """A stage-3 output's name: `stem`, or `stem-<variant>` for a variant."""
        return f"{stem}-{self.variant}" if self.variant else stem


# ----------------------------------------------------------------------------- planning


def split_stage_overrides(items: list[str]) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """`key=value` for every stage and `N:key=value` for stage N alone."""
    common: dict[str, Any] = {}
    per_stage: dict[int, dict[str, Any]] = {s: {} for s in STAGES}
    for key, value in parse_overrides(items):
        match = re.fullmatch(r"([0-9]+):(.+)", key)
        if match:
            stage = int(match.group(1))
            if stage not in STAGES:
                raise UsageError(f"override '{key}': stage must be 1, 2 or 3")
            per_stage[stage][match.group(2)] = value
        else:
            common[key] = value
    for where in (common, *per_stage.values()):
        for key in ("train.init_from", "train.stage", "run_id", "out_dir"):
            if key in where:
                raise UsageError(f"override '{key}': fvlm stages sets it for every stage itself")
    return common, per_stage


def read_decisions(path: str) -> tuple[dict[str, Any], dict[int, int | None], str | None]:
    """Phase 1's decisions.json (or a locked_config.json): (locked overrides, Decision 3's sample
    count per stage, Decision 3's model size)."""
    data = read_json(Path(path))
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object (Phase 1's decisions.json)")
    locked = data.get("locked_config", data)
    overrides = locked.get("overrides") if isinstance(locked, dict) else None
    if not isinstance(overrides, dict):
        raise UsageError(f"{path}: missing field 'locked_config.overrides'")
    d3 = data.get("decision3") or {}
    stages = d3.get("stages") or {} if isinstance(d3, dict) else {}
    samples: dict[int, int | None] = {}
    for s in STAGES:
        value = stages.get(str(s)) if isinstance(stages, dict) else None
        if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1):
            raise UsageError(f"{path}: decision3.stages.{s} must be a sample count >= 1, got {value!r}")
        samples[s] = None if value is None else round(value)
    size = d3.get("size") if isinstance(d3, dict) else None
    return dict(overrides), samples, str(size) if size else None


def _size_key(size: str) -> str:
    key = size.strip().lower().replace("smollm2-", "")
    if key not in SIZES:
        raise UsageError(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    return key


def write_mixes(data: Path, out: Path) -> dict[int, str]:
    """The shipped stage mix files with each source's path pointed at <data>/<dataset> (absolute),
    written under <out>/mixes/."""
    if not data.is_dir():
        raise UsageError(f"--data {data}: no such folder (one shard folder per dataset, named as in {MIX_DIR})")
    paths = {}
    for stage in STAGES:
        mix = read_yaml(MIX_DIR / f"stage{stage}.yaml")
        for entry in mix["sources"].values():
            entry["path"] = str((data / entry["path"]).resolve())
        target = out / "mixes" / f"stage{stage}.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        header = f"# fvlm/configs/mixes/stage{stage}.yaml with its paths under {data}, written by fvlm stages\n"
        atomic.write_text(target, header + yaml.safe_dump(mix, sort_keys=False))
        paths[stage] = str(target)
    return paths


def plan(
    *,
    preset: str | None,
    size: str | None,
    out: str | None,
    decisions: str | None,
    samples: dict[int, int | None],
    data: str | None,
    overrides: list[str],
    export: bool,
    dry_run: bool,
    heldout_pairs: str | None = None,
    benches: list[str] | None = None,
    variant: str = "",
) -> Pipeline:
    if variant and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", variant):
        raise UsageError(f"--variant must be letters, digits, '.', '_' or '-', got {variant!r}")
    common, per_stage = split_stage_overrides(overrides)
    locked: dict[str, Any] = {}
    decided: dict[int, int | None] = {s: None for s in STAGES}
    notes = []
    if decisions:
        locked, decided, decided_size = read_decisions(decisions)
        notes.append(f"locked config from {decisions}: {locked or 'the baseline (no overrides)'}")
        if size is None and preset is None and decided_size:
            size = decided_size
    if preset is not None and size is not None:
        raise UsageError("give --preset or --size, not both")
    if preset not in (None, "tiny", "paper"):
        raise UsageError(f"--preset must be tiny or paper, got {preset!r}")
    name = "tiny" if preset == "tiny" else _size_key(size or "135m")
    folder = Path(out) if out else Path("runs") / f"stages-{name}"
    stages = []
    for stage in STAGES:
        if name == "tiny":
            config = str(CONFIG_DIR / "tiny.yaml")
            base = {**TINY_COMMON, **TINY_STAGES[stage]}
            default = TINY_SAMPLES[stage]
        else:
            config = str(CONFIG_DIR / f"{SIZES[name]}_stage{stage}.yaml")
            base = {}
            default = load_config(config).train.max_samples
        stage_locked = {k: v for k, v in locked.items() if stage == 1 or k not in FREEZE_KEYS}
        count = samples.get(stage) or decided.get(stage) or default
        if decisions and not samples.get(stage) and decided.get(stage) is None:
            notes.append(f"stage {stage}: Decision 3 gives no sample count; the config's {default:,}")
        stage_overrides = {**base, **stage_locked, **common, **per_stage[stage]}
        if stage > 1:
            for key in FREEZE_KEYS:
                stage_overrides.setdefault(key, False)
        run_id = f"stage{stage}-{variant}" if variant and stage == STAGES[-1] else f"stage{stage}"
        stages.append(StagePlan(stage, run_id, config, stage_overrides, int(count)))
    if data and name != "tiny":
        if dry_run:
            notes.append(f"--data {data}: the stage mixes would point at its dataset folders")
        else:
            for stage, path in write_mixes(Path(data), folder).items():
                stages[stage - 1].overrides.setdefault("data.train", path)
    eval_samples = int(TINY_COMMON["train.eval_samples"]) if name == "tiny" else 0
    return Pipeline(
        name, folder, stages, export or name == "tiny", eval_samples, notes, heldout_pairs, list(benches or []), variant
    )


def stage_config(pipeline: Pipeline, stage: StagePlan, init_from: str = "") -> Any:
    overrides = {
        **stage.overrides,
        "run_id": stage.run_id,
        "out_dir": str(pipeline.out),
        "train.max_samples": stage.samples,
    }
    if init_from:
        overrides["train.init_from"] = init_from
    if stage.overrides.get("train.dpo.enabled") and not init_from:
        # The dry run has no stage-2 result yet; the reference is named only to pass validation.
        overrides["train.init_from"] = str(pipeline.out / f"stage{stage.stage - 1}")
    return load_config(stage.config, overrides)


# ----------------------------------------------------------------------------- dry run


def dry_run(pipeline: Pipeline, as_json: bool) -> dict[str, Any]:
    """Prices the three stages like `fvlm phase1 --dry-run` prices its sweeps (fvlm.experiments.estimate)."""
    from fvlm.experiments.estimate import estimate, fmt_seconds
    from fvlm.model.flops import estimate_flops

    preset = TINY if pipeline.name == "tiny" else PAPER
    frames, text = preset.sample_shape
    planned = []
    for stage in pipeline.stages:
        cfg = stage_config(pipeline, stage)
        per_sample = estimate_flops(cfg.model, frames=frames, text_tokens=text).per_sample
        if cfg.train.dpo.enabled:
            per_sample *= 2 * 4 / 3  # both answers through the policy, and forward through the reference
        spec = RunSpec(stage.run_id, "stages", f"stage {stage.stage}", {}, stage.samples)
        planned.append(Planned(spec, cfg, per_sample))
    est = estimate(planned, preset, jobs=1, measure=pipeline.name == "tiny")
    record = {"pipeline": pipeline.name, "out": str(pipeline.out), "notes": pipeline.notes, "estimate": est}
    if as_json:
        print(json.dumps(record, indent=1, default=str))
        return record
    print(f"fvlm stages ({pipeline.name}) -> {pipeline.out}")
    for note in pipeline.notes:
        print(f"  note: {note}")
    print(f"  {'stage':<7} {'samples':>12} {'FLOPs':>10} {'time':>8}  loss / init")
    for stage, p, row in zip(pipeline.stages, planned, est["rows"]):
        t = p.cfg.train
        loss = "DPO" if t.dpo.enabled else ("all tokens" if t.stage == 1 else "answer only")
        frozen = [g for g, f in (("dino", p.cfg.model.freeze_dino), ("llm", p.cfg.model.freeze_llm)) if f]
        print(
            f"  {stage.stage:<7} {stage.samples:>12,} {row['flops']:>10.3g} {fmt_seconds(row['seconds']):>8}  "
            f"{loss}, frozen: {', '.join(frozen) or 'none'}, data {p.cfg.data.train}"
        )
    print(f"  total: about {fmt_seconds(est['wall_seconds'])} of training ({est['basis']})", end="")
    print(f", {est['gpu_hours']:.1f} GPU-hours, ${est['cost_usd']:,.0f}" if "gpu_hours" in est else "")
    print("  then each stage's evaluation in three modes" + (" and the export" if pipeline.export else ""))
    return record


# ----------------------------------------------------------------------------- running


def best_checkpoint(run_dir: Path, summary: dict[str, Any]) -> Path:
    """The checkpoint of the lowest val loss (kept through pruning), else the latest complete one."""
    step = summary.get("best_val_step")
    if step is not None:
        folder = rf.checkpoint_folder(run_dir, int(step))
        if (folder / rf.MODEL_FILE).is_file() and (folder / rf.META).is_file():
            return folder
    complete = rf.complete_checkpoints(run_dir)
    if not complete:
        raise UsageError(f"{run_dir}: no complete checkpoint to continue from")
    return complete[-1][1]


def _evaluate(pipeline: Pipeline, run_dir: Path, checkpoint: Path, benches: list[str]) -> dict[str, Any]:
    """Three modes on the benches (fvlm eval), once per checkpoint: eval/eval.json is reused."""
    from fvlm.eval.evaluate import evaluate_run

    path = rf.eval_dir(run_dir) / rf.EVAL_JSON
    if path.is_file():
        saved = read_json(path)  # the latest entry at the top level (fvlm.eval.evaluate.write_results)
        if isinstance(saved, dict) and saved.get("checkpoint") == str(checkpoint):
            return saved
    _log(f"[stages] evaluating {checkpoint} in every mode")
    evaluate_run(
        checkpoint,
        out=rf.eval_dir(run_dir),
        benches=benches,
        max_samples=pipeline.eval_samples,
        log_samples=True,
    )
    return read_json(path)


def _heldout_margins(cfg: Any, checkpoint: Path, spec: str, run_dir: Path) -> dict[str, Any]:
    """The DPO stage's reward margins on held-out pairs against its reference, with a t interval."""
    import torch

    from fvlm.model.build import load_model
    from fvlm.training.dpo import build_preference_loader, load_reference, preference_rewards, reward_summary

    path = rf.eval_dir(run_dir) / "dpo_heldout.json"
    if path.is_file():
        saved = read_json(path)
        if saved.get("checkpoint") == str(checkpoint):
            return saved
    policy, tokenizer = load_model(checkpoint)
    reference = load_reference(cfg, torch.device("cpu"))
    loader = build_preference_loader(cfg, spec, tokenizer, what="held-out pairs", train=False, batch_size=16)
    rewards = preference_rewards(policy, reference, loader, cfg.train.dpo.beta)
    result = {"checkpoint": str(checkpoint), "pairs": spec, **reward_summary(rewards)}
    atomic.write_json(path, result, indent=1)
    return result


def _bench_table(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: {
            mode: {"accuracy": r.get("accuracy"), "ci95": r.get("ci95"), "n": r.get("n")} for mode, r in modes.items()
        }
        for name, modes in (entry.get("bench") or {}).items()
    }


def _correct(run_dir: Path, entry: dict[str, Any]) -> dict[tuple[str, str], dict[str, float]]:
    """{(bench, mode): {question id: 1.0 | 0.0}} from the evaluation's per-question log."""
    log = entry.get("samples_log")
    out: dict[tuple[str, str], dict[str, float]] = {}
    if not log or not Path(log).is_file():
        return out
    for line in Path(log).read_text().splitlines():
        record = json.loads(line)
        out.setdefault((record["benchmark"], record["mode"]), {})[str(record["question_id"])] = float(record["correct"])
    return out


def stage_differences(before: dict, after: dict) -> dict[str, dict[str, Any]]:
    """Paired accuracy differences (after - before) per bench and mode, on the questions both answered."""
    from fvlm.eval.stats import paired_difference

    out: dict[str, dict[str, Any]] = {}
    for key, answers in after.items():
        earlier = before.get(key)
        if not earlier:
            continue
        ids = sorted(set(answers) & set(earlier))
        diff = paired_difference([answers[i] for i in ids], [earlier[i] for i in ids])
        out.setdefault(key[0], {})[key[1]] = {"diff": diff["diff"], "ci95": diff["ci95"], "n": diff["n"]}
    return out


def run(pipeline: Pipeline) -> dict[str, Any]:
    from fvlm.data.synth import ensure_synthetic
    from fvlm.model.pretrain_tiny import ensure_tiny_backbones
    from fvlm.training.trainer import train

    began = time.perf_counter()
    pipeline.out.mkdir(parents=True, exist_ok=True)
    if pipeline.name == "tiny":
        first = pipeline.stages[0].overrides
        if "model.llm" not in first or "model.dino" not in first:
            folder = ensure_tiny_backbones(pipeline.out / "backbones", TINY.tiny_backbones, log=_log)
            for stage in pipeline.stages:
                stage.overrides.setdefault("model.llm", str(folder / "tiny-llm"))
                stage.overrides.setdefault("model.dino", str(folder / "tiny-dino"))
    rows: list[dict[str, Any]] = []
    corrects: list[dict] = []
    init_from = ""
    benches: list[str] = list(pipeline.benches)
    pairs: dict[str, str] = {}
    for stage in pipeline.stages:
        if pipeline.name == "tiny" and stage.stage == 1:
            cfg1 = stage_config(pipeline, stage)
            paths = ensure_synthetic(cfg1.data, cfg1.data_seed, cfg1.out_dir)
            benches = benches or [paths["bench"]]
            pairs = {k: paths[k] for k in ("pairs", "pairs_val") if k in paths}
        if pipeline.name == "tiny" and stage.stage == 3 and pairs:
            stage.overrides.setdefault("data.train", pairs["pairs"])
        cfg = stage_config(pipeline, stage, init_from)
        if not benches and cfg.data.train == "synthetic":
            benches = [ensure_synthetic(cfg.data, cfg.data_seed, cfg.out_dir)["bench"]]
        _log(f"[stages] stage {stage.stage}: {cfg.run_dir} ({stage.samples:,} samples)")
        summary = train(cfg)
        if summary.get("status") != "completed":
            raise UsageError(
                f"stage {stage.stage} ended {summary.get('status')} ({cfg.run_dir}); run the same command "
                "again to resume it"
            )
        checkpoint = best_checkpoint(cfg.run_dir, summary)
        entry = _evaluate(pipeline, cfg.run_dir, checkpoint, benches)
        correct = _correct(cfg.run_dir, entry)
        row: dict[str, Any] = {
            "stage": stage.stage,
            "run_id": stage.run_id,
            "loss": "dpo" if cfg.train.dpo.enabled else ("all_tokens" if cfg.train.stage == 1 else "answer_only"),
            "init_from": init_from or None,
            "checkpoint": str(checkpoint),
            "samples": summary.get("total_samples"),
            "final_train_loss": summary.get("final_train_loss"),
            "best_val_loss": summary.get("best_val_loss"),
            "total_flops": summary.get("total_flops"),
            "wall_time_sec": summary.get("wall_time_sec"),
            "eval_seconds": entry.get("seconds"),
            "bench": _bench_table(entry),
            "vs_previous_stage": stage_differences(corrects[-1], correct) if corrects else {},
        }
        heldout = pairs.get("pairs_val") or pipeline.heldout_pairs
        if cfg.train.dpo.enabled and heldout:
            row["dpo_heldout"] = _heldout_margins(cfg, checkpoint, str(heldout), cfg.run_dir)
        rows.append(row)
        corrects.append(correct)
        write_summary(pipeline, rows)
        init_from = str(checkpoint)
    result: dict[str, Any] = {"pipeline": pipeline.name, "out": str(pipeline.out), "stages": rows}
    if pipeline.export and rows:
        result["export"] = _export(Path(rows[-1]["checkpoint"]), pipeline.out / pipeline.named("export"))
    result["seconds"] = time.perf_counter() - began
    write_summary(pipeline, rows, result.get("export"), result["seconds"])
    _log(f"[stages] done: {pipeline.out / (pipeline.named('stages') + '.md')}")
    return result


def _export(checkpoint: Path, out: Path) -> dict[str, Any]:
    """`fvlm export` of the last stage (which loads the folder back and compares logits), once."""
    from fvlm.export.writer import export_model

    report_path = out / "export_report.json"
    if report_path.is_file():
        return read_json(report_path)
    _log(f"[stages] exporting {checkpoint} -> {out}")
    report = export_model(checkpoint, out)
    atomic.write_json(report_path, report, indent=1, default=str)
    return report


# ----------------------------------------------------------------------------- the summary


def _num(value: Any, digits: int = 4) -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}g}"


def _ci(pair: Any) -> str:
    return f"[{_num(pair[0], 3)}, {_num(pair[1], 3)}]" if isinstance(pair, list) and len(pair) == 2 else ""


def summary_markdown(rows: list[dict[str, Any]], export: dict[str, Any] | None = None) -> str:
    lines = [
        "# fvlm stages",
        "",
        "| stage | loss | samples | final train loss | best val loss | FLOPs | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['loss']} | {r['samples']:,} | {_num(r['final_train_loss'])} | "
            f"{_num(r['best_val_loss'])} | {_num(r['total_flops'], 3)} | {_num(r['wall_time_sec'], 3)} |"
        )
    lines += [
        "",
        "Bench accuracy per mode (95% interval); change against the stage before, paired on the same questions:",
        "",
    ]
    lines += ["| stage | bench | mode | accuracy | vs previous stage |", "|---|---|---|---|---|"]
    for r in rows:
        for bench, modes in r["bench"].items():
            for mode, acc in modes.items():
                d = r["vs_previous_stage"].get(bench, {}).get(mode)
                change = f"{d['diff']:+.3f} {_ci(d['ci95'])}" if d else "—"
                lines.append(
                    f"| {r['stage']} | {bench} | {mode} | {_num(acc['accuracy'], 3)} {_ci(acc['ci95'])} | {change} |"
                )
    for r in rows:
        h = r.get("dpo_heldout")
        if h:
            lines += [
                "",
                f"DPO (stage {r['stage']}), {h['n']} held-out pairs against the stage-{r['stage'] - 1} reference: "
                f"mean reward margin {_num(h['mean_margin'], 3)} {_ci(h['ci95'])} (t interval), "
                f"reward accuracy {_num(h['reward_accuracy'], 3)}"
                + (
                    f"; chosen reward {_num(h['mean_chosen_reward'], 3)} {_ci(h.get('chosen_ci95'))}, "
                    f"rejected {_num(h['mean_rejected_reward'], 3)} {_ci(h.get('rejected_ci95'))}."
                    if "mean_chosen_reward" in h
                    else "."
                ),
            ]
    if export:
        worst = max(export.get("max_logit_difference", {}).values(), default=None)
        lines += [
            "",
            f"Export: {export.get('checkpoint')} loaded back by transformers; max logit difference {_num(worst, 3)}.",
        ]
    return "\n".join(lines) + "\n"


def write_summary(
    pipeline: Pipeline, rows: list[dict[str, Any]], export: dict | None = None, seconds: float | None = None
) -> None:
    record = {"pipeline": pipeline.name, "stages": rows, "export": export, "seconds": seconds}
    stem = pipeline.named("stages")
    atomic.write_json(pipeline.out / f"{stem}.json", record, indent=1, default=str)
    atomic.write_text(pipeline.out / f"{stem}.md", summary_markdown(rows, export))
