"""After Phase 1: the paper stage configs and mixes, the DPO loss and trainer, and `fvlm stages`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fvlm import run_folder as rf
from fvlm.cli import main
from fvlm.config import CONFIG_DIR, load_config
from fvlm.data.loader import load_index
from fvlm.data.synth import SceneObject, _ShardWriter
from fvlm.errors import UsageError, read_yaml
from fvlm.experiments import stages
from fvlm.training import dpo
from fvlm.training.checkpoint import resolve_weights
from fvlm.training.dist import init_distributed
from fvlm.training.trainer import train

ASSETS = Path(__file__).resolve().parents[1] / "fvlm" / "assets" / "tiny-backbones-1ea813a0af"
SIZES = ("135m", "360m", "1.7b")
PLAN_DATASETS = {
    1: {"openvid", "vript", "sharegpt4video", "cauldron", "smoltalk"},
    2: {"llava_video", "vista", "cauldron", "smoltalk"},
    3: {"vista", "stage3_yt", "cauldron", "rlaif_v", "smoltalk"},
}


# ----------------------------------------------------------------------------- paper configs and mixes


@pytest.mark.parametrize("size", SIZES)
def test_paper_stage_configs_load_with_the_stage_rules(size):
    cfgs = {s: load_config(f"paper_{size}_stage{s}") for s in (1, 2, 3)}
    assert [c.train.stage for c in cfgs.values()] == [1, 2, 3]
    assert cfgs[1].train.max_samples == 4_000_000  # the plan: 1M is ~25% of stage 1's budget
    assert cfgs[2].train.init_from == f"runs/paper_{size}_stage1"
    assert cfgs[3].train.init_from == f"runs/paper_{size}_stage2"
    for s, cfg in cfgs.items():
        assert cfg.data.train == f"shards/stage{s}.yaml"
        assert cfg.data.text_ratio == 0.14
        assert cfg.optim.lr_connector == 10 * cfg.optim.lr_llm == 10 * cfg.optim.lr_dino  # differential LRs
        assert not cfg.train.dpo.enabled
    for s in (2, 3):  # full unfreeze
        assert not cfgs[s].model.freeze_dino and not cfgs[s].model.freeze_llm
    # The stage decides the loss routing: all tokens in stage 1, the answer only after.
    from fvlm.data.decode import encode_dialogue
    from fvlm.model.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    masks = {
        s: encode_dialogue(
            tok, [("Describe it.", "A red square.")], stage=c.train.stage, max_tokens=512, end_of_turn_id=None
        )[1]
        for s, c in cfgs.items()
    }
    assert all(masks[1]) and 0 < sum(masks[2]) < len(masks[2]) and masks[2] == masks[3]


def test_stage_mixes_name_the_plan_datasets_and_load(tmp_path):
    for stage, names in PLAN_DATASETS.items():
        mix = read_yaml(CONFIG_DIR / "mixes" / f"stage{stage}.yaml")["sources"]
        assert set(mix) == names
        assert math.isclose(sum(e["weight"] for e in mix.values()), 1.0)
        assert mix["smoltalk"]["weight"] == 0.14
    # Pointed at a data folder with one shard folder per dataset, every mix loads through the loader.
    data = tmp_path / "data"
    for name in set().union(*PLAN_DATASETS.values()):
        writer = _ShardWriter(data / name, name)
        writer.write(f"{name}-0", {"user": "Hi", "assistant": "Hello.", "source": name, "frame_count": 0})
        writer.close()
    paths = stages.write_mixes(data, tmp_path / "out")
    for stage, path in paths.items():
        index = load_index(path, f"stage {stage}")
        assert set(index.sources) == PLAN_DATASETS[stage] and len(index) == len(PLAN_DATASETS[stage])


def test_stage_overrides_and_decisions(tmp_path):
    decisions = tmp_path / "decisions.json"
    decisions.write_text(
        json.dumps(
            {
                "locked_config": {"overrides": {"model.freeze_dino": True, "optim.lr_connector": 2e-4}},
                "decision3": {"size": "360M", "stages": {"1": 2e6, "2": 3e5, "3": None}},
            }
        )
    )
    kwargs = dict(
        preset=None,
        size=None,
        out=str(tmp_path / "s"),
        decisions=str(decisions),
        samples={1: None, 2: None, 3: 1234},
        data=None,
        overrides=["train.batch_size=4", "2:optim.lr_llm=3e-6"],
        export=False,
        dry_run=True,
    )
    pipeline = stages.plan(**kwargs)
    assert [s.run_id for s in stages.plan(**{**kwargs, "variant": "b"}).stages] == ["stage1", "stage2", "stage3-b"]
    assert pipeline.name == "360m"
    assert [s.samples for s in pipeline.stages] == [2_000_000, 300_000, 1234]
    cfgs = [stages.stage_config(pipeline, s, "x" if s.stage > 1 else "") for s in pipeline.stages]
    assert cfgs[0].model.freeze_dino and not cfgs[1].model.freeze_dino and not cfgs[2].model.freeze_dino
    assert all(c.optim.lr_connector == 2e-4 and c.train.batch_size == 4 for c in cfgs)
    assert cfgs[1].optim.lr_llm == 3e-6 and cfgs[2].optim.lr_llm != 3e-6
    with pytest.raises(UsageError, match="train.init_from"):
        stages.split_stage_overrides(["3:train.init_from=x"])
    with pytest.raises(UsageError, match="stage must be"):
        stages.split_stage_overrides(["4:train.batch_size=2"])
    with pytest.raises(UsageError, match="--variant"):
        stages.plan(**{**kwargs, "variant": "../x"})


# ----------------------------------------------------------------------------- the DPO loss


def test_dpo_loss_equals_the_published_formulas():
    pc = torch.tensor([-3.0, -7.5, -2.0, -10.0])
    pr = torch.tensor([-4.0, -6.0, -9.0, -10.5])
    rc = torch.tensor([-3.5, -7.0, -2.5, -9.0])
    rr = torch.tensor([-3.5, -6.5, -8.0, -11.0])
    beta, eps = 0.3, 0.1
    for i in range(4):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        expected = {
            ("sigmoid", 0.0): -math.log(sig(beta * h)),
            ("sigmoid", eps): -(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h)),
            ("ipo", 0.0): (h - 1 / (2 * beta)) ** 2,
        }
        for (kind, smoothing), value in expected.items():
            losses, chosen, rejected = dpo.dpo_loss(pc, pr, rc, rr, beta, kind, smoothing)
            assert losses[i].item() == pytest.approx(value, rel=1e-6)
            assert chosen[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()), rel=1e-6)
            assert (chosen - rejected)[i].item() == pytest.approx(beta * h, rel=1e-6, abs=1e-7)
    assert dpo.dpo_loss(pc, pc, pc, pc, beta)[0].tolist() == pytest.approx([math.log(2)] * 4)


def test_dpo_sft_term_equals_the_formula():
    """RPO's loss: DPO's plus alpha x the chosen answer's mean per-token NLL, and its gradient."""
    pc = torch.tensor([-3.0, -7.5, -2.0, -10.0], requires_grad=True)
    pr = torch.tensor([-4.0, -6.0, -9.0, -10.5])
    rc = torch.tensor([-3.5, -7.0, -2.5, -9.0])
    rr = torch.tensor([-3.5, -6.5, -8.0, -11.0])
    tokens = torch.tensor([3, 5, 1, 8])
    beta, alpha = 0.3, 0.7
    losses, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta)
    total, nll = dpo.with_sft_term(losses, pc, tokens, alpha)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for i in range(4):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        nll_i = -pc[i].item() / tokens[i].item()
        assert nll[i].item() == pytest.approx(nll_i, rel=1e-6)
        assert total[i].item() == pytest.approx(-math.log(sig(beta * h)) + alpha * nll_i, rel=1e-6)
        # d total / d log pi(c) = -beta (1 - sigmoid(beta h)) - alpha / |c|
        grad = torch.autograd.grad(total[i], pc, retain_graph=True)[0]
        assert grad[i].item() == pytest.approx(-beta * (1 - sig(beta * h)) - alpha / tokens[i].item(), rel=1e-5)
    # Weight 0 is plain DPO, the same tensor.
    assert dpo.with_sft_term(losses, pc, tokens, 0.0)[0] is losses


