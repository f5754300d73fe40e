"""Training noise: how much a second training run of the same config differs, measured from seed
replicates, and the verdicts that take it into account.

A replicate `<id>.s<k>` is run `<id>` again with another seed (initialisation and data order;
fvlm.experiments.matrix.replicate_specs). A group is a run with its replicates. Within a group, every
quantity a verdict compares (val loss, answer loss, pixel gain, MC accuracy) scatters by the training
noise plus its evaluation noise; the between-seed variance of a group, pooled over the groups of one
place (the ablation budget, or one size and budget of the grid), is the noise floor of that place,
with a chi-square interval for its few degrees of freedom. (A replicate's value also carries its
own evaluation noise, so the floor slightly over-counts it: verdicts err towards "within noise".)

A comparison of two configs then has two sources of noise: the evaluation samples of each trained
model (what the bootstraps and paired intervals measure) and the training run each config happened to
get (twice the floor's variance: each side is one draw). Their sum, with Welch-Satterthwaite degrees
of freedom and a t quantile, gives the interval a verdict needs.

A cell without replicates of its own takes its size's floors at the replicated budgets nearest below
and above it, whichever is larger, and says so. Not a pool over the size's budgets: the spread
shrinks as a run trains (two seeds of the tiny grid's largest size differed by 0.13 in val loss after
72 samples and by 0.01 after 1,296), so the last budget's floor would pass an early cell's seed luck
as a difference. The larger neighbour is the cautious reading between two measured budgets. With no
replicate of its size, a cell takes the floor pooled over every group.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from fvlm.experiments.matrix import replicate_of

ABLATION = "ablation"  # the place of the ablation runs (one size, one budget)
_CELL = re.compile(r"^(?P<size>[^-]+)-(?P<budget>C\d+)-(?P<arm>F|B|B-isoflop)$")

# The metrics whose between-seed spread the model keeps (names as in decisions.json).
METRICS = (
    "val_loss",
    "answer_loss",
    "pixel_gain",
    "mc_accuracy",
    "fine_minus_static",  # answer loss, static - fine query, within one model
    "fine_minus_static_accuracy",
)


def place_of(run_id: str) -> tuple[str, str]:
    """(place, size) of a run id or a replicate's: `S-C4` and `S` for a grid cell, `ablation` and
    `` for anything else (the ablations all train the smallest size at one budget)."""
    base, _ = replicate_of(run_id)
    match = _CELL.match(base)
    return (f"{match['size']}-{match['budget']}", match["size"]) if match else (ABLATION, "")


@dataclass
class Floor:
    """The between-seed standard deviation of one metric at one place."""

    sd: float
    df: int
    groups: list[str]  # the base run ids whose replicates measured it
    source: str  # where it came from, in words (own replicates, or pooled over what)

    @property
    def ci95(self) -> list[float]:
        """95% interval of the sd itself (chi-square with `df` degrees of freedom)."""
        lo = math.sqrt(self.df * self.sd**2 / stats.chi2.ppf(0.975, self.df))
        hi = math.sqrt(self.df * self.sd**2 / stats.chi2.ppf(0.025, self.df))
        return [lo, hi]

    def record(self) -> dict[str, Any]:
        return {"sd": self.sd, "df": self.df, "ci95": self.ci95, "groups": self.groups, "source": self.source}

    def draws(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draws of one training run's deviation: normal with a variance drawn from the floor's
        uncertainty (scaled inverse chi-square), i.e. a t distribution with `df` degrees of freedom."""
        sigma = self.sd * np.sqrt(self.df / rng.chisquare(self.df, size=n))
        return rng.standard_normal(n) * sigma


