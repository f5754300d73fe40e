"""`fvlm train`: config errors, parameter groups and schedules, every file of the run folder (fvlm/run_folder.py), divergence,
wandb offline. (Resume and DDP, which need subprocesses, are in test_train_resume.py.)"""

from __future__ import annotations

import csv
import json
import sys
import types

import numpy as np
import pytest
import torch
import yaml

from fvlm.cli import main
from fvlm.config import OptimConfig, load_config
from fvlm.run_folder import METRIC_COLUMNS, STEP_COLUMNS
from fvlm.training.optim import group_lrs
from fvlm.training.trainer import train

# A smaller synthetic set and model input than the tiny preset, so a run takes seconds.
SMALL = [
    "data.synth_videos=48",
    "data.synth_images=16",
    "data.synth_texts=16",
    "data.synth_val=16",
    "data.synth_frames=4",
    "data.synth_size=32",
    "data.max_frames=4",
    "data.max_text_tokens=64",
    "model.image_size=32",
    "train.batch_size=4",
    "train.eval_batch_size=8",
    "train.eval_samples=16",
    "train.probe_videos=3",
]


@pytest.fixture(scope="session")
def out_dir(tmp_path_factory):
    """One out_dir for all training tests of the session, so the synthetic set is generated once."""
    folder = tmp_path_factory.getbasetemp() / "train-runs"
    folder.mkdir(exist_ok=True)
    return folder


def small_config(out_dir, run_id, *overrides):
    return load_config("tiny", [f"out_dir={out_dir}", f"run_id={run_id}", *SMALL, *overrides])


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


