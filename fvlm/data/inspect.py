"""`fvlm data inspect`: what a researcher checks before committing GPU hours.

Reads every sample through the same code the loader uses (so "skipped" means exactly what training
would skip), and reports counts per source and kind, frame-count and token-length histograms, the
requested mix next to the mix a seeded stream actually realises, and every skipped sample.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TypedDict

import numpy as np

from fvlm.config import RunConfig
from fvlm.data.decode import SampleError
from fvlm.data.index import KINDS
from fvlm.data.loader import load_index, sample_reader
from fvlm.data.schedule import TrainSchedule, source_probabilities
from fvlm.errors import UsageError, read_json

TOKEN_BIN = 16


class SkippedSample(TypedDict):
    shard: str
    key: str
    reason: str


class TokenLengths(TypedDict):
    """Text lengths in tokens before truncation; `histogram` counts them in bins of TOKEN_BIN."""

    min: int
    mean: float
    p95: int
    max: int
    truncated: int
    histogram: dict[str, int]


class MixReport(TypedDict):
    """The requested mix next to the one `draws` seeded draws of the training stream realise."""

    draws: int
    requested_by_source: dict[str, float]
    realised_by_source: dict[str, float]
    requested_by_kind: dict[str, float]
    realised_by_kind: dict[str, float]


class _SplitCounts(TypedDict):
    path: str
    shards: int
    samples: int
    by_kind: dict[str, int]
    by_source: dict[str, int]
    frames_histogram: dict[str, int]
    skipped: list[SkippedSample]
    skipped_by_reason: dict[str, int]


class SplitReport(_SplitCounts, total=False):
    """One split's report: `token_length` when its samples were decoded, `mix` when it holds any,
    `notes_by_reason` when samples were kept with a remark (frame_gap: frames numbered with gaps)."""

    token_length: TokenLengths
    mix: MixReport
    notes_by_reason: dict[str, int]


class _InspectReport(TypedDict):
    path: str
    splits: dict[str, SplitReport]


class InspectReport(_InspectReport, total=False):
    """Every split's report; `requested`: a synthetic set's manifest counts per split and kind."""

    requested: dict[str, dict[str, int]]


def split_folders(path: str) -> dict[str, str]:
    """A synthetic set's output folder (manifest.json + split folders) inspects split by split."""
    root = Path(path)
    if (root / "manifest.json").is_file():
        return {p.name: str(p) for p in sorted(root.iterdir()) if p.is_dir() and any(p.rglob("*.tar"))}
    return {"data": path}


