"""fvlm analyze: fits recover known laws, the export round-trips, every figure and decision is data-driven."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import optimize

from fvlm import run_folder
from fvlm.analysis import compare, fits, scaling, table
from fvlm.analysis.ablations import QUESTIONS, answer, answer_all
from fvlm.analysis.cli import analyze
from fvlm.analysis.table import load
from fvlm.cli import main
from fvlm.config import RunConfig
from fvlm.errors import UsageError

LAW = {"E": 1.5, "A": 30.0, "alpha": 0.3, "B": 200.0, "beta": 0.4}
SIZES = (0.5e6, 2e6, 8e6, 32e6)
BUDGETS = (1e14, 4e14, 1.6e15)
REAL_EXPORT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "phase1_export"


def law(n, d):
    return LAW["E"] + LAW["A"] / np.asarray(n, float) ** LAW["alpha"] + LAW["B"] / np.asarray(d, float) ** LAW["beta"]


def write_run(
    root: Path,
    run_id: str,
    samples: np.ndarray,
    loss: np.ndarray,
    params: float,
    flops_per_sample: float,
    overrides: dict | None = None,
    extras: bool = False,
) -> Path:
    run_dir = root / run_id
    run_dir.mkdir(parents=True)
    cfg = RunConfig(run_id=run_id).to_dict()
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".")
        cfg[section][key] = value
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    steps = np.arange(1, len(samples) + 1) * 10
    ratio = 0.9 + 0.1 * np.exp(-steps / steps[-1])
    with (run_dir / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=run_folder.METRIC_COLUMNS)
        writer.writeheader()
        for i, (s, v) in enumerate(zip(samples, loss)):
            writer.writerow(
                {
                    "run_id": run_id,
                    "step": steps[i],
                    "samples_seen": int(s),
                    "wall_time_sec": i,
                    "train_loss": v + 0.01,
                    "val_loss": v,
                    "loss_fine": v,
                    "loss_coarse": v / ratio[i],
                    "loss_ratio": ratio[i],
                    "grad_norm": 1.0,
                    "attention_entropy": 4 - i * 0.05,
                    "lr_connector": 1e-4,
                    "lr_dino": 1e-5,
                    "lr_llm": 1e-5,
                    "throughput": 10,
                    "gpu_mem_gb": "",
                    "val_loss_fine": v,
                    "val_loss_coarse": v / ratio[i],
                    "val_loss_ratio": ratio[i],
                }
            )
    best = int(np.argmin(loss))
    summary = {
        "run_id": run_id,
        "status": "completed",
        "git_commit": "x",
        "config_hash": "y",
        "final_train_loss": float(loss[-1]),
        "best_val_loss": float(loss[best]),
        "best_val_step": int(steps[best]),
        "convergence_step": int(steps[-1]),
        "total_steps": int(steps[-1]),
        "total_samples": int(samples[-1]),
        "wall_time_sec": 60.0,
        "wall_time_hours": 60 / 3600,
        "params": {"total": params, "trainable": params, "by_group": {}},
        "flops_per_sample": flops_per_sample,
        "total_flops": flops_per_sample * samples[-1],
        "final": {},
        "best": {},
    }
    (run_dir / "run_summary.json").write_text(json.dumps(summary))
    if extras:
        with (run_dir / "steps.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=run_folder.STEP_COLUMNS_REQUIRED)
            writer.writeheader()
            for i, s in enumerate(np.linspace(1, samples[-1], 60)):
                r = 0.9 + 0.1 * np.exp(-i / 20) + 0.01 * np.sin(i)
                writer.writerow(
                    {
                        "run_id": run_id,
                        "step": i,
                        "samples_seen": int(s),
                        "wall_time_sec": i,
                        "train_loss": 2,
                        "loss_fine": 2 * r,
                        "loss_coarse": 2,
                        "loss_ratio": r,
                        "grad_norm": 1,
                        "lr_connector": 1e-4,
                        "lr_dino": 1e-5,
                        "lr_llm": 1e-5,
                        "throughput_samples_sec": 10,
                        "gpu_mem_allocated_gb": 0,
                        "gpu_mem_reserved_gb": 0,
                    }
                )
        rng = np.random.default_rng(0)
        attn = rng.random((2, 3, 2, 2, 1 + 16)).astype(np.float32)
        attn /= attn.sum(-1, keepdims=True)
        (run_dir / "attention").mkdir()
        np.savez(
            run_dir / "attention" / "step_0000010.npz",
            coarse_attn=attn,
            fine_attn=attn[..., ::-1].copy(),
            frames=rng.integers(0, 255, (2, 3, 32, 32, 3), dtype=np.uint8),
            frame_mask=np.ones((2, 3), bool),
            grid=np.array([4, 4]),
            keys=np.array(["v0", "v1"]),
            step=10,
        )
        (run_dir / "checkpoints" / "step_0000010").mkdir(parents=True)
        (run_dir / "checkpoints" / "step_0000010" / "meta.json").write_text("{}")
        (run_dir / "eval").mkdir()
        modes = {
            m: {"loss": v, "n": 8} for m, v in (("coarse_only", 2.1), ("coarse_fine", 2.0), ("autoregressive", 2.05))
        }
        (run_dir / "eval" / "eval.json").write_text(json.dumps({"run_id": run_id, "step": 10, "modes": modes}))
    return run_dir


def ablation_sweep(root: Path, offsets: dict[str, float]) -> Path:
    """The plan's 12 ablation runs at one size; each run's curve is the same law shifted by its offset."""
    sweep = root / "ablations"
    sweep.mkdir(parents=True)
    rng = np.random.default_rng(1)
    samples = np.linspace(2e4, 2e5, 12)
    overrides = {
        "A1": {"model.deep_query": False},
        "A6": {"model.coarse_only": True},
        "B1": {"model.arch": "multi_token", "model.tokens_per_frame": 16},
        "A8a": {"data.replicate_image_frames": 1},
        "A8b": {"data.replicate_image_frames": 16},
    }
    for run_id, offset in offsets.items():
        loss = 1.2 + offset + 0.5 / (samples / 1e4) ** 0.5 + rng.normal(0, 0.002, len(samples))
        fps = 12e6 * (4 if run_id == "B1" else 1)
        write_run(sweep, run_id, samples, loss, 2e6, fps, overrides.get(run_id), extras=run_id == "F3")
    with (sweep / "sweep.csv").open("w") as handle:
        handle.write("run_id,status\n" + "".join(f"{r},completed\n" for r in offsets))
    return sweep


def scaling_sweep(root: Path) -> Path:
    sweep = root / "scaling"
    sweep.mkdir(parents=True)
    rng = np.random.default_rng(2)
    ids = []
    for n in SIZES:
        for j, c in enumerate(BUDGETS):
            d_final = c / (6 * n)
            samples = np.geomspace(d_final / 10, d_final, 8)
            loss = law(n, samples) + rng.normal(0, 0.002, len(samples))
            run_id = f"{n / 1e6:g}M-C{j + 1}-F"
            write_run(sweep, run_id, samples, loss, n, 6 * n)
            ids.append(run_id)
        run_id = f"{n / 1e6:g}M-C1-B"
        samples = np.geomspace(BUDGETS[0] / (60 * n), BUDGETS[0] / (6 * n), 8)
        write_run(
            sweep,
            run_id,
            samples,
            law(n, samples) + 0.03,
            n,
            6 * n,
            {"model.arch": "multi_token", "model.tokens_per_frame": 16},
        )
        ids.append(run_id)
    with (sweep / "sweep.csv").open("w") as handle:
        handle.write("run_id,status\n" + "".join(f"{r},completed\n" for r in ids))
    return sweep


OFFSETS = {
    "F1": 0.3,
    "F2": 0.2,
    "F3": 0.0,
    "LR2": 0.05,
    "LR3": 0.02,
    "LR4": 0.04,
    "A1": 0.06,
    "A6": 0.08,
    "B1": 0.01,
    "A8a": 0.0,
    "A8b": 0.05,
    "D1": 0.03,
}


# ----------------------------------------------------------------------------- fits


def test_per_size_fit_recovers_the_law_within_its_interval():
    rng = np.random.default_rng(0)
    d = np.geomspace(1e3, 1e6, 60)
    loss = 1.2 + 40 / d**0.45 + rng.normal(0, 0.003, d.size)
    fit = fits.fit_data_scaling(d, loss)
    boot = fits.bootstrap(np.zeros(d.size, int), lambda i: fits.fit_data_scaling(d[i], loss[i]), ["E", "b"], 100, 0)
    assert boot["ci95"]["E"][0] <= 1.2 <= boot["ci95"]["E"][1]
    assert boot["ci95"]["b"][0] <= 0.45 <= boot["ci95"]["b"][1]
    assert fit["rmse"] < 0.005 and boot["unit"] == "points"


def test_global_per_size_fit_is_not_beaten_by_any_local_start():
    rng = np.random.default_rng(3)
    d = np.geomspace(1e4, 7e5, 80)
    # A flat, noisy curve: the case where local fits wander off to different exponents.
    loss = 1.3 + 3 / d**0.2 + rng.normal(0, 0.02, d.size)
    best = fits.fit_data_scaling(d, loss)
    for e0 in (0.5, 1.0, 1.3):
        for b0 in (0.05, 0.3, 1.0, 2.0):
            try:
                # Local starts overflow on their way; that is their problem, not the test's.
                with np.errstate(all="ignore"):
                    p, _ = optimize.curve_fit(lambda x, e, a, b: e + a / x**b, d, loss, p0=(e0, 1.0, b0), maxfev=5000)
            except RuntimeError:
                continue
            if 0 < p[2] <= fits.EXPONENT_MAX:
                sse = float(((loss - (p[0] + p[1] / d ** p[2])) ** 2).sum())
                assert best["sse"] <= sse + 1e-9


def _joint_data(sizes, noise=0.002, seed=0):
    rng = np.random.default_rng(seed)
    n, d, size, run = [], [], [], []
    for i, big_n in enumerate(sizes):
        for j in range(3):
            dd = np.geomspace(1e4, 1e6, 15) * (j + 1)
            n += [big_n] * 15
            d += list(dd)
            size += [i] * 15
            run += [i * 3 + j] * 15
    n, d = np.array(n), np.array(d)
    loss = law(n, d) + rng.normal(0, noise, n.size)
    return fits.JointData(n, d, loss, np.array(size), np.array(run), [f"{s:g}" for s in sizes])


def test_joint_fits_recover_the_law_and_agree():
    data = _joint_data(SIZES)
    ls = fits.fit_joint_least_squares(data)
    hub = fits.fit_joint_huber(data)
    for fit in (ls, hub):
        assert fit["alpha"] == pytest.approx(LAW["alpha"], abs=0.06)
        assert fit["beta"] == pytest.approx(LAW["beta"], abs=0.03)
        assert fit["E"] == pytest.approx(LAW["E"], abs=0.1)
    # Two estimators of one law predict the same loss inside the data.
    assert fits.predict_joint(ls, 2e6, 1e5) == pytest.approx(fits.predict_joint(hub, 2e6, 1e5), abs=0.01)


def test_the_product_grid_gives_the_per_cell_sses():
    """The least-squares fit's start grid, from the normal equations over all (alpha, beta) cells
    at once, against each cell's design solved by lstsq (what the optimiser then evaluates): the
    same SSEs, on exact data (SSE near zero, where y'y - coef'X'y could lose its digits) and on a
    noisy resample with repeated points."""
    grid = np.linspace(0.02, fits.EXPONENT_MAX, 60)
    cells = np.array([(a, b) for a in grid for b in grid])
    exact = _joint_data(SIZES, noise=0.0)
    noisy = _joint_data(SIZES, noise=0.01, seed=3)
    resample = noisy.take(np.random.default_rng(1).integers(0, len(noisy.loss), len(noisy.loss)))
    for data in (exact, noisy, resample):
        n0, d0 = float(np.exp(np.mean(np.log(data.n)))), float(np.exp(np.mean(np.log(data.d))))
        per_cell = np.array([fits._lstsq_sse(fits._design(data, a, b, n0, d0), data.loss)[1] for a, b in cells])
        product = fits._product_grid_sse(data, grid, grid, n0, d0).reshape(-1)
        assert product == pytest.approx(per_cell, rel=1e-6, abs=1e-10 * float(data.loss @ data.loss))
        assert int(np.argmin(product)) == int(np.argmin(per_cell)) or product[np.argmin(per_cell)] == pytest.approx(
            product.min(), abs=1e-10
        )


def test_the_offsets_grid_gives_the_per_beta_sses():
    """With two sizes (one offset per size), the batched start grid against lstsq beta by beta."""
    data = _joint_data(SIZES[:2], noise=0.01, seed=3)
    grid = np.linspace(0.02, fits.EXPONENT_MAX, 60)
    d0 = float(np.exp(np.mean(np.log(data.d))))
    per_beta = [fits._lstsq_sse(fits._design(data, None, b, 1.0, d0), data.loss)[1] for b in grid]
    assert fits._offsets_grid_sse(data, grid, d0) == pytest.approx(per_beta, rel=1e-6)


def test_alpha_is_not_identifiable_with_two_sizes():
    data = _joint_data(SIZES[:2])
    for fit in (fits.fit_joint_least_squares(data), fits.fit_joint_huber(data)):
        assert fit["alpha"] is None and fit["A"] is None and fit["E"] is None
        assert set(fit["E_by_size"]) == set(data.size_labels)
        assert fit["beta"] == pytest.approx(LAW["beta"], abs=0.05)
        assert fits.predict_joint(fit, 1e9, 1e5, size="unseen") is None


# ----------------------------------------------------------------------------- the whole command


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    ablation_sweep(root, OFFSETS)
    scaling_sweep(root)
    out = root / "out"
    analyze([str(root)], out, ["*M-C?-F"], n_boot=20)
    return root, out


def test_analyze_writes_every_file_and_figure(project):
    _, out = project
    for name in (
        "report.md",
        "ablation_table.csv",
        "decisions.json",
        "all_eval_points.csv",
        "run_summaries.csv",
        "scaling_fits.json",
        "scaling_law_plot.png",
    ):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "Absent" not in report
    assert len(list(out.glob("*.png"))) == 14
    decisions = json.loads((out / "decisions.json").read_text())
    assert {"id", "runs", "winner", "margin", "noise", "verdict"} <= set(decisions["questions"][0])
    statuses = {c["criterion"]: c["status"] for c in decisions["go_no_go"]}
    assert set(statuses.values()) <= {"pass", "fail", "unknown"}
    assert statuses["All logging works (CSV, attention maps, checkpoint metadata)"] == "fail"  # only F3 has maps
    fits_json = json.loads((out / "scaling_fits.json").read_text())
    joint = fits_json["joint_chinchilla_fit"]
    assert joint["identifiable"] and joint["alpha"] == pytest.approx(LAW["alpha"], abs=0.08)
    budgets = fits_json["iso_flop"]["budgets"]
    assert all(b["interior"] for b in budgets.values()) and "N_star_of_C" in fits_json["iso_flop"]


def test_bootstrap_refits_on_two_processes_give_the_same_fits(project, tmp_path):
    """`fvlm analyze --jobs 2` refits the same bootstrap resamples in two processes: the fits file
    is the one a single process writes, to the last digit."""
    root, out = project
    sweeps = [str(p) for p in sorted(root.iterdir()) if p != out]  # what the fixture analysed
    assert main(["analyze", *sweeps, "--out", str(tmp_path / "two"), "--fit-runs", "*M-C?-F", "--bootstrap", "20",
                 "--jobs", "2"]) == 0  # fmt: skip
    assert (tmp_path / "two" / "scaling_fits.json").read_text() == (out / "scaling_fits.json").read_text()
    fits_json = json.loads((out / "scaling_fits.json").read_text())
    assert fits_json["joint_chinchilla_fit"]["ci95"]["alpha"] is not None  # the intervals were refitted
    assert main(["analyze", *sweeps, "--out", str(tmp_path / "none"), "--jobs", "0"]) == 2


def test_winners_come_from_the_data(project, tmp_path):
    _, out = project
    before = {q["id"]: q for q in json.loads((out / "decisions.json").read_text())["questions"]}
    assert before["two_pass"]["winner"] == "F3" and before["freeze"]["winner"] == "F3"
    assert before["two_pass"]["verdict"].startswith("clear")
    swapped = dict(OFFSETS, A6=-0.08, F1=-0.1)
    ablation_sweep(tmp_path, swapped)
    analyze([str(tmp_path / "ablations")], tmp_path / "out", None, n_boot=5)
    after = json.loads((tmp_path / "out" / "decisions.json").read_text())
    questions = {q["id"]: q for q in after["questions"]}
    assert questions["two_pass"]["winner"] == "A6" and questions["freeze"]["winner"] == "F1"
    two_pass = next(c for c in after["go_no_go"] if "coarse-only" in c["criterion"])
    assert two_pass["status"] == "fail"


def test_export_round_trip_is_identical(project, tmp_path):
    _, out = project
    again = tmp_path / "again"
    table.write_export_csvs(table.load([str(out)]), again)
    for name in ("all_eval_points.csv", "run_summaries.csv"):
        assert (again / name).read_text() == (out / name).read_text()


@pytest.mark.skipif(not REAL_EXPORT.is_dir(), reason="the shared phase-1 export is not next to this checkout")
def test_real_export_round_trip(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    original = table.load([str(REAL_EXPORT)])
    table.write_export_csvs(original, first)
    table.write_export_csvs(table.load([str(first)]), second)
    assert (first / "all_eval_points.csv").read_text() == (second / "all_eval_points.csv").read_text()
    assert (first / "run_summaries.csv").read_text() == (second / "run_summaries.csv").read_text()
    assert sum(r.n_points for r in original.runs.values()) == 1002
    fit = scaling.per_size([original.runs[r] for r in ("135M-C1-F", "135M-C2-F")], n_boot=5, seed=0)
    assert fit["135M"]["N"] == 157.6e6


def test_the_real_export_gets_provisional_answers_where_its_logs_are_partial():
    """The historical export logs no grad norms and no per-kind val losses: freeze and data mix are
    answered from what it does hold (the val-loss half of the freeze rule; the shared mixed val set
    for the mix), each provisional with its unchecked part named; efficiency, without a B1 run,
    stays "no data"."""
    answers = {a["id"]: a for a in answer_all(table.load([str(REAL_EXPORT)]))}
    freeze, mix = answers["freeze"], answers["data_mix"]
    assert freeze["winner"] == "baseline" and freeze["provisional"]
    assert [u["check"] for u in freeze["unchecked"]] == ["grad-norm stability"]
    assert mix["winner"] == "D1_video_heavy" and mix["provisional"]
    assert mix["unchecked"][0]["check"] == "val loss on the video and image samples separately"
    assert not answers["learning_rate"].get("provisional")  # its evidence is complete
    assert answers["efficiency"]["verdict"].startswith("no data")


def test_bad_input_names_file_and_column(tmp_path, capsys):
    export = tmp_path / "export"
    export.mkdir()
    (export / "all_eval_points.csv").write_text("model_size,run_id,step\n135M,a,1\n")
    with pytest.raises(UsageError, match=r"all_eval_points.csv: missing column 'lr_schedule'"):
        table.load([str(export)])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run_id: r\n")
    with pytest.raises(UsageError, match=r"metrics.csv: file not found"):
        table.load([str(run)])
    assert main(["analyze", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- foveated vs baseline, cell by cell


def baseline_wins_at_c4(root: Path, sizes=(2e6,), c4_gap=(-0.05,), seed=5) -> Path:
    """Per size: C1 and C4 cells of both arms (the baseline on the foveated cell's samples, so 4x its
    FLOPs), plus a foveated D1 ablation on another data mix whose loss is far lower. The baseline
    is behind by 0.01 at C1 and ahead by -c4_gap at C4."""
    sweep = root / "grid"
    sweep.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    multi = {"model.arch": "multi_token", "model.tokens_per_frame": 16}
    ids = []
    for n, gap in zip(sizes, c4_gap):
        label = f"{n / 1e6:g}M"
        for budget, (lo, hi), baseline_gap in (("C1", (1e3, 1e4), 0.01), ("C4", (1e4, 1e5), gap)):
            samples = np.geomspace(lo, hi, 8)
            loss = 1.0 + 5 / samples**0.3
            write_run(sweep, f"{label}-{budget}-F", samples, loss + rng.normal(0, 0.002, 8), n, 1e6)
            write_run(
                sweep, f"{label}-{budget}-B", samples, loss + baseline_gap + rng.normal(0, 0.002, 8), n, 4e6, multi
            )
            ids += [f"{label}-{budget}-F", f"{label}-{budget}-B"]
    samples = np.geomspace(2e4, 2e5, 8)
    write_run(sweep, "D1", samples, 0.3 + 5 / samples**0.3, sizes[0], 1e6, {"data.text_ratio": 0.15})
    with (sweep / "sweep.csv").open("w") as handle:
        handle.write("run_id,status\n" + "".join(f"{r},completed\n" for r in ids + ["D1"]))
    return sweep


def test_baseline_ahead_at_c4_is_reported_cell_by_cell(tmp_path):
    """The baseline wins at C4 and loses at C1; an ablation on another data mix with a far lower loss
    sits beside them and must not stand in for either arm."""
    grid = baseline_wins_at_c4(tmp_path)
    result = compare.compare_cells(table.load([str(grid)]))
    cells = {c["budget"]: c for c in result["cells"]}
    assert set(cells) == {"C1", "C4"} and all(c["foveated"] != "D1" for c in cells.values())
    c1, c4 = cells["C1"]["same_data"], cells["C4"]["same_data"]
    assert c4["verdict"] == "baseline ahead" and c4["ci95"][1] < 0
    assert c4["advantage"] == pytest.approx(-0.05, abs=0.01)
    assert c1["verdict"] == "foveated ahead" and c1["advantage"] == pytest.approx(0.01, abs=0.005)
    # No iso-FLOP cell: equal FLOPs are decided only where the costlier baseline still lost.
    assert cells["C1"]["same_flops"] is None and cells["C1"]["same_flops_bound"].startswith("foveated ahead")
    assert cells["C4"]["same_flops_bound"].startswith("not decided")
    assert result["scaling"]["verdict"] == "unknown"  # one size

    analyze([str(grid)], tmp_path / "out", None, n_boot=5)
    decisions = json.loads((tmp_path / "out" / "decisions.json").read_text())
    assert decisions["foveated_vs_baseline"]["n_resamples"] == 5  # --bootstrap reaches every interval
    rows = {r["question"]: r["answer"] for r in decisions["decision2"]}
    assert "C4: not decided" in rows["Token efficiency"] and "C1: foveated ahead" in rows["Token efficiency"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| 2M C4 | 2M-C4-F |" in report and "baseline ahead" in report


def test_a_tie_with_a_costlier_baseline_bounds_the_equal_flops_advantage_from_below(tmp_path):
    """A baseline that spent 4x the FLOPs on the same samples and ties the foveated cell would not be
    ahead at equal FLOPs: the cell is "not behind" there, and the bound is the tie's lower 95% end.
    A baseline that won with more FLOPs still decides nothing."""
    grid = baseline_wins_at_c4(tmp_path, sizes=(2e6, 8e6), c4_gap=(0.0, -0.05))
    cells = {(c["size"], c["budget"]): c for c in compare.compare_cells(table.load([str(grid)]))["cells"]}
    tie, lost = cells[("2M", "C4")], cells[("8M", "C4")]
    assert tie["same_data"]["verdict"] == "within noise" and tie["same_flops"] is None
    lo = tie["same_data"]["ci95"][0]
    assert lo < 0 < tie["same_data"]["ci95"][1]
    assert tie["same_flops_bound"].startswith("foveated not behind at equal FLOPs")
    assert "4.00x" in tie["same_flops_bound"] and f"at least {lo:+.4f}" in tie["same_flops_bound"]
    assert lost["same_data"]["verdict"] == "baseline ahead"
    assert lost["same_flops_bound"].startswith("not decided")


def _two_sized_grid(root: Path, gaps: dict[float, float]) -> list[dict]:
    grid = baseline_wins_at_c4(root, sizes=tuple(gaps), c4_gap=tuple(gaps.values()))
    return compare.compare_cells(table.load([str(grid)]))


@pytest.mark.parametrize(
    "gaps,verdict",
    [
        ({2e6: 0.0, 8e6: 0.04, 32e6: 0.08}, "grows"),
        ({2e6: 0.08, 8e6: 0.04, 32e6: 0.0}, "shrinks"),
        ({2e6: 0.03, 8e6: 0.03, 32e6: 0.03}, "flat"),
    ],
)
def test_grows_flat_shrinks_verdict_follows_the_cells(tmp_path, gaps, verdict):
    result = _two_sized_grid(tmp_path, gaps)
    scaling_result = result["scaling"]
    assert scaling_result["verdict"] == verdict, scaling_result["evidence"]
    assert scaling_result["budgets"] == ["C1", "C4"] and len(scaling_result["by_size"]) == 3
    # The same slope from the cells' own point values: within C1 the advantage is 0.01 at every size,
    # within C4 it is the gap given per size, so the shared slope is half the C4 slope.
    x = np.log10(list(gaps))
    expected = np.polyfit(x, list(gaps.values()), 1)[0] / 2
    assert scaling_result["slope_per_decade"] == pytest.approx(expected, abs=0.01)


def test_the_trend_over_cells_that_read_is_reported_beside_the_trend_over_all(tmp_path):
    """The largest size's advantage makes the trend over every cell grow; measured, that size's
    foveated cell does not read the pixels, and over the cells that do the advantage shrinks."""
    from fvlm.analysis.report import _scaling_answer

    grid = baseline_wins_at_c4(tmp_path, sizes=(2e6, 8e6, 32e6), c4_gap=(0.04, 0.0, 0.15))
    data = table.load([str(grid)])
    assert "scaling_reading" not in compare.compare_cells(data)  # nothing measured: nothing claimed
    reading = {"2M-C4-F": True, "2M-C4-B": True, "8M-C4-F": True, "8M-C4-B": True, "32M-C4-F": False}
    result = compare.compare_cells(data, reading=reading)
    assert result["scaling"]["verdict"] == "grows", result["scaling"]["evidence"]
    only = result["scaling_reading"]
    assert only["verdict"] == "shrinks", only["evidence"]
    assert only["cells"] == ["2M-C4-F", "8M-C4-F"] and only["not_reading"] == ["32M-C4-F"]
    assert only["budgets"] == ["C4"] and only["slope_per_decade"] == pytest.approx(-0.04 / np.log10(4), abs=0.01)
    answer = _scaling_answer(result)
    assert answer.startswith("**grows**: ")
    assert (
        ". Over the cells measured to read the pixels, both arms (2M-C4-F, 8M-C4-F; measured and not reading: "
        in answer
    )
    assert answer.endswith(only["evidence"]) and "32M-C4-F): **shrinks**: " in answer
    # No cell with both arms reading: said so, not a verdict over nothing.
    none = compare.compare_cells(data, reading={"2M-C4-F": False})
    assert none["scaling_reading"]["verdict"] == "unknown" and none["scaling_reading"]["cells"] == []
    assert _scaling_answer(none).endswith("no grid cell with both arms measured to read the pixels")


def test_the_efficiency_criterion_takes_the_grids_equal_flops_cells_when_the_ablation_pair_cannot_match():
    from fvlm.analysis.report import _efficiency

    answers = [{"id": "efficiency", "winner": None, "verdict": "unknown: B1 ends 0.0106 lower but spends 1.56x"}]
    assert _efficiency(None, answers) == ("unknown", answers[0]["verdict"])
    iso = {"advantage": 0.02, "ci95": [0.01, 0.03], "verdict": "foveated ahead", "baseline": "2M-C2-B-isoflop"}
    unmeasured = {"advantage": 0.1, "ci95": None, "verdict": "noise unknown", "baseline": "2M-C3-B-isoflop"}
    comparison = {
        "cells": [
            {"size": "2M", "budget": "C1", "same_flops": None},
            {"size": "2M", "budget": "C2", "same_flops": iso},
            {"size": "2M", "budget": "C3", "same_flops": unmeasured},
        ]
    }
    status, evidence = _efficiency(None, answers, comparison)
    assert status == "pass" and evidence.startswith("F3 vs B1: unknown: B1 ends 0.0106 lower")
    assert evidence.endswith("2M C2: +0.0200 [+0.0100, +0.0300] (foveated ahead) vs 2M-C2-B-isoflop")
    assert "C3" not in evidence  # an equal-FLOPs pair without an interval is not a measurement
    assert _efficiency(None, answers, {"cells": comparison["cells"][:1]})[0] == "unknown"


def test_iso_flop_cell_is_the_equal_flops_partner_only_when_its_flops_match(tmp_path):
    grid = baseline_wins_at_c4(tmp_path)
    samples = np.geomspace(250, 2500, 8)
    multi = {"model.arch": "multi_token", "model.tokens_per_frame": 16}
    write_run(grid, "2M-C1-B-isoflop", samples, 1.0 + 5 / samples**0.3, 2e6, 4e6, multi)
    write_run(grid, "2M-C4-B-isoflop", samples, 1.0 + 5 / samples**0.3, 2e6, 4e6, multi)  # C1's FLOPs, not C4's
    with (grid / "sweep.csv").open("a") as handle:
        handle.write("2M-C1-B-isoflop,completed\n2M-C4-B-isoflop,completed\n")
    cells = {c["budget"]: c for c in compare.compare_cells(table.load([str(grid)]))["cells"]}
    matched = cells["C1"]["same_flops"]
    assert matched["baseline"] == "2M-C1-B-isoflop" and matched["flops_ratio"] == pytest.approx(1.0)
    # A quarter of the samples: the baseline is behind by the law's difference between 2500 and 10000.
    assert matched["advantage"] == pytest.approx(5 / 2500**0.3 - 5 / 1e4**0.3, abs=0.01)
    assert cells["C4"]["same_flops"] is None and "0.10x" in cells["C4"]["same_flops_note"]


def test_cells_on_another_data_mix_are_not_compared(tmp_path):
    grid = baseline_wins_at_c4(tmp_path)
    config = grid / "2M-C4-B" / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["text_ratio"] = 0.3
    config.write_text(yaml.safe_dump(cfg))
    cells = {c["budget"]: c for c in compare.compare_cells(table.load([str(grid)]))["cells"]}
    assert cells["C4"]["same_data"] is None and "data differs" in cells["C4"]["same_data_note"]
    assert cells["C1"]["same_data"] is not None


# ----------------------------------------------------------------------------- fits that cannot be trusted


def test_per_size_fit_that_runs_to_its_bound_is_not_identified():
    d = np.geomspace(100, 1e4, 20)
    good = fits.fit_data_scaling(d, 1.2 + 40 / d**0.45)
    assert good["identified"] and good["not_identified_because"] == []
    # Straight in log D: the law can only follow it with b -> 0 and E -> minus infinity.
    straight = fits.fit_data_scaling(d, 2.0 - 0.1 * np.log(d))
    assert not straight["identified"]
    reasons = " ".join(straight["not_identified_because"])
    assert "b = 0.001 at its bound" in reasons and "plateau E" in reasons and straight["E"] < 0


def test_identification_names_each_reason():
    verdict = fits.identification(
        {"E": -0.5, "alpha": 3.0, "beta": 0.4, "E_by_size": {"S": 1.0, "M": -2.0}},
        {"alpha": (0.0, 3.0), "beta": (0.0, 3.0)},
        converged=False,
    )
    assert verdict["identified"] is False
    assert verdict["not_identified_because"] == [
        "the optimiser did not converge",
        "alpha = 3 at its bound 3",
        "plateau E = -0.5 below zero",
        "plateau E[M] = -2 below zero",
    ]
    assert fits.identification({"E": 0.5, "beta": 0.4}, {"beta": (0.0, 3.0)}, converged=True)["identified"]
    # A plateau driven to zero (a log-parameter run off to minus infinity) sits at its bound; one that
    # is small but of the data's order does not.
    zero = fits.identification({"E": 4.5e-24, "E_by_size": {"S": 0.2}}, {}, converged=True, lowest_loss=0.08)
    assert zero["not_identified_because"] == [
        "plateau E = 4.5e-24 at its bound 0 (under 0.001 of the lowest loss fitted, 0.08: the data show no floor)"
    ]
    assert fits.identification({"E": 0.01}, {}, converged=True, lowest_loss=0.08)["identified"]


def test_huber_fit_of_losses_without_a_floor_is_not_identified():
    """Losses that fall as a pure power law (no plateau): the Huber fit, whose E is exp(e), can only
    follow them by driving E to zero, and says so instead of printing E = 1e-20."""
    data = _joint_data(SIZES)
    floorless = fits.JointData(
        data.n, data.d, 400 / data.n**0.3 + 300 / data.d**0.3, data.size, data.run, data.size_labels
    )
    hub = fits.fit_joint_huber(floorless)
    assert hub["E"] < 1e-3 * floorless.loss.min()
    assert not hub["identified"] and "at its bound 0" in " ".join(hub["not_identified_because"])
    assert fits.fit_joint_huber(data)["identified"]  # the same points with the law's floor


def _iso_entries(losses_by_budget):
    entries = []
    for c, losses in losses_by_budget.items():
        for n, loss in zip((1e6, 4e6, 16e6), losses):
            entries.append(
                {"run_id": f"{n:g}-C{c}", "N": n, "C": 10.0 ** (10 + c), "D": 10.0 ** (10 + c) / (6 * n), "loss": loss}
            )
    return entries


def test_compute_optimal_passes_only_on_interior_minima():
    from fvlm.analysis.report import _compute_optimal, _minimum_text

    u_shaped = {
        "iso_flop": fits.iso_flop(_iso_entries({1: (1.3, 1.2, 1.35), 2: (1.2, 1.1, 1.15)})),
        "per_size_fits": {},
    }
    assert all(b["interior"] for b in u_shaped["iso_flop"]["budgets"].values())
    assert _compute_optimal(u_shaped)[0] == "pass" and "N_star_of_C" in u_shaped["iso_flop"]
    # Lowest loss at the smallest size: the parabola's vertex lands inside the grid, the optimum does not.
    edge = {"iso_flop": fits.iso_flop(_iso_entries({1: (1.1, 1.105, 1.3), 2: (1.2, 1.1, 1.15)})), "per_size_fits": {}}
    budgets = edge["iso_flop"]["budgets"]
    assert 1e6 < budgets["C1"]["N_star"] < 16e6 and not budgets["C1"]["interior"] and budgets["C2"]["interior"]
    status, evidence = _compute_optimal(edge)
    assert status == "fail" and "C2: N* = " in evidence and "(interior minimum)" in evidence
    # The edge budget says where the optimum is, not an N* it did not locate.
    assert "C1: no interior minimum: the lowest loss is at the smallest size (1e+06)" in evidence
    assert "C1: N* =" not in evidence
    # Lowest at the largest size: the optimum is there or above.
    rising = fits.iso_flop(_iso_entries({1: (1.5, 1.2, 1.1)}))["budgets"]["C1"]
    assert rising["N_star"] > 16e6 and not rising["interior"]
    assert "the lowest loss is at the largest size (1.6e+07)" in _minimum_text(rising)
    assert "N_star_of_C" not in edge["iso_flop"]  # one interior minimum is not a law


def test_degenerate_fit_is_marked_in_fits_json_report_and_go_no_go(tmp_path):
    sweep = tmp_path / "grid"
    sweep.mkdir()
    ids = []
    for n, curve in ((1e6, lambda d: 1.2 + 40 / d**0.45), (4e6, lambda d: 2.0 - 0.1 * np.log(d))):
        for c, (lo, hi) in (("C1", (100, 1e3)), ("C2", (300, 3e3))):
            d = np.geomspace(lo, hi, 8)
            write_run(sweep, f"{n / 1e6:g}M-{c}-F", d, curve(d), n, 6 * n)
            ids.append(f"{n / 1e6:g}M-{c}-F")
    (sweep / "sweep.csv").write_text("run_id,status\n" + "".join(f"{r},completed\n" for r in ids))
    out = tmp_path / "out"
    analyze([str(sweep)], out, None, n_boot=5)
    per_size = json.loads((out / "scaling_fits.json").read_text())["per_size_fits"]
    assert per_size["1M"]["identified"] and per_size["1M"]["D_plateau"]
    assert not per_size["4M"]["identified"] and per_size["4M"]["D_plateau"] is None
    report = (out / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| 4M |"))
    assert "not identified (b = 0.001 at its bound 0.001" in row and f"{per_size['4M']['E']:.4f}" not in row
    assert "4M: not identified" in next(line for line in report.splitlines() if line.startswith("| How much data?"))
    checklist = json.loads((out / "decisions.json").read_text())["go_no_go"]
    optimal = next(c for c in checklist if "compute-optimal" in c["criterion"])
    assert optimal["status"] == "unknown" and "per-size fit 4M: not identified" in optimal["evidence"]


# The val-loss curves of F3 and A6 in the tiny main job (10 evals; A6 starts reading one eval
# earlier): A6 ends lower, and a paired comparison on the same samples cannot tell them apart.
F3_CURVE = (0.3008, 0.2467, 0.2255, 0.1719, 0.1220, 0.1047, 0.0953, 0.0849, 0.0835, 0.0797)
A6_CURVE = (0.3048, 0.2596, 0.1996, 0.1236, 0.1110, 0.0971, 0.0931, 0.0868, 0.0801, 0.0785)


def test_the_smoothed_end_of_a_short_curve_follows_its_last_evals(tmp_path):
    """With 10 evals a fixed 9-point window put a quadratic through the whole reading onset: F3 read
    0.0705 at its end (last eval 0.0797) and won the two-pass question "clearly" by 0.0099."""
    from fvlm.analysis.ablations import smoothed_at

    sweep = tmp_path / "sweep"
    samples = np.arange(1, 11) * 600.0
    write_run(sweep, "F3", samples, np.array(F3_CURVE), 1e6, 1e6)
    write_run(sweep, "A6", samples, np.array(A6_CURVE), 1e6, 1e6, {"model.coarse_only": True})
    (sweep / "sweep.csv").write_text("run_id,status\nF3,completed\nA6,completed\n")
    data = load([str(sweep)])
    for rid, curve in (("F3", F3_CURVE), ("A6", A6_CURVE)):
        assert smoothed_at(data.runs[rid], 6000, "samples_seen") == pytest.approx(np.mean(curve[-2:]), abs=0.003)
    two_pass = answer(next(q for q in QUESTIONS if q.id == "two_pass"), data)
    assert two_pass["winner"] == "A6" and not two_pass["verdict"].startswith("clear"), two_pass["verdict"]
    # A long curve keeps its 9-point window: the same quadratic as before on the export's 46 evals.
    long = np.geomspace(1e3, 1e6, 46)
    write_run(sweep, "LR2", long, 1 + 3 / long**0.3, 1e6, 1e6)
    (sweep / "sweep.csv").write_text("run_id,status\nF3,completed\nA6,completed\nLR2,completed\n")
    run = load([str(sweep)]).runs["LR2"]
    lx = np.log(long)
    expected = np.polyval(np.polyfit(lx[-9:], 1 + 3 / long[-9:] ** 0.3, 2), lx[-1])
    assert smoothed_at(run, long[-1], "samples_seen") == pytest.approx(expected, rel=1e-4)


def test_a_run_still_falling_on_a_decaying_learning_rate_is_named_with_the_caveat(tmp_path):
    """The tail test cannot tell data still to learn from a cosine schedule's last decay (the tiny A6
    and F2 fell over their last fifth at 6,000 samples and ended no lower at 12,000): the criterion
    still fails, and names the runs whose drop may be the schedule's."""
    from fvlm.analysis.report import _converged

    sweep = tmp_path / "sweep"
    samples = np.arange(1, 11) * 600.0
    falling = 0.05 + 2.0 / np.sqrt(samples)
    write_run(sweep, "F3", samples, falling, 1e6, 1e6)  # the default schedule: cosine
    write_run(sweep, "A6", samples, falling, 1e6, 1e6, {"optim.schedule": "constant"})
    write_run(sweep, "B1", samples, np.full(10, 0.1) + 1e-4 * np.sin(samples), 1e6, 1e6)
    (sweep / "sweep.csv").write_text("run_id,status\nF3,completed\nA6,completed\nB1,completed\n")
    status, text = _converged(load([str(sweep)]), [{"id": "q", "runs": ["F3", "A6", "B1"], "winner": "F3"}])
    assert status == "fail" and text.startswith("2/3 ablation runs still falling"), text
    assert "F3 ends on a decaying learning rate" in text and "A6 end" not in text and "B1" not in text  # flat


