"""`fvlm phase1` end to end on a micro version of the tiny preset: 12 ablation runs, the locked
config, F3 in three modes, the 28-run grid, the report with its figures; a re-run does nothing."""

from __future__ import annotations

import csv
import dataclasses
import json

import yaml
from conftest import MICRO_DATA, QUICK_RECIPE

from fvlm.experiments.phase1 import run_phase1
from fvlm.experiments.presets import TINY

# 50 resamples (the presets' 2,000 would triple the analysis time) and a small evidence sample: the
# plumbing, not the intervals.
MICRO = dataclasses.replace(
    TINY,
    ablation_samples=24,
    ablation_evals=6,
    tiny_backbones=QUICK_RECIPE,
    analysis_bootstrap=50,
    budgets={k: v * 0.01 for k, v in TINY.budgets.items()},
    evidence={"max_samples": 16, "max_questions": 40, "probe_videos": 2, "n_boot": 200},
    ablation_replicates={"F3": 1},
    grid_replicates=1,
)
DATA = {**MICRO_DATA, "data.max_text_tokens": 200}


def _statuses(path):
    with path.open() as handle:
        return {row["run_id"]: row["status"] for row in csv.DictReader(handle)}


def test_phase1_end_to_end_and_rerun_resumes(tmp_path):
    root = tmp_path / "phase1"
    summary = run_phase1(MICRO, root, dict(DATA), {}, jobs=1)

    ablations = _statuses(root / "ablations" / "sweep.csv")
    assert set(ablations) >= {"F1", "F2", "F3", "A1", "A6", "B1", "A8a", "A8b", "D1"}
    assert set(ablations.values()) <= {"completed", "diverged"}
    scaling = _statuses(root / "scaling" / "sweep.csv")
    # The 28 cells, and one seed replicate of both arms of each size at the smallest and the largest budget.
    assert len(scaling) == 28 + 12 and set(scaling.values()) == {"completed"}
    assert {"S-C4-F.s1", "S-C4-B.s1", "L-C4-F.s1", "L-C1-B.s1"} <= set(scaling) and "F3.s1" in ablations

    locked = json.loads((root / "ablations" / "locked_config.json").read_text())
    assert [c["question"] for c in locked["choices"]] == ["freeze", "learning_rate", "image_handling", "data_mix"]
    # The grid was trained with the locked overrides.
    config = yaml.safe_load((root / "scaling" / "S-C2-F" / "config.yaml").read_text())
    for key, value in locked["overrides"].items():
        section, name = key.split(".")
        assert config[section][name] == value

    # Every run trained on the backbones pretrained under <root>/backbones, each size on its own LLM.
    backbones = next((root / "backbones").glob("tiny-backbones-*"))
    for run, llm in (("ablations/F3", "tiny-llm"), ("scaling/M-C2-F", "tiny-llm-m"), ("scaling/L-C4-B", "tiny-llm-l")):
        model = yaml.safe_load((root / run / "config.yaml").read_text())["model"]
        assert (model["llm"], model["dino"]) == (str(backbones / llm), str(backbones / "tiny-dino")), run

    decisions = json.loads((root / "decisions.json").read_text())
    assert "foveation_evidence" in decisions and "## Foveation evidence" in (root / "report" / "report.md").read_text()
    # The replicates measured the training noise, and the report says what each replicate answered.
    replication = decisions["replication"]
    assert {"ablation", "S-C1", "S-C4", "M-C4", "L-C1", "L-C4"} <= set(replication["floors"])
    assert set(replication["cells"]) == {f"{s}-{c}-F" for s in "SML" for c in ("C1", "C4")}
    assert "## Replication" in (root / "report" / "report.md").read_text()
    assert decisions["foveation_evidence"]["replicates"]["reads"]["F3"]["of"] == 2
    assert {q["id"] for q in decisions["questions"]} >= {"freeze", "two_pass", "efficiency"}
    assert decisions["locked_config"] == locked
    assert len(decisions["go_no_go"]) == 6
    report = root / "report"
    assert "Locked configuration (fvlm phase1)" in (report / "report.md").read_text()
    for figure in (
        "fig1_foveated_vs_alternatives",
        "fig2_loss_ratio",
        "fig5_freeze",
        "fig7_eval_modes",
        "fig8_scaling",
        "scaling_isoflop",
        "scaling_foveated_vs_baseline",
    ):
        assert (report / f"{figure}.png").is_file(), figure
    assert (root / "ablations" / "F3" / "eval" / "eval.json").is_file()
    assert summary["figures"] >= 10

    finished = {p: p.stat().st_mtime_ns for p in root.glob("*/*/run_summary.json")}
    run_phase1(MICRO, root, dict(DATA), {}, jobs=1)
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/*/run_summary.json")} == finished
