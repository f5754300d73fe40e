"""The run matrices of Phase 1: the twelve ablation runs and the scaling grid, as config overrides.

Every run is a `RunSpec`: an id from the plan (F1, LR2, A8a, S-C1-F, ...), the overrides that make it
differ from the sweep's base config, and its planned sample count. Nothing here trains anything.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from fvlm.config import RunConfig, load_config
from fvlm.errors import UsageError
from fvlm.experiments.presets import Preset

ABLATION_IDS = ("F1", "F2", "F3", "LR2", "LR3", "LR4", "A1", "A6", "B1", "A8a", "A8b", "D1")
# The plan's conditional: LR2-LR4 only matter when the backbones train.
LR_IDS = ("LR2", "LR3", "LR4")
FREEZE_IDS = ("F1", "F2", "F3")


@dataclass
class RunSpec:
    run_id: str
    sweep: str  # ablations | scaling
    description: str
    diff: dict[str, Any]  # overrides on top of the sweep base: what makes this run this run
    samples: int
    group: str = ""  # freeze / learning_rate / ... ; size label for scaling runs
    meta: dict[str, Any] = field(default_factory=dict)

    def overrides(self, base: dict[str, Any]) -> dict[str, Any]:
        return {**base, **self.diff, "run_id": self.run_id, "train.max_samples": self.samples}


# Training-noise replicates: a run `<id>.s<k>` is run `<id>` again with only its seed changed (the
# seed sets the initialisation and, unless data.seed is given, the data order), to seed
# `seed + offset + REPLICATE_SEED_STRIDE * k`: two main jobs at seed offsets 0 and 1 never share a
# replicate's seed.
REPLICATE_SEED_STRIDE = 1000
REPLICATE_SUFFIX = ".s"


def replicate_id(run_id: str, k: int) -> str:
    return f"{run_id}{REPLICATE_SUFFIX}{k}"


def replicate_of(run_id: str) -> tuple[str, int]:
    """(the run it replicates, k) of a replicate id; (run_id, 0) for a run that is no replicate."""
    head, sep, k = run_id.rpartition(REPLICATE_SUFFIX)
    return (head, int(k)) if sep and head and k.isdigit() and int(k) > 0 else (run_id, 0)


def seeded(specs: list[RunSpec], seed: int, offset: int) -> list[RunSpec]:
    """`specs` at a global seed offset: every run's seed is `seed + offset` (nothing changes at 0, so
    that the folders of a run at offset 0 stay resumable)."""
    if offset == 0:
        return specs
    return [dataclasses.replace(s, diff={**s.diff, "seed": seed + offset}) for s in specs]


def replicate_specs(specs: list[RunSpec], counts: dict[str, int], seed: int, offset: int) -> list[RunSpec]:
    """The replicates of the runs named in `counts` ({run id: extra seeds}), each `<id>.s<k>`."""
    out = []
    for spec in specs:
        for k in range(1, counts.get(spec.run_id, 0) + 1):
            out.append(
                dataclasses.replace(
                    spec,
                    run_id=replicate_id(spec.run_id, k),
                    description=f"{spec.description} [training-noise replicate {k}: another seed]",
                    diff={**spec.diff, "seed": seed + offset + REPLICATE_SEED_STRIDE * k},
                    meta={**spec.meta, "replicate_of": spec.run_id, "replicate": k},
                )
            )
    return out


def split_overrides(items: list[str], sizes: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """`key=value` items into overrides for every run and, for `S:key=value`, for one size's runs."""
    from fvlm.config import parse_overrides

    common: dict[str, Any] = {}
    by_size: dict[str, dict[str, Any]] = {}

    def number(value: Any) -> Any:  # YAML reads 1e-5 as a string; the config would coerce it anyway
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
        return value

    for item in items:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head:
            if head not in sizes:
                raise UsageError(
                    f"override '{item}': '{head}' is not a size of this preset "
                    f"({', '.join(sizes) or 'this sweep has no sizes'})"
                )
            ((key, value),) = parse_overrides([rest])
            by_size.setdefault(head, {})[key] = number(value)
        else:
            ((key, value),) = parse_overrides([item])
            common[key] = number(value)
    return common, by_size