def test_dpo_config_validation():
    with pytest.raises(UsageError, match="train.init_from"):
        load_config("tiny", ["train.dpo.enabled=true", "train.stage=3"])
    with pytest.raises(UsageError, match="label_smoothing"):
        load_config("tiny", ["train.dpo.loss=ipo", "train.dpo.label_smoothing=0.1"])
    with pytest.raises(UsageError, match="train.dpo.beta"):
        load_config("tiny", ["train.dpo.beta=0"])
    with pytest.raises(UsageError, match="train.dpo.sft_weight"):
        load_config("tiny", ["train.dpo.sft_weight=-1"])


# ----------------------------------------------------------------------------- DPO training


def _common(out: Path) -> dict:
    return {
        "out_dir": str(out),
        "model.llm": str(ASSETS / "tiny-llm"),
        "model.dino": str(ASSETS / "tiny-dino"),
        "model.visual_scale": 0.3,
        "data.synth_videos": 300,
        "data.synth_images": 300,
        "data.synth_texts": 50,
        "data.synth_frames": 4,
        "data.max_frames": 4,
        "data.synth_min_objects": 1,
        "data.synth_max_objects": 2,
        "data.synth_video_task": "marked",
        "data.synth_image_task": "marked",
        "data.synth_pairs": 400,
        "data.synth_val": 32,
        "data.max_text_tokens": 96,
        "train.eval_samples": 32,
        "train.probe_videos": 0,
        "train.log_every": 5,
        "train.cpu_threads": 1,
        "train.eval_every": 1000,
        "train.save_every": 1000,
    }


