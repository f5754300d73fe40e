"""The plan's figures (Fig 1-8) and the scaling figures, one PNG each, only from the run table.

Each figure function returns the PNG path, or a sentence saying which data it lacks; the report
lists such figures as absent instead of drawing empty axes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fvlm import atomic
from fvlm.analysis import ablations
from fvlm.analysis.attention_maps import load_attention, render_video
from fvlm.analysis.fits import budget_label, predict_data_scaling, predict_joint
from fvlm.analysis.table import Run, Table
from fvlm.experiments.matrix import replicate_of

if TYPE_CHECKING:  # pyplot and its classes are imported when a figure is drawn (_use_agg)
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.typing import RcKeyType

STYLE: dict[RcKeyType, object] = {
    "figure.figsize": (6.4, 4.2),
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "lines.linewidth": 1.6,
    "font.family": "DejaVu Sans",
}
ARCH_STYLE = {"foveated": "-", "multi_token": "--", "shallow": ":", "coarse_only": "-."}


@dataclass
class Context:
    table: Table
    answers: list[dict[str, Any]]
    fits: dict[str, Any]
    fit_runs: list[Run]
    out: Path
    comparison: dict[str, Any] | None = None  # fvlm.analysis.compare.compare_cells


def _use_agg() -> None:
    """Draws with the Agg backend (no display) and STYLE. Every function that imports pyplot calls it
    first: pyplot is imported only once a figure is drawn, and on Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(STYLE)


def _save(fig: Figure, path: Path) -> Path:
    atomic.save_figure(fig, path)
    _use_agg()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _colors(n: int) -> list[tuple[float, float, float, float]]:
    _use_agg()
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _curves(ax: Axes, runs: list[Run], y: str = "val_loss", labels: dict[str, str] | None = None) -> None:
    for color, run in zip(_colors(len(runs)), runs):
        x, v = run.col("samples_seen"), run.col(y)
        keep = np.isfinite(x) & np.isfinite(v)
        label = (labels or {}).get(run.run_id, run.run_id)
        ax.plot(x[keep], v[keep], ARCH_STYLE.get(run.arch, "-"), color=color, label=label)
    ax.set_xlabel("samples seen")
    ax.set_ylabel(y.replace("_", " "))
    ax.legend()


def _by_plan_id(table: Table, ids: tuple[str, ...]) -> list[Run]:
    return sorted(
        (r for r in table.runs.values() if ablations.plan_id(r) in ids), key=lambda r: ids.index(ablations.plan_id(r))
    )


def _labels(runs: list[Run]) -> dict[str, str]:
    return {
        r.run_id: f"{ablations.role_label(r)} ({r.run_id})" if ablations.role_label(r) != r.run_id else r.run_id
        for r in runs
    }


def fig1_foveated_vs_alternatives(ctx: Context) -> Path | str:
    runs = _by_plan_id(ctx.table, ("F3", "A6", "A1", "B1"))
    if not any(ablations.plan_id(r) == "F3" for r in runs) or len(runs) < 2:
        return "needs F3 and at least one of A6, A1, B1"
    _use_agg()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    _curves(ax, runs, labels=_labels(runs))
    ax.set_title("Fig 1: two-pass foveated vs coarse-only, shallow and multi-token")
    return _save(fig, ctx.out / "fig1_foveated_vs_alternatives.png")