def eval_every(samples: int, batch: int, evals: int) -> int:
    """Steps between evaluations for at least `evals` evenly spaced eval points over the run (the
    trainer also evaluates at the last step)."""
    steps = max(1, math.ceil(samples / batch))
    return max(1, steps // evals)


def samples_per_step(cfg: RunConfig) -> int:
    """Per optimizer step, on the GPUs this machine will run it on (the runner uses all it sees)."""
    import torch

    world_size = torch.cuda.device_count() if torch.cuda.is_available() else 1
    return cfg.train.batch_size * cfg.train.grad_accum * max(1, world_size)


# ----------------------------------------------------------------------------- Phase 1a


def ablation_specs(preset: Preset, freeze_winner: str | None = None) -> list[RunSpec]:
    """The plan's twelve runs with its knobs. With `freeze_winner="F1"` the LR runs are left out
    (the plan: only the connector LR matters when the backbones are frozen)."""
    b = preset.backbone_lr
    n = preset.ablation_samples
    image = {
        "data.mix": dict(preset.image_heavy_mix),
        "data.text_ratio": preset.image_heavy_mix["text"],
        "train.stage": 2,
    }
    runs = [
        RunSpec(
            "F1",
            "ablations",
            "freeze DINO + LLM: connector only",
            {"model.freeze_dino": True, "model.freeze_llm": True},
            n,
            "freeze",
        ),
        RunSpec("F2", "ablations", "freeze LLM: connector + DINO", {"model.freeze_llm": True}, n, "freeze"),
        RunSpec("F3", "ablations", "full unfreeze, differential LR 10:1 (baseline, = LR1)", {}, n, "freeze"),
        RunSpec(
            "LR2", "ablations", "full unfreeze, connector LR 100:1", {"optim.lr_connector": 100 * b}, n, "learning_rate"
        ),
        RunSpec(
            "LR3", "ablations", "full unfreeze, connector LR 3:1", {"optim.lr_connector": 3 * b}, n, "learning_rate"
        ),
        RunSpec("LR4", "ablations", "full unfreeze, uniform LR 1:1", {"optim.lr_connector": b}, n, "learning_rate"),
        RunSpec("A1", "ablations", "shallow query (deep_query=false)", {"model.deep_query": False}, n, "deep_query"),
        RunSpec("A6", "ablations", "coarse only: q_static, no fine pass", {"model.coarse_only": True}, n, "two_pass"),
        RunSpec(
            "B1",
            "ablations",
            "multi-token baseline: 16 pooled DINO tokens per frame, no query",
            {"model.arch": "multi_token", "model.tokens_per_frame": 16},
            n,
            "efficiency",
        ),
        RunSpec(
            "A8a",
            "ablations",
            "image-heavy data, stage-2 answer-only loss, images as 1 frame",
            {**image, "data.replicate_image_frames": 1},
            n,
            "image_handling",
        ),
        RunSpec(
            "A8b",
            "ablations",
            f"image-heavy data, stage-2 answer-only loss, images replicated to {preset.replicate_max} frames",
            {**image, "data.replicate_image_frames": preset.replicate_max},
            n,
            "image_handling",
        ),
        RunSpec(
            "D1",
            "ablations",
            "video-heavy mix 55/30/15",
            {"data.mix": dict(preset.video_heavy_mix), "data.text_ratio": preset.video_heavy_mix["text"]},
            n,
            "data_mix",
        ),
    ]
    assert tuple(r.run_id for r in runs) == ABLATION_IDS
    if freeze_winner == "F1":
        runs = [r for r in runs if r.run_id not in LR_IDS]
    return runs


def ablation_base(preset: Preset, common: dict[str, Any]) -> dict[str, Any]:
    """Overrides every ablation run shares: F3's learning rates, the budget, the eval cadence."""
    base = {
        **preset.overrides,
        "optim.lr_connector": preset.connector_lr,
        "optim.lr_dino": preset.backbone_lr,
        "optim.lr_llm": preset.backbone_lr,
    }
    base.update(common)
    cfg = load_config(preset.config, {**base, "run_id": "base", "train.max_samples": preset.ablation_samples})
    every = eval_every(preset.ablation_samples, samples_per_step(cfg), preset.ablation_evals)
    base.setdefault("train.eval_every", every)
    base.setdefault("train.save_every", every)
    return base


# ----------------------------------------------------------------------------- Phase 1b


def flops_per_sample(preset: Preset, cfg: RunConfig, formula: str) -> float:
    from fvlm.model.flops import estimate_flops

    frames, text = preset.sample_shape
    return estimate_flops(cfg.model, frames, text, formula=formula).per_sample


def scaling_specs(
    preset: Preset, base: dict[str, Any], by_size: dict[str, dict[str, Any]], formula: str = "exact"
) -> list[RunSpec]:
    """Sizes x budgets x {foveated (F), multi-token (B)} with samples = budget / FLOPs per sample of
    that cell, plus iso-FLOP baselines (B-isoflop) for the preset's cheap cells. The B cells are
    iso-sample: they see the foveated cell's data and spend more compute."""
    specs = []
    extras = set(preset.isoflop_extras)
    for size in preset.sizes:
        size_diff = {"model.llm": size.llm, **size.overrides}
        lr_llm = base.get("optim.lr_llm")
        if lr_llm is not None and size.llm_lr_scale != 1.0:
            size_diff["optim.lr_llm"] = float(lr_llm) * size.llm_lr_scale
        size_diff.update(by_size.get(size.label, {}))
        fov = load_config(preset.config, {**base, **size_diff, "run_id": "probe"})
        mt = load_config(
            preset.config,
            {**base, **size_diff, "model.arch": "multi_token", "model.tokens_per_frame": 16, "run_id": "probe"},
        )
        fps = {"F": flops_per_sample(preset, fov, formula), "B": flops_per_sample(preset, mt, formula)}
        for budget, flops in preset.budgets.items():
            iso_samples = max(1, int(flops // fps["F"]))
            cells = [
                ("F", {}, iso_samples, "foveated, 1 token/frame"),
                (
                    "B",
                    {"model.arch": "multi_token", "model.tokens_per_frame": 16},
                    iso_samples,
                    "multi-token baseline, 16 tokens/frame, iso-sample",
                ),
            ]
            if (size.label, budget) in extras:
                cells.append(
                    (
                        "B-isoflop",
                        cells[1][1],
                        max(1, int(flops // fps["B"])),
                        "multi-token baseline, 16 tokens/frame, iso-FLOP",
                    )
                )
            for arch, diff, samples, what in cells:
                key = arch.split("-")[0]
                every = eval_every(samples, samples_per_step(fov), preset.scaling_evals)
                specs.append(
                    RunSpec(
                        f"{size.label}-{budget}-{arch}",
                        "scaling",
                        f"{size.name} {budget}: {what}",
                        {
                            **size_diff,
                            **diff,
                            "train.eval_every": every,
                            "train.save_every": every,
                            "train.keep_milestones": preset.scaling_evals,
                        },
                        samples,
                        size.label,
                        meta={
                            "size": size.name,
                            "budget": budget,
                            "budget_flops": flops,
                            "flops_per_sample": fps[key],
                            "planned_flops": samples * fps[key],
                            "flops_formula": formula,
                        },
                    )
                )
    return specs
