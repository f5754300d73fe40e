"""Runs compared with runs: killed (SIGKILL) and resumed vs uninterrupted, SIGTERM then resumed,
2 CPU processes (gloo; DDP and FSDP2) vs 1 process with twice the accumulation, and steps skipped
by every rank together. Each run is a real `fvlm train` subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_train import SMALL, read_csv

from fvlm.model.build import load_model

pytestmark = pytest.mark.slow

RESUME = ["train.max_steps=20", "train.log_every=1", "train.save_every=4", "train.eval_every=8"]
COMPARED = ("train_loss", "loss_fine", "loss_coarse", "grad_norm", "lr_connector", "samples_seen")


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    folder = tmp_path_factory.getbasetemp() / "train-runs"
    folder.mkdir(exist_ok=True)
    return folder


def command(out_dir, run_id, *extra):
    return [sys.executable, "-m", "fvlm", "train", "tiny", f"out_dir={out_dir}", f"run_id={run_id}", *SMALL, *extra]


def environment():
    # One thread per process: the same reduction order in every run, and no oversubscription of 2 cores.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run(cmd):
    done = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def start_and_signal(cmd, checkpoint, sig):
    """Starts a run and sends `sig` as soon as `checkpoint` is complete (meta.json written)."""
    proc = subprocess.Popen(cmd, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (checkpoint / "meta.json").is_file():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def by_step(path):
    _, rows = read_csv(path)
    return {int(r["step"]): r for r in rows}


def assert_same_rows(a, b, columns, tol):
    assert sorted(a) == sorted(b)
    for step in a:
        for column in columns:
            x, y = a[step][column], b[step][column]
            assert (x == y == "") or abs(float(x) - float(y)) <= tol, (step, column, x, y)


@pytest.fixture(scope="module")
def reference(out_dir):
    run(command(out_dir, "uninterrupted", *RESUME))
    return out_dir / "uninterrupted"


def test_sigkill_then_rerun_gives_the_same_losses(out_dir, reference):
    cmd = command(out_dir, "killed", *RESUME)
    code, _ = start_and_signal(cmd, out_dir / "killed" / "checkpoints" / "step_0000004", signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (out_dir / "killed" / "run_summary.json").exists(), "killed before the end"
    resumed = run(cmd)
    assert "resuming at step" in resumed.stderr
    assert_same_rows(by_step(reference / "steps.csv"), by_step(out_dir / "killed" / "steps.csv"), COMPARED, 1e-6)
    assert_same_rows(
        by_step(reference / "metrics.csv"),
        by_step(out_dir / "killed" / "metrics.csv"),
        ("val_loss", "val_loss_coarse", "attention_entropy"),
        1e-6,
    )
    summary = json.loads((out_dir / "killed" / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["total_samples"] == 20 * 4


# Runs `fvlm train` with metrics.csv's first row cut in half by a SIGKILL: the process dies inside the
# write of an evaluation, after that step's checkpoint (the window the resume must notice).
KILL_IN_EVAL_WRITE = """
import os, signal, sys
from fvlm.training import logs
write = logs.CsvLog.write
def dying_write(self, row):
    if self.path.name == "metrics.csv":
        self._file.write(",".join(str(row[c]) for c in self.columns[:5]))
        self._file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    write(self, row)
logs.CsvLog.write = dying_write
from fvlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_static_shapes_train_the_same_run(out_dir, reference):
    """train.static_shapes pads every training batch to the shape ladder: the same losses, gradient
    norms, counts and validation, to float rounding."""
    run(command(out_dir, "static", *RESUME, "train.static_shapes=true"))
    assert_same_rows(by_step(reference / "steps.csv"), by_step(out_dir / "static" / "steps.csv"), COMPARED, 1e-4)
    assert_same_rows(
        by_step(reference / "metrics.csv"),
        by_step(out_dir / "static" / "metrics.csv"),
        ("val_loss", "val_loss_coarse", "attention_entropy"),
        1e-4,
    )