def _with_grad_norms(run, norms):
    run.steps = {"grad_norm": np.asarray(norms, float)}
    return run


def test_grad_norm_stability_is_concrete():
    from fvlm.analysis.ablations import grad_norm_stability

    def run_with(norms):
        from fvlm.analysis.table import Run

        return _with_grad_norms(Run("x", "S", 1.0, "", "completed", "foveated", 1, "", {"step": np.arange(3.0)}), norms)

    steady = 1 + 0.1 * np.sin(np.arange(40))
    assert grad_norm_stability(run_with(steady))["stable"] is True
    spiky = steady.copy()
    spiky[30] = 25.0
    assert grad_norm_stability(run_with(spiky))["stable"] is False
    assert "spike" in grad_norm_stability(run_with(spiky))["reason"]
    rising = np.geomspace(1, 20, 40)
    assert grad_norm_stability(run_with(rising))["stable"] is False
    assert "rising" in grad_norm_stability(run_with(rising))["reason"]
    assert grad_norm_stability(run_with([1.0, np.inf, 1.0, 1.0]))["stable"] is False
    assert grad_norm_stability(run_with([np.nan] * 3))["stable"] is None


def test_freeze_picks_the_lowest_val_loss_among_runs_with_stable_grad_norms(tmp_path):
    """F3 has the lowest loss but its grad norms spike: F2, next lowest and stable, wins. Without
    grad norms (the export has none) the val-loss half of the rule still names the winner, marked
    provisional with the unchecked half named; with no stable run at all there is no answer."""
    data = load([str(ablation_sweep(tmp_path, OFFSETS))])
    freeze = next(q for q in QUESTIONS if q.id == "freeze")
    assert answer(freeze, data)["winner"] == "F3"
    spiky = np.ones(60)
    spiky[50] = 40.0
    _with_grad_norms(data.runs["F3"], spiky)
    result = answer(freeze, data)
    assert result["winner"] == "F2" and result["grad_norms"]["F3"]["stable"] is False
    for run in data.runs.values():
        run.steps = None
        run.points["grad_norm"] = np.full(run.n_points, np.nan)
    result = answer(freeze, data)
    assert result["winner"] == "F3" and result["provisional"]
    assert [u["check"] for u in result["unchecked"]] == ["grad-norm stability"]
    assert "provisional: grad-norm stability not checked" in result["verdict"]
    for run in data.runs.values():
        _with_grad_norms(run, spiky)
    result = answer(freeze, data)
    assert result["winner"] is None and result["verdict"] == "unknown: no run has stable grad norms"
    assert not answer(freeze, load([str(ablation_sweep(tmp_path / "full", OFFSETS))])).get("provisional")


