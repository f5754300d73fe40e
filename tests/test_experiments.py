"""The Phase 1 plan as commands: run matrices of both presets, the plan's conditional and tie rules,
and the sweep runner (resume, divergence, side-by-side workers, a mini sweep end to end)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import sys

import numpy as np
import pytest
from conftest import MICRO_DATA
from test_analysis import write_run

from fvlm.cli import main
from fvlm.errors import UsageError
from fvlm.experiments import decide, matrix
from fvlm.experiments.presets import PAPER, TINY
from fvlm.experiments.runner import Sweep
from fvlm.model.flops import PLAN_BUDGETS

# The plan's sample counts per budget (docs/phase1_plan.md, "FLOP Budget Calibration").
PLAN_SAMPLES = {
    "S": {"C1": 100e3, "C2": 360e3, "C3": 1e6, "C4": 2e6},
    "M": {"C1": 40e3, "C2": 140e3, "C3": 400e3, "C4": 800e3},
    "L": {"C1": 9e3, "C2": 30e3, "C3": 90e3, "C4": 180e3},
}
SMALL = {
    **MICRO_DATA,
    "data.max_text_tokens": 64,
    "train.max_steps": 0,
    "train.eval_every": 2,
    "train.save_every": 2,
}


def _dry(capsys, *argv) -> dict:
    assert main([*argv, "--dry-run", "--json", "--no-measure"]) == 0
    return json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------- matrices


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_ablation_matrix_has_the_plans_twelve_runs_and_knobs(capsys, preset):
    record = _dry(capsys, "sweep", "ablations", "--preset", preset)
    runs = {r["run_id"]: r for r in record["runs"] if "replicate_of" not in r}
    assert tuple(runs) == matrix.ABLATION_IDS
    p = TINY if preset == "tiny" else PAPER
    # Then the training-noise replicates the preset asks for: the same diff with another seed.
    replicates = [r for r in record["runs"] if "replicate_of" in r]
    assert [r["run_id"] for r in replicates] == [
        matrix.replicate_id(rid, k) for rid, n in p.ablation_replicates.items() for k in range(1, n + 1)
    ]
    for r in replicates:
        assert {k: v for k, v in r["diff"].items() if k != "seed"} == runs[r["replicate_of"]]["diff"]
    c, b = p.connector_lr, p.backbone_lr
    base = record["base"]
    assert (base["optim.lr_connector"], base["optim.lr_dino"], base["optim.lr_llm"]) == (c, b, b)  # F3 = LR1, 10:1
    assert runs["F3"]["diff"] == {}
    assert runs["F1"]["diff"] == {"model.freeze_dino": True, "model.freeze_llm": True}
    assert runs["F2"]["diff"] == {"model.freeze_llm": True}
    ratios = {rid: runs[rid]["diff"]["optim.lr_connector"] / b for rid in ("LR2", "LR3", "LR4")}
    assert ratios == pytest.approx({"LR2": 100, "LR3": 3, "LR4": 1})
    assert runs["A1"]["diff"] == {"model.deep_query": False}
    assert runs["A6"]["diff"] == {"model.coarse_only": True}
    assert runs["B1"]["diff"] == {"model.arch": "multi_token", "model.tokens_per_frame": 16}
    for rid, frames in (("A8a", 1), ("A8b", p.replicate_max)):
        assert runs[rid]["diff"]["data.replicate_image_frames"] == frames
        assert runs[rid]["diff"]["train.stage"] == 2
        assert runs[rid]["diff"]["data.mix"]["image"] > 0.5
    assert runs["D1"]["diff"]["data.mix"] == {"video": 0.55, "image": 0.30, "text": 0.15}
    assert {r["samples"] for r in runs.values()} == {p.ablation_samples}
    # Frozen backbones cost fewer FLOPs per sample (no backward through them); the baseline more.
    assert runs["F1"]["flops"] < runs["F3"]["flops"] < runs["B1"]["flops"]
    if preset == "paper":
        assert record["estimate"]["gpu_hours"] > 0 and record["estimate"]["cost_usd"] > 0


def test_freeze_winner_f1_skips_the_lr_runs():
    ids = [s.run_id for s in matrix.ablation_specs(TINY, freeze_winner="F1")]
    assert ids == [i for i in matrix.ABLATION_IDS if i not in ("LR2", "LR3", "LR4")]
    assert [s.run_id for s in matrix.ablation_specs(TINY, freeze_winner="F2")] == list(matrix.ABLATION_IDS)


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_scaling_grid_is_24_cells_plus_isoflop_extras(capsys, preset):
    record = _dry(capsys, "sweep", "scaling", "--preset", preset)
    runs = {r["run_id"]: r for r in record["runs"] if "replicate_of" not in r}
    cells = [f"{s}-{c}-{a}" for s in "SML" for c in ("C1", "C2", "C3", "C4") for a in "FB"]
    extras = [f"{s}-{c}-B-isoflop" for s, c in (("S", "C2"), ("S", "C3"), ("M", "C2"), ("M", "C3"))]
    assert sorted(runs) == sorted(cells + extras)
    p = TINY if preset == "tiny" else PAPER
    # Both arms of every size once more at the replicate budget.
    replicates = sorted(r["run_id"] for r in record["runs"] if "replicate_of" in r)
    assert replicates == sorted(f"{s}-{b}-{a}.s1" for s in "SML" for b in p.replicate_budgets for a in "FB")
    for s in "SML":
        for c, budget in p.budgets.items():
            fov, base = runs[f"{s}-{c}-F"], runs[f"{s}-{c}-B"]
            assert budget - fov["flops_per_sample"] < fov["flops"] <= budget  # the budget is spent
            assert base["samples"] == fov["samples"] and base["flops"] > fov["flops"]  # iso-sample baseline
            if f"{s}-{c}-B-isoflop" in runs:
                iso = runs[f"{s}-{c}-B-isoflop"]
                assert budget - iso["flops_per_sample"] < iso["flops"] <= budget
                assert runs[f"{s}-{c}-B-isoflop"]["samples"] < fov["samples"]
        samples = [runs[f"{s}-{c}-F"]["samples"] for c in p.budgets]
        assert samples == sorted(samples)
    # ~5 evaluations per run at evenly spaced sample counts, each kept as a checkpoint.
    for run in runs.values():
        per_step = 32 if preset == "paper" else 8  # 16 x 2 accumulation (L: 4 x 8) on one device
        steps = -(-run["samples"] // per_step)
        every = run["diff"]["train.eval_every"]
        evals = steps // every + (steps % every > 0)  # the trainer also evaluates at the last step
        assert min(steps, p.scaling_evals) <= evals <= 2 * p.scaling_evals
        assert run["diff"]["train.keep_milestones"] == p.scaling_evals


def test_paper_budgets_with_the_plans_formula_give_the_plans_sample_counts(capsys):
    record = _dry(capsys, "sweep", "scaling", "--preset", "paper", "--flops-formula", "seed")
    runs = {r["run_id"]: r for r in record["runs"]}
    for size, budgets in PLAN_SAMPLES.items():
        for budget, planned in budgets.items():
            assert runs[f"{size}-{budget}-F"]["samples"] == pytest.approx(planned, rel=0.10), (size, budget)
    assert PAPER.budgets == PLAN_BUDGETS


def test_paper_cost_estimate_uses_measured_mfu_where_one_exists_and_says_so(tmp_path):
    """The dry run prices a run at the MFU measured for its model shape on the preset's GPU kind (a
    benchmark file, or a finished run of the sweep), the rest at the assumed one, and says which."""
    import yaml

    from fvlm.experiments.estimate import estimate
    from fvlm.experiments.presets import get_preset
    from fvlm.experiments.runner import Sweep

    preset = get_preset("paper")
    specs = _specs(
        ("a", {"model.llm": "smollm2-135m"}, 1000),
        ("b", {"model.llm": "smollm2-360m"}, 1000),
        ("c", {"model.llm": "smollm2-1.7b"}, 1000),
    )
    sweep = Sweep(tmp_path / "sweep", "test", preset.config, {}, specs, (4, 40))
    bench = tmp_path / "mfu_measured.json"
    bench.write_text(
        json.dumps(
            [
                {"device": "NVIDIA A100-SXM4-80GB", "llm": "smollm2-135m", "arch": "foveated", "mfu": 0.15},
                {"device": "NVIDIA H100 80GB HBM3", "llm": "smollm2-360m", "arch": "foveated", "mfu": 0.9},
            ]
        )
    )  # another GPU kind: not used for the A100 preset
    finished = tmp_path / "sweep" / "c"
    finished.mkdir(parents=True)
    (finished / "config.yaml").write_text(yaml.safe_dump({"model": {"llm": "smollm2-1.7b", "arch": "foveated"}}))
    (finished / "run_summary.json").write_text(
        json.dumps({"throughput": {"device": "NVIDIA A100 80GB PCIe", "mfu": 0.45}})
    )
    assumed = estimate(sweep.planned, preset, 1, measure=False, bench_file=tmp_path / "none.json")
    est = estimate(sweep.planned, preset, 1, measure=False, folders=[tmp_path / "sweep"], bench_file=bench)
    by = {r["run_id"]: r for r in est["rows"]}
    assert by["a"]["mfu"] == 0.15 and "mfu_measured.json" in by["a"]["mfu_source"]
    assert by["b"]["mfu"] == preset.assumed_mfu and by["b"]["mfu_source"] == "assumed"
    assert by["c"]["mfu"] == 0.45 and "run c" in by["c"]["mfu_source"]
    old = {r["run_id"]: r for r in assumed["rows"]}
    assert by["a"]["seconds"] == pytest.approx(old["a"]["seconds"] * preset.assumed_mfu / 0.15)
    assert by["c"]["seconds"] == pytest.approx(old["c"]["seconds"] * preset.assumed_mfu / 0.45)
    assert "2 run(s) at MFU measured" in est["basis"] and "1 run(s) at an assumed 30% MFU" in est["basis"]
    assert "12 run(s)" not in assumed["basis"] and "3 run(s) at an assumed" in assumed["basis"]


def test_phase1_dry_run_lists_both_sweeps(capsys):
    assert main(["phase1", "--dry-run", "--no-measure"]) == 0
    out = capsys.readouterr().out
    assert "phase 1a" in out and "phase 1b" in out and "LR2" in out and "L-C4-B" in out


def test_size_prefixed_overrides_reach_one_size_only(capsys):
    record = _dry(capsys, "sweep", "scaling", "M:optim.lr_llm=1e-5", "seed=3")
    runs = {r["run_id"]: r for r in record["runs"]}
    assert runs["M-C2-F"]["diff"]["optim.lr_llm"] == 1e-5
    assert "optim.lr_llm" not in runs["S-C2-F"]["diff"]
    assert runs["L-C2-F"]["diff"]["optim.lr_llm"] == pytest.approx(TINY.backbone_lr * 0.5)  # the size's own LR
    assert record["base"]["seed"] == 3
    with pytest.raises(UsageError, match="'X' is not a size"):
        matrix.split_overrides(["X:optim.lr_llm=1"], ("S", "M", "L"))
    assert main(["sweep", "ablations", "--dry-run", "--no-measure", "optim.lr_conector=1"]) == 2
    assert "did you mean optim.lr_connector" in capsys.readouterr().err


def test_a_max_samples_override_sets_the_ablation_budget_and_is_refused_by_the_grid(capsys):
    record = _dry(capsys, "sweep", "ablations", "train.max_samples=160")
    assert {r["samples"] for r in record["runs"]} == {160}  # shown in the dry run and applied to every run
    assert "train.max_samples" not in record["base"]
    for argv in (["sweep", "scaling"], ["phase1", "S:train.max_samples=160"]):
        extra = ["train.max_samples=160"] if argv[0] == "sweep" else []
        assert main([*argv, *extra, "--dry-run", "--no-measure"]) == 2
        assert "sizes every cell from its FLOP budget" in capsys.readouterr().err


def test_scale_multiplies_the_ablation_budget_and_the_grid_budgets_into_a_folder_of_its_own(capsys, monkeypatch):
    monkeypatch.delenv("FVLM_OUT", raising=False)
    one, two = _dry(capsys, "phase1"), _dry(capsys, "phase1", "--scale", "2")
    assert (one["out"], two["out"]) == ("runs/phase1-tiny", "runs/phase1-tiny-x2")
    for a, b in zip(one["sweeps"], two["sweeps"]):
        assert b["out"] == a["out"].replace("phase1-tiny", "phase1-tiny-x2")
        assert [r["run_id"] for r in a["runs"]] == [r["run_id"] for r in b["runs"]]
        for ra, rb in zip(a["runs"], b["runs"]):
            # The ablations exactly; a grid cell's samples are its FLOPs over its per-sample FLOPs, rounded
            # to whole steps, so within a step of twice.
            assert abs(rb["samples"] - 2 * ra["samples"]) <= 8, ra["run_id"]
    monkeypatch.setenv("FVLM_OUT", "elsewhere")  # the root of every default folder (scripts/demo.sh's)
    assert _dry(capsys, "phase1", "--scale", "2")["out"] == "elsewhere/phase1-tiny-x2"
    pinned = _dry(capsys, "sweep", "ablations", "--scale", "2", "train.max_samples=160")
    assert {r["samples"] for r in pinned["runs"]} == {160}  # an explicit ablation budget is kept as given
    for bad in ("0", "-1", "nan", "inf"):
        assert main(["phase1", "--scale", bad, "--dry-run", "--no-measure"]) == 2
        assert "--scale must be a number > 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- decisions


def _freeze_sweep(root, offsets):
    samples = np.linspace(200, 2000, 10)
    rng = np.random.default_rng(0)
    knobs = {"F1": {"model.freeze_dino": True, "model.freeze_llm": True}, "F2": {"model.freeze_llm": True}}
    for rid, offset in offsets.items():
        loss = 2.0 + offset + 3 / (samples / 100) ** 0.5 + rng.normal(0, 0.003, len(samples))
        write_run(root, rid, samples, loss, 2e5, 1e8, knobs.get(rid))
    (root / "sweep.csv").write_text("run_id,status\n" + "".join(f"{r},completed\n" for r in offsets))


@pytest.mark.parametrize("f1_offset, expected", [(0.5, "F3"), (0.001, "F1")])
def test_freeze_choice_follows_the_plans_tie_rule(tmp_path, f1_offset, expected):
    _freeze_sweep(tmp_path, {"F1": f1_offset, "F2": 0.3, "F3": 0.0})
    choice = decide.freeze_choice(tmp_path, matrix.ablation_specs(TINY))
    assert choice["analysis_winner"] in ("F3", "F1") and choice["choice"] == expected
    adopted = {"F3": {}, "F1": {"model.freeze_dino": True, "model.freeze_llm": True}}[expected]
    assert choice["adopted"] == adopted
    assert choice["noise"] > 0 and "reason" in choice


# ----------------------------------------------------------------------------- the runner


def _specs(*items):
    return [matrix.RunSpec(rid, "test", rid, diff, samples) for rid, diff, samples in items]


def _csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def _rows(folder):
    with (folder / "sweep.csv").open() as handle:
        return {r["run_id"]: r for r in csv.DictReader(handle)}


def test_resume_skips_finished_runs_and_a_diverging_run_does_not_stop_the_sweep(tmp_path):
    folder = tmp_path / "sweep"
    specs = _specs(
        ("ok1", {}, 16),
        (
            "boom",
            {
                "train.grad_clip": 0,
                "optim.lr_connector": 30,
                "optim.lr_llm": 30,
                "optim.lr_dino": 30,
                "optim.warmup_ratio": 0,
            },
            120,
        ),
        ("ok2", {"model.coarse_only": True}, 16),
    )
    base = {**SMALL, "data.train": "synthetic"}
    Sweep(folder, "test", "tiny", base, specs, (4, 40)).run()
    rows = _rows(folder)
    assert [rows[r]["status"] for r in ("ok1", "boom", "ok2")] == ["completed", "diverged", "completed"]
    assert float(rows["ok1"]["final_val_loss"]) > 0 and rows["ok1"]["total_samples"] == "16"
    state = json.loads((folder / "sweep_state.json").read_text())
    assert state["runs"]["boom"]["status"] == "diverged"

    # An interrupted run (killed before it wrote its summary) resumes; finished ones are not touched.
    finished = {r: (folder / r / "run_summary.json").stat().st_mtime_ns for r in ("ok1", "boom")}
    (folder / "ok2" / "run_summary.json").unlink()
    Sweep(folder, "test", "tiny", base, specs, (4, 40)).run()
    assert {r: (folder / r / "run_summary.json").stat().st_mtime_ns for r in finished} == finished
    assert _rows(folder)["ok2"]["status"] == "completed"
    metrics = (folder / "ok2" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 1 + 2  # resumed from its last checkpoint, not repeated: one row per eval point

    # The same folder with other settings for a finished run is refused before anything runs.
    changed = _specs(("ok1", {"model.deep_query": False}, 16))
    with pytest.raises(UsageError, match="other settings"):
        Sweep(folder, "test", "tiny", base, changed, (4, 40)).run()


def test_mini_sweep_end_to_end_with_two_workers(tmp_path):
    """Three ablation-style runs side by side in worker processes, then analysed as a sweep."""
    from fvlm.analysis.cli import analyze
    from fvlm.experiments.runner import resolve_synthetic

    folder = tmp_path / "mini"
    base = resolve_synthetic("tiny", {**SMALL, "train.eval_every": 1, "train.save_every": 1}, tmp_path)
    assert os.path.isdir(base["data.train"])
    specs = _specs(
        ("F3", {}, 32),
        ("A6", {"model.coarse_only": True}, 32),
        ("B1", {"model.arch": "multi_token", "model.tokens_per_frame": 4}, 32),
        ("F3-again", {}, 32),
    )
    statuses = Sweep(folder, "ablations", "tiny", base, specs, (4, 40), jobs=2).run()
    assert statuses == {"F3": "completed", "A6": "completed", "B1": "completed", "F3-again": "completed"}
    for rid in statuses:
        assert (folder / rid / "train.log").read_text().count("eval step") == 8
    # Two workers trained the four runs; a run trained by a worker after other runs is the run a fresh
    # process trains (nothing leaks from one run into the next: seeds, caches, signal handlers).
    state = json.loads((folder / "sweep_state.json").read_text())["runs"]
    assert len({state[rid]["pid"] for rid in statuses}) == 2
    learned = ("step", "samples_seen", "train_loss", "val_loss", "grad_norm", "attention_entropy")
    first, again = ([[r[k] for k in learned] for r in _csv(folder / rid / "metrics.csv")] for rid in ("F3", "F3-again"))
    assert first == again and len(first) == 8
    shutil.rmtree(folder / "F3-again")
    summary = analyze([str(folder)], tmp_path / "report", None, n_boot=5)
    assert summary["runs"] == 3
    decisions = json.loads((tmp_path / "report" / "decisions.json").read_text())
    two_pass = next(q for q in decisions["questions"] if q["id"] == "two_pass")
    assert set(two_pass["runs"]) == {"F3", "A6"} and two_pass["winner"] in ("F3", "A6")


def test_a_dead_worker_fails_its_own_run_and_the_sweep_goes_on(tmp_path):
    """SIGKILL to one run's worker process (what the out-of-memory killer does): that run is recorded
    as failed with the signal, the run beside it and the one queued after it complete."""
    import multiprocessing
    import signal
    import threading
    import time

    from fvlm.experiments.runner import resolve_synthetic

    folder = tmp_path / "dying"
    base = resolve_synthetic("tiny", {**SMALL, "train.eval_every": 4, "train.save_every": 4}, tmp_path)
    specs = _specs(("victim", {}, 400), ("beside", {"model.coarse_only": True}, 32), ("after", {}, 32))
    killed = []

    def kill_the_victim():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if (folder / "victim" / "checkpoints").is_dir():
                pid = json.loads((folder / "sweep_state.json").read_text())["runs"]["victim"]["pid"]
                if pid in {child.pid for child in multiprocessing.active_children()}:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_victim, daemon=True)
    killer.start()
    statuses = Sweep(folder, "ablations", "tiny", base, specs, (4, 40), jobs=2).run()
    killer.join()
    assert killed, "the victim's worker was never found"
    assert statuses == {"victim": "failed", "beside": "completed", "after": "completed"}
    state = json.loads((folder / "sweep_state.json").read_text())
    assert "SIGKILL" in state["runs"]["victim"]["error"]
    # Re-running the sweep resumes the failed run from its checkpoint and leaves the others alone.
    assert Sweep(folder, "ablations", "tiny", base, specs, (4, 40), jobs=2).run()["victim"] == "completed"


_SWEEP_SCRIPT = """
import json, sys
from fvlm.experiments import matrix
from fvlm.experiments.runner import Sweep, resolve_synthetic
folder, data, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
base = resolve_synthetic("tiny", overrides, data)
specs = [matrix.RunSpec(r, "test", r, {}, 4000) for r in ("one", "two")]
Sweep(folder, "ablations", "tiny", base, specs, (4, 40), jobs=2).run()
"""


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                for child in open(f"/proc/{p}/task/{task}/children").read().split():
                    found.add(int(child))
                    todo.append(int(child))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_killing_the_sweep_process_stops_its_workers_with_a_checkpoint(tmp_path):
    """SIGKILL to the sweep process itself (a closed terminal, a killed job): no worker outlives it to
    keep writing into a run folder that a re-run would resume; each stops after a checkpoint."""
    import subprocess
    import sys
    import time

    overrides = json.dumps({**SMALL, "train.eval_every": 4, "train.save_every": 4})
    folder = tmp_path / "sweep"
    sweep = subprocess.Popen([sys.executable, "-c", _SWEEP_SCRIPT, str(folder), str(tmp_path), overrides])
    deadline = time.time() + 240
    while time.time() < deadline and not all((folder / r / "checkpoints").is_dir() for r in ("one", "two")):
        assert sweep.poll() is None, "the sweep process ended before its runs checkpointed"
        time.sleep(0.1)
    workers = _descendants(sweep.pid)
    assert workers, "the sweep started no worker"
    sweep.kill()
    sweep.wait()
    deadline = time.time() + 60
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)], "a worker outlived the sweep"
    for run in ("one", "two"):
        assert (
            "SIGTERM received; stopping after this step with a checkpoint" in (folder / run / "train.log").read_text()
        )


def _alive(pid: int) -> bool:
    """Whether a process is running: False once it is gone or has exited unreaped (a zombie)."""
    with contextlib.suppress(OSError):
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def test_slurm_launcher_through_submitits_local_executor_matches_the_local_launcher(tmp_path):
    """A 3-run micro sweep as SLURM jobs (submitit's local executor runs the same code path on this
    machine). One job is interrupted as SLURM interrupts a preempted or timed-out job (SIGUSR2): it
    checkpoints, is requeued and resumes. Every run ends as it does under the local launcher."""
    import signal
    import threading
    import time
    from pathlib import Path

    from fvlm.experiments.runner import resolve_synthetic
    from fvlm.experiments.slurm import SlurmSettings

    base = resolve_synthetic("tiny", {**SMALL, "train.eval_every": 4, "train.save_every": 2}, tmp_path)
    specs = _specs(
        ("F3", {}, 48),
        ("A6", {"model.coarse_only": True}, 24),
        ("B1", {"model.arch": "multi_token", "model.tokens_per_frame": 4}, 24),
    )
    local = Sweep(tmp_path / "local", "ablations", "tiny", base, specs, (4, 40)).run()
    sweep = Sweep(
        tmp_path / "slurm",
        "ablations",
        "tiny",
        base,
        specs,
        (4, 40),
        slurm=SlurmSettings(cluster="local", poll_sec=0.5, time_min=30),
    )
    interrupted = []

    def preempt_f3():
        deadline = time.time() + 300
        while time.time() < deadline:
            job = sweep.slurm_jobs.get("F3")
            if job is not None and (tmp_path / "slurm" / "F3" / "checkpoints" / "step_0000002" / "meta.json").is_file():
                # SIGUSR2 to the job's task, as SLURM sends it ahead of preemption or the time limit
                # (the local executor's own controller does not pass it on).
                controller = job._process.pid
                for task in Path(f"/proc/{controller}/task/{controller}/children").read_text().split():
                    os.kill(int(task), signal.SIGUSR2)
                    interrupted.append(task)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=preempt_f3, daemon=True)
    thread.start()
    statuses = sweep.run()
    thread.join()
    assert interrupted, "F3's job was never interrupted"
    assert statuses == local == {"F3": "completed", "A6": "completed", "B1": "completed"}
    log = (tmp_path / "slurm" / "F3" / "train.log").read_text()
    assert "resuming at step" in log  # the requeued job resumed from the checkpoint
    for rid in statuses:
        ours = json.loads((tmp_path / "slurm" / rid / "run_summary.json").read_text())
        theirs = json.loads((tmp_path / "local" / rid / "run_summary.json").read_text())
        assert ours["total_samples"] == theirs["total_samples"]
        assert ours["best_val_loss"] == pytest.approx(theirs["best_val_loss"], abs=1e-6)
        assert ours["final"]["val_loss"] == pytest.approx(theirs["final"]["val_loss"], abs=1e-6)
    state = json.loads((tmp_path / "slurm" / "sweep_state.json").read_text())
    assert all(state["runs"][rid]["job_id"] for rid in statuses)
    # Re-running submits nothing: every run is finished.
    again = Sweep(
        tmp_path / "slurm",
        "ablations",
        "tiny",
        base,
        specs,
        (4, 40),
        slurm=SlurmSettings(cluster="local", poll_sec=0.5),
    )
    assert again.run() == statuses and again.slurm_jobs == {}


def test_workers_start_the_longest_runs_first(tmp_path):
    """Side by side, the runs start by planned FLOPs, largest first (a long run started last would
    leave the other cores idle at the sweep's end); equal ones keep the plan's order."""
    from fvlm.experiments.runner import longest_first

    specs = _specs(
        ("short", {}, 16),
        ("long", {}, 64),
        ("B1", {"model.arch": "multi_token", "model.tokens_per_frame": 16}, 32),
        ("mid", {}, 32),
        ("mid-too", {}, 32),
    )
    sweep = Sweep(tmp_path / "order", "test", "tiny", dict(SMALL), specs, (4, 40), jobs=2)
    assert [p.spec.run_id for p in longest_first(sweep.planned)] == ["long", "B1", "mid", "mid-too", "short"]


def test_kept_workers_train_the_next_sweep_and_exit_with_the_phase(tmp_path):
    """Inside keep_workers() (as `fvlm phase1` runs its sweeps) the second sweep's runs are trained by
    the first sweep's worker processes, and those exit when it ends; outside it each sweep's own
    workers exit with the sweep."""
    import multiprocessing

    from fvlm.experiments.runner import keep_workers, resolve_synthetic

    base = resolve_synthetic("tiny", dict(SMALL), tmp_path)

    def pids(folder):
        return {r["pid"] for r in json.loads((folder / "sweep_state.json").read_text())["runs"].values()}

    with keep_workers():
        Sweep(tmp_path / "one", "ablations", "tiny", base, _specs(("a", {}, 8), ("b", {}, 8)), (4, 40), jobs=2).run()
        first = pids(tmp_path / "one")
        assert len(first) == 2 and first <= {p.pid for p in multiprocessing.active_children()}
        Sweep(tmp_path / "two", "scaling", "tiny", base, _specs(("c", {}, 8), ("d", {}, 8)), (4, 40), jobs=2).run()
        assert pids(tmp_path / "two") <= first
    assert not first & {p.pid for p in multiprocessing.active_children()}
    Sweep(tmp_path / "three", "ablations", "tiny", base, _specs(("e", {}, 8)), (4, 40), jobs=2).run()
    assert not pids(tmp_path / "three") & first and not multiprocessing.active_children()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the signal mask from /proc")
def test_an_idle_worker_outlives_a_late_sigterm_and_exits_when_closed():
    """On Ctrl-C the sweep forwards SIGTERM to its busy workers; one whose run already stopped on the
    terminal's SIGINT gets it between runs. That must not kill it (it was about to report its run
    as interrupted: killed, the run was reported failed with no summary); it exits when closed."""
    import multiprocessing
    import signal
    import time

    from fvlm.experiments.runner import _Worker

    worker = _Worker(multiprocessing.get_context("spawn"))
    deadline = time.time() + 60
    ignored = 0
    while time.time() < deadline and not ignored >> (signal.SIGTERM - 1) & 1:  # until _worker_init ran
        status = open(f"/proc/{worker.proc.pid}/status").read()
        ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
        time.sleep(0.05)
    os.kill(worker.proc.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert worker.proc.is_alive()
    began = time.time()
    worker.close()
    assert worker.proc.exitcode == 0 and time.time() - began < 30


@pytest.mark.parametrize(("behind", "locked"), [(1.1, "LR4"), (2.0, "LR4"), (3.0, "LR3")])
def test_the_plans_tie_rule_gives_way_only_to_a_clear_winner(monkeypatch, behind, locked):
    """LR4 (uniform) is kept unless LR3 is clearly ahead of it, by the verdicts' own multiple of the
    noise: at one noise the lock flipped between two runs of the same seeds on two CPUs."""
    from types import SimpleNamespace

    noise = 0.01
    rows = [
        {"run": SimpleNamespace(run_id=rid), "smoothed": value, "noise": noise}
        for rid, value in (("LR3", 0.10), ("LR4", 0.10 + behind * noise * 2**0.5), ("F3", 0.2))
    ]
    result = {"winner": "LR3", "runs": ["F3", "LR3", "LR4"], "unstable": {}, "rows": rows, "quantile": 2.3}
    result.update(common_x=6000.0, margin=0.005, noise=noise, verdict="within noise")
    monkeypatch.setattr(decide.ablations, "answer", lambda question, table: result)
    specs = {s.run_id: s for s in matrix.ablation_specs(TINY, "F3")}
    choice = decide.choose("learning_rate", None, specs)  # type: ignore[arg-type]
    assert choice["choice"] == locked
    assert choice["adopted"] == {"optim.lr_connector": specs[locked].diff["optim.lr_connector"]}
