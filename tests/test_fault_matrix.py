"""The fault matrix of issue 42: each fault that once ended in a traceback, lost a user's file, hung,
or was silently accepted, with the outcome it must keep. Bad input is one line naming the file or
field and exit code 2; a fault of the machine (a full disk, the file-size limit) one line naming the
file and exit code 1, with the previous version of every file whole; a bad sample is skipped and
counted. The in-process cases are one table; the cases that need a resource limit or a kill run in
a child process below it."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data import jpeg, write_shard
from test_train import SMALL

from fvlm.cli import main

RUN = [*SMALL, "train.save_every=2", "train.eval_every=4", "train.keep_last=1"]
TINY_LLM = next((Path(__file__).resolve().parent.parent / "fvlm" / "assets").glob("tiny-backbones-*/tiny-llm"))
# A tiny synthetic set, for `fvlm data synth` cases.
SYNTH_SMALL = ["--videos", "4", "--images", "2", "--texts", "2", "--val", "4", "--probe", "2", "--bench", "4"]
SYNTH_SMALL += ["--frames", "2", "--size", "16"]
DEEP = 1200  # nesting past Python's recursion limit, which a parser without a depth limit runs into
DEEP_JSON = '{"user": "hi", "assistant": "ok", "x": ' + "[" * DEEP + "]" * DEEP + "}"
# The "billion laughs": nine levels of nine aliases stand for 9**9 strings in a few hundred bytes.
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 4-step run (`base`), the synthetic data cached beside it."""
    out = tmp_path_factory.mktemp("matrix")
    assert main(["train", "tiny", f"out_dir={out}", "run_id=base", *RUN, "train.max_steps=4"]) == 0
    return out


def _copy_run(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished / "base", tmp_path / "base")
    (tmp_path / "data").symlink_to(finished / "data")
    return tmp_path / "base"


def _synth(finished: Path) -> Path:
    return next((finished / "data").glob("synth-*"))


def _bench(tmp_path: Path, extra: str = "") -> Path:
    """A two-question multiple-choice file over one picture: a benchmark that evaluates in seconds."""
    picture = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 20, 20)).save(picture)
    lines = [
        json.dumps({"video": str(picture), "question": f"Q{i}", "options": ["red", "blue"], "answer": 0})
        for i in range(2)
    ]
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def _eval(run: Path, tmp_path: Path, *more: str) -> list[str]:
    return ["eval", str(run), "--data", "none", "--bench", str(_bench(tmp_path)), *more]


def _text_samples(n: int) -> list[tuple[str, dict[str, bytes]]]:
    meta = {"user": "What is 1 plus 1?", "assistant": "1 plus 1 is 2.", "source": "text", "frame_count": 0}
    return [(f"text-{i}", {"json": json.dumps(meta).encode()}) for i in range(n)]


def _resume(out: Path, steps: int = 6) -> list[str]:
    return ["train", "tiny", f"out_dir={out}", "run_id=base", *RUN, f"train.max_steps={steps}"]


# ----------------------------------------------------------------------------- the table


@dataclass
class Case:
    setup: Callable[[Path, Path], list[str]]  # (finished, tmp_path) -> argv
    code: int
    expected: str  # in the one error line; for exit code 0, in the output
    check: Callable[[Path, Path], None] | None = None  # (finished, tmp_path) after the command


# one bad sample: skipped and counted, never a traceback


def nested_sample_inspect(finished, tmp_path):
    shard = write_shard(tmp_path / "deep.tar", [*_text_samples(2), ("deep", {"json": DEEP_JSON.encode()})])
    return ["data", "inspect", str(shard)]


def nested_sample_train(finished, tmp_path):
    shard = write_shard(tmp_path / "deep.tar", [("deep", {"json": DEEP_JSON.encode()})])
    synth = _synth(finished)
    return [
        "train",
        "tiny",
        f"out_dir={tmp_path}",
        "run_id=deep",
        *RUN,
        "train.max_steps=1",
        f"data.train={synth / 'train'},{shard}",
        f"data.val={synth / 'val'}",
        f"data.probe={synth / 'probe'}",
    ]


