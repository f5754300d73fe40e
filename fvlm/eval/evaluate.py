"""`fvlm eval`: validation loss in each inference mode and multiple-choice accuracy, per checkpoint.

Results go to `<run>/eval/eval.json` (read by `fvlm analyze` for the eval-mode figure) and
`eval.md`. With several checkpoints (`--all-checkpoints`, for the data-scaling curves) eval.json
describes the latest one at its top level and lists every checkpoint's entry under `steps`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from fvlm import atomic
from fvlm import run_folder as rf
from fvlm.config import ModelConfig, RunConfig, config_from_dict, load_config, parse_overrides
from fvlm.data.decode import grey_frames
from fvlm.data.loader import build_loader, split_path
from fvlm.errors import UsageError, read_json, read_yaml
from fvlm.eval import paired
from fvlm.eval.bench import VisualSettings, bench_name, read_bench
from fvlm.eval.looks import attention_record, draw, save_npz
from fvlm.eval.paired import MODES_ORDER
from fvlm.eval.scoring import Question, encode_question, frames_batch, score_batch, summarise
from fvlm.model.backbones import model_pixel_stats
from fvlm.model.build import load_model
from fvlm.model.vlm import Batch, VisualBlock, VLMBase

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Per-sample losses, mode summaries and a checkpoint's eval.json entry are JSON-like records that
# `fvlm analyze`, the evidence and the milestones read by key: they are plain dicts of str keys.
Record = dict[str, Any]


@dataclass
class Checkpoint:
    folder: Path
    run_dir: Path | None
    step: int | None  # None: a saved model outside a run
    meta: dict[str, Any]


def _checkpoint(folder: Path, run_dir: Path | None) -> Checkpoint:
    meta_path = folder / rf.META
    meta = read_json(meta_path) if meta_path.is_file() else {}
    if not isinstance(meta, dict):
        raise UsageError(f"{meta_path}: expected a JSON object")
    step = meta.get("step")
    if step is None:
        step = rf.step_of(folder)
    return Checkpoint(folder, run_dir, step, meta)


def find_checkpoints(target: str | Path, all_checkpoints: bool = False) -> list[Checkpoint]:
    """A run folder (its latest complete checkpoint, or all of them), a checkpoint folder, or a
    model folder written by `save_model`. A checkpoint without meta.json is incomplete: never read."""
    path = Path(target).expanduser()
    if (path / rf.MODEL_FILE).is_file():
        run_dir = rf.in_run_folder(path)
        if run_dir is not None and not (path / rf.META).is_file():
            raise UsageError(f"{path}: incomplete checkpoint (no {rf.META})")
        return [_checkpoint(path, run_dir)]
    if not path.is_dir():
        raise UsageError(f"{path}: no such run or checkpoint folder")
    found = [
        _checkpoint(folder, path) for _, folder in rf.complete_checkpoints(path) if (folder / rf.MODEL_FILE).is_file()
    ]
    if not found:
        raise UsageError(f"{path}: neither a run folder with complete checkpoints nor a saved model")
    # A run's checkpoints all have a step (their folder is named by it).
    found.sort(key=lambda c: -1 if c.step is None else c.step)
    return found if all_checkpoints else found[-1:]


def run_config(ckpt: Checkpoint, model_cfg: ModelConfig, overrides: list[str]) -> RunConfig:
    """The run's resolved config (its data settings decide how frames and text are prepared), from
    the run's config.yaml or the checkpoint's meta.json, with `key=value` overrides and the saved
    model's own model config. Synthetic data resolves beside the run, where training generated it."""
    changed_model = [key for key, _ in parse_overrides(overrides) if key.split(".")[0] == "model"]
    if changed_model:
        # The model is the checkpoint's (architecture, backbones, queries): an override of it would be
        # accepted and silently do nothing.
        raise UsageError(
            f"{changed_model[0]}: the model is the checkpoint's and cannot be changed at "
            f"evaluation; only data and eval settings can"
        )
    config_file = ckpt.run_dir / rf.CONFIG if ckpt.run_dir is not None else None
    if config_file is not None and config_file.is_file():
        settings, source = read_yaml(config_file), str(config_file)
        if not isinstance(settings, dict):
            raise UsageError(f"{config_file}: expected a mapping of settings")
    elif isinstance(ckpt.meta.get("config"), dict):
        settings, source = ckpt.meta["config"], str(ckpt.folder / rf.META)
    else:
        cfg = load_config(None, overrides)
        cfg.model = model_cfg
        return cfg
    for key, value in parse_overrides(overrides):
        node = settings
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    cfg = config_from_dict(settings, source)
    if ckpt.run_dir is not None:
        cfg.out_dir = str(ckpt.run_dir.parent)
    cfg.model = model_cfg
    return cfg