def _law_iso_entries(alpha, beta, prefix, budgets=(1e15, 1e16, 1e17, 1e18)):
    """Runs on the iso-FLOP lines of L = 1 + 400/N^alpha + 400/D^beta with C = 6 N D, five sizes around
    each budget's optimum, named without budget labels (grouped by FLOPs spent)."""
    entries = []
    for c in budgets:
        n_opt = (alpha * 400 / (beta * 400)) ** (1 / (alpha + beta)) * (c / 6) ** (beta / (alpha + beta))
        for k, n in enumerate(n_opt * np.geomspace(0.1, 10, 5)):
            d = c / (6 * n)
            entries.append(
                {"run_id": f"{prefix}{c:.0e}-{k}", "N": n, "D": d, "C": c, "loss": 1 + 400 / n**alpha + 400 / d**beta}
            )
    return entries


def test_each_arms_iso_flop_exponent_recovers_its_law_and_is_compared_with_chinchilla():
    foveated = fits.iso_flop(_law_iso_entries(0.3, 0.4, "f"), by_label=False)
    baseline = fits.iso_flop(_law_iso_entries(0.4, 0.3, "b"), by_label=False)
    assert foveated["N_star_of_C"]["a"] == pytest.approx(0.4 / 0.7, abs=0.02)
    assert baseline["N_star_of_C"]["a"] == pytest.approx(0.3 / 0.7, abs=0.02)
    result = fits.compare_allocation_exponents({"foveated": foveated, "multi_token": baseline})
    assert result["verdict"] == "measured"
    assert result["difference"] == pytest.approx(0.4 / 0.7 - 0.3 / 0.7, abs=0.03)
    ref = fits.CHINCHILLA_REFERENCE
    assert result["chinchilla"] == pytest.approx(ref["beta"] / (ref["alpha"] + ref["beta"]))
    assert "Besiroglu" in ref["source"] and ref["as_printed_by_hoffmann_2022"]["alpha"] == 0.34
    one_budget = fits.iso_flop(_law_iso_entries(0.4, 0.3, "b", budgets=(1e15,)), by_label=False)
    missing = fits.compare_allocation_exponents({"foveated": foveated, "multi_token": one_budget})
    assert missing["verdict"] == "unknown" and "multi_token" in missing["evidence"]


