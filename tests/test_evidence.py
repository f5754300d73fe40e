"""Foveation evidence (fvlm.experiments.evidence): the paired-difference statistics, and the whole
measurement on tiny trained runs laid out as phase1 lays them out (pixel check, benchmark with the
grey-frame control, paired comparisons, attention on the mover, evidence.json, the report section)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from fvlm.cli import main
from fvlm.data.synth import generate_synthetic
from fvlm.experiments.evidence import (
    EVIDENCE_FILE,
    PRIMARY,
    STATIC_TRAINED,
    EvidenceSettings,
    Target,
    _evaluate_all,
    bench_gain,
    collect_evidence,
    compare,
    conclusion,
    evidence_markdown,
    grid_reading,
    paired_difference,
    reads,
    verdict,
)

# ----------------------------------------------------------------------------- statistics


def test_paired_difference_of_anything_with_itself_is_exactly_zero():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2, 150)
    r = paired_difference(x, x, n_boot=300)
    assert r["diff"] == 0 and r["se"] == 0 and r["ci95"] == [0, 0] and r["ci95_bootstrap"] == [0, 0]
    w = rng.integers(1, 9, 150)
    r = paired_difference(rng.normal(size=150), np.zeros(150) + 0.0, w)
    assert r["n"] == 150 and r["ci95"][0] < r["diff"] < r["ci95"][1]


def test_paired_difference_analytic_interval_agrees_with_the_paired_bootstrap():
    rng = np.random.default_rng(0)
    n = 600
    # Correlated 0/1 outcomes on the same questions: b right mostly where a is right.
    a = (rng.random(n) < 0.55).astype(int)
    b = np.where(rng.random(n) < 0.8, a, (rng.random(n) < 0.45).astype(int))
    r = paired_difference(a, b, n_boot=4000, seed=3)
    d = a - b
    assert r["diff"] == pytest.approx(d.mean()) and r["a"] == pytest.approx(a.mean())
    assert r["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(n))
    assert np.allclose(r["ci95"], r["ci95_bootstrap"], atol=0.1 * (r["ci95"][1] - r["ci95"][0])), r
    # Per-sample losses weighted by answer tokens: the token-weighted difference and its interval.
    tokens = rng.integers(1, 12, n)
    la = rng.normal(2.0, 0.5, n)
    lb = la + rng.normal(0.03, 0.2, n)
    r = paired_difference(lb, la, tokens, n_boot=4000, seed=4)
    assert r["diff"] == pytest.approx(((lb - la) * tokens).sum() / tokens.sum())
    assert np.allclose(r["ci95"], r["ci95_bootstrap"], atol=0.1 * (r["ci95"][1] - r["ci95"][0])), r
    # Seeded: the same call gives the same bootstrap interval.
    again = [paired_difference(lb, la, tokens, n_boot=500, seed=4) for _ in range(2)]
    assert again[0] == again[1]


def test_verdict_reads_the_interval():
    assert verdict([0.01, 0.2]) == "yes"
    assert verdict([-0.2, -0.01]) == "no"
    assert verdict([-0.1, 0.1]) == verdict([0.0, 0.1]) == "not distinguishable"
    assert verdict([float("nan"), float("nan")]) == "not distinguishable"


# ----------------------------------------------------------------------------- end to end

SMALL = [
    "data.max_frames=4",
    "data.max_text_tokens=96",
    "model.image_size=32",
    "train.batch_size=4",
    "train.eval_batch_size=8",
    "train.eval_samples=8",
    "train.probe_videos=2",
    "train.max_steps=3",
    "train.eval_every=3",
    "train.save_every=3",
]
SETTINGS = EvidenceSettings(max_samples=16, max_questions=40, probe_videos=4, batch_size=8, n_boot=300)


@pytest.fixture(scope="module")
def phase1(tmp_path_factory):
    """ablations/ {F3, A6, B1, A1 (its model file broken)} and scaling/ {S-C2-F, S-C4-F, S-C4-B}, a few
    steps each on one small synthetic set (with its bench split of 40 questions)."""
    root = tmp_path_factory.mktemp("phase1")
    data = root / "data"
    generate_synthetic(data, videos=24, images=8, texts=8, frames=4, size=32, seed=0, val=16, probe=4, bench=40)
    paths = [f"data.{s}={data / s}" for s in ("train", "val", "probe")]
    runs = {
        "ablations": {
            "F3": [],
            "A6": ["model.coarse_only=true"],
            "A1": ["model.deep_query=false"],
            "B1": ["model.arch=multi_token", "model.tokens_per_frame=4"],
        },
        "scaling": {"S-C2-F": [], "S-C4-F": [], "S-C4-B": ["model.arch=multi_token", "model.tokens_per_frame=4"]},
    }
    for sweep, ids in runs.items():
        for rid, extra in ids.items():
            assert main(["train", "tiny", f"out_dir={root / sweep}", f"run_id={rid}", *paths, *SMALL, *extra]) == 0
    broken = sorted((root / "ablations" / "A1" / "checkpoints").glob("step_*"))[-1] / "model.safetensors"
    broken.write_bytes(b"not a model")
    lines: list[str] = []
    evidence = collect_evidence(root, root / "ablations", root / "scaling", SETTINGS, log=lines.append)
    return {"root": root, "data": data, "evidence": evidence, "log": lines}


def test_every_target_run_is_measured_or_says_why(phase1):
    ev = phase1["evidence"]
    runs = ev["runs"]
    assert ev["grid_cells"] == ["S-C4-F", "S-C4-B"]  # the largest budget only, F before B
    assert {r for r, e in runs.items() if e["status"] == "ok"} == {"F3", "A6", "B1", "S-C4-F", "S-C4-B"}
    assert runs["A1"]["status"] == "failed" and runs["A1"]["error"]  # recorded, not fatal
    assert runs["F1"]["status"] == "not evaluated" and runs["F1"]["reason"] == "run missing"
    assert runs["F3"]["modes"] == ["coarse_only", "coarse_fine", "autoregressive"]
    assert runs["A6"]["modes"] == runs["B1"]["modes"] == ["coarse_only"]
    for rid in ("F3", "A6", "B1", "S-C4-F", "S-C4-B"):
        for r in runs[rid]["pixel"].values():
            assert r["n"] == 16 and r["tokens"] > 0
            assert r["pixel_gain"] == pytest.approx(r["loss_blank_frames"] - r["loss"])
            assert r["se"] > 0 and r["ci95"][0] < r["pixel_gain"] < r["ci95"][1]
            assert r["above_noise"] == (r["ci95"][0] > 0)
    assert (phase1["root"] / EVIDENCE_FILE).is_file()
    assert json.loads((phase1["root"] / EVIDENCE_FILE).read_text())["conclusion"] == ev["conclusion"]


def test_pixel_check_uses_the_answer_tokens_only(phase1):
    """The same numbers as mode_losses over a stage-2 loader: the answer-only loss masks."""
    from fvlm.data.loader import build_loader
    from fvlm.eval.evaluate import find_checkpoints, mode_losses, run_config
    from fvlm.model.build import load_model

    ckpt = find_checkpoints(phase1["root"] / "ablations" / "F3")[-1]
    model, tok = load_model(ckpt.folder)
    cfg = run_config(ckpt, model.cfg, [])
    cfg.train.stage = 2
    batches = list(build_loader(cfg, "val", tok, train=False, batch_size=8, max_samples=16))
    every = sum(int(b["attention_mask"].sum()) for b in batches)
    answer = sum(int(b["loss_mask"].sum()) for b in batches)
    assert 0 < answer < every / 2  # the answers, not the prompts and template around them
    expected = mode_losses(model.eval(), batches, ("coarse_fine",))["coarse_fine"]
    got = phase1["evidence"]["runs"]["F3"]["pixel"]["coarse_fine"]
    assert got["tokens"] == expected["tokens"] <= answer
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert got["loss_blank_frames"] == pytest.approx(expected["loss_blank_frames"], rel=1e-6)


def test_benchmark_has_per_question_outcomes_and_the_grey_control(phase1):
    runs = phase1["evidence"]["runs"]
    assert set(runs["F3"]["bench"]["modes"]) == {"coarse_only", "coarse_fine"}
    assert set(runs["B1"]["bench"]["modes"]) == {"coarse_only"}
    assert set(runs["S-C4-F"]["bench"]["modes"]) == {"coarse_fine"}
    assert runs["D1"].get("bench") is None
    for rid in ("F3", "A6", "B1", "S-C4-F", "S-C4-B"):
        for r in runs[rid]["bench"]["modes"].values():
            assert r["n"] == 40 and len(r["correct"]) == 40 and set(r["correct"]) <= {0, 1}
            assert r["accuracy"] == pytest.approx(np.mean(r["correct"]))
            grey = r["grey_frames"]
            assert grey["n"] == 40 and 0 <= grey["accuracy"] <= 1 and len(grey["correct"]) == 40
            assert grey["ci95"][0] <= grey["accuracy"] <= grey["ci95"][1]


def test_paired_comparisons(phase1):
    ev = phase1["evidence"]
    runs = ev["runs"]
    itself = compare(runs, ("F3", None), ("F3", None), SETTINGS)
    for kind in ("accuracy", "answer_loss"):
        assert itself[kind]["diff"] == 0 and itself[kind]["ci95"] == [0, 0] and itself[kind]["ci95_bootstrap"] == [0, 0]
        assert itself[kind]["verdict"] == "not distinguishable"
    by_label = {p["label"].split(" (")[0]: p for p in ev["comparisons"]}
    fine = by_label["F3 fine query vs F3 static query"]
    assert fine["first"] == {"run": "F3", "mode": "coarse_fine"}
    assert fine["second"] == {"run": "F3", "mode": "coarse_only"}
    f3 = runs["F3"]["bench"]["modes"]
    assert fine["accuracy"]["diff"] == pytest.approx(f3["coarse_fine"]["accuracy"] - f3["coarse_only"]["accuracy"])
    pixel = runs["F3"]["pixel"]
    assert fine["answer_loss"]["diff"] == pytest.approx(
        pixel["coarse_only"]["loss"] - pixel["coarse_fine"]["loss"], abs=1e-5
    )
    assert by_label["F3 vs A6"]["second"] == {"run": "A6", "mode": "coarse_only"}
    assert by_label["F3 vs A1"]["accuracy"] is None and "A1" in by_label["F3 vs A1"]["note"]
    assert "S-C4-F vs S-C4-B" in by_label
    assert ev["conclusion"]["answer"] in ("yes", "no", "not distinguishable")
    assert ev["conclusion"]["answer"] == fine["accuracy"]["verdict"]


def test_attention_on_the_mover_against_uniform(phase1):
    """The uniform share per frame is the mover's share of the patches (from the boxes the synthetic
    videos carry), recomputed here."""
    from fvlm.data.loader import build_loader
    from fvlm.eval.evaluate import find_checkpoints, run_config
    from fvlm.eval.looks import mover_patches, to_uint8
    from fvlm.model.build import load_model

    attention = phase1["evidence"]["attention"]
    assert set(attention) == {"F3", "A6"}  # A1's model is broken, B1 has no query
    f3 = attention["F3"]
    assert f3["videos"] == 4 and f3["has_fine"] and not attention["A6"]["has_fine"] and f3["frames"]
    ckpt = find_checkpoints(phase1["root"] / "ablations" / "F3")[-1]
    model, tok = load_model(ckpt.folder)
    cfg = run_config(ckpt, model.cfg, [])
    batch = next(iter(build_loader(cfg, "probe", tok, train=False, batch_size=4, max_samples=4)))
    frames, mask = to_uint8(batch["frames"]), batch["frame_mask"].numpy()
    grid = (32 // model.encoder.patch_size,) * 2
    areas: dict[int, list[float]] = {}
    assert all(batch["mover_boxes"])
    for v in range(len(frames)):
        ids = np.flatnonzero(mask[v])
        boxes = np.asarray(batch["mover_boxes"][v])[ids]
        for t, mover in zip(ids, mover_patches(frames[v, ids], grid, boxes=boxes)):
            if mover.any():
                areas.setdefault(int(t), []).append(float(mover.mean()))
    assert [f["t"] for f in f3["frames"]] == sorted(areas)
    for f in f3["frames"]:
        assert f["uniform"] == pytest.approx(np.mean(areas[f["t"]]))
        assert f["videos"] == len(areas[f["t"]])
        assert 0 <= f["fine"] <= 1 and 0 <= f["static"] <= 1
    assert attention["A6"]["frames"][0]["fine"] is None


def test_report_section_and_decisions(phase1):
    from fvlm.experiments.phase1 import READING_QUESTION, write_report
    from fvlm.experiments.presets import TINY

    root = phase1["root"]
    write_report(
        TINY,
        root,
        root / "ablations",
        root / "scaling",
        root / "report",
        {"overrides": {}, "choices": []},
        phase1["evidence"],
    )
    report = (root / "report" / "report.md").read_text()
    section = report[report.index("## Foveation evidence") :]
    conclusion = phase1["evidence"]["conclusion"]
    assert f"**{conclusion['sentence']}**" in section and conclusion["details"] in section
    assert conclusion["sentence"].startswith(("Yes, ", "No, ", "Not distinguishable: "))
    assert conclusion["sentence"].count(". ") == 0  # one sentence; the details follow it
    for heading in ("### Pixel check", "### Multiple choice", "### Paired differences", "### Attention on the moving"):
        assert heading in section
    assert "| F3 | autoregressive |" in section and "| S-C4-B | coarse_only |" in section
    assert "A1 (" in section.split("Not measured:")[1]
    assert evidence_markdown(phase1["evidence"]).strip() in report
    decisions = json.loads((root / "decisions.json").read_text())["foveation_evidence"]
    assert decisions["answer"] == phase1["evidence"]["conclusion"]["answer"]
    assert decisions["runs"]["F3"] == "ok" and decisions["runs"]["A1"].startswith("failed")
    assert "correct" not in json.dumps(decisions["benchmark"])
    grid = grid_reading(phase1["evidence"])
    assert set(grid["reads_pixels"]) == {"S-C4-F", "S-C4-B"} and grid["sentence"] in section
    assert decisions["grid_reading"] == grid
    # Decision 2 carries it too: its scaling answers mean something only where the cells look.
    decision2 = report[report.index("## Decision 2") : report.index("## Foveated vs multi-token")]
    assert f"| {READING_QUESTION} | {grid['sentence']} |" in decision2
    assert json.loads((root / "decisions.json").read_text())["decision2"][-1]["answer"] == grid["sentence"]


def test_grid_cells_that_do_not_read_are_named_with_what_that_means():
    def cell(*gains):
        """Pixel rows with these gains on a grey-frame loss of 0.2; the interval excludes 0 for any gain > 0."""
        modes = ("coarse_only", "coarse_fine")
        rows = {m: {"above_noise": g > 0, "pixel_gain": g, "loss_blank_frames": 0.2} for m, g in zip(modes, gains)}
        return {"pixel": rows}

    evidence = {
        "grid_cells": ["S-C4-F", "S-C4-B", "M-C4-F", "M-C4-B", "L-C4-F", "L-C4-B"],
        "runs": {
            "S-C4-F": cell(0.1, 0.1),
            "S-C4-B": cell(0.1),
            "M-C4-F": cell(0.1, 0.0),
            # Above noise but 0.2% of the grey loss: it does not change an answer, so it does not read.
            "M-C4-B": cell(0.0004),
            "L-C4-F": cell(0.0),
        },
    }
    grid = grid_reading(evidence)
    # A cell reads when every mode measured reads; an unmeasured cell (L-C4-B) is left out.
    expected = {"S-C4-F": True, "S-C4-B": True, "M-C4-F": False, "M-C4-B": False, "L-C4-F": False}
    assert grid["reads_pixels"] == expected
    assert grid["sentence"].startswith(
        "Grid cells that do not read the pixels (answer-token pixel gain not above noise or under 1% of the grey"
    )
    # Each named with its smallest gain over the modes: M-C4-F does not read in coarse_fine.
    assert "M-C4-F (+0.0000), M-C4-B (+0.0004), L-C4-F (+0.0000);" in grid["sentence"]
    assert grid["sentence"].endswith("Cells that read them: S-C4-F (+0.1000), S-C4-B (+0.1000).")
    # The floor is a share of the grey-frame loss: the same gain reads against a loss it is 1% of.
    assert reads({"above_noise": True, "pixel_gain": 0.0021, "loss_blank_frames": 0.2})
    assert not reads({"above_noise": True, "pixel_gain": 0.00199, "loss_blank_frames": 0.2})
    assert not reads({"above_noise": False, "pixel_gain": 0.1, "loss_blank_frames": 0.2})
    evidence["runs"] = {"S-C4-F": cell(0.1, 0.1)}
    expected = "Every measured grid cell reads the pixels (answer-token pixel gain): S-C4-F (+0.1000)."
    assert grid_reading(evidence)["sentence"] == expected
    assert grid_reading({"grid_cells": [], "runs": {}}) is None


def test_a_loss_gain_whose_bench_answers_do_not_change_does_not_read():
    """L-C4-B in the tiny main job: +0.0043 on a grey loss of 0.19 (2.3%, past the share floor) while
    the bench stayed at 0.310 against 0.275 with grey frames. Where a run was read on the bench in a
    mode, the pixels must change its answers as well."""
    rng = np.random.default_rng(3)
    grey = (rng.random(200) < 0.25).astype(int)
    # The same answers as with grey frames but for 12 more right and 5 fewer: +0.035, an interval
    # that holds 0.
    flat = grey.copy()
    flat[np.flatnonzero(grey == 0)[:12]] = 1
    flat[np.flatnonzero(grey == 1)[:5]] = 0
    # Right on 150 of 200: the pixels clearly bring answers.
    answered = grey.copy()
    answered[np.flatnonzero(grey == 0)[:100]] = 1

    def bench(correct):
        return {
            "accuracy": float(np.mean(correct)),
            "chance": 0.25,
            "correct": correct.tolist(),
            "grey_frames": {"accuracy": float(np.mean(grey)), "correct": grey.tolist()},
        }

    row = {"above_noise": True, "pixel_gain": 0.0043, "ci95": [0.0028, 0.0057], "loss_blank_frames": 0.189}
    small, large = bench_gain(bench(flat)), bench_gain(bench(answered))
    # The paired difference is the difference of the two accuracies; only its interval is new.
    assert small["diff"] == pytest.approx(bench(flat)["accuracy"] - float(np.mean(grey)))
    assert small["diff"] == pytest.approx(0.035) and small["verdict"] == "not distinguishable"
    assert large["verdict"] == "yes"
    assert reads(row) and not reads(row, bench(flat)) and reads(row, bench(answered))
    # The bench cannot make a loss that does not read read.
    assert not reads({**row, "pixel_gain": 0.001}, bench(answered))

    evidence = {
        "grid_cells": ["L-C4-F", "L-C4-B"],
        "runs": {
            "L-C4-F": {"pixel": {"coarse_fine": row}, "bench": {"modes": {"coarse_fine": bench(answered)}}},
            "L-C4-B": {"pixel": {"coarse_only": row}, "bench": {"modes": {"coarse_only": bench(flat)}}},
        },
    }
    grid = grid_reading(evidence)
    assert grid["reads_pixels"] == {"L-C4-F": True, "L-C4-B": False}
    assert "L-C4-B (+0.0043; bench accuracy, real − grey frames, +0.035 [95% " in grid["sentence"]
    assert grid["sentence"].endswith("Cells that read them: L-C4-F (+0.0043).")

    # The verdict's details say the same of F3: a loss gain whose answers do not move is not reading.
    f3 = {"pixel": {"coarse_fine": row}, "bench": {"modes": {"coarse_fine": bench(flat)}}}
    same = paired_difference(flat, flat, n_boot=0)
    pairs = [
        {"label": PRIMARY, "accuracy": {**same, "first": 0.3, "second": 0.3, "verdict": "not distinguishable"}},
        {"label": STATIC_TRAINED},
    ]
    details = conclusion({"F3": f3}, pairs)["details"]
    assert "F3 does not read the pixels: its pixel gain (coarse_fine), +0.0043 " in details
    assert ": bench answers unchanged: real − grey accuracy +0.035 [95% " in details
    f3["bench"]["modes"]["coarse_fine"] = bench(answered)
    assert (
        "F3 reads the pixels: grey frames raise its answer loss (coarse_fine) by 0.0043"
        in conclusion({"F3": f3}, pairs)["details"]
    )


def _without_seconds(value):
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


def test_two_processes_measure_what_one_does(phase1):
    """jobs=2 measures the runs in two spawned processes: the same evidence as one process, the
    broken A1 recorded as failed from its worker, and the runs in the same order."""
    root = phase1["root"]
    path = root / EVIDENCE_FILE
    kept = path.read_bytes()
    lines: list[str] = []
    try:
        both = collect_evidence(
            root, root / "ablations", root / "scaling", SETTINGS, force=True, jobs=2, log=lines.append
        )
    finally:
        path.write_bytes(kept)
    assert list(both["runs"]) == list(phase1["evidence"]["runs"])
    assert both["runs"]["A1"]["status"] == "failed" and any("A1: evaluation failed" in line for line in lines)
    assert _without_seconds(both) == _without_seconds(phase1["evidence"])


def _dies_on_a1(target, settings, log):
    """A stand-in for evaluate_run whose worker process dies on A1 (as one killed for memory would)."""
    if target.run_id == "A1":
        os._exit(1)
    time.sleep(0.2)
    return {"status": "ok", "measured": target.run_id}


def test_a_dying_evidence_worker_fails_only_the_runs_in_flight():
    """The pool loses a process on A1: A1 is recorded as failed (and at most the one run in flight
    beside it, which the pool cannot tell apart), the runs after them are measured in a fresh pool,
    and the records come back in the runs' order."""
    ids = ["F1", "F2", "F3", "A1", "A6", "B1", "D1", "A8a"]
    todo = [Target(rid, Path("."), "ablation", None, False) for rid in ids]
    lines: list[str] = []
    results = list(_evaluate_all(todo, SETTINGS, 2, lines.append, evaluate=_dies_on_a1))
    assert [t.run_id for t, _ in results] == ids
    failed = {t.run_id for t, r in results if r["status"] == "failed"}
    # Beside A1 can be any earlier run still in flight (F2 outlasts F3 when its worker was slower to
    # start) or the one started after it: one run at most, with two processes.
    assert "A1" in failed and len(failed) <= 2 and failed <= {"F1", "F2", "F3", "A1", "A6"}, failed
    assert all(r == {"status": "ok", "measured": t.run_id} for t, r in results if t.run_id not in failed)
    assert any("A1: evaluation failed: BrokenProcessPool" in line for line in lines)


