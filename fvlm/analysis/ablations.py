"""The plan's ablation questions (Decision 1), answered from the curves with their own noise.

Runs are recognised by the plan's ids (F1, F2, F3/LR1, LR2-4, A1, A6, A8a/b, D1, B1) whether they
come from a project sweep (`F1`) or the historical export (`F1_freeze_both`, `baseline`). Nothing
about who wins is written here: winners, margins and the noise they are judged against all come
from the data.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
from scipy.stats import t as t_dist

from fvlm import run_folder as rf
from fvlm.analysis.table import Run, Table

# A run's noise is measured on the tail of its curve, where the curve is smooth enough for a
# quadratic in log samples; fewer tail points than this leave too few degrees of freedom.
MIN_TAIL_POINTS = 5
TAIL_FRACTION = 0.5
# A run's smoothed value at a sample count: a quadratic (log samples) through the evals nearest to
# it, a fifth of the curve, at least MIN_TAIL_POINTS and at most LOCAL_POINTS. A window of a fixed 9
# points was local on the export's 46-point curves but spanned 9 of the tiny runs' 10, where a
# quadratic through the reading onset missed the last evals by up to 0.009 (F3: 0.0705 against a
# final 0.0797) and decided the two-pass question on that.
LOCAL_FRACTION = 0.2
LOCAL_POINTS = 9
# "Stable grad norms" (the freeze rule), made concrete on the logged gradient norms of the second
# half of a run (steps.csv, else the eval points): every one finite, none above SPIKE_FACTOR x their
# median (a spike), and the median of the last quarter at most RISE_FACTOR x that of the second
# quarter (a norm that keeps growing). Below MIN_GRAD_POINTS logged values it cannot be judged.
SPIKE_FACTOR = 10.0
RISE_FACTOR = 2.0
MIN_GRAD_POINTS = 4


@dataclass(frozen=True)
class Question:
    id: str
    title: str
    roles: tuple[str, ...]
    axis: str = "samples_seen"  # or "flops": compared at matched compute rather than matched data
    plan_rule: str = ""


QUESTIONS = (
    Question(
        "freeze",
        "Freeze strategy",
        ("F1", "F2", "F3"),
        plan_rule="pick lowest val_loss with stable grad norms; F1 ~ F3 -> freeze backbones",
    ),
    Question(
        "learning_rate",
        "Learning rate ratio",
        ("F3", "LR2", "LR3", "LR4"),
        plan_rule="pick the best ratio; LR4 ~ LR1 -> uniform LR is enough",
    ),
    Question("deep_query", "Deep query essential?", ("A1", "F3"), plan_rule="A1 ~ F3 -> deep query not load-bearing"),
    Question(
        "two_pass", "Two-pass essential?", ("A6", "F3"), plan_rule="the A6 - F3 gap quantifies the foveation benefit"
    ),
    Question(
        "image_handling",
        "Image handling (frame replication)",
        ("A8",),
        plan_rule="pick 1-frame or 16-frame replication (image VQA when measured)",
    ),
    Question("data_mix", "Data mix", ("D1", "F3"), plan_rule="adjust the video:image:text ratio"),
    Question(
        "efficiency",
        "Efficiency: 1 foveated token vs 16 tokens",
        ("F3", "B1"),
        axis="flops",
        plan_rule="F3 (1 tok) vs B1 (16 tok) at matched FLOPs",
    ),
)

# The export calls F3 `baseline`; the plan notes F3 = LR1.
_ALIASES = {"F3": ("f3", "lr1", "baseline")}


def plan_id(run: Run) -> str | None:
    """The plan's id of a run (F3 for `baseline`, A8 for every image-replication variant)."""
    head = re.split(r"[-_/]", run.run_id.lower())[0]
    for role, names in _ALIASES.items():
        if head in names:
            return role
    if head in ("a8a", "a8b", "a8"):
        return "A8"
    return head.upper() if re.fullmatch(r"(f[12]|lr[234]|a[0-9]+|b1|d1)", head) else None


def replicate_frames(run: Run) -> int | None:
    if run.config:
        return run.config.get("data", {}).get("replicate_image_frames")
    name = run.run_id.lower()
    match = re.search(r"(\d+)\s*frames?", name)
    if match:
        return int(match.group(1))
    return {"a8a": 1, "a8b": 16}.get(re.split(r"[-_]", name)[0])