SFT_WEIGHT = 0.5


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """Stage-2 SFT on captions, then DPO on synthetic pairs with the SFT model as the reference."""
    from fvlm.data.synth import ensure_synthetic

    out = tmp_path_factory.mktemp("dpo")
    common = _common(out)
    sft = load_config("tiny", {**common, "run_id": "sft", "train.stage": 2, "train.max_steps": 60})
    train(sft)
    paths = ensure_synthetic(sft.data, sft.data_seed, out)
    cfg = load_config(
        "tiny",
        {
            **common,
            "run_id": "dpo",
            "train.stage": 3,
            "train.max_steps": 150,
            "data.train": paths["pairs"],
            "train.init_from": str(sft.run_dir),
            "train.dpo.enabled": True,
            "train.dpo.beta": 0.5,
            "train.dpo.sft_weight": SFT_WEIGHT,
            "optim.lr_connector": 3e-3,
            "optim.lr_llm": 1e-3,
            "optim.lr_dino": 3e-4,
            "optim.warmup_ratio": 0.0,
        },
    )
    trainer = dpo.DPOTrainer(cfg, init_distributed())
    before = {k: v.clone() for k, v in trainer.reference.state_dict().items()}
    summary = trainer.run()
    return {"cfg": cfg, "trainer": trainer, "before": before, "summary": summary, "paths": paths, "sft": sft}


def test_dpo_reference_stays_frozen(dpo_run):
    trainer = dpo_run["trainer"]
    reference = trainer.reference
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in reference.parameters()}
    init = load_file(str(resolve_weights(str(dpo_run["sft"].run_dir)) / rf.MODEL_FILE))
    after = reference.state_dict()
    assert set(init) <= set(after) and len(init) > 10
    for name, value in dpo_run["before"].items():
        assert torch.equal(after[name], value), name
    for name, value in init.items():  # the file holds every tensor once (tied weights once)
        assert torch.equal(after[name], value), name
    # ...while the policy did move away from it.
    policy = trainer.model.state_dict()
    assert any(not torch.equal(policy[k], after[k]) for k in after)


def test_dpo_logs_rewards_and_raises_the_held_out_margin(dpo_run):
    cfg, trainer = dpo_run["cfg"], dpo_run["trainer"]
    assert dpo_run["summary"]["status"] == "completed"
    rows = (cfg.run_dir / rf.STEPS).read_text().splitlines()
    header = rows[0].split(",")
    assert header[-len(dpo.DPO_COLUMNS) :] == list(dpo.DPO_COLUMNS)
    first = dict(zip(header, rows[1].split(",")))
    # Policy == reference at step 1: DPO's log 2, plus the weighted NLL of the chosen answers.
    nll = float(first["dpo_chosen_nll"])
    assert nll > 0
    assert float(first["train_loss"]) == pytest.approx(math.log(2) + SFT_WEIGHT * nll, abs=1e-4)
    assert float(first["dpo_reward_margin"]) == pytest.approx(0.0, abs=1e-4)
    loader = dpo.build_preference_loader(cfg, dpo_run["paths"]["pairs_val"], trainer.tokenizer, train=False)
    rewards = dpo.preference_rewards(trainer.model, trainer.reference, loader, cfg.train.dpo.beta)
    summary = dpo.margin_summary(rewards["margin"])
    assert summary["n"] == 40
    assert summary["ci95"][0] > 0, summary  # the held-out margin rose, beyond its interval
    # The reference against itself: every margin exactly 0.
    same = dpo.preference_rewards(trainer.reference, trainer.reference, loader, cfg.train.dpo.beta)
    assert float(abs(same["margin"]).max()) == 0.0


