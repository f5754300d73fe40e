"""Faults a careless or hostile user produces, as a table of (fault -> expected outcome): bad input is
a one-line error with exit code 2, a fault of the machine (full disk, read-only folder, memory) a
one-line error with exit code 1, and nothing the user already has is lost."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_train import SMALL

from fvlm.cli import main

RUN = [*SMALL, "train.save_every=2", "train.eval_every=4", "train.keep_last=1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 4-step run, the synthetic data cached beside it."""
    out = tmp_path_factory.mktemp("faults")
    assert main(["train", "tiny", f"out_dir={out}", "run_id=base", *RUN, "train.max_steps=4"]) == 0
    return out


def _copy_run(finished, tmp_path) -> Path:
    """A copy of the finished run (same run id) under a new out_dir that shares its data cache."""
    shutil.copytree(finished / "base", tmp_path / "base")
    (tmp_path / "data").symlink_to(finished / "data")
    return tmp_path / "base"


def _resume(out, steps=6):
    return ["train", "tiny", f"out_dir={out}", "run_id=base", *RUN, f"train.max_steps={steps}"]


# ----------------------------------------------------------------------------- the table
# Each case sets up its fault under tmp_path and returns the argv; expected: (exit code, a piece of the
# one-line message on stderr, or of stdout for a case that succeeds).


def bad_budget(finished, tmp_path):
    return ["flops", "--budget", "-1"]


def nan_budget(finished, tmp_path):
    return ["flops", "--budget", "nan"]


def negative_seed(finished, tmp_path):
    return ["train", "tiny", f"out_dir={tmp_path}", "seed=-1"]


def negative_synth_seed(finished, tmp_path):
    return ["data", "synth", str(tmp_path / "s"), "--seed", "-1"]


def non_utf8_config(finished, tmp_path):
    (tmp_path / "bad.yaml").write_bytes(b"seed: 1\nrun_id: \xff\xfe\n")
    return ["train", str(tmp_path / "bad.yaml")]


def empty_tar(finished, tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    return ["data", "inspect", str(tmp_path / "empty.tar")]


def garbage_saved_config_on_resume(finished, tmp_path):
    (_copy_run(finished, tmp_path) / "config.yaml").write_text("{{{: [\n")
    return _resume(tmp_path)


def garbage_saved_config_on_eval(finished, tmp_path):
    run = _copy_run(finished, tmp_path)
    (run / "config.yaml").write_bytes(b"\xff\xfe\x00")
    return ["eval", str(run), "--max-samples", "4"]


def garbage_summary_on_resume(finished, tmp_path):
    (_copy_run(finished, tmp_path) / "run_summary.json").write_text("garbage{")
    return _resume(tmp_path)


def non_utf8_metrics_on_analyze(finished, tmp_path):
    run = _copy_run(finished, tmp_path)
    with (run / "metrics.csv").open("ab") as f:
        f.write(b"\xff\xfe\x00bad\n")
    return ["analyze", str(run), "--out", str(tmp_path / "report")]


CASES = {
    "flops --budget -1": (bad_budget, 2, "--budget must be a positive number"),
    "flops --budget nan": (nan_budget, 2, "--budget must be a positive number"),
    "seed=-1": (negative_seed, 2, "seed must be in [0, 2**32)"),
    "data synth --seed -1": (negative_synth_seed, 2, "--seed must be in [0, 2**32)"),
    "non-UTF-8 config file": (non_utf8_config, 2, "bad.yaml: not UTF-8"),
    "0-byte tar": (empty_tar, 0, "empty_shard"),
    "garbage config.yaml, resume": (garbage_saved_config_on_resume, 2, "config.yaml: not valid YAML"),
    "non-UTF-8 config.yaml, eval": (garbage_saved_config_on_eval, 2, "config.yaml: not UTF-8"),
    "garbage run_summary.json, resume": (garbage_summary_on_resume, 0, "resuming as an unfinished run"),
    "non-UTF-8 metrics.csv, analyze": (non_utf8_metrics_on_analyze, 2, "metrics.csv: not UTF-8"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fault_table(case, finished, tmp_path, capsys):
    setup, code, expected = CASES[case]
    argv = setup(finished, tmp_path)
    assert main(argv) == code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if code:
        errors = [line for line in err.splitlines() if line.startswith("fvlm: error:")]
        assert len(errors) == 1 and expected in errors[0], err[-2000:]
    else:
        assert expected in out + err


def test_a_garbage_summary_resumes_and_the_run_completes(finished, tmp_path, capsys):
    garbage_summary_on_resume(finished, tmp_path)
    assert main(_resume(tmp_path)) == 0
    summary = json.loads((tmp_path / "base" / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["total_steps"] == 6


# ----------------------------------------------------------------------------- machine faults
# In a child process with a resource limit: the cheapest faithful way to fill a disk or exhaust
# memory without filling or exhausting the machine the tests run on.


def _limited(argv, limit, value):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the size limit, write() fails instead of killing
        resource.setrlimit(limit, (value, value))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fvlm", *argv], preexec_fn=apply, env=env, capture_output=True, text=True, timeout=300
    )


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("fvlm: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def test_a_full_disk_is_one_line_and_the_checkpoints_survive(finished, tmp_path):
    """Writes past 1 MB fail (the optimizer state is ~1.7 MB), as on a full disk: the checkpoint
    being written fails with one line naming the file and exit code 1; the earlier checkpoint stays
    complete, a second try while still full fails the same way, and once there is room the run
    resumes and completes."""
    run = _copy_run(finished, tmp_path)
    before = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    # Every checkpoint is written with its optimizer state (milestones are evaluation steps, saved
    # whole and only later pruned to their weights), so the first write after the resume fails.
    full = _resume(tmp_path)
    for _ in range(2):
        done = _limited(full, resource.RLIMIT_FSIZE, 1_000_000)
        assert done.returncode == 1
        assert "optimizer.pt: write failed" in _one_error_line(done.stderr)
        kept = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
        assert kept == before
        assert not list(run.glob(".*.tmp"))  # no half-written summary or log left behind
    assert main(_resume(tmp_path)) == 0
    assert json.loads((run / "run_summary.json").read_text())["status"] == "completed"


def test_running_out_of_memory_names_the_setting_to_lower(finished, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 20, 20)).save(image)
    # 1,000,000 frames of 32 px need 12 GB; the address space is capped at 6 GB.
    done = _limited(
        ["generate", str(finished / "base"), str(image), "--frames", "1000000"], resource.RLIMIT_AS, 6 * 2**30
    )
    assert done.returncode == 1
    line = _one_error_line(done.stderr)
    assert "out of memory" in line and "lower --frames" in line


def _read_only_folder(path: Path) -> bool:
    """Makes `path` a read-only folder: chmod for a normal user; for root (whom permissions do not
    stop) a read-only tmpfs mount where the sandbox allows one."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return True
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_a_read_only_out_dir_is_one_line(tmp_path):
    folder = tmp_path / "ro"
    if not _read_only_folder(folder):
        pytest.skip("cannot make a read-only folder here (root without mount)")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fvlm", "data", "synth", str(folder / "set"), "--videos", "2"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 1
        assert str(folder) in _one_error_line(done.stderr)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(folder)], capture_output=True)
        else:
            folder.chmod(0o755)