def role_label(run: Run) -> str:
    pid = plan_id(run) or run.run_id
    if pid == "A8":
        frames = replicate_frames(run)
        return f"A8 ({frames} frame{'s' if frames != 1 else ''})" if frames else run.run_id
    return pid


def members(question: Question, table: Table) -> list[Run]:
    return [r for r in table.runs.values() if plan_id(r) in question.roles]


# ----------------------------------------------------------------------------- records


class Falling(TypedDict):
    """`still_falling`'s record: the smoothed curve's drop over its last fifth against its noise."""

    drop_last_fifth: float
    noise: float
    falling: bool
    samples: float


class GradStability(TypedDict):
    """`grad_norm_stability`'s record."""

    stable: bool | None  # None: too few logged grad norms to judge
    source: str | None  # the file the norms came from (steps.csv or metrics.csv); None when unjudged
    reason: str


class _CurveStatRequired(TypedDict):
    run: Run
    x_end: float
    noise: float
    unstable: str | None
    best: float
    best_x: float
    final: float


class CurveStat(_CurveStatRequired, total=False):
    """One run's row of a question (an answer's `rows`): its curve's end, best and final values as
    `answer` reads them, then (added as the comparison proceeds) its values at the common x and,
    with seed replicates, its noise split into the eval part and the training floor's sd."""

    at_common: float
    smoothed: float
    eval_noise: float
    seed_sd: float


class AblationRow(TypedDict):
    """One row of ablation_table.csv (ABLATION_COLUMNS)."""

    question: str
    run_id: str
    role: str
    status: str
    n_points: int
    common_x_axis: str
    common_x: float | None
    val_loss_at_common: float
    smoothed_at_common: float
    best_val_loss: float
    best_at: float
    final_val_loss: float
    final_at: float
    noise_sd: float
    unstable: str
    winner: bool
    margin: float | None
    noise: float | None
    verdict: str


# ----------------------------------------------------------------------------- curve statistics


def _curve(run: Run, axis: str) -> tuple[np.ndarray, np.ndarray]:
    x = run.flops() if axis == "flops" else run.col("samples_seen")
    y = run.col("val_loss")
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    return x[keep], y[keep]


def tail_fit(run: Run) -> tuple[np.ndarray, float] | None:
    """Quadratic in log samples over the last part of the curve, and the residual scatter around it:
    the eval noise of this run (val set sampling plus step-to-step training noise)."""
    x, y = _curve(run, "samples_seen")
    m = max(MIN_TAIL_POINTS, int(math.ceil(len(x) * TAIL_FRACTION)))
    if len(x) < MIN_TAIL_POINTS + 1:
        return None
    lx, ly = np.log(x[-m:]), y[-m:]
    coef = np.polyfit(lx, ly, 2)
    resid = ly - np.polyval(coef, lx)
    return coef, float(math.sqrt(resid @ resid / (len(lx) - 3)))


def run_noise(run: Run) -> float:
    fit = tail_fit(run)
    return fit[1] if fit else math.nan


def smoothed_at(run: Run, target: float, axis: str) -> float:
    """The curve's value at `target`, from a local quadratic (log x) through the nearest evals."""
    x, y = _curve(run, axis)
    if len(x) < 4:
        return float(np.interp(np.log(target), np.log(x), y)) if len(x) else math.nan
    lx = np.log(x)
    window = min(LOCAL_POINTS, max(MIN_TAIL_POINTS, math.ceil(LOCAL_FRACTION * len(x))), len(x))
    near = np.argsort(np.abs(lx - math.log(target)))[:window]
    coef = np.polyfit(lx[near], y[near], 2 if len(near) >= 5 else 1)
    return float(np.polyval(coef, math.log(target)))


def still_falling(run: Run) -> Falling | None:
    """Drop of the smoothed curve over the last fifth of its samples, against twice its noise."""
    fit = tail_fit(run)
    if not fit:
        return None
    coef, noise = fit
    x, _ = _curve(run, "samples_seen")
    drop = float(np.polyval(coef, math.log(0.8 * x[-1])) - np.polyval(coef, math.log(x[-1])))
    return {"drop_last_fifth": drop, "noise": noise, "falling": bool(drop > 2 * noise), "samples": float(x[-1])}


