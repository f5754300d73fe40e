"""Paired comparisons inside `fvlm eval`'s results: two modes of one checkpoint on the same
validation samples and benchmark questions, and two checkpoints on the same questions, each with
`fvlm.eval.stats.paired_difference`'s 95% intervals (questions of one video resampled together).

Signs: `<a>_minus_<b>` is a's value minus b's, so a positive loss difference means b is better and
a positive accuracy difference means a is better.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fvlm import atomic
from fvlm.eval.stats import paired_difference

# The order tables and pairs use: from the cheapest mode to the streaming one.
MODES_ORDER = ("coarse_only", "coarse_fine", "autoregressive")


def _pairs(modes) -> list[tuple[str, str]]:
    present = [m for m in MODES_ORDER if m in modes]
    return [(a, b) for i, a in enumerate(present) for b in present[i + 1 :]]


def loss_gap_intervals(per_sample: dict) -> dict[str, dict[str, Any]]:
    """Per pair of modes, the token-weighted validation-loss difference on the same samples (equal
    to `mode_gaps`'s gap) with its intervals. per_sample: `sample_losses`'s result."""
    modes = per_sample["modes"]
    out = {}
    for a, b in _pairs(modes):
        tokens = modes[a]["tokens"]
        with np.errstate(invalid="ignore", divide="ignore"):
            loss_a = modes[a]["loss_sum"] / tokens
            loss_b = modes[b]["loss_sum"] / tokens
        out[f"{a}_minus_{b}"] = paired_difference(loss_a, loss_b, tokens)
    return out


def accuracy_mode_differences(by_mode: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Per pair of modes, the accuracy difference on the same questions (one benchmark)."""
    out = {}
    for a, b in _pairs(by_mode):
        ra, rb = by_mode[a], by_mode[b]
        out[f"{a}_minus_{b}"] = paired_difference(ra["correct"], rb["correct"], clusters=ra.get("videos"))
    return out


def checkpoint_differences(later: dict, earlier: dict) -> dict[str, Any]:
    """Accuracy of `later` minus `earlier` (two `evaluate_checkpoint` entries), per benchmark and
    mode, on the questions both answered (matched by question id)."""
    out: dict[str, Any] = {"later_step": later.get("step"), "earlier_step": earlier.get("step"), "bench": {}}
    for name, by_mode in (later.get("bench") or {}).items():
        other = (earlier.get("bench") or {}).get(name) or {}
        for mode, result in by_mode.items():
            if mode not in other:
                continue
            where = {q: i for i, q in enumerate(other[mode].get("question_ids") or [])}
            rows = [(i, where[q]) for i, q in enumerate(result.get("question_ids") or []) if q in where]
            if not rows:
                continue
            i_later, i_earlier = (np.array([r[k] for r in rows], dtype=int) for k in (0, 1))
            videos = np.asarray(result.get("videos") or result["question_ids"], dtype=object)[i_later]
            out["bench"].setdefault(name, {})[mode] = paired_difference(
                np.asarray(result["correct"])[i_later],
                np.asarray(other[mode]["correct"])[i_earlier],
                clusters=list(videos),
            )
    return out


def sample_records(
    name: str,
    step: int | None,
    questions,
    scores: dict[str, list[np.ndarray]],
    grey: dict[str, list[np.ndarray]] | None,
    score: str,
) -> list[dict[str, Any]]:
    """One record per question and mode for `--log-samples`: each option's mean and summed answer
    log-likelihood, the option chosen by `score`, and the same with every frame grey."""
    from fvlm.eval.scoring import chosen_options

    records = []
    for mode, per_question in scores.items():
        chosen = chosen_options(per_question, score)
        grey_chosen = chosen_options(grey[mode], score) if grey else None
        for i, (q, s) in enumerate(zip(questions, per_question)):
            record = {
                "benchmark": name,
                "step": step,
                "mode": mode,
                "question_id": q.where,
                "video": q.cluster,
                "category": q.category,
                "options": list(q.options),
                "answer": q.answer,
                "scores_mean": [float(v) for v in s[:, 1]],
                "scores_sum": [float(v) for v in s[:, 0]],
                "score": score,
                "chosen": chosen[i],
                "correct": chosen[i] == q.answer,
            }
            if grey is not None and grey_chosen is not None:
                record.update(
                    grey_scores_mean=[float(v) for v in grey[mode][i][:, 1]],
                    grey_scores_sum=[float(v) for v in grey[mode][i][:, 0]],
                    grey_chosen=grey_chosen[i],
                )
            records.append(record)
    return records


def write_samples(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path