def test_a_kill_inside_an_evaluation_write_is_evaluated_again_on_resume(out_dir, reference):
    cmd = command(out_dir, "killed-in-eval", *RESUME)
    dying = subprocess.run(
        [sys.executable, "-c", KILL_IN_EVAL_WRITE, *cmd[3:]],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dying.returncode == -signal.SIGKILL, dying.stderr[-2000:]
    killed = out_dir / "killed-in-eval"
    assert (killed / "checkpoints" / "step_0000008" / "meta.json").is_file()
    assert len((killed / "metrics.csv").read_text().splitlines()) == 2  # the header and half a row
    run(cmd)
    theirs, ours = by_step(reference / "metrics.csv"), by_step(killed / "metrics.csv")
    assert sorted(ours) == [8, 16, 20]
    assert_same_rows(
        theirs,
        ours,
        ("val_loss", "val_loss_fine", "val_loss_coarse", "attention_entropy", "train_loss", "grad_norm"),
        1e-6,
    )
    reference_maps = sorted(p.name for p in (reference / "attention").iterdir())
    assert sorted(p.name for p in (killed / "attention").iterdir()) == reference_maps
    for name in reference_maps:
        with np.load(reference / "attention" / name) as a, np.load(killed / "attention" / name) as b:
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                if a[key].dtype.kind in "fiub":
                    assert np.allclose(a[key], b[key], atol=1e-6), (name, key)
                else:
                    assert (a[key] == b[key]).all(), (name, key)


def test_bf16_master_weights_resume_exactly(out_dir):
    """train.precision=bf16 (bf16 weights, fp32 masters): the checkpoint holds the masters, so a run
    killed and resumed continues exactly as the uninterrupted one, to the last bit of every logged loss."""
    bf16 = [*RESUME, "train.precision=bf16"]
    run(command(out_dir, "bf16-uninterrupted", *bf16))
    cmd = command(out_dir, "bf16-killed", *bf16)
    code, _ = start_and_signal(cmd, out_dir / "bf16-killed" / "checkpoints" / "step_0000004", signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert "resuming at step" in run(cmd).stderr
    reference, resumed = out_dir / "bf16-uninterrupted", out_dir / "bf16-killed"
    assert_same_rows(by_step(reference / "steps.csv"), by_step(resumed / "steps.csv"), COMPARED, 0.0)
    assert_same_rows(
        by_step(reference / "metrics.csv"), by_step(resumed / "metrics.csv"), ("val_loss", "val_loss_coarse"), 0.0
    )
    summary = json.loads((reference / "run_summary.json").read_text())
    assert summary["throughput"]["precision"] == "bf16"


def test_sigterm_checkpoints_marks_interrupted_and_resumes(out_dir, reference):
    cmd = command(out_dir, "terminated", *RESUME)
    code, err = start_and_signal(cmd, out_dir / "terminated" / "checkpoints" / "step_0000004", signal.SIGTERM)
    assert code == 1, err[-2000:]
    summary = json.loads((out_dir / "terminated" / "run_summary.json").read_text())
    assert summary["status"] == "interrupted"
    stopped_at = summary["total_steps"]
    assert 4 <= stopped_at < 20
    assert (out_dir / "terminated" / "checkpoints" / f"step_{stopped_at:07d}" / "meta.json").is_file()
    run(cmd)
    assert json.loads((out_dir / "terminated" / "run_summary.json").read_text())["status"] == "completed"
    assert_same_rows(by_step(reference / "steps.csv"), by_step(out_dir / "terminated" / "steps.csv"), COMPARED, 1e-6)


# The multi-process runs: 2 processes x 2 micro-batches against 1 process x 4 (the last micro-batch of
# a step reduces gradients inside its backward, the first under no_sync), through each engine.
ACCUM = ["train.max_steps=5", "train.log_every=1", "train.eval_every=5", "train.save_every=2", "train.batch_size=2"]


@pytest.fixture(scope="module")
def accumulated(out_dir):
    run(command(out_dir, "single", *ACCUM, "train.grad_accum=4"))
    return out_dir / "single"


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_twice_the_accumulation(out_dir, accumulated, engine):
    cmd = command(out_dir, engine, *ACCUM, "train.grad_accum=2", f"train.distributed={engine}")
    cmd.insert(cmd.index("tiny"), "--nproc=2")
    run(cmd)
    single, both = by_step(accumulated / "steps.csv"), by_step(out_dir / engine / "steps.csv")
    assert_same_rows(single, both, COMPARED, 1e-5)
    assert_same_rows(
        by_step(accumulated / "metrics.csv"),
        by_step(out_dir / engine / "metrics.csv"),
        ("val_loss", "val_loss_coarse", "attention_entropy"),
        1e-5,
    )
    assert int(both[5]["samples_seen"]) == 5 * 2 * 2 * 2
    last = out_dir / engine / "checkpoints" / "step_0000005"
    assert json.loads((last / "meta.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in last.glob("rank_*.pt")) == ["rank_0.pt", "rank_1.pt"]
    # The checkpoint is the one a single process writes: the same weight names and values, the same
    # optimizer state layout (parameters numbered in group order), and it opens as a model folder.
    theirs, ours = accumulated / "checkpoints" / "step_0000005", last
    with safe_open(theirs / "model.safetensors", "pt") as a, safe_open(ours / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.allclose(a.get_tensor(key), b.get_tensor(key), atol=1e-5), key
    opt_a, opt_b = (torch.load(f / "optimizer.pt", weights_only=True) for f in (theirs, ours))
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert sorted(opt_a["state"]) == sorted(opt_b["state"])
    for index, state in opt_a["state"].items():
        for key, value in state.items():
            assert torch.allclose(value, opt_b["state"][index][key], atol=1e-5, rtol=1e-4), (index, key)
    load_model(ours)
    # Resuming from the step-4 checkpoint (weights, optimizer and data cursor into the engine)
    # reproduces step 5.
    shutil.rmtree(last)
    (out_dir / engine / "run_summary.json").unlink()
    resumed = run(cmd)
    assert "resuming at step 4" in resumed.stderr
    assert_same_rows(both, by_step(out_dir / engine / "steps.csv"), COMPARED, 1e-7)


# Runs `fvlm train` with a step whose odd global micro-batches hold no target tokens (attempt 1: in
# 2 processes, none on rank 1), one with none anywhere (attempt 2) and an out-of-memory error in
# global micro-batch 1 (attempt 3: rank 1's first). Global micro-batch g is micro-batch g // world of
# rank g % world: the loader deals consecutive stream positions to the ranks in turn, so one process
# with 4 micro-batches and 2 processes with 2 each see the same events on the same samples.
SKIPPING = """
import os, sys, torch
from fvlm.training import trainer
RANK, WORLD = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
forward_backward = trainer.Trainer._forward_backward
attempts = []

class OutOfMemoryAt:
    def __init__(self, engine, index):
        self.engine, self.index, self.calls = engine, index, 0
    def __getattr__(self, name):
        return getattr(self.engine, name)
    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls - 1 == self.index:
            raise torch.cuda.OutOfMemoryError("injected")
        return self.engine(*args, **kwargs)

def silence(batch):
    # The batch without targets, its host-built indices rebuilt as the collate would.
    from fvlm.model.batch_index import build_indices
    quiet = torch.zeros_like(batch["loss_mask"])
    return {**batch, "loss_mask": quiet, **build_indices(batch["frame_mask"], quiet)}

def patched(self, micro, compute_coarse):
    attempt, n = len(attempts), len(micro)
    attempts.append(1)
    rows = [i * WORLD + RANK for i in range(n)]
    if attempt in (1, 2):
        silent = [g % 2 == 1 or attempt == 2 for g in rows]
        micro = [silence(b) if s else b for b, s in zip(micro, silent)]
    engine = self.engine
    if attempt == 3 and 1 in rows:
        self.engine = OutOfMemoryAt(engine, rows.index(1))
    try:
        return forward_backward(self, micro, compute_coarse)
    finally:
        self.engine = engine

trainer.Trainer._forward_backward = patched
from fvlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_skipped_step_is_skipped_by_every_rank(out_dir, tmp_path):
    script = tmp_path / "skipping.py"
    script.write_text(SKIPPING)
    common = ["train.max_steps=4", "train.log_every=1", "train.eval_every=4", "train.batch_size=2"]
    single = [sys.executable, str(script), *command(out_dir, "skips-single", *common, "train.grad_accum=4")[3:]]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    both = [*torchrun, str(script), *command(out_dir, "skips-ddp", *common, "train.grad_accum=2")[3:]]
    for cmd in (single, both):
        done = run(cmd)
        assert done.stderr.count("skipped a step (no target tokens)") == 1, done.stderr[-2000:]
        assert done.stderr.count("skipped a step (out of memory)") == 1, done.stderr[-2000:]
    a, b = by_step(out_dir / "skips-single" / "steps.csv"), by_step(out_dir / "skips-ddp" / "steps.csv")
    assert sorted(a) == [1, 2, 3, 4]
    assert_same_rows(a, b, COMPARED, 1e-5)
    # 4 steps taken over 6 attempts: the skipped attempts' samples are not counted, but consumed.
    assert int(b[4]["samples_seen"]) == 4 * 8
    state = torch.load(out_dir / "skips-ddp" / "checkpoints" / "step_0000004" / "trainer.pt", weights_only=True)
    assert state["skipped_steps"] == 2


# A compiled step inside each engine: under DDP, dynamo splits the graph at the gradient buckets
# (its DDP optimizer); under FSDP2 the weights are DTensors. No GPU session has tried either yet.
COMPILED_IN_ENGINES = """
import copy, json, sys
import torch
from fvlm.config import load_config
from fvlm.model.batch_index import random_padded_batch
from fvlm.model.build import build_model, compile_model
from fvlm.training.dist import init_distributed
from fvlm.training.engine import Engine

dist = init_distributed()
report = {}
for kind in ("ddp", "fsdp"):
    torch.manual_seed(0)
    eager = build_model(load_config(None, {"model.image_size": 32}).model).train()
    compiled = copy.deepcopy(eager)
    compile_model(compiled, backend="aot_eager")  # AOT autograd's graphs, as inductor gets them
    engines = [Engine(model, dist, kind) for model in (eager, compiled)]
    worst = {"loss": 0.0, "grad": 0.0}
    for step in range(2):
        g = torch.Generator().manual_seed(10 * step + dist.rank)
        batch = random_padded_batch(g, 3, 4 - step, 24, 32)
        losses = []
        for engine in engines:
            loss = engine(batch).loss
            loss.backward()
            losses.append(loss.detach())
        worst["loss"] = max(worst["loss"], float((losses[0] - losses[1]).abs()))
        for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
            if a.grad is not None or b.grad is not None:
                local = [getattr(p.grad, "to_local", lambda p=p: p.grad)() for p in (a, b)]
                if local[0].numel():  # an FSDP2 shard can be empty on a rank
                    worst["grad"] = max(worst["grad"], float((local[0] - local[1]).abs().max()))
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
    report[kind] = worst
with open(f"{sys.argv[1]}/rank{dist.rank}.json", "w") as f:
    json.dump(report, f)
"""


@pytest.mark.slow
def test_a_compiled_step_runs_in_both_engines_as_eager(tmp_path):
    script = tmp_path / "compiled.py"
    script.write_text(COMPILED_IN_ENGINES)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run([*torchrun, str(script), str(tmp_path)])
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for kind in ("ddp", "fsdp"):
            assert report[kind]["loss"] < 1e-5 and report[kind]["grad"] < 1e-5, (rank, kind, report[kind])
