"""Foveation evidence for the Phase 1 report: do the models read the pixels, and does the foveated
(fine, LLM-chosen) query beat the static (coarse) one, measured on the same samples and questions?

Four measurements, per run's latest checkpoint, all without gradients on one CPU thread:

1. Pixel check on the answer tokens, for every completed ablation run and for the grid's
   largest-budget cells: validation loss of the assistant's answer tokens (the stage-2 loss mask,
   whatever stage the run trained with) with the real frames and with every frame flat grey, per
   inference mode, and the pixel gain (grey - real) with its standard error over samples.
2. The synthetic multiple-choice benchmark (the `bench` split beside the val split), with the
   per-question outcomes and the grey-frame control, for F3 (coarse_fine and coarse_only), A6, A1,
   B1 and the largest-budget grid cells.
3. Paired differences on the same questions (accuracy) and the same samples (answer loss), with
   95% intervals: F3's fine vs static query, F3 vs A6 / A1 / B1, and F vs B per grid size.
4. Attention on the moving object, frame by frame, against the share uniform attention would give,
   on the probe videos, for F3 (and A1, A6).

`collect_evidence` writes <root>/evidence.json (atomically) and returns it; a later call with the
same settings and no run changed returns the file as it is, so re-running phase1 is cheap.
`evidence_markdown` renders the report section, `decisions_summary` the decisions.json entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fvlm import atomic
from fvlm import run_folder as rf
from fvlm.errors import UsageError, parse_json
from fvlm.eval.stats import N_BOOT, paired_difference

if TYPE_CHECKING:  # torch and transformers are imported only when a run is measured
    from transformers import PreTrainedTokenizerBase

    from fvlm.config import RunConfig
    from fvlm.model.vlm import VLMBase

EVIDENCE_FILE = "evidence.json"
# Bumped whenever what is measured changes, so that an older evidence.json is not reused.
VERSION = 2  # 2: seed replicates measured, comparisons judged with their training noise

# Runs read on the multiple-choice benchmark (besides the grid cells), and the runs whose attention
# is measured. F3 is read in both its fine and its static mode, the others in their default mode.
BENCH_RUNS = ("F3", "A6", "A1", "B1")
ATTENTION_RUNS = ("F3", "A1", "A6")
F3_BENCH_MODES = ("coarse_only", "coarse_fine")
# A model reads the pixels when grey frames raise its answer loss clearly: the gain's 95% interval
# excludes 0 AND the gain is at least this share of its grey-frame answer loss (what it pays without
# the pixels). The interval alone also passes gains too small to change an answer: L-C4-B's +0.0004
# [0.0001, 0.0007] on a grey loss of 0.19 while its bench accuracy sat at chance. In the tiny main
# job the gains of the runs that learned the answers' wording are bimodal, 0.06-0.38 nats (30-85% of
# the grey loss) or under 0.002 (under 1%); F1 and F2, whose frozen LLM never learned the wording
# (answer loss ~1.6), gain 0.006-0.04 (0.4-3%).
# No share tells every such case apart (a later L-C4-B gained +0.0043, 2.3% of its grey loss, with its
# bench at 0.310 against 0.275 grey), so where a run was also read on the benchmark in that mode its
# answers must change with the pixels too: real - grey accuracy on the same questions above 0 at 95%.
READS_MIN_SHARE = 0.01
GRID_CELL = re.compile(r"^(?P<size>[^-]+)-(?P<budget>C(?P<k>\d+))-(?P<arch>F|B)$")

# The paired comparisons: (label, (run, mode), (run, mode)); mode None = the run's default mode.
# A positive difference always means the first one is better.
ABLATION_PAIRS = (
    ("F3 fine query vs F3 static query (same model)", ("F3", "coarse_fine"), ("F3", "coarse_only")),
    ("F3 vs A6 (trained with the static query only)", ("F3", None), ("A6", None)),
    ("F3 vs A1 (shallow query)", ("F3", None), ("A1", None)),
    ("F3 vs B1 (16 tokens per frame, no query)", ("F3", None), ("B1", None)),
)
PRIMARY = ABLATION_PAIRS[0][0]
STATIC_TRAINED = ABLATION_PAIRS[1][0]


@dataclass
class EvidenceSettings:
    """What every measurement is sized by (part of evidence.json: changing it re-evaluates)."""

    max_samples: int = 128  # validation samples for the pixel check and the paired answer losses
    max_questions: int = 200  # benchmark questions (the synthetic bench split has 200)
    probe_videos: int = 10  # probe videos for the attention measurement
    batch_size: int = 16
    n_boot: int = N_BOOT  # paired-bootstrap resamples
    seed: int = 0
    score: str = "mean"  # option score of the benchmark (mean log-likelihood of the answer tokens)
    device: str = "cpu"


# ----------------------------------------------------------------------------- statistics


def verdict(interval: Sequence[float | None]) -> str:
    """'yes' when the whole interval is above 0 (the first one is better), 'no' when it is below 0
    (the second one is better), 'not distinguishable' when it holds 0 (or was not measured)."""
    lo, hi = interval
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "not distinguishable"
    if lo > 0:
        return "yes"
    if hi < 0:
        return "no"
    return "not distinguishable"


# ----------------------------------------------------------------------------- which runs


def _run_status(run_dir: Path) -> str:
    if not run_dir.is_dir():
        return "missing"
    if not (run_dir / rf.SUMMARY).is_file():
        return "not finished"
    summary = rf.read_summary(run_dir)
    return f"unreadable {rf.SUMMARY}" if summary is None else str(summary.get("status", "unknown"))


def fingerprint(run_dir: Path) -> dict[str, Any]:
    """What identifies the state of a run: its status and, when completed, its latest complete
    checkpoint (folder, step, the model file's size and modification time). Equal fingerprints:
    the evidence measured before still holds."""
    from fvlm.eval.evaluate import find_checkpoints  # imports torch: only when a run is fingerprinted

    status = _run_status(run_dir)
    if status != "completed":
        return {"status": status}
    try:
        ckpt = find_checkpoints(run_dir)[-1]
    except UsageError as exc:
        return {"status": "no checkpoint", "error": str(exc)}
    stat = (ckpt.folder / rf.MODEL_FILE).stat()
    return {
        "status": status,
        "checkpoint": ckpt.folder.name,
        "step": ckpt.step,
        "model_bytes": stat.st_size,
        "model_mtime_ns": stat.st_mtime_ns,
    }


def grid_cells(scaling_dir: Path, budget: str | None = None, sizes: tuple[str, ...] | None = None) -> list[str]:
    """The grid's cells of one budget (default: the largest found), F and B (not B-isoflop), in
    size order (`sizes`, else by name) and F before B."""
    found = (
        [m for m in (GRID_CELL.match(p.name) for p in sorted(scaling_dir.iterdir()) if p.is_dir()) if m]
        if scaling_dir.is_dir()
        else []
    )
    if not found:
        return []
    if budget is None:
        budget = max(found, key=lambda m: int(m["k"]))["budget"]
    cells = [m for m in found if m["budget"] == budget]
    order = {s: i for i, s in enumerate(sizes or sorted({m["size"] for m in cells}))}
    cells.sort(key=lambda m: (order.get(m["size"], len(order)), m["size"], m["arch"] != "F"))
    return [m.string for m in cells]


@dataclass
class Target:
    run_id: str
    run_dir: Path
    group: str  # "ablation" or "grid"
    bench_modes: tuple[str, ...] | None  # None: no benchmark; () the default mode
    attention: bool


def targets(
    ablation_dir: Path, scaling_dir: Path, budget: str | None = None, sizes: tuple[str, ...] | None = None
) -> list[Target]:
    from fvlm.experiments.matrix import ABLATION_IDS, replicate_of

    def modes_of(rid: str) -> tuple[str, ...] | None:
        return (F3_BENCH_MODES if rid == "F3" else ()) if rid in BENCH_RUNS else None

    def replicates(folder: Path, bases: list[str]) -> list[Path]:
        found = [p for p in sorted(folder.iterdir()) if p.is_dir()] if folder.is_dir() else []
        return [p for p in found if replicate_of(p.name)[1] and replicate_of(p.name)[0] in bases]

    out = []
    for rid in ABLATION_IDS:
        out.append(Target(rid, ablation_dir / rid, "ablation", modes_of(rid), rid in ATTENTION_RUNS))
    cells = grid_cells(scaling_dir, budget, sizes)
    for rid in cells:
        out.append(Target(rid, scaling_dir / rid, "grid", (), False))
    # Seed replicates, measured as their runs are: the training noise of every quantity compared.
    for p in replicates(ablation_dir, list(ABLATION_IDS)):
        out.append(Target(p.name, p, "replicate", modes_of(replicate_of(p.name)[0]), False))
    for p in replicates(scaling_dir, cells):
        out.append(Target(p.name, p, "replicate", (), False))
    return out


# ----------------------------------------------------------------------------- one run


def _rounded(values: Iterable[float], digits: int = 6) -> list[float]:
    return [round(float(v), digits) for v in values]


def _pixel_rows(per_sample: dict[str, Any], settings: EvidenceSettings) -> dict[str, Any]:
    """Per mode: the token-weighted answer loss with real and grey frames (as `fvlm eval` reports
    them) and the standard error of the gain from the per-sample differences."""
    from fvlm.eval.evaluate import summarise_losses

    out = {}
    for mode, row in summarise_losses(per_sample).items():
        arrays = per_sample["modes"][mode]
        tokens = arrays["tokens"].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            grey, real = arrays["loss_sum_blank"] / tokens, arrays["loss_sum"] / tokens
        paired = paired_difference(grey, real, tokens, n_boot=settings.n_boot, seed=settings.seed)
        out[mode] = {
            **row,
            "se": paired["se"],
            "ci95": paired["ci95"],
            "ci95_bootstrap": paired["ci95_bootstrap"],
            "above_noise": verdict(paired["ci95"]) == "yes",
        }
    return out


def bench_gain(row: dict[str, Any]) -> dict[str, Any]:
    """What the pixels do to one benchmark row's (run, mode) answers: accuracy with the real frames
    minus accuracy with every frame grey, paired on the same questions, with its analytic 95%
    interval and verdict ('yes': the real frames answer better)."""
    paired = paired_difference(row["correct"], row["grey_frames"]["correct"], n_boot=0)
    return {"diff": paired["diff"], "ci95": paired["ci95"], "verdict": verdict(paired["ci95"])}


def _bench_row(entry: dict[str, Any], mode: str) -> dict[str, Any] | None:
    return ((entry.get("bench") or {}).get("modes") or {}).get(mode)


def reads(row: dict[str, Any], bench: dict[str, Any] | None = None) -> bool:
    """Whether a pixel-check row (one run, one mode) says the model reads the pixels: its gain is
    above noise and at least READS_MIN_SHARE of the grey-frame loss; and, when the run was read on
    the benchmark in that mode (`bench`: that row), grey frames lower its accuracy (`bench_gain`)."""
    blank = row.get("loss_blank_frames")
    floor = READS_MIN_SHARE * blank if blank is not None and math.isfinite(blank) else math.inf
    by_loss = bool(row["above_noise"]) and row["pixel_gain"] >= floor
    return by_loss and (bench is None or bench_gain(bench)["verdict"] == "yes")


def run_reads(entry: dict[str, Any], mode: str) -> bool:
    """`reads` for one run's entry in one mode, with its benchmark row when it has one."""
    return reads(entry["pixel"][mode], _bench_row(entry, mode))


def _attention(
    model: VLMBase, cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, settings: EvidenceSettings, step: int | None
) -> dict[str, Any]:
    """Per frame index t, over the probe videos: the mean share of the fine (autoregressive) and the
    static (coarse) query's patch attention on the mover's patches, and the mover's share of the
    patches (= what uniform attention would put on it)."""
    from fvlm.data.loader import build_loader
    from fvlm.eval.looks import attention_record, mover_shares
    from fvlm.model.backbones import model_pixel_stats

    batch = next(
        iter(
            build_loader(
                cfg,
                "probe",
                tokenizer,
                train=False,
                batch_size=settings.probe_videos,
                max_samples=settings.probe_videos,
                pixel_stats=model_pixel_stats(model),
            )
        )
    )
    batch = {k: v.to(settings.device) if hasattr(v, "to") else v for k, v in batch.items()}
    record = attention_record(model, batch, batch["keys"], step, Path("unused.npz"))  # nothing is saved
    per_t: dict[int, dict[str, list[float]]] = {}
    for video in range(len(record.keys)):
        for which, name in (("coarse", "static"), ("fine", "fine")):
            for t, share, area in mover_shares(record, video, which) or []:
                cell = per_t.setdefault(t, {"static": [], "fine": [], "uniform": []})
                cell[name].append(share)
                if which == "coarse":  # the static query sees every frame: one area per (video, frame)
                    cell["uniform"].append(area)

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    frames = [
        {
            "t": t,
            "videos": len(c["static"]),
            "fine": mean(c["fine"]),
            "static": mean(c["static"]),
            "uniform": mean(c["uniform"]),
        }
        for t, c in sorted(per_t.items())
    ]
    every = {k: [v for c in per_t.values() for v in c[k]] for k in ("fine", "static", "uniform")}
    return {
        "videos": len(record.keys),
        "has_fine": record.fine is not None,
        "frames": frames,
        "overall": {k: mean(v) for k, v in every.items()},
    }


def evaluate_run(target: Target, settings: EvidenceSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """One run's measurements: {status: "ok", arch, default_mode, modes, pixel, samples, bench,
    attention, seconds}. Raises on failure (the caller records it)."""
    import torch

    from fvlm.data.loader import build_loader, split_path
    from fvlm.eval.bench import VisualSettings, read_bench
    from fvlm.eval.evaluate import (
        find_checkpoints,
        resolve_modes,
        run_benchmark,
        run_config,
        run_system_prompt,
        sample_losses,
    )
    from fvlm.model.backbones import model_pixel_stats
    from fvlm.model.build import load_model

    began = time.perf_counter()
    ckpt = find_checkpoints(target.run_dir)[-1]
    model, tokenizer = load_model(ckpt.folder, device=settings.device)
    model.eval()
    if tokenizer is None:
        raise RuntimeError(f"{ckpt.folder}: no tokenizer saved with the model")
    cfg = run_config(ckpt, model.cfg, [])
    # Stage 2 masks exactly the assistant's answer (its content and end-of-turn token; not the role
    # header, not the prompt), whatever stage the run trained with: the loss of what it answers.
    cfg.train.stage = 2
    modes = resolve_modes(None, model)
    entry: dict[str, Any] = {
        "status": "ok",
        "step": ckpt.step,
        "arch": type(model).__name__,
        "default_mode": model.default_mode,
        "modes": list(modes),
    }
    with torch.no_grad():
        loader = build_loader(
            cfg,
            "val",
            tokenizer,
            train=False,
            batch_size=settings.batch_size,
            max_samples=settings.max_samples,
            pixel_stats=model_pixel_stats(model),
        )
        per_sample = sample_losses(model, loader, modes, settings.device)
        entry["pixel"] = _pixel_rows(per_sample, settings)
        entry["samples"] = {
            "keys": [str(k) for k in per_sample["keys"]],
            "modes": {
                m: {
                    "tokens": [int(x) for x in a["tokens"]],
                    "loss_sum": _rounded(a["loss_sum"]),
                    "loss_sum_grey": _rounded(a["loss_sum_blank"]),
                }
                for m, a in per_sample["modes"].items()
            },
        }
        entry["bench"] = None
        if target.bench_modes is not None:
            bench = Path(split_path(cfg, "val")).parent / "bench"
            if bench.is_dir():
                questions = read_bench(str(bench), VisualSettings.from_config(cfg))[: settings.max_questions]
                wanted = tuple(m for m in (target.bench_modes or (model.default_mode,)) if m in modes)
                result = run_benchmark(
                    model,
                    tokenizer,
                    questions,
                    wanted,
                    batch_size=settings.batch_size,
                    device=settings.device,
                    score=settings.score,
                    system=run_system_prompt(cfg, tokenizer),
                )
                keep = ("accuracy", "ci95", "chance", "n", "correct", "grey_frames")
                entry["bench"] = {
                    "split": str(bench),
                    "questions": len(questions),
                    "digest": hashlib.sha1("\n".join(q.where for q in questions).encode()).hexdigest(),
                    "modes": {m: {k: r[k] for k in keep} for m, r in result.items()},
                }
            else:
                entry["bench_note"] = f"no benchmark split at {bench}"
        entry["attention"] = None
        if target.attention and hasattr(model, "q_static"):  # a query to look with (not the multi-token B1)
            try:
                entry["attention"] = _attention(model, cfg, tokenizer, settings, ckpt.step)
            except Exception as exc:  # the losses and the benchmark stand without it
                entry["attention_error"] = f"{type(exc).__name__}: {exc}"
                log(f"[evidence] {target.run_id}: attention not measured: {entry['attention_error']}")
    entry["seconds"] = round(time.perf_counter() - began, 2)
    gains = ", ".join(f"{m} {r['pixel_gain']:+.4f} (se {r['se']:.4f})" for m, r in entry["pixel"].items())
    bench_text = ""
    if entry["bench"]:
        bench_text = "; bench " + ", ".join(
            f"{m} {r['accuracy']:.3f} (grey {r['grey_frames']['accuracy']:.3f})"
            for m, r in entry["bench"]["modes"].items()
        )
    log(f"[evidence] {target.run_id}: pixel gain {gains}{bench_text} ({entry['seconds']:.0f}s)")
    return entry


# ----------------------------------------------------------------------------- comparisons


def _mode_of(entry: dict[str, Any], mode: str | None) -> str:
    return mode or entry["default_mode"]


def _per_sample_loss(entry: dict[str, Any], mode: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    arrays = entry["samples"]["modes"][mode]
    tokens = np.asarray(arrays["tokens"], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return entry["samples"]["keys"], np.asarray(arrays["loss_sum"]) / tokens, tokens


def _named(paired: dict[str, Any], first: float, second: float) -> dict[str, Any]:
    """paired_difference's result with the two means named after the sides of the comparison."""
    rest = {k: v for k, v in paired.items() if k not in ("a", "b")}
    return {"first": first, "second": second, **rest, "verdict": verdict(paired["ci95"])}


def compare(
    runs: dict[str, dict[str, Any]],
    first: tuple[str, str | None],
    second: tuple[str, str | None],
    settings: EvidenceSettings,
    label: str | None = None,
) -> dict[str, Any]:
    """Paired comparison of (run, mode) `first` against `second` (mode None: the run's default):
    accuracy on the same benchmark questions (first - second) and answer loss on the same val
    samples (second - first, so that positive means the first is better in both), each with
    `paired_difference`'s intervals and a verdict ('yes': the first is better)."""
    (ra, ma), (rb, mb) = first, second
    out: dict[str, Any] = {
        "label": label or f"{ra} vs {rb}",
        "first": {"run": ra},
        "second": {"run": rb},
        "accuracy": None,
        "answer_loss": None,
    }
    ea, eb = runs.get(ra) or {}, runs.get(rb) or {}
    missing = [r for r, e in ((ra, ea), (rb, eb)) if e.get("status") != "ok"]
    if missing:
        why = {r: (runs.get(r) or {}).get("reason") or (runs.get(r) or {}).get("status", "missing") for r in missing}
        out["note"] = "not measured: " + ", ".join(f"{r} ({w})" for r, w in why.items())
        return out
    ma, mb = _mode_of(ea, ma), _mode_of(eb, mb)
    out["first"]["mode"], out["second"]["mode"] = ma, mb
    notes = []
    ba, bb = ea.get("bench") or {}, eb.get("bench") or {}
    if ma in ba.get("modes", {}) and mb in bb.get("modes", {}):
        if ba["digest"] != bb["digest"]:
            notes.append("the two runs' benchmarks differ: accuracy not paired")
        else:
            paired = paired_difference(
                ba["modes"][ma]["correct"], bb["modes"][mb]["correct"], n_boot=settings.n_boot, seed=settings.seed
            )
            out["accuracy"] = _named(paired, first=paired["a"], second=paired["b"])
    else:
        notes.append("no benchmark result for both")
    if ma in ea["samples"]["modes"] and mb in eb["samples"]["modes"]:
        keys_a, loss_a, tok_a = _per_sample_loss(ea, ma)
        keys_b, loss_b, tok_b = _per_sample_loss(eb, mb)
        if keys_a != keys_b:  # samples skipped by one run's text settings: pair what both scored
            where = {k: i for i, k in reversed(list(enumerate(keys_b)))}
            rows = [(i, where[k]) for i, k in enumerate(keys_a) if k in where]
            ia, ib = (np.array([r[j] for r in rows], dtype=int) for j in (0, 1))
            loss_a, tok_a, loss_b, tok_b = loss_a[ia], tok_a[ia], loss_b[ib], tok_b[ib]
        # Loss per answer token of each sample, weighted by its answer tokens: the token-weighted
        # difference of the two runs' validation losses on the samples they share.
        paired = paired_difference(loss_b, loss_a, (tok_a + tok_b) / 2, n_boot=settings.n_boot, seed=settings.seed)
        out["answer_loss"] = _named(paired, first=paired["b"], second=paired["a"])
    if notes:
        out["note"] = "; ".join(notes)
    return out


def _pairs(grid: list[str]) -> list[tuple[str, tuple[str, str | None], tuple[str, str | None]]]:
    """The ablation pairs, then F vs B per size of the grid cells."""
    out = list(ABLATION_PAIRS)
    for rid in grid:
        match = GRID_CELL.match(rid)
        other = f"{match['size']}-{match['budget']}-B" if match else ""
        if match and match["arch"] == "F" and other in grid:
            out.append((f"{rid} vs {other} (foveated vs multi-token, same budget)", (rid, None), (other, None)))
    return out


def _judged(result: dict[str, Any], model: Any) -> dict[str, Any]:
    """A comparison's accuracy and answer-loss differences judged with their training noise too: each
    side that is its own training run adds its floor (fvlm.analysis.noise); two modes of one model
    add the floor of the difference between its modes. `verdict` becomes the judged one;
    `eval_verdict` keeps the evaluation's alone."""
    from fvlm.analysis import noise as training

    ra, rb = result["first"]["run"], result["second"]["run"]
    for key, metric in (("accuracy", "mc_accuracy"), ("answer_loss", "answer_loss")):
        r = result.get(key)
        if not r:
            continue
        if ra == rb:
            floors = [model.floor("fine_minus_static" if key == "answer_loss" else "fine_minus_static_accuracy", ra)]
        else:
            floors = [model.floor(metric, ra), model.floor(metric, rb)]
        judged = training.judge(r["diff"], r["se"], floors)
        r.update(
            ci95_eval=r["ci95"],
            eval_verdict=r["verdict"],
            ci95=judged["ci95"],
            verdict=judged["verdict"],
            training_noise=judged["training_noise"],
            provisional=judged["provisional"],
        )
    return result


def comparisons(
    runs: dict[str, dict[str, Any]], grid: list[str], settings: EvidenceSettings, model: Any = None
) -> list[dict[str, Any]]:
    """The ablation pairs, then F vs B per size of the grid cells; judged with the training noise of
    `model` (a fvlm.analysis.noise.NoiseModel) when one is given."""
    out = [compare(runs, a, b, settings, label) for label, a, b in _pairs(grid)]
    return [_judged(r, model) for r in out] if model is not None else out


def replicate_comparisons(
    runs: dict[str, dict[str, Any]], grid: list[str], settings: EvidenceSettings
) -> dict[str, list[dict[str, Any]]]:
    """Every comparison asked again of each seed replicate k: a side with a replicate k is replaced by
    it, a side without one stays. {label: [{k, first, second, accuracy verdict, answer-loss verdict}]},
    the original first (k = 0); a label none of whose sides has a replicate is left out."""
    from fvlm.experiments.matrix import replicate_id

    out: dict[str, list[dict[str, Any]]] = {}
    for label, (ra, ma), (rb, mb) in _pairs(grid):
        rows = []
        for k in range(0, 10):
            a = replicate_id(ra, k) if k and replicate_id(ra, k) in runs else ra
            b = replicate_id(rb, k) if k and replicate_id(rb, k) in runs else rb
            if k and a == ra and b == rb:
                continue
            r = compare(runs, (a, ma), (b, mb), settings, label)
            rows.append(
                {
                    "k": k,
                    "first": a,
                    "second": b,
                    "accuracy": (r.get("accuracy") or {}).get("verdict"),
                    "accuracy_diff": (r.get("accuracy") or {}).get("diff"),
                    "answer_loss": (r.get("answer_loss") or {}).get("verdict"),
                    "answer_loss_diff": (r.get("answer_loss") or {}).get("diff"),
                }
            )
        if len(rows) > 1:
            out[label] = rows
    return out


# ----------------------------------------------------------------------------- the verdict


def _interval_text(r: dict[str, Any] | None, digits: int = 3) -> str:
    if not r:
        return "n/a"
    lo, hi = r["ci95"]
    return f"{r['diff']:+.{digits}f} [95% {lo:+.{digits}f}, {hi:+.{digits}f}]"


def conclusion(runs: dict[str, dict[str, Any]], pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Does the foveated query beat the static one? From F3's fine (coarse_fine) vs static
    (coarse_only) query on the same benchmark questions (or, without a benchmark, the same val
    samples' answer loss): 'yes', 'no' (the static query is better) or 'not distinguishable'.
    Returns {answer, basis, sentence (one plain sentence with the numbers), details (the answer
    loss, F3 against A6 trained static-only, and whether F3 reads the pixels at all)}."""
    primary = next(p for p in pairs if p["label"] == PRIMARY)
    static = next(p for p in pairs if p["label"] == STATIC_TRAINED)
    basis = "accuracy" if primary.get("accuracy") else "answer_loss" if primary.get("answer_loss") else None
    if basis is None:
        why = primary.get("note", "F3 not measured")
        return {
            "answer": "not measured",
            "basis": None,
            "details": "",
            "sentence": f"Whether the foveated query beats the static one could not be measured ({why}).",
        }
    r = primary[basis]
    if basis == "accuracy":
        numbers = (
            f"on the same {r['n']} benchmark questions F3 scores {r['first']:.3f} with its fine query "
            f"(coarse_fine) and {r['second']:.3f} with its static query (coarse_only), a paired difference "
            f"of {_interval_text(r)}"
        )
    else:
        numbers = (
            f"on the same {r['n']} val samples F3's answer loss is {r['first']:.4f} with its fine query "
            f"(coarse_fine) and {r['second']:.4f} with its static query (coarse_only), static − fine "
            f"{_interval_text(r, 4)}"
        )
    sentence = {
        "yes": f"Yes, the foveated query beats the static one: {numbers}.",
        "no": f"No, the static query beats the foveated one: {numbers}.",
        "not distinguishable": f"Not distinguishable: {numbers}, an interval that holds 0.",
        "within training noise": f"Within training noise: {numbers}, an interval that holds 0 once a second "
        "training run's spread is counted (the evaluation alone would have decided).",
    }[r["verdict"]]
    details = []
    if basis == "accuracy" and primary.get("answer_loss"):
        loss = primary["answer_loss"]
        details.append(
            f"Answer loss on the same val samples, static − fine: {_interval_text(loss, 4)} ({loss['verdict']})."
        )
    other = static.get(basis)
    if other:
        measure, digits = ("accuracy", 3) if basis == "accuracy" else ("answer loss", 4)
        details.append(
            f"F3 against A6, trained with the static query only ({measure}): "
            f"{_interval_text(other, digits)} ({other['verdict']})."
        )
    f3 = runs.get("F3") or {}
    pixel = (f3.get("pixel") or {}).get("coarse_fine")
    if pixel:
        lo, hi = pixel["ci95"]
        if run_reads(f3, "coarse_fine"):
            details.append(
                f"F3 reads the pixels: grey frames raise its answer loss (coarse_fine) by "
                f"{pixel['pixel_gain']:.4f} [95% {lo:.4f}, {hi:.4f}]."
            )
        else:
            why = _not_reading_why(pixel, _bench_row(f3, "coarse_fine"))
            details.append(
                f"F3 does not read the pixels: its pixel gain (coarse_fine), {pixel['pixel_gain']:+.4f} "
                f"[95% {lo:+.4f}, {hi:+.4f}]: {why}; a difference between its queries cannot come from what it sees."
            )
    bench = ((f3.get("bench") or {}).get("modes") or {}).get("coarse_fine")
    if bench:
        details.append(
            f"With every frame grey F3 scores {bench['grey_frames']['accuracy']:.3f} (chance {bench['chance']:.3f})."
        )
    return {"answer": r["verdict"], "basis": basis, "sentence": sentence, "details": " ".join(details)}


def replicate_reads(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each run with seed replicates: which of them read the pixels in every mode measured."""
    from fvlm.experiments.matrix import replicate_of

    out: dict[str, dict[str, Any]] = {}
    for rid, entry in runs.items():
        base, k = replicate_of(rid)
        if entry.get("status") != "ok" or not entry.get("pixel"):
            continue
        if k or any(replicate_of(r)[0] == rid and replicate_of(r)[1] for r in runs):
            reads_all = all(run_reads(entry, mode) for mode in entry["pixel"])
            out.setdefault(base, {"runs": {}})["runs"][rid] = reads_all
    for record in out.values():
        record["reading"] = sum(record["runs"].values())
        record["of"] = len(record["runs"])
    return out


def grid_reading(evidence: dict[str, Any]) -> dict[str, Any] | None:
    """Which of the grid's measured cells read the pixels (`reads`, in every mode measured), and a
    sentence on what that means for the scaling answers: a size whose cells do not read has its foveated-vs-baseline comparisons decided by text learning alone.
    None when no grid cell was measured."""
    cells = {
        rid: all(run_reads(entry, mode) for mode in entry["pixel"])
        for rid in evidence.get("grid_cells", [])
        if (entry := evidence["runs"].get(rid) or {}).get("pixel")
    }
    if not cells:
        return None
    # A cell with seed replicates reads only when every seed of it does: one seed's reading near the
    # onset is not the config's (a second training run may not read yet).
    seeds = (evidence.get("replicates") or {}).get("reads") or {}
    unsure = {rid: seeds[rid] for rid in cells if rid in seeds and 0 < seeds[rid]["reading"] < seeds[rid]["of"]}
    for rid in unsure:
        cells[rid] = False

    def named(rids: list[str]) -> str:
        # Each with its pixel gain, so that the verdict shows its size: the smallest over the modes
        # measured, as a cell reads only when it reads in every one (the largest made a cell that does
        # not read in its own mode look as if it did, and flattered those that read). A cell whose
        # benchmark answers the pixels do not change also shows that difference.
        out = []
        for rid in rids:
            entry = evidence["runs"][rid]
            text = f"{min(r['pixel_gain'] for r in entry['pixel'].values()):+.4f}"
            unchanged = [
                gain
                for mode in entry["pixel"]
                if (row := _bench_row(entry, mode)) and (gain := bench_gain(row))["verdict"] != "yes"
            ]
            if unchanged:
                text += f"; bench accuracy, real − grey frames, {_interval_text(unchanged[0])}"
            out.append(f"{rid} ({text})")
        return ", ".join(out)

    blind = [rid for rid, reads in cells.items() if not reads]
    split = (
        " Cells that read on some seeds only count as not reading: "
        + ", ".join(f"{rid} ({r['reading']} of {r['of']} seeds)" for rid, r in unsure.items())
        + "."
        if unsure
        else ""
    )
    reading = [rid for rid, reads in cells.items() if reads]
    if not blind:
        sentence = f"Every measured grid cell reads the pixels (answer-token pixel gain): {named(reading)}."
    else:
        sentence = (
            f"Grid cells that do not read the pixels (answer-token pixel gain not above noise or under "
            f"{READS_MIN_SHARE:.0%} of the grey-frame loss, or benchmark answers that grey frames do not "
            f"change): {named(blind)}; the scaling answers (Decision 2, foveated vs baseline) at their sizes "
            f"measure how fast the models learn the text, not how they look."
        )
        if reading:
            sentence += f" Cells that read them: {named(reading)}."
    sentence += split
    return {"reads_pixels": cells, "sentence": sentence, "split_by_seed": unsure}


# ----------------------------------------------------------------------------- collect


def _dumps(value: Any, level: int = 0) -> str:
    """JSON indented by structure, with each list of plain values (per-sample losses, per-question
    outcomes) on one line: a readable file instead of one number per line."""
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k))}: {_dumps(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(f"{inner}{_dumps(v, level + 1)}" for v in value) + f"\n{pad}]"
    return json.dumps(value, allow_nan=True)


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    """Written beside and renamed over: a reader never sees half a file."""
    atomic.write_text(path, _dumps(data) + "\n")


def _failed(run_id: str, exc: BaseException, log: Callable[[str], None]) -> dict[str, Any]:
    log(f"[evidence] {run_id}: evaluation failed: {type(exc).__name__}: {exc}")
    return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}


def _print(text: str) -> None:
    print(text, flush=True)


def one_thread() -> None:
    """Initialiser of the spawned evaluation processes (here and in Phase 1b's): one torch thread each."""
    import torch

    torch.set_num_threads(1)


# What measures one run: evaluate_run, or a stand-in in tests.
Evaluate = Callable[[Target, EvidenceSettings, Callable[[str], None]], dict[str, Any]]


def _evaluate_all(
    todo: list[Target],
    settings: EvidenceSettings,
    jobs: int,
    log: Callable[[str], None],
    evaluate: Evaluate | None = None,
) -> Iterator[tuple[Target, dict[str, Any]]]:
    """(target, measurements or failure record) for each target, in `todo`'s order. One run's failure
    is recorded; the others and the report go on. With jobs > 1 at most `jobs` runs are in flight:
    a worker process that dies (killed, out of memory) fails the runs in flight beside it (the pool
    cannot say which one died), and the runs not yet started go on in a fresh pool. `evaluate`
    (default evaluate_run) is there for tests."""
    import torch

    evaluate = evaluate or evaluate_run
    if jobs <= 1 or len(todo) <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for t in todo:
                try:
                    yield t, evaluate(t, settings, log)
                except Exception as exc:
                    yield t, _failed(t.run_id, exc, log)
        finally:
            torch.set_num_threads(threads)
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    results: dict[str, dict[str, Any]] = {}
    queue = list(todo)
    while queue:
        with ProcessPoolExecutor(min(jobs, len(queue)), mp_context=context, initializer=one_thread) as pool:
            in_flight: dict[Any, Target] = {}
            broken = False
            while (queue and not broken) or in_flight:
                while queue and not broken and len(in_flight) < jobs:
                    t = queue.pop(0)
                    in_flight[pool.submit(evaluate, t, settings, _print)] = t
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    t = in_flight.pop(future)
                    try:
                        results[t.run_id] = future.result()
                    except BrokenProcessPool as exc:
                        broken = True
                        results[t.run_id] = _failed(t.run_id, exc, log)
                    except Exception as exc:
                        results[t.run_id] = _failed(t.run_id, exc, log)
    for t in todo:
        yield t, results[t.run_id]


def collect_evidence(
    root: Path,
    ablation_dir: Path,
    scaling_dir: Path,
    settings: EvidenceSettings | None = None,
    *,
    budget: str | None = None,
    sizes: tuple[str, ...] | None = None,
    force: bool = False,
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measures every target run (the plan's ablations, the grid's largest-budget F and B cells),
    compares them and writes <root>/evidence.json. When that file exists with the same settings
    and every run it covers has the same fingerprint, it is returned as it is (nothing loaded).
    Otherwise runs whose fingerprint is unchanged and that were measured keep their measurements.
    A run that fails to evaluate is logged and recorded (status "failed", error), not raised.

    On the CPU, `jobs` runs are measured side by side, each in a spawned one-thread process (the
    measurements are per run, so the file is the same whatever `jobs` is).

    Returns {version, settings, runs: {run_id: {group, run_dir, fingerprint, status, ...}},
    grid_cells, comparisons, attention: {run_id: per-frame table}, conclusion, seconds}."""
    settings = settings or EvidenceSettings()
    root = Path(root)
    path = root / EVIDENCE_FILE
    chosen = targets(Path(ablation_dir), Path(scaling_dir), budget, sizes)
    prints = {t.run_id: fingerprint(t.run_dir) for t in chosen}
    previous: dict[str, Any] = {}
    if path.is_file():
        try:
            previous = parse_json(path.read_bytes())
            if not isinstance(previous, dict):
                raise ValueError
        except (OSError, ValueError):
            previous = {}
    same_settings = previous.get("version") == VERSION and previous.get("settings") == asdict(settings)
    old_runs = previous.get("runs", {}) if same_settings else {}
    if not force and same_settings and {r: e.get("fingerprint") for r, e in old_runs.items()} == prints:
        log(f"[evidence] {path}: every run unchanged, kept")
        return previous

    began = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    todo: list[Target] = []
    for t in chosen:
        base = {"group": t.group, "run_dir": str(t.run_dir), "fingerprint": prints[t.run_id]}
        old = old_runs.get(t.run_id)
        if not force and old and old.get("fingerprint") == prints[t.run_id] and old.get("status") == "ok":
            runs[t.run_id] = old
        elif prints[t.run_id]["status"] != "completed":
            runs[t.run_id] = {**base, "status": "not evaluated", "reason": f"run {prints[t.run_id]['status']}"}
        else:
            runs[t.run_id] = base
            todo.append(t)
    for t, result in _evaluate_all(todo, settings, jobs if settings.device == "cpu" else 1, log):
        runs[t.run_id] = {**runs[t.run_id], **result}
    from fvlm.analysis import noise as training

    grid = [t.run_id for t in chosen if t.group == "grid"]
    model = training.add_evidence(training.NoiseModel(), runs)
    pairs = comparisons(runs, grid, settings, model)
    evidence: dict[str, Any] = {
        "version": VERSION,
        "settings": asdict(settings),
        "runs": runs,
        "grid_cells": grid,
        "comparisons": pairs,
        "attention": {rid: e["attention"] for rid, e in runs.items() if e.get("attention")},
        "conclusion": conclusion(runs, pairs),
        "replicates": {
            "floors": model.floors(),
            "comparisons": replicate_comparisons(runs, grid, settings),
            "reads": replicate_reads(runs),
        },
        "seconds": round(time.perf_counter() - began, 1),
    }
    root.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, evidence)
    log(f"[evidence] {evidence['conclusion']['sentence']} {evidence['conclusion']['details']}")
    log(f"[evidence] wrote {path} ({evidence['seconds']:.0f}s)")
    return evidence


# ----------------------------------------------------------------------------- report


def _num(value: float | None, digits: int = 4, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _ci(interval: Sequence[float | None] | None, digits: int = 4, sign: bool = False) -> str:
    if not interval:
        return "n/a"
    return f"[{_num(interval[0], digits, sign)}, {_num(interval[1], digits, sign)}]"


def _not_reading_why(row: dict[str, Any], bench: dict[str, Any] | None = None) -> str:
    if verdict(row["ci95"]) == "no":
        return "below 0 (grey frames lower)"
    if not row["above_noise"]:
        return "not above noise"
    if not reads(row):
        return f"under {READS_MIN_SHARE:.0%} of the grey-frame loss"
    return f"bench answers unchanged: real − grey accuracy {_interval_text(bench_gain(bench) if bench else None)}"


def _reads_word(row: dict[str, Any], bench: dict[str, Any] | None = None) -> str:
    return "yes" if reads(row, bench) else f"no ({_not_reading_why(row, bench)})"


def _side(side: dict[str, Any]) -> str:
    return f"{side['run']} {side['mode']}" if side.get("mode") else side["run"]


def evidence_markdown(evidence: dict[str, Any]) -> str:
    """The report's `## Foveation evidence` section: the conclusion, then one table per measurement."""
    runs = evidence["runs"]
    s = evidence["settings"]
    lines = [
        "",
        "## Foveation evidence",
        "",
        f"**{evidence['conclusion']['sentence']}**",
        "",
        evidence["conclusion"]["details"],
        "",
        *([grid["sentence"], ""] if (grid := grid_reading(evidence)) else []),
        f"Each run's latest checkpoint; intervals are 95%, from per-sample (per-question) paired differences "
        f"on the same items; bootstrap: {s['n_boot']} seeded resamples. Details: `{EVIDENCE_FILE}`.",
        "",
        "### Pixel check on the answer tokens",
        "",
        f"Validation loss of the assistant's answer tokens only (first {s['max_samples']} val samples), with "
        "the real frames and with every frame flat grey (frame count and masks unchanged). Pixel gain = grey − "
        "real: what the model gets from the pixels. Reads: its 95% interval (± 1.96 s.e. of the "
        "per-sample differences, token-weighted) excludes 0, the gain is at least "
        f"{READS_MIN_SHARE:.0%} of the grey-frame loss and, for a run also read on the benchmark in that "
        "mode, its accuracy with the real frames is above its accuracy with grey ones (below).",
        "",
        "| run | mode | answer loss | grey frames | pixel gain | s.e. | 95% interval | reads | samples |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rid, e in runs.items():
        for mode, r in (e.get("pixel") or {}).items():
            lines.append(
                f"| {rid} | {mode} | {_num(r['loss'])} | {_num(r['loss_blank_frames'])} | "
                f"{_num(r['pixel_gain'], sign=True)} | {_num(r['se'])} | {_ci(r['ci95'], sign=True)} | "
                f"{_reads_word(r, _bench_row(e, mode))} | {r['n']} |"
            )
    bench_rows = [
        (rid, mode, r) for rid, e in runs.items() for mode, r in ((e.get("bench") or {}).get("modes") or {}).items()
    ]
    if bench_rows:
        lines += [
            "",
            "### Multiple choice (synthetic benchmark)",
            "",
            "Accuracy with the real frames and with every frame grey (same questions; 95% Wilson intervals), "
            "and what the pixels bring: real − grey, paired on the same questions (analytic 95% interval).",
            "",
            "| run | mode | accuracy | 95% CI | grey frames | grey 95% CI | chance | real − grey | 95% | questions |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for rid, mode, r in bench_rows:
            g, gain = r["grey_frames"], bench_gain(r)
            lines.append(
                f"| {rid} | {mode} | {_num(r['accuracy'], 3)} | {_ci(r['ci95'], 3)} | "
                f"{_num(g['accuracy'], 3)} | {_ci(g['ci95'], 3)} | {_num(r['chance'], 3)} | "
                f"{_num(gain['diff'], 3, True)} | {_ci(gain['ci95'], 3, True)} | {r['n']} |"
            )
    lines += [
        "",
        "### Paired differences",
        "",
        "First minus second on the same questions (accuracy) and second minus first on the same val samples "
        "(answer loss per token): positive = the first is better. The analytic interval adds, where seed "
        "replicates measured it, the training noise of each run compared (t quantile for its degrees of "
        "freedom; the bootstrap column is the evaluation's alone). Verdict: yes (the first is better), no (the "
        "second is), within training noise (the evaluation alone would have decided, a second training run "
        "may not), not distinguishable.",
        "",
        "| comparison | first | second | accuracy diff | 95% (analytic) | 95% (bootstrap) | verdict | "
        "answer-loss diff | 95% (analytic) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in evidence["comparisons"]:
        acc, loss = p.get("accuracy") or {}, p.get("answer_loss") or {}
        note = f" ({p['note']})" if p.get("note") else ""
        lines.append(
            f"| {p['label']}{note} | {_side(p['first'])} | {_side(p['second'])} | "
            f"{_num(acc.get('diff'), 3, True)} | {_ci(acc.get('ci95'), 3, True)} | "
            f"{_ci(acc.get('ci95_bootstrap'), 3, True)} | {acc.get('verdict', 'n/a')} | "
            f"{_num(loss.get('diff'), 4, True)} | {_ci(loss.get('ci95'), 4, True)} | "
            f"{loss.get('verdict', 'n/a')} |"
        )
    for rid, a in evidence["attention"].items():
        lines += [
            "",
            f"### Attention on the moving object: {rid}",
            "",
            f"Share of the query's patch attention on the mover's patches, per frame, mean over {a['videos']} "
            "probe videos; uniform = the mover's share of the patches (what attention spread evenly would give). "
            "Fine = the LLM-chosen query (autoregressive mode), static = the coarse query.",
            "",
            "| frame | videos | fine query | static query | uniform |",
            "|---|---|---|---|---|",
        ]
        for f in a["frames"]:
            lines.append(
                f"| {f['t']} | {f['videos']} | {_num(f['fine'], 3)} | {_num(f['static'], 3)} | "
                f"{_num(f['uniform'], 3)} |"
            )
        o = a["overall"]
        lines.append(f"| all | | {_num(o['fine'], 3)} | {_num(o['static'], 3)} | {_num(o['uniform'], 3)} |")
    lines += _replicates_markdown(evidence.get("replicates") or {})
    left = [
        f"{rid} ({e.get('reason') or e.get('error') or e['status']})"
        for rid, e in runs.items()
        if e.get("status") != "ok"
    ]
    if left:
        lines += ["", f"Not measured: {'; '.join(left)}."]
    return "\n".join(lines) + "\n"


def _replicates_markdown(replicates: dict[str, Any]) -> list[str]:
    """The evidence's part of the report's replication: its noise floors, whether each replicate reads,
    and each comparison asked again of each replicate."""
    from fvlm.analysis.noise import floors_table

    if not replicates.get("floors"):
        return [
            "",
            "### Replication of the evidence",
            "",
            "No seed replicates were measured: the verdicts above rest on the evaluation samples alone (provisional).",
        ]
    lines = [
        "",
        "### Replication of the evidence",
        "",
        "Between-seed standard deviation of each measured quantity (95% interval from its degrees of "
        "freedom); the paired verdicts above add it to their evaluation noise, once per training run compared.",
        "",
        *floors_table(replicates["floors"]),
    ]
    if replicates.get("reads"):
        lines += ["", "| run | reads the pixels, per seed | reading |", "|---|---|---|"]
        for base, r in replicates["reads"].items():
            seeds = ", ".join(f"{rid}: {'yes' if ok else 'no'}" for rid, ok in r["runs"].items())
            lines.append(f"| {base} | {seeds} | {r['reading']} of {r['of']} |")
    if replicates.get("comparisons"):
        lines += [
            "",
            "Each comparison asked again with the replicates (k = 0: the runs above), evaluation noise only:",
            "",
            "| comparison | k | first | second | accuracy diff | verdict | answer-loss diff | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label, rows in replicates["comparisons"].items():
            for r in rows:
                lines.append(
                    f"| {label} | {r['k']} | {r['first']} | {r['second']} | {_num(r['accuracy_diff'], 3, True)} | "
                    f"{r['accuracy'] or 'n/a'} | {_num(r['answer_loss_diff'], 4, True)} | {r['answer_loss'] or 'n/a'} |"
                )
    return lines


def decisions_summary(evidence: dict[str, Any]) -> dict[str, Any]:
    """The decisions.json entry: the conclusion and every table's numbers, without the per-sample and
    per-question lists (those stay in evidence.json)."""
    runs = evidence["runs"]
    pixel = [
        {
            "run": rid,
            "mode": mode,
            **{
                k: r[k] for k in ("loss", "loss_blank_frames", "pixel_gain", "se", "ci95", "above_noise", "n", "tokens")
            },
            "reads": run_reads(e, mode),
        }
        for rid, e in runs.items()
        for mode, r in (e.get("pixel") or {}).items()
    ]
    bench = [
        {
            "run": rid,
            "mode": mode,
            **{k: r[k] for k in ("accuracy", "ci95", "chance", "n")},
            "grey_accuracy": r["grey_frames"]["accuracy"],
            "grey_ci95": r["grey_frames"]["ci95"],
            "real_minus_grey": bench_gain(r),
        }
        for rid, e in runs.items()
        for mode, r in ((e.get("bench") or {}).get("modes") or {}).items()
    ]
    return {
        "answer": evidence["conclusion"]["answer"],
        "basis": evidence["conclusion"]["basis"],
        "sentence": evidence["conclusion"]["sentence"],
        "details": evidence["conclusion"]["details"],
        "grid_reading": grid_reading(evidence),
        "pixel_check": pixel,
        "benchmark": bench,
        "comparisons": evidence["comparisons"],
        "attention": evidence["attention"],
        "runs": {
            rid: e.get("status")
            if e.get("status") == "ok"
            else f"{e.get('status')}: {e.get('reason') or e.get('error') or ''}".rstrip(": ")
            for rid, e in runs.items()
        },
        "settings": evidence["settings"],
        "replicates": evidence.get("replicates"),
        "file": EVIDENCE_FILE,
    }