def instability(run: Run) -> str | None:
    """Why a run counts as unstable: its status, a non-finite loss, or a val loss that ends far
    (more than 5 noise) above its best."""
    if run.status in ("diverged", "failed"):
        return f"status {run.status}"
    val = run.col("val_loss")
    if (~np.isfinite(val)).any() or (~np.isfinite(run.col("train_loss"))).any():
        return "non-finite loss"
    noise = run_noise(run)
    finite = val[np.isfinite(val)]
    if len(finite) and math.isfinite(noise) and finite[-1] - finite.min() > 5 * noise:
        return f"val loss ends {finite[-1] - finite.min():.3f} above its best ({(finite[-1] - finite.min()) / noise:.0f}x noise)"
    return None


def grad_norm_stability(run: Run) -> GradStability:
    """{"stable": True | False | None, "reason": str, "source": where the norms came from}; None when
    the run logged too few finite-or-not gradient norms to judge."""
    source, norms = rf.STEPS, (run.steps or {}).get("grad_norm")
    if norms is None or len(norms) < MIN_GRAD_POINTS or np.isnan(norms).all():
        source, norms = rf.METRICS, run.col("grad_norm")
    logged = norms[~np.isnan(norms)] if norms is not None else np.array([])
    if len(logged) < MIN_GRAD_POINTS:
        return {
            "stable": None,
            "source": None,
            "reason": f"{len(logged)} logged grad norms (needs {MIN_GRAD_POINTS}: grad_norm in steps.csv or "
            "metrics.csv)",
        }
    if not np.isfinite(logged).all():
        return {"stable": False, "source": source, "reason": "non-finite grad norm"}
    half = logged[len(logged) // 2 :]
    median = float(np.median(half))
    peak = float(half.max())
    quarter = max(1, len(logged) // 4)
    second_quarter = logged[quarter : 2 * quarter] if 2 * quarter <= len(logged) else logged[:quarter]
    rise = float(np.median(logged[-quarter:]) / max(np.median(second_quarter), 1e-12))
    if peak > SPIKE_FACTOR * median:
        return {
            "stable": False,
            "source": source,
            "reason": f"spike: {peak:.3g} > {SPIKE_FACTOR:g}x the second half's median {median:.3g}",
        }
    if rise > RISE_FACTOR:
        return {
            "stable": False,
            "source": source,
            "reason": f"rising: last quarter's median {rise:.2f}x the second quarter's (> {RISE_FACTOR:g}x)",
        }
    return {
        "stable": True,
        "source": source,
        "reason": f"max {peak / median:.2f}x median over the second half, last/second quarter {rise:.2f}x",
    }


# ----------------------------------------------------------------------------- the questions


def _verdict(margin: float, noise: float, eval_noise: float | None = None, quantile: float = 2.0) -> str:
    """`noise` is the margin's whole noise; `eval_noise` its evaluation part alone, given when the
    whole includes the training noise of seed replicates, and `quantile` then the t quantile for the
    whole's few degrees of freedom (a floor from 3 degrees of freedom is itself uncertain). Without
    replicates the verdict is the evaluation's alone, and may be overturned by a second training run."""
    if not math.isfinite(noise) or noise <= 0:
        return "noise unknown"
    if margin > quantile * noise:
        return "clear (margin > 2x noise)" if quantile == 2.0 else f"clear (margin > {quantile:.2f}x noise)"
    if eval_noise is not None:
        if margin > 2 * eval_noise:
            return f"within training noise (margin > 2x the eval noise, < {quantile:.2f}x eval + training noise)"
        return "within noise"
    if margin > noise:
        return "weak (noise < margin < 2x noise)"
    return "within noise"


def _with_training_noise(table: Table, stats: list[CurveStat]) -> dict[str, Any] | None:
    """Adds to each row its val loss's training noise (the seed replicates' floor, fvlm.analysis.noise)
    and makes its `noise` the sum of the two: `eval_noise` keeps the curve's own. Returns the floor
    used (a record for decisions.json), or None when no replicate measured one."""
    from fvlm.analysis import noise as training

    model = training.from_table(table)
    used = None
    for s in stats:
        s["eval_noise"] = s["noise"]
        floor = model.floor("val_loss", s["run"].run_id)
        if floor is not None:
            s["seed_sd"] = floor.sd
            s["noise"] = math.sqrt(s["noise"] ** 2 + floor.sd**2)
            used = floor.record()
    return used


# The questions the plan judges on one kind of validation sample rather than the mixed val loss:
# A8 on image questions, D1 on the video and the image samples separately.
SOURCE_KINDS = {"image_handling": ("image",), "data_mix": ("video", "image")}


def _kind_losses(run: Run, kind: str) -> dict[str, tuple[float, float]]:
    """{sample key: (loss per answer token, answer tokens)} of one kind, from eval/sources.json."""
    s = run.sources or {}
    return {
        key: (loss / tokens, tokens)
        for key, k, loss, tokens in zip(s["keys"], s["kinds"], s["loss_sum"], s["tokens"])
        if k == kind and tokens > 0
    }


def _paired_on_kind(first: Run, second: Run, kind: str) -> dict[str, Any] | None:
    """second - first token-weighted val loss on the samples of `kind` both scored (positive: the
    first is better), with fvlm.eval.stats.paired_difference's intervals."""
    from fvlm.eval.stats import paired_difference

    a, b = _kind_losses(first, kind), _kind_losses(second, kind)
    shared = [k for k in a if k in b]
    if not shared:
        return None
    return paired_difference(
        [b[k][0] for k in shared], [a[k][0] for k in shared], [(a[k][1] + b[k][1]) / 2 for k in shared]
    )


def _widened(paired: dict[str, Any], floor: dict[str, Any] | None) -> dict[str, Any]:
    """A paired difference between two runs with the training noise of each (the seed floor of the
    mixed val loss: no replicate measures the per-kind losses) added to its evaluation noise."""
    from fvlm.analysis import noise as training

    f = training.Floor(floor["sd"], floor["df"], floor["groups"], floor["source"]) if floor else None
    judged = training.judge(paired["diff"], paired["se"], [f, f])
    return {**paired, "ci95_bootstrap": judged["ci95"] if f else paired["ci95_bootstrap"], "judged": judged}


def _by_source(question: Question, stats: list[CurveStat], floor: dict[str, Any] | None = None) -> dict[str, Any]:
    kinds = SOURCE_KINDS[question.id]
    lacking = [s["run"].run_id for s in stats if not s["run"].sources]
    if lacking:
        return _unknown(
            question,
            stats,
            f"needs the val loss on {' and '.join(kinds)} samples separately "
            f"(eval/sources.json, fvlm.experiments.milestones.evaluate_sources) for "
            f"{', '.join(lacking)}; the mixed val loss of the curves cannot tell them apart",
        )
    runs = {s["run"].run_id: s["run"] for s in stats}
    if question.id == "image_handling":
        totals: dict[str, float] = {}
        for rid, run in runs.items():
            losses = _kind_losses(run, "image")
            tokens = sum(t for _, t in losses.values())
            totals[rid] = sum(v * t for v, t in losses.values()) / tokens if tokens else math.nan
        ranked = sorted((r for r in totals if math.isfinite(totals[r])), key=lambda r: totals[r])
        if len(ranked) < 2:
            return _unknown(question, stats, "fewer than two A8 runs scored image samples")
        winner, runner_up = ranked[0], ranked[1]
        paired = _paired_on_kind(runs[winner], runs[runner_up], "image")
        if paired is None:
            return _unknown(question, stats, f"{winner} and {runner_up} scored no image samples in common")
        paired = _widened(paired, floor)
        by_kind: dict[str, dict[str, Any] | None] = {"image": paired}
        verdict = (
            "clear (95% interval above 0)"
            if paired["ci95_bootstrap"][0] > 0
            else "within training noise (95% interval holds 0)"
            if floor and paired["judged"]["eval_verdict"] != "not distinguishable"
            else "within noise (95% interval holds 0)"
        )
        margin = paired["diff"]
    else:
        d1 = next(r for r in runs if plan_id(runs[r]) == "D1")
        f3 = next(r for r in runs if plan_id(runs[r]) == "F3")
        by_kind = {kind: _paired_on_kind(runs[d1], runs[f3], kind) for kind in kinds}
        by_kind = {kind: _widened(p, floor) if p else None for kind, p in by_kind.items()}
        video, image = by_kind["video"], by_kind["image"]
        if video is None or image is None:
            absent = [k for k, v in by_kind.items() if v is None]
            return _unknown(question, stats, f"no {' or '.join(absent)} samples scored by both D1 and F3")
        # D1 (video-heavy) wins only when it helps the video samples without hurting the image ones.
        d1_wins = video["ci95_bootstrap"][0] > 0 and image["ci95_bootstrap"][1] >= 0
        winner, runner_up = (d1, f3) if d1_wins else (f3, d1)
        margin = video["diff"] if d1_wins else -video["diff"]
        verdict = (
            f"{'D1' if d1_wins else 'F3'}: F3 - D1 on video {video['diff']:+.4f} "
            f"[{video['ci95_bootstrap'][0]:+.4f}, {video['ci95_bootstrap'][1]:+.4f}], on image "
            f"{image['diff']:+.4f} [{image['ci95_bootstrap'][0]:+.4f}, {image['ci95_bootstrap'][1]:+.4f}] "
            "(D1 needs video above 0 and image not below 0)"
        )
    return {
        **_header(question, stats),
        "metric": f"val loss on {' and '.join(kinds)} samples, paired on the same samples",
        "axis": "samples",
        "common_x": None,
        "winner": winner,
        "runner_up": runner_up,
        "margin": margin,
        "noise": (by_kind[kinds[0]] or {}).get("se"),
        "verdict": verdict,
        "by_kind": by_kind,
        "training_noise": floor or "not measured (no seed replicates): the verdict may not survive a second run",
        "unstable": {},
        "winner_at_best": None,
        "rows": stats,
    }


def answer(question: Question, table: Table) -> dict[str, Any] | None:
    runs = members(question, table)
    if len(runs) < 2:
        return None
    stats: list[CurveStat] = []
    for run in runs:
        x, y = _curve(run, question.axis)
        if not len(x):
            continue
        stats.append(
            {
                "run": run,
                "x_end": float(x[-1]),
                "noise": run_noise(run),
                "unstable": instability(run),
                "best": float(y.min()),
                "best_x": float(x[int(np.argmin(y))]),
                "final": float(y[-1]),
            }
        )
    if len(stats) < 2:
        return None
    common = min(s["x_end"] for s in stats)
    for s in stats:
        x, y = _curve(s["run"], question.axis)
        # At matched compute a run with more FLOPs per sample is read where its schedule ended
        # (below): part-way through a cosine schedule its loss is not what that budget would reach.
        at = s["x_end"] if question.axis == "flops" else common
        s["at_common"] = float(np.interp(math.log(at), np.log(x), y))
        s["smoothed"] = smoothed_at(s["run"], at, question.axis)

    floor = _with_training_noise(table, stats)
    # The parts of the plan's rule the data cannot judge: the answer below rests on the rest of the
    # rule (or on a weaker measurement, named), and is marked provisional.
    unchecked: list[dict[str, Any]] = []
    if question.id in SOURCE_KINDS:
        lacking = [s["run"].run_id for s in stats if not s["run"].sources]
        if not lacking:
            return _by_source(question, stats, floor)
        kinds = " and ".join(SOURCE_KINDS[question.id])
        unchecked.append(
            {
                "check": f"val loss on the {kinds} samples separately",
                "reason": f"no per-sample val losses by kind (eval/sources.json) for {', '.join(lacking)}",
                "substitute": "the smoothed val loss of the mixed val set all of them were scored on",
            }
        )
    score = {s["run"].run_id: s["smoothed"] for s in stats}
    eligible = [s for s in stats if not s["unstable"]] or stats
    grad: dict[str, GradStability] = {}
    if question.id == "freeze":
        # The plan's rule: the lowest val loss among runs with stable grad norms.
        grad = {s["run"].run_id: grad_norm_stability(s["run"]) for s in stats}
        unjudged = [rid for rid, g in grad.items() if g["stable"] is None]
        if unjudged:
            unchecked.append(
                {
                    "check": "grad-norm stability",
                    "reason": "; ".join(f"{rid}: {grad[rid]['reason']}" for rid in unjudged),
                }
            )
        eligible = [s for s in eligible if grad[s["run"].run_id]["stable"] is not False]
        if not eligible:
            return _unknown(question, stats, "no run has stable grad norms", grad_norms=grad)
    ranked = sorted(eligible, key=lambda s: score[s["run"].run_id])
    winner, runner_up = ranked[0], (ranked[1] if len(ranked) > 1 else None)
    finished: dict[str, Any] = {}
    if question.axis == "flops":
        finished = _finished_points(stats, score)
        if finished.get("unmatched"):
            return _unknown(
                question,
                stats,
                finished["unmatched"],
                compared_at="finished points",
                **{k: v for k, v in finished.items() if k != "unmatched"},
            )
    margin = score[runner_up["run"].run_id] - score[winner["run"].run_id] if runner_up else math.nan
    # A margin compares two runs' values, each read with its own eval noise.
    noise = math.sqrt(winner["noise"] ** 2 + runner_up["noise"] ** 2) if runner_up else math.nan
    eval_noise = math.sqrt(winner["eval_noise"] ** 2 + runner_up["eval_noise"] ** 2) if runner_up and floor else None
    quantile = 2.0
    if eval_noise is not None and floor is not None:
        # Welch-Satterthwaite: the eval part has many degrees of freedom, each run's seed part the floor's.
        seed_var = 2 * floor["sd"] ** 2
        df = (eval_noise**2 + seed_var) ** 2 / (2 * floor["sd"] ** 4 / floor["df"])
        quantile = max(2.0, float(t_dist.ppf(0.975, df)))
    by_best = sorted(eligible, key=lambda s: s["best"])
    result: dict[str, Any] = {
        **_header(question, stats),
        "metric": "val_loss (smoothed)",
        "axis": question.axis,
        "common_x": common,
        "winner": winner["run"].run_id,
        "runner_up": runner_up["run"].run_id if runner_up else None,
        "margin": margin,
        "noise": noise,
        "verdict": _verdict(margin, noise, eval_noise, quantile),
        "quantile": quantile,  # how many noises make a margin clear (the plan's tie rules use it too)
        "training_noise": floor or "not measured (no seed replicates): the verdict may not survive a second run",
        "winner_at_best": by_best[0]["run"].run_id,
        "margin_at_best": by_best[1]["best"] - by_best[0]["best"] if len(by_best) > 1 else math.nan,
        "unstable": {s["run"].run_id: s["unstable"] for s in stats if s["unstable"]},
        "rows": stats,
    }
    if finished:
        result.update(
            finished,
            compared_at="each run's finished point (end of its LR schedule)",
            verdict=result["verdict"] + finished["note"],
        )
    if grad:
        result["grad_norms"] = grad
    if unchecked:
        result["provisional"] = True
        result["unchecked"] = unchecked
        result["verdict"] += "; " + provisional_text(unchecked)
    if question.id == "deep_query":
        ratios = {s["run"].run_id: _last_finite(s["run"].col("val_loss_ratio")) for s in stats}
        result["val_loss_ratio"] = {k: v for k, v in ratios.items() if v is not None}
    return result


def provisional_text(unchecked: list[dict[str, Any]]) -> str:
    """'provisional: X not checked — why (substitute used)', for a verdict's text."""
    parts = []
    for u in unchecked:
        text = f"{u['check']} not checked — {u['reason']}"
        if u.get("substitute"):
            text += f"; judged on {u['substitute']} instead"
        parts.append(text)
    return "provisional: " + "; ".join(parts)


def _header(question: Question, stats: list[CurveStat]) -> dict[str, Any]:
    """The fields every answer starts with: the question and the runs it was asked of."""
    return {
        "id": question.id,
        "title": question.title,
        "plan_rule": question.plan_rule,
        "runs": [s["run"].run_id for s in stats],
        "labels": {s["run"].run_id: role_label(s["run"]) for s in stats},
    }


def _unknown(question: Question, stats: list[CurveStat], why: str, **extra: Any) -> dict[str, Any]:
    """A question whose runs are there but whose decision needs an input they lack."""
    return {
        **_header(question, stats),
        "winner": None,
        "runner_up": None,
        "margin": None,
        "noise": None,
        "verdict": f"unknown: {why}",
        "axis": question.axis,
        "metric": "",
        "common_x": None,
        "unstable": {},
        "rows": [],
        **extra,
    }


# Finished points within this factor of each other's FLOPs count as matched.
MATCHED_FLOPS = 1.1


def _finished_points(stats: list[CurveStat], score: dict[str, float]) -> dict[str, Any]:
    """The efficiency question at finished points: each run's smoothed loss where its schedule ended.
    Decided when the FLOPs match, or when the cheaper run is also at least as good (it wins with
    less compute), which includes ending higher by less than the two runs' combined eval noise: a
    difference the evals cannot tell from zero must not decide whether the question has an answer.
    Otherwise the lower loss was bought with more FLOPs and there is no matched comparison
    ("unmatched")."""
    cheap, dear = sorted(stats, key=lambda s: s["x_end"])[:2]
    ratio = dear["x_end"] / cheap["x_end"]
    ids = cheap["run"].run_id, dear["run"].run_id
    record: dict[str, Any] = {"flops_at_finish": {s["run"].run_id: s["x_end"] for s in stats}, "flops_ratio": ratio}
    if ratio <= MATCHED_FLOPS:
        return {**record, "note": f"; matched finished points ({ratio:.2f}x FLOPs)"}
    behind = score[ids[0]] - score[ids[1]]
    if behind <= 0:
        return {**record, "note": f"; {ids[0]} finished with {ratio:.2f}x fewer FLOPs and is not worse"}
    noise = math.sqrt(cheap["noise"] ** 2 + dear["noise"] ** 2)
    if behind < noise:
        return {
            **record,
            "note": f"; {ids[0]} finished with {ratio:.2f}x fewer FLOPs, {behind:.4f} higher: within the noise "
            f"({noise:.4f}), so not worse",
        }
    return {
        **record,
        "unmatched": (
            f"{ids[1]} ends {score[ids[0]] - score[ids[1]]:.4f} lower but spends {ratio:.2f}x the FLOPs of {ids[0]}; "
            f"at {ids[0]}'s FLOPs {ids[1]} is part-way through its LR schedule, so no matched finished comparison "
            "exists (the scaling grid's -B-isoflop cells give one)"
        ),
    }


def _last_finite(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if len(finite) else None


def answer_all(table: Table) -> list[dict[str, Any]]:
    """One record per plan question; a question without its runs is reported as missing."""
    out: list[dict[str, Any]] = []
    for question in QUESTIONS:
        result = answer(question, table)
        if result is None:
            found = [r.run_id for r in members(question, table)]
            out.append(
                {
                    "id": question.id,
                    "title": question.title,
                    "plan_rule": question.plan_rule,
                    "runs": found,
                    "winner": None,
                    "margin": None,
                    "noise": None,
                    "verdict": f"no data: needs runs {', '.join(question.roles)}"
                    + (f" (found only {', '.join(found)})" if found else ""),
                }
            )
        else:
            out.append(result)
    return out


ABLATION_COLUMNS = (
    "question",
    "run_id",
    "role",
    "status",
    "n_points",
    "common_x_axis",
    "common_x",
    "val_loss_at_common",
    "smoothed_at_common",
    "best_val_loss",
    "best_at",
    "final_val_loss",
    "final_at",
    "noise_sd",
    "unstable",
    "winner",
    "margin",
    "noise",
    "verdict",
)


def table_rows(answers: list[dict[str, Any]]) -> list[AblationRow]:
    rows: list[AblationRow] = []
    for result in answers:
        for s in result.get("rows", []):
            run = s["run"]
            rows.append(
                {
                    "question": result["id"],
                    "run_id": run.run_id,
                    "role": result["labels"][run.run_id],
                    "status": run.status,
                    "n_points": run.n_points,
                    "common_x_axis": result["axis"],
                    "common_x": result["common_x"],
                    "val_loss_at_common": s["at_common"],
                    "smoothed_at_common": s["smoothed"],
                    "best_val_loss": s["best"],
                    "best_at": s["best_x"],
                    "final_val_loss": s["final"],
                    "final_at": s["x_end"],
                    "noise_sd": s["noise"],
                    "unstable": s["unstable"] or "",
                    "winner": run.run_id == result["winner"],
                    "margin": result["margin"],
                    "noise": result["noise"],
                    "verdict": result["verdict"],
                }
            )
    return rows