def test_preference_reader_skips_samples_without_rejected(tmp_path):
    writer = _ShardWriter(tmp_path / "pairs", "p")
    scene: list[SceneObject] = []
    writer.write("a", {"user": "Hi", "assistant": "Hello.", "rejected": "Go away.", "source": "text", "scene": scene})
    writer.write("b", {"user": "Hi", "assistant": "Hello.", "source": "text"})
    writer.close()
    cfg = load_config("tiny", {"train.stage": 2, "out_dir": str(tmp_path)})
    from fvlm.model.build import build_tokenizer

    loader = dpo.build_preference_loader(cfg, str(tmp_path / "pairs"), build_tokenizer(cfg.model), train=False)
    batches = list(loader)
    assert [b["keys"] for b in batches] == [["a"]]
    assert loader.stats["no_rejected_answer"] == 1
    batch = batches[0]
    assert batch["rejected_loss_mask"].sum() > 0 and not torch.equal(batch["input_ids"], batch["rejected_input_ids"])


# ----------------------------------------------------------------------------- fvlm stages, reduced


def test_tiny_stages_run_resume_and_export(tmp_path, capsys):
    out = tmp_path / "stages"
    argv = [
        "stages",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--stage1-samples",
        "160",
        "--stage2-samples",
        "160",
        "--stage3-samples",
        "64",
        "data.synth_videos=120",
        "data.synth_images=60",
        "data.synth_texts=20",
        "data.synth_val=16",
        "train.eval_every=10",
        "1:data.synth_pairs=64",
    ]
    assert main(argv) == 0
    record = json.loads((out / "stages.json").read_text())
    rows = record["stages"]
    assert [r["stage"] for r in rows] == [1, 2, 3]
    assert [r["loss"] for r in rows] == ["all_tokens", "answer_only", "dpo"]
    assert [r["samples"] for r in rows] == [160, 160, 64]
    assert rows[1]["init_from"] == rows[0]["checkpoint"] and rows[2]["init_from"] == rows[1]["checkpoint"]
    for r in rows:
        modes = r["bench"]["bench"]
        assert set(modes) == {"coarse_only", "coarse_fine", "autoregressive"}
        assert all(len(m["ci95"]) == 2 for m in modes.values())
    assert set(rows[1]["vs_previous_stage"]["bench"]) == {"coarse_only", "coarse_fine", "autoregressive"}
    held = rows[2]["dpo_heldout"]
    assert held["n"] == 16
    assert held["mean_chosen_reward"] - held["mean_rejected_reward"] == pytest.approx(held["mean_margin"], abs=1e-9)
    assert held["chosen_ci95"][0] <= held["mean_chosen_reward"] <= held["chosen_ci95"][1]
    assert max(record["export"]["max_logit_difference"].values()) <= 1e-5
    assert (out / "export" / "config.json").is_file()
    md = (out / "stages.md").read_text()
    assert "| 3 | dpo |" in md and "held-out pairs" in md
    # A rerun finds every stage finished: nothing trains again, the summary is the same.
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("already finished") == 3 and "evaluating" not in printed
    assert json.loads((out / "stages.json").read_text())["stages"] == rows
    # A variant: another stage 3 beside it on the same stages 1-2, which are neither trained nor
    # evaluated again.
    capsys.readouterr()
    assert main([*argv, "--variant", "rpo", "3:train.dpo.sft_weight=1"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("already finished") == 2 and printed.count("[stages] evaluating") == 1
    variant = json.loads((out / "stages-rpo.json").read_text())["stages"]
    assert variant[:2] == rows[:2] and variant[2]["run_id"] == "stage3-rpo"
    assert variant[2]["init_from"] == rows[1]["checkpoint"] and variant[2]["checkpoint"] != rows[2]["checkpoint"]
    assert read_yaml(out / "stage3-rpo" / rf.CONFIG)["train"]["dpo"]["sft_weight"] == 1
    assert (out / "stages-rpo.md").is_file() and (out / "export-rpo" / "config.json").is_file()
    assert json.loads((out / "stages.json").read_text())["stages"] == rows  # the first stage 3's, untouched


def test_stages_dry_run_prices_the_pipeline(capsys):
    assert main(["stages", "--size", "135m", "--dry-run", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    rows = record["estimate"]["rows"]
    assert [r["samples"] for r in rows] == [4_000_000, 500_000, 250_000]
    assert rows[0]["flops"] == pytest.approx(8 * rows[1]["flops"])
    assert record["estimate"]["gpu_hours"] > 0
