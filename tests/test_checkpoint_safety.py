"""Resuming a run folder someone else wrote loads data only: a checkpoint file that asks to build an
object (how a pickle runs code) is refused with a one-line error, and nothing it asks for runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import SMALL

from fvlm.cli import main
from fvlm.run_folder import complete_checkpoints
from fvlm.training.checkpoint import load_data


class Payload:
    """Unpickling this calls open(marker, "w"): the file appearing is the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("safety")
    assert (
        main(
            [
                "train",
                "tiny",
                f"out_dir={out}",
                "run_id=base",
                *SMALL,
                "train.max_steps=4",
                "train.save_every=2",
                "train.eval_every=4",
                "train.keep_last=2",
            ]
        )
        == 0
    )
    return out


def _resume(tmp_path, *extra):
    return main(
        [
            "train",
            "tiny",
            f"out_dir={tmp_path}",
            "run_id=base",
            *SMALL,
            "train.max_steps=6",
            "train.save_every=2",
            "train.eval_every=4",
            "train.keep_last=2",
            *extra,
        ]
    )


def _copy(finished, tmp_path):
    run = tmp_path / "base"  # the same run id: a copy of someone's run folder, resumed here
    shutil.copytree(finished / "base", run)
    return run, [folder for _, folder in complete_checkpoints(run)]