def test_efficiency_compares_finished_points_and_never_a_baseline_mid_schedule(tmp_path):
    """B1 spends 4x F3's FLOPs per sample. Read at F3's FLOPs, B1 would be a quarter of the way
    through its LR schedule. At finished points: F3 cheaper and better decides for F3; B1 better
    but 4x dearer is no matched comparison, so the question is unknown."""
    efficiency = next(q for q in QUESTIONS if q.id == "efficiency")
    better = answer(efficiency, load([str(ablation_sweep(tmp_path / "a", OFFSETS))]))
    assert better["winner"] == "F3" and better["flops_ratio"] == pytest.approx(4.0)
    assert "4.00x fewer FLOPs and is not worse" in better["verdict"]
    b1_row = next(s for s in better["rows"] if s["run"].run_id == "B1")
    assert b1_row["smoothed"] == pytest.approx(b1_row["final"], abs=0.01)  # its own end, not mid-schedule
    worse = answer(efficiency, load([str(ablation_sweep(tmp_path / "b", {**OFFSETS, "B1": -0.05}))]))
    assert worse["winner"] is None and worse["verdict"].startswith("unknown: B1 ends")
    assert "part-way through its LR schedule" in worse["verdict"]
    # B1 a hair lower than F3, by less than the evals' noise: F3 is not worse, and the question is
    # decided for the cheaper run rather than left unknown by a difference nobody can measure.
    tie = answer(efficiency, load([str(ablation_sweep(tmp_path / "c", {**OFFSETS, "B1": 0.002}))]))
    rows = {s["run"].run_id: s for s in tie["rows"]}
    assert 0 < rows["F3"]["smoothed"] - rows["B1"]["smoothed"] < tie["noise"]
    assert "4.00x fewer FLOPs" in tie["verdict"] and "within the noise" in tie["verdict"]
    assert not tie["verdict"].startswith("unknown") and tie["winner"] is not None


