"""Training noise from seed replicates (fvlm.analysis.noise), the verdicts that use it, and Phase 1
outputs set side by side (fvlm.analysis.side_by_side)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from fvlm.analysis import noise
from fvlm.analysis.side_by_side import side_by_side
from fvlm.cli import main
from fvlm.experiments import matrix
from fvlm.experiments.presets import PAPER, TINY


def _replicated_model(sd: float, groups: int, per_group: int, seed: int = 0) -> noise.NoiseModel:
    """Fabricated replicate runs: `groups` configs at the ablation budget, each trained `per_group`
    times, whose val loss scatters around its own mean by `sd`."""
    rng = np.random.default_rng(seed)
    model = noise.NoiseModel()
    for g in range(groups):
        mean = 1.0 + 0.3 * g  # configs differ a lot: only the spread within each must count
        for k in range(per_group):
            model.add("val_loss", matrix.replicate_id(f"A{g + 1}", k) if k else f"A{g + 1}", mean + rng.normal(0, sd))
    return model


def test_the_noise_model_recovers_a_known_seed_spread_within_its_interval():
    hits = 0
    for seed in range(40):
        floor = _replicated_model(0.02, groups=4, per_group=3, seed=seed).floor("val_loss", "A1")
        assert floor is not None and floor.df == 4 * 2
        lo, hi = floor.ci95
        hits += lo <= 0.02 <= hi
    # A 95% interval: about 38 of 40 cover the truth; far fewer would mean a biased or too narrow one.
    assert hits >= 34, hits
    big = _replicated_model(0.02, groups=50, per_group=3).floor("val_loss", "A1")
    assert big is not None and big.sd == pytest.approx(0.02, rel=0.15)


def test_a_cell_without_replicates_uses_its_sizes_then_the_pooled_floor():
    model = noise.NoiseModel()
    for rid, value in (("S-C4-F", 0.10), ("S-C4-F.s1", 0.12), ("F3", 0.5), ("F3.s1", 0.54)):
        model.add("val_loss", rid, value)
    own = model.floor("val_loss", "S-C4-B.s1")  # place S-C4 has replicates (of S-C4-F)
    assert own is not None and own.source.startswith("seed replicates at S-C4")
    size = model.floor("val_loss", "S-C2-F")  # no replicates at S-C2: the size's
    assert size is not None and "size S" in size.source and size.sd == pytest.approx(own.sd)
    pooled = model.floor("val_loss", "M-C3-F")  # none at size M: every group's
    assert pooled is not None and "every replicate group" in pooled.source and pooled.df == 2
    assert model.floor("pixel_gain", "F3") is None  # nothing measured it


def test_a_cell_between_replicated_budgets_takes_the_larger_floor_around_it():
    """Early in training seeds scatter far more: a cell between the replicated C1 and C4 takes C1's
    floor if larger, whichever side it is on; below or above every replicated budget, the nearest."""
    model = noise.NoiseModel()
    for rid, value in (("L-C1-F", 0.40), ("L-C1-F.s1", 0.60), ("L-C4-F", 0.10), ("L-C4-F.s1", 0.11)):
        model.add("val_loss", rid, value)
    early, late = model.floor("val_loss", "L-C1-B"), model.floor("val_loss", "L-C4-B")
    assert early is not None and late is not None and early.sd > 10 * late.sd
    for cell in ("L-C2-F", "L-C3-B"):
        between = model.floor("val_loss", cell)
        assert between is not None and between.sd == pytest.approx(early.sd)
        assert "L-C1 and L-C4" in between.source and "L-C1's" in between.source
    model.add("val_loss", "L-C2-F", 0.3)
    model.add("val_loss", "L-C2-F.s1", 0.301)  # C2 measured small: C3 now sits between C2 and C4
    c3 = model.floor("val_loss", "L-C3-F")
    assert c3 is not None and c3.sd == pytest.approx(late.sd) and "L-C2 and L-C4" in c3.source


def test_a_margin_inside_seed_noise_is_within_training_noise():
    floor = noise.Floor(sd=0.01, df=4, groups=["F3"], source="test")
    # The evaluation alone decides (0.012 against a s.e. of 0.002) ...
    inside = noise.judge(0.012, 0.002, [floor, floor])
    assert inside["eval_verdict"] == "yes"
    # ... two training runs' spread (0.01 each) does not.
    assert inside["verdict"] == "within training noise" and inside["ci95"][0] < 0 < inside["ci95"][1]
    outside = noise.judge(0.2, 0.002, [floor, floor])
    assert outside["verdict"] == "yes" and not outside["provisional"]
    unmeasured = noise.judge(0.012, 0.002, [None, None])
    assert unmeasured["verdict"] == "yes" and unmeasured["provisional"]
    assert unmeasured["training_noise"] == "not measured"


def test_replicates_change_only_the_seed_and_the_offset_moves_every_seed():
    specs = matrix.ablation_specs(TINY)
    reps = matrix.replicate_specs(specs, {"F3": 2}, seed=0, offset=0)
    assert [r.run_id for r in reps] == ["F3.s1", "F3.s2"]
    f3 = next(s for s in specs if s.run_id == "F3")
    assert all({k: v for k, v in r.diff.items() if k != "seed"} == f3.diff for r in reps)
    assert matrix.replicate_of("F3.s2") == ("F3", 2) and matrix.replicate_of("S-C4-B") == ("S-C4-B", 0)
    shifted = matrix.replicate_specs(matrix.seeded(specs, 0, 1), {"F3": 2}, seed=0, offset=1)
    assert {r.diff["seed"] for r in reps}.isdisjoint(r.diff["seed"] for r in shifted)
    assert matrix.seeded(specs, 0, 0) == specs  # offset 0 leaves every run's settings (and folder) as it was


def test_the_paper_dry_run_lists_and_prices_the_replicates(capsys):
    assert main(["phase1", "--preset", "paper", "--dry-run", "--no-measure", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    ablations, grid = record["sweeps"]
    assert [r["run_id"] for r in ablations["runs"] if "replicate_of" in r] == [
        f"{rid}.s1" for rid in PAPER.ablation_replicates
    ]
    assert len([r for r in grid["runs"] if "replicate_of" in r]) == 2 * len(PAPER.sizes) * len(PAPER.replicate_budgets)
    hours = [s["estimate"]["replicates"]["gpu_hours"] for s in record["sweeps"]]
    total = sum(s["estimate"]["gpu_hours"] for s in record["sweeps"])
    assert 0.15 < sum(hours) / (total - sum(hours)) < 0.35  # about a quarter of the plan's


def test_replicates_zero_removes_them(capsys):
    assert main(["sweep", "ablations", "--dry-run", "--no-measure", "--json", "--replicates", "0"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert not [r for r in record["runs"] if "replicate_of" in r]
    assert main(["sweep", "ablations", "--dry-run", "--no-measure", "--replicates", "-1"]) == 2


def _decisions() -> dict:
    return {
        "questions": [
            {"id": "two_pass", "winner": "A6", "verdict": "clear (margin > 2x noise)"},
            {"id": "freeze", "winner": "F3", "verdict": "within training noise (...)"},
        ],
        "go_no_go": [{"criterion": "No divergence", "status": "pass"}],
        "foveated_vs_baseline": {
            "cells": [
                {
                    "foveated": "M-C3-F",
                    "same_data": {"verdict": "foveated ahead", "advantage": 0.02},
                    "same_flops_bound": "foveated ahead at equal FLOPs: ...",
                }
            ],
            "scaling": {"verdict": "flat"},
        },
    }


def test_side_by_side_counts_a_planted_contradiction_and_not_a_noise_difference(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    first = _decisions()
    (a / "decisions.json").write_text(json.dumps(first))
    second = copy.deepcopy(first)
    second["questions"][0]["winner"] = "F3"  # clear both times, opposite winners: a contradiction
    second["questions"][1]["verdict"] = "clear (margin > 2x noise)"  # ahead vs within noise: allowed
    second["foveated_vs_baseline"]["cells"][0]["same_data"] = {"verdict": "within noise", "advantage": -0.01}
    (b / "decisions.json").write_text(json.dumps(second))
    result = side_by_side([a, b])
    status = {r["item"]: r["status"] for r in result["rows"]}
    assert result["contradictions"] == 1 and status["decision 1: two_pass"] == "contradiction"
    assert status["decision 1: freeze"] == "claim against no claim"
    assert status["cell M-C3-F: same samples"] == "claim against no claim"
    assert side_by_side([a, a])["contradictions"] == 0
    assert main(["analyze", "--side-by-side", str(a), str(b)]) == 0
    assert main(["analyze", "--side-by-side", str(a), str(tmp_path / "none")]) == 2