def fig2_loss_ratio(ctx: Context) -> Path | str:
    series = []
    for run in ctx.table.runs.values():
        if run.steps is not None and np.isfinite(run.steps["loss_ratio"]).any():
            series.append((run, run.steps["step"], run.steps["loss_ratio"], "train step"))
        elif np.isfinite(run.col("val_loss_ratio")).any():
            series.append((run, run.col("step"), run.col("val_loss_ratio"), "eval"))
    if not series:
        return "no run logged loss_fine / loss_coarse (steps.csv loss_ratio or metrics.csv val_loss_ratio)"
    # The plan draws F3's ratio; other runs are shown only when F3 is absent.
    f3 = [s for s in series if ablations.plan_id(s[0]) == "F3"]
    series = f3 or series
    _use_agg()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    for color, (run, step, ratio, kind) in zip(_colors(len(series)), series):
        keep = np.isfinite(ratio)
        ax.plot(step[keep], ratio[keep], color=color, alpha=0.35 if kind == "train step" else 1, lw=1)
        if kind == "train step" and keep.sum() >= 10:
            window = max(keep.sum() // 20, 5)
            smooth = np.convolve(ratio[keep], np.ones(window) / window, mode="valid")
            ax.plot(step[keep][window - 1 :], smooth, color=color, label=f"{run.run_id} (moving mean)")
        else:
            ax.plot([], [], color=color, label=f"{run.run_id} ({kind})")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("loss_fine / loss_coarse")
    ax.set_title("Fig 2: foveation benefit over training (< 1: fine pass helps)")
    ax.legend()
    return _save(fig, ctx.out / "fig2_loss_ratio.png")


def fig3_token_efficiency(ctx: Context) -> Path | str:
    """Left: val loss against visual tokens per frame at equal FLOPs (the grid's iso-FLOP cells).
    Right: the foveated advantage of every grid cell with its interval, against model size."""
    cells = (ctx.comparison or {}).get("cells", [])
    matched = [c for c in cells if c.get("same_flops")]
    same_data = [c for c in cells if c.get("same_data")]
    if not same_data and not matched:
        return "needs the scaling grid's foveated and multi-token cells (<size>-<budget>-F and -B)"
    _use_agg()
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if matched else 1, figsize=(12 if matched else 6.4, 4.5), squeeze=False)
    right = axes[0, -1]
    if matched:
        left = axes[0, 0]
        for color, cell in zip(_colors(len(matched)), matched):
            pair = cell["same_flops"]
            left.plot(
                [1, 16],
                [pair["foveated_loss"], pair["baseline_loss"]],
                "o-",
                color=color,
                label=f"{cell['size']} {cell['budget']}",
            )
        left.set_xscale("log", base=2)
        left.set_xticks([1, 16], ["1 (foveated)", "16 (multi-token)"])
        left.set_xlabel("visual tokens per frame")
        left.set_ylabel("val loss at equal FLOPs")
        left.set_title("iso-FLOP cells")
        left.legend(title="cell")
    budgets = sorted({c["budget"] for c in cells})
    markers = dict(zip(budgets, "osD^v<>p"))
    for kind, chosen, fill in (("same samples", same_data, True), ("equal FLOPs", matched, False)):
        key = "same_data" if kind == "same samples" else "same_flops"
        for cell in chosen:
            pair = cell[key]
            ci = pair["ci95"] or [pair["advantage"]] * 2
            right.errorbar(
                cell["N"],
                pair["advantage"],
                yerr=[[pair["advantage"] - ci[0]], [ci[1] - pair["advantage"]]],
                fmt=markers.get(cell["budget"], "o"),
                mfc=None if fill else "none",
                capsize=3,
                color="C0" if fill else "C1",
            )
    for budget in budgets:
        right.plot([], [], markers[budget], color="grey", label=budget)
    right.plot([], [], "o", color="C0", label="same samples")
    right.plot([], [], "o", mfc="none", color="C1", label="equal FLOPs")
    right.axhline(0, color="k", lw=0.8)
    right.set_xscale("log")
    right.xaxis.set_minor_formatter(plt.NullFormatter())
    right.set_xlabel("parameters N")
    right.set_ylabel("baseline - foveated val loss (95% interval)")
    verdict = (ctx.comparison or {}).get("scaling", {}).get("verdict", "unknown")
    right.set_title(f"foveated advantage per grid cell (trend with size: {verdict})")
    right.legend()
    fig.suptitle("Fig 3: token efficiency, cell by cell")
    return _save(fig, ctx.out / "fig3_token_efficiency.png")