def _skips_counted(finished, tmp_path):
    summary = json.loads((tmp_path / "deep" / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["data_skips"] == {"json_too_deep": 1}


def zero_frame_video(finished, tmp_path):
    meta = {"user": "What moves?", "assistant": "The red square.", "source": "video", "frame_count": 0}
    shard = write_shard(tmp_path / "v.tar", [*_text_samples(2), ("video-0", {"json": json.dumps(meta).encode()})])
    return ["data", "inspect", str(shard), "--json"]


# bad structured input: one line naming the file


def nested_config(finished, tmp_path):
    (tmp_path / "deep.yaml").write_text("run_id: " + "[" * DEEP + "]" * DEEP + "\n")
    return ["train", str(tmp_path / "deep.yaml")]


def nested_bench_line(finished, tmp_path):
    run = _copy_run(finished, tmp_path)
    return ["eval", str(run), "--data", "none", "--bench", str(_bench(tmp_path, DEEP_JSON + "\n"))]


def nested_model_json(finished, tmp_path):
    run = _copy_run(finished, tmp_path)
    (run / "checkpoints" / "step_0000004" / "fvlm_model.json").write_text(DEEP_JSON)
    return _eval(run, tmp_path)


def bomb_in_run_id(finished, tmp_path):
    (tmp_path / "bomb.yaml").write_text(BOMB + "run_id: *i\n")
    return ["train", str(tmp_path / "bomb.yaml")]


def bomb_in_mix(finished, tmp_path):
    (tmp_path / "bomb.yaml").write_text(BOMB + "data:\n  mix: *i\n")
    return ["train", str(tmp_path / "bomb.yaml")]


def bomb_in_mix_file(finished, tmp_path):
    (tmp_path / "mix.yaml").write_text(BOMB + "sources: *i\n")
    return ["data", "inspect", str(tmp_path / "mix.yaml")]


def bomb_in_override(finished, tmp_path):
    flow = "{" + BOMB.strip().replace("\n", ", ") + "}"
    return ["flops", f"data.mix={flow}"]


def recursive_alias(finished, tmp_path):
    (tmp_path / "loop.yaml").write_text("run_id: &a [1, *a]\n")
    return ["train", str(tmp_path / "loop.yaml")]


# unfinished synthetic sets


def _unfinished_set(tmp_path: Path, finished: Path) -> Path:
    """What a `fvlm data synth` stopped half-way leaves: its marker and part of train/, no manifest."""
    out = tmp_path / "set"
    (out / "train").mkdir(parents=True)
    shutil.copy(next((_synth(finished) / "train").glob("*.tar")), out / "train" / "train-00000.tar")
    (out / ".fvlm-synth-unfinished").write_text("")
    return out


def synth_restarts_its_unfinished_set(finished, tmp_path):
    return ["data", "synth", str(_unfinished_set(tmp_path, finished)), *SYNTH_SMALL]


def _set_finished(finished, tmp_path):
    out = tmp_path / "set"
    assert (out / "manifest.json").is_file() and not (out / ".fvlm-synth-unfinished").exists()
    assert sorted(p.name for p in out.iterdir()) == ["bench", "manifest.json", "probe", "train", "val"]


def inspect_unfinished_set(finished, tmp_path):
    return ["data", "inspect", str(_unfinished_set(tmp_path, finished)), "--no-decode"]


def train_on_unfinished_set(finished, tmp_path):
    out = _unfinished_set(tmp_path, finished)
    return ["train", "tiny", f"out_dir={tmp_path}", *RUN, f"data.train={out / 'train'}"]


def synth_over_finished_set(finished, tmp_path):
    return ["data", "synth", str(_synth(finished)), *SYNTH_SMALL]


def synth_into_foreign_folder(finished, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    return ["data", "synth", str(tmp_path / "mine"), *SYNTH_SMALL]


def inspect_own_dataset(finished, tmp_path):
    """A user's data set laid out like a synthetic one but without its manifest is theirs: it reads."""
    write_shard(tmp_path / "own" / "train" / "train-00000.tar", _text_samples(3))
    return ["data", "inspect", str(tmp_path / "own"), "--no-decode"]


# input that is not UTF-8


def non_utf8_mix(finished, tmp_path):
    (tmp_path / "mix.yaml").write_bytes(b"sources:\n  text: {path: x, weight: 1}\n# \xff\xfe\n")
    return ["data", "inspect", str(tmp_path / "mix.yaml")]


def non_utf8_bench(finished, tmp_path):
    run = _copy_run(finished, tmp_path)
    bench = _bench(tmp_path)
    bench.write_bytes(bench.read_bytes() + b'{"question": "\xff"}\n')
    return ["eval", str(run), "--data", "none", "--bench", str(bench)]


def non_utf8_steps_tail(finished, tmp_path):
    run = _copy_run(finished, tmp_path)
    with (run / "steps.csv").open("ab") as f:
        f.write(b"base,5,\xff\xfe\x00garbage\n")
    return _resume(tmp_path)


def _resumed_to_six(finished, tmp_path):
    run = tmp_path / "base"
    assert json.loads((run / "run_summary.json").read_text())["status"] == "completed"
    steps = (run / "steps.csv").read_text(encoding="utf-8").splitlines()
    assert steps[-1].startswith("base,6,") and all(len(line.split(",")) == len(steps[0].split(",")) for line in steps)


# unreadable files of a run or a model


def _attention(finished, tmp_path, data: bytes) -> list[str]:
    run = _copy_run(finished, tmp_path)
    (run / "attention" / "step_0000004.npz").write_bytes(data)
    return ["analyze", str(run), "--out", str(tmp_path / "report"), "--bootstrap", "10"]


def pickled_npz(finished, tmp_path):
    return _attention(finished, tmp_path, pickle.dumps({"coarse_attn": [1, 2]}, protocol=2))


def not_a_zip_npz(finished, tmp_path):
    return _attention(finished, tmp_path, b"PK\x03\x04 this is not a zip archive")


def npz_of_objects(finished, tmp_path):
    run = _copy_run(finished, tmp_path)
    path = run / "attention" / "step_0000004.npz"
    with np.load(path) as saved:
        arrays = dict(saved)
    arrays["coarse_attn"] = np.array([{"a": 1}], dtype=object)  # stored as a pickle inside the zip
    np.savez(path, **arrays)
    return ["analyze", str(run), "--out", str(tmp_path / "report"), "--bootstrap", "10"]


def gguf_header_bomb(finished, tmp_path):
    if find_spec("gguf") is None or find_spec("accelerate") is None:
        pytest.skip("reading GGUF needs the 'real' extra (gguf, accelerate)")

    def text(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()

    entry = text("general.architecture") + struct.pack("<I", 8) + text("llama")
    path = tmp_path / "bomb.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 10**12, 1) + entry)
    return ["backbones", "import", str(path), str(tmp_path / "out")]


def _pickled_llm(tmp_path: Path) -> Path:
    folder = tmp_path / "llm"
    shutil.copytree(TINY_LLM, folder)
    (folder / "model.safetensors").unlink()
    # A pickle that asks to build an object (what a pickle that runs code looks like).
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": argparse.Namespace(payload=1)}, protocol=2))
    return folder


def pickled_weights_train(finished, tmp_path):
    return ["train", "tiny", f"out_dir={tmp_path}", *RUN, f"model.llm={_pickled_llm(tmp_path)}"]


def pickled_weights_import(finished, tmp_path):
    return ["backbones", "import", str(_pickled_llm(tmp_path)), str(tmp_path / "out")]


def _custom_code(config: Path) -> None:
    settings = json.loads(config.read_text())
    settings.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    config.write_text(json.dumps(settings))


def tokenizer_auto_map_eval(finished, tmp_path):
    run = _copy_run(finished, tmp_path)
    _custom_code(run / "checkpoints" / "step_0000004" / "tokenizer" / "tokenizer_config.json")
    return _eval(run, tmp_path)


def tokenizer_auto_map_train(finished, tmp_path):
    folder = tmp_path / "llm"
    shutil.copytree(TINY_LLM, folder)
    _custom_code(folder / "tokenizer_config.json")
    return ["train", "tiny", f"out_dir={tmp_path}", *RUN, f"model.llm={folder}"]


# an output path that is a file


def _a_file(tmp_path: Path) -> Path:
    (tmp_path / "taken").write_text("a file, not a folder")
    return tmp_path / "taken"


def train_out_dir_is_file(finished, tmp_path):
    return ["train", "tiny", f"out_dir={_a_file(tmp_path)}", *RUN]


def analyze_out_is_file(finished, tmp_path):
    return ["analyze", str(finished / "base"), "--out", str(_a_file(tmp_path))]


def eval_out_is_file(finished, tmp_path):
    return _eval(_copy_run(finished, tmp_path), tmp_path, "--out", str(_a_file(tmp_path)))


def synth_out_is_file(finished, tmp_path):
    return ["data", "synth", str(_a_file(tmp_path)), *SYNTH_SMALL]


def synth_out_under_file(finished, tmp_path):
    return ["data", "synth", str(_a_file(tmp_path) / "set"), *SYNTH_SMALL]


# an export with damaged rows


def cut_export(finished, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    header = "model_size,run_id,lr_schedule,step,samples_seen,val_loss,train_loss,lr,throughput_sps,attention_entropy"
    rows = [f"135M,S-C1-F,cosine,{s},{s * 8},{3 - s / 100},{3 - s / 90},0.001,10.0,2.0" for s in (10, 20, 30)]
    rows[1] = rows[1][: len(rows[1]) // 2]  # a row cut in half
    (export / "all_eval_points.csv").write_text("\n".join([header, *rows]) + "\n")
    return ["analyze", str(export), "--out", str(tmp_path / "report"), "--bootstrap", "10"]


def torn_metrics_row(finished, tmp_path):
    """A run killed while appending to metrics.csv: its last row cut short is left out and noted."""
    run = _copy_run(finished, tmp_path)
    with (run / "metrics.csv").open("a") as f:
        f.write("base,8,32,1.5")
    return ["analyze", str(run), "--out", str(tmp_path / "report"), "--bootstrap", "10"]


def _torn_row_noted(finished, tmp_path):
    report = (tmp_path / "report" / "report.md").read_text()
    assert "metrics.csv: its last row (line 3) is cut short; left out" in report


def export_of_torn_weights(finished, tmp_path):
    run = _copy_run(finished, tmp_path)
    weights = run / "checkpoints" / "step_0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # what a disk that filled up mid-write leaves
    return ["export", str(run), str(tmp_path / "hf")]


def export_of_broken_model_json(finished, tmp_path):
    run = _copy_run(finished, tmp_path)
    (run / "checkpoints" / "step_0000004" / "fvlm_model.json").write_text('{"arch":')
    return ["export", str(run), str(tmp_path / "hf")]


def _no_export_left(finished, tmp_path):
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".hf", "hf"))]


def side_by_side_of_a_broken_decisions(finished, tmp_path):
    for name, text in (("a", "{}"), ("b", '{"questions": [')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "decisions.json").write_text(text)
    return ["analyze", "--side-by-side", str(tmp_path / "a"), str(tmp_path / "b")]


def _argv(*argv: str) -> Callable[[Path, Path], list[str]]:
    return lambda finished, tmp_path: list(argv)


def _sweep(*argv: str) -> Callable[[Path, Path], list[str]]:
    return lambda finished, tmp_path: ["sweep", "ablations", "--dry-run", "--no-measure", "--out", str(tmp_path), *argv]


def _with_run(*argv: str) -> Callable[[Path, Path], list[str]]:
    return lambda finished, tmp_path: _eval(_copy_run(finished, tmp_path), tmp_path, *argv)


CASES = {
    # one bad sample stops nothing
    "deeply nested JSON sample, data inspect": Case(nested_sample_inspect, 0, "json_too_deep"),
    "deeply nested JSON sample, train": Case(nested_sample_train, 0, "completed", _skips_counted),
    "zero-frame video sample": Case(zero_frame_video, 0, '"video_without_frames": 1'),
    # nested or exploding structured input
    "deeply nested config": Case(nested_config, 2, "deep.yaml: not usable YAML (nested deeper than 64 levels)"),
    "deeply nested bench JSONL line": Case(nested_bench_line, 2, "bench.jsonl:3: not usable JSON (nested deeper"),
    "deeply nested fvlm_model.json": Case(nested_model_json, 2, "fvlm_model.json: not usable JSON (nested deeper"),
    "YAML alias bomb in run_id": Case(bomb_in_run_id, 2, "bomb.yaml: not usable YAML (expands through aliases"),
    "YAML alias bomb in data.mix": Case(bomb_in_mix, 2, "bomb.yaml: not usable YAML (expands through aliases"),
    "YAML alias bomb in a mix file": Case(bomb_in_mix_file, 2, "mix.yaml: not usable YAML (expands through aliases"),
    "YAML alias bomb in an override": Case(bomb_in_override, 2, "override 'data.mix': not usable YAML"),
    "YAML alias inside its own anchor": Case(recursive_alias, 2, "loop.yaml: not usable YAML (an alias"),
    # unfinished synthetic sets
    "data synth over its own unfinished set": Case(synth_restarts_its_unfinished_set, 0, "starting it over", _set_finished),
    "data inspect of an unfinished set": Case(inspect_unfinished_set, 2, "set is a synthetic set that `fvlm data synth` never finished"),
    "train on an unfinished set": Case(train_on_unfinished_set, 2, "never finished (no manifest.json)"),
    "data synth over a finished set": Case(synth_over_finished_set, 2, "already holds a finished synthetic set"),
    "data synth into someone's folder": Case(synth_into_foreign_folder, 2, "mine is not empty; choose a new folder"),
    "data inspect of a user's set without manifest": Case(inspect_own_dataset, 0, "3 usable samples"),
    # tracebacks before
    "non-UTF-8 mix file": Case(non_utf8_mix, 2, "mix.yaml: not UTF-8"),
    "non-UTF-8 bench JSONL": Case(non_utf8_bench, 2, "bench.jsonl: not UTF-8"),
    "non-UTF-8 tail of steps.csv, resume": Case(non_utf8_steps_tail, 0, "steps.csv: dropped 1 line(s)", _resumed_to_six),
    "attention .npz that is a pickle": Case(pickled_npz, 2, "step_0000004.npz: not a readable attention .npz"),
    "attention .npz that is not a zip": Case(not_a_zip_npz, 2, "step_0000004.npz: not a readable attention .npz"),
    "attention .npz of objects": Case(npz_of_objects, 2, "step_0000004.npz: not a readable attention .npz"),
    "GGUF header claiming 10**12 tensors": Case(gguf_header_bomb, 2, "bomb.gguf: damaged GGUF header"),
    "pickled pytorch_model.bin, train": Case(pickled_weights_train, 2, "pytorch_model.bin: refused to load"),
    "pickled pytorch_model.bin, import": Case(pickled_weights_import, 2, "pytorch_model.bin: refused to load"),
    "tokenizer with auto_map, eval": Case(tokenizer_auto_map_eval, 2, "cannot load a tokenizer from"),
    "tokenizer with auto_map, train": Case(tokenizer_auto_map_train, 2, "model.llm: cannot load a tokenizer from"),
    "train out_dir is a file": Case(train_out_dir_is_file, 2, "taken exists and is not a folder"),
    "analyze --out is a file": Case(analyze_out_is_file, 2, "taken exists and is not a folder"),
    "eval --out is a file": Case(eval_out_is_file, 2, "taken exists and is not a folder"),
    "data synth OUT is a file": Case(synth_out_is_file, 2, "taken exists and is not a folder"),
    "data synth OUT inside a file": Case(synth_out_under_file, 2, "taken exists and is not a folder"),
    "train.max_steps=.inf": Case(_argv("train", "tiny", "train.max_steps=.inf"), 2, "train.max_steps: expected an integer, got inf"),
    # bad values accepted before
    "generate --temperature nan": Case(
        lambda f, t: ["generate", str(f / "base"), "--prompt", "hi", "--temperature", "nan"], 2, "--temperature must be a finite number"
    ),
    "flops --frames 0": Case(_argv("flops", "--frames", "0"), 2, "--frames must be >= 1, got 0"),
    "flops --text-tokens -1": Case(_argv("flops", "--text-tokens", "-1"), 2, "--text-tokens must be >= 1, got -1"),
    "sweep --scale 1e300": Case(_sweep("--scale", "1e300"), 2, "--scale must be a number > 0 and at most 1000"),
    "sweep --slurm-gpus -1": Case(_sweep("--slurm-gpus", "-1"), 2, "--slurm-gpus must be >= 1, got -1"),
    "sweep --slurm-time -5": Case(_sweep("--slurm-time", "-5"), 2, "--slurm-time must be >= 1, got -5"),
    "sweep --slurm-nodes 0": Case(_sweep("--slurm-nodes", "0"), 2, "--slurm-nodes must be >= 1, got 0"),
    "sweep --slurm-partition ''": Case(_sweep("--slurm-partition", ""), 2, "--slurm-partition must not be empty"),
    "out_dir=": Case(_argv("train", "tiny", "out_dir="), 2, "out_dir must not be empty"),
    "data.synth_size=100000": Case(_argv("train", "tiny", "data.synth_size=100000"), 2, "data.synth_size must be in [16, 1024]"),
    "analyze --fit-runs ''": Case(lambda f, t: ["analyze", str(f / "base"), "--out", str(t), "--fit-runs", ""], 2, "--fit-runs: no run-id glob"),
    "analyze --fit-runs ,": Case(lambda f, t: ["analyze", str(f / "base"), "--out", str(t), "--fit-runs", ","], 2, "--fit-runs: no run-id glob"),
    "eval --modes ''": Case(_with_run("--modes", ""), 2, "--modes: no mode given"),
    "eval --layer 99 of a 2-layer DINO": Case(_with_run("--attention", "1", "--layer", "99"), 2, "--layer 99: the model's query attends through 2"),
    "eval --layer without --attention": Case(_with_run("--layer", "0"), 2, "--layer picks the DINO layer"),
    "export with a row cut in half": Case(cut_export, 2, "all_eval_points.csv: line 3 has"),
    "run log with its last row cut short": Case(torn_metrics_row, 0, "analyzed 1 runs", _torn_row_noted),
    # what later commands add: an export of a damaged run, outputs set side by side
    "export of a run whose weights are cut short": Case(export_of_torn_weights, 2, "model.safetensors: unreadable", _no_export_left),
    "export of a run whose fvlm_model.json is broken": Case(export_of_broken_model_json, 2, "fvlm_model.json: not valid JSON", _no_export_left),
    "side by side of a broken decisions.json": Case(side_by_side_of_a_broken_decisions, 2, "decisions.json: not a readable decisions.json"),
    "side by side of one output": Case(lambda f, t: ["analyze", "--side-by-side", str(f)], 2, "needs two or more Phase 1 outputs"),
    # a misleading hint before
    "data synth --size 100000": Case(_argv("data", "synth", "unused", "--size", "100000"), 2, "--size must be in [16, 1024] pixels"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_fault_matrix(case, finished, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command that wrongly wrote into the current folder writes here
    spec = CASES[case]
    argv = spec.setup(finished, tmp_path)
    began = time.perf_counter()
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err[-3000:]
    assert code == spec.code, (out + err)[-3000:]
    if code:
        errors = [line for line in err.splitlines() if line.startswith("fvlm: error:")]
        assert len(errors) == 1 and spec.expected in errors[0], err[-3000:]
        # Refused before any work: a bomb or a bad value must not cost the minutes it once did.
        assert time.perf_counter() - began < 30
    else:
        assert spec.expected in out + err, (out + err)[-3000:]
    if spec.check is not None:
        spec.check(finished, tmp_path)


def test_a_zero_frame_video_is_dropped_and_counted(tmp_path, capsys):
    zero_frame_video(None, tmp_path)
    assert main(["data", "inspect", str(tmp_path / "v.tar"), "--json"]) == 0
    split = json.loads(capsys.readouterr().out)["splits"]["data"]
    assert split["samples"] == 2 and split["by_kind"] == {"video": 0, "image": 0, "text": 2}
    assert split["skipped_by_reason"] == {"video_without_frames": 1}


def test_a_text_sample_with_frame_count_zero_stays(tmp_path, capsys):
    write_shard(tmp_path / "t.tar", _text_samples(2))
    assert main(["data", "inspect", str(tmp_path / "t.tar"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["data"]["skipped"] == []


def test_an_image_sample_still_reads(tmp_path, capsys):
    meta = {"user": "Colour?", "assistant": "Green.", "source": "image", "frame_count": 1}
    write_shard(tmp_path / "i.tar", [("image-0", {"json": json.dumps(meta).encode(), "jpg": jpeg()})])
    assert main(["data", "inspect", str(tmp_path / "i.tar"), "--json"]) == 0
    split = json.loads(capsys.readouterr().out)["splits"]["data"]
    assert split["by_kind"]["image"] == 1 and split["skipped"] == []


# ----------------------------------------------------------------------------- in a child process
# A resource limit (RLIMIT_FSIZE: writes past the size fail, as on a full disk) or a kill needs a
# process of its own.


def _fvlm(argv, *, file_size: int | None = None, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    def limit():
        if file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit write() fails instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "fvlm", *argv]
    if popen:
        return subprocess.Popen(command, preexec_fn=limit, env=env, **popen)
    return subprocess.run(command, preexec_fn=limit, env=env, capture_output=True, text=True, timeout=300)


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("fvlm: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_eval_at_the_file_size_limit_keeps_the_old_eval_json(finished, tmp_path):
    run = _copy_run(finished, tmp_path)
    old = run / "eval" / "eval.json"
    old.parent.mkdir()
    old.write_text(json.dumps({"step": 4, "old": "x" * 3000}) + "\n")  # an earlier result, over the limit
    before = old.read_bytes()
    done = _fvlm(_eval(run, tmp_path), file_size=2000)
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"{old}: File too large" in _one_error_line(done.stderr)
    assert old.read_bytes() == before
    assert not list(old.parent.glob(".*.tmp"))


def test_analyze_at_the_file_size_limit_keeps_every_old_file_whole(finished, tmp_path):
    report = tmp_path / "report"
    assert main(["analyze", str(finished / "base"), "--out", str(report), "--bootstrap", "10"]) == 0
    # Earlier files that differ from what this analysis writes, each past the limit.
    for path in report.iterdir():
        path.write_bytes(path.read_bytes() + b"\n" + b"0" * 20000)
    before = _files(report)
    done = _fvlm(["analyze", str(finished / "base"), "--out", str(report), "--bootstrap", "10"], file_size=20000)
    assert done.returncode == 1, done.stderr[-3000:]
    line = _one_error_line(done.stderr)
    assert f"{report}/" in line and "File too large" in line
    after = _files(report)
    assert set(after) == set(before)  # no temporary file left behind
    failed = line.split("fvlm: error: ", 1)[1].rsplit(": ", 1)[0]
    assert after[str(Path(failed).relative_to(report))] == before[str(Path(failed).relative_to(report))]
    for name, data in after.items():
        # Each file is its old version or a whole new one (this analysis writes the same bytes as the
        # first, none of them past the limit): never a part of either.
        assert data == before[name] or len(data) < 20000, name


def test_a_killed_data_synth_is_refused_then_started_over(tmp_path, capsys):
    out = tmp_path / "set"
    child = _fvlm(["data", "synth", str(out), "--videos", "5000", "--size", "64"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "train" / "train-00000.tar").is_file():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not (out / "manifest.json").exists()
    for argv in (["data", "inspect", str(out), "--no-decode"], ["data", "inspect", str(out / "train")]):
        assert main(argv) == 2
        assert "never finished" in _one_error_line(capsys.readouterr().err)
    assert main(["data", "synth", str(out), *SYNTH_SMALL]) == 0
    assert "starting it over" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["video"] == 4
    assert main(["data", "inspect", str(out), "--no-decode"]) == 0


def test_data_synth_on_a_full_disk_names_the_shard_then_starts_over(tmp_path, capsys):
    out = tmp_path / "set"
    bigger = [*SYNTH_SMALL[:-2], "--size", "64"]  # a first shard past the limit
    done = _fvlm(["data", "synth", str(out), *bigger], file_size=20000)
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"{out / 'train' / 'train-00000.tar'}: File too large" in _one_error_line(done.stderr)
    assert main(["data", "inspect", str(out), "--no-decode"]) == 2
    capsys.readouterr()
    assert main(["data", "synth", str(out), *SYNTH_SMALL]) == 0
    assert (out / "manifest.json").is_file()