def inspect_split(spec: str, cfg: RunConfig, *, decode: bool = True, draws: int = 20000) -> SplitReport:
    from fvlm.model.backbones import load_tokenizer

    d = cfg.data
    index = load_index(spec, "data inspect")
    reader = sample_reader(cfg, index, load_tokenizer(cfg.model.llm))
    skipped: list[SkippedSample] = [{"shard": s.shard, "key": s.key, "reason": s.reason} for s in index.skips]
    frames_hist: Counter[int] = Counter()
    tokens_hist: Counter[int] = Counter()
    token_lengths: list[int] = []
    usable: Counter[tuple[str, str]] = Counter()
    for row in range(len(index)):
        if decode:
            try:
                sample = reader.load(row)
            except SampleError as exc:
                skipped.append({"shard": exc.where[0], "key": exc.where[1], "reason": exc.reason})
                continue
            frames_hist[int(sample["frames"].shape[0])] += 1
            token_lengths.append(sample["full_length"])
            tokens_hist[sample["full_length"] // TOKEN_BIN * TOKEN_BIN] += 1
        else:
            frames_hist[reader.visual_count(row)] += 1
        usable[(index.source_of(row), index.kind_of(row))] += 1
    report: SplitReport = {
        "path": spec,
        "shards": len(index.shards),
        "samples": sum(usable.values()),
        "by_kind": {k: sum(n for (_, kk), n in usable.items() if kk == k) for k in KINDS},
        "by_source": {s: sum(n for (ss, _), n in usable.items() if ss == s) for s in index.sources},
        "frames_histogram": {str(k): v for k, v in sorted(frames_hist.items())},
        "skipped": skipped,
        "skipped_by_reason": dict(Counter(s["reason"] for s in skipped)),
    }
    if index.notes:
        report["notes_by_reason"] = dict(Counter(n.reason for n in index.notes))
    if token_lengths:
        report["token_length"] = {
            "min": int(min(token_lengths)),
            "mean": round(float(np.mean(token_lengths)), 1),
            "p95": int(np.percentile(token_lengths, 95)),
            "max": int(max(token_lengths)),
            "truncated": int(sum(n > d.max_text_tokens for n in token_lengths)),
            "histogram": {f"{k}-{k + TOKEN_BIN - 1}": v for k, v in sorted(tokens_hist.items())},
        }
    if len(index):
        requested = source_probabilities(index, d.mix, d.text_ratio)
        rows = TrainSchedule(index, requested, cfg.data_seed).rows_at(0, draws)
        realised_sources = Counter(index.source_of(int(r)) for r in rows)
        realised_kinds = Counter(index.kind_of(int(r)) for r in rows)
        requested_kinds: dict[str, float] = dict.fromkeys(KINDS, 0.0)
        for source, p in requested.items():
            rows_of = index.rows_of_source(source)
            for k in KINDS:
                requested_kinds[k] += p * float(np.mean(index.kind_id[rows_of] == KINDS.index(k)))
        report["mix"] = {
            "draws": draws,
            "requested_by_source": {s: round(p, 4) for s, p in sorted(requested.items())},
            "realised_by_source": {s: round(realised_sources[s] / draws, 4) for s in sorted(requested)},
            "requested_by_kind": {k: round(requested_kinds[k], 4) for k in KINDS},
            "realised_by_kind": {k: round(realised_kinds[k] / draws, 4) for k in KINDS},
        }
    return report


def inspect_path(path: str, cfg: RunConfig, *, decode: bool = True) -> InspectReport:
    folders = split_folders(path)
    if not folders:
        raise UsageError(f"data inspect: no shards under {path}")
    out: InspectReport = {
        "path": path,
        "splits": {name: inspect_split(spec, cfg, decode=decode) for name, spec in folders.items()},
    }
    manifest = Path(path) / "manifest.json"
    if manifest.is_file():
        requested = read_json(manifest)
        if not isinstance(requested, dict) or not isinstance(requested.get("splits"), dict):
            raise UsageError(f"{manifest}: missing field 'splits'")
        out["requested"] = requested["splits"]
    return out


def format_report(report: InspectReport) -> str:
    lines = [f"{report['path']}"]
    for name, r in report["splits"].items():
        lines.append(f"\n[{name}] {r['samples']} usable samples in {r['shards']} shards")
        lines.append("  by kind:   " + ", ".join(f"{k} {n}" for k, n in r["by_kind"].items()))
        if name in report.get("requested", {}):
            req = report["requested"][name]
            lines.append("  requested: " + ", ".join(f"{k} {req[k]}" for k in KINDS))
        lines.append("  by source: " + ", ".join(f"{s} {n}" for s, n in r["by_source"].items()))
        lines.append("  frames:    " + ", ".join(f"{k}f x{n}" for k, n in r["frames_histogram"].items()))
        if "token_length" in r:
            t = r["token_length"]
            lines.append(
                f"  tokens:    min {t['min']}, mean {t['mean']}, p95 {t['p95']}, max {t['max']} "
                f"(before truncation; {t['truncated']} truncated)"
            )
            lines.append("             " + ", ".join(f"{b}: {n}" for b, n in t["histogram"].items()))
        if "mix" in r:
            m = r["mix"]
            lines.append(f"  mix over {m['draws']} seeded draws (requested -> realised):")
            for k in KINDS:
                lines.append(f"    {k:<6} {m['requested_by_kind'][k]:.3f} -> {m['realised_by_kind'][k]:.3f}")
        if "notes_by_reason" in r:
            lines.append(f"  kept with notes: {r['notes_by_reason']}")
        lines.append(f"  skipped:   {len(r['skipped'])}" + (f" {r['skipped_by_reason']}" if r["skipped"] else ""))
        for s in r["skipped"]:
            lines.append(f"    {s['reason']:<22} {s['key']}  ({s['shard']})")
    return "\n".join(lines)