def run_system_prompt(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The system turn the run's training put before every dialogue (its `data.system_prompt`, read
    from the run's saved config): evaluation asks its questions after the same one."""
    from fvlm.data.decode import system_prompt_for

    return system_prompt_for(cfg.data.system_prompt, tokenizer)


def resolve_modes(requested: list[str] | None, model: VLMBase) -> tuple[str, ...]:
    available = model.supported_modes
    if not requested:
        return tuple(m for m in MODES_ORDER if m in available)
    for mode in requested:
        if mode not in MODES_ORDER:
            raise UsageError(f"--modes: unknown mode '{mode}' (expected: {', '.join(MODES_ORDER)})")
        if mode not in available:
            raise UsageError(f"--modes: this model has no '{mode}' mode (available: {', '.join(available)})")
    return tuple(requested)


def _to(batch: Batch, device: str | torch.device) -> Batch:
    # A comprehension over a TypedDict's items gives a plain dict: it has the batch's keys.
    return cast(Batch, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})


@torch.no_grad()
def sample_losses(
    model: VLMBase,
    batches: Iterable[Batch],
    modes: tuple[str, ...],
    device: str | torch.device = "cpu",
    blank_control: bool = True,
) -> Record:
    """The answer targets' loss per validation sample, in loader order, the same samples for every
    mode and DINO once per sample (all modes' visual blocks come from one pass):
    {"keys": [sample key, ...], "modes": {mode: {"loss_sum": float64 [N], "tokens": int64 [N],
    "loss_sum_blank": float64 [N] (with `blank_control`)}}}, where loss_sum is a sample's summed
    cross-entropy over its targets. `mode_losses` aggregates this; paired comparisons (two modes,
    two runs, real against grey frames) read it per sample.

    The blank-frame control scores the same samples with every frame replaced by the normalised
    mean (flat grey), frame count and masks unchanged."""
    keys: list[str | None] = []
    kinds: list[str | None] = []
    names = ("loss_sum", "tokens", "loss_sum_blank") if blank_control else ("loss_sum", "tokens")
    parts: dict[str, dict[str, list[torch.Tensor]]] = {m: {name: [] for name in names} for m in modes}
    for batch in batches:
        batch = _to(batch, device)
        blocks = model.visual_blocks(batch, modes)
        grey: dict[str, VisualBlock] = (
            model.visual_blocks({**batch, "frames": grey_frames(batch["frames"])}, modes) if blank_control else {}
        )
        for mode in modes:
            visual, visual_mask, _ = blocks[mode]
            total, count = model.loss_over(visual, visual_mask, batch, per_sample=True)
            parts[mode]["loss_sum"].append(total.double().cpu())
            parts[mode]["tokens"].append(count.cpu())
            if blank_control:
                visual, visual_mask, _ = grey[mode]
                parts[mode]["loss_sum_blank"].append(
                    model.loss_over(visual, visual_mask, batch, per_sample=True)[0].double().cpu()
                )
        keys.extend(batch.get("keys") or [None] * batch["input_ids"].shape[0])
        kinds.extend(batch.get("kinds") or [None] * batch["input_ids"].shape[0])
    empty = {
        "loss_sum": torch.zeros(0, dtype=torch.float64),
        "tokens": torch.zeros(0, dtype=torch.long),
        "loss_sum_blank": torch.zeros(0, dtype=torch.float64),
    }
    return {
        "keys": keys,
        "kinds": kinds,
        "modes": {
            mode: {name: torch.cat(chunks or [empty[name]]).numpy() for name, chunks in arrays.items()}
            for mode, arrays in parts.items()
        },
    }