def test_unchanged_runs_are_not_measured_again(phase1):
    root = phase1["root"]
    path = root / EVIDENCE_FILE
    stamp = path.stat().st_mtime_ns
    lines: list[str] = []
    began = time.perf_counter()
    again = collect_evidence(root, root / "ablations", root / "scaling", SETTINGS, log=lines.append)
    assert time.perf_counter() - began < 2 and path.stat().st_mtime_ns == stamp
    assert again == json.loads(path.read_text()) and any("unchanged" in line for line in lines)
    # One run's checkpoint changes: only that run is measured again (the failed A1 is tried again too).
    model = sorted((root / "scaling" / "S-C4-B" / "checkpoints").glob("step_*"))[-1] / "model.safetensors"
    os.utime(model, ns=(model.stat().st_atime_ns, model.stat().st_mtime_ns + 10**9))
    lines.clear()
    updated = collect_evidence(root, root / "ablations", root / "scaling", SETTINGS, log=lines.append)
    measured = {line.split(":")[0].removeprefix("[evidence] ") for line in lines if ": pixel gain" in line}
    assert measured == {"S-C4-B"}
    assert updated["runs"]["S-C4-B"]["fingerprint"] != phase1["evidence"]["runs"]["S-C4-B"]["fingerprint"]
    assert updated["runs"]["F3"] == phase1["evidence"]["runs"]["F3"]
