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
        [sys.executable, str(SCRIPT), "--reduced", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and report["reduced"] and report["peak_flops"] is None
    assert {(r["size"], r["variant"]) for r in report["steps"]} == {
        ("tiny", "coarse_fine"),
        ("tiny", "coarse_only"),
        ("tiny", "multi_token"),
    }
    for row in report["steps"]:
        assert row["step_sec"] > 0 and row["flops_per_sec"] > 0 and row["mfu"] is None
    assert report["compile"]["compiled_step_sec"] > 0
    parity = report["parity"]
    assert len(parity["fp32_losses"]) == len(parity["bf16_losses"]) > 1
    assert parity["max_relative_gap"] < 0.05
    assert [r["workers"] for r in report["loader"]] == [0, 1] and all(
        r["samples_per_sec"] > 0 for r in report["loader"]
    )
    assert report["allreduce"]["backend"].startswith("gloo") and report["allreduce"]["manual_over_ddp"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| tiny | multi_token |" in table and "all-reduce" in table