@pytest.mark.parametrize("target", ["rank_0.pt", "optimizer.pt", "trainer.pt"])
def test_a_planted_pickle_payload_is_refused_and_never_runs(finished, tmp_path, capsys, target):
    run, checkpoints = _copy(finished, tmp_path)
    marker = tmp_path / "pwned"
    for folder in checkpoints:  # every checkpoint carries it: nothing is left to fall back to
        torch.save({"state": Payload(marker)}, folder / target)
    code = _resume(tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    assert f"{target}: refused to load" in err and len(err.strip().splitlines()) == 1


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


DAMAGE = {
    "truncated weights": lambda f: _truncate(f / "model.safetensors"),
    "empty weights": lambda f: (f / "model.safetensors").write_bytes(b""),
    "garbage rank file": lambda f: (f / "rank_0.pt").write_bytes(b"not a checkpoint at all"),
    "truncated optimizer": lambda f: _truncate(f / "optimizer.pt"),
    "truncated trainer state": lambda f: _truncate(f / "trainer.pt"),
    "garbage meta.json": lambda f: (f / "meta.json").write_text("{not json"),
    "planted pickle": lambda f: torch.save({"state": Payload(f.parent.parent.parent / "pwned")}, f / "rank_0.pt"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(finished, tmp_path, capsys, damage):
    run, checkpoints = _copy(finished, tmp_path)
    assert checkpoints[-1].name == "step_0000004" and len(checkpoints) > 1  # milestones are kept too
    DAMAGE[damage](checkpoints[-1])
    assert _resume(tmp_path) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {checkpoints[-1]} is unreadable" in out and not (tmp_path / "pwned").exists()
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["total_steps"] == 6
    steps = [int(line.split(",")[1]) for line in (run / "steps.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # resumed from the one before: no step twice


def test_milestones_keep_weights_only_and_resuming_passes_them_by(tmp_path, capsys):
    """4 steps evaluated every 2, keep_last=1: step 2 is a milestone (an evaluation step), pruned to
    its weights once step 4 is saved; step 4 is the resume checkpoint and keeps its training state.
    A run whose resume checkpoints are all gone (only milestones left) starts over."""
    from fvlm.model.build import load_model

    args = [
        "train",
        "tiny",
        f"out_dir={tmp_path}",
        "run_id=base",
        *SMALL,
        "train.save_every=2",
        "train.eval_every=2",
        "train.keep_last=1",
    ]
    assert main([*args, "train.max_steps=4"]) == 0
    checkpoints = [folder for _, folder in complete_checkpoints(tmp_path / "base")]
    files = {f.name: sorted(p.name for p in f.iterdir()) for f in checkpoints}
    weights = ["fvlm_model.json", "meta.json", "model.safetensors", "tokenizer"]
    assert files == {
        "step_0000002": weights,
        "step_0000004": sorted(weights + ["optimizer.pt", "rank_0.pt", "trainer.pt"]),
    }
    assert json.loads((checkpoints[0] / "meta.json").read_text())["evaluated_step"] == 2
    load_model(checkpoints[0])  # a milestone is a whole model for evaluation
    shutil.rmtree(checkpoints[1])
    assert main([*args, "train.max_steps=6"]) == 0
    assert "new run" in capsys.readouterr().err
    summary = json.loads((tmp_path / "base" / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["total_steps"] == 6


def test_milestones_are_evaluation_steps():
    """The 20-step run of the issue: evaluated every 10 steps, 5 milestones. The old rule kept steps
    4, 8, 12, 16, 20 and deleted the evaluated step 10; milestones now are evaluation steps only."""
    from fvlm.training.checkpoint import eval_steps, milestone_steps

    assert eval_steps(20, 10) == [10, 20]
    assert milestone_steps(20, 10, 5) == {10, 20}
    assert milestone_steps(100, 10, 5) == {20, 40, 60, 80, 100}
    assert milestone_steps(23, 5, 3) == {10, 15, 23}  # the last step is evaluated too
    assert eval_steps(23, 5) == [5, 10, 15, 20, 23]
    assert milestone_steps(20, 10, 0) == set()
    for total, every, n in [(100, 7, 5), (57, 4, 6), (3, 10, 5)]:
        assert milestone_steps(total, every, n) <= set(eval_steps(total, every))
        assert len(milestone_steps(total, every, n)) == min(n, len(eval_steps(total, every)))


def test_plain_data_and_older_numpy_rng_states_still_load(tmp_path):
    state = np.random.get_state()  # what checkpoints held before the RNG state went to tensors
    torch.save({"numpy": state, "step": 3, "loss": 0.5, "t": torch.arange(3)}, tmp_path / "old.pt")
    loaded = load_data(tmp_path / "old.pt")
    assert loaded["step"] == 3 and torch.equal(loaded["t"], torch.arange(3))
    assert np.array_equal(loaded["numpy"][1], state[1])


def test_the_log_rewrite_on_resume_replaces_the_file_whole(tmp_path, monkeypatch):
    """Resume keeps the rows up to the checkpoint's step by writing a new file and renaming it over
    the old one: if that fails half-way (here: the rename), the old log is intact and no temporary
    file is left. Before, the log was reopened with "w" and emptied first."""
    import os

    from fvlm.training.logs import CsvLog

    columns = ("wall_time", "step", "loss")
    path = tmp_path / "steps.csv"
    log = CsvLog(path, columns, keep_until_step=None)
    for step in range(1, 6):
        log.write({"wall_time": 0.0, "step": step, "loss": 1.0 / step})
    log.close()
    before = path.read_text()

    def broken_replace(src, dst):
        raise OSError("simulated failure at the rename")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        CsvLog(path, columns, keep_until_step=3)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["steps.csv"]

    monkeypatch.undo()
    resumed = CsvLog(path, columns, keep_until_step=3)
    resumed.write({"wall_time": 0.0, "step": 4, "loss": 0.2})
    resumed.close()
    steps = [line.split(",")[1] for line in path.read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4"] and [r["step"] for r in resumed.kept_rows] == ["1", "2", "3"]


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_eval_and_generate_on_a_damaged_checkpoint_give_one_line(finished, tmp_path, capsys, command):
    run, checkpoints = _copy(finished, tmp_path)
    _truncate(checkpoints[-1] / "model.safetensors")
    argv = [command, str(checkpoints[-1])]
    if command == "eval":
        argv += ["--data", "none", "--bench", str(next((finished / "data").glob("synth-*")) / "bench")]
    else:
        frame = tmp_path / "frame.png"
        Image.new("RGB", (32, 32), (10, 20, 30)).save(frame)
        argv += [str(frame)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: unreadable" in err and len(err.strip().splitlines()) == 1


def test_a_second_train_on_the_same_run_folder_is_refused(tmp_path, capsys):
    """While one process trains a run, another `fvlm train` on the same folder stops at once (its
    logs and checkpoints would interleave with the first's); the lock goes with the process."""
    import fcntl

    run = tmp_path / "busy"
    run.mkdir()
    with open(run / ".train.lock", "w") as held:  # stands in for the first training process
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["train", "tiny", f"out_dir={tmp_path}", "run_id=busy", *SMALL, "train.max_steps=2"]) == 2
        assert "another fvlm train is running on this run folder" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "tiny",
                f"out_dir={tmp_path}",
                "run_id=busy",
                *SMALL,
                "train.max_steps=2",
                "train.eval_every=2",
                "train.save_every=2",
            ]
        )
        == 0
    )