def _write_sources(run_dir, offsets, seed=0):
    """eval/sources.json: 90 validation samples (video, image, text in turn), the same keys and base
    losses for every run, shifted by the run's offset per kind."""
    rng = np.random.default_rng(seed)
    kinds = ["video", "image", "text"] * 30
    base = rng.normal(2.0, 0.3, 90)
    tokens = rng.integers(3, 12, 90)
    noise = np.random.default_rng(sum(map(ord, run_dir.name))).normal(0, 0.01, 90)
    loss = [(b + offsets.get(k, 0.0) + e) * t for b, k, e, t in zip(base, kinds, noise, tokens)]
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "sources.json").write_text(
        json.dumps(
            {
                "step": 10,
                "mode": "coarse_fine",
                "keys": [f"s{i}" for i in range(90)],
                "kinds": kinds,
                "loss_sum": loss,
                "tokens": tokens.tolist(),
            }
        )
    )


def test_a8_on_image_samples_and_d1_on_video_and_image_samples_or_unknown(tmp_path):
    sweep = ablation_sweep(tmp_path, OFFSETS)
    questions = {q.id: q for q in QUESTIONS}
    data = load([str(sweep)])
    # Without per-kind losses: the mixed val loss all runs were scored on decides, provisionally, and
    # the substitution is named (F3 is 0.03 lower than D1 there in OFFSETS).
    for qid in ("image_handling", "data_mix"):
        result = answer(questions[qid], data)
        assert result["provisional"] and "eval/sources.json" in result["unchecked"][0]["reason"], result
        assert "mixed val set" in result["unchecked"][0]["substitute"]
    assert answer(questions["data_mix"], data)["winner"] == "F3"
    # A8b (worse mixed val loss in OFFSETS) is better on the image samples: it wins the question.
    _write_sources(sweep / "A8a", {"image": 0.10})
    _write_sources(sweep / "A8b", {"image": 0.0, "video": 0.5})
    # D1 helps the video samples but costs the image ones: F3's mix is kept.
    _write_sources(sweep / "F3", {})
    _write_sources(sweep / "D1", {"video": -0.2, "image": 0.1})
    data = load([str(sweep)])
    image = answer(questions["image_handling"], data)
    assert image["winner"] == "A8b" and image["verdict"].startswith("clear")
    assert image["margin"] == pytest.approx(0.10, abs=0.01)
    mix = answer(questions["data_mix"], data)
    assert mix["winner"] == "F3"
    assert mix["by_kind"]["video"]["diff"] == pytest.approx(0.2, abs=0.01)
    assert mix["by_kind"]["image"]["diff"] == pytest.approx(-0.1, abs=0.01)
    _write_sources(sweep / "D1", {"video": -0.2, "image": -0.05})
    assert answer(questions["data_mix"], load([str(sweep)]))["winner"] == "D1"