# ---------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "args, message",
    [
        (["train.max_step=3"], "did you mean train.max_steps"),
        (["optim.lr_llm=fast"], "optim.lr_llm"),
        (["train.max_steps=0"], "train.max_steps or train.max_samples"),
        (["train.init_from=/nonexistent/run"], "train.init_from"),
        (["train.precision=fp16"], "train.precision"),
        # NaN slips past every range check (NaN < 0 is False): each is named as not finite.
        (["optim.lr_llm=.nan"], "optim.lr_llm must be a finite number"),
        (["train.grad_clip=.nan"], "train.grad_clip must be a finite number"),
        (["model.visual_scale=.inf"], "model.visual_scale must be a finite number"),
        (["data.mix={video: .nan, image: 1}"], "data.mix.video must be a finite number"),
        # A run id is one folder inside out_dir: ".." would write beside it.
        (["run_id=.."], "run_id must be a plain folder name"),
        (["run_id=."], "run_id must be a plain folder name"),
    ],
)
def test_config_errors_exit_2_naming_the_field(tmp_path, capsys, args, message):
    code = main(["train", "tiny", f"out_dir={tmp_path}", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_schedules():
    peaks = dict(lr_connector=1e-3, lr_dino=1e-5, lr_llm=1e-4)
    cosine = OptimConfig(**peaks, schedule="cosine", warmup_ratio=0.1, min_lr_ratio=0.1)
    everything = {"connector", "dino", "llm"}
    assert group_lrs(0, 100, cosine, everything)["connector"] == pytest.approx(1e-4)  # warmup 1/10
    assert group_lrs(10, 100, cosine, everything)["llm"] == pytest.approx(1e-4)  # peak
    assert group_lrs(100, 100, cosine, everything)["dino"] == pytest.approx(1e-6)  # min_lr_ratio x peak
    constant = OptimConfig(**peaks, schedule="constant", warmup_ratio=0.0)
    assert group_lrs(73, 100, constant, everything) == {"connector": 1e-3, "dino": 1e-5, "llm": 1e-4}
    converging = OptimConfig(**peaks, schedule="converging", warmup_ratio=0.0, min_lr_ratio=0.5)
    start, end = group_lrs(0, 100, converging, everything), group_lrs(100, 100, converging, everything)
    assert start == pytest.approx({"connector": 1e-3, "dino": 1e-5, "llm": 1e-4})
    assert end == pytest.approx({"connector": 5e-6, "dino": 5e-6, "llm": 5e-6})  # all meet at 0.5 x 1e-5
    only_connector = group_lrs(5, 100, converging, {"connector"})
    shape = 0.5 * (1 + np.cos(np.pi * 0.05))
    assert only_connector == pytest.approx({"connector": 5e-4 + (1e-3 - 5e-4) * shape, "dino": 0.0, "llm": 0.0})


# ---------------------------------------------------------------------------- a run and its files
@pytest.fixture(scope="session")
def small_run(out_dir):
    cfg = small_config(
        out_dir,
        "files",
        "train.max_steps=24",
        "train.eval_every=12",
        "train.save_every=6",
        "train.log_every=4",
        "train.keep_last=1",
    )
    return cfg, train(cfg)


def test_every_file_of_a_run_has_its_exact_columns(small_run):
    cfg, summary = small_run
    run = cfg.run_dir
    header, steps = read_csv(run / "steps.csv")
    assert tuple(header) == STEP_COLUMNS
    assert [int(r["step"]) for r in steps] == [1, 4, 8, 12, 16, 20, 24]
    assert all(r["loss_coarse"] not in ("", "0.0") for r in steps), "loss_coarse must be measured (lambda=0)"
    assert all(float(r["throughput_samples_sec"]) > 0 and float(r["grad_norm"]) > 0 for r in steps)
    assert int(steps[-1]["samples_seen"]) == 24 * 4
    header, metrics = read_csv(run / "metrics.csv")
    assert tuple(header) == METRIC_COLUMNS
    assert [int(r["step"]) for r in metrics] == [12, 24]
    for row in metrics:
        assert float(row["val_loss"]) == float(row["val_loss_fine"])
        assert float(row["val_loss_ratio"]) == pytest.approx(
            float(row["val_loss_fine"]) / float(row["val_loss_coarse"])
        )
        assert 0 < float(row["attention_entropy"]) <= np.log(1 + 16) + 1e-6  # 32 px / 8 px patches
    assert float(steps[-1]["train_loss"]) < float(steps[0]["train_loss"]) - 0.5, "the loss should fall"

    assert load_config(str(run / "config.yaml")).to_dict() == cfg.to_dict()
    on_disk = json.loads((run / "run_summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in (
        "run_id",
        "status",
        "git_commit",
        "config_hash",
        "final_train_loss",
        "best_val_loss",
        "best_val_step",
        "convergence_step",
        "total_steps",
        "total_samples",
        "wall_time_sec",
        "wall_time_hours",
        "params",
        "flops_per_sample",
        "total_flops",
        "final",
        "best",
    ):
        assert key in on_disk, key
    assert on_disk["status"] == "completed" and on_disk["config_hash"] == cfg.config_hash()
    assert on_disk["total_steps"] == 24 and on_disk["total_samples"] == 96
    assert on_disk["best_val_step"] == 24 and on_disk["best_val_loss"] == on_disk["best"]["val_loss"]
    params = on_disk["params"]
    assert sum(params["by_group"].values()) == params["total"] >= params["trainable"] > 0
    assert on_disk["final"]["step"] == 24 and set(on_disk["final"]) == set(METRIC_COLUMNS)


def test_steps_log_throughput_tokens_flops_and_data_wait(small_run):
    """Every logged row: tokens/s split into visual and text, FLOP/s from the exact counter at the
    interval's sample shape, data-loader wait per step; MFU blank on a CPU without train.peak_flops."""
    from fvlm.model.flops import estimate_flops

    cfg, summary = small_run
    _, steps = read_csv(cfg.run_dir / "steps.csv")
    for row in steps:
        samples_sec = float(row["throughput_samples_sec"])
        visual, text = float(row["visual_tokens_per_sec"]), float(row["text_tokens_per_sec"])
        assert float(row["tokens_per_sec"]) == pytest.approx(visual + text)
        # 1 token per frame, at most 4 frames and 64 text tokens per sample (SMALL)
        assert 0 < visual <= 4 * samples_sec + 1e-6 and 0 < text <= 64 * samples_sec + 1e-6
        lower = estimate_flops(cfg.model, frames=1, text_tokens=8, loss_tokens=1).per_sample * samples_sec
        upper = estimate_flops(cfg.model, frames=4, text_tokens=64, loss_tokens=64).per_sample * samples_sec
        assert lower < float(row["flops_per_sec"]) < upper
        assert row["mfu"] == "" and 0 <= float(row["data_wait_sec"]) < 60
    rate = summary["throughput"]
    assert rate["mfu"] is None and "train.peak_flops" in rate["peak_source"]
    assert rate["flops_per_sec"] == pytest.approx(summary["flops_per_sample"] * rate["samples_per_sec"])
    assert 0 <= rate["data_wait_fraction"] < 1


def test_mfu_against_a_given_peak(out_dir):
    summary = train(small_config(out_dir, "mfu", "train.max_steps=4", "train.log_every=2", "train.peak_flops=1e9"))
    _, steps = read_csv(out_dir / "mfu" / "steps.csv")
    for row in steps:
        assert float(row["mfu"]) == pytest.approx(float(row["flops_per_sec"]) / 1e9)
    assert summary["throughput"]["mfu"] == pytest.approx(summary["throughput"]["flops_per_sec"] / 1e9)
    assert summary["throughput"]["peak_source"] == "train.peak_flops"


def test_peak_table_picks_the_device_and_never_guesses():
    from fvlm.training.throughput import peak_flops

    assert peak_flops(None, "NVIDIA H100 80GB HBM3", True)[0] == 989e12
    assert peak_flops(None, "NVIDIA H100 PCIe", True)[0] == 756e12
    assert peak_flops(None, "NVIDIA A100-SXM4-80GB", True)[0] == 312e12
    assert peak_flops(None, "NVIDIA A100-SXM4-80GB", False)[0] is None  # fp32: not the bf16 peak
    assert peak_flops(None, "Tesla T4", True)[0] is None
    assert peak_flops(None, None, False)[0] is None
    assert peak_flops(2e14, None, False) == (2e14, "train.peak_flops")


def test_resuming_a_log_with_older_columns_keeps_its_values(tmp_path):
    from fvlm.training.logs import CsvLog

    path = tmp_path / "steps.csv"
    path.write_text("run_id,step,train_loss\nr,1,2.5\nr,2,2.0\nr,3,1.5\n")
    log = CsvLog(path, ("run_id", "step", "train_loss", "mfu"), keep_until_step=2)
    log.close()
    header, rows = read_csv(path)
    assert header == ["run_id", "step", "train_loss", "mfu"]
    assert rows == [
        {"run_id": "r", "step": "1", "train_loss": "2.5", "mfu": ""},
        {"run_id": "r", "step": "2", "train_loss": "2.0", "mfu": ""},
    ]


def test_checkpoints_are_complete_loadable_and_pruned(small_run):
    from fvlm.model.build import load_model

    cfg, _ = small_run
    names = sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir())
    # Saved every 6 steps; the milestones are the evaluation steps nearest 24 x k/5, so 12 and 24;
    # keep_last=1 prunes 6 and 18. Every kept checkpoint has its evaluation row.
    assert names == [f"step_{s:07d}" for s in (12, 24)]
    _, metrics = read_csv(cfg.run_dir / "metrics.csv")
    assert {int(r["step"]) for r in metrics} >= {12, 24}
    # Only the resume checkpoint (keep_last=1) keeps the optimizer state; milestones keep weights.
    with_state = [name for name in names if (cfg.run_dir / "checkpoints" / name / "optimizer.pt").is_file()]
    assert with_state == ["step_0000024"]
    folder = cfg.run_dir / "checkpoints" / "step_0000024"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["step"] == 24 and meta["samples_seen"] == 96 and meta["config"]["run_id"] == "files"
    assert meta["best"]["step"] == 24 and "git_commit" in meta
    model, tokenizer = load_model(folder)
    assert tokenizer is not None and type(model).__name__ == "FoveatedVLM"


def test_attention_npz_contract(small_run):
    cfg, _ = small_run
    saved = sorted(p.name for p in (cfg.run_dir / "attention").iterdir())
    assert saved == ["step_0000012.npz", "step_0000024.npz"]
    z = np.load(cfg.run_dir / "attention" / "step_0000024.npz")
    n, t = z["frame_mask"].shape
    assert n == 3 and t == 4
    assert z["coarse_attn"].dtype == np.float32 and z["coarse_attn"].shape == (3, 4, 2, 4, 17)
    assert z["fine_attn"].shape == z["coarse_attn"].shape
    assert z["frames"].dtype == np.uint8 and z["frames"].shape == (3, 4, 32, 32, 3)
    assert list(z["grid"]) == [4, 4] and int(z["step"]) == 24 and len(z["keys"]) == 3
    real = z["fine_attn"][z["frame_mask"]]
    np.testing.assert_allclose(real.sum(-1), 1.0, rtol=1e-4)


def test_probe_attention_gives_the_model_host_built_indices_and_the_same_maps(small_run, tmp_path, monkeypatch):
    """The probe pass takes a sub-batch of the probe loader's videos; it builds that sub-batch's frame
    and target indices on the host, so the model never finds them itself (a `nonzero` that waits for
    the device). The maps equal those of the model finding them (the indices left out)."""
    from contextlib import nullcontext

    from fvlm.data.loader import build_loader
    from fvlm.model.batch_index import INDEX_KEYS
    from fvlm.model.build import load_model
    from fvlm.training import evaluate

    cfg, _ = small_run
    model, tokenizer = load_model(cfg.run_dir / "checkpoints" / "step_0000024")
    given = []
    forward = model.forward

    def recording(batch, **kwargs):
        given.append(all(k in batch for k in INDEX_KEYS))
        return forward(batch, **kwargs)

    monkeypatch.setattr(model, "forward", recording)

    def probe(folder):
        loader = build_loader(cfg, "probe", tokenizer, train=False, max_samples=3)
        return np.load(evaluate.save_probe_attention(model, loader, 3, 24, folder, torch.device("cpu"), nullcontext))

    host = probe(tmp_path / "host")
    assert given and all(given)
    given.clear()
    monkeypatch.setattr(evaluate, "build_indices", lambda frame_mask, loss_mask: {})
    own = probe(tmp_path / "own")
    assert given and not any(given)
    assert sorted(host.files) == sorted(own.files)
    for name in host.files:
        np.testing.assert_array_equal(host[name], own[name], err_msg=name)


def test_rerunning_a_completed_run_does_nothing(small_run, capsys):
    cfg, summary = small_run
    again = train(cfg)
    assert again["wall_time_sec"] == summary["wall_time_sec"]
    assert "nothing to do" in capsys.readouterr().out


def test_changed_settings_in_an_existing_run_folder_are_refused(small_run):
    from fvlm.errors import UsageError

    cfg, _ = small_run
    changed = load_config(str(cfg.run_dir / "config.yaml"), ["optim.lr_llm=0.5"])
    with pytest.raises(UsageError, match="optim.lr_llm"):
        train(changed)


# ---------------------------------------------------------------------------- groups and freezing
def test_frozen_groups_stay_bit_identical_and_groups_get_their_lrs(out_dir):
    from safetensors.torch import load_file

    from fvlm.model.build import build_model

    cfg = small_config(
        out_dir,
        "frozen",
        "model.freeze_dino=true",
        "train.max_steps=3",
        "train.eval_every=3",
        "train.log_every=1",
        "optim.schedule=constant",
        "optim.warmup_ratio=0",
        "optim.lr_connector=2e-3",
        "optim.lr_llm=5e-4",
        "optim.lr_dino=1e-3",
    )
    torch.manual_seed(cfg.seed)
    initial = build_model(cfg.model).state_dict()
    train(cfg)
    _, steps = read_csv(cfg.run_dir / "steps.csv")
    assert {(r["lr_connector"], r["lr_dino"], r["lr_llm"]) for r in steps} == {("0.002", "0.0", "0.0005")}
    trained = load_file(str(cfg.run_dir / "checkpoints" / "step_0000003" / "model.safetensors"))
    dino = [k for k in initial if k.startswith("encoder.dino.")]
    assert dino and all(torch.equal(trained[k], initial[k]) for k in dino)
    changed = [k for k in trained if not k.startswith("encoder.dino.") and not torch.equal(trained[k], initial[k])]
    assert any(k.startswith("llm.") for k in changed) and "q_static" in changed


def test_optimizer_groups_carry_the_configured_rates():
    from fvlm.model.build import build_model
    from fvlm.training.optim import build_optimizer

    cfg = load_config("tiny", ["model.freeze_llm=true", "optim.lr_connector=1e-3", "optim.lr_dino=1e-5"])
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    rates = {(g["group"], g["weight_decay"] > 0): g["lr"] for g in optimizer.param_groups}
    assert {name for name, _ in rates} == {"connector", "dino"}
    assert rates[("connector", True)] == 1e-3 and rates[("dino", True)] == 1e-5
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in model.llm.parameters())


# ---------------------------------------------------------------------------- failure modes
def test_divergence_stops_the_run_with_status_diverged(out_dir, capsys):
    code = main(
        [
            "train",
            "tiny",
            f"out_dir={out_dir}",
            "run_id=diverge",
            *SMALL,
            "train.max_steps=30",
            "train.grad_clip=0",
            "optim.lr_connector=30",
            "optim.lr_llm=30",
            "optim.lr_dino=30",
            "optim.warmup_ratio=0",
        ]
    )
    assert code == 1
    summary = json.loads((out_dir / "diverge" / "run_summary.json").read_text())
    assert summary["status"] == "diverged" and summary["total_steps"] < 30
    assert "diverged" in capsys.readouterr().err


def test_one_hard_batch_is_not_a_divergence_but_a_climbing_loss_is():
    """The guard reads the running loss: a single batch at 6x the floor (answer-only losses of small
    batches swing that much) passes; a loss that stays 6x up stops the run within 20 steps, one that
    blows up to 20x within 5."""
    from fvlm.training.divergence import DivergenceGuard

    def verdicts(losses):
        guard = DivergenceGuard(5.0)
        return [guard.diverged(x) for x in losses]

    assert not any(verdicts([0.2] * 50 + [1.2] + [0.2] * 10))
    for level, within in ((1.2, 20), (4.0, 5)):  # stays at 6x the floor / blows up to 20x
        seen = verdicts([0.2] * 50 + [level] * 30)
        assert True in seen and seen.index(True) - 50 < within, (level, seen.index(True))
    assert verdicts([0.2, float("nan")]) == [False, True]


def _near_zero_losses(n: int, seed: int = 0) -> list[float]:
    """Step losses of a run that answers almost everything: most batches near 0.002, one in four
    holding an answer it gets wrong (0.08-0.2), as the tiny A8a run logged at 24,000 samples."""
    rng = np.random.default_rng(seed)
    hard = rng.random(n) < 0.25
    return list(np.where(hard, rng.uniform(0.08, 0.2, n), rng.uniform(0.0005, 0.005, n)))


def test_a_loss_near_zero_swinging_with_its_batches_is_not_a_divergence_but_a_blow_up_is(monkeypatch):
    """Near zero the ratio alone trips on an ordinary stretch of hard batches (the lowest running
    level is a lucky stretch of easy ones); the climb must also be large against the loss's own
    spread. A blow-up to a loss of 1 is still caught within a few steps."""
    from fvlm.training import divergence
    from fvlm.training.divergence import DivergenceGuard

    losses = [0.3] * 20 + _near_zero_losses(3000)
    guard = DivergenceGuard(5.0)
    assert not any(guard.diverged(x) for x in losses)
    assert guard.level / guard.floor > 5  # what the ratio test alone would have stopped on
    blown = DivergenceGuard(5.0)
    seen = [blown.diverged(x) for x in losses + [1.0] * 20]
    assert True in seen and seen.index(True) - len(losses) < 5
    assert "running level" in blown.describe() and "spread" in blown.describe()
    monkeypatch.setattr(divergence, "NOISE_MULT", 0.0)  # the ratio test alone
    ratio_only = DivergenceGuard(5.0)
    assert any(ratio_only.diverged(x) for x in losses)


def test_the_divergence_guard_resumes_from_its_state_as_if_never_stopped():
    """A guard rebuilt from its checkpointed state mid-run gives the same verdicts and state as one
    that ran through; a checkpoint from before the spread existed resumes on the ratio test."""
    from fvlm.training.divergence import DivergenceGuard

    losses = _near_zero_losses(400, seed=1) + [1.0] * 20
    through = DivergenceGuard(5.0)
    expected = [through.diverged(x) for x in losses]
    first = DivergenceGuard(5.0)
    got = [first.diverged(x) for x in losses[:250]]
    second = DivergenceGuard(5.0)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [second.diverged(x) for x in losses[250:]]
    assert got == expected and second == through
    legacy = DivergenceGuard(5.0)
    legacy.load_state_dict({"loss_ema": 0.2, "loss_floor": 0.1})
    assert (legacy.level, legacy.floor, legacy.floor_spread) == (0.2, 0.1, 0.0)
    assert legacy.diverged(0.2) is False and legacy.diverged(10.0) is True


def test_a_crash_writes_status_failed_with_the_message(out_dir, monkeypatch):
    from fvlm.training import trainer

    def broken(self, *args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(trainer.Trainer, "_evaluate", broken)
    cfg = small_config(out_dir, "crash", "train.max_steps=2", "train.eval_every=2")
    with pytest.raises(RuntimeError):
        train(cfg)
    summary = json.loads((cfg.run_dir / "run_summary.json").read_text())
    assert summary["status"] == "failed" and "disk on fire" in summary["error"]
    assert (cfg.run_dir / "checkpoints" / "step_0000002" / "meta.json").is_file(), "checkpoint precedes eval"


def test_wandb_offline_mirrors_the_csv(out_dir, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class FakeRun:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"].append(kwargs)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = small_config(
        out_dir, "wandb", "train.max_steps=2", "train.eval_every=2", "train.log_every=1", "train.wandb=offline"
    )
    train(cfg)
    assert calls["init"][0]["mode"] == "offline" and calls["finish"] == 1
    logged = {(step, key) for step, values in calls["log"] for key in values}
    assert (1, "train/train_loss") in logged and (2, "eval/val_loss") in logged
    assert yaml.safe_load((cfg.run_dir / "config.yaml").read_text())["train"]["wandb"] == "offline"


def test_wandb_missing_is_a_usage_error(out_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    code = main(
        ["train", "tiny", f"out_dir={out_dir}", "run_id=nowandb", *SMALL, "train.max_steps=1", "train.wandb=offline"]
    )
    assert code == 2


def test_init_from_a_run_folder_starts_from_its_weights(out_dir, small_run):
    from safetensors.torch import load_file

    source, _ = small_run
    cfg = small_config(
        out_dir,
        "stage2",
        "train.stage=2",
        f"train.init_from={source.run_dir}",
        "train.max_steps=1",
        "train.eval_every=1",
        "optim.lr_connector=0",
        "optim.lr_dino=0",
        "optim.lr_llm=0",
    )
    train(cfg)
    before = load_file(str(source.run_dir / "checkpoints" / "step_0000024" / "model.safetensors"))
    after = load_file(str(cfg.run_dir / "checkpoints" / "step_0000001" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
