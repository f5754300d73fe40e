"""The FLOP counter against torch's own count of a real training step, and the plan's budget table."""

import json

import pytest

from fvlm.cli import main
from fvlm.config import load_config
from fvlm.model.build import build_model
from fvlm.model.flops import PLAN_BUDGETS, count_params, estimate_flops, measure_flops

ARCHS = {
    "foveated": [],
    "coarse_only": ["model.coarse_only=true"],
    "shallow": ["model.deep_query=false"],
    "multi_token": ["model.arch=multi_token"],
    "lambda": ["model.lambda_coarse=0.5"],
    "frozen_dino": ["model.freeze_dino=true"],
    "frozen_both": ["model.freeze_dino=true", "model.freeze_llm=true"],
}


@pytest.mark.parametrize("name", sorted(ARCHS))
@pytest.mark.parametrize("frames,text", [(3, 17), (8, 40)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimate_matches_measured(name, frames, text, checkpointing):
    cfg = load_config(None, ARCHS[name] + [f"model.gradient_checkpointing={checkpointing}"]).model
    estimated = estimate_flops(cfg, frames, text).executed
    measured = measure_flops(cfg, frames, text)
    assert abs(estimated / measured - 1) < 1e-3, (estimated, measured)


@pytest.mark.parametrize("name", sorted(ARCHS))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimate_matches_measured_on_a_logged_step(name, checkpointing):
    """A logged step also measures the coarse loss (without gradient when it is not trained)."""
    cfg = load_config(None, ARCHS[name] + [f"model.gradient_checkpointing={checkpointing}"]).model
    estimated = estimate_flops(cfg, 5, 23, coarse_text_loss=True).executed
    measured = measure_flops(cfg, 5, 23, compute_coarse=True)
    assert abs(estimated / measured - 1) < 1e-3, (estimated, measured)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_checkpointing_adds_recompute_but_not_budget_flops(name):
    plain = estimate_flops(load_config(None, ARCHS[name]).model, 8, 40)
    checkpointed = estimate_flops(load_config(None, ARCHS[name] + ["model.gradient_checkpointing=true"]).model, 8, 40)
    assert plain.recompute == 0 and plain.executed == plain.per_sample
    assert checkpointed.per_sample == plain.per_sample
    assert 0 < checkpointed.recompute < plain.per_sample


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_param_count_matches_built_model(name):
    cfg = load_config(None, ARCHS[name]).model
    assert count_params(cfg)["total"] == sum(p.numel() for p in build_model(cfg).parameters())


def test_paper_shape_param_counts_from_configs_alone():
    # SmolLM2-135M is ~134.5M parameters and DINOv2-small ~22M: the plan's "~157M total".
    cfg = load_config(None, {"model": {"llm": "smollm2-135m", "dino": "dinov2-small", "image_size": 224}}).model
    params = count_params(cfg)
    assert 134e6 < params["llm"] < 135e6 and 21e6 < params["dino"] < 23e6


def test_seed_formula_reproduces_plan_c1_table():
    samples = {}
    for size in ("135m", "360m", "1.7b"):
        cfg = load_config(None, {"model": {"llm": f"smollm2-{size}", "dino": "dinov2-small", "image_size": 224}}).model
        samples[size] = estimate_flops(cfg, 16, 484, formula="seed").samples_for(PLAN_BUDGETS["C1"])
    assert 95_000 < samples["135m"] < 105_000
    assert 38_000 < samples["360m"] < 44_000
    assert 8_500 < samples["1.7b"] < 9_800


def test_multi_token_costs_more_llm_but_same_dino():
    fov = estimate_flops(load_config(None).model, 8, 40)
    multi = estimate_flops(load_config(None, ["model.arch=multi_token"]).model, 8, 40)
    assert multi.breakdown["llm"] > fov.breakdown["llm_fine"]
    # Both read all patches once; the deep query skips the work of DINO's last layer beyond K/V.
    assert multi.breakdown["dino_patches"] >= fov.breakdown["dino_patches"]


def test_flops_cli_json(capsys):
    assert main(["flops", "--json", "--measure", "--frames", "4", "--text-tokens", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert abs(out["config"]["exact_over_measured"] - 1) < 0.05
    for size in ("135M", "360M", "1.7B"):
        assert out["paper_sizes"][f"{size}-foveated"]["flops_per_sample"] > 0


def test_flops_cli_with_checkpointing_agrees_with_measured(capsys):
    assert main(["flops", "--json", "--measure", "model.gradient_checkpointing=true"]) == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert abs(config["exact_over_measured"] - 1) < 0.01
    assert config["flops_per_sample_executed"] == config["flops_per_sample"] + config["recompute_per_sample"]
    assert config["recompute_per_sample"] > 0


def test_flops_cli_bad_override_exits_2(capsys):
    assert main(["flops", "model.arch=transformer"]) == 2
    assert "model.arch" in capsys.readouterr().err