def fig4_attention_heatmaps(ctx: Context) -> Path | str:
    with_maps = [r for r in ctx.table.runs.values() if r.attention_files]
    if not with_maps:
        return "no run has attention/step_*.npz"
    preferred = [r for r in with_maps if ablations.plan_id(r) == "F3"] or with_maps
    run = preferred[0]
    record = load_attention(run.attention_files[-1])
    return render_video(
        record, 0, ctx.out / "fig4_attention_heatmaps.png", gif_path=ctx.out / "fig4_attention_heatmaps.gif"
    )


def fig5_freeze(ctx: Context) -> Path | str:
    runs = _by_plan_id(ctx.table, ("F1", "F2", "F3"))
    if len(runs) < 2:
        return "needs at least two of F1, F2, F3"
    _use_agg()
    import matplotlib.pyplot as plt

    has_grad = any(np.isfinite(r.col("grad_norm")).any() for r in runs)
    fig, axes = plt.subplots(1, 2 if has_grad else 1, figsize=(11 if has_grad else 6.4, 4.2), squeeze=False)
    _curves(axes[0, 0], runs, labels=_labels(runs))
    axes[0, 0].set_title("val loss")
    if has_grad:
        _curves(axes[0, 1], runs, y="grad_norm", labels=_labels(runs))
        axes[0, 1].set_title("grad norm (stability)")
    fig.suptitle("Fig 5: freeze strategy")
    return _save(fig, ctx.out / "fig5_freeze.png")


def fig6_attention_entropy(ctx: Context) -> Path | str:
    runs = [r for r in ctx.table.runs.values() if np.isfinite(r.col("attention_entropy")).any()]
    if not runs:
        return "no run logged attention_entropy"
    # Ablation runs and the rest in separate panels: one panel of 25 curves is unreadable.
    groups = [
        (t, g)
        for t, g in (
            ("ablation runs", [r for r in runs if ablations.plan_id(r)]),
            ("other runs", [r for r in runs if not ablations.plan_id(r)]),
        )
        if g
    ]
    _use_agg()
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.8), squeeze=False, sharey=True)
    for ax, (title, group) in zip(axes[0], groups):
        _curves(ax, group, y="attention_entropy", labels=_labels(group))
        ax.set_xscale("log")
        ax.legend(ncol=2, fontsize=6)
        ax.set_title(title)
    fig.suptitle("Fig 6: attention entropy over training (lower = sharper)")
    return _save(fig, ctx.out / "fig6_attention_entropy.png")


def _eval_modes(run: Run) -> dict[str, Any]:
    """The per-mode results of a run's eval/eval.json (none without one)."""
    return (run.eval_result or {}).get("modes") or {}


def fig7_eval_modes(ctx: Context) -> Path | str:
    runs = [r for r in ctx.table.runs.values() if _eval_modes(r)]
    if not runs:
        return "no run has eval/eval.json (fvlm eval)"
    modes = ["coarse_only", "coarse_fine", "autoregressive"]
    _use_agg()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    width = 0.8 / len(modes)
    for i, (mode, color) in enumerate(zip(modes, _colors(len(modes)))):
        values = [_eval_modes(r).get(mode, {}).get("loss", np.nan) for r in runs]
        ax.bar(np.arange(len(runs)) + i * width, values, width, color=color, label=mode)
    ax.set_xticks(np.arange(len(runs)) + width * (len(modes) - 1) / 2, [r.run_id for r in runs], rotation=20)
    ax.set_ylabel("eval loss")
    ax.set_title("Fig 7: eval modes")
    # Room above the bars for the legend, which would otherwise sit on the tallest of them.
    ax.set_ylim(0, ax.get_ylim()[1] * 1.25)
    ax.legend(ncol=len(modes), loc="upper center")
    return _save(fig, ctx.out / "fig7_eval_modes.png")


