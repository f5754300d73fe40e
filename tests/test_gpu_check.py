"""benchmarks/gpu_check.py in its reduced, CPU-sized form: every measurement of the GPU check runs
through the same code (step, compile, bf16 parity, loader, all-reduce), so the script is ready the
next time a GPU is at hand."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_reduced_gpu_check_measures_everything(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--reduced", "--dense", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and report["reduced"] and report["peak_flops"] is None
    assert report["batches"] == ["padded", "dense"]
    assert {(r["size"], r["variant"], r["batches"]) for r in report["steps"]} == {
        ("tiny", variant, kind)
        for variant in ("coarse_fine", "coarse_only", "multi_token")
        for kind in ("padded", "dense")
    }
    for row in report["steps"]:
        assert row["step_sec"] > 0 and row["flops_per_sec"] > 0 and row["mfu"] is None
        if row["batches"] == "padded":  # distinct loader-like batches, with padding in frames and text
            assert row["distinct_batches"] > 1 and row["real_frames"] < 1 and row["real_text"] < 1
        else:
            assert row["distinct_batches"] == 1 and row["real_frames"] == row["real_text"] == 1
    # Padded batches carry fewer real frames, so fewer FLOPs per step than the dense ones.
    work = {r["batches"]: r["flops_per_sec"] * r["step_sec"] for r in report["steps"] if r["variant"] == "coarse_fine"}
    assert work["padded"] < work["dense"]
    assert [c["batches"] for c in report["compile"]] == ["padded", "dense"]
    for c in report["compile"]:
        assert c["compiled_step_sec"] > 0 and c["unique_graphs"] >= 1 and c["recompiles"] >= 0
        assert c["distinct_batches"] == (c["steps"] if c["batches"] == "padded" else 1)
    # train.static_shapes batches: eager and compiled run the same steps to the same losses (a CPU has no
    # CUDA graphs to capture, so that row is left out here).
    graphs = report["cudagraphs"]
    assert graphs["distinct_shapes"] >= 1 and graphs["eager"]["step_sec"] > 0 and "cuda_graphs" not in graphs
    assert graphs["compiled"]["unique_graphs"] == 1 and graphs["compiled"]["max_loss_diff"] < 1e-4
    parity = report["parity"]
    assert len(parity["fp32_losses"]) == len(parity["bf16_losses"]) > 1
    assert parity["max_relative_gap"] < 0.05
    assert [r["workers"] for r in report["loader"]] == [0, 1] and all(
        r["samples_per_sec"] > 0 for r in report["loader"]
    )
    assert report["allreduce"]["backend"].startswith("gloo") and report["allreduce"]["manual_over_ddp"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| tiny | multi_token | padded |" in table and "| tiny | multi_token | dense |" in table
    assert "padded batches" in table and "all-reduce" in table and "compiled step, static shapes" in table


# ----------------------------------------------------------------------------- --baseline

ROOT = SCRIPT.parents[1]
PREPARE = ROOT / "benchmarks" / "prepare_baseline.sh"
ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--reduced", *args],
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The fvlm/ of this checkout's HEAD, exported by benchmarks/prepare_baseline.sh (git archive)."""
    if not all(shutil.which(tool) for tool in ("git", "bash", "tar")) or not (ROOT / ".git").exists():
        pytest.skip("needs git, bash, tar and this checkout's .git")
    folder = tmp_path_factory.mktemp("baseline") / "head"
    done = subprocess.run(["bash", str(PREPARE), "HEAD", str(folder)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"--baseline {folder}" in done.stdout and f"rm -rf {folder}" in done.stdout
    assert "outside the repository" in done.stderr  # a temp folder does not travel to the device machine
    marker = dict(line.split(": ", 1) for line in (folder / ".fvlm-baseline").read_text().splitlines())
    assert marker["ref"] == "HEAD" and marker["commit"] == _git("rev-parse", "HEAD")
    assert (folder / "fvlm" / "__init__.py").is_file() and not (folder / "tests").exists()
    return folder


def _old_and_new(report: dict) -> list[tuple[dict, dict]]:
    new = {(r["size"], r["variant"], r["batches"]): r for r in report["steps"]}
    return [(old, new[old["size"], old["variant"], old["batches"]]) for old in report["baseline"]["steps"]]


def test_baseline_runs_beside_this_tree_on_the_same_batches(exported, tmp_path):
    done = _check("--parts", "steps,compile", "--baseline", str(exported), "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "parity" not in report and "loader" not in report  # --parts
    old = report["baseline"]
    assert Path(old["fvlm"]) == exported / "fvlm"  # the child imported the export, not this tree
    assert old["commit"].startswith(_git("rev-parse", "--short=12", "HEAD")) and "error" not in old
    pairs = _old_and_new(report)
    assert [(o["variant"], o["batches"]) for o, _ in pairs] == [
        (v, "padded") for v in ("coarse_fine", "coarse_only", "multi_token")
    ]
    for o, n in pairs:
        assert math.isfinite(o["samples_per_sec"]) and o["samples_per_sec"] > 0 and o["new_over_old"] > 0
        assert o["new_over_old"] == pytest.approx(n["samples_per_sec"] / o["samples_per_sec"])
        if not _git("status", "--porcelain", "--", "fvlm"):  # same code, weights and batches: same losses
            assert o["losses"] == pytest.approx(n["losses"], rel=1e-5)
    (c,) = old["compile"]
    assert c["batches"] == "padded" and c["compiled_step_sec"] > 0 and c["unique_graphs"] >= 1
    table = (tmp_path / "gpu_check.md").read_text().split("## Old code against new")[1]
    assert str(exported) in table and "| old samples/s | new samples/s | new / old | old MFU | new MFU |" in table
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 3
    for row in rows:
        old_rate, new_rate, ratio = (float(cell.strip().rstrip("x")) for cell in row[3:6])
        assert old_rate > 0 and new_rate > 0 and ratio == pytest.approx(new_rate / old_rate, rel=0.02)


def test_old_code_that_refuses_the_index_keys_is_timed_without_them(exported, tmp_path):
    """A baseline whose model takes only the masks: timed on the same batches without their index
    keys, which the model then finds from the masks itself (so the losses stay this tree's)."""
    old = shutil.copytree(exported, tmp_path / "old")
    build = old / "fvlm" / "model" / "build.py"
    build.write_text(
        build.read_text()
        + textwrap.dedent(
            """
            _build_model = build_model


            def build_model(*args, **kwargs):
                model = _build_model(*args, **kwargs)
                forward = model.forward

                def masks_only(batch, *rest, **options):
                    extra = set(batch) - {"frames", "frame_mask", "input_ids", "attention_mask", "loss_mask"}
                    if extra:
                        raise KeyError(f"unknown batch keys {sorted(extra)}")
                    return forward(batch, *rest, **options)

                model.forward = masks_only
                return model
            """
        )
    )
    done = _check("--parts", "steps", "--baseline", str(old), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    (note,) = report["baseline"]["notes"]
    assert "frame_rows" in note and "unknown batch keys" in note and "without those keys" in note
    for o, n in _old_and_new(report):
        assert o["samples_per_sec"] > 0 and "error" not in o
        if not _git("status", "--porcelain", "--", "fvlm"):
            assert o["losses"] == pytest.approx(n["losses"], rel=1e-4)
    assert note in (tmp_path / "out" / "gpu_check.md").read_text()


def test_a_baseline_that_cannot_run_is_reported_not_fatal(exported, tmp_path):
    old = shutil.copytree(exported, tmp_path / "old")
    (old / "fvlm" / "config.py").unlink()
    done = _check("--parts", "compile", "--baseline", str(old), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["compile"][0]["compiled_step_sec"] > 0  # this tree's part still measured
    assert "fvlm.config" in report["baseline"]["error"] and report["baseline"]["compile"] == []
    assert report["baseline"]["error"] in (tmp_path / "out" / "gpu_check.md").read_text()
    # A folder without an fvlm package is bad input: one line, exit code 2.
    done = _check("--baseline", str(tmp_path), "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "--baseline" in done.stderr and "fvlm/__init__.py" in done.stderr


def test_the_checks_bf16_step_is_the_trainers_and_tracks_fp32():
    """The step the GPU check times under `bf16` is the trainer's: bf16 weights, fp32 masters in the
    optimizer (a CPU runs it too); its losses track the fp32 step's from the same weights and batch,
    and the GPU kernel count is None off a GPU."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    plan = dict(check.REDUCED)
    cfg = check.run_config("tiny", plan, {})
    batch = [check.make_batch(2, plan, torch.device("cpu"), seed=1)]
    runs = {p: check.train_steps(cfg, batch, torch.device("cpu"), p, 3, seed=1) for p in ("fp32", "bf16")}
    for seconds, losses, memory, kernels in runs.values():
        assert seconds > 0 and len(losses) == 4 and all(math.isfinite(x) for x in losses)
        assert memory is None and kernels is None
    fp32, bf16 = runs["fp32"][1], runs["bf16"][1]
    assert fp32[-1] < fp32[0] and bf16[-1] < bf16[0]  # both train
    assert fp32 != bf16 and all(abs(a - b) / abs(a) < 0.05 for a, b in zip(fp32, bf16))  # bf16 weights, close