@pytest.mark.parametrize("a8b_image, expected", [(-0.10, "A8b"), (-0.004, "A8a")])
def test_the_lock_keeps_one_frame_images_unless_replication_is_clearly_better(tmp_path, a8b_image, expected):
    """A8b (replicated frames) is adopted only when clearly better on the image samples; a lead within
    noise keeps the cheaper one-frame images, so that the locked config does not follow a seed's noise."""
    from fvlm.experiments import decide
    from fvlm.experiments.matrix import ablation_specs
    from fvlm.experiments.presets import TINY

    sweep = ablation_sweep(tmp_path, OFFSETS)
    _write_sources(sweep / "A8a", {})
    _write_sources(sweep / "A8b", {"image": a8b_image})
    choice = decide.choose("image_handling", load([str(sweep)]), {s.run_id: s for s in ablation_specs(TINY)})
    assert choice["analysis_winner"] == "A8b" and choice["choice"] == expected
    assert choice["adopted"]["data.replicate_image_frames"] == (1 if expected == "A8a" else TINY.replicate_max)


def test_a_sources_file_without_its_fields_is_one_line(tmp_path):
    sweep = ablation_sweep(tmp_path, {"F3": 0.0})
    (sweep / "F3" / "eval").mkdir(exist_ok=True)
    (sweep / "F3" / "eval" / "sources.json").write_text(json.dumps({"keys": []}))
    with pytest.raises(UsageError, match="sources.json: missing field 'kinds'"):
        load([str(sweep)])