def fig8_scaling(ctx: Context) -> Path | str:
    runs = [r for r in ctx.fit_runs if r.flops_per_sample]
    if len({r.model_size for r in runs}) < 2:
        return "needs fit runs of at least two model sizes"
    _use_agg()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    sizes = sorted({r.model_size for r in runs}, key=lambda s: min(r.params or 0 for r in runs if r.model_size == s))
    colors = dict(zip(sizes, _colors(len(sizes))))
    seen = set()
    for run in runs:
        c, v = run.flops(), run.col("val_loss")
        keep = np.isfinite(c) & np.isfinite(v)
        key = (run.model_size, run.arch)
        ax.plot(
            c[keep],
            v[keep],
            ARCH_STYLE.get(run.arch, "-"),
            color=colors[run.model_size],
            alpha=0.85,
            label=f"{run.model_size} {run.arch}" if key not in seen else None,
        )
        seen.add(key)
    estimated = any(r.flops_estimated for r in runs)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs" + (" (estimated: 2 x N x 500 tokens per sample)" if estimated else ""))
    ax.set_ylabel("val loss")
    ax.set_title("Fig 8: loss vs compute by model size")
    ax.legend()
    return _save(fig, ctx.out / "fig8_scaling.png")


def scaling_isoflop(ctx: Context) -> Path | str:
    budgets = {k: b for k, b in ctx.fits.get("iso_flop", {}).get("budgets", {}).items() if "parabola" in b}
    if not budgets:
        return "needs 3 or more model sizes at one FLOP budget"
    _use_agg()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    for color, (label, budget) in zip(_colors(len(budgets)), budgets.items()):
        entries = [e for e in ctx.fits["iso_flop"]["entries"] if e["run_id"] in budget["runs"]]
        n = np.array([e["N"] for e in entries])
        ax.plot(n, [e["loss"] for e in entries], "o", color=color, label=f"{label} ({budget['C']:.2g} FLOPs)")
        grid = np.linspace(np.log10(n.min()) - 0.1, np.log10(n.max()) + 0.1, 100)
        p = budget["parabola"]
        ax.plot(10**grid, p["c2"] * grid**2 + p["c1"] * grid + p["c0"], color=color, lw=1)
        # N* only where the grid located it: an extrapolated vertex (the tiny grid's once sat at
        # N = 0.02) is not a measurement, and would stretch the axis over decades of nothing.
        if budget.get("interior"):
            ax.axvline(budget["N_star"], color=color, lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final val loss")
    ax.set_title("Iso-FLOP curves")
    ax.legend()
    return _save(fig, ctx.out / "scaling_isoflop.png")


def scaling_foveated_vs_baseline(ctx: Context) -> Path | str:
    # The scaling grid's cells (run ids with a budget label, C1..C4), both architectures: ablation
    # variants that share an architecture label would otherwise join the lines.
    grid = [r for r in ctx.table.runs.values() if budget_label(r.run_id)] or ctx.fit_runs
    runs = [r for r in grid if r.arch in ("foveated", "multi_token") and r.flops_per_sample and r.n_points]
    if {r.arch for r in runs} != {"foveated", "multi_token"}:
        return "needs both foveated and multi-token runs with FLOPs"
    _use_agg()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    sizes = sorted({r.model_size for r in runs}, key=lambda s: min(r.params or 0 for r in runs if r.model_size == s))
    colors = dict(zip(sizes, _colors(len(sizes))))
    # Seed replicates (<cell>.s<k>) are drawn as hollow markers beside their cell, not joined into
    # its line: their spread is the training noise at that budget.
    labelled = False
    for arch, marker in (("foveated", "o"), ("multi_token", "s")):
        for size in sizes:
            mine = [r for r in runs if r.arch == arch and r.model_size == size]
            chosen = sorted((r for r in mine if not replicate_of(r.run_id)[1]), key=lambda r: np.nanmax(r.flops()))
            if chosen:
                ax.plot(
                    [np.nanmax(r.flops()) for r in chosen],
                    [r.col("val_loss")[-1] for r in chosen],
                    marker,
                    ls=ARCH_STYLE[arch],
                    color=colors[size],
                    label=f"{size} {arch}",
                )
            replicas = [r for r in mine if replicate_of(r.run_id)[1]]
            if replicas:
                ax.plot(
                    [np.nanmax(r.flops()) for r in replicas],
                    [r.col("val_loss")[-1] for r in replicas],
                    marker,
                    ls="none",
                    mfc="none",
                    color=colors[size],
                    label=None if labelled else "seed replicate (hollow)",
                )
                labelled = True
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("final val loss")
    ax.set_title("Foveated vs multi-token baseline across compute")
    ax.legend()
    return _save(fig, ctx.out / "scaling_foveated_vs_baseline.png")


def scaling_data_curves(ctx: Context) -> Path | str:
    per_size = ctx.fits.get("per_size_fits", {})
    if not ctx.fit_runs:
        return "no fit runs selected"
    _use_agg()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    sizes = sorted({r.model_size for r in ctx.fit_runs})
    colors = dict(zip(sizes, _colors(len(sizes))))
    for run in ctx.fit_runs:
        ax.plot(
            run.col("samples_seen"),
            run.col("val_loss"),
            ARCH_STYLE.get(run.arch, "-"),
            color=colors[run.model_size],
            alpha=0.5,
            lw=1,
        )
    for size in sizes:
        fit = per_size.get(size)
        if fit:
            lo, hi = fit["D_range"]
            d = np.geomspace(lo, hi, 200)
            label = (
                f"{size}: {fit['E']:.3f} + {fit['a']:.3g}/D^{fit['b']:.3f}"
                if fit["identified"]
                # Drawn dotted, with why it is not a law, one reason a line so that the legend stays narrow.
                else f"{size}: not identified\n" + "\n".join(fit["not_identified_because"])
            )
            ax.plot(
                d,
                predict_data_scaling(fit, d),
                "-" if fit["identified"] else ":",
                color=colors[size],
                lw=2.2,
                label=label,
            )
    ax.set_xscale("log")
    ax.set_xlabel("samples seen D")
    ax.set_ylabel("val loss")
    ax.set_title("Data scaling: eval curves (thin) and per-size fits (thick)")
    if ax.get_legend_handles_labels()[0]:  # no fit drawn (too few points per size): nothing to label
        ax.legend(fontsize="small")
    return _save(fig, ctx.out / "scaling_data_curves.png")


def scaling_compute_optimal(ctx: Context) -> Path | str:
    iso = ctx.fits.get("iso_flop", {})
    law = iso.get("N_star_of_C")
    if not law:
        return "needs interior iso-FLOP minima at 2 or more budgets (3+ sizes each)"
    _use_agg()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    budgets = [b for b in iso["budgets"].values() if "N_star" in b]
    c = np.array([b["C"] for b in budgets])
    interior = np.array([b["interior"] for b in budgets])
    n_star = np.array([b["N_star"] for b in budgets])
    ax.plot(c[interior], n_star[interior], "o", label="interior iso-FLOP minima (fitted)")
    if not interior.all():
        ax.plot(
            c[~interior],
            n_star[~interior],
            "o",
            mfc="none",
            color="grey",
            label="extrapolated or edge minima (not fitted)",
        )
    grid = np.geomspace(c.min() / 2, c.max() * 2, 50)
    ax.plot(grid, law["k"] * grid ** law["a"], label=f"N* = {law['k']:.3g} C^{law['a']:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute C (FLOPs)")
    ax.set_ylabel("compute-optimal N*")
    ax.set_title("Compute-optimal model size")
    ax.legend()
    return _save(fig, ctx.out / "scaling_compute_optimal.png")


def scaling_law_plot(ctx: Context) -> Path | str:
    per_size = ctx.fits.get("per_size_fits", {})
    if not per_size:
        return "no size had enough fit points (3+) for L(D)"
    joint = ctx.fits.get("joint_chinchilla_fit") or {}
    _use_agg()
    import matplotlib.pyplot as plt

    fig, (ax, res_ax) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    colors = dict(zip(per_size, _colors(len(per_size))))
    for size, fit in per_size.items():
        runs = [r for r in ctx.fit_runs if r.model_size == size]
        d = np.concatenate([r.col("samples_seen") for r in runs])
        loss = np.concatenate([r.col("val_loss") for r in runs])
        ax.plot(d, loss, ".", color=colors[size], alpha=0.5, ms=4)
        lo, hi = fit["D_range"]
        grid = np.geomspace(lo, hi, 200)
        label = (
            f"{size} per-size LS: E={fit['E']:.3f}, b={fit['b']:.3f}, RMSE={fit['rmse']:.4f}"
            if fit["identified"]
            else f"{size} per-size LS: not identified, RMSE={fit['rmse']:.4f}"
        )
        ax.plot(
            grid, predict_data_scaling(fit, grid), "-" if fit["identified"] else ":", color=colors[size], label=label
        )
        joint_curve = predict_joint(joint, fit["N"], grid, size) if joint else None
        if joint_curve is not None:
            # Drawn either way, as the per-size fits are: the curve shows how the law misses the data.
            status = "" if joint.get("identified", True) else ", not identified"
            ax.plot(
                grid, joint_curve, "--", color=colors[size], lw=1.2, label=f"{size} joint fit (Huber on log L{status})"
            )
        res_ax.plot(d, loss - predict_data_scaling(fit, d), ".", color=colors[size], ms=4, label=size)
    ax.set_xscale("log")
    ax.set_xlabel("samples seen D")
    ax.set_ylabel("val loss")
    ax.set_title("Scaling law fits")
    ax.legend()
    res_ax.axhline(0, color="k", lw=0.8)
    res_ax.set_xscale("log")
    res_ax.set_xlabel("samples seen D")
    res_ax.set_ylabel("residual (data - per-size fit)")
    res_ax.set_title("Residuals")
    return _save(fig, ctx.out / "scaling_law_plot.png")


def convergence_all(ctx: Context) -> Path | str:
    runs = [r for r in ctx.table.runs.values() if ablations.plan_id(r)]
    if not runs:
        return "no ablation runs (F1..D1) found"
    _use_agg()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    _curves(ax, runs, labels=_labels(runs))
    ax.legend(ncol=2, fontsize=6)
    ax.set_title("Convergence of every ablation run")
    return _save(fig, ctx.out / "convergence_ablations.png")


FIGURES: tuple[tuple[str, Callable[[Context], Path | str]], ...] = (
    ("Fig 1: foveated vs alternatives", fig1_foveated_vs_alternatives),
    ("Fig 2: loss_fine / loss_coarse ratio", fig2_loss_ratio),
    ("Fig 3: token-efficiency frontier", fig3_token_efficiency),
    ("Fig 4: attention heatmaps", fig4_attention_heatmaps),
    ("Fig 5: freeze strategy", fig5_freeze),
    ("Fig 6: attention entropy", fig6_attention_entropy),
    ("Fig 7: eval-mode comparison", fig7_eval_modes),
    ("Fig 8: scaling curves", fig8_scaling),
    ("Convergence curves (all ablations)", convergence_all),
    ("Iso-FLOP curves", scaling_isoflop),
    ("Foveated vs baseline across FLOPs", scaling_foveated_vs_baseline),
    ("Data-scaling curves", scaling_data_curves),
    ("Compute-optimal N vs C", scaling_compute_optimal),
    ("Scaling-law fits over the data", scaling_law_plot),
)


def draw_all(ctx: Context) -> list[tuple[str, Path | None, str]]:
    """(title, path or None, reason when absent) for every figure."""
    out: list[tuple[str, Path | None, str]] = []
    for title, draw in FIGURES:
        result = draw(ctx)
        out.append((title, result, "") if isinstance(result, Path) else (title, None, result))
    return out