def summarise_losses(per_sample: Record) -> dict[str, Record]:
    """`sample_losses` -> {mode: {loss, n, tokens[, loss_blank_frames, pixel_gain]}}: token-weighted
    validation loss per mode (every answer token counts once, whatever sample it is in)."""
    out: dict[str, dict[str, Any]] = {}
    n = len(per_sample["keys"])
    for mode, arrays in per_sample["modes"].items():
        tokens = int(arrays["tokens"].sum())
        loss = float(arrays["loss_sum"].sum()) / tokens if tokens else float("nan")
        out[mode] = {"loss": loss, "n": n, "tokens": tokens}
        if "loss_sum_blank" in arrays:
            out[mode]["loss_blank_frames"] = float(arrays["loss_sum_blank"].sum()) / tokens if tokens else float("nan")
            out[mode]["pixel_gain"] = out[mode]["loss_blank_frames"] - loss
        kinds = np.asarray(per_sample.get("kinds") or [None] * n, dtype=object)
        # The same loss over each kind of sample (video, image, text): what A8 and D1 are judged on.
        out[mode]["by_kind"] = {}
        for kind in sorted({k for k in kinds if k is not None}):
            rows = kinds == kind
            kind_tokens = int(arrays["tokens"][rows].sum())
            out[mode]["by_kind"][kind] = {
                "loss": float(arrays["loss_sum"][rows].sum()) / kind_tokens if kind_tokens else float("nan"),
                "n": int(rows.sum()),
                "tokens": kind_tokens,
            }
    return out


def mode_losses(
    model: VLMBase,
    batches: Iterable[Batch],
    modes: tuple[str, ...],
    device: str | torch.device = "cpu",
    blank_control: bool = True,
) -> dict[str, Record]:
    """Token-weighted validation loss of the answer targets per mode, the same samples for every mode
    and DINO once per sample (`sample_losses`, aggregated by `summarise_losses`).

    The blank-frame control scores the same samples with every frame replaced by the normalised
    mean (flat grey), frame count and masks unchanged: `pixel_gain` = blank loss - loss is what the
    model gets from the pixels themselves. A model whose pixel_gain is ~0 reads only the number of
    frames, however its modes compare."""
    return summarise_losses(sample_losses(model, batches, modes, device, blank_control))


def mode_gaps(losses: dict[str, Record]) -> dict[str, float]:
    """Loss differences of every ordered pair (a positive gap: the second mode is better)."""
    present = [m for m in MODES_ORDER if m in losses]
    return {
        f"{a}_minus_{b}": losses[a]["loss"] - losses[b]["loss"] for i, a in enumerate(present) for b in present[i + 1 :]
    }


@torch.no_grad()
def run_benchmark(
    model: VLMBase,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[Question],
    modes: tuple[str, ...],
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    score: str = "mean",
    grey_control: bool = True,
    raw: dict[str, Any] | None = None,
    protocols: tuple[str, ...] = ("loglik",),
    generated: dict[str, Record] | None = None,
    max_new_tokens: int = 16,
    system: str | None = None,
) -> dict[str, Record]:
    """{mode: accuracy summary} for one benchmark. With `grey_control` the same questions are also
    scored with every frame flat grey (the normalised mean; frame count unchanged), under
    `grey_frames`: with balanced options that is chance, and the gap to it is what the pixels bring.
    `raw`, when given, receives every question's option scores: {"scores": {mode: [...]}, "grey": ...}.
    With "generate" in `protocols`, the model also answers each question greedily (the same frames,
    decoded once) and `generated` receives {mode: `summarise_generated`'s summary}; without
    "loglik" the log-likelihood scores are skipped and the result is empty. Every prompt opens with
    `system` (the run's system turn, `run_system_prompt`), and frames are normalised with the model's
    own mean and std, as its training batches were."""
    from fvlm.eval.protocol import generate_batch, summarise_generated

    loglik = "loglik" in protocols
    encoded = [encode_question(tokenizer, q, system) for q in questions] if loglik else []
    pixel_stats = model_pixel_stats(model)
    scores: dict[str, list[np.ndarray]] = {m: [] for m in modes}
    grey: dict[str, list[np.ndarray]] = {m: [] for m in modes}
    responses: dict[str, list[str]] = {m: [] for m in modes}
    for start in range(0, len(questions), batch_size):
        chunk = slice(start, start + batch_size)
        frames, frame_mask = frames_batch([q.frames() for q in questions[chunk]], pixel_stats)
        frames, frame_mask = frames.to(device), frame_mask.to(device)
        if "generate" in protocols:
            for mode, texts in generate_batch(
                model, tokenizer, questions[chunk], frames, frame_mask, modes, max_new_tokens, system
            ).items():
                responses[mode].extend(texts)
        if not loglik:
            continue
        batch_scores = score_batch(model, encoded[chunk], frames, frame_mask, modes, tokenizer.pad_token_id)
        for mode in modes:
            scores[mode].extend(batch_scores[mode])
        if grey_control:
            grey_scores = score_batch(
                model, encoded[chunk], torch.zeros_like(frames), frame_mask, modes, tokenizer.pad_token_id
            )
            for mode in modes:
                grey[mode].extend(grey_scores[mode])
    if generated is not None and "generate" in protocols:
        generated.update({mode: summarise_generated(questions, responses[mode]) for mode in modes})
    if not loglik:
        return {}
    out = {mode: summarise(questions, scores[mode], score) for mode in modes}
    if raw is not None:
        raw.update(scores=scores, grey=grey if grey_control else None)
    if grey_control:
        for mode in modes:
            control = summarise(questions, grey[mode], score)
            out[mode]["grey_frames"] = {k: control[k] for k in ("accuracy", "ci95", "n", "correct")}
    return out


