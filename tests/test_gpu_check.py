"""benchmarks/gpu_check.py in its reduced, CPU-sized form: every measurement of the GPU check runs
through the same code (step, compile, bf16 parity, loader, all-reduce), so the script is ready the
next time a GPU is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    parity = report["parity"]
    assert len(parity["fp32_losses"]) == len(parity["bf16_losses"]) > 1
    assert parity["max_relative_gap"] < 0.05
    assert [r["workers"] for r in report["loader"]] == [0, 1] and all(
        r["samples_per_sec"] > 0 for r in report["loader"]
    )
    assert report["allreduce"]["backend"].startswith("gloo") and report["allreduce"]["manual_over_ddp"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| tiny | multi_token | padded |" in table and "| tiny | multi_token | dense |" in table
    assert "padded batches" in table and "all-reduce" in table