def test_decision3_schedule_from_the_plateau_with_named_inputs(tmp_path, capsys):
    from fvlm.analysis.table import Run
    from fvlm.experiments.schedule import ScheduleInputs, decision3, parse_inputs

    runs = [
        Run(
            "S-C1-F",
            "135M",
            1.6e8,
            "",
            "completed",
            "foveated",
            1,
            "",
            {"step": np.arange(3.0)},
            flops_per_sample=2e12,
            flops_estimated=False,
        )
    ]
    fits_record = {
        "per_size_fits": {"135M": {"identified": True, "D_plateau": 4e6, "N": 1.6e8}},
        "iso_flop": {"budgets": {"C1": {"interior": False, "N_star": 1e8, "C": 1e17}}},
    }
    unknown = decision3(runs, fits_record, ScheduleInputs())
    assert unknown["size"] is None and unknown["two_gpus"] == "unknown"
    assert unknown["rows"][0]["answer"].startswith("unknown: no compute-optimal size")

    inputs = parse_inputs(
        [
            "size=135M",
            "stage2_ratio=0.5",
            "stage3_ratio=0.25",
            "mfu=0.4",
            "gpus=2",
            "gpu_hour_cost=1.5",
            "max_wall_days=30",
            "budget_usd=1000",
        ]
    )
    d3 = decision3(runs, fits_record, inputs)
    assert d3["stages"] == {"1": 4e6, "2": 2e6, "3": 1e6}
    expected_hours = 7e6 * 2e12 / (inputs.gpu_peak_flops * 0.4) / 3600
    assert d3["gpu_hours"] == pytest.approx(expected_hours) and d3["cost_usd"] == pytest.approx(1.5 * expected_hours)
    assert d3["wall_days"] == pytest.approx(expected_hours / 2 / 24) and d3["two_gpus"] == "yes"
    assert d3["mfu_source"].startswith("given")
    tight = decision3(runs, fits_record, dataclasses_replace(inputs, max_wall_days=d3["wall_days"] / 3))
    assert tight["two_gpus"] == "no" and "6 GPUs would fit" in tight["two_gpus_why"]
    no_ratio = decision3(runs, fits_record, dataclasses_replace(inputs, stage3_ratio=None))
    assert no_ratio["stages"]["3"] is None and no_ratio["two_gpus"] == "unknown"
    assert "stage3_ratio" in no_ratio["rows"][3]["answer"]

    with pytest.raises(UsageError, match="--schedule 'bogus=1': expected KEY=VALUE"):
        parse_inputs(["bogus=1"])
    assert main(["analyze", str(REAL_EXPORT), "--out", str(tmp_path / "o"), "--schedule", "mfu=-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--schedule mfu" in err[0]


def dataclasses_replace(inputs, **changes):
    import dataclasses

    return dataclasses.replace(inputs, **changes)


def test_report_lists_the_three_mode_eval_of_every_kept_milestone_or_names_it_missing(tmp_path):
    grid = tmp_path / "grid"
    grid.mkdir()
    samples = np.geomspace(1e3, 1e4, 8)
    run = write_run(grid, "135M-C1-F", samples, 2 + 1 / samples**0.3, 1.35e8, 1e9)
    analyze([str(grid)], tmp_path / "before", None, n_boot=5)
    assert (
        "unknown: no grid run holds the evaluation of its milestones" in (tmp_path / "before" / "report.md").read_text()
    )
    gap = {"diff": 0.05, "ci95_bootstrap": [0.01, 0.09]}
    entries = [
        {
            "step": s,
            "best": s == 20,
            "modes": {
                m: {"loss": 2.0 + i / 10, "n": 4}
                for i, m in enumerate(("coarse_only", "coarse_fine", "autoregressive"))
            },
            "gap_intervals": {"coarse_only_minus_coarse_fine": gap},
        }
        for s in (10, 20)
    ]
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(json.dumps({**entries[-1], "steps": entries}))
    analyze([str(grid)], tmp_path / "after", None, n_boot=5)
    text = (tmp_path / "after" / "report.md").read_text()
    assert (
        "| 135M-C1-F | 10 |  | 2.0000 | 2.1000 | 2.2000 | coarse_only − coarse_fine +0.0500 [+0.0100, +0.0900] |"
        in text
    )
    assert "| 135M-C1-F | 20 | yes |" in text
