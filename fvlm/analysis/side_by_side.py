"""Two or more whole Phase 1 outputs (other seed offsets, other machines), verdict by verdict.

Every verdict is reduced to a claim: a direction (which config is ahead, which way the advantage
moves with size, pass or fail) or none (within noise, within training noise, not distinguishable,
unknown). Two outputs contradict each other on an item when both make a claim and the claims differ;
one claiming and the other not is a difference the noise allows ("ahead" against "within noise"),
listed but not counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fvlm.errors import UsageError, json_problem, parse_json, read_text

_AHEAD = {"foveated ahead": "foveated", "baseline ahead": "baseline"}


def _decisions(path: Path) -> dict[str, Any]:
    """decisions.json of a Phase 1 output folder, its report folder, or the file itself."""
    for candidate in (path, path / "decisions.json", path / "report" / "decisions.json"):
        if candidate.is_file():
            try:
                decisions = parse_json(read_text(candidate))
            except ValueError as exc:
                raise UsageError(f"{candidate}: not a readable decisions.json ({json_problem(exc)})") from None
            if not isinstance(decisions, dict):
                raise UsageError(f"{candidate}: not a readable decisions.json (not a JSON object)")
            return decisions
    raise UsageError(f"{path}: no decisions.json there (give a Phase 1 output folder or its report folder)")


def _question_claim(q: dict[str, Any]) -> tuple[str, str | None]:
    verdict = str(q.get("verdict") or "")
    winner = q.get("winner")
    if q.get("id") == "data_mix" and verdict.startswith(("D1:", "F3:")):
        # D1 is adopted only when its video interval is above 0; F3 is a claim only when D1 is behind.
        by_kind = q.get("by_kind") or {}
        video = by_kind.get("video") or {}
        lo, hi = (video.get("ci95_bootstrap") or [None, None])[:2]
        if verdict.startswith("D1:"):
            return verdict, "D1"
        return verdict, "F3" if hi is not None and hi < 0 else None
    return verdict, (winner if verdict.startswith("clear") else None)


def _cell_claim(result: dict[str, Any] | None) -> tuple[str, str | None]:
    if not result:
        return "not compared", None
    verdict = str(result.get("verdict") or "")
    return f"{verdict} ({result.get('advantage', float('nan')):+.4f})", _AHEAD.get(verdict)


def _bound_claim(text: str | None) -> tuple[str, str | None]:
    if not text:
        return "none", None
    if text.startswith("foveated ahead"):
        return text, "foveated"
    if text.startswith("foveated not behind"):
        return text, "foveated or tie"
    return text, None


def claims(decisions: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    """{item: (what the output says, its claim or None)} over every verdict of one output."""
    out: dict[str, tuple[str, str | None]] = {}
    for q in decisions.get("questions", []):
        out[f"decision 1: {q['id']}"] = _question_claim(q)
    for g in decisions.get("go_no_go", []):
        status = g.get("status")
        out[f"go/no-go: {g['criterion']}"] = (str(status), status if status in ("pass", "fail") else None)
    fvb = decisions.get("foveated_vs_baseline") or {}
    for cell in fvb.get("cells", []):
        name = cell["foveated"]
        out[f"cell {name}: same samples"] = _cell_claim(cell.get("same_data"))
        if cell.get("same_flops"):
            out[f"cell {name}: equal FLOPs"] = _cell_claim(cell["same_flops"])
        elif cell.get("same_flops_bound"):
            out[f"cell {name}: equal FLOPs"] = _bound_claim(cell["same_flops_bound"])
    for key in ("scaling", "scaling_reading"):
        if fvb.get(key):
            verdict = fvb[key].get("verdict")
            out[f"does foveation scale ({key})"] = (str(verdict), verdict if verdict in ("grows", "shrinks") else None)
    evidence = decisions.get("foveation_evidence") or {}
    if evidence:
        answer = evidence.get("answer")
        out["foveated query beats the static one"] = (str(answer), answer if answer in ("yes", "no") else None)
        for p in evidence.get("comparisons", []):
            for key in ("accuracy", "answer_loss"):
                r = p.get(key)
                if r:
                    verdict = r.get("verdict")
                    out[f"{p['label']}: {key}"] = (
                        f"{verdict} ({r['diff']:+.4f})",
                        verdict if verdict in ("yes", "no") else None,
                    )
    return out


def _compatible(a: str, b: str) -> bool:
    pair = {a, b}
    return a == b or pair == {"foveated", "foveated or tie"}


def side_by_side(paths: list[Path]) -> dict[str, Any]:
    """Every item any output has, with each output's answer; `contradictions` counts the items where
    two outputs make incompatible claims, `differences` those where one claims and another does not."""
    if len(paths) < 2:
        raise UsageError("--side-by-side needs two or more Phase 1 outputs")
    each = [claims(_decisions(p)) for p in paths]
    items = list(dict.fromkeys(k for c in each for k in c))
    rows = []
    for item in items:
        answers = [c.get(item, ("absent", None)) for c in each]
        made = [claim for _, claim in answers if claim is not None]
        if any(not _compatible(a, b) for a in made for b in made):
            status = "contradiction"
        elif made and len(made) < len(answers):
            status = "claim against no claim"
        else:
            status = "same"
        rows.append(
            {
                "item": item,
                "answers": [text for text, _ in answers],
                "claims": [c for _, c in answers],
                "status": status,
            }
        )
    return {
        "outputs": [str(p) for p in paths],
        "rows": rows,
        "contradictions": sum(r["status"] == "contradiction" for r in rows),
        "differences": sum(r["status"] == "claim against no claim" for r in rows),
        "items": len(rows),
    }


def markdown(result: dict[str, Any]) -> str:
    head = " | ".join(f"output {i + 1}" for i in range(len(result["outputs"])))
    lines = [
        "# Phase 1 outputs side by side",
        "",
        *[f"- output {i + 1}: `{p}`" for i, p in enumerate(result["outputs"])],
        "",
        f"**{result['contradictions']} contradiction(s)** over {result['items']} verdicts (both outputs claim, "
        f"and the claims differ); {result['differences']} verdict(s) where one output claims and another finds "
        "the difference within noise.",
        "",
        f"| verdict | {head} | status |",
        "|---|" + "---|" * len(result["outputs"]) + "---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['item']} | " + " | ".join(a.replace("|", "/") for a in r["answers"]) + f" | {r['status']} |"
        )
    return "\n".join(lines) + "\n"