@dataclass
class NoiseModel:
    """Replicate groups and the floors they give: values[metric][place][base id] = the group's values."""

    values: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)

    def add(self, metric: str, run_id: str, value: float | None) -> None:
        if value is None or not math.isfinite(value):
            return
        base, _ = replicate_of(run_id)
        place, _ = place_of(run_id)
        self.values.setdefault(metric, {}).setdefault(place, {}).setdefault(base, []).append(float(value))

    def _pooled(self, metric: str, places: Iterable[str]) -> tuple[float, int, list[str]] | None:
        ss, df, groups = 0.0, 0, []
        for place in places:
            for base, vals in self.values.get(metric, {}).get(place, {}).items():
                if len(vals) >= 2:
                    v = np.asarray(vals)
                    ss += float(((v - v.mean()) ** 2).sum())
                    df += len(v) - 1
                    groups.append(base)
        return (math.sqrt(ss / df), df, groups) if df else None

    def floor(self, metric: str, run_id: str) -> Floor | None:
        """The floor for a run's metric: its place's own replicates, else the larger of its size's
        floors at the nearest replicated budgets below and above it, else every group's pooled, else
        None (no replicate measured this metric)."""
        place, size = place_of(run_id)
        places = self.values.get(metric, {})
        own = self._pooled(metric, [place])
        if own:
            sd, df, groups = own
            return Floor(sd, df, groups, f"seed replicates at {place} ({', '.join(groups)}; {df} df)")
        if size:
            budget = _budget_number(place)
            measured = {p: f for p in places if p.startswith(f"{size}-") and (f := self._pooled(metric, [p]))}
            below = [p for p in measured if _budget_number(p) < budget]
            above = [p for p in measured if _budget_number(p) > budget]
            nearest = [max(below, key=_budget_number)] if below else []
            nearest += [min(above, key=_budget_number)] if above else []
            if nearest:
                chosen = max(nearest, key=lambda p: measured[p][0])
                sd, df, groups = measured[chosen]
                around = " and ".join(nearest)
                words = f"the larger of size {size}'s floors around it ({around}): {chosen}'s"
                return Floor(sd, df, groups, f"{words} ({', '.join(groups)}; {df} df)")
        pooled = self._pooled(metric, list(places))
        if pooled:
            sd, df, groups = pooled
            return Floor(sd, df, groups, f"pooled over every replicate group ({', '.join(groups)}; {df} df)")
        return None

    def floors(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Every place's own floor per metric, for the report and decisions.json."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for metric, places in self.values.items():
            for place in places:
                pooled = self._pooled(metric, [place])
                if pooled:
                    sd, df, groups = pooled
                    out.setdefault(place, {})[metric] = Floor(sd, df, groups, f"seed replicates at {place}").record()
        return out

    def groups(self) -> dict[str, list[str]]:
        """{base id: its replicate ids} over every metric."""
        out: dict[str, set[str]] = {}
        for places in self.values.values():
            for bases in places.values():
                for base in bases:
                    out.setdefault(base, set())
        return {k: sorted(v) for k, v in out.items()}

    def is_empty(self) -> bool:
        return not any(len(v) >= 2 for places in self.values.values() for g in places.values() for v in g.values())


def _budget_number(place: str) -> int:
    """A grid place's budget as a number (`M-C3` -> 3), for ordering budgets."""
    match = re.search(r"-C(\d+)$", place)
    return int(match.group(1)) if match else 0


def judge(diff: float, se_eval: float, floors: list[Floor | None], level: float = 0.95) -> dict[str, Any]:
    """A difference `diff` (positive: the first side is better) with its evaluation standard error
    and the training noise of each side that is a separate training run (`floors`: one entry per
    run, None where no replicate measured it).

    Returns the evaluation-only interval and verdict, and with training noise: the total standard
    error, the Welch-Satterthwaite degrees of freedom, the t interval and the verdict, one of 'yes'
    (first better), 'no' (second better), 'within training noise' (the evaluation alone would have
    decided, the seeds do not) or 'not distinguishable'. Without any floor the training noise is
    'not measured' and the verdict is the evaluation's, marked provisional."""
    z = stats.norm.ppf(0.5 + level / 2)
    eval_ci = [float(diff - z * se_eval), float(diff + z * se_eval)]
    eval_verdict = "yes" if eval_ci[0] > 0 else "no" if eval_ci[1] < 0 else "not distinguishable"
    known = [f for f in floors if f is not None]
    out: dict[str, Any] = {"diff": diff, "se_eval": se_eval, "ci95_eval": eval_ci, "eval_verdict": eval_verdict}
    if not known or not math.isfinite(se_eval):
        return {
            **out,
            "training_noise": "not measured",
            "verdict": eval_verdict,
            "ci95": eval_ci,
            "provisional": True,
        }
    seed_var = [f.sd**2 for f in known]
    total = se_eval**2 + sum(seed_var)
    denom = sum(v**2 / f.df for v, f in zip(seed_var, known))
    df = total**2 / denom if denom > 0 else math.inf
    q = float(stats.t.ppf(0.5 + level / 2, df)) if math.isfinite(df) else z
    se = math.sqrt(total)
    ci = [float(diff - q * se), float(diff + q * se)]
    verdict = "yes" if ci[0] > 0 else "no" if ci[1] < 0 else "not distinguishable"
    if verdict == "not distinguishable" and eval_verdict != verdict:
        verdict = "within training noise"
    return {
        **out,
        "training_noise": {
            "sd_per_run": [f.sd for f in known],
            "df": df,
            "sources": sorted({f.source for f in known}),
        },
        "se": se,
        "ci95": ci,
        "verdict": verdict,
        "provisional": len(known) < len(floors),
    }


# ----------------------------------------------------------------------------- building the model


def from_table(table: Any) -> NoiseModel:
    """Val-loss groups from a Table: each run's smoothed end of its val-loss curve (the value the
    grid's and the ablations' comparisons read). Made once per table."""
    from fvlm.analysis.compare import end_value

    if table.noise_model is not None:
        return table.noise_model
    model = NoiseModel()
    table.noise_model = model
    rng = np.random.default_rng(0)
    bases = {replicate_of(rid)[0] for rid in table.runs if replicate_of(rid)[1]}
    for rid, run in table.runs.items():
        if replicate_of(rid)[0] in bases and run.status in ("completed", "unknown"):
            model.add("val_loss", rid, end_value(run, 1, rng)[0])
    return model


def add_evidence(model: NoiseModel, runs: dict[str, dict[str, Any]]) -> NoiseModel:
    """Answer loss, pixel gain and MC accuracy in each run's default mode, and F3's fine - static
    answer-loss difference, from the foveation evidence's per-run entries."""
    bases = {replicate_of(rid)[0] for rid in runs if replicate_of(rid)[1]}
    for rid, entry in runs.items():
        if replicate_of(rid)[0] not in bases or entry.get("status") != "ok":
            continue
        mode = entry.get("default_mode")
        pixel = (entry.get("pixel") or {}).get(mode) or {}
        model.add("answer_loss", rid, pixel.get("loss"))
        model.add("pixel_gain", rid, pixel.get("pixel_gain"))
        bench = ((entry.get("bench") or {}).get("modes") or {}).get(mode) or {}
        model.add("mc_accuracy", rid, bench.get("accuracy"))
        modes = entry.get("pixel") or {}
        if "coarse_fine" in modes and "coarse_only" in modes:
            model.add("fine_minus_static", rid, modes["coarse_only"]["loss"] - modes["coarse_fine"]["loss"])
        acc = (entry.get("bench") or {}).get("modes") or {}
        if "coarse_fine" in acc and "coarse_only" in acc:
            model.add(
                "fine_minus_static_accuracy", rid, acc["coarse_fine"]["accuracy"] - acc["coarse_only"]["accuracy"]
            )
    return model


# ----------------------------------------------------------------------------- the report's section


def _as_base(table: Any, k: int) -> Any:
    """The table with every run that has a replicate k replaced by it (under the run's own id); None
    when no run has one."""
    import dataclasses

    from fvlm.analysis.table import Table
    from fvlm.experiments.matrix import replicate_id

    swapped = False
    runs = {}
    for rid, run in table.runs.items():
        if replicate_of(rid)[1]:
            continue
        twin = table.runs.get(replicate_id(rid, k))
        if twin is not None and twin.status in ("completed", "unknown"):
            run, swapped = dataclasses.replace(twin, run_id=rid), True
        runs[rid] = run
    if not swapped:
        return None
    out = Table(runs=runs)
    out.noise_model = NoiseModel()  # the replicate's own answers, judged on its evaluation alone
    return out


def replication(table: Any, answers: list[dict[str, Any]], comparison: dict[str, Any]) -> dict[str, Any]:
    """Each ablation question and grid cell asked again of every seed replicate (a run with a
    replicate k replaced by it), beside the original answer, and the val-loss floors.

    Returns {floors: {place: {metric: floor}}, questions: {id: {winner, replicates: [{k, winner,
    margin, verdict}], agree, of}}, cells: {cell: {...}}}."""
    from fvlm.analysis import ablations, compare

    model = from_table(table)
    out: dict[str, Any] = {"floors": model.floors(), "questions": {}, "cells": {}}
    ks = sorted({replicate_of(r)[1] for r in table.runs if replicate_of(r)[1]})
    original = {a["id"]: a for a in answers}
    originals = {c["foveated"]: c for c in comparison.get("cells", [])}
    for k in ks:
        view = _as_base(table, k)
        if view is None:
            continue
        for question in ablations.QUESTIONS:
            first = original.get(question.id) or {}
            members = [r.run_id for r in ablations.members(question, view)]
            if not any(replicate_of(rid)[0] in members for rid in table.runs if replicate_of(rid)[1] == k):
                continue  # none of its runs has a replicate k: the same answer again
            again = ablations.answer(question, view) or {}
            record = out["questions"].setdefault(
                question.id,
                {"winner": first.get("winner"), "provisional": bool(first.get("provisional")), "replicates": []},
            )
            # A replicate answers the same question only by the same rule: one that had to fall back to
            # a weaker measurement (a replicate has no per-kind losses, say) is shown, not counted.
            comparable = again.get("winner") is not None and bool(again.get("provisional")) == record["provisional"]
            record["replicates"].append(
                {
                    "k": k,
                    "winner": again.get("winner"),
                    "margin": again.get("margin"),
                    "verdict": again.get("verdict"),
                    "counted": comparable,
                }
            )
        cells = compare.compare_cells(view, n_boot=200, seed=k)
        for cell in cells["cells"]:
            rid = cell["foveated"]
            same = cell.get("same_data") or {}
            replicated = any(
                replicate_of(r) == (name, k) for r in table.runs for name in (rid, same.get("baseline") or "")
            )
            if not replicated or rid not in originals or not same:
                continue
            first = originals[rid].get("same_data") or {}
            record = out["cells"].setdefault(
                rid, {"advantage": first.get("advantage"), "verdict": first.get("verdict"), "replicates": []}
            )
            record["replicates"].append({"k": k, "advantage": same.get("advantage"), "verdict": same.get("verdict")})
    for record in out["questions"].values():
        counted = [r for r in record["replicates"] if r["counted"]]
        record["of"] = len(counted)
        record["agree"] = sum(r["winner"] == record["winner"] for r in counted)
    for record in out["cells"].values():
        sign = math.copysign(1, record["advantage"] or 0)
        record["of"] = len(record["replicates"])
        record["agree"] = sum(math.copysign(1, r["advantage"] or 0) == sign for r in record["replicates"])
    return out


def floors_table(floors: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """A markdown table of `NoiseModel.floors()`: one row per place and metric."""
    lines = ["| place | metric | sd | 95% interval | df | groups |", "|---|---|---|---|---|---|"]
    for place, metrics in sorted(floors.items()):
        for metric, f in metrics.items():
            lines.append(
                f"| {place} | {metric} | {f['sd']:.4f} | [{f['ci95'][0]:.4f}, {f['ci95'][1]:.4f}] | {f['df']} | "
                f"{', '.join(f['groups'])} |"
            )
    return lines


def replication_markdown(record: dict[str, Any]) -> list[str]:
    """The report's `## Replication` section from `replication`'s record."""
    lines = [
        "",
        "## Replication",
        "",
        "Seed replicates (`<run>.s<k>`: the same config with another seed, so another initialisation and "
        "data order) measure the training noise every verdict above is judged with: a margin inside it is "
        "'within training noise', never 'ahead'. A cell without replicates of its own uses its size's "
        "floor, else the floor pooled over every group (each verdict's `training_noise` in "
        "`decisions.json` names its source).",
        "",
    ]
    if not record["floors"]:
        return lines + [
            "No seed replicates among these runs: training noise is not measured, and every verdict rests on "
            "its evaluation samples alone (provisional: a second training run may overturn it).",
        ]
    lines += [
        "### Noise floors (between-seed standard deviation, 95% interval from its degrees of freedom)",
        "",
        *floors_table(record["floors"]),
    ]
    if record["questions"]:
        lines += [
            "",
            "### Ablation questions, asked again of each replicate",
            "",
            "| question | winner | replicates (k: winner, margin) | agree |",
            "|---|---|---|---|",
        ]
        for qid, q in record["questions"].items():
            answers = "; ".join(
                (
                    f"{r['k']}: {r['winner']}, {r['margin']:+.4f}"
                    if isinstance(r["margin"], float) and math.isfinite(r["margin"])
                    else f"{r['k']}: {r['winner'] or r['verdict']}"
                )
                + ("" if r["counted"] else " (another rule's answer: not counted)")
                for r in q["replicates"]
            )
            lines.append(f"| {qid} | {q['winner']} | {answers} | {q['agree']} of {q['of']} |")
    if record["cells"]:
        lines += [
            "",
            "### Grid cells, same samples, asked again of each replicate (advantage = baseline − foveated val loss)",
            "",
            "| cell | advantage | verdict | replicates (k: advantage) | same sign |",
            "|---|---|---|---|---|",
        ]
        for rid, c in record["cells"].items():
            answers = "; ".join(f"{r['k']}: {r['advantage']:+.4f}" for r in c["replicates"])
            lines.append(f"| {rid} | {c['advantage']:+.4f} | {c['verdict']} | {answers} | {c['agree']} of {c['of']} |")
    return lines