def evaluate_checkpoint(
    ckpt: Checkpoint,
    *,
    modes: list[str] | None,
    data: str | None,
    benches: list[str],
    overrides: list[str],
    max_samples: int,
    batch_size: int,
    device: str,
    score: str,
    log: Callable[[str], object] = print,
    log_samples: Path | None = None,
    protocols: tuple[str, ...] = ("loglik",),
    max_new_tokens: int = 16,
    baselines: list[Any] | None = None,
) -> Record:
    """One checkpoint: validation loss per mode with the blank-frame control and the mode gaps with
    their paired intervals (`gap_intervals`), each benchmark's accuracy per mode with the grey-frame
    control and the paired accuracy differences between modes (`bench_differences`). With
    `log_samples` (a folder), every question's option scores and chosen option go to
    samples_step_NNNNNNN.jsonl there. `protocols` ("loglik", "generate") chooses how questions are
    answered (generated answers go under `generate`); each of `baselines` (`TransformersBaseline`)
    answers the same questions under the same protocols, under `baselines.<label>`."""
    from fvlm.eval.baseline import run_baseline

    began = time.perf_counter()
    model, tokenizer = load_model(ckpt.folder, device=device)
    model.eval()
    if tokenizer is None:
        raise UsageError(f"{ckpt.folder}: no tokenizer saved with the model")
    cfg = run_config(ckpt, model.cfg, overrides)
    chosen = resolve_modes(modes, model)
    entry: Record = {
        "run_id": cfg.run_id if ckpt.run_dir is not None else ckpt.folder.name,
        "step": ckpt.step,
        "samples_seen": ckpt.meta.get("samples_seen"),
        "checkpoint": str(ckpt.folder),
        "score": score,
        "modes": {},
        "gaps": {},
    }
    if data != "none":
        if data:
            cfg.data.val = data
        loader = build_loader(
            cfg,
            "val",
            tokenizer,
            train=False,
            batch_size=batch_size,
            max_samples=max_samples or None,
            pixel_stats=model_pixel_stats(model),
        )
        per_sample = sample_losses(model, loader, chosen, device)
        entry["modes"] = summarise_losses(per_sample)
        entry["gaps"] = mode_gaps(entry["modes"])
        entry["gap_intervals"] = paired.loss_gap_intervals(per_sample)
    settings = VisualSettings.from_config(cfg)
    if not benches and cfg.data.train == "synthetic":
        benches = [split_path(cfg, "bench")]
        names = ["synthetic_mc"]
    else:
        names = [bench_name(b) for b in benches]
    records: list[dict[str, Any]] = []
    entry["bench"], entry["bench_differences"] = {}, {}
    if "generate" in protocols:
        entry["generate"] = {}
    if baselines:
        entry["baselines"] = {b.label: {"bench": {}, "generate": {}} for b in baselines}
    for name, spec in zip(names, benches):
        questions = read_bench(spec, settings)
        raw: dict[str, Any] = {}
        generated: dict[str, Record] = {}
        entry["bench"][name] = run_benchmark(
            model,
            tokenizer,
            questions,
            chosen,
            batch_size=batch_size,
            device=device,
            score=score,
            raw=raw,
            protocols=protocols,
            generated=generated,
            max_new_tokens=max_new_tokens,
            system=run_system_prompt(cfg, tokenizer),
        )
        if "generate" in protocols:
            entry["generate"][name] = generated
        entry["bench_differences"][name] = paired.accuracy_mode_differences(entry["bench"][name])
        if "loglik" in protocols:
            records += paired.sample_records(name, ckpt.step, questions, raw["scores"], raw["grey"], score)
        for baseline in baselines or []:
            loglik, answers = run_baseline(
                baseline,
                questions,
                settings,
                protocols=protocols,
                batch_size=batch_size,
                score=score,
                max_new_tokens=max_new_tokens,
            )
            if loglik is not None:
                entry["baselines"][baseline.label]["bench"][name] = loglik
            if answers is not None:
                entry["baselines"][baseline.label]["generate"][name] = answers
    if log_samples is not None:
        name = f"samples_step_{ckpt.step:07d}.jsonl" if ckpt.step is not None else "samples.jsonl"
        entry["samples_log"] = str(paired.write_samples(Path(log_samples) / name, records))
    entry["seconds"] = round(time.perf_counter() - began, 2)
    log(format_entry(entry))
    return entry


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_entry(entry: Record) -> str:
    """The markdown table of one checkpoint: losses per mode, then accuracy per benchmark and mode."""
    lines = [f"## {entry['run_id']} @ step {entry['step']}", ""]
    if entry["modes"]:
        lines += ["| mode | val loss | blank frames | pixel gain | samples | tokens |", "|---|---|---|---|---|---|"]
        lines += [
            f"| {m} | {_num(r['loss'])} | {_num(r.get('loss_blank_frames'))} | {_num(r.get('pixel_gain'))} "
            f"| {r['n']} | {r['tokens']} |"
            for m, r in entry["modes"].items()
        ]
        intervals = entry.get("gap_intervals") or {}
        lines += (
            [""]
            + [
                f"- {k.replace('_minus_', ' − ')}: {_num(v)}{_interval(intervals.get(k))}"
                for k, v in entry["gaps"].items()
            ]
            + [""]
        )
    for name, by_mode in entry.get("bench", {}).items():
        lines += [
            f"**{name}** (score: {entry['score']} log-likelihood of the answer tokens)",
            "",
            "| mode | accuracy | 95% CI | chance | n | accuracy (other score) | grey frames | grey 95% CI |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for mode, r in by_mode.items():
            other = next(v for k, v in r.items() if k.startswith("accuracy_"))
            g = r.get("grey_frames") or {"accuracy": None, "ci95": [None, None]}
            lines.append(
                f"| {mode} | {_num(r['accuracy'], 3)} | [{_num(r['ci95'][0], 3)}, {_num(r['ci95'][1], 3)}] "
                f"| {_num(r['chance'], 3)} | {r['n']} | {_num(other, 3)} | {_num(g['accuracy'], 3)} "
                f"| [{_num(g['ci95'][0], 3)}, {_num(g['ci95'][1], 3)}] |"
            )
        differences = (entry.get("bench_differences") or {}).get(name) or {}
        if differences:
            lines += [""] + [
                f"- accuracy {k.replace('_minus_', ' − ')}: {_num(d['diff'], 3)}{_interval(d, 3)}"
                for k, d in differences.items()
            ]
        categories = sorted({c for r in by_mode.values() for c in r["per_category"]})
        if len(categories) > 1:
            lines += ["", "| category | " + " | ".join(by_mode) + " |", "|---" * (len(by_mode) + 1) + "|"]
            for c in categories:
                cells = [
                    f"{_num(r['per_category'][c]['accuracy'], 3)} (n={r['per_category'][c]['n']})"
                    for r in by_mode.values()
                ]
                lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += format_protocols(entry)
    return "\n".join(lines)


def _cell(r: Record | None) -> str:
    if r is None:
        return "–"
    return f"{_num(r['accuracy'], 3)} [{_num(r['ci95'][0], 3)}, {_num(r['ci95'][1], 3)}] (n={r['n']})"


def protocol_rows(entry: Record, name: str) -> dict[str, dict[str, Record | None]]:
    """{row label: {"loglik": summary | None, "generate": summary | None}} of one benchmark: the
    checkpoint's modes ("fvlm <mode>"), then each baseline."""
    rows: dict[str, dict[str, Record | None]] = {}
    loglik = (entry.get("bench") or {}).get(name) or {}
    generated = (entry.get("generate") or {}).get(name) or {}
    for mode in [m for m in MODES_ORDER if m in loglik or m in generated]:
        rows[f"fvlm {mode}"] = {"loglik": loglik.get(mode), "generate": generated.get(mode)}
    for label, results in (entry.get("baselines") or {}).items():
        rows[label] = {"loglik": results["bench"].get(name), "generate": results["generate"].get(name)}
    return rows


def format_protocols(entry: Record) -> list[str]:
    """Both protocols side by side, fvlm's modes and the baselines on the same questions, overall and
    per category (Video-MME: duration; MVBench, MLVU: task) with the mean over categories."""
    from fvlm.eval.protocol import macro_accuracy

    if "generate" not in entry and not entry.get("baselines"):
        return []
    names = list(entry.get("bench") or {}) or list(entry.get("generate") or {})
    lines: list[str] = []
    for name in names:
        rows = protocol_rows(entry, name)
        lines += [
            f"**{name}: both protocols** (log-likelihood of each option; generated answer's letter, greedy)",
            "",
            "| model | log-likelihood | generated | no letter | mean over categories (ll / gen) |",
            "|---|---|---|---|---|",
        ]
        for label, r in rows.items():
            macro = " / ".join(_num(macro_accuracy(x), 3) if x else "–" for x in (r["loglik"], r["generate"]))
            missing = r["generate"]["no_letter"] if r["generate"] else "–"
            lines.append(f"| {label} | {_cell(r['loglik'])} | {_cell(r['generate'])} | {missing} | {macro} |")
        categories = sorted({c for r in rows.values() for x in r.values() if x for c in x["per_category"]})
        if len(categories) > 1:
            heads = [f"{label} ({p})" for label in rows for p in ("ll", "gen")]
            lines += ["", "| category | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
            for c in categories:
                cells = [
                    _cell(x["per_category"].get(c)) if x else "–"
                    for r in rows.values()
                    for x in (r["loglik"], r["generate"])
                ]
                lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _interval(paired_result: Record | None, digits: int = 4) -> str:
    """' [lo, hi]' from a paired difference's bootstrap interval (clustered by video where questions
    share one), or nothing."""
    if not paired_result:
        return ""
    lo, hi = paired_result["ci95_bootstrap"]
    return f" [{_num(lo, digits)}, {_num(hi, digits)}]"


def write_results(entries: list[Record], out: Path) -> Path:
    """eval.json (latest entry at the top level, every entry under `steps` when there are several,
    and the latest checkpoint's paired accuracy differences from each earlier one under
    `checkpoint_differences`) and eval.md."""
    out.mkdir(parents=True, exist_ok=True)
    result = dict(entries[-1])
    if len(entries) > 1:
        result["steps"] = entries
        result["checkpoint_differences"] = [paired.checkpoint_differences(entries[-1], e) for e in entries[:-1]]
    atomic.write_json(out / rf.EVAL_JSON, result, indent=1, allow_nan=True)
    atomic.write_text(out / rf.EVAL_MD, "# Evaluation\n\n" + "\n".join(format_entry(e) for e in entries))
    return out / rf.EVAL_JSON


def evaluate_run(
    target: str | Path,
    *,
    out: Path | None = None,
    all_checkpoints: bool = False,
    modes: list[str] | None = None,
    data: str | None = None,
    benches: list[str] | None = None,
    overrides: list[str] | None = None,
    max_samples: int = 0,
    batch_size: int = 8,
    device: str | None = None,
    score: str = "mean",
    attention: int = 0,
    gif: bool = False,
    layer: int | None = None,
    log_samples: bool = False,
    protocols: tuple[str, ...] = ("loglik",),
    max_new_tokens: int = 16,
    baselines: list[str] | None = None,
) -> Path:
    """`fvlm eval` as a function: every chosen checkpoint of `target` evaluated, attention pictures of
    the first `attention` probe videos, the results written to `out` (default <run>/eval); returns
    the eval.json written. `log_samples` also writes every question's option scores and chosen option
    (samples_step_NNNNNNN.jsonl in `out`). `protocols` and `baselines` (transformers model folders):
    see `evaluate_checkpoint`."""
    from fvlm.eval.baseline import TransformersBaseline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    overrides = list(overrides or [])
    checkpoints = find_checkpoints(target, all_checkpoints)
    if attention and layer is not None:
        check_layer(checkpoints[-1].folder, layer)
    first = checkpoints[0]
    out = Path(out) if out else rf.eval_dir(first.run_dir or first.folder)
    loaded = [TransformersBaseline(folder, device) for folder in baselines or []]
    entries = [
        evaluate_checkpoint(
            ckpt,
            modes=modes,
            data=data,
            benches=list(benches or []),
            overrides=overrides,
            max_samples=max_samples,
            batch_size=batch_size,
            device=device,
            score=score,
            log_samples=out if log_samples else None,
            protocols=protocols,
            max_new_tokens=max_new_tokens,
            baselines=loaded,
        )
        for ckpt in checkpoints
    ]
    if attention:
        entries[-1]["attention"] = draw_probe_attention(
            checkpoints[-1], overrides, attention, out / rf.ATTENTION, device, gif=gif, layer=layer
        )
    return write_results(entries, out)


def check_layer(folder: Path, layer: int) -> None:
    """Refuses --layer past the query's attention layers (every DINO layer for the deep query, one
    for the shallow), before any evaluation runs."""
    path = folder / rf.MODEL_CONFIG
    meta = read_json(path)
    try:
        deep = meta["model"].get("deep_query", True)
        layers = int(meta["dino_config"]["num_hidden_layers"]) if deep else 1
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UsageError(f"{path}: missing field 'dino_config.num_hidden_layers'") from None
    if not 0 <= layer < layers:
        raise UsageError(
            f"--layer {layer}: the model's query attends through {layers} DINO layer(s) (0 to {layers - 1})"
        )


def draw_probe_attention(
    ckpt: Checkpoint,
    overrides: list[str],
    videos: int,
    out: Path,
    device: str,
    gif: bool = False,
    layer: int | None = None,
) -> Record:
    """Pictures of the first `videos` probe videos of the run's data, plus the arrays behind them."""
    model, tokenizer = load_model(ckpt.folder, device=device)
    model.eval()
    cfg = run_config(ckpt, model.cfg, overrides)
    loader = build_loader(
        cfg,
        "probe",
        tokenizer,
        train=False,
        batch_size=videos,
        max_samples=videos,
        pixel_stats=model_pixel_stats(model),
    )
    batch = next(iter(loader))
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    out.mkdir(parents=True, exist_ok=True)
    record = attention_record(model, batch, batch["keys"], ckpt.step, out / "attention.npz")
    save_npz(record, record.path)
    looked = draw(record, out, gif=gif, layer=layer)
    tracked = [v for v in looked.values() if v["fine_on_mover"] is not None]
    summary: Record = {"videos": looked, "npz": str(record.path)}
    if tracked:
        for name in ("coarse_on_mover", "fine_on_mover", "mover_area"):
            # A video whose fine query's share is measured has all three (two frames or more, the mover in view).
            summary[f"mean_{name}"] = sum(cast("list[float]", [v[name] for v in tracked])) / len(tracked)
        print(
            f"attention on the moving object (share of patch mass, {len(tracked)} videos): static query "
            f"{summary['mean_coarse_on_mover']:.3f}, fine query {summary['mean_fine_on_mover']:.3f} "
            f"(uniform attention: {summary['mean_mover_area']:.3f})"
        )
    print(f"attention pictures: {out}")
    return summary
